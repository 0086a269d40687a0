"""
A busy machine for lab tests: busy-loop processes that keep every core
occupied while a measurement runs, as a build or a neighbour's job would.

    with CpuLoad():
        pairs = matrix.run_matrix(...)

Each hog is a Python interpreter spinning at the default priority, so the
daemons and CLI nodes under test share the cores with it exactly as they
would with any other CPU-bound program.  The hogs are killed when the block
ends, and with their parent if it dies first (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1

#: what each hog runs
BUSY_LOOP = "while True:\n    pass\n"


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: stop() and the atexit of the caller still kill them


class CpuLoad:
    """
    C{processes} busy loops (default: one per core) while the object is
    entered, or between L{start} and L{stop}.
    """

    def __init__(self, processes: int | None = None):
        self.processes = processes if processes is not None else (os.cpu_count() or 1)
        if self.processes < 1:
            raise ValueError(f"CpuLoad needs at least one process, not {self.processes}")
        self._procs: list[subprocess.Popen] = []

    @property
    def running(self) -> int:
        """
        How many hogs are running now.
        """
        return sum(1 for p in self._procs if p.poll() is None)

    def start(self) -> CpuLoad:
        if self._procs:
            raise RuntimeError("CpuLoad already started")
        for _ in range(self.processes):
            self._procs.append(subprocess.Popen(
                [sys.executable, "-S", "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent))
        return self

    def stop(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()

    def __enter__(self) -> CpuLoad:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
