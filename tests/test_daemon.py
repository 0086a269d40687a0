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
import time

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from omerta.crypto.identity import load_or_create_identity
from omerta.networks import NetworkStore
from omerta.storage import pid_alive
from tests.integration import Daemon, free_udp_port, run_cli, wait_for


class UpDownTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        relay_dir = f"{base}/relay"
        self.relay_port = free_udp_port()
        identity = load_or_create_identity(relay_dir)
        self.network = NetworkStore(relay_dir).create(
            identity, "lab", f"127.0.0.1:{self.relay_port}", now=time.time())
        self.relay = Daemon(self, "omerta-relay", relay_dir, "--name", "relay",
                            "--interface", "127.0.0.1", "--port", str(self.relay_port),
                            "--nat-interval", "0")
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
        # a socket file nobody listens on (bound through the directory's fd:
        # the test's path is longer than a socket address may be)
        directory = os.open(self.dir, os.O_PATH)
        self.addCleanup(os.close, directory)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(f"/proc/self/fd/{directory}/control.sock")
        stale.close()
        self.assertTrue(os.path.exists(f"{self.dir}/control.sock"))
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
                                r" Couldn't listen on 127\.0\.0\.1:\d+: .*Address already in use",
                         failed.stderr)
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
