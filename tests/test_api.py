"""
The public MeshNetwork API on the simulated network: start/stop, peers,
lookup, connect, ping, send/request, find_peers, events, statistics, and
the waits (Deferreds fired by events, with deadlines).
"""

import os
import time

from twisted.trial import unittest

from omerta.crypto.identity import load_or_create_identity
from omerta.mesh.network import ConnectError, MeshNetwork, NotJoined, peer_label
from omerta.mesh.registry import PeerNotFound, Requirements
from omerta.networks import NetworkStore
from omerta.testing.simnet import SimNetwork
from omerta.wire.messages import Capability
from tests.test_traversal_sim import setup_pair

RELAY = ("198.51.100.1", 7400)


def online(mesh) -> list:
    return [r for r in mesh.known_peers() if r.state == "online"]


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
        self.settle(lambda: all(len(online(m)) == 2 for m in (self.alice, self.bob, self.relay)))

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
        """statistics reports peers, paths, sessions, bytes and drops."""
        self.result(self.alice.connect("bob"))
        self.result(self.alice.request("bob", "omerta.info", b""))
        stats = self.alice.statistics()
        self.assertEqual(stats["peers"]["total"], 2)
        self.assertEqual(stats["paths"], {"direct": 2, "punched": 0, "relayed": 0})
        self.assertEqual(stats["sessions"], 1)
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

    def test_wait_for_peers_fires_on_the_event(self):
        """wait_for_peers fires when the peer comes online, not at a polling tick."""
        d = self.alice.wait_for_peers(3, timeout=30)
        carol = self.mesh(os.path.abspath(self.mktemp()), "10.0.0.4", name="carol")
        carol_id = bytes.fromhex(carol.peer_id)
        online_at = []
        self.alice.events.subscribe("peer_changed", lambda **e: e["peer_id"] == carol_id
                                    and self.alice.peer_info(carol_id).state == "online"
                                    and not online_at and online_at.append(self.net.clock.seconds()))
        self.assertTrue(self.result(d))
        self.assertEqual(len(online_at), 1)
        self.assertLess(self.net.clock.seconds() - online_at[0], 0.011)

    def test_networks(self):
        """networks and network_id name the one network, in hex."""
        self.assertEqual(self.alice.networks(), [self.alice.network_id()])
        self.assertEqual(len(self.alice.network_id()), 16)
        self.assertEqual(self.alice.local_address(), ("10.0.0.2", 7400))
        self.assertIn(("10.0.0.2", 7400), self.alice.public_endpoints())

    def test_set_resources(self):
        """set_resources re-announces at once; the others see the new resources; the same again is a no-op."""
        resources = {"cpu_cores": 2, "memory_mb": 512, "disk_gb": 3, "gpus": 0}
        self.assertTrue(self.alice.set_resources(resources))
        self.assertEqual(self.alice.resources, resources)
        self.assertFalse(self.alice.set_resources(dict(resources)))
        self.settle(lambda: self.bob.peer_info("alice").resources.as_dict() == resources, 5)

    def test_bootstraps(self):
        """bootstraps shows the relay reached, and who answered there."""
        [boot] = self.alice.bootstraps()
        self.assertTrue(boot.reached)
        self.assertEqual(boot.address, RELAY)
        self.assertEqual(boot.answered_by.hex(), self.relay.peer_id)
        self.assertTrue(self.alice.joined())
        self.assertTrue(self.successResultOf(self.alice.wait_joined(1)))
        self.assertEqual(self.alice.ask_for_peer_lists(), 1)

    def test_find_peer(self):
        """find_peer waits until a peer that joins later is known, and says when one never is."""
        d = self.alice.find_peer("carol", timeout=20)
        self.net.run(0.5)
        self.mesh(os.path.abspath(self.mktemp()), "10.0.0.4", name="carol")
        self.assertEqual(self.result(d).name, "carol")
        missing = self.alice.find_peer("nobody", timeout=20)
        self.net.run_until(lambda: missing.called, 30)
        self.failureResultOf(missing, PeerNotFound)
        self.assertLess(self.net.clock.seconds(), 60)
        by_id = self.alice.find_peer(bytes(16), timeout=3)
        self.net.run_until(lambda: by_id.called, 10)
        self.failureResultOf(by_id, PeerNotFound)

    def test_find_peer_alone(self):
        """find_peer on a node nobody answers fails with NotJoined at the timeout."""
        self.result(self.relay.stop())
        lonely = self.mesh(os.path.abspath(self.mktemp()), "10.0.9.9", name="lonely")
        d = lonely.find_peer("bob", timeout=3)
        started = self.net.clock.seconds()
        self.net.run_until(lambda: d.called, 10)
        self.failureResultOf(d, NotJoined)
        self.assertAlmostEqual(self.net.clock.seconds() - started, 3, delta=0.1)

    def test_wait_settled(self):
        """wait_settled returns once the counts stayed the same for a second."""
        started = self.net.clock.seconds()
        self.assertIsNone(self.result(self.alice.wait_settled(10)))
        self.assertAlmostEqual(self.net.clock.seconds() - started, MeshNetwork.SETTLE_TIME,
                               delta=0.1)

    def test_reputation(self):
        """record_outcome folds an outcome into a peer's reputation; restore_reputation sets it."""
        self.assertTrue(self.alice.restore_reputation("bob", 0.9))
        self.assertAlmostEqual(self.alice.record_outcome("bob", False), 0.81)
        self.assertAlmostEqual(self.alice.peer_info("bob").reputation, 0.81)
        self.assertIsNone(self.alice.record_outcome(bytes(16), True))

    def test_next_event(self):
        """next_event fires with the data of the next matching event."""
        d = self.alice.next_event("peer_discovered", 30)
        carol = self.mesh(os.path.abspath(self.mktemp()), "10.0.0.4", name="carol")
        self.assertEqual(self.result(d)["peer_id"].hex(), carol.peer_id)
        self.assertIsNone(self.result(self.alice.next_event("nat_changed", 1)))

    def test_peer_label(self):
        """peer_label names a peer by name and id."""
        record = self.alice.peer_info("bob")
        self.assertEqual(peer_label(record), f"bob ({self.bob.peer_id})")


class PathStatisticsTests(unittest.TestCase):
    """
    statistics() counts live paths by kind on the simulated network:
    symmetric/symmetric NATs end relayed, port-restricted ones punched,
    public nodes direct (each side also has its direct link to the relay).
    """

    def paths(self, nat_a, nat_b, expected_kind):
        """
        Connect A to B and wait up to 5 s for a direct path (the first path
        may be a relay session that the punch then replaces).
        """
        sim, _relays, a, b = setup_pair(self, nat_a, nat_b)
        mesh = MeshNetwork(node=a.node)
        d = mesh.connect(b.peer_id, timeout=10)
        sim.run_until(lambda: d.called, 20)
        self.successResultOf(d)
        d = mesh.wait_direct(b.peer_id, 5)
        sim.run_until(lambda: d.called, 10)
        self.assertEqual(self.successResultOf(d).kind, expected_kind)
        return mesh.statistics()["paths"]

    def test_relayed(self):
        """A relayed path is counted as relayed, not direct."""
        self.assertEqual(self.paths("symmetric", "symmetric", "relayed"),
                         {"direct": 1, "punched": 0, "relayed": 1})

    def test_punched(self):
        """A hole-punched path is counted as punched."""
        self.assertEqual(self.paths("port-restricted", "port-restricted", "punched"),
                         {"direct": 1, "punched": 1, "relayed": 0})

    def test_direct(self):
        """Paths to public peers are direct."""
        self.assertEqual(self.paths("none", "none", "direct"),
                         {"direct": 2, "punched": 0, "relayed": 0})

    def test_wait_direct_fires_on_the_punch(self):
        """wait_direct fires with the path the punch opened as soon as it answers, or with the current one at its deadline."""
        sim, _relays, a, b = setup_pair(self, "port-restricted", "port-restricted")
        mesh = MeshNetwork(node=a.node)
        d = mesh.wait_direct(b.peer_id, 15)
        mesh.connect(b.peer_id, timeout=10)
        sim.run_until(lambda: d.called, 20)
        punched = self.successResultOf(d)
        self.assertTrue(punched.direct)
        self.assertEqual(punched.endpoint[0], "203.0.113.2")  # b's NAT, not the relay
        sim2, _, c, e = setup_pair(self, "symmetric", "symmetric", seed=8)
        mesh2 = MeshNetwork(node=c.node)
        mesh2.connect(e.peer_id, timeout=10)
        late = mesh2.wait_direct(e.peer_id, 12)
        started = sim2.clock.seconds()
        sim2.run_until(lambda: late.called, 20)
        self.assertEqual(self.successResultOf(late).kind, "relayed")
        self.assertAlmostEqual(sim2.clock.seconds() - started, 12, delta=0.6)
