"""
omerta job submit|status|logs|cancel|list|fetch against real twistd
processes on loopback: a relay, and a provider that runs jobs in its
bubblewrap sandbox; the command runs as a separate process each time.
Needs root and bubblewrap (CI has both: scripts/setup-env installs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from omerta.app.provider_tap import sandbox_dir
from omerta.jobs.sandbox import sandbox_problem
from tests.integration import (REPO, Daemon, environment, free_udp_port, loopback_relay,
                               wait_for)
from tests.test_cli_mesh import _MAIN

SCRIPT = """\
import os, sys
data = open("data.txt").read()
os.makedirs("out", exist_ok=True)
open("out/report.txt", "w").write(data.upper())
print("read", len(data), "bytes")
print("a warning", file=sys.stderr)
sys.exit(3)
"""


def _remove_if_empty(directory: Path) -> None:
    """The provider's sandbox directory under /run, once its jobs left nothing."""
    try:
        directory.rmdir()
    except OSError:
        pass


def omerta(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-c", _MAIN, *args], capture_output=True, text=True,
                          env=environment(), cwd=REPO, timeout=timeout)


class JobCommandTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        problem = sandbox_problem()
        if problem is not None:
            raise unittest.SkipTest(f"jobs run in the sandbox, which cannot work here: {problem}")
        base = os.path.abspath(self.mktemp())
        self.base = base
        self.relay, self.relay_port, self.network = loopback_relay(self, base, "jobs")
        self.provider = Daemon(self, "omerta-provider", f"{base}/provider",
                               "--name", "provider-1", "--interface", "127.0.0.1",
                               "--port", str(free_udp_port()), "--nat-interval", "0",
                               "--invite", self.network.invite, "--vm-cpus", "2",
                               "--vm-memory", "1024", "--no-tunnels")
        self.addCleanup(_remove_if_empty, sandbox_dir(f"{base}/provider"))
        self.consumer = f"{base}/consumer"
        joined = omerta("--data-dir", self.consumer, "network", "join", "--key",
                        self.network.invite)
        self.assertEqual(joined.returncode, 0, joined.stderr)
        return ensureDeferred(wait_for(
            lambda: "provider-1" in self._online(self.relay), 30, "the relay to see the provider",
            describe=self.describe))

    def _online(self, daemon) -> set:
        return {p["name"] for p in daemon.status().get("peers", []) if p["state"] == "online"}

    def describe(self) -> str:
        return f"relay log:\n{self.relay.output()}\nprovider log:\n{self.provider.output()}"

    def job(self, *args: str, data_dir: str | None = None) -> subprocess.CompletedProcess:
        command, rest = args[0], args[1:]
        flag = "--mesh-timeout" if command == "submit" else "--timeout"
        return omerta("--data-dir", data_dir or self.consumer, "job", command,
                      "--bootstrap", f"relay@127.0.0.1:{self.relay_port}", flag, "30", *rest)

    def json_of(self, result: subprocess.CompletedProcess) -> dict:
        self.assertEqual(result.returncode, 0, result.stderr + self.describe())
        return json.loads(result.stdout)

    def test_submit_and_wait_prints_the_output_and_exits_with_its_code(self):
        result = self.job("submit", "--peer", "provider-1", "--wait", "--",
                          "python3", "-c", "print(6*7)")
        self.assertEqual((result.returncode, result.stdout), (0, "42\n"),
                         result.stderr + self.describe())

    def test_a_script_with_inputs_outputs_and_a_failing_exit(self):
        script = Path(self.base) / "job.py"
        script.write_text(SCRIPT)
        data = Path(self.base) / "local-data.txt"
        data.write_text("hello jobs\n")
        result = self.job("submit", "--peer", "provider-1", "--wait", "--script", str(script),
                          "--input", f"{data}:data.txt", "--output-file", "out/report.txt",
                          "--cpu", "0.5", "--memory", "128", "--timeout", "60")
        self.assertEqual(result.returncode, 3, result.stderr + self.describe())
        self.assertEqual(result.stdout, "read 11 bytes\n")
        self.assertIn("a warning", result.stderr)
        listed = self.json_of(self.job("list", "--output", "json"))["jobs"]
        (job,) = listed
        self.assertEqual((job["state"], job["exit_code"], job["provider_name"]),
                         ("exited", 3, "provider-1"))
        status = self.json_of(self.job("status", job["job_id"][:8], "--output", "json"))
        self.assertEqual(status["outputs"], [{"path": "out/report.txt", "size": 11,
                                              "present": True}])
        self.assertEqual((status["cpu"], status["memory_mb"], status["timeout_s"]),
                         (0.5, 128, 60))
        fetched = self.json_of(self.job("fetch", job["job_id"], "--dir", self.base,
                                        "--output", "json"))
        (written,) = fetched["files"]
        self.assertEqual(Path(written["file"]).read_text(), "HELLO JOBS\n")
        logs = self.job("logs", job["job_id"])
        self.assertEqual(logs.stdout, "read 11 bytes\n")
        # the user's own failure does not count against the provider
        scores = json.loads((Path(self.consumer) / "consumer.json").read_text())["providers"]
        (score,) = scores.values()
        self.assertEqual(score["failures"], 0, score)

    def test_timeout_and_cancel_kill_the_whole_tree(self):
        marker = f"omerta-e2e-{os.getpid()}-{int(time.time())}"
        result = self.job("submit", "--peer", "provider-1", "--wait", "--timeout", "2", "--",
                          "sh", "-c", f"sleep 300 & sleep 301 & echo {marker}; wait")
        self.assertEqual(result.returncode, 124, result.stderr + self.describe())
        self.assertEqual(result.stdout, f"{marker}\n")
        submitted = self.json_of(self.job("submit", "--peer", "provider-1", "--output", "json",
                                          "--", "sh", "-c", "sleep 302 & sleep 303; wait"))
        job_id = submitted["job_id"]
        cancelled = self.json_of(self.job("cancel", job_id, "--output", "json"))
        self.assertIn(cancelled["state"], ("running", "cancelled"))

        async def check():
            await wait_for(lambda: self.json_of(self.job("status", job_id, "--output", "json"))
                           ["state"] == "cancelled", 30, "the job to end cancelled")
            left = subprocess.run(["pgrep", "-f", "sleep 30[0-3]"], capture_output=True,
                                  text=True).stdout.split()
            self.assertEqual(left, [], "processes of the jobs were left behind")

        return ensureDeferred(check())

    def test_a_provider_killed_mid_job_reports_it_lost(self):
        submitted = self.json_of(self.job("submit", "--peer", "provider-1", "--output", "json",
                                          "--", "sh", "-c", "echo started; sleep 304"))
        job_id = submitted["job_id"]

        async def check():
            await wait_for(lambda: "started" in self.job("logs", job_id).stdout, 30,
                           "the job to print", describe=self.describe)
            self.provider.stop(signal.SIGKILL)
            self.provider.start()
            await wait_for(lambda: self.job("status", job_id, "--output", "json").returncode == 0,
                           60, "the restarted provider to answer", describe=self.describe)
            status = self.json_of(self.job("status", job_id, "--output", "json"))
            self.assertEqual(status["state"], "lost")
            self.assertIn("restarted while the job was running", status["detail"])
            left = subprocess.run(["pgrep", "-f", "sleep 304"], capture_output=True,
                                  text=True).stdout.split()
            self.assertEqual(left, [], "the killed provider's job was left running")
            # a job the provider lost counts against it
            scores = json.loads((Path(self.consumer) / "consumer.json").read_text())
            (score,) = scores["providers"].values()
            self.assertEqual(score["failures"], 1, score)

        return ensureDeferred(check())

    def test_through_the_running_node(self):
        """
        With the consumer's node up, the commands go through its control
        API: the job is the node's; a job of the short-lived command node
        is still found through that node.
        """
        early = self.json_of(self.job("submit", "--peer", "provider-1", "--output", "json",
                                      "--", "true"))
        started = omerta("--data-dir", self.consumer, "up", "--port", "0", "--interface",
                         "127.0.0.1", "--timeout", "30")
        self.assertEqual(started.returncode, 0, started.stderr)
        self.addCleanup(omerta, "--data-dir", self.consumer, "down")
        submit = omerta("--data-dir", self.consumer, "job", "submit", "--peer", "provider-1",
                        "--wait", "--", "sh", "-c", "echo 42; echo note >&2; exit 4")
        self.assertEqual((submit.returncode, submit.stdout), (4, "42\n"),
                         submit.stderr + self.describe())
        self.assertIn("note", submit.stderr)
        listed = json.loads(omerta("--data-dir", self.consumer, "--output", "json", "job",
                                   "list").stdout)["jobs"]
        node_id = json.loads((Path(self.consumer) / "status.json").read_text())["peer_id"]
        kept = json.loads((Path(self.consumer) / "consumer-jobs.json").read_text())["jobs"]
        (mine,) = [j for j in listed if j["job_id"] != early["job_id"]]
        self.assertEqual((mine["state"], mine["exit_code"]), ("exited", 4))
        self.assertEqual(kept[mine["job_id"]]["owner"], node_id)
        status = self.json_of(omerta("--data-dir", self.consumer, "--output", "json", "job",
                                     "status", early["job_id"]))
        self.assertEqual(status["state"], "exited")

    def test_bad_input_gets_a_clear_refusal(self):
        script = Path(self.base) / "job.rb"
        script.write_text("puts 42\n")
        result = self.job("submit", "--peer", "provider-1", "--script", str(script))
        self.assertEqual(result.returncode, 2)
        self.assertIn("cannot tell the language of", result.stderr)
        result = self.job("submit", "--peer", "provider-1", "--script", str(script),
                          "--language", "ruby")
        self.assertEqual(result.returncode, 2)
        self.assertIn("invalid choice: 'ruby'", result.stderr)
        result = self.job("submit", "--peer", "provider-1", "--cpu", "-1", "--", "true")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--cpu must be from 0.001", result.stderr)
        big = Path(self.base) / "big.bin"
        big.write_bytes(b"\0" * (16 * 2**20 + 1))
        result = self.job("submit", "--peer", "provider-1", "--input", str(big), "--", "true")
        self.assertEqual(result.returncode, 2)
        self.assertIn("bad request: the inputs are 16777217 bytes; this provider takes at most"
                      " 16777216 per job", result.stderr)
        # another consumer's job: not in its data directory, and the
        # provider would answer "not yours" (tests/test_job_provider.py)
        mine = self.json_of(self.job("submit", "--peer", "provider-1", "--output", "json",
                                     "--", "true"))
        other = f"{self.base}/other"
        omerta("--data-dir", other, "network", "join", "--key", self.network.invite)
        result = self.job("status", mine["job_id"], data_dir=other)
        self.assertEqual(result.returncode, 2)
        self.assertIn("no job submitted from here has an id starting", result.stderr)
        for result in (self.job("status", mine["job_id"]),):
            self.assertNotIn("Traceback", result.stderr)
