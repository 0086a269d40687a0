"""
Compute jobs on a provider: the C{job} channel (L{omerta.wire.job}) of every
network the node is in, a queue, and a runner (L{omerta.jobs.runner}) that
runs each job isolated and limited.

A consumer submits a job (argv, environment, stdin, the names and sizes of
its input files, the output paths to collect, cpu, memory, timeout); its
inputs follow in pieces (PUT); once they are all here the job is queued,
and it starts as soon as what it asks for fits in what the provider offers
next to its VMs.  Its stdout and stderr are kept in files as they come and
can be read from any offset while it runs (LOGS, with a wait for more);
when it ends the runner collects its output files (FETCH).  Only the
consumer that submitted a job can see or touch it: every request arrives
in the per-pair session, so the sender is authenticated, and a job of
someone else is answered "not yours".

State (C{<data_dir>/jobs/}): C{index.json} holds every job's record,
written atomically at every change of state; C{<id>/stdout}, C{<id>/stderr}
and C{<id>/out/<n>} hold what it printed and the files collected.  A
provider that restarts reports the jobs that were staging, queued or
running then as C{lost} (the runner kills what was left of them: a job
cannot be re-attached honestly, its output pipes died with the provider).
Ended jobs are kept C{retention} seconds, and a consumer's kept output is
bounded (C{max_kept_per_consumer}: its oldest ended jobs go first).

Bounds: C{max_per_consumer} jobs staging, queued or running per consumer;
C{max_input_bytes} of inputs per job, held in memory while staging (at most
C{max_staging_per_consumer} jobs of a consumer at once, each for at most
C{staging_timeout} seconds); C{max_log_bytes} per output stream (more
is counted, not kept).  Running jobs count against the resources the node
announces, like VMs.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.jobs.runner import Limits, RunRequest, RunResult
from omerta.roles.vmtypes import Resources
from omerta.safe_text import printable
from omerta.storage import StateFileError, atomic_write, read_json, write_json
from omerta.wire import ParseError
from omerta.wire.job import (CHANNEL, CHUNK, MAX_ARGS, MAX_COMMAND, MAX_DETAIL, MAX_ENV,
                             MAX_FILES, MAX_JOBS_PER_REPLY, MAX_NAME, MAX_PATH, MAX_RUNNER,
                             MAX_STDIN, NO_EXIT, JobOp, JobState, JobStatus, Stream, build_reply,
                             parse_request)

INDEX_FILE = "index.json"
MAX_WAIT = 10.0
"""Seconds a LOGS request may wait for more output."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Refused(Exception):
    """A request the provider answers with an error status."""

    def __init__(self, status: JobStatus, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Job:
    """One job as the provider keeps it (the fields of C{index.json})."""

    job_id: str
    owner: str            # the consumer's peer id, hex
    name: str
    argv: list
    inputs: list          # [path, size]
    outputs: list         # paths to collect
    cpu_milli: int
    memory_mb: int
    timeout_s: int
    network: bool
    submitted: float
    state: str = JobState.STAGING.value
    exit_code: int | None = None
    detail: str = ""
    started: float | None = None
    ended: float | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    collected: list = field(default_factory=list)  # [path, size, present]
    cpu_s: float | None = None
    peak_memory_mb: float | None = None

    @property
    def ended_state(self) -> bool:
        return JobState(self.state).ended

    @property
    def kept_bytes(self) -> int:
        return self.stdout_bytes + self.stderr_bytes + sum(c[1] for c in self.collected)


@dataclass
class _Live:
    """What a job holds only while this provider runs: never persisted."""

    env: dict
    stdin: bytes
    staged: list                  # bytearray per input
    running: object = None        # the runner's RunningJob
    waiters: list = field(default_factory=list)
    staging_call: object = None


class JobService(Service):
    """
    @param mesh: the node's L{omerta.mesh.network.MeshNetwork}.
    @param runner: an L{omerta.jobs.runner.IJobRunner}, or None (no jobs:
        requests are refused with C{unavailable} and C{problem}).
    @param data_dir: the provider's data directory.
    @param reactor: timers and the clock (a C{Clock} in tests).
    @param capacity: what the provider offers
        (L{omerta.roles.resources.Capacity}): jobs that fit beside
        C{committed()} (the VMs) start.
    @param on_change: called when the resources jobs hold change (the
        provider re-announces what is free).
    """

    log = Logger()

    def __init__(self, mesh, runner, data_dir: Path, reactor, capacity, *,
                 committed: Callable[[], Resources] = Resources,
                 on_change: Callable[[], None] = lambda: None,
                 problem: str | None = None,
                 max_per_consumer: int = 8, retention: float = 86400.0,
                 max_input_bytes: int = 16 * 2**20, max_log_bytes: int = 16 * 2**20,
                 max_kept_per_consumer: int = 256 * 2**20, max_timeout: int = 86400,
                 staging_timeout: float = 120.0, max_staging_per_consumer: int = 2,
                 allow_network: bool = False):
        self.mesh = mesh
        self.runner = runner
        self.dir = Path(data_dir) / "jobs"
        self.reactor = reactor
        self.capacity = capacity
        self.committed_elsewhere = committed
        self.on_change = on_change
        self.problem = problem if runner is not None else (problem or "this provider runs no jobs")
        self.max_per_consumer = max_per_consumer
        self.retention = retention
        self.max_input_bytes = max_input_bytes
        self.max_log_bytes = max_log_bytes
        self.max_kept_per_consumer = max_kept_per_consumer
        self.max_timeout = max_timeout
        self.staging_timeout = staging_timeout
        self.max_staging_per_consumer = max_staging_per_consumer
        self.allow_network = allow_network
        self.jobs: dict[str, Job] = {}
        self.live: dict[str, _Live] = {}
        self._stopping = False
        self._purger: LoopingCall | None = None

    # lifecycle

    def startService(self) -> None:
        super().startService()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._load()
        if self.runner is not None and hasattr(self.runner, "cleanup_stale"):
            self.runner.cleanup_stale()
        for network in self.mesh.networks():
            self.mesh.on_channel(CHANNEL, self._handler(network), network=network)
        self._purger = LoopingCall(self.purge)
        self._purger.clock = self.reactor
        self._purger.start(60.0, now=True)

    def stopService(self):
        super().stopService()
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        if self.mesh.started:
            for network in self.mesh.networks():
                self.mesh.on_channel(CHANNEL, None, network=network)
        self._stopping = True
        for job_id, live in list(self.live.items()):
            if live.running is not None:
                live.running.cancel()  # ends as lost: see _finished

    def _load(self) -> None:
        document = read_json(self.dir / INDEX_FILE, lambda: {"jobs": {}})
        records = document.get("jobs") if isinstance(document, dict) else None
        if not isinstance(records, dict):
            raise StateFileError(f"{self.dir / INDEX_FILE} is damaged: it has no object of"
                                 f" jobs; move it aside (the jobs it lists are forgotten)")
        now = self.reactor.seconds()
        lost = 0
        for job_id, record in records.items():
            try:
                job = Job(**record)
            except TypeError as e:
                raise StateFileError(f"{self.dir / INDEX_FILE} is damaged: job {job_id!r}: {e};"
                                     f" move it aside") from None
            if not job.ended_state:
                job.detail = f"the provider restarted while the job was {job.state}"
                job.state = JobState.LOST.value
                job.ended = now
                lost += 1
            self.jobs[job_id] = job
        if lost:
            self.log.warn("{n} job(s) lost: the provider restarted while they ran", n=lost)
            self._save()

    def _save(self) -> None:
        write_json(self.dir / INDEX_FILE,
                   {"version": 1, "jobs": {i: asdict(j) for i, j in self.jobs.items()}})

    # resources

    def _running(self) -> list[Job]:
        """
        The running jobs whose resources this service counts (none when the
        runner's jobs are VMs of the backend, which counts them already).
        """
        if getattr(self.runner, "counted_by_backend", False):
            return []
        return [j for j in self.jobs.values() if j.state == JobState.RUNNING.value]

    def committed(self) -> Resources:
        """What running jobs hold, in the announcement's terms (whole cores)."""
        running = self._running()
        return Resources(cpu_cores=math.ceil(sum(j.cpu_milli for j in running) / 1000),
                         memory_mb=sum(j.memory_mb for j in running))

    def _fits(self, job: Job) -> bool:
        elsewhere = self.committed_elsewhere()
        running = self._running()
        cpu = self.capacity.cpu_cores * 1000 - elsewhere.cpu_cores * 1000 - sum(
            j.cpu_milli for j in running)
        memory = self.capacity.memory_mb - elsewhere.memory_mb - sum(j.memory_mb for j in running)
        return job.cpu_milli <= cpu and job.memory_mb <= memory

    # the channel

    def _handler(self, network: str):
        return self.handle

    def handle(self, peer_id: bytes, payload: bytes) -> defer.Deferred:
        """
        The reply to one request of C{peer_id} (authenticated by the
        session): a Deferred firing with its bytes.
        """
        return defer.ensureDeferred(self._handle(peer_id, payload))

    async def _handle(self, peer_id: bytes, payload: bytes) -> bytes:
        metrics = self.mesh.metrics
        try:
            request = parse_request(payload)
            op = JobOp(request.op)
        except (ParseError, ValueError) as e:
            metrics.inc("job_requests", op="unknown", status="bad_request")
            return build_reply(JobStatus.BAD_REQUEST, f"not a job request: {e}")
        try:
            if self.problem is not None:
                raise Refused(JobStatus.UNAVAILABLE, self.problem)
            reply = await self._do(op, peer_id.hex(), request.body)
        except Refused as e:
            metrics.inc("job_requests", op=op.name.lower(), status=e.status.name.lower())
            if op != JobOp.PUT:
                self.log.info("Job {op} from {peer} refused: {detail}", op=op.name.lower(),
                              peer=format_peer_id(peer_id), detail=e.detail)
            return build_reply(e.status, e.detail)
        metrics.inc("job_requests", op=op.name.lower(), status="ok")
        return reply

    async def _do(self, op: JobOp, owner: str, body) -> bytes:
        if op == JobOp.SUBMIT:
            return self._reply(self.submit(owner, body))
        if op == JobOp.LIST:
            mine = sorted((j for j in self.jobs.values() if j.owner == owner),
                          key=lambda j: -j.submitted)
            return build_reply(JobStatus.OK, "", [self._record(j)
                                                 for j in mine[:MAX_JOBS_PER_REPLY]])
        job = self._owned(body.job_id.hex(), owner)
        if op == JobOp.STATUS:
            return self._reply(job)
        if op == JobOp.CANCEL:
            return self._reply(self.cancel(job))
        if op == JobOp.PUT:
            return self._reply(self.put(job, body.index, body.offset, body.data))
        if op == JobOp.LOGS:
            return await self.logs(job, body.stream, body.offset, body.most, body.wait_ms / 1000)
        return self.fetch(job, body.index, body.offset, body.most)

    def _owned(self, job_id: str, owner: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise Refused(JobStatus.UNKNOWN_JOB,
                          f"no job {job_id} on this provider (ended jobs are kept"
                          f" {self.retention / 3600:g} h)")
        if job.owner != owner:
            raise Refused(JobStatus.NOT_YOURS, f"job {job_id} belongs to another consumer")
        return job

    def _reply(self, job: Job, data: bytes = b"", eof: bool = False) -> bytes:
        return build_reply(JobStatus.OK, "", [self._record(job)], data, eof)

    # submit and inputs

    def submit(self, owner: str, body) -> Job:
        spec = self._checked(body)
        active = sum(1 for j in self.jobs.values() if j.owner == owner and not j.ended_state)
        if active >= self.max_per_consumer:
            raise Refused(JobStatus.NO_CAPACITY,
                          f"you have {active} jobs staging, queued or running here, the most"
                          f" one consumer may ({self.max_per_consumer}); wait for one to end"
                          f" or cancel one")
        staging = sum(1 for j in self.jobs.values()
                      if j.owner == owner and j.state == JobState.STAGING.value)
        if spec["inputs"] and staging >= self.max_staging_per_consumer:
            raise Refused(JobStatus.NO_CAPACITY,
                          f"{staging} of your jobs are still receiving their inputs here, the"
                          f" most one consumer may ({self.max_staging_per_consumer}); send"
                          f" theirs first")
        job_id = os.urandom(8).hex()
        job = Job(job_id=job_id, owner=owner, submitted=self.reactor.seconds(), **spec)
        self.jobs[job_id] = job
        self.live[job_id] = _Live(env=dict(e.split("=", 1) for e in body.env),
                                  stdin=bytes(body.stdin),
                                  staged=[bytearray() for _ in job.inputs])
        (self.dir / job_id).mkdir(mode=0o700, exist_ok=True)
        self.log.info("Job {job} ({command}) submitted by {peer}", job=job_id,
                      command=_command(job.argv), peer=format_peer_id(bytes.fromhex(owner)))
        if job.inputs:
            self.live[job_id].staging_call = self.reactor.callLater(
                self.staging_timeout, self._staging_expired, job_id)
            self._save()
        else:
            self._queue(job)
        return job

    def _checked(self, body) -> dict:
        def bad(detail: str):
            raise Refused(JobStatus.BAD_REQUEST, detail)

        argv = list(body.argv)
        if not argv or not argv[0]:
            bad("the job has no command (argv is empty)")
        if len(argv) > MAX_ARGS or len(body.env) > MAX_ENV:
            bad(f"at most {MAX_ARGS} arguments and {MAX_ENV} environment variables")
        if any("\0" in a for a in argv):
            bad("an argument holds a NUL character")
        for entry in body.env:
            name, sep, _value = entry.partition("=")
            if not sep or not _ENV_NAME.match(name) or "\0" in entry:
                bad(f"environment entry {printable(entry[:40])!r} is not NAME=VALUE")
        if len(body.stdin) > MAX_STDIN:
            bad(f"stdin is {len(body.stdin)} bytes; at most {MAX_STDIN} (send more as an"
                f" input file)")
        paths = [i.path for i in body.inputs] + list(body.outputs)
        if len(body.inputs) > MAX_FILES or len(body.outputs) > MAX_FILES:
            bad(f"at most {MAX_FILES} input and {MAX_FILES} output files")
        for path in paths:
            problem = path_problem(path)
            if problem:
                bad(problem)
        if len(body.name.encode()) > MAX_NAME:
            bad(f"the label is {len(body.name.encode())} bytes; at most {MAX_NAME}")
        if len({i.path for i in body.inputs}) != len(body.inputs):
            bad("two input files have the same path")
        total = sum(i.size for i in body.inputs)
        if total > self.max_input_bytes:
            bad(f"the inputs are {total} bytes; this provider takes at most"
                f" {self.max_input_bytes} per job")
        cores = self.capacity.cpu_cores
        if not 1 <= body.cpu_milli <= cores * 1000:
            (bad if body.cpu_milli < 1 else _no_room)(
                f"cpu {body.cpu_milli / 1000:g} cores: this provider offers 0.001 to {cores}")
        if not 16 <= body.memory_mb <= self.capacity.memory_mb:
            (bad if body.memory_mb < 16 else _no_room)(
                f"memory {body.memory_mb} MiB: this provider offers 16 to"
                f" {self.capacity.memory_mb}")
        if not 1 <= body.timeout_s <= self.max_timeout:
            bad(f"timeout {body.timeout_s} s: from 1 to {self.max_timeout}")
        if body.network and not self.allow_network:
            bad("this provider gives jobs no network; submit without --with-network")
        return dict(name=body.name, argv=argv, inputs=[[i.path, i.size] for i in body.inputs],
                    outputs=list(body.outputs), cpu_milli=body.cpu_milli,
                    memory_mb=body.memory_mb, timeout_s=body.timeout_s, network=body.network)

    def put(self, job: Job, index: int, offset: int, data: bytes) -> Job:
        live = self.live.get(job.job_id)
        if job.state != JobState.STAGING.value or live is None:
            raise Refused(JobStatus.BAD_REQUEST, f"job {job.job_id} is {job.state}, not"
                                                 f" waiting for inputs")
        if not 0 <= index < len(job.inputs):
            raise Refused(JobStatus.BAD_REQUEST, f"job {job.job_id} has no input {index}")
        staged, size = live.staged[index], job.inputs[index][1]
        if offset != len(staged) or offset + len(data) > size:
            raise Refused(JobStatus.BAD_REQUEST,
                          f"input {index} of job {job.job_id}: expected bytes from"
                          f" {len(staged)} of {size}, got {len(data)} from {offset}")
        staged += data
        if all(len(s) == i[1] for s, i in zip(live.staged, job.inputs)):
            if live.staging_call is not None and live.staging_call.active():
                live.staging_call.cancel()
            self._queue(job)
        return job

    def _staging_expired(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.state == JobState.STAGING.value:
            self._end(job, JobState.FAILED,
                      f"its inputs did not all arrive within {self.staging_timeout:g} s")

    # queue and runs

    def _queue(self, job: Job) -> None:
        job.state = JobState.QUEUED.value
        self._save()
        self._schedule()

    def queued(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state == JobState.QUEUED.value),
                      key=lambda j: j.submitted)

    def _schedule(self) -> None:
        for job in self.queued():
            if self._fits(job):
                self._start(job)

    def _start(self, job: Job) -> None:
        live = self.live[job.job_id]
        request = RunRequest(
            job_id=job.job_id, argv=list(job.argv), env=live.env, stdin=live.stdin,
            inputs={path: bytes(data) for (path, _size), data in zip(job.inputs, live.staged)},
            outputs=list(job.outputs),
            limits=Limits(cpu=job.cpu_milli / 1000, memory_mb=job.memory_mb,
                          timeout_s=float(job.timeout_s), network=job.network))
        live.staged = []
        job.state = JobState.RUNNING.value
        job.started = self.reactor.seconds()
        try:
            running = self.runner.run(request, lambda stream, data: self._output(job, stream, data))
        except ValueError as e:
            self._end(job, JobState.FAILED, f"the runner refused the job: {e}")
            return
        live.running = running
        self._save()
        self.mesh.metrics.inc("jobs_started")
        self.on_change()
        running.done.addCallback(lambda result: self._finished(job, result))
        running.done.addErrback(lambda f: self._end(
            job, JobState.FAILED, f"the runner failed: {f.getErrorMessage()}"))

    def _output(self, job: Job, stream: str, data: bytes) -> None:
        attribute = "stdout_bytes" if stream == "stdout" else "stderr_bytes"
        kept = getattr(job, attribute)
        room = max(0, self.max_log_bytes - kept)
        if room:
            with open(self.dir / job.job_id / stream, "ab") as f:
                f.write(data[:room])
            setattr(job, attribute, kept + min(room, len(data)))
        if len(data) > room:
            self.mesh.metrics.inc("job_output_dropped_bytes", len(data) - room)
        self._wake(job)

    def _finished(self, job: Job, result: RunResult) -> None:
        out = self.dir / job.job_id / "out"
        out.mkdir(mode=0o700, exist_ok=True)
        collected = []
        for index, path in enumerate(job.outputs):
            data = result.outputs.get(path)
            if data is not None:
                atomic_write(out / str(index), data)
            collected.append([path, len(data or b""), data is not None])
        job.collected = collected
        job.cpu_s, job.peak_memory_mb = result.cpu_s, result.peak_memory_mb
        state = {"exited": JobState.EXITED, "timeout": JobState.TIMEOUT,
                 "memory": JobState.MEMORY, "cancelled": JobState.CANCELLED
                 }.get(result.reason, JobState.FAILED)
        if self._stopping and state == JobState.CANCELLED:
            state, result.detail = JobState.LOST, "the provider stopped while the job ran"
        self._end(job, state, result.detail,
                  result.exit_code if state == JobState.EXITED else None)

    def _end(self, job: Job, state: JobState, detail: str, exit_code: int | None = None) -> None:
        was_running = job.state == JobState.RUNNING.value
        job.state, job.detail, job.exit_code = state.value, detail, exit_code
        job.ended = self.reactor.seconds()
        live = self.live.pop(job.job_id, None)
        if live is not None and live.staging_call is not None and live.staging_call.active():
            live.staging_call.cancel()
        self._save()
        self.mesh.metrics.inc("jobs_ended", state=state.value)
        self.log.info("Job {job} {state}{code}: {detail}", job=job.job_id, state=state.value,
                      code="" if exit_code is None else f" with code {exit_code}",
                      detail=detail or "-")
        for waiter in (live.waiters if live is not None else []):
            if not waiter.called:
                waiter.callback(None)
        if was_running:
            self.on_change()
            self._schedule()

    def cancel(self, job: Job) -> Job:
        live = self.live.get(job.job_id)
        if job.state == JobState.RUNNING.value and live is not None:
            live.running.cancel()  # its result ends it as cancelled
        elif not job.ended_state:
            self._end(job, JobState.CANCELLED, "cancelled before it started")
        return job

    # output

    def _wake(self, job: Job) -> None:
        live = self.live.get(job.job_id)
        if live is not None:
            waiters, live.waiters = live.waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    async def logs(self, job: Job, stream: int, offset: int, most: int, wait: float) -> bytes:
        try:
            name = Stream(stream).name.lower()
        except ValueError:
            raise Refused(JobStatus.BAD_REQUEST, f"no stream {stream} (1 stdout, 2 stderr)") from None
        size = lambda: job.stdout_bytes if name == "stdout" else job.stderr_bytes  # noqa: E731
        if offset >= size() and not job.ended_state and wait > 0 and job.job_id in self.live:
            waiter = defer.Deferred()
            self.live[job.job_id].waiters.append(waiter)
            call = self.reactor.callLater(min(wait, MAX_WAIT), lambda: (
                waiter.called or waiter.callback(None)))
            await waiter
            if call.active():
                call.cancel()
        data = _read(self.dir / job.job_id / name, offset, min(most, CHUNK))
        return self._reply(job, data, job.ended_state and offset + len(data) >= size())

    def fetch(self, job: Job, index: int, offset: int, most: int) -> bytes:
        if not job.ended_state:
            raise Refused(JobStatus.BAD_REQUEST, f"job {job.job_id} is {job.state}; its outputs"
                                                 f" are collected when it ends")
        if not 0 <= index < len(job.collected) or not job.collected[index][2]:
            raise Refused(JobStatus.BAD_REQUEST, f"job {job.job_id} has no collected output"
                                                 f" {index}")
        data = _read(self.dir / job.job_id / "out" / str(index), offset, min(most, CHUNK))
        return self._reply(job, data, offset + len(data) >= job.collected[index][1])

    # retention

    def purge(self) -> list[str]:
        """
        Forget ended jobs older than the retention, and a consumer's oldest
        ended jobs while it keeps more than C{max_kept_per_consumer} bytes.
        """
        now = self.reactor.seconds()
        gone = [j for j in self.jobs.values()
                if j.ended_state and now - (j.ended or j.submitted) > self.retention]
        owners = {j.owner for j in self.jobs.values()}
        for owner in owners:
            ended = sorted((j for j in self.jobs.values()
                            if j.owner == owner and j.ended_state and j not in gone),
                           key=lambda j: j.ended or j.submitted)
            kept = sum(j.kept_bytes for j in self.jobs.values()
                       if j.owner == owner and j not in gone)
            while ended and kept > self.max_kept_per_consumer:
                oldest = ended.pop(0)
                gone.append(oldest)
                kept -= oldest.kept_bytes
        for job in gone:
            del self.jobs[job.job_id]
            shutil.rmtree(self.dir / job.job_id, ignore_errors=True)
        if gone:
            self._save()
        return [j.job_id for j in gone]

    # records

    def _record(self, job: Job) -> dict:
        queue = [j.job_id for j in self.queued()]
        return {
            "job_id": bytes.fromhex(job.job_id),
            "name": job.name,
            "state": job.state,
            "exit_code": NO_EXIT if job.exit_code is None else max(-32767, min(32767,
                                                                             job.exit_code)),
            "detail": _clip(job.detail, MAX_DETAIL),
            "command": _clip(_command(job.argv), MAX_COMMAND),
            "submitted_ms": int(job.submitted * 1000),
            "started_ms": int((job.started or 0) * 1000),
            "ended_ms": int((job.ended or 0) * 1000),
            "cpu_milli": job.cpu_milli,
            "memory_mb": job.memory_mb,
            "timeout_s": job.timeout_s,
            "queue_position": queue.index(job.job_id) + 1 if job.job_id in queue else 0,
            "runner": _clip(self.runner_summary(), MAX_RUNNER),
            "stdout_bytes": job.stdout_bytes,
            "stderr_bytes": job.stderr_bytes,
            "outputs": [{"path": p, "size": s, "present": present}
                        for p, s, present in job.collected],
        }

    def runner_summary(self) -> str:
        """The runner kind and the limits it enforces: C{sandbox: memory,cpu,...}."""
        if self.runner is None:
            return "none"
        described = self.runner.describe()
        return f"{described.get('kind', '?')}: {','.join(described.get('enforced', []))}"

    def status(self) -> dict:
        by_state: dict[str, int] = {}
        for job in self.jobs.values():
            by_state[job.state] = by_state.get(job.state, 0) + 1
        return {"runner": None if self.runner is None else self.runner.describe(),
                "problem": self.problem, "jobs": by_state,
                "max_per_consumer": self.max_per_consumer, "retention_s": self.retention}


def path_problem(path: str) -> str | None:
    """Why C{path} is not a relative path inside the work directory, or None."""
    pure = PurePosixPath(path)
    if len(path.encode()) > MAX_PATH:
        return f"the path {printable(path[:40])!r}... is longer than {MAX_PATH} bytes"
    if not path or "\0" in path or pure.is_absolute() or ".." in pure.parts or path in (".",):
        return f"{printable(path)!r} is not a relative path inside the job's work directory"
    return None


def _clip(text: str, most: int) -> str:
    """C{text} cut to at most C{most} bytes of UTF-8 (at a character boundary)."""
    data = text.encode()
    return text if len(data) <= most else data[:most - 3].decode("utf-8", "ignore") + "..."


def _no_room(detail: str):
    raise Refused(JobStatus.NO_CAPACITY, detail)


def _command(argv: list) -> str:
    """The command as a shell would read it (quoted), printable."""
    return printable(shlex.join(argv))


def _read(path: Path, offset: int, most: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(most)
    except FileNotFoundError:
        return b""
