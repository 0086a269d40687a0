"""
omerta up / omerta down against a real relay on loopback: the node starts in
the background, joins, is found running by a second up, stops; a node killed
with -9 leaves a pidfile (and socket) that the next up cleans; a node that
cannot start says why with the end of its log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from omerta.storage import pid_alive
from tests.integration import Daemon, free_udp_port, run_cli, start_relay, wait_for


class UpDownTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.network, self.relay = start_relay(self, base)
        self.dir = f"{base}/consumer"
        self.addCleanup(self._down_anyway)
        return ensureDeferred(wait_for(lambda: self.relay.status().get("running"), 20,
                                       "the relay to start"))

    def _down_anyway(self):
        try:
            pid = int(open(f"{self.dir}/node.pid").read())
        except (OSError, ValueError):
            return
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            os.sched_yield()
        self.assertFalse(pid_alive(pid))

    def omerta(self, *args):
        return run_cli("--data-dir", self.dir, *args)

    def up(self, *extra):
        return self.omerta("up", "--invite", self.network.invite, "--port", "0",
                           "--interface", "127.0.0.1", "--timeout", "30", *extra)

    def pid(self) -> int:
        return int(open(f"{self.dir}/node.pid").read())

    def test_up_status_down(self):
        started = self.up("--name", "laptop")
        self.assertEqual(started.returncode, 0, started.stderr)
        self.assertIn("relay", started.stdout)
        self.assertIn("state     running", started.stdout)
        pid = self.pid()
        self.assertTrue(pid_alive(pid))
        for name in ("node.pid", "node.log"):
            self.assertEqual(os.stat(f"{self.dir}/{name}").st_mode & 0o077, 0, name)
        again = self.up()
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn(f"already serves {self.dir} (pid {pid})", again.stderr)
        self.assertEqual(self.pid(), pid, "a second node was started")
        status = self.omerta("--output", "json", "node", "status")
        self.assertEqual(json.loads(status.stdout)["name"], "laptop")
        stopped = self.omerta("down")
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertIn(f"pid {pid}", stopped.stdout)
        self.assertFalse(pid_alive(pid))
        self.assertFalse(os.path.exists(f"{self.dir}/node.pid"))
        self.assertIn("no node", self.omerta("down").stdout)

    def test_kill_9_then_up_recovers(self):
        self.assertEqual(self.up().returncode, 0)
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            os.sched_yield()
        self.assertFalse(pid_alive(pid))
        # the killed node's control socket stays behind, nobody listening
        # (once its last thread is gone: the leader shows as a zombie first)
        self.assertTrue(os.path.exists(f"{self.dir}/control.sock"))
        while self._answers() and time.monotonic() < deadline + 10:
            os.sched_yield()
        self.assertFalse(self._answers())
        restarted = self.up()
        self.assertEqual(restarted.returncode, 0, restarted.stderr)
        self.assertNotEqual(self.pid(), pid)
        self.assertFalse(os.path.exists(f"{self.dir}/control.sock")
                         and not self._answers(), "the stale socket was left")
        self.assertTrue(pid_alive(self.pid()))
        self.assertEqual(self.omerta("down").returncode, 0)

    def _answers(self) -> bool:
        directory = os.open(self.dir, os.O_PATH)
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(f"/proc/self/fd/{directory}/control.sock")
                return True
            except OSError:
                return False
            finally:
                probe.close()
        finally:
            os.close(directory)

    def test_node_that_cannot_start_says_why(self):
        """The port is taken: the node exits, up prints the end of its log."""
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        taken.bind(("127.0.0.1", 0))
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        failed = self.omerta("up", "--invite", self.network.invite, "--port", str(port),
                             "--interface", "127.0.0.1", "--timeout", "20")
        self.assertEqual(failed.returncode, 2)
        first = failed.stderr.splitlines()[1]
        self.assertRegex(first, r"^omerta: error: the node (did not start|exited):"
                                r" .*Address already in use", failed.stderr)
        self.assertIn("node.log", first)
        self.assertFalse(os.path.exists(f"{self.dir}/node.pid"))

    def test_bad_input_is_a_message(self):
        no_network = self.omerta("up", "--port", "0")
        self.assertEqual(no_network.returncode, 2)
        self.assertIn("belongs to no network", no_network.stderr)
        self.assertNotIn("Traceback", no_network.stderr)
        bad_port = self.omerta("up", "--invite", self.network.invite, "--port", "70000")
        self.assertEqual(bad_port.returncode, 2)
        self.assertNotIn("Traceback", bad_port.stderr)
        self.assertFalse(os.path.exists(f"{self.dir}/node.pid"))


class ThroughTheNodeTests(unittest.TestCase):
    """
    With 'omerta up' running, the commands ask it over the control socket
    (no short-lived node: DATA_DIR/cli is never made): peers, two commands
    at once, the VM flow against a provider, the event stream.
    """

    timeout = 180

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.network, self.relay = start_relay(self, base)
        self.provider = Daemon(self, "omerta-provider", f"{base}/provider",
                               "--name", "provider-1", "--interface", "127.0.0.1",
                               "--port", str(free_udp_port()), "--nat-interval", "0",
                               "--invite", self.network.invite, "--vm-cpus", "2",
                               "--vm-memory", "1024")
        self.dir = f"{base}/consumer"
        self.addCleanup(lambda: run_cli("--data-dir", self.dir, "down"))
        return ensureDeferred(self._ready())

    async def _ready(self):
        await wait_for(lambda: "provider-1" in _online(self.relay.status()), 40,
                       "the relay to see the provider")
        started = run_cli("--data-dir", self.dir, "up", "--invite", self.network.invite,
                          "--port", "0", "--interface", "127.0.0.1")
        self.assertEqual(started.returncode, 0, started.stderr)

    def omerta(self, *args):
        return run_cli("--data-dir", self.dir, *args)

    def test_commands_through_the_node(self):
        peers = self.omerta("--output", "json", "mesh", "peers")
        self.assertEqual(peers.returncode, 0, peers.stderr)
        names = {p["name"] for p in json.loads(peers.stdout)}
        self.assertLessEqual({"relay", "provider-1"}, names)
        self.assertFalse(os.path.exists(f"{self.dir}/cli"), "a short-lived node was started")
        text = self.omerta("mesh", "peers")
        self.assertIn("provider-1", text.stdout)
        # the fast path and the full command line (--timeout is not on the
        # fast path) print the same peers through the node
        full = self.omerta("--output", "json", "mesh", "peers", "--timeout", "10")
        self.assertEqual(full.returncode, 0, full.stderr)
        self.assertEqual({(p["peer_id"], p["name"]) for p in json.loads(full.stdout)},
                         {(p["peer_id"], p["name"]) for p in json.loads(peers.stdout)})
        unknown = self.omerta("mesh", "ping", "nobody-here", "--count", "1")
        self.assertEqual(unknown.returncode, 2)
        self.assertIn("nobody-here", unknown.stderr)
        self.assertNotIn("Traceback", unknown.stderr)

    def test_two_commands_at_once(self):
        argv = [sys.executable, "-m", "omerta.app.cli", "--data-dir", self.dir,
                "--output", "json", "mesh", "peers"]
        from tests.integration import environment
        both = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=environment()) for _ in range(2)]
        for process in both:
            out, err = process.communicate(timeout=60)
            self.assertEqual(process.returncode, 0, err)
            self.assertIn("provider-1", {p["name"] for p in json.loads(out)})

    def test_vm_flow(self):
        granted = self.omerta("--output", "json", "vm", "request", "--peer", "provider-1",
                              "--cpu", "1", "--memory", "256")
        self.assertEqual(granted.returncode, 0, granted.stderr)
        vm = json.loads(granted.stdout)
        self.assertNotIn("wg_private_key", granted.stdout)
        listed = self.omerta("--output", "json", "vm", "list", "--refresh")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn(vm["vm_id"], listed.stdout)
        released = self.omerta("--output", "json", "vm", "release", "--all")
        self.assertEqual(released.returncode, 0, released.stderr)
        self.assertEqual(json.loads(released.stdout)["released"], [vm["vm_id"]])
        self.assertFalse(os.path.exists(f"{self.dir}/cli"), "a short-lived node was started")

    def test_watch_prints_events(self):
        from tests.integration import environment
        watch = subprocess.Popen(
            [sys.executable, "-m", "omerta.app.cli", "--data-dir", self.dir, "--output", "json",
             "mesh", "watch", "--kind", "vm_state", "--count", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
        self.addCleanup(lambda: watch.poll() is None and watch.kill())
        self.assertIn("following the events", watch.stderr.readline().decode())
        granted = self.omerta("vm", "request", "--peer", "provider-1")
        self.assertEqual(granted.returncode, 0, granted.stderr)
        out, err = watch.communicate(timeout=60)
        self.assertEqual(watch.returncode, 0, err)
        event = json.loads(out.splitlines()[0])
        self.assertEqual(event["event"], "vm_state")
        self.omerta("vm", "release", "--all")


def _online(status: dict) -> set:
    return {p["name"] for p in status.get("peers", []) if p.get("state") == "online"}
