"""
A simulated job runner for tests (L{omerta.jobs.runner.IJobRunner}): it runs
nothing.  Each job it is handed is kept as a L{FakeRun} that the test
drives: C{print} output, C{finish} with an outcome.  Its name says what it
is: no process, no sandbox, no limits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from zope.interface import implementer

from omerta.jobs.runner import IJobRunner, Limits, RunRequest, RunResult


def run_request(**fields) -> RunRequest:
    """A L{RunRequest} of C{true} with a fresh job id, C{fields} replacing any part."""
    values = dict(job_id=secrets.token_hex(8), argv=["true"], env={}, stdin=b"", inputs={},
                  outputs=[], limits=Limits())
    values.update(fields)
    return RunRequest(**values)


@dataclass
class FakeRun:
    request: RunRequest
    on_output: object
    done: Deferred = field(default_factory=Deferred)
    cancelled: bool = False
    pid: int = 0

    def print(self, data: bytes, stream: str = "stdout") -> None:
        self.on_output(stream, data)

    def finish(self, reason: str = "exited", exit_code: int | None = 0, detail: str = "",
               outputs: dict | None = None) -> None:
        if not self.done.called:
            outputs = outputs or {}
            self.done.callback(RunResult(
                reason=reason, exit_code=exit_code, detail=detail, outputs=outputs,
                missing_outputs=[p for p in self.request.outputs if p not in outputs],
                cpu_s=None, peak_memory_mb=None))

    def cancel(self) -> None:
        self.cancelled = True
        self.finish("cancelled", None, "cancelled by its owner")


@implementer(IJobRunner)
class FakeRunner:
    """Runs nothing; L{runs} holds a L{FakeRun} per job, in order."""

    kind = "fake"

    def __init__(self, enforced=("memory", "cpu", "pids", "timeout", "network")):
        self.runs: list[FakeRun] = []
        self.enforced = list(enforced)
        self.cleaned = 0

    def describe(self) -> dict:
        return {"kind": self.kind, "cgroup": None, "enforced": self.enforced,
                "not_enforced": [], "problems": []}

    def run(self, request: RunRequest, on_output) -> FakeRun:
        run = FakeRun(request, on_output)
        self.runs.append(run)
        return run

    def cleanup_stale(self) -> list[str]:
        self.cleaned += 1
        return []
