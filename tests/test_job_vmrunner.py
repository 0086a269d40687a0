"""
The VM job runner (L{omerta.jobs.vmrunner}).

The unit tests need no root nor QEMU: a job's life runs on a L{Clock} that
also fakes C{spawnProcess} (each ssh is a fake process the test ends), with
a fake VM backend that records its calls.  The integration tests run real
jobs in real guests (root, QEMU and libvirtd, set up by the helpers of
L{tests.test_vm_qemu}); without root they skip, saying why; as root,
missing packages are a failure.
"""

from __future__ import annotations

import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from omerta.jobs.runner import IJobRunner, Limits, RunRequest
from omerta.jobs.vmrunner import (GUEST_MIN_MEMORY_MB, GUEST_WORK, JOBS_OWNER, VmRunner,
                                  guest_spec, remote_command, ssh_argv, vm_problem,
                                  vm_problems)
from omerta.roles.vmtypes import VMError, VMInfo
from tests.test_state_files import make_member_dir
from omerta.testing.fakejobs import run_request

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB2dkJGx0R3ZOa0Cz3JZl2wWZlLxuMmBbQbPUEqvYQ3t"
ADDRESS = "10.237.0.9"
log = Logger()


def job_id() -> str:
    return secrets.token_hex(8)


request = run_request


def info(vm_id: str, *, name: str = "", owner: str = JOBS_OWNER, address=None,
         host_key=None, state: str = "shutoff") -> VMInfo:
    return VMInfo(vm_id=vm_id, name=name, state=state, vcpus=1, memory_mb=192, disk_gb=0,
                  owner=owner, created_at=0.0, address=address, host_key=host_key)


class FakeBackend:
    """
    An IVMBackend that records its calls.  C{fail[method]} makes a call
    fail; C{hold} names methods whose Deferred the test fires
    (C{pending[method]}).
    """

    uri = "qemu:///system"
    bridge = "omerta-br0"

    def __init__(self):
        self.calls: list[tuple] = []
        self.fail: dict[str, Exception] = {}
        self.hold: set[str] = set()
        self.pending: dict[str, defer.Deferred] = {}
        self.vms: dict[str, VMInfo] = {}
        self.host_key = HOST_KEY
        self.whenReady = defer.succeed(None)

    def _answer(self, method, value):
        if method in self.fail:
            return defer.fail(self.fail[method])
        if method in self.hold:
            self.pending[method] = defer.Deferred()
            return self.pending[method]
        return defer.succeed(value)

    def create(self, spec):
        vm_id = secrets.token_hex(8)
        self.calls.append(("create", spec))
        if "create" not in self.fail:
            self.vms[vm_id] = info(vm_id, name=spec.name, owner=spec.owner)
        return self._answer("create", self.vms.get(vm_id))

    def start(self, vm_id):
        self.calls.append(("start", vm_id))
        return self._answer("start", self.vms.get(vm_id))

    def wait_ready(self, vm_id, timeout):
        self.calls.append(("wait_ready", vm_id, timeout))
        return self._answer("wait_ready", info(vm_id, address=ADDRESS, host_key=self.host_key,
                                               state="running"))

    def destroy(self, vm_id):
        self.calls.append(("destroy", vm_id))
        if "destroy" not in self.fail:
            self.vms.pop(vm_id, None)
        return self._answer("destroy", None)

    def list(self):
        self.calls.append(("list",))
        return self._answer("list", list(self.vms.values()))

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


class FakeTransport:
    """A spawned ssh as its protocol sees it; a KILL ends it on the next tick."""

    pid = 4242

    def __init__(self, clock, protocol):
        self.clock = clock
        self.protocol = protocol
        self.written: list[bytes] = []
        self.closed: list[int] = []
        self.signals: list[str] = []
        self.ended = False

    def writeToChild(self, fd, data):
        self.written.append(data)

    def closeChildFD(self, fd):
        self.closed.append(fd)

    def signalProcess(self, sig):
        self.signals.append(sig)
        self.clock.callLater(0, self.end, signal=9)

    def end(self, code: int = 0, *, signal: int | None = None):
        if self.ended:
            return
        self.ended = True
        if signal is not None:
            reason = ProcessTerminated(signal=signal)
        elif code == 0:
            reason = ProcessDone(0)
        else:
            reason = ProcessTerminated(exitCode=code)
        self.protocol.processEnded(Failure(reason))


class Spawned:
    """One ssh the runner started."""

    def __init__(self, argv, env, transport):
        self.argv = argv
        self.env = env
        self.transport = transport

    @property
    def command(self) -> str:
        return self.argv[-1]

    @property
    def log(self) -> Path:
        return Path(self.argv[self.argv.index("-E") + 1])

    @property
    def stdin(self) -> bytes:
        return b"".join(self.transport.written)

    def out(self, data: bytes, fd: int = 1) -> None:
        self.transport.protocol.childDataReceived(fd, data)

    def end(self, code: int = 0, *, stdout: bytes = b"", stderr: bytes = b"",
            logged: str = "") -> None:
        """End it: what it printed, what ssh logged, its exit status."""
        if logged:
            self.log.write_text(logged + "\n")
        if stdout:
            self.out(stdout, 1)
        if stderr:
            self.out(stderr, 2)
        self.transport.end(code)


class ProcessClock(Clock):
    """A L{Clock} whose C{spawnProcess} makes fake processes (C{spawned})."""

    def __init__(self):
        super().__init__()
        self.spawned: list[Spawned] = []
        self.refuse: Exception | None = None

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None, uid=None,
                     gid=None, usePTY=False, childFDs=None):
        if self.refuse is not None:
            raise self.refuse
        assert childFDs == {0: "w", 1: "r", 2: "r"}, childFDs
        transport = FakeTransport(self, protocol)
        protocol.makeConnection(transport)
        self.spawned.append(Spawned(list(args), env, transport))
        return transport


class Base(unittest.TestCase):

    def setUp(self):
        self.clock = ProcessClock()
        self.backend = FakeBackend()
        self.base = Path(self.mktemp())
        self.problems: list[str] = []
        self.runner = VmRunner(self.clock, self.backend, self.base, ssh="/usr/bin/ssh",
                               max_output_bytes=10, problems=lambda: list(self.problems))
        self.output: list[tuple[str, bytes]] = []

    def run_job(self, **kwargs):
        req = request(**kwargs)
        job = self.runner.run(req, lambda name, data: self.output.append((name, data)))
        return req, job

    @property
    def last(self) -> Spawned:
        return self.clock.spawned[-1]

    def to_command(self, **kwargs):
        """Start a job and end its steps up to its command (running)."""
        req, job = self.run_job(**kwargs)
        self.last.end(0)                      # mkdir
        for _ in req.inputs:
            self.last.end(0)
        return req, job

    def vm_id(self) -> str:
        """The guest of the last job created."""
        return [call[1] for call in self.backend.calls if call[0] == "start"][-1]

    def assert_destroyed(self):
        self.assertEqual(self.backend.calls[-1], ("destroy", self.vm_id()))
        self.assertEqual(self.backend.vms, {})


class PureTests(unittest.TestCase):
    """The guest's spec, the ssh command line and the remote commands."""

    def test_spec(self):
        """vcpus are cpu rounded up; memory is the limit but at least what the guest needs."""
        key = "ssh-ed25519 " + HOST_KEY.split()[1]
        req = request(limits=Limits(cpu=1.5, memory_mb=128))
        spec = guest_spec(req, key)
        spec.validate()
        self.assertEqual((spec.vcpus, spec.memory_mb, spec.disk_gb, spec.owner, spec.name,
                          spec.ssh_key), (2, GUEST_MIN_MEMORY_MB, 0, JOBS_OWNER,
                                          f"job-{req.job_id}", key))
        self.assertEqual(bytes.fromhex(JOBS_OWNER), b"jobs")
        spec = guest_spec(request(limits=Limits(cpu=0.25, memory_mb=1024)), key)
        self.assertEqual((spec.vcpus, spec.memory_mb), (1, 1024))

    def test_ssh_argv(self):
        """ssh trusts only the reported key, never asks, times out connecting, logs apart."""
        argv = ssh_argv(ssh="/usr/bin/ssh", key=Path("/k/id"), known_hosts=Path("/k/kh"),
                        log=Path("/k/log"), address=ADDRESS, command="echo 'a b'",
                        connect_timeout=10)
        self.assertEqual(argv[0], "/usr/bin/ssh")
        options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
        for option in ("StrictHostKeyChecking=yes", "UserKnownHostsFile=/k/kh",
                       "GlobalKnownHostsFile=/dev/null", "BatchMode=yes", "ConnectTimeout=10",
                       "IdentitiesOnly=yes"):
            self.assertIn(option, options)
        self.assertEqual(argv[argv.index("-F") + 1], "/dev/null")
        self.assertEqual(argv[argv.index("-i") + 1], "/k/id")
        self.assertEqual(argv[argv.index("-E") + 1], "/k/log")
        self.assertEqual(argv[-4:], ["omerta", ADDRESS, "--", "echo 'a b'"])

    def test_remote_command_quoted(self):
        """The command, its arguments and environment reach the guest's shell quoted."""
        command = remote_command(["sh", "-c", "echo $HOME; rm -rf /"],
                                 {"X": "a b'c", "EMPTY": ""})
        words = shlex.split(command)
        self.assertEqual(words[:6], ["cd", GUEST_WORK, "&&", "exec", "env", "-i"])
        self.assertIn("X=a b'c", words)
        self.assertIn("EMPTY=", words)
        self.assertIn(f"HOME={GUEST_WORK}", words)
        self.assertEqual(words[-7:], ["/bin/sh", "-c", '"$@"; exit $?', "omerta-job", "sh",
                                      "-c", "echo $HOME; rm -rf /"])

    def test_remote_command_runs(self):
        """On a real shell the wrapper runs the argv in a clean environment and keeps its status."""
        work = Path(self.mktemp())
        work.mkdir()
        command = remote_command(["sh", "-c", 'echo "$X:$HOME:$SECRET"; exit 7'],
                                 {"X": "a b"}).replace(GUEST_WORK, str(work))
        done = subprocess.run(["/bin/sh", "-c", command], capture_output=True,
                              env={"SECRET": "leak", "PATH": "/usr/bin:/bin"})
        self.assertEqual((done.returncode, done.stdout), (7, f"a b:{work}:\n".encode()))


class JobLifeTests(Base):
    """One job's life on a Clock with a fake backend and fake ssh processes."""

    def test_interface(self):
        """VmRunner provides IJobRunner."""
        verifyObject(IJobRunner, self.runner)
        self.assertEqual(self.runner.kind, "vm")

    def test_order(self):
        """create, start, wait_ready, work dir, inputs, command, outputs, destroy: in order."""
        req, job = self.run_job(argv=["cat"], stdin=b"in", inputs={"a.txt": b"A", "d/b": b"B"},
                                outputs=["r.txt"], env={"X": "1"})
        self.assertEqual(self.backend.names(), ["create", "start", "wait_ready"])
        self.assertEqual(self.backend.calls[2][2], self.runner.boot_timeout)
        known_hosts = self.base / req.job_id / "known_hosts"
        self.assertEqual(known_hosts.read_text(), f"{ADDRESS} {HOST_KEY}\n")
        self.assertEqual(stat.S_IMODE(known_hosts.stat().st_mode), 0o600)
        self.assertEqual(self.last.command, f"mkdir -p {GUEST_WORK}")
        self.last.end(0)
        self.assertEqual((self.last.command, self.last.stdin, self.last.transport.closed),
                         (f"cd {GUEST_WORK} && cat > a.txt", b"A", [0]))
        self.last.end(0)
        self.assertEqual((self.last.command, self.last.stdin),
                         (f"cd {GUEST_WORK} && mkdir -p -- d && cat > d/b", b"B"))
        self.last.end(0)
        self.assertEqual(self.last.command, remote_command(["cat"], {"X": "1"}))
        self.assertEqual((self.last.stdin, self.last.transport.closed), (b"in", [0]))
        self.last.end(0)
        self.assertIn("cat -- r.txt", self.last.command)
        self.assertNoResult(job.done)
        self.last.end(0, stdout=b"result")
        self.assertEqual(self.backend.names(), ["create", "start", "wait_ready", "destroy"])
        self.assert_destroyed()
        result = self.successResultOf(job.done)
        self.assertEqual((result.reason, result.exit_code, result.outputs),
                         ("exited", 0, {"r.txt": b"result"}))
        self.assertEqual(len(self.clock.spawned), 5)
        for spawned in self.clock.spawned:
            self.assertEqual(spawned.argv[spawned.argv.index("-i") + 1],
                             str(self.base / "id_ed25519"))
        self.assertFalse((self.base / req.job_id).exists())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.runner._jobs, {})

    def test_key(self):
        """The runner's key is made once, 0600, and its public half is the guests' key."""
        self.to_command()
        self.last.end(0)
        key = self.base / "id_ed25519"
        self.assertEqual(stat.S_IMODE(key.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.base.stat().st_mode), 0o700)
        first = key.read_bytes()
        spec = self.backend.calls[0][1]
        self.assertTrue(spec.ssh_key.startswith("ssh-ed25519 "))
        runner = VmRunner(self.clock, self.backend, self.base, problems=lambda: [])
        self.assertEqual(runner.public_key(), spec.ssh_key)
        self.assertEqual(key.read_bytes(), first)

    def test_streaming(self):
        """stdout and stderr reach on_output as they arrive, before the end."""
        req, job = self.to_command()
        self.last.out(b"one", 1)
        self.last.out(b"err", 2)
        self.assertEqual(self.output, [("stdout", b"one"), ("stderr", b"err")])
        self.last.out(b"two", 1)
        self.assertEqual(self.output[-1], ("stdout", b"two"))
        self.assertNoResult(job.done)
        self.last.end(0)
        self.assertEqual(self.successResultOf(job.done).reason, "exited")

    def test_exit_codes(self):
        """The remote status is the exit code; 255 with nothing logged by ssh is the job's."""
        for code, logged in ((3, ""), (255, ""), (137, "")):
            req, job = self.to_command()
            self.last.end(code, logged=logged)
            result = self.successResultOf(job.done)
            self.assertEqual((result.reason, result.exit_code), ("exited", code))
            self.assert_destroyed()
        self.assertIn("OOM", result.detail)

    def test_ssh_failure(self):
        """255 with ssh's own message is reason failed with that message; no output collected."""
        req, job = self.to_command(outputs=["r.txt"])
        self.last.end(255, logged="Connection to 10.237.0.9 closed by remote host.")
        result = self.successResultOf(job.done)
        self.assertEqual((result.reason, result.exit_code), ("failed", None))
        self.assertIn("closed by remote host", result.detail)
        self.assertEqual(len(self.clock.spawned), 2)
        self.assert_destroyed()

    def test_timeout(self):
        """The timeout counts from the command; then ssh is killed and the guest destroyed."""
        self.runner.step_timeout = 1000
        req, job = self.run_job(limits=Limits(timeout_s=5), outputs=["r.txt"])
        self.clock.advance(4)           # boot and login time do not count
        self.last.end(0)
        self.clock.advance(4.9)
        self.assertEqual(self.last.transport.signals, [])
        self.clock.advance(0.1)
        self.assertEqual(self.last.transport.signals, ["KILL"])
        self.clock.advance(0)
        result = self.successResultOf(job.done)
        self.assertEqual((result.reason, result.exit_code), ("timeout", None))
        self.assertEqual(len(self.clock.spawned), 2)  # no output collected
        self.assert_destroyed()

    def test_cancel_in_command(self):
        """A cancel kills ssh and destroys the guest: reason cancelled."""
        req, job = self.to_command()
        job.cancel()
        self.assertEqual(self.last.transport.signals, ["KILL"])
        self.assertNoResult(job.done)
        self.clock.advance(0)
        result = self.successResultOf(job.done)
        self.assertEqual(result.reason, "cancelled")
        self.assert_destroyed()
        job.cancel()   # nothing more

    def test_cancel_while_creating(self):
        """A cancel during create waits for the guest, then destroys it, never starting it."""
        self.backend.hold.add("create")
        req, job = self.run_job()
        job.cancel()
        self.assertNoResult(job.done)
        vm_id = next(iter(self.backend.vms))
        self.backend.pending["create"].callback(self.backend.vms[vm_id])
        self.assertEqual(self.backend.names(), ["create", "destroy"])
        self.assertEqual(self.successResultOf(job.done).reason, "cancelled")
        self.assertEqual(self.backend.vms, {})

    def test_cancel_while_booting(self):
        """A cancel during wait_ready destroys the guest at once."""
        self.backend.hold.add("wait_ready")
        req, job = self.run_job()
        job.cancel()
        self.assertEqual(self.backend.names(), ["create", "start", "wait_ready", "destroy"])
        self.assertEqual(self.successResultOf(job.done).reason, "cancelled")
        self.backend.pending["wait_ready"].errback(VMError("gone"))  # late: ignored
        self.assertEqual(self.clock.spawned, [])

    def test_cancel_in_inputs(self):
        """A cancel while an input is written kills that ssh and destroys the guest."""
        req, job = self.run_job(inputs={"a": b"1", "b": b"2"})
        self.last.end(0)
        job.cancel()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(job.done).reason, "cancelled")
        self.assertEqual(len(self.clock.spawned), 2)
        self.assert_destroyed()

    def failed(self, job, *words):
        result = self.successResultOf(job.done)
        self.assertEqual((result.reason, result.exit_code), ("failed", None))
        for word in words:
            self.assertIn(word, result.detail)
        return result

    def test_create_fails(self):
        """A guest that cannot be created: failed, saying why; nothing to destroy."""
        self.backend.fail["create"] = VMError("quota: no memory left")
        req, job = self.run_job()
        self.failed(job, "could not be created", "quota: no memory left")
        self.assertEqual(self.backend.names(), ["create"])

    def test_start_fails(self):
        """A guest that cannot start is destroyed; failed, saying why."""
        self.backend.fail["start"] = VMError("no bridge")
        req, job = self.run_job()
        self.failed(job, "could not be started", "no bridge")
        self.assert_destroyed()

    def test_boot_fails(self):
        """A guest that does not come up is destroyed; failed, saying why."""
        self.backend.fail["wait_ready"] = VMError("not up after 120 s")
        req, job = self.run_job()
        self.failed(job, "did not come up", "not up after 120 s")
        self.assert_destroyed()

    def test_no_host_key(self):
        """A guest that reported no host key is never logged into: failed, destroyed."""
        self.backend.host_key = None
        req, job = self.run_job()
        self.failed(job, "no SSH host key")
        self.assertEqual(self.clock.spawned, [])
        self.assert_destroyed()

    def test_connect_retries(self):
        """While the guest's SSH server does not answer, the login is tried again."""
        req, job = self.run_job()
        self.last.end(255, logged="ssh: connect to host 10.237.0.9 port 22: Connection refused")
        self.assertEqual(len(self.clock.spawned), 1)
        self.clock.advance(self.runner.connect_retry)
        self.assertEqual(len(self.clock.spawned), 2)
        self.last.end(0)
        self.last.end(0)
        self.assertEqual(self.successResultOf(job.done).reason, "exited")

    def test_connect_fails(self):
        """A guest never reachable over SSH: failed with ssh's message after the deadline."""
        req, job = self.run_job()
        while not job.done.called:
            self.last.end(255, logged="ssh: connect to host 10.237.0.9 port 22: No route to host")
            self.clock.advance(self.runner.connect_retry)
            bound = self.runner.connect_timeout / self.runner.connect_retry + 10
            self.assertLess(len(self.clock.spawned), bound)
        self.failed(job, "could not be logged into", "No route to host")
        self.assert_destroyed()

    def test_login_refused(self):
        """A login refused (not a connection problem) fails at once, without retrying."""
        req, job = self.run_job()
        self.last.end(1, stderr=b"mkdir: can't create directory: Read-only file system\n")
        self.failed(job, "Read-only file system")
        self.assertEqual(len(self.clock.spawned), 1)
        self.assert_destroyed()

    def test_input_fails(self):
        """An input that cannot be written: failed naming it; the guest destroyed."""
        req, job = self.run_job(inputs={"big.bin": b"x"})
        self.last.end(0)
        self.last.end(1, stderr=b"cat: write error: No space left on device\n")
        self.failed(job, "'big.bin'", "No space left on device")
        self.assert_destroyed()

    def test_step_timeout(self):
        """An input write that hangs is killed after step_timeout: failed, destroyed."""
        req, job = self.run_job(inputs={"a": b"1"}, limits=Limits(timeout_s=10000))
        self.last.end(0)
        self.clock.advance(self.runner.step_timeout)
        self.assertEqual(self.last.transport.signals, ["KILL"])
        self.clock.advance(0)
        self.failed(job, "did not finish within")
        self.assert_destroyed()

    def test_spawn_fails(self):
        """ssh that cannot be spawned: failed, saying why; the guest destroyed."""
        self.clock.refuse = OSError(2, "No such file or directory")
        req, job = self.run_job()
        self.failed(job, "ssh could not be started", "No such file")
        self.assert_destroyed()

    def test_destroy_fails(self):
        """A guest that will not go is logged; the result is delivered anyway."""
        self.backend.fail["destroy"] = VMError("libvirt went away")
        req, job = self.to_command()
        self.last.end(0)
        self.assertEqual(self.successResultOf(job.done).reason, "exited")
        self.assertEqual(len(self.flushLoggedErrors(VMError)), 1)
        self.assertEqual(self.runner._jobs, {})

    def test_backend_not_ready(self):
        """A backend that did not start: failed, nothing created."""
        self.backend.whenReady = defer.fail(VMError("libvirt unreachable"))
        req, job = self.run_job()
        self.failed(job, "cannot start guests", "libvirt unreachable")
        self.assertEqual(self.backend.calls, [])
        self.backend.whenReady.addErrback(lambda f: None)

    def test_outputs(self):
        """Outputs come back; absent ones and ones bigger than the bound are named missing."""
        req, job = self.to_command(outputs=["ok", "absent", "big"])
        self.last.end(0)
        self.last.end(0, stdout=b"fine")
        self.last.end(3)
        self.last.out(b"0123456789A")
        self.assertEqual(self.last.transport.signals, ["KILL"])
        self.clock.advance(0)
        result = self.successResultOf(job.done)
        self.assertEqual((result.outputs, result.missing_outputs), ({"ok": b"fine"},
                                                                    ["absent", "big"]))
        self.assertIn("'absent' was not collected: absent or not a regular file", result.detail)
        self.assertIn("'big' was not collected: bigger than the 10 bytes", result.detail)
        self.assert_destroyed()

    def test_invalid_request(self):
        """A malformed request raises ValueError; nothing is created."""
        self.assertRaises(ValueError, self.run_job, argv=[])
        self.assertRaises(ValueError, self.run_job, inputs={"../x": b""})
        self.assertEqual(self.backend.calls, [])

    def test_problem_fails_job(self):
        """A runner that cannot work fails each job at once, saying why."""
        self.problems.append("the VM backend uses test:///default, which boots no guests")
        req, job = self.run_job()
        self.failed(job, "cannot run jobs in VMs", "test:///default")
        self.assertEqual(self.backend.calls, [])


class DescribeTests(Base):
    """What describe() claims, and vm_problem."""

    def test_enforced(self):
        """Memory, cpu, timeout and isolation are enforced; pids, network, work size are not."""
        d = self.runner.describe()
        self.assertEqual(d["kind"], "vm")
        self.assertEqual(d["enforced"], ["memory", "cpu", "timeout", "isolation"])
        self.assertEqual(sorted(d["not_enforced"]), ["network", "pids", "work_size"])
        self.assertEqual(d["problems"], [])
        self.assertIn("bridge", d["notes"]["network"])

    def test_problems(self):
        """A runner that cannot work enforces nothing and says why."""
        self.problems.append("libvirt is not there")
        d = self.runner.describe()
        self.assertEqual(d["enforced"], [])
        self.assertIn("memory", d["not_enforced"])
        self.assertEqual(d["problems"], ["libvirt is not there"])

    def test_vm_problem(self):
        """vm_problem names the test driver, a missing bridge, ssh, qemu and libvirt."""
        everything = dict(which=lambda name, path=None: "/usr/bin/" + name,
                          import_libvirt=lambda: None)
        self.assertIsNone(vm_problem(self.backend, **everything))
        self.backend.uri = "test:///default"
        self.assertIn("--libvirt-uri qemu:///system", vm_problem(self.backend, **everything))
        self.backend.uri, self.backend.bridge = "qemu:///system", ""
        self.assertIn("no network", vm_problem(self.backend, **everything))
        self.backend.bridge = "omerta-br0"

        def missing_libvirt():
            raise ImportError("libvirt")

        problems = vm_problems(self.backend, which=lambda name, path=None: None,
                               import_libvirt=missing_libvirt)
        self.assertEqual(len(problems), 3)
        self.assertIn("openssh-client", problems[0])
        self.assertIn("qemu-system-x86", problems[1])
        self.assertIn("libvirt", problems[2])


class CleanupTests(Base):
    """cleanup_stale destroys what a previous process left, and only that."""

    def test_cleanup_stale(self):
        """Leftover job guests go; consumers' VMs and running jobs' guests stay."""
        stale = job_id()
        self.backend.vms = {
            "a" * 16: info("a" * 16, name=f"job-{stale}"),
            "b" * 16: info("b" * 16, name="web", owner="cd" * 32),
            "c" * 16: info("c" * 16, name=f"job-{job_id()}", owner="cd" * 32),
        }
        (self.base / stale).mkdir(parents=True)
        req, job = self.to_command()
        running_vm = self.vm_id()
        cleaned = self.successResultOf(self.runner.cleanup_stale())
        self.assertEqual(cleaned, [stale])
        self.assertEqual(sorted(self.backend.vms), sorted(["b" * 16, "c" * 16, running_vm]))
        self.assertFalse((self.base / stale).exists())
        self.assertTrue((self.base / req.job_id).exists())
        self.last.end(0)
        self.successResultOf(job.done)

    def test_cleanup_never_fails(self):
        """A backend that cannot list: logged, and the cleanup fires with nothing."""
        self.backend.fail["list"] = VMError("libvirt unreachable")
        self.assertEqual(self.successResultOf(self.runner.cleanup_stale()), [])
        self.assertEqual(len(self.flushLoggedErrors(VMError)), 1)


class TapTests(unittest.TestCase):
    """twistd omerta-provider --jobs vm."""

    def test_option(self):
        """--jobs takes vm; anything else is refused with the choices."""
        from omerta.app.provider_tap import Options

        data_dir = make_member_dir(self)
        options = Options()
        options.parseOptions(["--data-dir", data_dir, "--no-tunnels", "--jobs", "vm"])
        self.assertEqual(options["jobs"], "vm")
        e = self.assertRaises(usage.UsageError, Options().parseOptions,
                              ["--data-dir", data_dir, "--no-tunnels", "--jobs", "docker"])
        self.assertIn("'vm'", str(e))
        default = Options()
        default.parseOptions(["--data-dir", data_dir, "--no-tunnels"])
        self.assertEqual(default["jobs"], "sandbox")

    def _jobs(self, backend):
        from omerta.app.provider_tap import Options, _jobs

        class Provider:
            mesh = None
            jobs = None
            capacity = None

            def announce_free(self):
                pass

        options = Options()
        data_dir = Path(make_member_dir(self))
        options.parseOptions(["--data-dir", str(data_dir), "--no-tunnels", "--jobs", "vm"])
        provider = Provider()
        backend.committed = lambda: None
        return _jobs(options, provider, backend, data_dir, Clock()), data_dir

    def test_wiring(self):
        """--jobs vm on a qemu backend gives a VmRunner in DATA_DIR/jobs-vm."""
        import omerta.jobs.vmrunner as vmrunner

        self.patch(vmrunner, "vm_problem", lambda backend: None)
        service, data_dir = self._jobs(FakeBackend())
        self.assertIsInstance(service.runner, VmRunner)
        self.assertEqual(service.runner.base_dir, data_dir / "jobs-vm")
        self.assertIsNone(service.problem)

    def test_wiring_test_driver(self):
        """--jobs vm on the test driver runs no jobs and says why."""
        backend = FakeBackend()
        backend.uri = "test:///default"
        service, _ = self._jobs(backend)
        self.assertIsNone(service.runner)
        self.assertIn("qemu:///system", service.problem)
        self.flushLoggedErrors()


# -- real guests -------------------------------------------------------------------

#: A bridge of this test's own (test_vm_qemu.py's omerta-test0 and its
#: addresses may be in use by that test at the same time).
BRIDGE = "omerta-testjob"
BRIDGE_ADDRESS = "10.237.253.1/24"
JOB_DEADLINE = 150.0


class RealGuestTests(unittest.TestCase):
    """Real jobs in real guests: root, QEMU and libvirtd (tests/test_vm_qemu.py's setup)."""

    timeout = 300

    def setUp(self):
        from tests import test_vm_qemu as qemu

        qemu.require_root()
        missing = qemu.missing_tools()
        if missing:
            self.fail("missing for real VMs: " + "; ".join(missing)
                      + "; run scripts/setup-env as root")
        self.qemu = qemu
        # QEMU's user must reach the disk's directories (see test_vm_qemu)
        top = Path(tempfile.mkdtemp(prefix="omerta-vmjob-test-", dir="/var/tmp"))
        top.chmod(0o711)
        self.addCleanup(shutil.rmtree, top, True)
        self.top = top

    @defer.inlineCallbacks
    def backend(self):
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        from omerta.roles import guest
        from omerta.roles.vm import HostTools, LibvirtBackend
        from tests.integration import wait_for

        qemu = self.qemu
        yield deferToThread(qemu.start_daemons)
        yield defer.ensureDeferred(wait_for(qemu.LIBVIRT_SOCKET.exists, qemu.DAEMON_DEADLINE,
                                            f"libvirtd's socket {qemu.LIBVIRT_SOCKET}"))
        builder = guest.ImageBuilder(qemu.IMAGE_CACHE)
        yield deferToThread(builder.ensure, guest.DEFAULT_IMAGE)
        if not (yield deferToThread(qemu.bridge_exists, BRIDGE)):
            self.addCleanup(deferToThread, qemu.delete_bridge, BRIDGE)
        b = LibvirtBackend(self.top / "provider", reactor=reactor, uri="qemu:///system",
                           images_dir=qemu.IMAGE_CACHE, tools=HostTools(image_builder=builder),
                           bridge=BRIDGE, bridge_address=BRIDGE_ADDRESS)
        b.startService()
        self.addCleanup(RealGuestTests.tearDownBackend, b)
        yield b.whenReady
        return b

    @staticmethod
    @defer.inlineCallbacks
    def tearDownBackend(b):
        try:
            for vm in (yield b.list()):
                yield b.destroy(vm.vm_id)
        finally:
            yield b.stopService()

    @defer.inlineCallbacks
    def run_real(self, **kwargs):
        """
        Run one job in a real guest; a Deferred of (result, output), after
        checking its guest is gone: not in the backend, no domain, no disk.
        """
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        b = yield self.backend()
        created = []
        create = b.create

        def recording_create(spec):
            return create(spec).addCallback(lambda vm: (created.append(vm.vm_id), vm)[1])

        b.create = recording_create
        runner = VmRunner(reactor, b, self.top / "jobs-vm")
        self.assertIsNone(runner.problem())
        out = {"stdout": b"", "stderr": b""}

        def on_output(name, data):
            out[name] += data

        t0 = time.monotonic()
        job = runner.run(request(**kwargs), on_output)
        self.addCleanup(lambda: (job.cancel(), job.done)[1])
        result = yield job.done.addTimeout(JOB_DEADLINE, reactor)
        log.info("a real VM job took {s:.2f} s ({reason})", s=time.monotonic() - t0,
                 reason=result.reason)
        self.assertEqual(len(created), 1)
        self.assertEqual((yield b.list()), [])
        self.assertNotIn(f"omerta-{created[0]}", (yield deferToThread(self.qemu.domain_names)))
        self.assertFalse(b.disk_path(created[0]).parent.exists())
        self.assertEqual(list((self.top / "jobs-vm").iterdir()),
                         [self.top / "jobs-vm" / "id_ed25519"])
        return result, out

    @defer.inlineCallbacks
    def test_prints_42(self):
        """sh -c 'echo $((6*7))' in a real guest prints 42, exits 0; the guest is gone after."""
        # debian-busybox has no python3 (guest.py): the shell does the sum
        result, out = yield self.run_real(argv=["sh", "-c", "echo $((6*7)); id -un"],
                                          limits=Limits(timeout_s=60))
        self.assertEqual((result.reason, result.exit_code, out["stdout"]),
                         ("exited", 0, b"42\nomerta\n"), (result.detail, out["stderr"]))

    @defer.inlineCallbacks
    def test_files_round_trip(self):
        """An input file goes in, the output comes back; env, stdin, stderr and exit 255 pass."""
        result, out = yield self.run_real(
            argv=["sh", "-c", 'tr a-z A-Z < in/data.txt > out.txt; cat; echo "$GREETING" >&2;'
                              " exit 255"],
            inputs={"in/data.txt": b"hello vm\n"}, outputs=["out.txt", "none.txt"],
            stdin=b"from stdin", env={"GREETING": "hi 'there'"}, limits=Limits(timeout_s=60))
        # 255 is also ssh's own failure: ssh logged nothing, so it is the job's
        self.assertEqual((result.reason, result.exit_code), ("exited", 255), result.detail)
        self.assertEqual(result.outputs, {"out.txt": b"HELLO VM\n"})
        self.assertEqual(result.missing_outputs, ["none.txt"])
        self.assertEqual(out, {"stdout": b"from stdin", "stderr": b"hi 'there'\n"})

    @defer.inlineCallbacks
    def test_timeout(self):
        """A job past its timeout ends 'timeout' and its guest is destroyed."""
        result, out = yield self.run_real(argv=["sh", "-c", "echo started; sleep 600"],
                                          limits=Limits(timeout_s=3))
        self.assertEqual((result.reason, out["stdout"]), ("timeout", b"started\n"),
                         result.detail)
