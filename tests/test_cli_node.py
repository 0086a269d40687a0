"""
omerta node status: reading a node's status file, liveness, waiting.
"""

import io
import json
import os

from twisted.trial import unittest

from omerta.app.cli import main
from omerta.crypto.identity import load_or_create_identity
from omerta.storage import write_json

PEER = {
    "peer_id": "ab" * 16, "name": "relay", "endpoint": "127.0.0.1:7400", "networks": [],
    "capabilities": ["relay"], "state": "online", "last_heard_ago_s": 1.0,
    "rtt_ms": 0.5, "frames": 3,
}


class NodeStatusTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.identity = load_or_create_identity(self.dir)

    def run_cli(self, *args, now=1000.0):
        out, err = io.StringIO(), io.StringIO()
        code = main(["--data-dir", self.dir, *args], stdout=out, stderr=err, clock=lambda: now)
        return code, out.getvalue(), err.getvalue()

    def write_status(self, pid=None, peers=(PEER,), running=True):
        write_json(os.path.join(self.dir, "status.json"), {
            "pid": os.getpid() if pid is None else pid, "running": running,
            "peer_id": self.identity.peer_id_text, "name": "provider-1",
            "listen": "127.0.0.1:7401", "networks": [], "capabilities": ["provider"],
            "peers": list(peers), "metrics": {"frames_in": 3}, "updated_at": 990.0,
        })

    def test_running_node(self):
        """A live node's peers are listed, with ages corrected for the file's age."""
        self.write_status()
        code, out, err = self.run_cli("--output", "json", "node", "status")
        self.assertEqual(code, 0, err)
        document = json.loads(out)
        self.assertTrue(document["alive"])
        self.assertEqual(document["peers"][0]["last_heard_ago_s"], 11.0)

    def test_text(self):
        """The text form shows the node and a row per peer."""
        self.write_status()
        code, out, _ = self.run_cli("node", "status")
        self.assertEqual(code, 0)
        self.assertIn(self.identity.peer_id_text, out)
        self.assertIn("relay", out)
        self.assertIn("0.5 ms", out)

    def test_dead_node(self):
        """A status file left by a dead process is reported as not running."""
        self.write_status(pid=2**22 + 12345)
        code, out, _ = self.run_cli("--output", "json", "node", "status")
        self.assertEqual(code, 0)
        self.assertFalse(json.loads(out)["alive"])

    def test_wait_times_out(self):
        """--wait-peers fails with a clear reason when the peers never show up."""
        self.write_status(peers=())
        code, _, err = self.run_cli("node", "status", "--wait-peers", "1", "--timeout", "0")
        self.assertEqual(code, 2)
        self.assertIn("sees 0 online peer(s)", err)

    def test_wait_satisfied(self):
        """--wait-peers returns at once when the condition already holds."""
        self.write_status()
        code, _, _ = self.run_cli("node", "status", "--wait-peers", "1", "--timeout", "0")
        self.assertEqual(code, 0)

    def test_never_started(self):
        """A data dir with no identity says how to start a node."""
        code, _, err = self.run_cli("--data-dir", self.mktemp(), "node", "status")
        self.assertEqual(code, 2)
        self.assertIn("twistd -n omerta-relay", err)

    def test_no_status_yet(self):
        """With an identity but no status file, the node is shown as not running."""
        code, out, _ = self.run_cli("--output", "json", "node", "status")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), {
            "peer_id": self.identity.peer_id_text, "alive": False, "peers": []
        })
