"""
The public MeshNetwork API on the simulated network: start/stop, peers,
lookup, connect, ping, send/request, find_peers, events, statistics.
"""

import os
import time

from twisted.trial import unittest

from omerta.crypto.identity import load_or_create_identity
from omerta.mesh.network import ConnectError, MeshNetwork
from omerta.mesh.registry import PeerNotFound, Requirements
from omerta.networks import NetworkStore
from omerta.testing.simnet import SimNetwork
from omerta.wire.messages import Capability

RELAY = ("198.51.100.1", 7400)


class ApiTests(unittest.TestCase):
    def setUp(self):
        self.net = SimNetwork(seed=11, latency=0.010)
        base = os.path.abspath(self.mktemp())
        relay_dir = f"{base}/relay"
        self.invite = NetworkStore(relay_dir).create(
            load_or_create_identity(relay_dir), "api", f"{RELAY[0]}:{RELAY[1]}", now=time.time()
        ).invite
        self.relay = self.mesh(relay_dir, RELAY[0], name="relay", invites=[],
                               capabilities=Capability.RELAY)
        self.alice = self.mesh(f"{base}/alice", "10.0.0.2", name="alice",
                               resources={"cpu_cores": 8, "memory_mb": 16384, "disk_gb": 100,
                                          "gpus": 0})
        self.bob = self.mesh(f"{base}/bob", "10.0.0.3", name="bob")
        self.settle(lambda: all(len(m.overlay().registry.online()) == 2
                                for m in (self.alice, self.bob, self.relay)))

    def mesh(self, data_dir, ip, invites=None, **options):
        mesh = MeshNetwork(data_dir, port=7400, interface=ip,
                           invites=[self.invite] if invites is None else invites,
                           nat_interval=0, reactor=self.net.host(ip).reactor, **options)
        self.successResultOf(mesh.start())
        self.addCleanup(lambda: mesh.service.running and mesh.stop())
        return mesh

    def settle(self, predicate, timeout=30):
        self.assertTrue(self.net.run_until(predicate, timeout=timeout))

    def result(self, d, timeout=30):
        self.net.run_until(lambda: d.called, timeout=timeout)
        return self.successResultOf(d)

    def test_identity(self):
        """peer_id is the node's hex id and peer_info finds peers by name and prefix."""
        self.assertEqual(len(self.alice.peer_id), 32)
        self.assertEqual(self.alice.peer_info("bob").peer_id.hex(), self.bob.peer_id)
        self.assertEqual(self.alice.peer_info(self.bob.peer_id[:6]).name, "bob")
        self.assertRaises(PeerNotFound, self.alice.peer_info, "nobody")

    def test_wait_for_peers(self):
        """wait_for_peers fires True once enough peers are online, False at the timeout."""
        self.assertTrue(self.result(self.alice.wait_for_peers(1, timeout=10)))
        self.assertFalse(self.result(self.alice.wait_for_peers(5, timeout=2)))

    def test_connect_and_ping(self):
        """connect returns the direct path record; ping measures the round trip."""
        connection = self.result(self.alice.connect("bob"))
        self.assertEqual(connection.endpoint, ("10.0.0.3", 7400))
        self.assertEqual((connection.kind, connection.local_port), ("direct", 7400))
        rtt, again = self.result(self.alice.ping("bob"))
        self.assertAlmostEqual(rtt, 0.020, places=3)
        self.assertEqual(again.endpoint, connection.endpoint)
        self.assertEqual(self.alice.connection("bob"), again)

    def test_connect_failure(self):
        """connect to a peer that is gone fails with ConnectError."""
        self.bob.stop()
        self.net.run(MeshNetwork.FRESH_CONTACT + 1)
        d = self.alice.connect("bob", timeout=3)
        self.net.run_until(lambda: d.called, timeout=30)
        self.failureResultOf(d, ConnectError)

    def test_request_and_send(self):
        """request/on_channel and send work between two members."""
        got = []
        self.bob.on_channel("echo", lambda peer, payload: payload[::-1])
        self.bob.on_channel("note", lambda peer, payload: got.append((peer, payload)))
        self.assertEqual(self.result(self.alice.request("bob", "echo", b"abc")), b"cba")
        self.alice.send("bob", "note", b"hi")
        self.net.run(1)
        self.assertEqual(got, [(bytes.fromhex(self.alice.peer_id), b"hi")])

    def test_find_peers(self):
        """find_peers filters by announced resources and capabilities."""
        relays = self.bob.find_peers(Requirements(capabilities=Capability.RELAY))
        self.assertEqual([r.name for r in relays], ["relay"])
        big = self.bob.find_peers(Requirements(cpu_cores=4, memory_mb=8000))
        self.assertEqual([r.name for r in big], ["alice"])
        self.assertEqual(self.bob.find_peers(Requirements(gpus=1)), [])

    def test_events(self):
        """Subscribers hear of new peers and connections."""
        seen = []
        self.alice.events.subscribe("peer_discovered", lambda **e: seen.append(("discovered", e["peer_id"])))
        self.alice.events.subscribe("peer_connected", lambda **e: seen.append(("connected", e["peer_id"])))
        carol = self.mesh(os.path.abspath(self.mktemp()), "10.0.0.4", name="carol")
        carol_id = bytes.fromhex(carol.peer_id)
        self.settle(lambda: ("discovered", carol_id) in seen)
        self.result(self.alice.connect("carol"))
        self.assertIn(("connected", carol_id), seen)

    def test_statistics(self):
        """statistics reports peers, paths, bytes and drops."""
        self.result(self.alice.connect("bob"))
        stats = self.alice.statistics()
        self.assertEqual(stats["peers"]["total"], 2)
        self.assertGreaterEqual(stats["paths"]["direct"], 1)
        self.assertGreater(stats["bytes_in"], 0)
        self.assertGreater(stats["bytes_out"], 0)
        self.assertIsInstance(stats["drops"], dict)

    def test_stop(self):
        """stop closes the socket and leaves no timer behind."""
        for mesh in (self.alice, self.bob, self.relay):
            self.result(mesh.stop())
        self.net.run(1)
        self.assertEqual(self.net.clock.getDelayedCalls(), [])

    def test_connect_reports_rtt(self):
        """A path connect() had to confirm carries the RTT it just measured."""
        self.net.run(MeshNetwork.FRESH_CONTACT + 1)
        connection = self.result(self.alice.connect("bob"))
        self.assertAlmostEqual(connection.rtt, 0.020, places=3)
