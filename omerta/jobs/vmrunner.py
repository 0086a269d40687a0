"""
The VM runner: each job in a fresh QEMU guest of its own, reached over SSH.

L{VmRunner} is an L{IJobRunner} on top of the provider's VM backend
(L{omerta.roles.vm.IVMBackend}).  For each L{RunRequest} it

  1. checks the request (L{validate_request}) and the host (L{vm_problem});
  2. creates a guest (L{VMSpec}: C{ceil(cpu)} vcpus, C{memory_mb} but at
     least L{GUEST_MIN_MEMORY_MB}, no disk, owner L{JOBS_OWNER}, name
     C{job-<job_id>}, the runner's own SSH key), starts it and waits until
     it is up (L{IVMBackend.wait_ready}: its address and SSH host key);
  3. logs in as C{omerta} with that key, trusting only the host key the
     guest reported (strict host key checking, batch mode, a connect
     timeout; L{ssh_argv}), makes the work directory L{GUEST_WORK} (tried
     again while the guest's SSH server does not answer yet) and writes each
     input there (C{cat > PATH}, the content on standard input);
  4. runs the command there (L{remote_command}): a clean environment, the
     request's standard input, standard output and error streamed to the
     caller as they come, its exit status as the result.  The wall-clock
     timeout starts with the command;
  5. when the command ended by itself, brings each output back
     (C{cat PATH}, at most C{max_output_bytes});
  6. destroys the guest -- always: after the end, a timeout, a cancel, or a
     failure at any step -- and only then fires L{RunningJob.done}.

Each step is one C{ssh} process (C{reactor.spawnProcess}); the backend's
calls return Deferreds: nothing here blocks the reactor but a few small
files (the key, once; a job's C{known_hosts}).

Telling ssh's failures from the job's
======================================

C{ssh} exits with the remote command's status, and with 255 when it fails
itself.  A job may exit 255 too, so ssh writes its own messages to a log of
the job's (C{-E}), not to the job's standard error: 255 with something in
that log is ssh's failure (reason C{"failed"}, the message as detail); 255
with an empty log is the job's status.  The job runs under a small shell
that waits for it (L{remote_command}), so a job killed by a signal -- the
guest's OOM killer sends SIGKILL -- ends C{"exited"} with 128 + the signal
(137), not as an ssh error.

What is limited
===============

The guest is the limit: its RAM (the job shares it with the guest's kernel
and its work directory, which lives in RAM), its vcpus (whole cores), and
the timeout; a job cannot reach the provider's files or processes, whatever
it does inside its guest.  The number of processes is not limited, nor the
size of the work directory (beyond the guest's RAM).  The guest has the
network of the provider's bridge, the one the VMs it rents are on: it
reaches the provider's bridge address and the other guests there, so
C{describe()} reports the network as not enforced.  An OOM inside the guest
cannot be told reliably from the job's own exit: it is reported as the
exit status (137), never as reason C{"memory"}.
"""

from __future__ import annotations

import enum
import math
import shlex
import shutil
from pathlib import Path, PurePosixPath
from typing import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption,
                                                          PrivateFormat, PublicFormat,
                                                          load_ssh_private_key)
from twisted.internet import defer, task
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from omerta.jobs.runner import (CANCELLED, EXITED, FAILED, JOB_ID, TIMEOUT, IJobRunner,
                                ProblemsMixin, RunningJob, RunRequest, RunResult,
                                validate_request)
from omerta.roles.guest import DEFAULT_IMAGE, GUEST_USER
from omerta.roles.sshkeys import SshKeyError, public_line
from omerta.roles.vmtypes import VMInfo, VMSpec
from omerta.storage import atomic_write, ensure_private_dir

#: The owner of the jobs' guests in the backend: a VMSpec owner must be hex,
#: and these four bytes spell "jobs" (no peer id is four bytes long).
JOBS_OWNER = b"jobs".hex()
#: A job's guest is named C{job-<job_id>}.
NAME_PREFIX = "job-"
#: The least memory the debian-busybox guest boots and runs sshd in: its
#: cloud kernel and the initramfs it unpacks into RAM take ~100 MiB
#: (guest.py sets no minimum; tests/test_vm_qemu.py boots 192).
GUEST_MIN_MEMORY_MB = 192
#: The job's work directory and current directory in the guest.
GUEST_WORK = f"/home/{GUEST_USER}/work"
#: The environment a job starts from (plus the request's variables).
GUEST_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": GUEST_WORK,
             "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
#: The exit status of an output collection whose file is absent or not a
#: regular file.
NOT_A_FILE = 3
#: ssh's own failure (and a job's exit 255 when ssh logged nothing).
SSH_FAILED = 255
#: Kept of a step's standard error to explain a failure.
STDERR_TAIL = 2048

HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
LIMIT_NAMES = ("memory", "cpu", "pids", "timeout", "network", "work_size", "isolation")
ENFORCED = ("memory", "cpu", "timeout", "isolation")

# tool -> the Debian package that provides it
HOST_TOOLS = {"ssh": "openssh-client", "qemu-system-x86_64": "qemu-system-x86"}


def vm_problems(backend, *, which: Callable[..., str | None] = shutil.which,
                import_libvirt: Callable[[], object] | None = None) -> list[str]:
    """
    Every reason jobs cannot run in guests of C{backend} (empty: they can).

    @param which: looks up executables (tests pass a fake).
    @param import_libvirt: imports the libvirt bindings (tests pass a fake).
    """
    problems = []
    uri = getattr(backend, "uri", "") or ""
    if not uri.startswith("qemu"):
        problems.append(f"the VM backend uses {uri or 'an unknown URI'}, which boots no guests;"
                        " start the provider with --libvirt-uri qemu:///system")
    elif not getattr(backend, "bridge", None):
        problems.append("the VM backend gives guests no network (--vm-bridge is empty): the"
                        " runner reaches a job's guest over SSH on that bridge")
    for tool, package in HOST_TOOLS.items():
        if which(tool, path=HOST_PATH) is None:
            problems.append(f"{tool} is not installed: apt-get install {package}")
    try:
        (import_libvirt or _import_libvirt)()
    except ImportError:
        problems.append("libvirt's Python bindings are not installed: pip install"
                        " '.[libvirt]' (and apt-get install libvirt-daemon-system)")
    return problems


def _import_libvirt():
    import libvirt

    return libvirt


def vm_problem(backend, **kwargs) -> str | None:
    """
    Whether jobs can run in guests of C{backend}.

    @return: C{None} when they can, else why not (the first reason).
    """
    problems = vm_problems(backend, **kwargs)
    return problems[0] if problems else None


def guest_spec(request: RunRequest, ssh_key: str) -> VMSpec:
    """The guest of one job (pure)."""
    limits = request.limits
    return VMSpec(vcpus=max(1, math.ceil(limits.cpu)),
                  memory_mb=max(int(math.ceil(limits.memory_mb)), GUEST_MIN_MEMORY_MB),
                  disk_gb=0, image=DEFAULT_IMAGE, owner=JOBS_OWNER,
                  name=NAME_PREFIX + request.job_id, ssh_key=ssh_key)


def ssh_argv(*, ssh: str, key: Path, known_hosts: Path, log: Path, address: str,
             command: str, connect_timeout: float) -> list[str]:
    """
    The ssh command line of one step (pure): it reads no configuration,
    offers only C{key}, trusts only C{known_hosts}, never asks anything,
    gives up connecting after C{connect_timeout} seconds and on a guest
    that stops answering, and writes its own messages to C{log}.
    """
    return [ssh, "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, math.ceil(connect_timeout))}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "-o", "LogLevel=ERROR", "-E", str(log), "-T", "-l", GUEST_USER, address,
            "--", command]


def remote_command(argv: list[str], env: dict[str, str]) -> str:
    """
    The shell command that runs a job in its guest (pure): in
    L{GUEST_WORK}, from a clean environment (L{GUEST_ENV} and C{env}),
    under a shell that waits for it and exits with its status (128 + the
    signal when one killed it).
    """
    assignments = [shlex.quote(f"{name}={value}") for name, value in {**GUEST_ENV, **env}.items()]
    return " ".join([f"cd {shlex.quote(GUEST_WORK)} && exec env -i", *assignments,
                     "/bin/sh -c", shlex.quote('"$@"; exit $?'), "omerta-job",
                     *(shlex.quote(arg) for arg in argv)])


def mkdir_command() -> str:
    """Makes the work directory (pure)."""
    return f"mkdir -p {shlex.quote(GUEST_WORK)}"


def input_command(path: str) -> str:
    """Writes standard input to the input C{path} of the work directory (pure)."""
    pure = PurePosixPath(path)
    prefix = f"cd {shlex.quote(GUEST_WORK)} && "
    if len(pure.parts) > 1:
        prefix += f"mkdir -p -- {shlex.quote(str(pure.parent))} && "
    return prefix + f"cat > {shlex.quote(str(pure))}"


def output_command(path: str) -> str:
    """Prints the output C{path}, or exits L{NOT_A_FILE} (pure)."""
    quoted = shlex.quote(str(PurePosixPath(path)))
    return (f"cd {shlex.quote(GUEST_WORK)} && if [ -f {quoted} ]; then exec cat -- {quoted};"
            f" fi; exit {NOT_A_FILE}")


# -- one ssh process ------------------------------------------------------------

class _Ssh(ProcessProtocol):
    """
    One ssh process: standard output streamed (C{on_stdout}) or kept (at
    most C{limit} bytes: past it the process is killed and C{too_big}
    set), the tail of standard error kept, and C{ended} firing with the
    exit status (128 + the signal).
    """

    def __init__(self, on_stdout: Callable[[bytes], None] | None = None,
                 on_stderr: Callable[[bytes], None] | None = None, limit: int | None = None):
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.limit = limit
        self.stdout = bytearray()
        self.stderr_tail = b""
        self.too_big = False
        self.ended: defer.Deferred = defer.Deferred()

    def kill(self) -> None:
        if self.transport is None or self.ended.called:
            return
        try:
            self.transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            if self.on_stdout is not None:
                self.on_stdout(data)
            elif not self.too_big:
                self.stdout += data
                if self.limit is not None and len(self.stdout) > self.limit:
                    self.too_big = True
                    self.stdout = bytearray()
                    self.kill()
        elif childFD == 2:
            self.stderr_tail = (self.stderr_tail + data)[-STDERR_TAIL:]
            if self.on_stderr is not None:
                self.on_stderr(data)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self.ended.callback(code if code is not None else (128 + sig if sig else SSH_FAILED))

    @property
    def stderr_text(self) -> str:
        lines = self.stderr_tail.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""


# -- one job ---------------------------------------------------------------------

class Step(enum.Enum):
    CREATE = "create"        # the backend defines the guest
    START = "start"          # the backend boots it
    BOOT = "boot"            # waiting until it is up (address, host key)
    CONNECT = "connect"      # the first login: the work directory
    INPUTS = "inputs"
    COMMAND = "command"      # the job runs; the timeout counts
    OUTPUTS = "outputs"
    DESTROY = "destroy"      # the guest goes, whatever happened
    DONE = "done"            # result delivered


class _StepFailed(Exception):
    """A step failed; the job ends C{"failed"} with this detail."""


class _Stopped(Exception):
    """The job was killed (timeout or cancel)."""


class _Job:
    """
    One job from the guest's creation to its destruction; each step is
    awaited in order (L{Step}), and L{kill} interrupts the one under way.
    """

    log = Logger()

    def __init__(self, runner: VmRunner, request: RunRequest,
                 on_output: Callable[[str, bytes], None]):
        self.runner = runner
        self.request = request
        self.on_output = on_output
        self.step = Step.CREATE
        self.done: defer.Deferred = defer.Deferred()
        self.vm_id: str | None = None
        self.address: str | None = None
        self.kill_reason: str | None = None
        self.dir = runner.base_dir / request.job_id
        self._process: _Ssh | None = None
        self._waiting: defer.Deferred | None = None
        self._timer = None

    # -- control

    def start(self) -> None:
        defer.ensureDeferred(self._run())

    def kill(self, reason: str) -> None:
        """End the job for C{reason} (timeout or cancel): its guest goes."""
        if self.step in (Step.DESTROY, Step.DONE) or self.kill_reason is not None:
            return
        self.kill_reason = reason
        self._cancel_timer()
        if self._process is not None:
            self._process.kill()
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _check(self) -> None:
        if self.kill_reason is not None:
            raise _Stopped()

    def _interruptible(self, d: defer.Deferred) -> defer.Deferred:
        """
        C{d}'s result, unless L{kill} comes first (then C{CancelledError});
        C{d} itself runs on, its late result dropped.
        """
        waiter: defer.Deferred = defer.Deferred()

        def forward(result):
            if not waiter.called:
                waiter.callback(result)
            return None

        d.addBoth(forward)
        self._waiting = waiter
        return waiter

    # -- the steps

    async def _run(self) -> None:
        try:
            result = await self._steps()
        except _Stopped:
            result = self._killed()
        except _StepFailed as e:
            result = RunResult(reason=FAILED, exit_code=None, detail=str(e))
        except Exception:
            self.log.failure("job {job_id}: the VM runner failed", job_id=self.request.job_id)
            result = RunResult(reason=FAILED, exit_code=None,
                               detail="the VM runner failed unexpectedly; see the provider's log")
        self._cancel_timer()
        self.step = Step.DESTROY
        await self._destroy()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.step = Step.DONE
        self.runner._ended(self.request.job_id)
        self.done.callback(result)

    async def _steps(self) -> RunResult:
        backend = self.runner.backend
        job_id = self.request.job_id
        try:
            await self._interruptible(self.runner._backend_ready())
            ssh_key = self.runner.public_key()
        except defer.CancelledError:
            raise _Stopped() from None
        except Exception as e:
            raise _StepFailed(f"the VM runner cannot start guests: {e}") from None
        finally:
            self._waiting = None
        self._check()
        spec = guest_spec(self.request, ssh_key)
        try:
            info: VMInfo = await backend.create(spec)
        except Exception as e:
            raise _StepFailed(f"the job's guest could not be created ({spec.vcpus} vcpus,"
                              f" {spec.memory_mb} MiB): {e}") from None
        self.vm_id = info.vm_id
        self.log.info("job {job_id}: guest {vm_id}", job_id=job_id, vm_id=info.vm_id)
        self._check()
        self.step = Step.START
        try:
            await backend.start(info.vm_id)
        except Exception as e:
            raise _StepFailed(f"the job's guest could not be started: {e}") from None
        self._check()
        self.step = Step.BOOT
        try:
            ready: VMInfo = await self._interruptible(
                backend.wait_ready(info.vm_id, self.runner.boot_timeout))
        except defer.CancelledError:
            raise _Stopped() from None
        except Exception as e:
            raise _StepFailed(f"the job's guest did not come up: {e}") from None
        finally:
            self._waiting = None
        self._check()
        if not ready.address or not ready.host_key:
            missing = "address" if not ready.address else "SSH host key"
            raise _StepFailed(f"the job's guest reported no {missing}: the VM backend must run"
                              " real guests on a bridge")
        try:
            host_key = public_line(ready.host_key)
        except SshKeyError as e:
            raise _StepFailed(f"the job's guest reported a bad SSH host key: {e}") from None
        self.address = ready.address
        ensure_private_dir(self.dir)
        atomic_write(self.known_hosts, f"{ready.address} {host_key}\n".encode())

        self.step = Step.CONNECT
        await self._connect()
        self.step = Step.INPUTS
        for path, content in self.request.inputs.items():
            code, proc, log = await self._ssh(input_command(path), stdin=content)
            if code != 0:
                raise _StepFailed(f"the input {path!r} could not be written in the guest: "
                                  + (log or proc.stderr_text or f"exit status {code}"))

        self.step = Step.COMMAND
        code, log = await self._command()
        if code == SSH_FAILED and log:
            raise _StepFailed(f"the connection to the job's guest failed: {log}")
        self.step = Step.OUTPUTS
        outputs, missing, why = await self._collect()
        detail = f"the job exited with status {code}"
        if code == 127:
            detail += " (127: the command may not be installed in the guest)"
        elif code > 128:
            detail += (f": killed by signal {code - 128}"
                       + (", perhaps the guest's OOM killer (the guest's memory is"
                          f" {spec.memory_mb} MiB)" if code == 137 else ""))
        if why:
            detail = f"{detail}. {' '.join(why)}"
        return RunResult(reason=EXITED, exit_code=code, detail=detail, outputs=outputs,
                         missing_outputs=missing)

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def ssh_log(self) -> Path:
        return self.dir / "ssh.log"

    async def _connect(self) -> None:
        """
        The first login makes the work directory; while the guest's SSH
        server does not answer yet (ssh fails), try again, for
        C{connect_timeout} seconds.
        """
        runner = self.runner
        deadline = runner.reactor.seconds() + runner.connect_timeout
        while True:
            code, proc, log = await self._ssh(mkdir_command())
            if code == 0:
                return
            if code != SSH_FAILED or runner.reactor.seconds() >= deadline:
                raise _StepFailed("the job's guest could not be logged into over SSH: "
                                  + (log or proc.stderr_text or f"exit status {code}"))
            pause = task.deferLater(runner.reactor, runner.connect_retry, lambda: None)
            try:
                await self._interruptible(pause)
            except defer.CancelledError:
                pause.cancel()
                raise _Stopped() from None
            finally:
                self._waiting = None
            self._check()

    def _spawn(self, proto: _Ssh, command: str, stdin: bytes) -> None:
        runner = self.runner
        if self.ssh_log.exists():
            self.ssh_log.unlink()
        argv = ssh_argv(ssh=runner.ssh, key=runner.key_path, known_hosts=self.known_hosts,
                        log=self.ssh_log, address=self.address, command=command,
                        connect_timeout=runner.ssh_connect_timeout)
        transport = runner.reactor.spawnProcess(
            proto, argv[0], argv, env={"PATH": HOST_PATH, "LC_ALL": "C"}, path="/",
            childFDs={0: "w", 1: "r", 2: "r"})
        if stdin:
            transport.writeToChild(0, stdin)
        transport.closeChildFD(0)
        self._process = proto

    def _logged(self) -> str:
        """The last line ssh wrote to its own log, or C{""}."""
        try:
            lines = self.ssh_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    async def _ssh(self, command: str, stdin: bytes = b"",
                   limit: int | None = None) -> tuple[int, _Ssh, str]:
        """
        One step's ssh, ended within C{step_timeout} seconds.

        @return: its exit status, its protocol and what ssh logged.
        """
        proto = _Ssh(limit=limit)
        try:
            self._spawn(proto, command, stdin)
        except Exception as e:
            raise _StepFailed(f"ssh could not be started: {e}") from None
        expired = []

        def expire() -> None:
            expired.append(True)
            proto.kill()

        call = self.runner.reactor.callLater(self.runner.step_timeout, expire)
        try:
            code = await proto.ended
        finally:
            self._process = None
            if call.active():
                call.cancel()
        self._check()
        if expired:
            raise _StepFailed(f"a step in the job's guest ({command[:60]!r}) did not finish"
                              f" within {self.runner.step_timeout:g} s")
        return code, proto, self._logged()

    async def _command(self) -> tuple[int, str]:
        request = self.request

        def output(stream: str) -> Callable[[bytes], None]:
            def deliver(data: bytes) -> None:
                try:
                    self.on_output(stream, data)
                except Exception:
                    self.log.failure("on_output raised for job {job_id}", job_id=request.job_id)
            return deliver

        proto = _Ssh(on_stdout=output("stdout"), on_stderr=output("stderr"))
        try:
            self._spawn(proto, remote_command(request.argv, request.env), request.stdin)
        except Exception as e:
            raise _StepFailed(f"ssh could not be started: {e}") from None
        self._timer = self.runner.reactor.callLater(request.limits.timeout_s, self.kill, TIMEOUT)
        try:
            code = await proto.ended
        finally:
            self._process = None
            self._cancel_timer()
        self._check()
        return code, self._logged()

    async def _collect(self) -> tuple[dict[str, bytes], list[str], list[str]]:
        found: dict[str, bytes] = {}
        missing: list[str] = []
        why: list[str] = []
        limit = self.runner.max_output_bytes
        for path in self.request.outputs:
            try:
                code, proto, log = await self._ssh(output_command(path), limit=limit)
            except _StepFailed as e:
                code, proto, log = None, None, str(e)
            if proto is not None and proto.too_big:
                reason = f"bigger than the {limit} bytes allowed per output"
            elif code == 0:
                found[path] = bytes(proto.stdout)
                continue
            elif code == NOT_A_FILE:
                reason = "absent or not a regular file"
            else:
                reason = log or (proto.stderr_text if proto else "") or f"exit status {code}"
            missing.append(path)
            why.append(f"Output {path!r} was not collected: {reason}.")
        return found, missing, why

    def _killed(self) -> RunResult:
        if self.kill_reason == TIMEOUT:
            return RunResult(reason=TIMEOUT, exit_code=None,
                             detail=f"the job ran longer than its {self.request.limits.timeout_s:g}"
                                    " s timeout; its guest was destroyed")
        return RunResult(reason=CANCELLED, exit_code=None,
                         detail="the job was cancelled; its guest was destroyed")

    async def _destroy(self) -> None:
        if self.vm_id is None:
            return
        try:
            await self.runner.backend.destroy(self.vm_id)
        except Exception:
            self.log.failure("job {job_id}: cannot destroy its guest {vm_id}; cleanup_stale"
                             " will try again", job_id=self.request.job_id, vm_id=self.vm_id)


# -- the runner --------------------------------------------------------------------

@implementer(IJobRunner)
class VmRunner(ProblemsMixin):
    """
    Runs each job in a fresh guest of C{backend}; see the module docstring.

    @param reactor: provides C{IReactorProcess} and C{IReactorTime}.
    @param backend: an L{omerta.roles.vm.IVMBackend} running real guests
        (C{qemu:} URI, a bridge).
    @param base_dir: the runner's directory (0700): its SSH key
        (C{id_ed25519}, made at the first job, 0600) and each running job's
        C{known_hosts} and ssh log.
    @param max_output_bytes: the largest output file collected.
    @param boot_timeout: seconds a guest may take to come up.
    @param connect_timeout: seconds the first login is tried for.
    @param step_timeout: seconds writing one input or reading one output
        may take.
    @param problems: says why jobs cannot run (default L{vm_problems} of
        C{backend}); tests pass a fake.
    """

    kind = "vm"
    #: its jobs' guests are VMs of the backend, which counts what they hold
    counted_by_backend = True
    log = Logger()

    def __init__(self, reactor, backend, base_dir: Path, *, ssh: str = "ssh",
                 max_output_bytes: int = 16 * 2**20, boot_timeout: float = 120.0,
                 connect_timeout: float = 120.0, connect_retry: float = 0.5,
                 ssh_connect_timeout: float = 30.0, step_timeout: float = 60.0,
                 problems: Callable[[], list[str]] | None = None):
        self.reactor = reactor
        self.backend = backend
        self.base_dir = Path(base_dir)
        self.ssh = ssh
        self.max_output_bytes = max_output_bytes
        self.boot_timeout = boot_timeout
        self.connect_timeout = connect_timeout
        self.connect_retry = connect_retry
        self.ssh_connect_timeout = ssh_connect_timeout
        self.step_timeout = step_timeout
        self._problems = problems if problems is not None else (lambda: vm_problems(backend))
        self._public_key: str | None = None
        self._jobs: dict[str, _Job] = {}

    # -- the key

    @property
    def key_path(self) -> Path:
        return self.base_dir / "id_ed25519"

    def public_key(self) -> str:
        """
        The runner's SSH public key line, the key made (0600) at the first
        call when it does not exist.

        @raise ValueError: the key file is there but cannot be read.
        """
        if self._public_key is not None:
            return self._public_key
        ensure_private_dir(self.base_dir)
        path = self.key_path
        if path.exists():
            try:
                key = load_ssh_private_key(path.read_bytes(), None)
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"its SSH key {path} cannot be read ({e}); remove it and a"
                                 " new one is made") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"its SSH key {path} is not ed25519; remove it")
        else:
            key = Ed25519PrivateKey.generate()
            atomic_write(path, key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH,
                                                 NoEncryption()))
        self._public_key = key.public_key().public_bytes(
            Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " omerta-jobs"
        return self._public_key

    # -- the backend

    def _backend_ready(self) -> defer.Deferred:
        """
        Fires once the backend has opened and reconciled (its C{whenReady},
        left untouched); fails when it did not.
        """
        when = getattr(self.backend, "whenReady", None)
        done: defer.Deferred = defer.Deferred()
        if when is None:
            done.callback(None)
            return done

        def settled(result):
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(None)
            return result

        when.addBoth(settled)
        return done

    # -- IJobRunner

    def describe(self) -> dict:
        problems = self._problems()
        enforced = [] if problems else list(ENFORCED)
        return {
            "kind": self.kind, "cgroup": None, "enforced": enforced,
            "not_enforced": [n for n in LIMIT_NAMES if n not in enforced],
            "problems": problems,
            "image": DEFAULT_IMAGE, "min_memory_mb": GUEST_MIN_MEMORY_MB,
            "notes": {
                "memory": f"the guest's RAM: memory_mb, at least {GUEST_MIN_MEMORY_MB} MiB,"
                          " shared with the guest's kernel and its work directory; an OOM"
                          " kill in the guest ends the job 'exited' with status 137",
                "cpu": "the guest's vcpus: cpu rounded up to whole cores",
                "timeout": "wall clock from the start of the command; the guest is destroyed",
                "network": "the guest is on the provider's VM bridge: it reaches the"
                           " provider's bridge address and the other guests there",
                "pids": "not limited inside the guest",
                "work_size": "the work directory is in the guest's RAM, bounded by it",
                "isolation": "a guest of its own (QEMU), destroyed after the job",
            },
        }

    def run(self, request: RunRequest, on_output: Callable[[str, bytes], None]) -> RunningJob:
        validate_request(request)
        job_id = request.job_id
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} is already running")
        problem = self.problem()
        if problem is not None:
            return RunningJob(defer.succeed(RunResult(
                reason=FAILED, exit_code=None,
                detail=f"this provider cannot run jobs in VMs: {problem}")), lambda: None)
        job = _Job(self, request, on_output)
        self._jobs[job_id] = job
        job.start()
        return RunningJob(job.done, lambda: job.kill(CANCELLED))

    def _ended(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def cleanup_stale(self) -> defer.Deferred:
        """
        Destroy the guests a previous provider process left: the backend's
        VMs owned by L{JOBS_OWNER} and named C{job-<job_id>} that no job of
        this runner holds; remove the job directories left under
        C{base_dir}.

        @return: a Deferred firing with the sorted job ids whose guests were
            destroyed; it never fails (a failure is logged).
        """
        return defer.ensureDeferred(self._cleanup_stale())

    async def _cleanup_stale(self) -> list[str]:
        try:
            await self._backend_ready()
            vms = await self.backend.list()
        except Exception:
            self.log.failure("cannot list the VM backend's guests to clean up stale jobs")
            return []
        held = {job.vm_id for job in self._jobs.values()}
        cleaned = []
        for vm in vms:
            if (vm.owner != JOBS_OWNER or not vm.name.startswith(NAME_PREFIX)
                    or vm.vm_id in held):
                continue
            job_id = vm.name[len(NAME_PREFIX):]
            if job_id in self._jobs:
                continue
            try:
                await self.backend.destroy(vm.vm_id)
            except Exception:
                self.log.failure("cannot destroy the stale guest {vm_id} of job {job_id}",
                                 vm_id=vm.vm_id, job_id=job_id)
                continue
            self.log.info("destroyed the guest {vm_id} a previous run left for job {job_id}",
                          vm_id=vm.vm_id, job_id=job_id)
            cleaned.append(job_id)
        try:
            for entry in self.base_dir.iterdir():
                if JOB_ID.match(entry.name) and entry.name not in self._jobs:
                    shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass
        return sorted(cleaned)


__all__ = ["GUEST_MIN_MEMORY_MB", "GUEST_WORK", "JOBS_OWNER", "VmRunner", "guest_spec",
           "input_command", "mkdir_command", "output_command", "remote_command", "ssh_argv",
           "vm_problem", "vm_problems"]
