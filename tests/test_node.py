"""
The foundation mesh controller and node service, on the simulated network:
bootstrap with backoff, signed announcements, keepalive RTT, rejections.
"""

import json
import os
import time

from twisted.trial import unittest

from omerta.addressing import parse_bootstrap
from omerta.crypto.announce import sign_announcement
from omerta.crypto.identity import Identity, load_or_create_identity
from omerta.mesh.service import STATUS_FILE, NodeService
from omerta.networks import NetworkStore
from omerta.testing.simnet import SimNetwork
from omerta.wire.messages import Capability, MessageType

RELAY_IP = "198.51.100.1"
PORT = 7400


class MeshFixture:
    """
    A simulated network with a relay that created network "sim".
    """

    def __init__(self, testcase, **net_options):
        self.testcase = testcase
        self.net = SimNetwork(seed=7, latency=0.010, **net_options)
        self.base = os.path.abspath(testcase.mktemp())
        relay_dir = f"{self.base}/relay"
        identity = load_or_create_identity(relay_dir)
        self.membership = NetworkStore(relay_dir).create(
            identity, "sim", f"{RELAY_IP}:{PORT}", now=time.time()
        )
        self.relay_id = identity.peer_id_text
        self.relay = None

    def node(self, ip, name, *, port=PORT, invite=True, **kwargs):
        service = NodeService(
            f"{self.base}/{name}",
            port=port,
            name=name,
            invites=[self.membership.invite] if invite else [],
            reactor=self.net.host(ip).reactor,
            **kwargs,
        )
        service.startService()
        self.testcase.addCleanup(lambda: service.running and service.stopService())
        return service

    def start_relay(self):
        self.relay = self.node(RELAY_IP, "relay", invite=False, capabilities=Capability.RELAY)
        return self.relay


def names(service):
    return {r.name for r in service.node.overlay().registry.all()}


def online(service):
    return {r.name for r in service.node.overlay().registry.online()}


def record(service, peer_id):
    return service.node.overlay().registry.get(peer_id)


class BootstrapTests(unittest.TestCase):
    def setUp(self):
        self.mesh = MeshFixture(self)

    def test_star_from_invite(self):
        """Nodes joining by invite reach the relay; all sides know names and keys."""
        relay = self.mesh.start_relay()
        a = self.mesh.node("10.0.0.2", "alice")
        b = self.mesh.node("10.0.0.3", "bob")
        self.assertTrue(self.mesh.net.run_until(
            lambda: online(relay) == {"alice", "bob"} and {"relay", "bob"} <= names(a)
            and "relay" in online(b),
            timeout=5,
        ))
        peer = record(relay, a.node.peer_id)
        self.assertEqual(peer.endpoint, ("10.0.0.2", PORT))
        self.assertEqual(peer.capabilities, 0)
        self.assertEqual(record(a, relay.node.peer_id).capabilities, Capability.RELAY)

    def test_rtt_measured(self):
        """A ping/pong over a 10 ms link measures about 20 ms."""
        self.mesh.start_relay()
        a = self.mesh.node("10.0.0.2", "alice")
        self.mesh.net.run(1)
        relay_id = self.mesh.relay_id
        rtt = a.node.overlay().registry.lookup(relay_id).rtt
        self.assertAlmostEqual(rtt, 0.020, places=3)

    def test_retry_with_backoff_until_relay_starts(self):
        """A node started before its bootstrap retries with growing delays and gets through."""
        a = self.mesh.node("10.0.0.2", "alice")
        self.mesh.net.run(10)
        announces = a.metrics.get("frames_out", type="announce")
        # attempts at 0, 1, 3, 7 s: backoff doubles from 1 s
        self.assertEqual(announces, 4)
        relay = self.mesh.start_relay()
        self.assertTrue(self.mesh.net.run_until(
            lambda: "alice" in names(relay) and a.status()["bootstrap"][0]["reached"],
            timeout=20,
        ))

    def test_bootstrap_id_checked(self):
        """A bootstrap spec whose id does not match the answering key is not counted as reached."""
        self.mesh.start_relay()
        wrong = Identity.generate().peer_id_text
        b = self.mesh.node(
            "10.0.0.3", "bob", bootstrap=[parse_bootstrap(f"{wrong}@{RELAY_IP}:{PORT}")],
        )
        self.mesh.net.run(5)
        self.assertEqual(b.metrics.get("drops", reason="bootstrap_mismatch"), 0)
        specs = {s["spec"]: s["reached"] for s in b.status()["bootstrap"]}
        self.assertFalse(specs[f"{wrong}@{RELAY_IP}:{PORT}"])
        self.assertTrue(specs[f"{self.mesh.relay_id}@{RELAY_IP}:{PORT}"])

    def test_bootstrap_impostor(self):
        """When only a wrong id is expected at an address, the answer is counted as a mismatch."""
        self.mesh.start_relay()
        wrong = Identity.generate().peer_id_text
        store = NetworkStore(f"{self.mesh.base}/carol")
        store.join(self.mesh.membership.key.to_text(), time.time(), name="sim")
        carol = self.mesh.node(
            "10.0.0.4", "carol", invite=False,
            bootstrap=[parse_bootstrap(f"{wrong}@{RELAY_IP}:{PORT}")],
        )
        self.mesh.net.run(5)
        self.assertGreaterEqual(carol.metrics.get("drops", reason="bootstrap_mismatch"), 1)
        self.assertEqual(carol.status()["bootstrap"], [
            {"spec": f"{wrong}@{RELAY_IP}:{PORT}", "reached": False}
        ])

    def test_same_peer_named_twice_contacted_once(self):
        """
        The invite names the relay by id and --bootstrap by name, at the same
        address: one announcement goes out per attempt, and both specs count
        as reached when it answers.
        """
        b = self.mesh.node(
            "10.0.0.3", "bob", bootstrap=[parse_bootstrap(f"relay@{RELAY_IP}:{PORT}")],
        )
        self.mesh.net.run(0.5)
        self.assertEqual(len(b.node.bootstraps), 2)
        self.assertEqual(b.metrics.get("frames_out", type="announce"), 1)
        self.mesh.start_relay()
        self.assertTrue(self.mesh.net.run_until(
            lambda: all(s["reached"] for s in b.status()["bootstrap"]), timeout=10))

    def test_no_bootstrap_to_self(self):
        """The network creator does not bootstrap from its own invite entry."""
        relay = self.mesh.start_relay()
        self.assertEqual(relay.node.bootstraps, [])

    def test_status_file(self):
        """The service mirrors what it sees into status.json."""
        relay = self.mesh.start_relay()
        self.mesh.node("10.0.0.2", "alice")
        self.mesh.net.run(3)
        with open(os.path.join(relay.data_dir, STATUS_FILE)) as f:
            status = json.load(f)
        self.assertEqual([p["name"] for p in status["peers"]], ["alice"])
        self.assertEqual(status["peers"][0]["state"], "online")
        self.assertTrue(status["peers"][0]["active"])
        self.assertEqual(status["listen"], f"{RELAY_IP}:{PORT}")

    def test_stop_releases_everything(self):
        """After stopService no timer is pending and the socket is closed."""
        relay = self.mesh.start_relay()
        a = self.mesh.node("10.0.0.2", "alice")
        self.mesh.net.run(2)
        for service in (a, relay):
            service.stopService()
        self.mesh.net.run(1)  # datagrams already in flight land (or drop)
        self.assertEqual(self.mesh.net.clock.getDelayedCalls(), [])

    def test_silent_peer_goes_offline(self):
        """A peer silent for three keepalive periods is suspected, then offline after indirect probes."""
        relay = self.mesh.start_relay()
        a = self.mesh.node("10.0.0.2", "alice")
        self.mesh.net.run(2)
        a.stopService()
        config = relay.config
        # first keepalive within one period (random phase), three missed, then
        # the indirect probes' timeout
        bound = config.keepalive * (config.suspect_after_missed + 1) + config.indirect_timeout + 2
        self.mesh.net.run(bound - 5)
        [peer] = relay.status()["peers"]
        self.assertNotEqual(peer["state"], "online")
        self.assertTrue(self.mesh.net.run_until(
            lambda: relay.status()["peers"][0]["state"] == "offline", timeout=10))


class RejectionTests(unittest.TestCase):
    def setUp(self):
        self.mesh = MeshFixture(self)
        self.relay = self.mesh.start_relay()
        self.alice = self.mesh.node("10.0.0.2", "alice")
        self.mesh.net.run(1)
        self.network_id = self.mesh.membership.key.network_id
        self.overlay = self.alice.node.overlay()

    def announce(self, signed):
        self.overlay.send((RELAY_IP, PORT), MessageType.ANNOUNCE, hops=0, announcement=signed)
        self.mesh.net.run(1)

    def outcomes(self):
        return self.relay.metrics.by_label("gossip_announcements", "outcome")

    def test_relayed_announcement_accepted(self):
        """A member may pass on another member's signed announcement (that is gossip)."""
        carol = Identity.generate()
        self.announce(sign_announcement(carol, self.network_id, _record("carol")))
        self.assertIn("carol", names(self.relay))
        self.assertNotIn("carol", online(self.relay))

    def test_name_claimed_by_another_key(self):
        """A second key claiming a name held by an unexpired record is refused."""
        mallory = Identity.generate()
        self.announce(sign_announcement(mallory, self.network_id, _record("alice")))
        self.assertEqual(self.outcomes().get("name_taken"), 1)
        self.assertIsNone(record(self.relay, mallory.peer_id))

    def test_bad_signature(self):
        """A record whose signature does not verify is dropped."""
        signed = sign_announcement(self.alice.node.identity, self.network_id,
                                   dict(_record("alice2"), sequence=2**62 + 1))
        signed["signature"] = bytes(64)
        self.announce(signed)
        self.assertEqual(self.outcomes().get("bad_signature"), 1)
        self.assertEqual(record(self.relay, self.alice.node.peer_id).name, "alice")

    def test_other_network_signature(self):
        """A record signed for another network does not verify in this one."""
        other = bytes(8)
        self.announce(sign_announcement(Identity.generate(), other, _record("eve")))
        self.assertEqual(self.outcomes().get("bad_signature"), 1)

    def test_stale_sequence(self):
        """An older announcement does not overwrite a newer one."""
        self.announce(sign_announcement(self.alice.node.identity, self.network_id,
                                        dict(_record("old-name"), sequence=0)))
        self.assertEqual(self.outcomes().get("stale"), 1)
        self.assertEqual(record(self.relay, self.alice.node.peer_id).name, "alice")

    def test_expired(self):
        """An announcement whose TTL has run out is refused."""
        self.announce(sign_announcement(Identity.generate(), self.network_id,
                                        dict(_record("late"), timestamp_ms=0, ttl_s=1)))
        self.assertEqual(self.outcomes().get("expired"), 1)

    def test_malformed_body(self):
        """A sealed frame whose body does not parse is counted, not fatal."""
        self.alice.port.write(self.overlay.sealer.seal(MessageType.PING, b"\x01"), (RELAY_IP, PORT))
        self.mesh.net.run(1)
        self.assertEqual(self.relay.metrics.get("drops", reason="malformed_body"), 1)

    def test_unexpected_pong(self):
        """A pong that answers no ping of ours gives no RTT and is counted."""
        self.overlay.send((RELAY_IP, PORT), MessageType.PONG, nonce=12345, echo_ms=0,
                          observed=("10.0.0.2", PORT), contacts=[], proof=b"")
        self.mesh.net.run(1)
        self.assertEqual(self.relay.metrics.get("drops", reason="unexpected_pong"), 1)

    def test_peer_table_bounded(self):
        """Beyond max_peers new announcements are refused, not stored."""
        self.relay.node.overlay().registry.max_peers = 1
        self.mesh.node("10.0.0.3", "bob")
        self.mesh.net.run(2)
        self.assertEqual(len(self.relay.node.overlay().registry), 1)
        self.assertGreater(self.outcomes().get("full", 0), 0)


def _record(name):
    return {
        "name": name, "sequence": 2**62, "timestamp_ms": 1000, "ttl_s": 3600, "nat_type": 0,
        "capabilities": 0, "paths": [],
        "resources": {"cpu_cores": 0, "memory_mb": 0, "disk_gb": 0, "gpus": 0},
    }


class SeveralNetworksTests(unittest.TestCase):
    def join_second_network(self, mesh, name):
        """
        Make C{name} (not started yet) a member of a second network, created
        by a node the relay does not know.
        """
        other_dir = f"{mesh.base}/other-creator"
        other = NetworkStore(other_dir).create(
            load_or_create_identity(other_dir), "other", None, now=time.time()
        )
        NetworkStore(f"{mesh.base}/{name}").join(other.invite, time.time())

    def test_invite_bootstrap_only_in_its_network(self):
        """A bootstrap peer from one network's invite never sees frames of the node's other networks."""
        mesh = MeshFixture(self)
        relay = mesh.start_relay()
        self.join_second_network(mesh, "alice")
        alice = mesh.node("10.0.0.2", "alice")
        self.assertEqual(len(alice.node.overlays), 2)
        mesh.net.run(5)
        self.assertIn("alice", names(relay))
        self.assertEqual(relay.metrics.get("drops", reason="unknown_network"), 0)

    def test_command_line_bootstrap_in_every_network(self):
        """A --bootstrap peer is contacted in each of the node's networks."""
        mesh = MeshFixture(self)
        relay = mesh.start_relay()
        self.join_second_network(mesh, "alice")
        mesh.node(
            "10.0.0.2", "alice", bootstrap=[parse_bootstrap(f"relay@{RELAY_IP}:{PORT}")]
        )
        mesh.net.run(2)
        self.assertGreater(relay.metrics.get("drops", reason="unknown_network"), 0)


class HeldAddressTests(unittest.TestCase):
    """
    MeshNode.hold_address: while a hole punch waits out the peer's router,
    what the node sends there is not sent (0) or leaves with a small TTL.
    """

    def test_hold_quiet_hop_limited_and_release(self):
        mesh = MeshFixture(self)
        service = mesh.start_relay()
        mesh.net.run(1)
        node = service.node
        target = ("198.51.100.77", PORT)
        from twisted.internet.protocol import DatagramProtocol

        mesh.net.host("198.51.100.77").reactor.listenUDP(PORT, DatagramProtocol())
        frame = b"\xf0M" + bytes(40)
        delivered = mesh.net.delivered

        node.hold_address(target, 0)
        self.assertIsNone(node.send_frame(frame, target, None))
        self.assertEqual(node.metrics.get("drops", reason="punch_quiet"), 1)
        node.hold_address(target, 1)
        self.assertIsNotNone(node.send_frame(frame, target, None))
        mesh.net.run(1)
        self.assertEqual((mesh.net.delivered, mesh.net.dropped["ttl"]), (delivered, 1))
        node.release_address(target)
        node.send_frame(frame, target, None)
        mesh.net.run(1)
        self.assertEqual(mesh.net.delivered, delivered + 1)
