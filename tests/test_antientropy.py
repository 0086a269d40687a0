"""
Digest-based anti-entropy between two members built alone: each an
L{AntiEntropy} on a C{Clock} with a real L{PeerRegistry} and real signed
announcements; what one sends is parsed and handed to the other.
"""

import random
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.mesh.antientropy import SUMMARY_BUCKETS, AntiEntropy, bucket_count
from omerta.mesh.node import MeshConfig
from omerta.mesh.registry import PeerRegistry
from omerta.testing.fakes import NETWORK, fake_basics
from omerta.wire.messages import MessageType, build_body, parse_body
from tests.test_gossip import NOW, announce, identity

PEOPLE = [identity(100 + i) for i in range(300)]
SIGNED = {p.peer_id: announce(p, sequence=3) for p in PEOPLE}


class Side:
    """One member: its registry, its anti-entropy, what it sent."""

    def __init__(self, ident, address, clock):
        self.identity = ident
        self.address = address
        self.basics, self.sent, _ = fake_basics(config=MeshConfig(), clock=clock,
                                                identity=ident)
        self.registry = PeerRegistry(NETWORK, ident.peer_id)
        self.records_sent: list = []
        self.told: list = []
        self.verified = True
        self.sync = AntiEntropy(
            self.basics, self.registry, rng=random.Random(2),
            own_sequence=lambda: 9,
            targets=lambda count, rng: [(self.other.identity.peer_id, self.other.address)],
            verified=lambda peer_id, address: self.verified,
            send_records=lambda address, records: self.records_sent.append(list(records)),
            tell_gone=lambda peer_id, address: self.told.append((peer_id, address)))
        self.registry.accept(announce(ident, sequence=9), NOW)  # (own: refused, not held)

    def hold(self, people, sequence=3):
        for person in people:
            signed = SIGNED[person.peer_id] if sequence == 3 else announce(person, sequence)
            self.registry.accept(signed, NOW)


class AntiEntropyTests(unittest.TestCase):
    def setUp(self):
        clock = Clock()
        clock.advance(NOW)
        self.a = Side(identity(1), ("198.51.100.1", 7400), clock)
        self.b = Side(identity(2), ("198.51.100.2", 7400), clock)
        self.a.other, self.b.other = self.b, self.a
        # each holds the other, as members that talk do
        self.a.registry.accept(announce(self.b.identity, sequence=9), NOW)
        self.b.registry.accept(announce(self.a.identity, sequence=9), NOW)

    def pump(self, rounds=5):
        """Deliver what each side sent to the other, until nothing is left."""
        for _ in range(rounds):
            moved = False
            for side in (self.a, self.b):
                for sent in list(side.sent):
                    side.sent.remove(sent)
                    moved = True
                    message = parse_body(sent.type, build_body(sent.type, sent.fields))
                    handler = {MessageType.SYNC_DIGEST: side.other.sync.on_digest,
                               MessageType.SYNC_SUMMARY: side.other.sync.on_summary}[sent.type]
                    handler(SimpleNamespace(sender=side.identity.peer_id), side.address, message)
                for batch in side.records_sent:
                    moved = True
                    for record in batch:
                        side.other.registry.accept(record.signed, NOW)
                side.records_sent.clear()
            if not moved:
                return

    def digests_sent(self, side):
        return [s for s in side.sent.of(MessageType.SYNC_DIGEST)]

    def test_in_step_costs_one_digest(self):
        """Registries that agree exchange one digest and nothing else."""
        self.a.hold(PEOPLE)
        self.b.hold(PEOPLE)
        self.a.sync.sync()
        [digest] = self.digests_sent(self.a)
        self.assertEqual(digest.fields["buckets"], bucket_count(len(PEOPLE) + 2))
        self.pump()
        self.assertEqual(self.a.basics.metrics.get("sync_digests", outcome="in_step")
                         + self.b.basics.metrics.get("sync_digests", outcome="in_step"), 1)
        self.assertEqual(self.b.sent, [])

    def test_missing_and_older_records_are_exchanged_both_ways(self):
        """Each side ends up with what only the other held, and the newer of two sequences."""
        self.a.hold(PEOPLE[:250])
        self.b.hold(PEOPLE[5:])
        self.b.hold(PEOPLE[100:102], sequence=4)
        for _ in range(40):
            self.a.sync.sync()
            self.pump()
        self.assertEqual(self.a.registry.digest(16, ((self.a.identity.peer_id, 9),)),
                         self.b.registry.digest(16, ((self.b.identity.peer_id, 9),)))
        self.assertEqual(self.a.registry.get(PEOPLE[100].peer_id).sequence, 4)
        self.assertIn(PEOPLE[0].peer_id, self.b.registry)
        self.assertIn(PEOPLE[299].peer_id, self.a.registry)

    def test_an_answer_summarises_a_few_buckets(self):
        """A digest that differs in a few buckets is answered with at most SUMMARY_BUCKETS."""
        self.a.hold(PEOPLE)
        self.b.hold(PEOPLE)
        # six records missing over there, each in a bucket of its own
        gone, buckets = [], set()
        width = bucket_count(len(PEOPLE) + 2)
        for person in PEOPLE:
            if person.peer_id[0] % width not in buckets and len(gone) < 6:
                buckets.add(person.peer_id[0] % width)
                gone.append(person)
        for person in gone:
            self.b.registry.remove(person.peer_id)
        self.a.sync.sync()
        [digest] = self.a.sent
        self.a.sent.remove(digest)
        message = parse_body(MessageType.SYNC_DIGEST, build_body(MessageType.SYNC_DIGEST,
                                                                   digest.fields))
        self.b.sync.on_digest(SimpleNamespace(sender=self.a.identity.peer_id), self.a.address,
                              message)
        buckets = {i for s in self.b.sent.of(MessageType.SYNC_SUMMARY) for i in s.fields["indices"]}
        self.assertLessEqual(len(buckets), SUMMARY_BUCKETS)
        self.assertTrue(buckets)

    def test_far_apart_gets_the_whole_list_once_in_a_while(self):
        """
        A digest that differs in most buckets is answered with every live
        record (a starting node), at most once per FULL_LIST_INTERVAL.
        """
        self.b.hold(PEOPLE)
        self.a.sync.sync()
        self.pump(rounds=1)
        self.assertEqual(self.b.basics.metrics.get("sync_digests", outcome="far_apart"), 1)
        self.assertEqual(len(self.a.registry), len(PEOPLE) + 1)
        for person in PEOPLE[:250]:
            self.a.registry.remove(person.peer_id)
        self.a.sync.sync()
        self.pump(rounds=1)
        self.assertEqual(self.b.basics.metrics.get("sync_digests", outcome="far_apart"), 1)

    def test_a_peer_dead_here_is_told_not_sent(self):
        """Held alive over there and dead here under the same sequence: the other side is told."""
        self.a.hold(PEOPLE[:20])
        self.b.hold(PEOPLE[:20])
        dead = PEOPLE[7].peer_id
        self.a.registry.set_state(dead, "offline", NOW, gone="failed")
        for _ in range(20):
            self.a.sync.sync()
            self.pump()
        self.assertIn((dead, self.b.address), self.a.told)
        self.assertEqual(self.b.registry.get(dead).state, "unknown")  # (the notice does that)

    def test_unproven_senders_and_odd_widths_get_nothing(self):
        """Only an address a pong proved is answered; a width that is not a power of two is dropped."""
        self.a.hold(PEOPLE)
        self.b.verified = False
        self.a.sync.sync()
        self.pump()
        self.assertEqual(self.b.basics.metrics.get("drops", reason="sync_unverified"), 1)
        self.b.verified = True
        for buckets in (0, 3, 512):
            message = parse_body(MessageType.SYNC_DIGEST, build_body(
                MessageType.SYNC_DIGEST, buckets=buckets, hashes=[0] * min(buckets, 8)))
            self.b.sync.on_digest(SimpleNamespace(sender=self.a.identity.peer_id),
                                  self.a.address, message)
        self.assertEqual(self.b.basics.metrics.get("drops", reason="sync_malformed"), 3)
        self.assertEqual(self.b.sent, [])

    def test_a_digest_costs_no_work_per_record(self):
        """Building a digest of a large registry touches no record."""
        self.a.hold(PEOPLE)
        self.a.registry.work = 0
        self.a.sync.sync()
        self.assertEqual(self.a.registry.work, 0)
        self.assertLessEqual(len(self.a.sent[0].fields["hashes"]), 256)

    def test_digest_follows_every_change(self):
        """Adding, replacing, declaring dead and removing all change the digest, and undoing restores it."""
        self.a.hold(PEOPLE[:10])
        registry, person = self.a.registry, PEOPLE[3].peer_id
        before = registry.digest(1)
        registry.set_state(person, "offline", NOW, gone="failed")
        dead = registry.digest(1)
        self.assertNotEqual(dead, before)
        self.a.hold([PEOPLE[3]], sequence=4)
        self.assertNotIn(registry.digest(1), (before, dead))
        registry.remove(person)
        registry.accept(SIGNED[person], NOW)
        self.assertEqual(registry.digest(1), before)
