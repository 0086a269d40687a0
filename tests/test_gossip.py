"""
Gossip built alone: a L{Gossip} on a C{Clock} (L{fake_basics}), a real
L{PeerRegistry} and real signed announcements, and fakes for the rest
(targets, proofs, links, endpoints).
"""

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.crypto.announce import open_announcement, sign_announcement
from omerta.crypto.identity import Identity
from omerta.mesh.gossip import PEER_LIST_BUDGET, Gossip, announcer
from omerta.mesh.node import MeshConfig
from omerta.mesh.registry import Outcome, PeerRegistry
from omerta.testing.fakes import NETWORK, fake_basics
from omerta.wire.messages import MessageType, NatType, PathKind, build_body, parse_body

NOW = 1_700_000_000.0
ENTRY_OVERHEAD = 1 + 2 + 64


def identity(seed: int) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(seed.to_bytes(32, "big")))


OWN = identity(1)


def announce(ident, sequence=1, name="", at=NOW):
    """
    A real signed announcement of C{ident} in the test network.
    """
    return sign_announcement(ident, NETWORK, {
        "name": name, "sequence": sequence, "timestamp_ms": int(at * 1000),
        "ttl_s": 3600, "nat_type": int(NatType.UNKNOWN), "capabilities": 0,
        "paths": [], "resources": {"cpu_cores": 0, "memory_mb": 0, "disk_gb": 0, "gpus": 0},
    })


def wire(msg_type, **fields):
    """
    A message as the gossip handlers receive it: built and parsed.
    """
    return parse_body(msg_type, build_body(msg_type, fields))


def frame(sender: bytes):
    return SimpleNamespace(sender=sender)


def entry_size(entry) -> int:
    return ENTRY_OVERHEAD + len(entry["announcement"]["record"])


@dataclass
class Me:
    """What this node says of itself (the L{Speaker} gossip reads)."""

    identity: Identity = OWN
    name: str = "self"
    nat: object = None
    capabilities: int = 0
    resources: dict = field(default_factory=lambda: {
        "cpu_cores": 2, "memory_mb": 1024, "disk_gb": 10, "gpus": 0})


class GossipTestCase(unittest.TestCase):
    config = MeshConfig()

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.basics, self.sent, self.events = fake_basics(
            config=self.config, clock=self.clock, identity=OWN)
        self.registry = PeerRegistry(NETWORK, OWN.peer_id)
        self.me = Me()
        self.active: list[tuple[bytes, tuple]] = []
        self.target_calls: list[int] = []
        self.proven: set[tuple] = set()
        self.links: dict[bytes, object] = {}
        self.endpoints = [("192.0.2.1", 7400)]
        self.relayed: list[dict] = []
        self.answered: list[tuple] = []
        self.gossip = Gossip(
            self.basics, self.registry, self.me, rng=random.Random(0),
            targets=self.targets,
            verified=lambda peer_id, address: (peer_id, address) in self.proven,
            active_link=self.links.get,
            own_endpoints=lambda: list(self.endpoints),
            own_relayed_paths=lambda: list(self.relayed),
            bootstrap_answered=lambda addr, peer_id: self.answered.append((addr, peer_id)),
        )

    def targets(self, count, rng):
        self.target_calls.append(count)
        return self.active[:count]

    def sequence(self, signed) -> int:
        return open_announcement(NETWORK, SimpleNamespace(**signed)).sequence

    def peers(self, count: int, first: int = 100) -> list[Identity]:
        return [identity(first + i) for i in range(count)]


class OriginationTests(GossipTestCase):
    def test_own_announcement_signed_with_what_node_says(self):
        """The own announcement is signed by this node and carries its name, endpoints and resources."""
        record = open_announcement(NETWORK, SimpleNamespace(**self.gossip.own_announcement()))
        self.assertEqual(record.peer_id, OWN.peer_id)
        self.assertEqual(record.name, "self")
        self.assertEqual([(p.kind, tuple(p.endpoint)) for p in record.paths],
                         [(PathKind.DIRECT, ("192.0.2.1", 7400))])
        self.assertEqual(record.resources.memory_mb, 1024)
        self.assertEqual(record.timestamp_ms, int(NOW * 1000))
        self.assertEqual(record.ttl_s, self.config.announce_ttl)

    def test_not_resigned_without_change(self):
        """Nothing changed: the same signed announcement, the same sequence."""
        first = self.gossip.own_announcement()
        self.clock.advance(10)
        self.assertIs(self.gossip.own_announcement(), first)

    def test_resigned_on_change(self):
        """A changed name, endpoint or relayed path gives a new, higher sequence number."""
        sequences = [self.sequence(self.gossip.own_announcement())]
        self.me.name = "renamed"
        sequences.append(self.sequence(self.gossip.own_announcement()))
        self.endpoints.append(("198.51.100.7", 7401))
        sequences.append(self.sequence(self.gossip.own_announcement()))
        self.relayed.append({"kind": PathKind.RELAYED, "endpoint": ("203.0.113.5", 7400),
                             "via": identity(9).peer_id})
        signed = self.gossip.own_announcement()
        sequences.append(self.sequence(signed))
        self.assertEqual(sequences, sorted(set(sequences)))
        record = open_announcement(NETWORK, SimpleNamespace(**signed))
        self.assertEqual(record.name, "renamed")
        self.assertEqual(len(record.paths), 3)

    def test_sequence_grows_even_if_clock_does_not(self):
        """Two changes in the same millisecond still get growing sequence numbers."""
        first = self.sequence(self.gossip.own_announcement())
        self.me.capabilities = 1
        self.assertEqual(self.sequence(self.gossip.own_announcement()), first + 1)

    def test_reannounce_resigns_and_spreads(self):
        """reannounce signs a fresh announcement (newer sequence and timestamp) and makes it a rumour."""
        first = self.gossip.own_announcement()
        self.gossip.rumours.clear()
        self.clock.advance(300)
        self.gossip.reannounce()
        second = self.gossip.own_announcement()
        self.assertGreater(self.sequence(second), self.sequence(first))
        self.assertIs(self.gossip.rumours[OWN.peer_id].signed, second)
        self.assertEqual(self.gossip.rumours[OWN.peer_id].hops, 0)

    def test_announce_to(self):
        """announce_to sends our own announcement directly, at hop 0."""
        self.gossip.announce_to(("198.51.100.1", 1))
        [sent] = self.sent.of(MessageType.ANNOUNCE)
        self.assertEqual(sent.address, ("198.51.100.1", 1))
        self.assertEqual(sent.fields["hops"], 0)
        self.assertIs(sent.fields["announcement"], self.gossip.own_announcement())
        wire(MessageType.ANNOUNCE, **sent.fields)  # a valid ANNOUNCE body


class AcceptTests(GossipTestCase):
    def test_new_announcement(self):
        """A new announcement is registered, emits peer_discovered and becomes a rumour one hop further."""
        alice = identity(2)
        self.assertEqual(self.gossip.accept(announce(alice), hops=2), Outcome.NEW)
        self.assertIn(alice.peer_id, self.registry)
        self.assertEqual(self.events.of("peer_discovered"), [{"peer_id": alice.peer_id}])
        self.assertEqual(self.gossip.rumours[alice.peer_id].hops, 3)
        self.assertEqual(self.basics.metrics.get("gossip_announcements", outcome="new"), 1)

    def test_updated_announcement(self):
        """A newer sequence replaces the rumour but is not a new discovery."""
        alice = identity(2)
        self.gossip.accept(announce(alice), hops=0)
        newer = announce(alice, sequence=2)
        self.assertEqual(self.gossip.accept(newer, hops=4), Outcome.UPDATED)
        self.assertEqual(len(self.events.of("peer_discovered")), 1)
        self.assertIs(self.gossip.rumours[alice.peer_id].signed, newer)
        self.assertEqual(self.gossip.rumours[alice.peer_id].hops, 5)

    def test_duplicate_suppressed(self):
        """A (peer, sequence) already held is a duplicate: no event, no new rumour."""
        alice = identity(2)
        signed = announce(alice)
        self.gossip.accept(signed, hops=0)
        self.gossip.rumours.clear()
        self.assertEqual(self.gossip.accept(signed, hops=0), Outcome.DUPLICATE)
        self.assertEqual(self.gossip.rumours, {})
        self.assertEqual(len(self.events.of("peer_discovered")), 1)
        self.assertEqual(self.basics.metrics.get("gossip_announcements", outcome="duplicate"), 1)

    def test_duplicate_dropped_before_signature(self):
        """A held (peer, sequence) is dropped before its signature is checked: a forged copy is a duplicate too."""
        alice = identity(2)
        signed = announce(alice)
        self.gossip.accept(signed, hops=0)
        forged = {"record": signed["record"], "signature": bytes(64)}
        self.assertEqual(self.gossip.accept(forged, hops=0), Outcome.DUPLICATE)

    def test_stale_not_spread(self):
        """An older sequence than the one held is not spread."""
        alice = identity(2)
        self.gossip.accept(announce(alice, sequence=5), hops=0)
        self.gossip.rumours.clear()
        self.assertEqual(self.gossip.accept(announce(alice, sequence=4), hops=0), Outcome.STALE)
        self.assertEqual(self.gossip.rumours, {})

    def test_hop_limit(self):
        """A record that would travel gossip_hop_limit hops from its origin is kept but not spread."""
        limit = self.config.gossip_hop_limit
        alice, bob = identity(2), identity(3)
        self.assertEqual(self.gossip.accept(announce(alice), hops=limit - 1), Outcome.NEW)
        self.assertIn(alice.peer_id, self.registry)
        self.assertNotIn(alice.peer_id, self.gossip.rumours)
        self.gossip.accept(announce(bob), hops=limit - 2)
        self.assertEqual(self.gossip.rumours[bob.peer_id].hops, limit - 1)

    def test_established_link_copied_to_registry(self):
        """A new announcement of a peer we already talk to takes the link's address, last heard and rtt."""
        alice = identity(2)
        self.links[alice.peer_id] = SimpleNamespace(
            established=True, address=("198.51.100.2", 9), last_heard=NOW - 3, rtt=0.05)
        self.gossip.accept(announce(alice), hops=0)
        record = self.registry.get(alice.peer_id)
        self.assertEqual(record.endpoint, ("198.51.100.2", 9))
        self.assertEqual(record.last_heard, NOW - 3)
        self.assertEqual(record.rtt, 0.05)

    def test_link_not_established_ignored(self):
        """A link still being set up tells the registry nothing."""
        alice = identity(2)
        self.links[alice.peer_id] = SimpleNamespace(
            established=False, address=("198.51.100.2", 9), last_heard=NOW - 3, rtt=0.05)
        self.gossip.accept(announce(alice), hops=0)
        record = self.registry.get(alice.peer_id)
        self.assertIsNone(record.endpoint)
        self.assertIsNone(record.rtt)

    def test_announce_from_announcer_answers_bootstrap(self):
        """An ANNOUNCE whose announcer is the sender answers a bootstrap; one relaying another's does not."""
        alice, bob = identity(2), identity(3)
        addr = ("198.51.100.2", 9)
        self.gossip.on_announce(frame(bob.peer_id), addr,
                                wire(MessageType.ANNOUNCE, hops=1, announcement=announce(alice)))
        self.assertEqual(self.answered, [])
        self.gossip.on_announce(frame(alice.peer_id), addr,
                                wire(MessageType.ANNOUNCE, hops=0, announcement=announce(alice)))
        self.assertEqual(self.answered, [(addr, alice.peer_id)])

    def test_announcer(self):
        """announcer names the claimed peer, or None for garbage."""
        alice = identity(2)
        self.assertEqual(announcer(announce(alice)), alice.peer_id)
        self.assertIsNone(announcer({"record": b"junk", "signature": bytes(64)}))


class RumourTests(GossipTestCase):
    def test_retransmit_limit(self):
        """
        A rumour goes out retransmit_mult * ceil(log10(n + 1)) times, each
        time to a peer not yet told, then is dropped.
        """
        alice = identity(2)
        self.active = [(identity(50 + k).peer_id, (f"198.51.100.{50 + k}", 1)) for k in range(10)]
        self.gossip.accept(announce(alice), hops=0)
        for _ in range(10):
            self.gossip.round()
        told = [s.address for s in self.sent.of(MessageType.PEER_LIST)
                if any(announcer(e["announcement"]) == alice.peer_id
                       for e in s.fields["announcements"])]
        # registry of 1: n = 2, ceil(log10(3)) = 1
        self.assertEqual(len(told), self.config.retransmit_mult)
        self.assertEqual(len(set(told)), len(told))
        self.assertNotIn(alice.peer_id, self.gossip.rumours)

    def test_rumour_every_active_peer_holds_is_done(self):
        """
        The peer a rumour came from holds it, and so does each peer it was
        sent to: once every active peer does, the rumour is done, whatever
        transmissions it had left.
        """
        alice, bob, carol = identity(2), identity(3), identity(4)
        self.active = [(bob.peer_id, ("198.51.100.3", 1)), (carol.peer_id, ("198.51.100.4", 1))]
        self.gossip.accept(announce(alice), hops=0, sender=bob.peer_id)
        self.gossip.round()
        self.assertEqual([s.address for s in self.sent], [("198.51.100.4", 1)])
        self.assertNotIn(alice.peer_id, self.gossip.rumours)

    def test_a_duplicate_marks_its_sender_told(self):
        """The same announcement from another peer: that peer is not sent it."""
        alice, bob, carol = identity(2), identity(3), identity(4)
        self.active = [(bob.peer_id, ("198.51.100.3", 1)), (carol.peer_id, ("198.51.100.4", 1))]
        signed = announce(alice)
        self.gossip.accept(signed, hops=0, sender=bob.peer_id)
        self.gossip.accept(signed, hops=0, sender=carol.peer_id)
        self.gossip.round()
        self.assertEqual(self.sent, [])
        self.assertNotIn(alice.peer_id, self.gossip.rumours)

    def test_retransmit_limit_grows_with_mesh(self):
        """In a mesh of ten or more the limit doubles (log10 of the size)."""
        for ident in self.peers(9):
            self.registry.accept(announce(ident), NOW)
        alice = identity(2)
        self.gossip.accept(announce(alice), hops=0)
        self.assertEqual(self.gossip.rumours[alice.peer_id].left, 2 * self.config.retransmit_mult)

    def test_round_to_fanout_targets(self):
        """
        A round looks at every active peer and sends the pending rumours to
        up to fanout of them, never a rumour to its origin.
        """
        alice, bob, carol = identity(2), identity(3), identity(4)
        self.active = [(alice.peer_id, ("198.51.100.2", 1)), (bob.peer_id, ("198.51.100.3", 1)),
                       (carol.peer_id, ("198.51.100.4", 1))]
        self.gossip.accept(announce(alice), hops=0)
        self.gossip.round()
        self.assertEqual(self.target_calls, [self.config.max_active])
        self.assertEqual(self.sent.to(("198.51.100.2", 1)), [])
        for address in (("198.51.100.3", 1), ("198.51.100.4", 1)):
            [sent] = self.sent.to(address)
            self.assertEqual(sent.type, MessageType.PEER_LIST)
            self.assertFalse(sent.fields["request"])
            self.assertEqual([announcer(e["announcement"]) for e in sent.fields["announcements"]],
                             [alice.peer_id])
            self.assertEqual(sent.fields["announcements"][0]["hops"], 1)

    def test_round_without_rumours_or_targets(self):
        """No rumours: no targets asked; no targets: nothing sent and the rumours wait."""
        self.gossip.round()
        self.assertEqual(self.target_calls, [])
        self.gossip.accept(announce(identity(2)), hops=0)
        left = self.gossip.rumours[identity(2).peer_id].left
        self.gossip.round()
        self.assertEqual(self.sent, [])
        self.assertEqual(self.gossip.rumours[identity(2).peer_id].left, left)

    def test_round_batch_fits_one_datagram(self):
        """A round sends each target one PEER_LIST within the budget, the least-sent rumours first."""
        for ident in self.peers(10, first=200):  # so every rumour below has the same limit
            self.registry.accept(announce(ident), NOW)
        for ident in self.peers(20):
            self.gossip.accept(announce(ident, name=f"peer-{ident.peer_id.hex()[:8]}"), hops=0)
        self.active = [(identity(50).peer_id, ("198.51.100.50", 1))]
        self.gossip.round()
        [first] = self.sent
        sizes = [entry_size(e) for e in first.fields["announcements"]]
        self.assertLessEqual(sum(sizes), PEER_LIST_BUDGET)
        self.assertLess(len(sizes), 20)
        self.sent.clear()
        self.gossip.round()
        sent_before = {announcer(e["announcement"]) for e in first.fields["announcements"]}
        sent_now = {announcer(e["announcement"]) for e in self.sent[0].fields["announcements"]}
        self.assertEqual(sent_before & sent_now, set())
        wire(MessageType.PEER_LIST, **self.sent[0].fields)  # a valid PEER_LIST body


class PeerListTests(GossipTestCase):
    def fill(self, count: int = 20) -> list[Identity]:
        idents = self.peers(count)
        for ident in idents:
            self.registry.accept(announce(ident, name=f"peer-{ident.peer_id.hex()[:8]}"), NOW)
        return idents

    def test_send_peer_list_batches(self):
        """The whole list goes out in datagrams within the budget, own announcement first, request on the first only."""
        idents = self.fill()
        self.gossip.send_peer_list(("198.51.100.9", 9), request=True)
        sent = self.sent.of(MessageType.PEER_LIST)
        self.assertGreater(len(sent), 1)
        for s in sent:
            self.assertLessEqual(sum(entry_size(e) for e in s.fields["announcements"]),
                                 PEER_LIST_BUDGET)
            wire(MessageType.PEER_LIST, **s.fields)
        self.assertEqual([s.fields["request"] for s in sent], [True] + [False] * (len(sent) - 1))
        entries = [e for s in sent for e in s.fields["announcements"]]
        self.assertEqual(announcer(entries[0]["announcement"]), OWN.peer_id)
        self.assertEqual(entries[0]["hops"], 0)
        self.assertEqual(sorted(announcer(e["announcement"]) for e in entries[1:]),
                         sorted(i.peer_id for i in idents))
        self.assertEqual({e["hops"] for e in entries[1:]}, {1})

    def test_small_list_one_datagram(self):
        """A list that fits is one datagram."""
        self.fill(2)
        self.gossip.send_peer_list(("198.51.100.9", 9), request=False)
        [sent] = self.sent
        self.assertEqual(len(sent.fields["announcements"]), 3)

    def test_request_from_proven_address_answered(self):
        """A request from a proven address gets our full list back (no request of its own)."""
        self.fill(2)
        alice, addr = identity(2), ("198.51.100.2", 9)
        self.proven.add((alice.peer_id, addr))
        self.gossip.on_peer_list(frame(alice.peer_id), addr, wire(
            MessageType.PEER_LIST, request=True,
            announcements=[{"hops": 0, "announcement": announce(alice)}]))
        self.assertIn(alice.peer_id, self.registry)
        self.assertEqual(self.answered, [(addr, alice.peer_id)])
        [sent] = self.sent.to(addr)
        self.assertFalse(sent.fields["request"])
        self.assertEqual(len(sent.fields["announcements"]), 4)

    def test_full_list_rate_limited(self):
        """A second request within peer_list_interval gets nothing; after it, the list again."""
        alice, addr = identity(2), ("198.51.100.2", 9)
        self.proven.add((alice.peer_id, addr))
        request = wire(MessageType.PEER_LIST, request=True, announcements=[])
        self.gossip.on_peer_list(frame(alice.peer_id), addr, request)
        self.assertEqual(len(self.sent), 1)
        self.clock.advance(self.config.peer_list_interval / 2)
        self.gossip.on_peer_list(frame(alice.peer_id), addr, request)
        self.assertEqual(len(self.sent), 1)
        self.clock.advance(self.config.peer_list_interval / 2)
        self.gossip.on_peer_list(frame(alice.peer_id), addr, request)
        self.assertEqual(len(self.sent), 2)

    def test_our_own_request_counts(self):
        """A full list we sent with a peer id counts against that peer's rate limit."""
        alice, addr = identity(2), ("198.51.100.2", 9)
        self.proven.add((alice.peer_id, addr))
        self.gossip.send_peer_list(addr, request=True, peer_id=alice.peer_id)
        self.sent.clear()
        self.gossip.on_peer_list(frame(alice.peer_id), addr,
                                 wire(MessageType.PEER_LIST, request=True, announcements=[]))
        self.assertEqual(self.sent, [])

    def test_request_from_unproven_address_dropped(self):
        """A request from an address no pong proved gets nothing (no amplification) and is counted."""
        alice = identity(2)
        self.proven.add((alice.peer_id, ("198.51.100.2", 9)))
        self.gossip.on_peer_list(frame(alice.peer_id), ("203.0.113.66", 9),
                                 wire(MessageType.PEER_LIST, request=True, announcements=[]))
        self.assertEqual(self.sent, [])
        self.assertEqual(self.basics.metrics.get("drops", reason="peer_list_unverified"), 1)

    def test_peer_list_entries_gossiped_on(self):
        """Entries of a peer list become rumours one hop further; only the sender's own answers a bootstrap."""
        alice, bob = identity(2), identity(3)
        addr = ("198.51.100.2", 9)
        self.gossip.on_peer_list(frame(alice.peer_id), addr, wire(
            MessageType.PEER_LIST, request=False,
            announcements=[{"hops": 2, "announcement": announce(bob)}]))
        self.assertEqual(self.gossip.rumours[bob.peer_id].hops, 3)
        self.assertEqual(self.answered, [])
        self.assertEqual(self.sent, [])
