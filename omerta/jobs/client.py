"""
Compute jobs from the consumer's side, on the L{MeshNetwork} API: submit a
job to a provider (by peer id or name, or the best-ranked one with room),
send its inputs, follow its output, cancel it, fetch its output files.
C{omerta job} and the control API of a running node are front ends to it.

    client = JobClient(ConsumerClient(mesh, data_dir))
    job = await client.submit(JobSpec(argv=["python3", "-c", "print(6*7)"]),
                              provider="provider-1")
    final = await client.wait(job["job_id"], on_output=print_chunk)
    print(final["state"], final["exit_code"])

The jobs submitted from a data directory are kept in
C{<data-dir>/consumer-jobs.json} (job id, provider, network, command), so
C{status}, C{logs}, C{cancel} and C{fetch} find the provider again later.
A job's outcome feeds its provider's reputation once (C{consumer.json}, as
for VMs): a job that ended by itself, whatever its exit code, or was
killed at the limits its owner set, counts for the provider; a job the
provider lost or could not run counts against it; a cancelled job counts
for nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omerta.mesh.messaging import MessagingError
from omerta.mesh.registry import PeerRecord, Requirements
from omerta.roles.consumer_client import (BadReply, ConsumerClient, ConsumerError, NoAnswer,
                                          _deferred)
from omerta.safe_text import printable
from omerta.storage import StateFileError, read_json, write_json
from omerta.wire import ParseError
from omerta.wire.job import (CHANNEL, CHUNK, NO_EXIT, JobOp, JobState, JobStatus, Stream,
                             build_request, job_id_bytes, parse_reply)
from omerta.wire.messages import Capability

JOBS_FILE = "consumer-jobs.json"
FOR_PROVIDER = ("exited", "timeout", "memory")
AGAINST_PROVIDER = ("lost", "failed")


class JobRefused(ConsumerError):
    """The provider answered a job request with an error status (L{JobStatus})."""

    def __init__(self, record: PeerRecord | None, status: int, detail: str):
        try:
            name = JobStatus(status).name.lower().replace("_", " ")
        except ValueError:
            name = f"status {status}"
        who = record.name or record.peer_id_text[:16] if record is not None else "the provider"
        super().__init__(f"{printable(who)} refused: {name}:"
                         f" {printable(detail, 1000) if detail else 'no detail given'}")
        self.status = status
        self.detail = detail


class UnknownJob(ConsumerError, LookupError):
    pass


@dataclass(frozen=True)
class JobSpec:
    """A job as the consumer asks for it."""

    argv: list
    env: dict = field(default_factory=dict)
    stdin: bytes = b""
    inputs: dict = field(default_factory=dict)
    """Path in the job's work directory -> the content (bytes)."""
    outputs: list = field(default_factory=list)
    cpu: float = 1.0
    memory_mb: int = 256
    timeout_s: int = 600
    network: bool = False
    name: str = ""

    # what ConsumerClient.find_provider and its NoRoom message read
    @property
    def vcpus(self) -> int:
        return max(1, math.ceil(self.cpu))

    disk_gb = 0

    def requirements(self) -> Requirements:
        return Requirements(cpu_cores=self.vcpus, memory_mb=self.memory_mb, disk_gb=0,
                            capabilities=Capability.PROVIDER)


class JobClient:
    """
    @param consumer: the L{ConsumerClient} of the mesh and data directory
        (provider lookup, paths, reputation).
    """

    def __init__(self, consumer: ConsumerClient, now: Callable[[], float] = time.time):
        self.consumer = consumer
        self.path = Path(consumer.data_dir) / JOBS_FILE
        self._now = now

    # what was submitted from here (no mesh needed)

    def kept(self) -> dict[str, dict]:
        """Job id -> what is kept of it, newest first."""
        document = read_json(self.path, lambda: {"jobs": {}})
        jobs = document.get("jobs") if isinstance(document, dict) else None
        if not isinstance(jobs, dict):
            raise StateFileError(f"{self.path} is damaged: it has no object of jobs; move it"
                                 f" aside (its jobs can then only be found by 'omerta job"
                                 f" list --peer PROVIDER')")
        return dict(sorted(jobs.items(), key=lambda item: -item[1].get("submitted_at", 0)))

    def find(self, ref: str) -> tuple[str, dict]:
        """A kept job by id or unique id prefix."""
        kept = self.kept()
        matches = [job_id for job_id in kept if job_id.startswith(ref.lower())] if ref else []
        if len(matches) != 1:
            raise UnknownJob(
                f"no job submitted from here has an id starting {ref!r}" if not matches else
                f"{len(matches)} jobs have ids starting {ref!r}: {', '.join(matches[:5])}")
        return matches[0], kept[matches[0]]

    def _keep(self, job_id: str, **fields) -> None:
        document = {"version": 1, "jobs": self.kept()}
        document["jobs"].setdefault(job_id, {}).update(fields)
        write_json(self.path, document)

    # talking to providers

    async def _ask(self, record: PeerRecord, op: JobOp, timeout: float, **body):
        mesh = self.consumer.mesh
        try:
            answer = await mesh.request(record.peer_id, CHANNEL, build_request(op, **body),
                                        timeout=timeout, network=self.consumer.network)
        except MessagingError as e:
            raise NoAnswer(record, e) from None
        try:
            reply = parse_reply(answer)
        except ParseError as e:
            raise BadReply(record, e) from None
        if reply.status != JobStatus.OK:
            raise JobRefused(record, reply.status, reply.detail)
        return reply

    async def _provider_of(self, job_id: str, timeout: float) -> PeerRecord:
        kept = self.kept().get(job_id)
        if kept is None:
            raise UnknownJob(f"job {job_id} was not submitted from this data directory")
        record = await self.consumer.provider(kept["provider"], timeout)
        await self.consumer.connect(record, timeout)
        return record

    @_deferred
    async def submit(self, spec: JobSpec, provider: str | None = None,
                     timeout: float = 60.0, on_asking=None) -> dict:
        """
        Submit C{spec} to C{provider} (peer id, prefix or name; None: the
        best-ranked provider with room), send its inputs; the job's
        document (L{job_document}).
        """
        consumer = self.consumer
        if provider is not None:
            record = await consumer.provider(provider, timeout)
        else:
            record = await consumer.find_provider(spec, timeout)
        connection = await consumer.connect(record, timeout)
        if on_asking is not None:
            on_asking(record, connection)
        reply = await self._ask(
            record, JobOp.SUBMIT, timeout, argv=list(spec.argv),
            env=[f"{k}={v}" for k, v in spec.env.items()], stdin=spec.stdin,
            inputs=[{"path": p, "size": len(data)} for p, data in spec.inputs.items()],
            outputs=list(spec.outputs), cpu_milli=max(1, round(spec.cpu * 1000)),
            memory_mb=spec.memory_mb, timeout_s=spec.timeout_s, network=spec.network,
            name=spec.name)
        job = reply.jobs[0]
        job_id = job.job_id.hex()
        self._keep(job_id, owner=consumer.mesh.peer_id, provider=record.peer_id_text,
                   provider_name=printable(record.name),
                   network=consumer.mesh.network_id(consumer.network),
                   submitted_at=self._now(), command=printable(job.command), state=job.state)
        for index, data in enumerate(spec.inputs.values()):
            for offset in range(0, len(data), CHUNK):
                reply = await self._ask(record, JobOp.PUT, timeout, job_id=job.job_id,
                                        index=index, offset=offset,
                                        data=data[offset:offset + CHUNK])
            if not data:
                reply = await self._ask(record, JobOp.PUT, timeout, job_id=job.job_id,
                                        index=index, offset=0, data=b"")
        return self._seen(record, reply.jobs[0], connection.kind)

    def _seen(self, record: PeerRecord, job, path_kind: str | None = None) -> dict:
        """The job's document; its outcome scored once it ended."""
        document = job_document(job, record)
        if path_kind is not None:
            document["path_kind"] = path_kind
        job_id = document["job_id"]
        kept = self.kept().get(job_id)
        if kept is None:
            return document  # submitted from elsewhere: nothing to keep or score
        state = document["state"]
        scored = kept.get("scored", False)
        if not scored and state in FOR_PROVIDER + AGAINST_PROVIDER:
            self.consumer.record_outcome(record, state in FOR_PROVIDER, None)
            scored = True
        self._keep(job_id, state=state, exit_code=document["exit_code"], scored=scored)
        return document

    @_deferred
    async def status(self, job_id: str, timeout: float = 30.0) -> dict:
        record = await self._provider_of(job_id, timeout)
        reply = await self._ask(record, JobOp.STATUS, timeout, job_id=job_id_bytes(job_id))
        return self._seen(record, reply.jobs[0])

    @_deferred
    async def cancel(self, job_id: str, timeout: float = 30.0) -> dict:
        record = await self._provider_of(job_id, timeout)
        reply = await self._ask(record, JobOp.CANCEL, timeout, job_id=job_id_bytes(job_id))
        return self._seen(record, reply.jobs[0])

    @_deferred
    async def listing(self, provider: str | None = None, timeout: float = 30.0) -> list[dict]:
        """
        The jobs of this consumer on C{provider}, or on every provider a
        kept job was submitted to; jobs a provider no longer has are
        listed as kept, with C{"known_to_provider": false}.
        """
        providers = [provider] if provider else sorted({k["provider"]
                                                        for k in self.kept().values()})
        seen: dict[str, dict] = {}
        for ref in providers:
            record = await self.consumer.provider(ref, timeout)
            await self.consumer.connect(record, timeout)
            reply = await self._ask(record, JobOp.LIST, timeout)
            for job in reply.jobs:
                document = self._seen(record, job)
                seen[document["job_id"]] = document
        for job_id, kept in self.kept().items():
            if job_id not in seen and (provider is None or kept["provider"].startswith(
                    provider) or kept.get("provider_name") == provider):
                seen[job_id] = {"job_id": job_id, "state": kept.get("state", "unknown"),
                                "exit_code": kept.get("exit_code"),
                                "command": kept.get("command", ""),
                                "provider": kept["provider"],
                                "provider_name": kept.get("provider_name", ""),
                                "submitted_at": kept.get("submitted_at"),
                                "known_to_provider": False}
        return sorted(seen.values(), key=lambda d: -(d.get("submitted_at") or 0))

    @_deferred
    async def logs(self, job_id: str, stream: str = "stdout", offset: int = 0,
                   wait: float = 0.0, timeout: float = 30.0) -> tuple[bytes, bool, dict]:
        """One piece of a job's output from C{offset}: (data, eof, the job's document)."""
        record = await self._provider_of(job_id, timeout)
        return await self._logs(record, job_id, stream, offset, wait, timeout)

    async def _logs(self, record, job_id: str, stream: str, offset: int, wait: float,
                    timeout: float):
        reply = await self._ask(record, JobOp.LOGS, timeout + wait, job_id=job_id_bytes(job_id),
                                stream=int(Stream[stream.upper()]), offset=offset, most=CHUNK,
                                wait_ms=int(wait * 1000))
        return bytes(reply.data), reply.eof, self._seen(record, reply.jobs[0])

    @_deferred
    async def follow(self, job_id: str, on_output: Callable[[str, bytes], None],
                     timeout: float = 30.0, on_state: Callable[[dict], None] | None = None,
                     offsets: dict | None = None) -> dict:
        """
        Hand C{on_output(stream, data)} everything the job prints, as it
        comes, until it ended and both streams are read; its final
        document.  C{on_state} sees each document whose state changed.
        """
        record = await self._provider_of(job_id, timeout)

        def logs(stream: str, offset: int, wait: float):
            return self._logs(record, job_id, stream, offset, wait, timeout)

        return await follow_logs(logs, on_output, on_state, offsets)

    @_deferred
    async def wait(self, job_id: str, timeout: float = 30.0, poll: float = 5.0) -> dict:
        """The job's document once it ended (following nothing)."""
        record = await self._provider_of(job_id, timeout)
        while True:
            _data, _eof, document = await self._logs(record, job_id, "stdout", 2**62, poll,
                                                     timeout)
            if ended(document["state"]):
                return document

    @_deferred
    async def fetch(self, job_id: str, timeout: float = 30.0) -> dict[str, bytes]:
        """The job's collected output files, path -> content."""
        record = await self._provider_of(job_id, timeout)
        reply = await self._ask(record, JobOp.STATUS, timeout, job_id=job_id_bytes(job_id))
        job = reply.jobs[0]
        if not ended(job.state):
            raise JobRefused(record, JobStatus.BAD_REQUEST,
                             f"job {job_id} is {job.state}; its outputs are collected when it"
                             f" ends")
        files = {}
        for index, output in enumerate(job.outputs):
            if not output.present:
                continue
            data = bytearray()
            while True:
                piece = await self._ask(record, JobOp.FETCH, timeout, job_id=job.job_id,
                                        index=index, offset=len(data), most=CHUNK)
                data += piece.data
                if piece.eof or not piece.data:
                    break
            files[output.path] = bytes(data)
        return files


async def follow_logs(logs, on_output: Callable[[str, bytes], None],
                      on_state: Callable[[dict], None] | None = None,
                      offsets: dict | None = None) -> dict:
    """
    Read a job's two output streams to their end with C{logs(stream,
    offset, wait)} (awaitable: data, eof, the job's document), handing
    C{on_output(stream, data)} each piece as it comes; the final document.
    The wait for more output is on stdout; stderr is read as it stands.
    """
    offsets = dict(offsets or {"stdout": 0, "stderr": 0})
    done = {"stdout": False, "stderr": False}
    state = document = None
    while not all(done.values()):
        for stream in ("stdout", "stderr"):
            wait = 5.0 if stream == "stdout" and not any(done.values()) else 0.0
            while not done[stream]:
                data, eof, document = await logs(stream, offsets[stream], wait)
                if document["state"] != state:
                    state = document["state"]
                    if on_state is not None:
                        on_state(document)
                if data:
                    offsets[stream] += len(data)
                    on_output(stream, data)
                done[stream] = eof
                if len(data) < CHUNK:
                    break
                wait = 0.0
    return document


def job_spec_of(document) -> JobSpec:
    """
    A L{JobSpec} from its JSON form (the control API's C{job} field):
    C{argv} (strings), C{env} (object of strings), C{stdin} (base64),
    C{input_files} (path in the work directory -> a local file, read here),
    C{outputs} (paths), C{cpu} (cores), C{memory} (MiB), C{timeout} (s),
    C{network} (bool), C{name}.

    @raise ValueError: a field of the wrong kind, or an input that cannot
        be read (the message names it).
    """
    import base64
    import binascii

    if not isinstance(document, dict):
        raise ValueError("must be an object with 'argv' and the job's other fields")
    known = {"argv", "env", "stdin", "input_files", "outputs", "cpu", "memory", "timeout",
             "network", "name"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")

    def strings(value, what) -> list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"'{what}' must be a list of strings")
        return value

    def number(name, kind, low, high, default):
        value = document.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
                or not low <= value <= high:
            raise ValueError(f"'{name}' must be a number from {low:g} to {high:g}")
        return kind(value)

    env = document.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise ValueError("'env' must be an object of strings")
    try:
        stdin = base64.b64decode(document.get("stdin", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError("'stdin' must be base64") from None
    files = document.get("input_files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ValueError("'input_files' must be an object of local file paths")
    inputs = {}
    for inside, local in files.items():
        try:
            inputs[inside] = Path(local).read_bytes()
        except OSError as e:
            raise ValueError(f"input {local}: {e.strerror}") from None
    network, name = document.get("network", False), document.get("name", "")
    if not isinstance(network, bool) or not isinstance(name, str):
        raise ValueError("'network' must be true or false and 'name' a string")
    return JobSpec(argv=strings(document.get("argv"), "argv"), env=env, stdin=stdin,
                   inputs=inputs, outputs=strings(document.get("outputs", []), "outputs"),
                   cpu=number("cpu", float, 0.001, 1024, 1.0),
                   memory_mb=number("memory", int, 16, 2**31, 256),
                   timeout_s=number("timeout", int, 1, 30 * 86400, 600), network=network,
                   name=name)


def ended(state: str) -> bool:
    """Whether a job in C{state} ended (a state this client does not know: yes)."""
    try:
        return JobState(state).ended
    except ValueError:
        return True


def job_document(job, record: PeerRecord | None = None) -> dict:
    """A job record of the wire as the JSON document the commands print."""
    def seconds(ms: int):
        return ms / 1000 if ms else None

    document = {
        "job_id": job.job_id.hex(),
        "name": printable(job.name),
        "state": printable(job.state),
        "exit_code": None if job.exit_code == NO_EXIT else job.exit_code,
        "detail": printable(job.detail, 2000),
        "command": printable(job.command),
        "submitted_at": seconds(job.submitted_ms),
        "started_at": seconds(job.started_ms),
        "ended_at": seconds(job.ended_ms),
        "cpu": job.cpu_milli / 1000,
        "memory_mb": job.memory_mb,
        "timeout_s": job.timeout_s,
        "queue_position": job.queue_position or None,
        "runner": printable(job.runner),
        "stdout_bytes": job.stdout_bytes,
        "stderr_bytes": job.stderr_bytes,
        "outputs": [{"path": printable(o.path), "size": o.size, "present": o.present}
                    for o in job.outputs],
    }
    if record is not None:
        document["provider"] = record.peer_id_text
        document["provider_name"] = printable(record.name)
    return document
