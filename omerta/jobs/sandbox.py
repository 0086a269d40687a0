"""
The sandbox runner: one job in bubblewrap, limited by cgroups.

L{SandboxRunner} is an L{IJobRunner}.  For each L{RunRequest} it

  1. checks the request (L{validate_request}) and the host
     (L{SandboxRunner.problem});
  2. mounts a tmpfs of C{limits.work_mb} at C{<base_dir>/<job_id>/work}
     (L{WorkDirs}), owned by the job's user, and writes the inputs into it;
  3. makes the job's cgroups with its limits (L{omerta.jobs.cgroups});
  4. spawns C{/bin/sh -c 'echo $$ > <cgroup.procs>...; exec "$@"'}, which
     puts itself into the job's cgroups, then becomes C{setpriv} (dropping
     to uid/gid 65534 with no capabilities), then C{bwrap}, then the job: so
     every process of the job is limited from its first instruction;
  5. streams standard output and error to the caller, kills the whole
     cgroup when the timeout expires or the caller cancels;
  6. once the job has ended and its cgroup is empty, reads the CPU time,
     peak memory and OOM kills, removes the cgroups, copies the outputs out
     of the work directory, unmounts it and removes it, and fires
     L{RunningJob.done}.

Why the job is a real unprivileged user
=======================================

bwrap started by root with C{--unshare-user} maps the sandbox's user to
root outside: the job would then own every root-owned file it can see
(C{/etc/shadow}, SSH host keys).  So the sandbox is started by uid 65534
(C{nobody}); in its user namespace it is uid 65534 too, and root's files are
as closed to it as to any other user.  This is also why C{base_dir} and
its parents must be searchable by that user (C{/root} is not).

What the job sees
=================

A read-only C{/usr} and C{/etc}, the merged-usr links (C{/bin}, C{/lib},
C{/lib64}, C{/sbin}), a fresh C{/proc} of its own pid namespace, a minimal
C{/dev}, a private C{/tmp} (a tmpfs no bigger than the work directory) and
its work directory at C{/work}, its current directory.  Nothing else of the
host: not the provider's data, not C{/root}, C{/home}, C{/var}, nor other
jobs.  It has its own pid, IPC, UTS and cgroup namespaces, and its own
network namespace with only loopback unless both the request and the
runner allow the network.
"""

from __future__ import annotations

import ctypes
import hashlib
import ctypes.util
import enum
import json
import os
import shlex
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from omerta.jobs.cgroups import CgroupHost, JobCgroup
from omerta.jobs.runner import (CANCELLED, EXITED, FAILED, JOB_ID, MEMORY, TIMEOUT, IJobRunner,
                                ProblemsMixin, RunningJob, RunRequest, RunResult,
                                validate_request)

#: The user and group a job runs as, inside and outside its sandbox.
JOB_UID = 65534
JOB_GID = 65534
#: The file descriptor bwrap reports the sandbox's status on.
STATUS_FD = 3
#: How often the end of a job looks whether its cgroup is empty yet, and for
#: how long at most.
REAP_INTERVAL = 0.02
REAP_DEADLINE = 10.0
#: Kept of the job's standard error to explain a failed start.
STDERR_TAIL = 2048

HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
JOB_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp",
           "LANG": "C.UTF-8"}
#: Read-only in the sandbox; the others (C{/bin}, C{/lib}...) follow the host:
#: a symbolic link there (merged /usr) is a link in the sandbox too.
SYSTEM_DIRS = ("/usr", "/etc")
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")

LIMIT_NAMES = ("memory", "cpu", "pids", "timeout", "network", "work_size")


def system_layout(root: Path = Path("/")) -> dict[str, tuple[str, str | None]]:
    """
    How the host's system directories look: path -> C{("dir", None)} or
    C{("symlink", target)}; paths the host lacks are left out.
    """
    layout: dict[str, tuple[str, str | None]] = {}
    for path in SYSTEM_DIRS + SYSTEM_LINKS:
        host = root / path.lstrip("/")
        if host.is_symlink():
            layout[path] = ("symlink", os.readlink(host))
        elif host.is_dir():
            layout[path] = ("dir", None)
    return layout


def bwrap_argv(*, bwrap: str, argv: list[str], env: Mapping[str, str], work_dir: Path,
               network: bool, layout: Mapping[str, tuple[str, str | None]],
               tmp_bytes: int) -> list[str]:
    """
    The bwrap command line of one job (pure).

    @param network: C{True} keeps the host's network namespace; else the job
        gets a new one with only loopback.
    @param layout: from L{system_layout}.
    @param tmp_bytes: size of the sandbox's C{/tmp}.
    """
    args = [bwrap, "--unshare-user", "--uid", str(JOB_UID), "--gid", str(JOB_GID),
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "omerta-job",
            "--unshare-cgroup-try"]
    if not network:
        args.append("--unshare-net")
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    for name, value in {**JOB_ENV, **env}.items():
        args += ["--setenv", name, value]
    for path, (kind, target) in layout.items():
        if kind == "symlink":
            args += ["--symlink", target, path]
        else:
            args += ["--ro-bind", path, path]
    if network:
        # /etc/resolv.conf may point there.
        args += ["--ro-bind-try", "/run/systemd/resolve", "/run/systemd/resolve"]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmp_bytes), "--tmpfs", "/tmp",
             "--bind", str(work_dir), "/work", "--chdir", "/work",
             "--json-status-fd", str(STATUS_FD), "--", *argv]
    return args


def spawn_argv(*, procs_files: list[Path], setpriv: str, bwrap_args: list[str]) -> list[str]:
    """
    The command the runner spawns (pure): a shell that joins the job's
    cgroups, then drops to the job's user and becomes bwrap.  It exits 125
    when it cannot join a cgroup.
    """
    targets = " ".join(shlex.quote(str(p)) for p in procs_files)
    script = f'for f in {targets}; do echo $$ > "$f" || exit 125; done; exec "$@"'
    return ["/bin/sh", "-c", script, "omerta-job", setpriv, f"--reuid={JOB_UID}",
            f"--regid={JOB_GID}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
            "--no-new-privs", "--", *bwrap_args]


def _unreachable(base_dir: Path) -> str | None:
    """Why the job's user cannot reach C{base_dir}, or C{None}."""
    path = Path(os.path.abspath(base_dir))
    for ancestor in [*reversed(path.parents), path]:
        try:
            st = ancestor.stat()
        except FileNotFoundError:
            return None   # made by the runner, searchable
        except OSError as e:
            return f"cannot inspect {ancestor}: {e.strerror}"
        if st.st_uid == JOB_UID:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == JOB_GID:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return (f"the job user (uid {JOB_UID}) cannot reach base_dir {path}: "
                    f"{ancestor} is mode {stat.S_IMODE(st.st_mode):04o}; choose a base_dir "
                    "under /var/lib or make its parents searchable (o+x)")
    return None


def host_problems(*, cgroups: CgroupHost, bwrap: str, base_dir: Path | None = None,
                  euid: int | None = None,
                  which: Callable[..., str | None] = shutil.which) -> list[str]:
    """
    Every reason the sandbox cannot run jobs on this host (empty: it can).

    @param euid: the effective uid to judge (default: this process's).
    @param which: looks up executables (tests pass a fake).
    """
    problems = []
    if (os.geteuid() if euid is None else euid) != 0:
        problems.append("the provider is not running as root: it needs root to mount work "
                        "directories, manage cgroups and drop to the job user")
    if which(bwrap) is None:
        problems.append(f"bubblewrap ({bwrap}) is not installed: apt-get install bubblewrap")
    if which("setpriv", path=HOST_PATH) is None:
        problems.append("setpriv (util-linux) is not installed")
    if not cgroups.available("memory"):
        problems.append(f"no cgroup memory controller under {cgroups.root}: jobs' memory "
                        "cannot be limited")
    if base_dir is not None:
        unreachable = _unreachable(base_dir)
        if unreachable:
            problems.append(unreachable)
    return problems


def sandbox_problem(*, cgroup_root: Path = Path("/sys/fs/cgroup"), bwrap: str = "bwrap",
                    base_dir: Path | None = None) -> str | None:
    """
    Whether this host can run sandboxed jobs.

    @return: C{None} when it can, else why not (the first reason).
    """
    problems = host_problems(cgroups=CgroupHost(cgroup_root), bwrap=bwrap, base_dir=base_dir)
    return problems[0] if problems else None


# -- work directories ---------------------------------------------------------

_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2
_libc = None


def _libc_call(name: str, *args) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_beneath(root_fd: int, path: str, flags: int, *, create_dirs: bool = False,
                  owner: tuple[int, int] | None = None) -> int:
    """
    Open C{path} below the directory C{root_fd} without following any
    symbolic link (a job may leave links pointing at the host's files).
    """
    parts = PurePosixPath(path).parts
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            if create_dirs:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if owner:
                        os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
    finally:
        os.close(fd)


class WorkDirs:
    """
    The jobs' work directories: one tmpfs of a fixed size per job at
    C{<base_dir>/<job_id>/work}, so a job can never fill the provider's
    disk.
    """

    log = Logger()

    def __init__(self, base_dir: Path):
        self.base_dir = Path(base_dir)

    def create(self, job_id: str, size_mb: int) -> Path:
        """Mount a fresh work directory owned by the job's user."""
        # (explicit chmods: a daemon's umask, 077 under twistd, would leave
        # the directories the job's user must cross closed to it)
        for directory in [*reversed(self.base_dir.parents), self.base_dir]:
            if not directory.exists():
                directory.mkdir(mode=0o711)
                os.chmod(directory, 0o711)
        os.chmod(self.base_dir, 0o711)
        job_dir = self.base_dir / job_id
        job_dir.mkdir(mode=0o711)
        os.chmod(job_dir, 0o711)
        work = job_dir / "work"
        try:
            work.mkdir(mode=0o700)
            options = (f"size={size_mb}m,mode=0700,uid={JOB_UID},gid={JOB_GID},"
                       f"nr_inodes={max(4096, size_mb * 64)}")
            _libc_call("mount", b"omerta-job", os.fsencode(work), b"tmpfs",
                       ctypes.c_ulong(_MS_NOSUID | _MS_NODEV), options.encode())
        except OSError:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        return work

    def write_inputs(self, work: Path, inputs: Mapping[str, bytes]) -> None:
        """Write the inputs, owned by the job's user."""
        root = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for path, content in inputs.items():
                fd = _open_beneath(root, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                   create_dirs=True, owner=(JOB_UID, JOB_GID))
                with os.fdopen(fd, "wb") as f:
                    os.fchown(fd, JOB_UID, JOB_GID)
                    f.write(content)
        finally:
            os.close(root)

    def collect(self, work: Path, outputs: list[str],
                max_bytes: int) -> tuple[dict[str, bytes], list[str], list[str]]:
        """
        Copy the outputs out.

        @return: the files read, the ones missing, and a sentence per
            missing one saying why.
        """
        found: dict[str, bytes] = {}
        missing: list[str] = []
        why: list[str] = []
        root = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for path in outputs:
                try:
                    fd = _open_beneath(root, path, os.O_RDONLY | os.O_NONBLOCK)
                except OSError as e:
                    missing.append(path)
                    why.append(f"Output {path!r} was not collected: {e.strerror}.")
                    continue
                with os.fdopen(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        missing.append(path)
                        why.append(f"Output {path!r} was not collected: not a regular file.")
                        continue
                    data = f.read(max_bytes + 1)
                if len(data) > max_bytes:
                    missing.append(path)
                    why.append(f"Output {path!r} was not collected: bigger than the "
                               f"{max_bytes} bytes allowed per output.")
                else:
                    found[path] = data
        finally:
            os.close(root)
        return found, missing, why

    def remove(self, job_id: str) -> None:
        """Unmount and remove a job's work directory (present or not)."""
        job_dir = self.base_dir / job_id
        work = job_dir / "work"
        if os.path.ismount(work):
            try:
                _libc_call("umount2", os.fsencode(work), _MNT_DETACH)
            except OSError as e:
                self.log.warn("cannot unmount {work}: {error}", work=work, error=e.strerror)
                return
        shutil.rmtree(job_dir, ignore_errors=True)

    def job_ids(self) -> set[str]:
        """The job directories present."""
        try:
            return {p.name for p in self.base_dir.iterdir() if JOB_ID.match(p.name)}
        except OSError:
            return set()


# -- one job -------------------------------------------------------------------

class State(enum.Enum):
    RUNNING = "running"    # spawned, not yet ended
    ENDING = "ending"      # the sandbox exited; waiting for its cgroup to empty
    DONE = "done"          # result delivered


class _JobProtocol(ProcessProtocol):
    """Hands the process's events to its L{_Job}."""

    def __init__(self, job: _Job):
        self.job = job

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.job.data_received(childFD, data)

    def processEnded(self, reason: Failure) -> None:
        self.job.process_ended(reason)


class _Job:
    """
    One job from spawn to result: owns its process, its timeout, its
    cgroups and its work directory.
    """

    log = Logger()

    def __init__(self, runner: SandboxRunner, request: RunRequest,
                 on_output: Callable[[str, bytes], None], cgroup: JobCgroup, work: Path):
        self.runner = runner
        self.request = request
        self.on_output = on_output
        self.cgroup = cgroup
        self.work = work
        self.state = State.RUNNING
        self.done: defer.Deferred = defer.Deferred()
        self.transport = None
        self.kill_reason: str | None = None
        self.status = b""
        self.stderr_tail = b""
        self.exit_code: int | None = None
        self._timer = None
        self._reap_until = 0.0

    def start(self, argv: list[str]) -> None:
        reactor = self.runner.reactor
        self.transport = reactor.spawnProcess(
            _JobProtocol(self), argv[0], argv, env={"PATH": HOST_PATH, "LC_ALL": "C"},
            path="/", childFDs={0: "w", 1: "r", 2: "r", STATUS_FD: "r"})
        self._timer = reactor.callLater(self.request.limits.timeout_s, self.kill, TIMEOUT)
        if self.request.stdin:
            self.transport.writeToChild(0, self.request.stdin)
        self.transport.closeChildFD(0)

    def kill(self, reason: str) -> None:
        """End the whole process tree, for C{reason} (timeout or cancel)."""
        if self.state is not State.RUNNING or self.kill_reason is not None:
            return
        self.kill_reason = reason
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.cgroup.kill()
        try:
            self.transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass

    def data_received(self, fd: int, data: bytes) -> None:
        if fd == STATUS_FD:
            self.status += data
            return
        name = {1: "stdout", 2: "stderr"}.get(fd)
        if name is None:
            return
        if fd == 2:
            self.stderr_tail = (self.stderr_tail + data)[-STDERR_TAIL:]
        try:
            self.on_output(name, data)
        except Exception:
            self.log.failure("on_output raised for job {job_id}", job_id=self.request.job_id)

    def process_ended(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self.exit_code = code if code is not None else (128 + sig if sig else None)
        self.state = State.ENDING
        self._reap_until = self.runner.reactor.seconds() + REAP_DEADLINE
        self._reap()

    def _reap(self) -> None:
        """
        Kill what is left of the job until its cgroup is empty, then finish.
        (Emptiness is looked at on the clock: v1 offers no event for it
        short of a release agent.)
        """
        try:
            empty = self.cgroup.kill()
        except Exception:
            self.log.failure("cannot kill job {job_id}", job_id=self.request.job_id)
            empty = True
        if not empty and self.runner.reactor.seconds() < self._reap_until:
            self.runner.reactor.callLater(REAP_INTERVAL, self._reap)
            return
        if not empty:
            self.log.warn("job {job_id}: processes {pids} are still in its cgroup; "
                          "cleanup_stale will retry", job_id=self.request.job_id,
                          pids=sorted(self.cgroup.pids()))
        self._finish()

    def _started(self) -> bool:
        for line in self.status.splitlines():
            try:
                if "child-pid" in json.loads(line):
                    return True
            except ValueError:
                pass
        return False

    def _outcome(self) -> tuple[str, int | None, str]:
        limits = self.request.limits
        stderr = self.stderr_tail.decode("utf-8", "replace").strip().splitlines()
        last = stderr[-1] if stderr else ""
        if self.kill_reason == TIMEOUT:
            return (TIMEOUT, None, f"the job ran longer than its {limits.timeout_s:g} s "
                    "timeout and all its processes were killed")
        if self.kill_reason == CANCELLED:
            return CANCELLED, None, "the job was cancelled and all its processes were killed"
        if not self._started():
            return (FAILED, None, "the sandbox could not start"
                    + (f": {last}" if last else f" (exit status {self.exit_code})"))
        if self.exit_code == 1 and last.startswith("bwrap: "):
            if last.startswith("bwrap: execvp "):
                return (FAILED, None, f"the command {self.request.argv[0]!r} could not be "
                        f"run in the sandbox ({last[len('bwrap: '):]}); check it is "
                        "installed in /usr on the provider")
            return FAILED, None, f"the sandbox could not start: {last}"
        if self.cgroup.oom_kills() and self.exit_code != 0:
            return (MEMORY, self.exit_code, f"the job needed more than its "
                    f"{limits.memory_mb} MB of memory and the kernel's OOM killer ended it")
        if self.exit_code is not None and self.exit_code > 128:
            return (EXITED, self.exit_code,
                    f"the job was killed by signal {self.exit_code - 128}")
        return EXITED, self.exit_code, f"the job exited with status {self.exit_code}"

    def _safely(self, what: str, call: Callable, default=None):
        """C{call()}, or C{default} (the error logged) when it raises."""
        try:
            return call()
        except Exception:
            self.log.failure("job {job_id}: cannot {what}", job_id=self.request.job_id,
                             what=what)
            return default

    def _finish(self) -> None:
        reason, exit_code, detail = self._safely(
            "tell how it ended", self._outcome,
            (FAILED, None, "the job's end could not be examined; see the provider's log"))
        cpu_s = self._safely("read its CPU time", self.cgroup.cpu_seconds)
        peak = self._safely("read its peak memory", self.cgroup.peak_memory_mb)
        self._safely("remove its cgroups", self.cgroup.remove)
        outputs: dict[str, bytes] = {}
        missing: list[str] = []
        if self.request.outputs:
            try:
                outputs, missing, why = self.runner._workdirs.collect(
                    self.work, self.request.outputs, self.runner.max_output_bytes)
            except OSError as e:
                missing, why = list(self.request.outputs), [
                    f"The outputs could not be read: {e.strerror}."]
            if why:
                detail = f"{detail}. {' '.join(why)}"
        self._safely("remove its work directory",
                     lambda: self.runner._workdirs.remove(self.request.job_id))
        self.state = State.DONE
        self.runner._ended(self.request.job_id)
        self.done.callback(RunResult(reason=reason, exit_code=exit_code, detail=detail,
                                     outputs=outputs, missing_outputs=missing, cpu_s=cpu_s,
                                     peak_memory_mb=peak))


# -- the runner ------------------------------------------------------------------

@implementer(IJobRunner)
class SandboxRunner(ProblemsMixin):
    """
    Runs jobs in bubblewrap with cgroup limits; see the module docstring.

    @param reactor: provides C{IReactorProcess} and C{IReactorTime}.
    @param base_dir: where the jobs' work directories are mounted; it and
        its parents must be searchable by uid 65534.
    @param cgroup_root: where the cgroup hierarchies are mounted.
    @param bwrap: the bubblewrap executable.
    @param allow_network: let jobs that ask for it use the host's network.
    @param max_output_bytes: the largest output file collected.
    @param workdirs: the L{WorkDirs} (tests pass a fake).
    """

    kind = "sandbox"
    log = Logger()

    def __init__(self, reactor, base_dir: Path, *, cgroup_root: Path = Path("/sys/fs/cgroup"),
                 bwrap: str = "bwrap", allow_network: bool = False,
                 max_output_bytes: int = 16 * 2**20, workdirs: WorkDirs | None = None):
        self.reactor = reactor
        self.base_dir = Path(base_dir)
        self.bwrap = bwrap
        self.allow_network = allow_network
        self.max_output_bytes = max_output_bytes
        self._cgroups = CgroupHost(Path(cgroup_root), kill=self._kill_pid)
        self._workdirs = workdirs if workdirs is not None else WorkDirs(self.base_dir)
        self._jobs: dict[str, _Job] = {}
        # Job cgroups are named SCOPE-JOBID, SCOPE from base_dir: a runner
        # cleans up only its own groups, never another provider's (or
        # another runner's) on the same host.
        self._scope = hashlib.sha256(
            os.fsencode(self.base_dir.resolve())).hexdigest()[:8]

    def _group(self, job_id: str) -> str:
        """The name of a job's cgroups."""
        return f"{self._scope}-{job_id}"

    # Seams for tests.
    def _kill_pid(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    def _host_problems(self) -> list[str]:
        return host_problems(cgroups=self._cgroups, bwrap=self.bwrap, base_dir=self.base_dir)

    def _tools(self) -> tuple[str, str]:
        """The absolute paths of bwrap and setpriv."""
        return (shutil.which(self.bwrap) or self.bwrap,
                shutil.which("setpriv", path=HOST_PATH) or "setpriv")

    def _layout(self) -> dict[str, tuple[str, str | None]]:
        return system_layout()

    def _problems(self) -> list[str]:
        """Every reason this runner cannot run jobs (empty: it can)."""
        problems = self._host_problems()
        if not problems:
            cgroup_problems = self._cgroups.prepare()
            if "memory" not in self._cgroups.enforced:
                problems.append("the memory limit cannot be applied: "
                                + "; ".join(cgroup_problems))
        return problems

    def describe(self) -> dict:
        host = self._problems()
        cgroup_problems = self._cgroups.prepare()
        usable = not host
        enforced = [name for name in LIMIT_NAMES
                    if usable and (name in self._cgroups.enforced
                                   or name in ("timeout", "network", "work_size"))]
        return {"kind": self.kind, "cgroup": self._cgroups.version, "enforced": enforced,
                "not_enforced": [n for n in LIMIT_NAMES if n not in enforced],
                "problems": host + [p for p in cgroup_problems if p not in host],
                "allow_network": self.allow_network}

    def run(self, request: RunRequest, on_output: Callable[[str, bytes], None]) -> RunningJob:
        validate_request(request)
        job_id = request.job_id
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} is already running")
        problem = self.problem()
        if problem is not None:
            return self._failed(f"this provider cannot run sandboxed jobs: {problem}")
        limits = request.limits
        try:
            work = self._workdirs.create(job_id, limits.work_mb)
        except OSError as e:
            return self._failed(f"the work directory could not be made: {e}")
        try:
            self._workdirs.write_inputs(work, request.inputs)
        except OSError as e:
            self._workdirs.remove(job_id)
            return self._failed(f"the inputs could not be written (they may not fit in "
                                f"work_mb = {limits.work_mb}): {e}")
        try:
            cgroup = self._cgroups.create(self._group(job_id), memory_mb=limits.memory_mb,
                                          cpu=limits.cpu, pids=limits.pids)
        except OSError as e:
            self._workdirs.remove(job_id)
            return self._failed(f"the job's cgroup could not be made: {e}")
        bwrap, setpriv = self._tools()
        args = bwrap_argv(bwrap=bwrap, argv=request.argv, env=request.env, work_dir=work,
                          network=limits.network and self.allow_network,
                          layout=self._layout(), tmp_bytes=limits.work_mb * 2**20)
        job = _Job(self, request, on_output, cgroup, work)
        try:
            job.start(spawn_argv(procs_files=cgroup.procs_files, setpriv=setpriv,
                                 bwrap_args=args))
        except Exception as e:
            self.log.failure("cannot spawn job {job_id}", job_id=job_id)
            cgroup.kill()
            cgroup.remove()
            self._workdirs.remove(job_id)
            return self._failed(f"the sandbox could not be spawned: {e}")
        self._jobs[job_id] = job
        return RunningJob(job.done, lambda: job.kill(CANCELLED), pid=job.transport.pid)

    def _failed(self, detail: str) -> RunningJob:
        return RunningJob(defer.succeed(RunResult(reason=FAILED, exit_code=None, detail=detail)),
                          lambda: None)

    def _ended(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def cleanup_stale(self) -> defer.Deferred:
        """
        Clean up after a previous provider process on the same C{base_dir}:
        kill every process left in its jobs' cgroups (those named for this
        C{base_dir} under C{omerta-jobs}), remove those cgroups, unmount
        and remove the work directories under C{base_dir}.  Jobs of this
        runner that are still running, and other runners' jobs, are left
        alone.

        @return: a Deferred firing with the sorted list of the job ids
            cleaned, once their processes are gone (or after
            C{REAP_DEADLINE} seconds, leaving what would not go).
        """
        prefix = self._scope + "-"
        ours = {name[len(prefix):] for name in self._cgroups.job_ids()
                if name.startswith(prefix)}
        ids = {i for i in ours | self._workdirs.job_ids()
               if JOB_ID.match(i) and i not in self._jobs}
        groups = [self._cgroups.open(self._group(i)) for i in sorted(ids)]
        done: defer.Deferred = defer.Deferred()
        until = self.reactor.seconds() + REAP_DEADLINE

        def gone(group: JobCgroup) -> bool:
            try:
                return group.kill() and group.remove()
            except OSError:
                self.log.failure("cannot clean stale job cgroups")
                return False

        def attempt():
            left = [g for g in groups if not gone(g)]
            if left and self.reactor.seconds() < until:
                groups[:] = left
                self.reactor.callLater(REAP_INTERVAL, attempt)
                return
            for g in left:
                self.log.warn("cannot remove stale job cgroups {dirs}",
                              dirs=[str(p.parent) for p in g.procs_files])
            for job_id in sorted(ids):
                try:
                    self._workdirs.remove(job_id)
                except OSError:
                    self.log.failure("cannot remove the work directory of {job_id}",
                                     job_id=job_id)
            done.callback(sorted(ids))

        attempt()
        return done
