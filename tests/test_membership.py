"""
Membership built alone: L{Membership} on a C{Clock} with a real
L{PeerRegistry} and real signed announcements; the links, targets and
refutation are fakes that record what they were asked.
"""

import math
import random
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.mesh.membership import MAX_SUSPICIONS, Membership, leave_message, notice
from omerta.mesh.node import MeshConfig
from omerta.mesh.registry import PeerRegistry, Requirements
from omerta.testing.fakes import NETWORK, fake_basics
from omerta.wire.messages import MessageType, NoticeKind, build_body, parse_body
from tests.test_gossip import NOW, OWN, announce, identity

PEERS = [identity(10 + i) for i in range(5)]
X = PEERS[0]
AT = {p.peer_id: ("198.51.100.%d" % (10 + i), 7400) for i, p in enumerate(PEERS)}


def wire_notices(*entries):
    body = build_body(MessageType.MEMBERSHIP, notices=list(entries))
    return parse_body(MessageType.MEMBERSHIP, body)


class MembershipTestCase(unittest.TestCase):
    config = MeshConfig()

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.basics, self.sent, self.events = fake_basics(
            config=self.config, clock=self.clock, identity=OWN)
        self.registry = PeerRegistry(NETWORK, OWN.peer_id)
        for peer in PEERS:
            self.registry.accept(announce(peer, sequence=5), NOW)
        self.own_sequence = 100
        self.refuted, self.dropped, self.health = [], [], []
        self.links = {X.peer_id: AT[X.peer_id]}
        self.membership = Membership(
            self.basics, self.registry, rng=random.Random(1),
            own_sequence=lambda: self.own_sequence,
            refute=self.refuted.append,
            targets=lambda count, rng: [(p.peer_id, AT[p.peer_id]) for p in PEERS[1:]][:count],
            link_address=self.links.get,
            drop_link=self.dropped.append,
            health=self.health.append)

    def state(self, peer=X):
        return self.registry.get(peer.peer_id).state

    def notices_sent(self, to=None):
        return [n for s in self.sent.of(MessageType.MEMBERSHIP)
                if to is None or s.address == to for n in s.fields["notices"]]

    def hear(self, kind, peer=X, sequence=5, by=None, signature=b"", source=("203.0.113.9", 1),
             sender=None):
        by = by if by is not None else PEERS[1].peer_id
        self.membership.on_membership(SimpleNamespace(sender=sender), source, wire_notices(
            notice(kind, peer.peer_id, sequence, by, signature)))

    def advance(self, seconds, step=0.2):
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)
            self.membership.round()

    def low(self):
        return self.config.suspicion_mult * math.log10(max(len(self.registry) + 1, 10))


class SuspicionTests(MembershipTestCase):
    def test_own_evidence_starts_a_suspicion_that_spreads(self):
        """Unreachable: suspect in the registry, a SUSPECT rumour by us, and the suspect told directly."""
        self.membership.suspect(X.peer_id)
        self.assertEqual(self.state(), "suspect")
        self.assertEqual([d["peer_id"] for k, d in self.events if k == "member_suspected"],
                         [X.peer_id])
        [direct] = self.notices_sent(AT[X.peer_id])
        self.assertEqual((direct["kind"], direct["sequence"], direct["by"]),
                         (NoticeKind.SUSPECT, 5, OWN.peer_id))
        del self.sent[:]
        self.advance(0.2)
        self.assertEqual(len(self.notices_sent()), self.config.fanout)

    def test_unrefuted_suspicion_ends_in_death_after_the_longest_timeout(self):
        """Alone, a suspicion lasts suspicion_max_mult * log10(n), then the peer is gone and a DEAD notice spreads."""
        self.membership.suspect(X.peer_id)
        longest = self.config.suspicion_max_mult * self.low()
        self.advance(longest - 0.4)
        self.assertEqual(self.state(), "suspect")
        self.advance(0.6)
        self.assertEqual(self.state(), "offline")
        self.assertEqual(self.registry.get(X.peer_id).gone, "failed")
        self.assertEqual(self.dropped, [X.peer_id])
        self.assertEqual([(d["peer_id"], d["reason"]) for k, d in self.events if k == "peer_gone"],
                         [(X.peer_id, "failed")])
        self.assertIn(NoticeKind.DEAD, [n["kind"] for n in self.notices_sent()])
        self.assertNotIn(X.peer_id, [p.peer_id for p in self.registry.find_peers(
            Requirements(online_only=False), max_results=10)])

    def test_confirmations_shorten_the_timeout_to_the_minimum(self):
        """Independent suspecters bring the timeout down to suspicion_mult * log10(n) (Lifeguard)."""
        self.membership.suspect(X.peer_id)
        for other in PEERS[1:1 + self.config.suspicion_confirmations]:
            self.hear(NoticeKind.SUSPECT, by=other.peer_id)
        [suspicion] = self.membership.suspicions.values()
        self.assertAlmostEqual(self.membership.timeout(suspicion), self.low())
        self.advance(self.low() + 0.2)
        self.assertEqual(self.state(), "offline")

    def test_the_same_suspecter_twice_is_one_confirmation(self):
        """A rumour repeated by the same node does not shorten the timeout."""
        self.hear(NoticeKind.SUSPECT, by=PEERS[1].peer_id)
        [suspicion] = self.membership.suspicions.values()
        first = self.membership.timeout(suspicion)
        for _ in range(5):
            self.hear(NoticeKind.SUSPECT, by=PEERS[1].peer_id)
        self.assertEqual(self.membership.timeout(suspicion), first)
        self.assertEqual(first, self.config.suspicion_max_mult * self.low())

    def test_timeouts_grow_with_the_network(self):
        """The minimum and maximum grow with log10 of the registry's size."""
        self.membership.suspect(X.peer_id)
        [suspicion] = self.membership.suspicions.values()
        small = self.membership.timeout(suspicion)
        for i in range(200):
            self.registry.accept(announce(identity(1000 + i)), NOW)
        self.assertGreater(self.membership.timeout(suspicion), small)

    def test_a_newer_announcement_refutes(self):
        """The suspect's newer sequence ends the suspicion everywhere it arrives."""
        self.membership.suspect(X.peer_id)
        self.registry.accept(announce(X, sequence=6), NOW)
        self.assertEqual(self.state(), "unknown")
        self.advance(self.config.suspicion_max_mult * self.low() + 1)
        self.assertEqual(self.state(), "unknown")
        self.assertEqual(self.membership.suspicions, {})

    def test_a_direct_frame_clears_our_suspicion(self):
        """Heard from directly while suspected: online here, and the timer is dropped."""
        self.membership.suspect(X.peer_id)
        self.registry.heard_from(X.peer_id, AT[X.peer_id], NOW + 1)
        self.advance(self.config.suspicion_max_mult * self.low() + 1)
        self.assertEqual(self.state(), "online")

    def test_notices_of_another_sequence_or_unknown_peers_are_dropped(self):
        """A notice never makes this node believe more than the announcements it holds."""
        self.hear(NoticeKind.SUSPECT, sequence=4)
        self.hear(NoticeKind.DEAD, sequence=6)
        self.hear(NoticeKind.DEAD, peer=identity(999))
        self.assertEqual(self.state(), "unknown")
        self.assertEqual(self.basics.metrics.get("membership_notices", outcome="stale"), 3)

    def test_suspicions_are_bounded(self):
        """Beyond MAX_SUSPICIONS, new suspicions are refused and counted."""
        for i in range(MAX_SUSPICIONS + 5):
            peer = identity(5000 + i)
            self.registry.accept(announce(peer), NOW)
            self.membership.suspect(peer.peer_id)
        self.assertEqual(len(self.membership.suspicions), MAX_SUSPICIONS)
        self.assertEqual(self.basics.metrics.get("membership_refused", reason="suspicions_full"), 5)


class DeathTests(MembershipTestCase):
    def test_dead_notice_is_believed_and_spread(self):
        """DEAD under the held sequence: gone at once, link dropped, rumour passed on."""
        self.hear(NoticeKind.DEAD)
        self.assertEqual(self.state(), "offline")
        self.assertEqual(self.dropped, [X.peer_id])
        self.advance(0.2)
        self.assertTrue(any(n["kind"] == NoticeKind.DEAD for n in self.notices_sent()))

    def test_notices_go_to_peers_not_known_to_hold_them(self):
        """
        A DEAD notice is not sent back to the peers it came from, goes once
        to each other active peer, and is done when every one holds it.
        """
        self.hear(NoticeKind.DEAD, sender=PEERS[1].peer_id)
        self.hear(NoticeKind.DEAD, by=PEERS[3].peer_id, sender=PEERS[2].peer_id)  # a duplicate
        self.advance(0.2)
        told = [s.address for s in self.sent.of(MessageType.MEMBERSHIP)]
        self.assertEqual(sorted(told), sorted([AT[PEERS[3].peer_id], AT[PEERS[4].peer_id]]))
        self.assertEqual(self.membership.rumours, {})
        del self.sent[:]
        self.advance(2)
        self.assertEqual(self.sent.of(MessageType.MEMBERSHIP), [])

    def test_a_frame_does_not_revive_the_dead_but_a_newer_announcement_does(self):
        """heard_from leaves a dead peer offline; its refutation brings it back."""
        self.hear(NoticeKind.DEAD)
        self.registry.heard_from(X.peer_id, AT[X.peer_id], NOW + 1)
        self.assertEqual(self.state(), "offline")
        self.registry.accept(announce(X, sequence=7), NOW + 2)
        self.assertEqual(self.state(), "unknown")
        self.assertIsNone(self.registry.get(X.peer_id).gone)

    def test_tell_is_rate_limited(self):
        """A dead peer's news goes to one address at most once per TELL_INTERVAL."""
        self.hear(NoticeKind.DEAD)
        del self.sent[:]
        for _ in range(3):
            self.membership.tell(X.peer_id, AT[X.peer_id])
        self.assertEqual(len(self.notices_sent(AT[X.peer_id])), 1)
        self.clock.advance(5)
        self.membership.tell(X.peer_id, AT[X.peer_id])
        self.assertEqual(len(self.notices_sent(AT[X.peer_id])), 2)
        self.membership.tell(PEERS[1].peer_id, AT[X.peer_id])  # alive: nothing to tell
        self.assertEqual(len(self.notices_sent(AT[X.peer_id])), 2)


class RefutationTests(MembershipTestCase):
    def test_suspicion_of_this_node_is_refuted_once_per_incarnation(self):
        """A SUSPECT or DEAD about our current sequence makes us re-announce, once, and lowers our health."""
        source = ("203.0.113.9", 1)
        self.hear(NoticeKind.SUSPECT, peer=OWN, sequence=100, source=source)
        self.hear(NoticeKind.DEAD, peer=OWN, sequence=100, source=source)
        self.assertEqual(self.refuted, [source])
        self.assertEqual(self.health, [+1])
        self.own_sequence = 101
        self.hear(NoticeKind.DEAD, peer=OWN, sequence=100)
        self.assertEqual(len(self.refuted), 1)  # about an earlier incarnation
        self.hear(NoticeKind.DEAD, peer=OWN, sequence=101)
        self.assertEqual(len(self.refuted), 2)


class LeaveTests(MembershipTestCase):
    def test_leave_is_signed_and_sent_to_every_active_peer(self):
        """leave() sends a LEFT notice with our signature to each target."""
        self.membership.leave()
        sent = self.sent.of(MessageType.MEMBERSHIP)
        self.assertEqual({s.address for s in sent}, {AT[p.peer_id] for p in PEERS[1:]})
        [entry] = sent[0].fields["notices"]
        self.assertEqual((entry["kind"], entry["peer"], entry["sequence"]),
                         (NoticeKind.LEFT, OWN.peer_id, 100))
        self.assertEqual(entry["signature"], OWN.sign(leave_message(NETWORK, OWN.peer_id, 100)))

    def test_a_signed_leave_is_gone_at_once(self):
        """A LEFT notice signed by the peer: gone ("left") at once, and passed on."""
        signature = X.sign(leave_message(NETWORK, X.peer_id, 5))
        self.hear(NoticeKind.LEFT, by=bytes(16), signature=signature)
        self.assertEqual(self.state(), "offline")
        self.assertEqual(self.registry.get(X.peer_id).gone, "left")
        self.advance(0.2)
        self.assertTrue(any(n["kind"] == NoticeKind.LEFT for n in self.notices_sent()))

    def test_a_leave_under_a_newer_sequence_holds_against_older_announcements(self):
        """
        A leave signed under a sequence not seen here yet is believed, and
        the announcements up to that sequence arriving late do not revive
        the peer; a later one (it came back) does.
        """
        signature = X.sign(leave_message(NETWORK, X.peer_id, 7))
        self.hear(NoticeKind.LEFT, sequence=7, by=bytes(16), signature=signature)
        self.assertEqual(self.state(), "offline")
        self.registry.accept(announce(X, sequence=7), NOW)
        self.assertEqual((self.state(), self.registry.get(X.peer_id).gone), ("offline", "left"))
        self.registry.accept(announce(X, sequence=8), NOW)
        self.assertEqual(self.state(), "unknown")

    def test_a_leave_in_someone_elses_name_is_refused(self):
        """Signed by another key, or over another sequence: refused and counted."""
        self.hear(NoticeKind.LEFT, signature=PEERS[1].sign(leave_message(NETWORK, X.peer_id, 5)))
        self.hear(NoticeKind.LEFT, signature=X.sign(leave_message(NETWORK, X.peer_id, 4)))
        self.assertEqual(self.state(), "unknown")
        self.assertEqual(self.basics.metrics.get("membership_notices", outcome="bad_signature"), 2)
