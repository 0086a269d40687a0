"""
Control groups for jobs, on cgroup v2 or v1.

L{CgroupHost} finds what the host offers under a cgroup root (normally
C{/sys/fs/cgroup}), keeps a parent group C{omerta-jobs} in each hierarchy it
uses and makes one child per job (L{JobCgroup}) with the job's limits.  It
only reads and writes files, so a test points it at a temporary directory
that imitates them.

Versions
========

  - B{v2}: C{<root>/cgroup.controllers} exists.  The C{memory}, C{cpu} and
    C{pids} controllers it lists are enabled in C{<root>/cgroup.subtree_control}
    and C{omerta-jobs/cgroup.subtree_control}.  A job gets C{memory.max},
    C{memory.swap.max = 0} (when the kernel accounts swap),
    C{memory.oom.group = 1} (when present), C{cpu.max} and C{pids.max}; the
    OOM kills are counted in C{memory.events}, and C{cgroup.kill} ends the
    whole group at once.
  - B{v1}: one directory per hierarchy, named after its controllers
    (C{memory}, C{cpu} or C{cpu,cpuacct}, C{cpuacct}, C{pids}).  A job gets
    C{memory.limit_in_bytes}, C{memory.memsw.limit_in_bytes} (when swap is
    accounted), C{cpu.cfs_period_us}/C{cpu.cfs_quota_us} and C{pids.max};
    the OOM kills are the C{oom_kill} line of C{memory.oom_control} (or, on
    old kernels, C{memory.failcnt}); ending the group is sending SIGKILL to
    every process listed in C{cgroup.procs} until none is left.

A hybrid host (v1 controllers plus an empty C{unified} v2 hierarchy, as
systemd sets up) is v1.  A limit whose controller is missing is reported in
L{CgroupHost.enforced} as not enforced, never claimed.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path
from typing import Callable

from twisted.logger import Logger

PARENT = "omerta-jobs"
CONTROLLERS = ("memory", "cpu", "pids")
#: The CFS period written with every CPU quota, in microseconds.
CPU_PERIOD_US = 100_000
#: How many rounds L{JobCgroup.kill} sends SIGKILL on v1 before it leaves the
#: rest to the caller's next attempt.
KILL_ROUNDS = 20

#: v1: a file in a hierarchy's root that shows the controller works there.
_V1_MARKERS = {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us", "pids": None,
               "cpuacct": "cpuacct.usage"}


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    """The number after C{key} in a C{"key value"} per line file."""
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


def _rmdir(path: Path) -> bool:
    """
    Remove a cgroup directory.  A real cgroup is removed with one C{rmdir}
    (its files are virtual); a directory imitating one in a test holds
    regular files, which are removed first (cgroupfs never answers
    C{ENOTEMPTY}, so this never touches a real cgroup's files).

    @return: C{True} when the directory is gone.
    """
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            return False
    for child in path.iterdir():
        if child.is_file() and not child.is_symlink():
            child.unlink()
    try:
        os.rmdir(path)
        return True
    except OSError:
        return False


class JobCgroup:
    """
    The cgroup(s) of one job: one directory on v2, one per hierarchy on v1.

    @ivar procs_files: the C{cgroup.procs} files a process writes its pid to
        to join the job's groups, one per hierarchy.
    """

    def __init__(self, version: str, dirs: dict[str, Path], unique: list[Path],
                 kill: Callable[[int, int], None]):
        self.version = version
        self._dirs = dirs          # controller name (or "cpuacct") -> job directory
        self._unique = unique      # each job directory once
        self._kill = kill
        self.procs_files = [d / "cgroup.procs" for d in unique]

    def pids(self) -> set[int]:
        """The host pids of every process in the job's groups."""
        found = set()
        for path in self.procs_files:
            for word in (_read(path) or "").split():
                if word.isdigit():
                    found.add(int(word))
        return found

    def kill(self) -> bool:
        """
        Kill every process of the job: C{cgroup.kill} on v2 when the kernel
        has it, else SIGKILL to each listed pid, repeated while new pids show
        up (a process forking as it dies).

        @return: C{True} when no process is listed any more.
        """
        if self.version == "v2":
            kill_file = self._unique[0] / "cgroup.kill"
            if kill_file.exists():
                try:
                    _write(kill_file, "1")
                except OSError:
                    pass
        signalled: set[int] = set()
        for _ in range(KILL_ROUNDS):
            pids = self.pids()
            fresh = pids - signalled
            if not fresh:
                return not pids
            for pid in fresh:
                try:
                    self._kill(pid, signal.SIGKILL)
                except OSError:   # gone already, or (not root) not ours to kill
                    pass
            signalled |= fresh
        return not self.pids()

    def oom_kills(self) -> int:
        """How many processes the OOM killer ended in this group."""
        memory = self._dirs.get("memory")
        if memory is None:
            return 0
        if self.version == "v2":
            return _keyed(_read(memory / "memory.events"), "oom_kill") or 0
        count = _keyed(_read(memory / "memory.oom_control"), "oom_kill")
        if count is None:
            # Kernels before 4.13 have no oom_kill counter; the limit being
            # hit at all is the best sign left.
            failcnt = (_read(memory / "memory.failcnt") or "0").strip()
            count = 1 if failcnt.isdigit() and int(failcnt) > 0 else 0
        return count

    def cpu_seconds(self) -> float | None:
        """CPU time used by the group, when the kernel accounts it."""
        if self.version == "v2":
            usec = _keyed(_read(self._unique[0] / "cpu.stat"), "usage_usec")
            return None if usec is None else usec / 1e6
        acct = self._dirs.get("cpuacct")
        text = None if acct is None else (_read(acct / "cpuacct.usage") or "").strip()
        return int(text) / 1e9 if text and text.isdigit() else None

    def peak_memory_mb(self) -> float | None:
        """The group's highest memory use, when the kernel records it."""
        memory = self._dirs.get("memory")
        if memory is None:
            return None
        name = "memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes"
        text = (_read(memory / name) or "").strip()
        return int(text) / 2**20 if text.isdigit() else None

    def remove(self) -> bool:
        """
        Remove the job's groups (they must be empty).

        @return: C{True} when all are gone.
        """
        return all([_rmdir(d) for d in self._unique])


class CgroupHost:
    """
    The cgroup hierarchies of a host, as far as jobs use them.

    @ivar version: C{"v2"}, C{"v1"} or C{None} (no usable cgroups).
    @ivar enforced: the limits of L{CONTROLLERS} that are really applied to
        jobs (after L{prepare}).
    @ivar problems: sentences saying what is missing or failed.
    """

    log = Logger()

    def __init__(self, root: Path, kill: Callable[[int, int], None] = os.kill):
        self.root = Path(root)
        self._kill = kill
        self._hierarchies: dict[str, Path] = {}   # controller -> hierarchy root
        self._prepared = False
        self.version: str | None = None
        self.enforced: set[str] = set()
        self.problems: list[str] = []
        self.swap_limited = False
        self._oom_group = False
        self._detect()

    def _detect(self) -> None:
        root = self.root
        if (root / "cgroup.controllers").exists():
            self.version = "v2"
            offered = set((_read(root / "cgroup.controllers") or "").split())
            for name in CONTROLLERS:
                if name in offered:
                    self._hierarchies[name] = root
            return
        try:
            entries = sorted(root.iterdir())
        except OSError:
            entries = []
        for name in CONTROLLERS + ("cpuacct",):
            for entry in entries:
                if (name in entry.name.split(",") and (entry / "cgroup.procs").exists()
                        and (_V1_MARKERS[name] is None
                             or (entry / _V1_MARKERS[name]).exists())):
                    self._hierarchies[name] = entry
                    break
        if any(name in self._hierarchies for name in CONTROLLERS):
            self.version = "v1"

    def available(self, name: str) -> bool:
        """Whether the host offers controller C{name} (before L{prepare})."""
        return name in self._hierarchies

    def prepare(self) -> list[str]:
        """
        Make the C{omerta-jobs} parent groups and, on v2, enable the
        controllers for them.  Done once; later calls return the same
        problems.

        @return: L{problems}.
        """
        if self._prepared:
            return self.problems
        self._prepared = True
        if self.version is None:
            self.problems.append(f"no cgroup controllers found under {self.root}: memory, "
                                 "cpu and pids are not limited")
            return self.problems
        if self.version == "v2":
            self._prepare_v2()
        else:
            self._prepare_v1()
        for name in CONTROLLERS:
            if name not in self.enforced:
                self.problems.append(f"the {name} controller is not available under "
                                     f"{self.root}: the {name} limit is not enforced")
        if "memory" in self.enforced and not self.swap_limited:
            self.problems.append("the kernel does not account swap in cgroups: a job may "
                                 "use swap beyond memory_mb if the host has swap")
        return self.problems

    def _mkdir(self, path: Path) -> bool:
        try:
            path.mkdir(mode=0o755, exist_ok=True)
            return True
        except OSError as e:
            self.problems.append(f"cannot create cgroup {path}: {e.strerror}")
            return False

    def _enable(self, group: Path, names: list[str]) -> set[str]:
        """Enable controllers for the children of C{group}; the ones that took."""
        control = group / "cgroup.subtree_control"
        try:
            _write(control, " ".join("+" + n for n in names))
            return set(names)
        except OSError:
            pass
        took = set()
        for name in names:
            try:
                _write(control, "+" + name)
                took.add(name)
            except OSError as e:
                self.problems.append(f"cannot enable the {name} controller in {control}: "
                                     f"{e.strerror}")
        return took

    def _prepare_v2(self) -> None:
        parent = self.root / PARENT
        wanted = [n for n in CONTROLLERS if n in self._hierarchies]
        took = self._enable(self.root, wanted) if wanted else set()
        if not self._mkdir(parent):
            return
        took = self._enable(parent, [n for n in wanted if n in took]) if took else set()
        self.enforced = took
        self.swap_limited = (parent / "memory.swap.max").exists()
        self._oom_group = (parent / "memory.oom.group").exists()

    def _prepare_v1(self) -> None:
        for name, hierarchy in self._hierarchies.items():
            if self._mkdir(hierarchy / PARENT) and name in CONTROLLERS:
                self.enforced.add(name)
        memory = self._hierarchies.get("memory")
        self.swap_limited = (memory is not None
                             and (memory / PARENT / "memory.memsw.limit_in_bytes").exists())

    def _job_dirs(self, job_id: str, every: bool = False) -> tuple[dict[str, Path], list[Path]]:
        dirs, unique = {}, []
        for name, hierarchy in self._hierarchies.items():
            if not every and name in CONTROLLERS and name not in self.enforced:
                continue
            path = hierarchy / PARENT / job_id
            dirs[name] = path
            if path not in unique:
                unique.append(path)
        return dirs, unique

    def create(self, job_id: str, *, memory_mb: int, cpu: float, pids: int) -> JobCgroup:
        """
        Make the groups of one job and write its limits.

        @raise OSError: a group could not be made or a limit not written;
            whatever was made is removed again.
        """
        self.prepare()
        dirs, unique = self._job_dirs(job_id)
        group = JobCgroup(self.version or "none", dirs, unique, self._kill)
        try:
            for path in unique:
                path.mkdir(mode=0o755)
            self._limit(dirs, memory_mb=memory_mb, cpu=cpu, pids=pids)
        except OSError:
            group.remove()
            raise
        return group

    def _limit(self, dirs: dict[str, Path], *, memory_mb: int, cpu: float, pids: int) -> None:
        memory_bytes = str(memory_mb * 2**20)
        quota = max(1000, int(cpu * CPU_PERIOD_US))
        if "memory" in self.enforced:
            if self.version == "v2":
                _write(dirs["memory"] / "memory.max", memory_bytes)
                if self.swap_limited:
                    _write(dirs["memory"] / "memory.swap.max", "0")
                if self._oom_group:
                    _write(dirs["memory"] / "memory.oom.group", "1")
            else:
                _write(dirs["memory"] / "memory.limit_in_bytes", memory_bytes)
                if self.swap_limited:
                    _write(dirs["memory"] / "memory.memsw.limit_in_bytes", memory_bytes)
        if "cpu" in self.enforced:
            if self.version == "v2":
                _write(dirs["cpu"] / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            else:
                _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        if "pids" in self.enforced:
            _write(dirs["pids"] / "pids.max", str(pids))

    def open(self, job_id: str) -> JobCgroup:
        """The groups of a job made earlier (by this or a previous process)."""
        dirs, unique = self._job_dirs(job_id, every=True)
        present = [p for p in unique if p.is_dir()]
        return JobCgroup(self.version or "none", dirs, present, self._kill)

    def job_ids(self) -> set[str]:
        """The names of the job groups under every C{omerta-jobs} parent."""
        found = set()
        for hierarchy in set(self._hierarchies.values()):
            try:
                found |= {p.name for p in (hierarchy / PARENT).iterdir() if p.is_dir()}
            except OSError:
                pass
        return found
