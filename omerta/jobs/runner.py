"""
What a job runner is: the values of one run and the L{IJobRunner} interface.

A provider runs a consumer's compute job through an L{IJobRunner}: it hands
over a L{RunRequest} (the command, its environment and standard input, the
files to put in its work directory, the files to bring back and the
L{Limits}), gets a L{RunningJob} at once, receives the job's standard output
and error as they arrive, and finally a L{RunResult} from
L{RunningJob.done}.

L{validate_request} is the one check every runner applies before it starts
anything: a malformed request raises C{ValueError} with a message a person
can act on.  The only implementation so far is
L{omerta.jobs.sandbox.SandboxRunner}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

JOB_ID = re.compile(r"[0-9a-f]{16}\Z")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: L{RunResult.reason} values.
EXITED = "exited"
TIMEOUT = "timeout"
MEMORY = "memory"
CANCELLED = "cancelled"
FAILED = "failed"
REASONS = (EXITED, TIMEOUT, MEMORY, CANCELLED, FAILED)


@dataclass(frozen=True)
class Limits:
    """
    What one job may use.

    @ivar cpu: cores, as a cgroup CPU quota (C{1.5} is one and a half cores).
    @ivar memory_mb: memory (swap included) before the kernel's OOM killer
        ends the job.
    @ivar pids: processes and threads at once.
    @ivar timeout_s: wall-clock seconds; the whole process tree is killed
        after it.
    @ivar work_mb: size of the job's private writable work directory.
    @ivar network: C{False} gives the job only a loopback interface in a new
        network namespace; C{True} asks for the host's network (granted only
        when the runner allows it).
    """

    cpu: float = 1.0
    memory_mb: int = 512
    pids: int = 256
    timeout_s: float = 600.0
    work_mb: int = 256
    network: bool = False


@dataclass
class RunRequest:
    """
    One job to run.

    @ivar job_id: 16 lowercase hexadecimal digits.
    @ivar argv: the command; C{argv[0]} is looked up in C{PATH} inside the
        sandbox.
    @ivar env: extra environment variables (the job starts from a small
        clean environment, not the provider's).
    @ivar stdin: written to the job's standard input, which is then closed.
    @ivar inputs: relative path in the work directory -> content, written
        before the start.
    @ivar outputs: relative paths in the work directory collected after the
        end.
    """

    job_id: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    inputs: dict[str, bytes] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)


@dataclass
class RunResult:
    """
    How a job ended.

    @ivar reason: C{"exited"}, C{"timeout"}, C{"memory"} (the OOM killer
        ended it), C{"cancelled"} or C{"failed"} (it could not start;
        C{detail} says why).
    @ivar exit_code: for C{"exited"} (and C{"memory"}) the exit status, or
        128 + the signal number when the job was killed by a signal; else
        C{None}.
    @ivar detail: one sentence a person can act on.
    @ivar outputs: the collected files.
    @ivar missing_outputs: requested outputs that were not collected (absent,
        not a regular file, or too big; C{detail} says which).
    @ivar cpu_s: CPU seconds used, from the cgroup, when known.
    @ivar peak_memory_mb: highest memory use, from the cgroup, when known.
    """

    reason: str
    exit_code: int | None
    detail: str
    outputs: dict[str, bytes] = field(default_factory=dict)
    missing_outputs: list[str] = field(default_factory=list)
    cpu_s: float | None = None
    peak_memory_mb: float | None = None


class RunningJob:
    """
    A job that was handed to a runner.

    @ivar done: a Deferred that fires with the L{RunResult}; it never fails.
    @ivar pid: the host process id of the job's outermost process, or
        C{None} when nothing was started.
    """

    def __init__(self, done: Deferred, cancel: Callable[[], None], pid: int | None = None):
        self.done = done
        self.pid = pid
        self._cancel = cancel

    def cancel(self) -> None:
        """
        Kill the job's whole process tree; C{done} fires with reason
        C{"cancelled"}.  Does nothing once the job has ended.
        """
        self._cancel()


class IJobRunner(Interface):
    """
    Runs consumers' compute jobs on a provider, one L{RunRequest} at a time
    per call.
    """

    kind = Attribute('What kind of runner this is, e.g. C{"sandbox"}.')

    def describe():
        """
        What this runner really enforces on this host.

        @return: a JSON-able dict: C{{"kind": ..., "cgroup": "v1" | "v2" |
            None, "enforced": [...], "not_enforced": [...], "problems":
            [...]}}; the limits are named C{"memory"}, C{"cpu"},
            C{"pids"}, C{"timeout"}, C{"network"} and C{"work_size"}.
        """

    def run(request, on_output):
        """
        Start a job.

        @param request: a L{RunRequest}.
        @param on_output: called as C{on_output("stdout" | "stderr", chunk)}
            as the job's output arrives, on the reactor thread.
        @return: a L{RunningJob}.
        @raise ValueError: the request is malformed; nothing was started.
        """


def _relative_path(kind: str, path: str) -> PurePosixPath:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"{kind} path {path!r} must be a non-empty string without NUL")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise ValueError(f"{kind} path {path!r} must be relative to the work directory")
    if ".." in pure.parts:
        raise ValueError(f"{kind} path {path!r} must not contain '..'")
    if not pure.parts:
        raise ValueError(f"{kind} path {path!r} names the work directory itself, not a file")
    return pure


def validate_request(request: RunRequest) -> None:
    """
    Check a request before anything starts.

    @raise ValueError: with a message naming what is wrong.
    """
    if not isinstance(request.job_id, str) or not JOB_ID.match(request.job_id):
        raise ValueError(f"job id {request.job_id!r} must be 16 lowercase hexadecimal digits")
    if not request.argv or not isinstance(request.argv, list):
        raise ValueError("argv must be a non-empty list: the command to run")
    for arg in request.argv:
        if not isinstance(arg, str) or "\0" in arg:
            raise ValueError(f"argv element {arg!r} must be a string without NUL")
    if not request.argv[0]:
        raise ValueError("argv[0] (the command) must not be empty")
    for name, value in request.env.items():
        if not isinstance(name, str) or not ENV_NAME.match(name):
            raise ValueError(f"environment variable name {name!r} must be letters, digits "
                             "and '_', not starting with a digit")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"environment variable {name} must be a string without NUL")
    if not isinstance(request.stdin, bytes):
        raise ValueError("stdin must be bytes")
    limits = request.limits
    for name in ("cpu", "memory_mb", "pids", "timeout_s", "work_mb"):
        if not getattr(limits, name) > 0:
            raise ValueError(f"limit {name} must be positive, not {getattr(limits, name)!r}")
    files = set()
    size = 0
    for path, content in request.inputs.items():
        files.add(_relative_path("input", path))
        if not isinstance(content, bytes):
            raise ValueError(f"input {path!r} must be bytes")
        size += len(content)
    for pure in files:
        for parent in pure.parents:
            if parent in files:
                raise ValueError(f"input {str(pure)!r} lies under input {str(parent)!r}, "
                                 "which is a file")
    capacity = limits.work_mb * 2**20
    if size > capacity:
        raise ValueError(f"the inputs need {size} bytes but the work directory holds "
                         f"{capacity} ({limits.work_mb} MB); raise work_mb or send less")
    for path in request.outputs:
        _relative_path("output", path)


class ProblemsMixin:
    """
    C{problem()} from a runner's C{_problems()}: the list of reasons it
    cannot run jobs here.
    """

    def problem(self) -> str | None:
        """The first reason this runner cannot run jobs, or C{None}."""
        problems = self._problems()
        return problems[0] if problems else None
