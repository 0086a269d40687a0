"""
A node's periodic state files (status.json, peers-*.json) survive a full
disk: the loops keep running, warn once per failure streak, recover when
space returns and say at stop what was not saved; a damaged peers file is
moved aside, not overwritten.
"""

import errno
import os

from twisted.logger import Logger, globalLogPublisher
from twisted.trial import unittest

from omerta import storage
from omerta.mesh.service import STATUS_FILE, NodeService
from tests.test_node import RELAY_IP, MeshFixture


class FullDisk:
    """
    Patches L{storage.atomic_write} to fail with ENOSPC while C{full} (for
    the status and peers files, not the identity or memberships).
    """

    def __init__(self, testcase):
        self.full = False
        self.attempts = 0
        real = storage.atomic_write

        def write(path, data, *args, **kwargs):
            self.attempts += 1
            if self.full and os.path.basename(path).startswith(("status", "peers-")):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, data, *args, **kwargs)

        testcase.patch(storage, "atomic_write", write)


class DiskFullTests(unittest.TestCase):
    def setUp(self):
        self.mesh = MeshFixture(self)
        self.mesh.start_relay()
        self.events = []
        self.patch(NodeService, "log", Logger(observer=self.events.append))
        self.disk = FullDisk(self)

    def logged(self, level, fragment):
        return [e for e in self.events
                if e["log_level"].name == level and fragment in e["log_format"]]

    def node(self):
        service = self.mesh.node("10.0.0.2", "alice", status_interval=1.0, peers_interval=5.0)
        self.status_path = os.path.join(service.data_dir, STATUS_FILE)
        self.peers_path = service.node.overlay().peers_file(service.data_dir)
        return service

    def test_loops_survive_and_recover(self):
        """ENOSPC warns once per file, keeps both loops running, and both files appear once space returns."""
        self.disk.full = True
        alice = self.node()
        self.mesh.net.run(20)
        self.assertTrue(all(loop.running for loop in alice._loops))
        self.assertFalse(os.path.exists(self.status_path))
        self.assertFalse(os.path.exists(self.peers_path))
        warnings = [e for e in self.logged("warn", "Cannot write")
                    if e["path"].startswith(str(alice.data_dir))]
        self.assertEqual(sorted(e["path"] for e in warnings),
                         sorted([self.status_path, str(self.peers_path)]))
        self.assertEqual({e["error"] for e in warnings}, {os.strerror(errno.ENOSPC)})
        self.disk.full = False
        self.mesh.net.run(6)
        self.assertTrue(os.path.exists(self.status_path))
        self.assertTrue(os.path.exists(self.peers_path))
        recovered = [e["path"] for e in self.logged("info", "works again")]
        self.assertIn(self.status_path, recovered)
        self.assertIn(str(self.peers_path), recovered)

    def test_new_streak_warns_again(self):
        """After a recovery, the next failure is warned about again (once)."""
        alice = self.node()
        self.mesh.net.run(2)
        for _ in range(2):
            self.disk.full = True
            self.mesh.net.run(12)
            self.disk.full = False
            self.mesh.net.run(6)
        self.assertTrue(all(loop.running for loop in alice._loops))
        warned = [e["path"] for e in self.logged("warn", "Cannot write")]
        self.assertEqual(warned.count(str(self.peers_path)), 2)

    def test_status_retried_when_unchanged(self):
        """A status that could not be written is written later even when it did not change."""
        alice = self.node()
        os.unlink(self.status_path)
        self.disk.full = True
        document = dict(alice.status(), changed=True)
        self.patch(alice, "status", lambda: document)
        alice.write_status()
        alice.write_status()
        self.assertFalse(os.path.exists(self.status_path))
        self.disk.full = False
        alice.write_status()
        self.assertTrue(os.path.exists(self.status_path))

    def test_stop_says_what_was_not_saved(self):
        """At stop on a full disk, the error log names the peers not saved and the status."""
        alice = self.node()
        self.mesh.net.run(3)
        known = len(alice.node.overlay().registry)
        self.assertGreater(known, 0)
        self.disk.full = True
        alice.stopService()
        errors = self.logged("error", "Not saved at stop")
        what = {e["path"]: e["what"] for e in errors}
        self.assertEqual(set(what), {str(self.peers_path), self.status_path})
        self.assertIn(f"the {known} known peer(s) of network", what[str(self.peers_path)])
        self.assertIn("status", what[self.status_path])


class DamagedPeersFileTests(unittest.TestCase):
    def test_moved_aside_and_not_overwritten(self):
        """A damaged peers file is moved aside (and the log says where); saving writes a new one."""
        mesh = MeshFixture(self)
        mesh.start_relay()
        events = []
        data_dir = os.path.join(mesh.base, "alice")
        network = mesh.membership.key.network_id.hex()
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.join(data_dir, f"peers-{network}.json")
        with open(path, "wb") as f:
            f.write(b"{damaged")
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        alice = mesh.node("10.0.0.2", "alice", peers_interval=1.0)
        mesh.net.run(3)
        alice.save_peers()
        asides = [n for n in os.listdir(data_dir) if n.startswith(f"peers-{network}.json.damaged-")]
        self.assertEqual(len(asides), 1)
        with open(os.path.join(data_dir, asides[0]), "rb") as f:
            self.assertEqual(f.read(), b"{damaged")
        messages = [e.get("error", "") for e in events if "not loaded" in e.get("log_format", "")]
        self.assertEqual(len(messages), 1)
        self.assertIn(f"moved aside to {os.path.join(data_dir, asides[0])}", messages[0])
        self.assertEqual(storage.read_json(path, dict)["network_id"], network)
