"""
The sandbox job runner (L{omerta.jobs.sandbox}).

The unit tests need no root: the bwrap command line is a pure function, the
cgroups are a temporary directory imitating C{/sys/fs/cgroup} (v1 and v2),
and a job's life runs on a L{Clock} with a fake C{spawnProcess} and fake
work directories.  The integration tests run real jobs in bubblewrap; they
need root, bwrap and a cgroup memory controller, and are skipped (saying
why) without root or bwrap.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from omerta.jobs.cgroups import CgroupHost
from omerta.jobs.runner import IJobRunner, Limits, RunRequest, validate_request
from omerta.jobs.sandbox import (JOB_UID, SandboxRunner, WorkDirs, bwrap_argv, host_problems,
                                 sandbox_problem, spawn_argv)
from omerta.testing.fakejobs import run_request

LAYOUT = {"/usr": ("dir", None), "/etc": ("dir", None), "/bin": ("symlink", "usr/bin"),
          "/lib": ("symlink", "usr/lib"), "/lib64": ("symlink", "usr/lib64"),
          "/sbin": ("symlink", "usr/sbin")}


def job_id() -> str:
    return secrets.token_hex(8)


request = run_request


def make_v1(root: Path, hierarchies=("memory", "cpu,cpuacct", "pids"), memsw=True) -> Path:
    """A directory imitating a cgroup v1 host."""
    markers = {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us",
               "cpuacct": "cpuacct.usage"}
    for name in hierarchies:
        (root / name).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
        for controller in name.split(","):
            if controller in markers:
                (root / name / markers[controller]).write_text("0")
    (root / "unified").mkdir()
    (root / "unified" / "cgroup.procs").write_text("")
    if memsw and "memory" in hierarchies:
        (root / "memory" / "omerta-jobs").mkdir()
        (root / "memory" / "omerta-jobs" / "memory.memsw.limit_in_bytes").write_text("")
    return root


def make_v2(root: Path, controllers="cpuset cpu io memory pids", swap=True) -> Path:
    """A directory imitating a pure cgroup v2 host."""
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.procs").write_text("")
    (root / "omerta-jobs").mkdir()
    if swap:
        (root / "omerta-jobs" / "memory.swap.max").write_text("max")
    return root


class FakeTransport:
    """What a spawned process looks like to its protocol."""

    pid = 4242

    def __init__(self):
        self.written: list[tuple[int, bytes]] = []
        self.closed: list[int] = []
        self.signals: list[str] = []

    def writeToChild(self, fd, data):
        self.written.append((fd, data))

    def closeChildFD(self, fd):
        self.closed.append(fd)

    def signalProcess(self, sig):
        self.signals.append(sig)


class ProcessClock(Clock):
    """A L{Clock} that also records C{spawnProcess} calls."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None, uid=None,
                     gid=None, usePTY=False, childFDs=None):
        transport = FakeTransport()
        self.spawned.append((protocol, list(args), env, childFDs, transport))
        protocol.makeConnection(transport)
        return transport


class FakeWorkDirs:
    """Work directories that only record what was asked."""

    def __init__(self):
        self.present: set[str] = set()
        self.inputs = {}
        self.outputs: dict[str, bytes] = {}

    def create(self, job_id, size_mb):
        self.present.add(job_id)
        return Path("/nowhere/jobs") / job_id / "work"

    def write_inputs(self, work, inputs):
        self.inputs[work.parent.name] = dict(inputs)

    def collect(self, work, outputs, max_bytes):
        found = {p: self.outputs[p] for p in outputs if p in self.outputs}
        missing = [p for p in outputs if p not in found]
        return found, missing, [f"Output {p!r} was not collected: absent." for p in missing]

    def remove(self, job_id):
        self.present.discard(job_id)

    def job_ids(self):
        return set(self.present)


class FakeRunner(SandboxRunner):
    """
    A L{SandboxRunner} on a fake host: root, tools present, signals
    recorded (a killed pid leaves every C{cgroup.procs} of the tree).
    """

    euid = 0
    stubborn = False   # killed processes stay listed

    def __init__(self, clock, cgroup_root, **kwargs):
        self.killed: list[tuple[int, int]] = []
        super().__init__(clock, Path("/nowhere/jobs"), cgroup_root=cgroup_root,
                         workdirs=FakeWorkDirs(), **kwargs)
        self.cgroup_root = cgroup_root

    def _kill_pid(self, pid, sig):
        self.killed.append((pid, sig))
        if self.stubborn:
            return
        for procs in self.cgroup_root.rglob("cgroup.procs"):
            words = procs.read_text().split()
            procs.write_text("".join(w + "\n" for w in words if w != str(pid)))

    def _host_problems(self):
        return host_problems(cgroups=self._cgroups, bwrap=self.bwrap, euid=self.euid,
                             which=lambda name, path=None: "/usr/bin/" + name)

    def _tools(self):
        return "/usr/bin/bwrap", "/usr/bin/setpriv"

    def _layout(self):
        return LAYOUT


def pairs(argv: list[str], option: str) -> list[tuple[str, str]]:
    """The (source, destination) of every C{option SRC DEST} in argv."""
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == option]


class ArgvTests(unittest.TestCase):
    """The bwrap and spawn command lines."""

    def argv(self, network=False, env=None):
        return bwrap_argv(bwrap="bwrap", argv=["python3", "-c", "print(6*7)"], env=env or {},
                          work_dir=Path("/var/lib/omerta/jobs/0123456789abcdef/work"),
                          network=network, layout=LAYOUT, tmp_bytes=2**20)

    def test_namespaces(self):
        """Every job gets new user, pid, ipc, uts and network namespaces, as uid 65534."""
        argv = self.argv()
        for flag in ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                     "--unshare-net", "--die-with-parent", "--new-session", "--clearenv"):
            self.assertIn(flag, argv)
        self.assertEqual(argv[argv.index("--uid") + 1], "65534")
        self.assertEqual(argv[argv.index("--gid") + 1], "65534")
        self.assertEqual(argv[-4:], ["--", "python3", "-c", "print(6*7)"])

    def test_network(self):
        """Network on: the job keeps the host's network namespace."""
        self.assertNotIn("--unshare-net", self.argv(network=True))

    def test_binds(self):
        """Only /usr and /etc are bound (read-only) and the work dir read-write at /work."""
        argv = self.argv()
        self.assertEqual(pairs(argv, "--ro-bind"), [("/usr", "/usr"), ("/etc", "/etc")])
        self.assertEqual(pairs(argv, "--bind"),
                         [("/var/lib/omerta/jobs/0123456789abcdef/work", "/work")])
        self.assertIn(("usr/bin", "/bin"), pairs(argv, "--symlink"))
        self.assertEqual(argv[argv.index("--chdir") + 1], "/work")
        for option in ("--proc", "--dev", "--tmpfs"):
            self.assertIn(option, argv)
        sources = [s for s, _ in pairs(argv, "--ro-bind") + pairs(argv, "--bind")]
        for hidden in ("/", "/root", "/home", "/var", "/var/lib/omerta",
                       "/var/lib/omerta/jobs"):
            self.assertNotIn(hidden, sources)

    def test_env(self):
        """The job's environment is built from scratch with --setenv, after --clearenv."""
        argv = self.argv(env={"PATH": "/opt/bin", "X": "1"})
        sets = pairs(argv, "--setenv")
        self.assertIn(("X", "1"), sets)
        self.assertEqual([v for k, v in sets if k == "PATH"][-1], "/opt/bin")
        self.assertLess(argv.index("--clearenv"), argv.index("--setenv"))

    def test_spawn_joins_cgroups_first(self):
        """The spawned shell joins each cgroup, then drops to uid 65534 and becomes bwrap."""
        procs = [Path("/sys/fs/cgroup/memory/omerta-jobs/a/cgroup.procs"),
                 Path("/sys/fs/cgroup/pids/omerta-jobs/a/cgroup.procs")]
        argv = spawn_argv(procs_files=procs, setpriv="/usr/bin/setpriv", bwrap_args=["bwrap"])
        self.assertEqual(argv[:2], ["/bin/sh", "-c"])
        script = argv[2]
        for path in procs:
            self.assertIn(str(path), script)
        self.assertTrue(script.endswith('exec "$@"'))
        self.assertEqual(argv[4], "/usr/bin/setpriv")
        self.assertIn(f"--reuid={JOB_UID}", argv)
        self.assertIn("--clear-groups", argv)
        self.assertEqual(argv[-2:], ["--", "bwrap"])


class CgroupTests(unittest.TestCase):
    """Cgroup files written and read, against imitation trees."""

    def test_v1_limits(self):
        """v1: memory (and memsw), CFS quota and pids.max are written per job."""
        root = make_v1(Path(self.mktemp()))
        host = CgroupHost(root)
        self.assertEqual(host.version, "v1")
        group = host.create("0123456789abcdef", memory_mb=64, cpu=1.5, pids=32)
        mem = root / "memory" / "omerta-jobs" / "0123456789abcdef"
        cpu = root / "cpu,cpuacct" / "omerta-jobs" / "0123456789abcdef"
        pids = root / "pids" / "omerta-jobs" / "0123456789abcdef"
        self.assertEqual((mem / "memory.limit_in_bytes").read_text(), str(64 * 2**20))
        self.assertEqual((mem / "memory.memsw.limit_in_bytes").read_text(), str(64 * 2**20))
        self.assertEqual((cpu / "cpu.cfs_period_us").read_text(), "100000")
        self.assertEqual((cpu / "cpu.cfs_quota_us").read_text(), "150000")
        self.assertEqual((pids / "pids.max").read_text(), "32")
        self.assertEqual(sorted(group.procs_files),
                         sorted(d / "cgroup.procs" for d in (mem, cpu, pids)))
        self.assertEqual(host.enforced, {"memory", "cpu", "pids"})
        self.assertEqual(host.problems, [])
        self.assertTrue(group.remove())
        self.assertFalse(mem.exists())

    def test_v1_no_swap_accounting(self):
        """v1 without memsw: only the memory limit is written, and the gap is reported."""
        root = make_v1(Path(self.mktemp()), memsw=False)
        host = CgroupHost(root)
        host.create("0123456789abcdef", memory_mb=64, cpu=1, pids=32)
        mem = root / "memory" / "omerta-jobs" / "0123456789abcdef"
        self.assertFalse((mem / "memory.memsw.limit_in_bytes").exists())
        self.assertIn("swap", " ".join(host.problems))

    def test_v1_stats(self):
        """v1: OOM kills from memory.oom_control, CPU from cpuacct.usage, peak memory."""
        root = make_v1(Path(self.mktemp()), hierarchies=("memory", "cpu", "cpuacct", "pids"))
        group = CgroupHost(root).create("0123456789abcdef", memory_mb=64, cpu=1, pids=32)
        mem = root / "memory" / "omerta-jobs" / "0123456789abcdef"
        (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        (mem / "memory.max_usage_in_bytes").write_text(str(3 * 2**20))
        acct = root / "cpuacct" / "omerta-jobs" / "0123456789abcdef"
        (acct / "cpuacct.usage").write_text("2500000000\n")
        self.assertEqual(group.oom_kills(), 2)
        self.assertEqual(group.cpu_seconds(), 2.5)
        self.assertEqual(group.peak_memory_mb(), 3.0)
        self.assertEqual(len(group.procs_files), 4)

    def test_v1_failcnt_fallback(self):
        """v1 on a kernel without the oom_kill line: a non-zero failcnt counts."""
        root = make_v1(Path(self.mktemp()))
        group = CgroupHost(root).create("0123456789abcdef", memory_mb=64, cpu=1, pids=32)
        mem = root / "memory" / "omerta-jobs" / "0123456789abcdef"
        (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
        (mem / "memory.failcnt").write_text("7\n")
        self.assertEqual(group.oom_kills(), 1)

    def test_v1_kill_repeats(self):
        """v1: every listed pid gets SIGKILL, again for pids that appear meanwhile."""
        root = make_v1(Path(self.mktemp()))
        killed = []
        procs = root / "memory" / "omerta-jobs" / "0123456789abcdef" / "cgroup.procs"

        def kill(pid, sig):
            killed.append((pid, sig))
            if pid == 11:   # 11 forked 13 as it died
                procs.write_text("12\n13\n")
            else:
                procs.write_text("\n".join(str(p) for p in (12, 13) if p != pid
                                           and (p, sig) not in killed))

        group = CgroupHost(root, kill=kill).create("0123456789abcdef", memory_mb=64, cpu=1,
                                                   pids=32)
        procs.write_text("11\n12\n")
        self.assertTrue(group.kill())
        self.assertEqual(sorted(killed), [(11, signal.SIGKILL), (12, signal.SIGKILL),
                                          (13, signal.SIGKILL)])

    def test_v2_limits(self):
        """v2: controllers enabled for the parent, memory.max, swap.max=0, cpu.max, pids.max."""
        root = make_v2(Path(self.mktemp()))
        (root / "omerta-jobs" / "memory.oom.group").write_text("0")
        host = CgroupHost(root)
        self.assertEqual(host.version, "v2")
        group = host.create("0123456789abcdef", memory_mb=64, cpu=0.5, pids=32)
        job = root / "omerta-jobs" / "0123456789abcdef"
        self.assertEqual((root / "cgroup.subtree_control").read_text(), "+memory +cpu +pids")
        self.assertEqual((root / "omerta-jobs" / "cgroup.subtree_control").read_text(),
                         "+memory +cpu +pids")
        self.assertEqual((job / "memory.max").read_text(), str(64 * 2**20))
        self.assertEqual((job / "memory.swap.max").read_text(), "0")
        self.assertEqual((job / "cpu.max").read_text(), "50000 100000")
        self.assertEqual((job / "pids.max").read_text(), "32")
        self.assertEqual((job / "memory.oom.group").read_text(), "1")
        self.assertEqual(group.procs_files, [job / "cgroup.procs"])
        self.assertEqual(host.enforced, {"memory", "cpu", "pids"})

    def test_v2_stats_and_kill(self):
        """v2: OOM kills from memory.events, CPU from cpu.stat, cgroup.kill written."""
        root = make_v2(Path(self.mktemp()))
        group = CgroupHost(root, kill=lambda pid, sig: None).create(
            "0123456789abcdef", memory_mb=64, cpu=1, pids=32)
        job = root / "omerta-jobs" / "0123456789abcdef"
        (job / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
        (job / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
        (job / "memory.peak").write_text(str(10 * 2**20))
        (job / "cgroup.kill").write_text("")
        self.assertEqual(group.oom_kills(), 1)
        self.assertEqual(group.cpu_seconds(), 1.5)
        self.assertEqual(group.peak_memory_mb(), 10.0)
        self.assertTrue(group.kill())
        self.assertEqual((job / "cgroup.kill").read_text(), "1")

    def test_v2_missing_controllers(self):
        """v2 without memory and pids controllers: only cpu is enforced, the rest reported."""
        root = make_v2(Path(self.mktemp()), controllers="cpu io", swap=False)
        host = CgroupHost(root)
        host.prepare()
        self.assertEqual(host.enforced, {"cpu"})
        text = " ".join(host.problems)
        self.assertIn("memory controller", text)
        self.assertIn("pids controller", text)

    def test_hybrid_is_v1(self):
        """A hybrid host (v1 controllers plus an empty unified hierarchy) is v1."""
        root = make_v1(Path(self.mktemp()))
        (root / "unified" / "cgroup.controllers").write_text("")
        self.assertEqual(CgroupHost(root).version, "v1")

    def test_none(self):
        """No cgroups at all: version None and a problem."""
        root = Path(self.mktemp())
        root.mkdir()
        host = CgroupHost(root)
        self.assertIsNone(host.version)
        self.assertIn("no cgroup controllers", host.prepare()[0])


class DescribeTests(unittest.TestCase):
    """describe() and sandbox_problem() say what is really enforced."""

    def test_interface(self):
        """SandboxRunner provides IJobRunner."""
        runner = FakeRunner(ProcessClock(), make_v1(Path(self.mktemp())))
        verifyObject(IJobRunner, runner)
        self.assertEqual(runner.kind, "sandbox")

    def test_all_enforced(self):
        """A full v1 host enforces everything."""
        info = FakeRunner(ProcessClock(), make_v1(Path(self.mktemp()))).describe()
        self.assertEqual(info["kind"], "sandbox")
        self.assertEqual(info["cgroup"], "v1")
        self.assertEqual(info["enforced"],
                         ["memory", "cpu", "pids", "timeout", "network", "work_size"])
        self.assertEqual(info["not_enforced"], [])
        self.assertEqual(info["problems"], [])

    def test_missing_pids(self):
        """Without a pids hierarchy, pids is not enforced and the problem says so."""
        root = make_v1(Path(self.mktemp()), hierarchies=("memory", "cpu,cpuacct"))
        info = FakeRunner(ProcessClock(), root).describe()
        self.assertEqual(info["not_enforced"], ["pids"])
        self.assertIn("pids", " ".join(info["problems"]))

    def test_missing_memory(self):
        """Without a memory controller nothing is enforced and run() fails saying why."""
        clock = ProcessClock()
        runner = FakeRunner(clock, make_v2(Path(self.mktemp()), controllers="cpu pids"))
        info = runner.describe()
        self.assertIn("memory", info["not_enforced"])
        self.assertEqual(info["enforced"], [])
        self.assertIn("memory controller", info["problems"][0])
        result = self.successResultOf(runner.run(request(), lambda *a: None).done)
        self.assertEqual(result.reason, "failed")
        self.assertIn("memory controller", result.detail)
        self.assertEqual(clock.spawned, [])

    def test_not_root(self):
        """Not root: nothing is enforced and the first problem says root is needed."""
        runner = FakeRunner(ProcessClock(), make_v1(Path(self.mktemp())))
        runner.euid = 1000
        info = runner.describe()
        self.assertEqual(info["enforced"], [])
        self.assertIn("root", info["problems"][0])

    def test_sandbox_problem_missing_bwrap(self):
        """sandbox_problem() names a missing bwrap binary."""
        root = make_v1(Path(self.mktemp()))
        problems = host_problems(cgroups=CgroupHost(root), bwrap="no-such-bwrap-binary",
                                 euid=0)
        self.assertIn("bubblewrap", " ".join(problems))
        self.assertIsNotNone(sandbox_problem(cgroup_root=root, bwrap="no-such-bwrap-binary"))

    def test_unreachable_base_dir(self):
        """A base_dir the job user cannot reach (under a 0700 directory) is a problem."""
        top = Path(self.mktemp())
        top.mkdir()
        os.chmod(top, 0o600)   # searchable by nobody, whoever owns it
        self.addCleanup(os.chmod, top, 0o700)
        problems = host_problems(cgroups=CgroupHost(make_v1(Path(self.mktemp()))),
                                 bwrap="bwrap", base_dir=top / "jobs", euid=0,
                                 which=lambda name, path=None: name)
        self.assertEqual(len(problems), 1)
        self.assertIn("cannot reach base_dir", problems[0])


class ValidationTests(unittest.TestCase):
    """Malformed requests raise ValueError before anything starts."""

    def setUp(self):
        self.clock = ProcessClock()
        self.runner = FakeRunner(self.clock, make_v1(Path(self.mktemp())))

    def rejects(self, text, **kwargs):
        error = self.assertRaises(ValueError, self.runner.run, request(**kwargs),
                                  lambda *a: None)
        self.assertIn(text, str(error))
        self.assertEqual(self.clock.spawned, [])
        self.assertEqual(self.runner._workdirs.present, set())

    def test_job_id(self):
        """A job id must be 16 lowercase hex digits."""
        self.rejects("16 lowercase", job_id="0123456789ABCDEF")
        self.rejects("16 lowercase", job_id="../../etc")

    def test_argv(self):
        """An empty argv, or an empty command, is refused."""
        self.rejects("non-empty", argv=[])
        self.rejects("argv[0]", argv=[""])

    def test_paths(self):
        """Absolute and '..' input and output paths are refused."""
        self.rejects("relative", inputs={"/etc/passwd": b""})
        self.rejects("'..'", inputs={"a/../../x": b""})
        self.rejects("relative", outputs=["/etc/shadow"])
        self.rejects("'..'", outputs=["../x"])
        self.rejects("work directory itself", outputs=["."])

    def test_inputs_too_big(self):
        """Inputs larger than the work directory are refused."""
        self.rejects("work directory holds", limits=Limits(work_mb=1),
                     inputs={"a": b"x" * (2**20 + 1)})

    def test_env_and_limits(self):
        """Bad environment names and non-positive limits are refused."""
        self.rejects("environment variable", env={"A=B": "1"})
        self.rejects("limit memory_mb", limits=Limits(memory_mb=0))

    def test_valid(self):
        """A well-formed request passes."""
        validate_request(request(inputs={"in/a.txt": b"x"}, outputs=["out/b.txt"]))


class JobLifeTests(unittest.TestCase):
    """One job's life on a Clock: spawn, output, timeout, cancel, end, cleanup."""

    def setUp(self):
        self.clock = ProcessClock()
        self.root = make_v1(Path(self.mktemp()))
        self.runner = FakeRunner(self.clock, self.root)
        self.output = []

    def start(self, **kwargs):
        req = request(**kwargs)
        job = self.runner.run(req, lambda name, data: self.output.append((name, data)))
        protocol, args, env, fds, transport = self.clock.spawned[-1]
        for group in self.root.glob(f"*/omerta-jobs/{self.runner._group(req.job_id)}"):
            (group / "cgroup.procs").write_text("4242\n4243\n")
        return req, job, protocol, args, transport

    def started(self, protocol):
        protocol.childDataReceived(3, b'{ "child-pid": 4243 }\n')

    def test_spawn(self):
        """The job is spawned through the cgroup-joining shell with stdin written and closed."""
        req, job, protocol, args, transport = self.start(stdin=b"data", inputs={"a": b"1"})
        self.assertEqual(args[:2], ["/bin/sh", "-c"])
        self.assertIn(f"memory/omerta-jobs/{self.runner._group(req.job_id)}/cgroup.procs", args[2])
        self.assertIn("--unshare-net", args)
        self.assertEqual(transport.written, [(0, b"data")])
        self.assertEqual(transport.closed, [0])
        self.assertEqual(job.pid, 4242)
        self.assertEqual(self.runner._workdirs.inputs[req.job_id], {"a": b"1"})
        self.assertEqual(self.clock.spawned[-1][3][3], "r")
        self.assertEqual(self.clock.spawned[-1][2], {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                     "LC_ALL": "C"})

    def test_network_needs_both(self):
        """The job keeps the network only if the request asks and the runner allows."""
        self.start(limits=Limits(network=True))
        self.assertIn("--unshare-net", self.clock.spawned[-1][1])
        self.runner.allow_network = True
        self.start(limits=Limits(network=False))
        self.assertIn("--unshare-net", self.clock.spawned[-1][1])
        self.start(limits=Limits(network=True))
        self.assertNotIn("--unshare-net", self.clock.spawned[-1][1])

    def test_exit(self):
        """Output is streamed; the exit status, CPU and outputs are reported; all is removed."""
        req, job, protocol, args, transport = self.start(outputs=["r.txt", "gone.txt"])
        self.runner._workdirs.outputs["r.txt"] = b"result"
        self.started(protocol)
        protocol.childDataReceived(1, b"out")
        protocol.childDataReceived(2, b"err")
        self.assertEqual(self.output, [("stdout", b"out"), ("stderr", b"err")])
        (self.root / "cpu,cpuacct" / "omerta-jobs" / self.runner._group(req.job_id) / "cpuacct.usage").write_text(
            "1000000000")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=3)))
        result = self.successResultOf(job.done)
        self.assertEqual((result.reason, result.exit_code), ("exited", 3))
        self.assertEqual(result.outputs, {"r.txt": b"result"})
        self.assertEqual(result.missing_outputs, ["gone.txt"])
        self.assertIn("gone.txt", result.detail)
        self.assertEqual(result.cpu_s, 1.0)
        self.assertEqual(list(self.root.glob(f"*/omerta-jobs/{self.runner._group(req.job_id)}")), [])
        self.assertEqual(self.runner._workdirs.present, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_signal_exit(self):
        """A job ended by a signal reports 128 + the signal number."""
        req, job, protocol, args, transport = self.start()
        self.started(protocol)
        protocol.processEnded(Failure(ProcessTerminated(signal=15)))
        result = self.successResultOf(job.done)
        self.assertEqual((result.reason, result.exit_code), ("exited", 143))

    def test_timeout(self):
        """After timeout_s every process of the cgroup is killed and the reason is timeout."""
        req, job, protocol, args, transport = self.start(limits=Limits(timeout_s=5))
        self.started(protocol)
        self.clock.advance(4.9)
        self.assertEqual(self.runner.killed, [])
        self.clock.advance(0.1)
        self.assertEqual(sorted(self.runner.killed),
                         [(4242, signal.SIGKILL), (4243, signal.SIGKILL)])
        self.assertEqual(transport.signals, ["KILL"])
        self.assertNoResult(job.done)
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        result = self.successResultOf(job.done)
        self.assertEqual((result.reason, result.exit_code), ("timeout", None))
        self.assertIn("5 s", result.detail)
        self.assertEqual(list(self.root.glob(f"*/omerta-jobs/{self.runner._group(req.job_id)}")), [])

    def test_cancel(self):
        """cancel() kills the tree and reports cancelled; a later cancel does nothing."""
        req, job, protocol, args, transport = self.start()
        self.started(protocol)
        job.cancel()
        self.assertEqual(len(self.runner.killed), 2)
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.successResultOf(job.done).reason, "cancelled")
        job.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_for_empty_cgroup(self):
        """The result waits until the cgroup is empty, killing what is left, on the clock."""
        req, job, protocol, args, transport = self.start()
        self.started(protocol)
        self.runner.stubborn = True
        protocol.processEnded(Failure(ProcessDone(0)))
        self.clock.advance(0.02)
        self.assertNoResult(job.done)
        for procs in self.root.rglob("cgroup.procs"):
            procs.write_text("")
        self.clock.advance(0.02)
        self.assertEqual(self.successResultOf(job.done).reason, "exited")

    def test_memory(self):
        """An OOM kill counted in the cgroup makes the reason memory."""
        req, job, protocol, args, transport = self.start(limits=Limits(memory_mb=64))
        self.started(protocol)
        (self.root / "memory" / "omerta-jobs" / self.runner._group(req.job_id) / "memory.oom_control").write_text(
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=137)))
        result = self.successResultOf(job.done)
        self.assertEqual((result.reason, result.exit_code), ("memory", 137))
        self.assertIn("64 MB", result.detail)

    def test_start_failure(self):
        """A sandbox that never started is failed, with bwrap's message as the detail."""
        req, job, protocol, args, transport = self.start()
        protocol.childDataReceived(2, b"sh: 1: cannot create x: Permission denied\n")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=125)))
        result = self.successResultOf(job.done)
        self.assertEqual(result.reason, "failed")
        self.assertIn("Permission denied", result.detail)

    def test_command_not_found(self):
        """A command missing in the sandbox is failed, naming the command."""
        req, job, protocol, args, transport = self.start(argv=["nosuch"])
        self.started(protocol)
        protocol.childDataReceived(2, b"bwrap: execvp nosuch: No such file or directory\n")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        result = self.successResultOf(job.done)
        self.assertEqual(result.reason, "failed")
        self.assertIn("'nosuch'", result.detail)

    def test_spawn_error_cleans_up(self):
        """When spawning raises, the cgroups and the work directory are removed."""
        def broken(*args, **kwargs):
            raise OSError(2, "No such file or directory")
        self.clock.spawnProcess = broken
        req = request()
        result = self.successResultOf(self.runner.run(req, lambda *a: None).done)
        self.assertEqual(result.reason, "failed")
        self.assertEqual(list(self.root.glob(f"*/omerta-jobs/{self.runner._group(req.job_id)}")), [])
        self.assertEqual(self.runner._workdirs.present, set())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_cleanup_stale(self):
        """cleanup_stale kills what is left in old job cgroups and removes them and work dirs."""
        stale = "00000000000000aa"
        others = "ffffffff-00000000000000cc"  # another runner's (another base_dir)
        for hierarchy in ("memory", "cpu,cpuacct", "pids"):
            for group, pid in ((self.runner._group(stale), "77"), (others, "88")):
                (self.root / hierarchy / "omerta-jobs" / group).mkdir(parents=True)
                (self.root / hierarchy / "omerta-jobs" / group / "cgroup.procs").write_text(
                    pid + "\n")
        self.runner._workdirs.present.add("00000000000000bb")
        result = self.successResultOf(self.runner.cleanup_stale())
        self.assertEqual(result, ["00000000000000aa", "00000000000000bb"])
        self.assertEqual(self.runner.killed, [(77, signal.SIGKILL)])
        self.assertEqual({p.name for p in self.root.glob("*/omerta-jobs/*") if p.is_dir()},
                         {others})
        self.assertEqual(self.runner._workdirs.present, set())


class CollectTests(unittest.TestCase):
    """Outputs are read without following the job's links (no root needed)."""

    def test_collect(self):
        """Regular files are read; links, FIFOs, big and absent files are missing."""
        work = Path(self.mktemp())
        (work / "out").mkdir(parents=True)
        (work / "out" / "a.txt").write_bytes(b"A")
        (work / "big").write_bytes(b"x" * 11)
        os.symlink("/etc/passwd", work / "link")
        os.symlink("/etc", work / "dirlink")
        os.mkfifo(work / "fifo")
        found, missing, why = WorkDirs(work.parent).collect(
            work, ["out/a.txt", "big", "link", "dirlink/passwd", "fifo", "none"], 10)
        self.assertEqual(found, {"out/a.txt": b"A"})
        self.assertEqual(missing, ["big", "link", "dirlink/passwd", "fifo", "none"])
        self.assertIn("bigger than the 10 bytes", " ".join(why))


# -- integration ----------------------------------------------------------------

def marker_processes(marker: str) -> list[int]:
    """The pids of the processes running C{sleep <marker>}."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == f"sleep\0{marker}\0".encode():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


class SandboxIntegrationTests(unittest.TestCase):
    """Real jobs in bubblewrap (root, bwrap and a memory controller needed)."""

    timeout = 60

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("the sandbox needs root (to mount work directories, "
                                    "manage cgroups and drop to uid 65534)")
        if shutil.which("bwrap") is None:
            raise unittest.SkipTest("bubblewrap is not installed (apt-get install bubblewrap)")
        self.top = Path(tempfile.mkdtemp(prefix="omerta-sandbox-test-"))
        os.chmod(self.top, 0o711)
        self.addCleanup(shutil.rmtree, self.top, True)
        self.secret = self.top / "secret.txt"
        self.secret.write_text("the provider's secret\n")
        os.chmod(self.secret, 0o644)
        self.runner = self.make_runner()

    def make_runner(self, **kwargs):
        runner = SandboxRunner(reactor, self.top / "jobs", **kwargs)
        self.addCleanup(runner.cleanup_stale)
        return runner

    def run_job(self, argv, runner=None, **kwargs):
        """Run a job; a Deferred of (result, stdout, stderr), failing after 30 s."""
        limits = kwargs.pop("limits", Limits(timeout_s=20))
        out = {"stdout": b"", "stderr": b""}

        def on_output(name, data):
            out[name] += data

        req = request(argv=argv, limits=limits, **kwargs)
        job = (runner or self.runner).run(req, on_output)
        self.addCleanup(lambda: (job.cancel(), job.done)[1])
        d = job.done.addTimeout(30, reactor)
        d.addCallback(lambda result: (result, out["stdout"], out["stderr"]))
        d.job, d.request, d.out = job, req, out
        return d

    def wait_for_output(self, d, text: bytes):
        """A Deferred firing once the job's stdout holds C{text} (failing after 20 s)."""
        ready = defer.Deferred()

        def look():
            if text in d.out["stdout"]:
                ready.callback(None)
            elif d.called:
                ready.errback(AssertionError(f"job ended without printing {text!r}"))
            else:
                reactor.callLater(0.02, look)

        look()
        return ready.addTimeout(20, reactor)

    def assert_gone(self, req, marker):
        self.assertEqual(marker_processes(marker), [])
        self.assertEqual(list(Path("/sys/fs/cgroup").glob(f"*/omerta-jobs/*-{req.job_id}")) +
                         list(Path("/sys/fs/cgroup").glob(f"omerta-jobs/*-{req.job_id}")), [])
        self.assertFalse((self.top / "jobs" / req.job_id).exists())

    @defer.inlineCallbacks
    def test_prints_42(self):
        """python3 -c 'print(6*7)' prints 42 and exits 0, as uid 65534 with CPU accounted."""
        result, out, err = yield self.run_job(["python3", "-c", "print(6*7)"])
        self.assertEqual((result.reason, result.exit_code, out), ("exited", 0, b"42\n"))
        self.assertIsNotNone(result.cpu_s)
        result, out, err = yield self.run_job(["id", "-u"])
        self.assertEqual(out, b"65534\n")

    @defer.inlineCallbacks
    def test_exit_code_and_streams(self):
        """The exit status comes back, stdout and stderr arrive apart, stdin goes in."""
        result, out, err = yield self.run_job(
            ["sh", "-c", "cat; echo to-err >&2; exit 3"], stdin=b"to-out\n")
        self.assertEqual((result.reason, result.exit_code), ("exited", 3))
        self.assertEqual((out, err), (b"to-out\n", b"to-err\n"))

    @defer.inlineCallbacks
    def test_timeout_kills_tree(self):
        """A forking job is killed whole after its timeout; no process or cgroup is left."""
        marker = f"1000.{secrets.randbelow(10**6)}"
        d = self.run_job(["sh", "-c", f"sleep {marker} & sleep {marker} & echo up; wait"],
                         limits=Limits(timeout_s=1))
        result, out, err = yield d
        self.assertEqual(out, b"up\n")
        self.assertEqual(result.reason, "timeout")
        self.assert_gone(d.request, marker)

    @defer.inlineCallbacks
    def test_cancel(self):
        """cancel() kills a forking job whole; reason cancelled; nothing left."""
        marker = f"1000.{secrets.randbelow(10**6)}"
        d = self.run_job(["sh", "-c", f"sleep {marker} & sleep {marker} & echo up; wait"])
        yield self.wait_for_output(d, b"up")
        self.assertEqual(len(marker_processes(marker)), 2)
        d.job.cancel()
        result, out, err = yield d
        self.assertEqual(result.reason, "cancelled")
        self.assert_gone(d.request, marker)

    @defer.inlineCallbacks
    def test_memory(self):
        """A job allocating 400 MB with memory_mb=64 is OOM-killed: reason memory."""
        result, out, err = yield self.run_job(
            ["python3", "-c", "b = bytearray(400 * 2**20)"],
            limits=Limits(memory_mb=64, timeout_s=20))
        self.assertEqual(result.reason, "memory", result.detail)
        self.assertLessEqual(result.peak_memory_mb, 64.0)

    @defer.inlineCallbacks
    def test_files_outside_invisible(self):
        """The provider's files, /root, /home, /var and the jobs directory are not visible."""
        paths = [str(self.secret), str(self.top), str(self.top / "jobs"), "/root", "/home",
                 "/var"]
        result, out, err = yield self.run_job(
            ["sh", "-c", 'for p; do test -e "$p" && echo "visible $p"; done; '
             "cat /etc/shadow; true", "sh", *paths])
        self.assertEqual(out, b"")
        self.assertIn(b"Permission denied", err)

    @defer.inlineCallbacks
    def test_no_network(self):
        """No network by default: a host port on 127.0.0.1 cannot be reached; allowed, it can."""
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        connect = ["python3", "-c", "import socket, sys; "
                   f"socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), 5)"]
        result, out, err = yield self.run_job(connect, limits=Limits(network=True))
        self.assertEqual(result.reason, "exited")
        self.assertNotEqual(result.exit_code, 0)
        self.assertIn(b"ConnectionRefusedError", err)
        open_runner = self.make_runner(allow_network=True)
        result, out, err = yield self.run_job(connect, runner=open_runner,
                                              limits=Limits(network=True))
        self.assertEqual(result.exit_code, 0, err)

    @defer.inlineCallbacks
    def test_jobs_isolated(self):
        """A job sees neither another running job's files nor its processes."""
        first = self.run_job(["sh", "-c", "echo first-secret > a.txt; echo up; sleep 30"])
        yield self.wait_for_output(first, b"up")
        other = self.top / "jobs" / first.request.job_id / "work" / "a.txt"
        self.assertTrue(os.path.exists(other))
        result, out, err = yield self.run_job(
            ["sh", "-c", f"ps -e -o comm=; cat {other}; ls -a /work"])
        self.assertNotIn(b"sleep", out)
        self.assertNotIn(b"first-secret", out)
        self.assertEqual(sorted(out.split()), sorted([b"bwrap", b"sh", b"ps", b".", b".."]))
        first.job.cancel()
        yield first

    @defer.inlineCallbacks
    def test_inputs_and_outputs(self):
        """Inputs are written before the start; outputs are collected after the end."""
        result, out, err = yield self.run_job(
            ["sh", "-c", "mkdir out && tr a-z A-Z < in/text > out/text && ln -s /etc/passwd l"],
            inputs={"in/text": b"abc"}, outputs=["out/text", "l", "absent"])
        self.assertEqual(result.exit_code, 0, err)
        self.assertEqual(result.outputs, {"out/text": b"ABC"})
        self.assertEqual(result.missing_outputs, ["l", "absent"])

    @defer.inlineCallbacks
    def test_work_size(self):
        """A file bigger than work_mb cannot be written (and /tmp is bounded too)."""
        result, out, err = yield self.run_job(
            ["sh", "-c", "head -c 16777216 /dev/zero > big; echo $?; "
             "head -c 16777216 /dev/zero > /tmp/big; echo $?; exit 0"],
            limits=Limits(work_mb=8, timeout_s=20))
        self.assertEqual(out, b"1\n1\n")
        self.assertIn(b"No space left on device", err)

    @defer.inlineCallbacks
    def test_cleanup_stale(self):
        """A second runner's cleanup_stale ends a job left by the first and removes its traces."""
        marker = f"1000.{secrets.randbelow(10**6)}"
        d = self.run_job(["sh", "-c", f"sleep {marker} & echo up; wait"])
        yield self.wait_for_output(d, b"up")
        cleaned = yield self.make_runner().cleanup_stale()
        self.assertIn(d.request.job_id, cleaned)
        yield d
        self.assert_gone(d.request, marker)
