"""
C{omerta job ...}: compute jobs on providers, asked for by peer id.

    omerta job submit (--peer PEER | --find) [--cpu N] [--memory MB] [--timeout S]
                      [--env NAME=VALUE]... [--input FILE[:PATH]]... [--output-file PATH]...
                      [--stdin FILE] [--with-network] [--name LABEL] [--wait]
                      (--script FILE [--language python|sh] | -- CMD ARGS...)
    omerta job status JOB_ID
    omerta job logs JOB_ID [-f] [--stderr]
    omerta job cancel JOB_ID
    omerta job list [--peer PEER]
    omerta job fetch JOB_ID [--dir DIR]

Each command asks the data directory's running node (C{omerta up}) over
its control API (C{/v1/jobs}), or else joins the mesh as the data
directory's short-lived command node (the options of C{omerta mesh}:
C{--invite}/C{--network}, C{--bootstrap}, C{--timeout}; for C{submit},
whose C{--timeout} is the job's, C{--mesh-timeout}); either reaches the
provider (directly, hole-punched or through a relay) and speaks the C{job}
protocol (L{omerta.wire.job}) with it; the work is
L{omerta.jobs.client.JobClient}'s.  Jobs are owned by the identity of the
node that submitted them, and kept in C{<data-dir>/consumer-jobs.json} so
the later commands find their provider.

C{submit --wait} prints the job's stdout and stderr as they come and exits
with the job's exit code (or 124 for a timeout, 137 when killed for memory,
130 when cancelled, 2 when the provider lost it or could not run it).
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from omerta.app.cli import CommandError, Invocation
from omerta.app.cli_mesh import CLI_DIR, MeshView, mesh_options, peer_label, run_on_mesh
from omerta.app.documents import consumer_errors
from omerta.app.via_node import ask, network_field, running_node
from omerta.crypto.identity import load_or_create_identity
from omerta.jobs.client import JobClient, JobSpec, UnknownJob, follow_logs
from omerta.roles.consumer_client import ConsumerClient
from omerta.wire.job import MAX_STDIN
from twisted.internet.defer import Deferred, succeed

LANGUAGES = {"python": ["python3"], "sh": ["/bin/sh"]}
SCRIPT_NAMES = {"python": ".omerta-script.py", "sh": ".omerta-script.sh"}
EXIT_CODES = {"timeout": 124, "memory": 137, "cancelled": 130, "lost": 2, "failed": 2}
"""The exit status of C{submit --wait} for a job that did not exit by itself."""
WAIT_TIMEOUT = 3600.0 * 24


# -- arguments --------------------------------------------------------------------


def _number(kind, minimum, maximum, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{what} must be from {minimum:g} to {maximum:g},"
                                             f" not {text}")
        return value

    return parse


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not (name[0].isalpha() or name[0] == "_") or not all(
            ch.isalnum() or ch == "_" for ch in name) or not name.isascii():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _input(text: str) -> tuple[Path, str]:
    """C{FILE[:PATH]}: a local file and its path in the job's work directory."""
    local, sep, inside = text.partition(":")
    inside = inside if sep else Path(local).name
    pure = PurePosixPath(inside)
    if not inside or pure.is_absolute() or ".." in pure.parts:
        raise argparse.ArgumentTypeError(f"{inside!r} is not a relative path inside the job's"
                                         f" work directory")
    return Path(local).expanduser(), inside


def _output_path(text: str) -> str:
    pure = PurePosixPath(text)
    if not text or pure.is_absolute() or ".." in pure.parts:
        raise argparse.ArgumentTypeError(f"{text!r} is not a relative path inside the job's"
                                         f" work directory")
    return text


def register(subparsers: Any) -> None:
    job = subparsers.add_parser(
        "job",
        help="compute jobs on providers: submit, status, logs, cancel, list, fetch",
        description="Run commands on providers of a network, isolated and limited, and"
                    " collect their output (jobs kept in <data-dir>/consumer-jobs.json).",
    )
    commands = job.add_subparsers(dest="job_command", metavar="COMMAND", required=True)
    common = mesh_options()

    submit = commands.add_parser(
        "submit", parents=[mesh_options("--mesh-timeout")], help="run a command or a script on a provider",
        description="Join the mesh, reach the provider and submit the job; print its id"
                    " (with --wait: its output as it comes, then exit with its exit code).",
        epilog="example: omerta job submit --peer provider-1 --wait --"
               " python3 -c 'print(6*7)'")
    which = submit.add_mutually_exclusive_group(required=True)
    which.add_argument("--peer", metavar="PEER", help="the provider: peer id, id prefix or name")
    which.add_argument("--find", action="store_true",
                       help="the best-ranked provider announcing room for the job")
    submit.add_argument("--cpu", type=_number(float, 0.001, 1024, "--cpu"), default=1.0,
                        metavar="N", help="cpu cores, may be a fraction (default 1)")
    submit.add_argument("--memory", type=_number(int, 16, 2**31, "--memory"), default=256,
                        metavar="MB", help="memory in MiB (default 256)")
    submit.add_argument("--timeout", dest="job_timeout",
                        type=_number(int, 1, 30 * 86400, "--timeout"), default=600,
                        metavar="SECONDS",
                        help="the longest the job may run; its processes are killed after"
                             " (default 600)")
    submit.add_argument("--env", type=_env, action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable of the job (repeatable)")
    submit.add_argument("--input", type=_input, action="append", default=[],
                        metavar="FILE[:PATH]",
                        help="a local file the job finds at PATH in its work directory"
                             " (default: the file's name; repeatable)")
    submit.add_argument("--output-file", dest="outputs", type=_output_path, action="append",
                        default=[], metavar="PATH",
                        help="a file of the work directory to collect when the job ends"
                             " ('omerta job fetch'; repeatable)")
    submit.add_argument("--stdin", metavar="FILE", help=f"the job's stdin (at most {MAX_STDIN}"
                                                        f" bytes)")
    submit.add_argument("--with-network", dest="job_network", action="store_true",
                        help="ask for network access (providers give none unless they allow it)")
    submit.add_argument("--name", default="", metavar="LABEL", help="a label for the job")
    submit.add_argument("--wait", action="store_true",
                        help="print the output as it comes and exit with the job's exit code")
    submit.add_argument("--script", metavar="FILE", help="run this script instead of a command")
    submit.add_argument("--language", choices=sorted(LANGUAGES), default=None,
                        help="the script's language (default: from its name, .py or .sh)")
    submit.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                        help="the command to run (after --)")
    submit.set_defaults(func=submit_command, discover_nat=True, timeout=30.0)

    for name, helptext, func in (("status", "one job, as its provider sees it now",
                                  status_command),
                                 ("cancel", "kill a job's processes, or drop it from the queue",
                                  cancel_command)):
        command = commands.add_parser(name, parents=[common], help=helptext,
                                      description=helptext[0].upper() + helptext[1:] + ".")
        command.add_argument("job", metavar="JOB_ID", help="a job's id or unique id prefix")
        command.set_defaults(func=func)

    logs = commands.add_parser("logs", parents=[common], help="a job's output",
                               description="Print what the job printed so far; with -f,"
                                           " follow it until the job ends.")
    logs.add_argument("job", metavar="JOB_ID", help="a job's id or unique id prefix")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    logs.add_argument("--stderr", action="store_true", help="print its stderr (default stdout;"
                                                            " -f prints both)")
    logs.set_defaults(func=logs_command)

    listing = commands.add_parser("list", parents=[common], help="the jobs submitted from here",
                                  description="The jobs this data directory submitted, as"
                                              " their providers see them now.")
    listing.add_argument("--peer", metavar="PEER", help="only this provider's (and ask it for"
                                                        " all of ours it holds)")
    listing.set_defaults(func=list_command)

    fetch = commands.add_parser("fetch", parents=[common], help="a job's collected output files",
                                description="Download the files the job's --output-file named,"
                                            " once it ended.")
    fetch.add_argument("job", metavar="JOB_ID", help="a job's id or unique id prefix")
    fetch.add_argument("--dir", default=".", metavar="DIR",
                       help="where to write them (default: here), under JOB_ID/")
    fetch.set_defaults(func=fetch_command)


# -- submit -------------------------------------------------------------------------


def _command_and_files(args) -> tuple[list[str], dict[str, Path], bytes]:
    """
    The command, the input files (path in the work directory -> local
    file) and stdin the arguments describe; bad arguments raise
    L{CommandError}.
    """
    command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    files: dict[str, Path] = {}
    for local, inside in args.input:
        if inside in files:
            raise CommandError(f"two --input files go to {inside!r}")
        files[inside] = local
    if args.script is not None:
        if command:
            raise CommandError("give either --script FILE or a command after --, not both")
        language = args.language or {".py": "python", ".sh": "sh"}.get(Path(args.script).suffix)
        if language is None:
            raise CommandError(f"cannot tell the language of {args.script}: give --language"
                               f" ({' or '.join(sorted(LANGUAGES))})")
        files[SCRIPT_NAMES[language]] = Path(args.script).expanduser()
        command = [*LANGUAGES[language], SCRIPT_NAMES[language]]
    elif args.language is not None:
        raise CommandError("--language goes with --script")
    if not command:
        raise CommandError("no command: give one after --, e.g."
                           " omerta job submit --peer PEER -- python3 -c 'print(6*7)',"
                           " or --script FILE")
    stdin = b""
    if args.stdin is not None:
        stdin = _read(Path(args.stdin).expanduser(), "--stdin")
        if len(stdin) > MAX_STDIN:
            raise CommandError(f"--stdin {args.stdin} is {len(stdin)} bytes; at most {MAX_STDIN}:"
                               f" give a larger file as --input instead")
    return command, files, stdin


def job_spec(args) -> JobSpec:
    """The job the arguments describe; bad arguments raise L{CommandError}."""
    command, files, stdin = _command_and_files(args)
    inputs = {inside: _read(local, "--script" if inside in SCRIPT_NAMES.values() else "--input")
              for inside, local in files.items()}
    return JobSpec(argv=command, env=dict(args.env), stdin=stdin, inputs=inputs,
                   outputs=list(args.outputs), cpu=args.cpu, memory_mb=args.memory,
                   timeout_s=args.job_timeout, network=args.job_network, name=args.name)


def api_job(args) -> dict:
    """The job the arguments describe as the control API takes it (files by path)."""
    command, files, stdin = _command_and_files(args)
    for local in files.values():
        if not local.is_file():
            raise CommandError(f"{local}: no such file")
    return {"argv": command, "env": dict(args.env), "stdin": base64.b64encode(stdin).decode(),
            "input_files": {inside: str(local.resolve()) for inside, local in files.items()},
            "outputs": list(args.outputs), "cpu": args.cpu, "memory": args.memory,
            "timeout": args.job_timeout, "network": args.job_network, "name": args.name}


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CommandError(f"{option} {path}: {e.strerror}") from None


def submit_command(invocation: Invocation) -> int:
    args = invocation.args
    out = _Output(invocation)
    node = running_node(invocation)
    if node is not None:
        which = {"peer": args.peer} if args.peer is not None else {"find": True}
        submitted = ask(node, "POST", "/v1/jobs", body={
            **which, "job": api_job(args), "timeout": args.timeout, **network_field(args)})
        if not args.wait:
            invocation.emit(format_job(submitted), submitted)
            return 0
        if not invocation.wants_json:
            _note(f"job {submitted['job_id']} submitted")
        final = _follow_via(node, invocation, submitted["job_id"], out,
                            lambda d: _queued_note(invocation, d))
        return _finish(invocation, final, out)
    spec = job_spec(args)

    async def body(view: MeshView) -> tuple[dict, dict | None]:
        client = _client(invocation, view)

        def asking(record, connection):
            _note(f"submitting to {peer_label(record)} over a {connection.kind} path")

        document = await _guarded(view, client.submit(
            spec, provider=args.peer, timeout=view.timeout, on_asking=asking))
        if not args.wait:
            return document, None
        if not invocation.wants_json:
            _note(f"job {document['job_id']} submitted")
        final = await _guarded(view, client.follow(
            document["job_id"], out.write, timeout=view.timeout,
            on_state=lambda d: _queued_note(invocation, d)))
        return document, final

    submitted, final = run_on_mesh(invocation, body)
    if final is None:
        invocation.emit(format_job(submitted), submitted)
        return 0
    return _finish(invocation, final, out)


def _node_for(invocation: Invocation):
    """The running node to ask about the job named, or None (see L{_job_id})."""
    if not getattr(invocation.args, "through_node", True):
        return None
    return running_node(invocation)


def _finish(invocation: Invocation, final: dict, out: "_Output") -> int:
    if invocation.wants_json:
        final["stdout"], final["stderr"] = out.text("stdout"), out.text("stderr")
        invocation.emit("", final)
    return exit_status(final)


def _follow_via(node, invocation: Invocation, job_id: str, out: "_Output",
                on_state=None) -> dict:
    """L{follow_logs} through the running node (its control API, blocking)."""
    timeout = invocation.args.timeout

    def logs(stream: str, offset: int, wait: float):
        reply = ask(node, "GET", f"/v1/jobs/{job_id}/logs", query={
            "stream": stream, "offset": offset, "wait": wait, "timeout": timeout,
            **network_field(invocation.args)})
        return succeed((base64.b64decode(reply["data"]), reply["eof"], reply["job"]))

    # every logs() answer is there already: the coroutine runs to its end now
    done = Deferred.fromCoroutine(follow_logs(logs, out.write, on_state))
    failures: list = []
    done.addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    return done.result


def exit_status(document: dict) -> int:
    """What C{submit --wait} exits with for the job's final C{document}."""
    if document["state"] == "exited" and document["exit_code"] is not None:
        return document["exit_code"] & 0xFF
    return EXIT_CODES.get(document["state"], 2)


class _Output:
    """The job's output: written through as it comes, or kept for --output json."""

    def __init__(self, invocation: Invocation):
        self.invocation = invocation
        self.kept = {"stdout": bytearray(), "stderr": bytearray()}

    def write(self, stream: str, data: bytes) -> None:
        if self.invocation.wants_json:
            self.kept[stream] += data
            return
        target = self.invocation.stdout if stream == "stdout" else sys.stderr
        buffer = getattr(target, "buffer", None)
        if buffer is not None:
            target.flush()
            buffer.write(data)
            buffer.flush()
        else:
            target.write(data.decode("utf-8", "replace"))
            target.flush()

    def text(self, stream: str) -> str:
        return self.kept[stream].decode("utf-8", "replace")


def _note(text: str) -> None:
    sys.stderr.write(f"omerta: {text}\n")
    sys.stderr.flush()


def _queued_note(invocation: Invocation, document: dict) -> None:
    if invocation.wants_json:
        return
    if document["state"] == "queued":
        _note(f"queued at position {document.get('queue_position') or '?'}: waiting for room")
    elif document["state"] == "running":
        _note("running")
    elif document["state"] not in ("staging", "exited"):
        _note(f"job {document['state']}: {document.get('detail') or '-'}")


# -- the other commands ---------------------------------------------------------------


def _job_id(invocation: Invocation) -> str:
    """
    The job the arguments name.  A job submitted by the short-lived command
    node belongs to that node's identity, not the running node's: for it the
    command joins as that node again (C{invocation.args.through_node} False).
    """
    try:
        job_id, kept = JobClient(ConsumerClient(None, invocation.data_dir)).find(
            invocation.args.job)
    except UnknownJob as e:
        raise CommandError(f"{e}; 'omerta job list' shows the jobs submitted from here")
    command_node = load_or_create_identity(invocation.data_dir / CLI_DIR).peer_id_text
    invocation.args.through_node = kept.get("owner") != command_node
    return job_id


def status_command(invocation: Invocation) -> int:
    job_id = _job_id(invocation)
    document = _via_node(invocation, "GET", f"/v1/jobs/{job_id}") or _on_mesh(
        invocation, lambda client, view: client.status(job_id, view.timeout))
    invocation.emit(format_job(document), document)
    return 0


def cancel_command(invocation: Invocation) -> int:
    job_id = _job_id(invocation)
    document = _via_node(invocation, "DELETE", f"/v1/jobs/{job_id}") or _on_mesh(
        invocation, lambda client, view: client.cancel(job_id, view.timeout))
    invocation.emit(format_job(document), document)
    return 0


def _via_node(invocation: Invocation, method: str, path: str, **query) -> dict | None:
    """The running node's answer, or None when there is none to ask (or not it)."""
    node = _node_for(invocation)
    if node is None:
        return None
    return ask(node, method, path, query={"timeout": invocation.args.timeout, **query,
                                          **network_field(invocation.args)})


def logs_command(invocation: Invocation) -> int:
    args = invocation.args
    job_id = _job_id(invocation)
    out = _Output(invocation)
    node = _node_for(invocation)
    if node is not None:
        if args.follow:
            document = _follow_via(node, invocation, job_id, out)
        else:
            stream = "stderr" if args.stderr else "stdout"
            offset = 0
            while True:
                reply = _via_node(invocation, "GET", f"/v1/jobs/{job_id}/logs", stream=stream,
                                  offset=offset)
                data = base64.b64decode(reply["data"])
                out.write(stream, data)
                offset += len(data)
                document = reply["job"]
                if reply["eof"] or not data:
                    break
        return _logs_done(invocation, document, out)

    async def body(view: MeshView) -> dict:
        client = _client(invocation, view)
        if args.follow:
            return await _guarded(view, client.follow(job_id, out.write, timeout=view.timeout))
        stream = "stderr" if args.stderr else "stdout"
        offset = 0
        while True:
            data, eof, document = await _guarded(view, client.logs(
                job_id, stream, offset, timeout=view.timeout))
            out.write(stream, data)
            offset += len(data)
            if eof or not data:
                return document

    return _logs_done(invocation, run_on_mesh(invocation, body), out)


def _logs_done(invocation: Invocation, document: dict, out: "_Output") -> int:
    if invocation.wants_json:
        document["stdout"], document["stderr"] = out.text("stdout"), out.text("stderr")
        invocation.emit("", document)
    return 0


def list_command(invocation: Invocation) -> int:
    peer = invocation.args.peer
    document = _via_node(invocation, "GET", "/v1/jobs", **({"peer": peer} if peer else {}))
    if document is None:
        document = {"jobs": _on_mesh(invocation,
                                     lambda client, view: client.listing(peer, view.timeout))}
    documents = document["jobs"]
    invocation.emit(format_list(documents), document)
    return 0


def fetch_command(invocation: Invocation) -> int:
    job_id = _job_id(invocation)
    answer = _via_node(invocation, "GET", f"/v1/jobs/{job_id}/files")
    if answer is not None:
        files = {f["path"]: base64.b64decode(f["data"]) for f in answer["files"]}
    else:
        files = _on_mesh(invocation, lambda client, view: client.fetch(job_id, view.timeout))
    where = Path(invocation.args.dir).expanduser() / job_id
    written = []
    for path, data in files.items():
        target = where / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append({"path": path, "file": str(target), "size": len(data)})
    invocation.emit("\n".join(f"{w['file']} ({w['size']} bytes)" for w in written)
                    or "the job collected no files", {"job_id": job_id, "files": written})
    return 0


# -- the mesh ------------------------------------------------------------------------


def _client(invocation: Invocation, view: MeshView) -> JobClient:
    return JobClient(ConsumerClient(view.mesh, invocation.data_dir, now=invocation.now),
                     now=invocation.now)


async def _guarded(view: MeshView, deferred):
    """The result; a failure of the client becomes a message with what to try."""
    with consumer_errors(view):
        return await deferred


def _on_mesh(invocation: Invocation, ask):
    async def body(view: MeshView):
        return await _guarded(view, ask(_client(invocation, view), view))

    return run_on_mesh(invocation, body)


# -- text -----------------------------------------------------------------------------


def format_job(document: dict) -> str:
    lines = [f"job {document['job_id']}: {document['state']}"
             + ("" if document.get("exit_code") is None else f", exit code {document['exit_code']}")
             + (f" (queue position {document['queue_position']})"
                if document.get("queue_position") else "")]
    if document.get("detail"):
        lines.append(f"  {document['detail']}")
    lines.append(f"  command   {document.get('command', '')}")
    if document.get("provider"):
        lines.append(f"  provider  {document.get('provider_name') or '-'}"
                     f" ({document['provider'][:16]})")
    if "cpu" in document:
        lines.append(f"  limits    cpu {document['cpu']:g}, {document['memory_mb']} MiB,"
                     f" {document['timeout_s']} s; runner {document.get('runner', '?')}")
        lines.append(f"  output    stdout {document['stdout_bytes']} bytes,"
                     f" stderr {document['stderr_bytes']} bytes"
                     + "".join(f", {o['path']} ({o['size']} bytes)" if o["present"] else
                               f", {o['path']} (missing)" for o in document.get("outputs", [])))
    return "\n".join(lines)


def format_list(documents: list[dict]) -> str:
    if not documents:
        return "no jobs submitted from here"
    rows = [f"{'JOB':16}  {'STATE':9}  {'EXIT':4}  {'PROVIDER':16}  COMMAND"]
    for d in documents:
        code = "" if d.get("exit_code") is None else str(d["exit_code"])
        rows.append(f"{d['job_id']:16}  {d['state']:9}  {code:4}  "
                    f"{(d.get('provider_name') or d.get('provider', ''))[:16]:16}  "
                    f"{d.get('command', '')[:60]}")
    return "\n".join(rows)
