"""
Freshness built alone: a L{Freshness} on a C{Clock} (L{fake_basics}) with
fakes for its targets, pings and candidate addresses.
"""

import random
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.mesh.freshness import Answer, Freshness, TokenBucket
from omerta.mesh.node import MeshConfig
from omerta.testing.fakes import SELF, fake_basics
from omerta.wire.messages import MessageType, PathKind, build_body, parse_body

ALICE, BOB, CAROL, DAVE, ERIN = (bytes([n]) * 16 for n in range(0xA1, 0xA6))
TARGET = bytes([0xEE]) * 16
ORIGIN = bytes([0xDD]) * 16


def addr(n: int) -> tuple:
    return (f"198.51.100.{n}", 7400)


def wire(msg_type, **fields):
    """
    A message as the freshness handlers receive it: built and parsed.
    """
    return parse_body(msg_type, build_body(msg_type, fields))


def frame(sender: bytes):
    return SimpleNamespace(sender=sender)


def direct(address: tuple) -> dict:
    return {"kind": PathKind.DIRECT, "endpoint": address, "via": bytes(16)}


class FreshnessTestCase(unittest.TestCase):
    config = MeshConfig()

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.basics, self.sent, self.events = fake_basics(config=self.config, clock=self.clock)
        self.active = [(ALICE, addr(1)), (BOB, addr(2)), (CAROL, addr(3)), (DAVE, addr(4))]
        self.target_calls: list[int] = []
        self.pings: list[tuple] = []
        self.candidates: list[tuple] = []
        self.freshness = Freshness(
            self.basics, rng=random.Random(0),
            targets=self.targets,
            ping=lambda peer_id, address: self.pings.append((peer_id, address)),
            candidate=lambda peer_id, address, heard: self.candidates.append(
                (peer_id, address, heard)),
        )
        self.addCleanup(self.freshness.stop)

    def targets(self, count, rng):
        self.target_calls.append(count)
        return self.active[:count]

    def query_message(self, query_id=7, origin=ORIGIN, target=TARGET, max_age_s=300, hops=0):
        return wire(MessageType.FRESHNESS_QUERY, query_id=query_id, origin=origin,
                    target=target, max_age_s=max_age_s, hops=hops)

    def answer_message(self, query_id, target=TARGET, heard_ago_ms=1000, endpoint=addr(99)):
        return wire(MessageType.FRESHNESS_ANSWER, query_id=query_id, target=target,
                    heard_ago_ms=heard_ago_ms, path=direct(endpoint))


class ContactTests(FreshnessTestCase):
    config = MeshConfig(contacts_kept=3, piggyback_contacts=2, contact_max_age=60.0)

    def test_recent_within_max_age(self):
        """A contact is recent until max_age has passed since it was heard."""
        self.freshness.heard(ALICE, addr(1), self.clock.seconds())
        self.clock.advance(30)
        contact = self.freshness.recent(ALICE, 30, self.clock.seconds())
        self.assertEqual((contact.peer_id, contact.address), (ALICE, addr(1)))
        self.clock.advance(1)
        self.assertIsNone(self.freshness.recent(ALICE, 30, self.clock.seconds()))
        self.assertIsNone(self.freshness.recent(BOB, 30, self.clock.seconds()))

    def test_latest_address_kept(self):
        """Hearing a peer again at another address replaces the contact."""
        now = self.clock.seconds()
        self.freshness.heard(ALICE, addr(1), now)
        self.freshness.heard(ALICE, addr(9), now + 1)
        self.assertEqual(self.freshness.contacts[ALICE].address, addr(9))
        self.assertEqual(self.freshness.contacts[ALICE].heard, now + 1)

    def test_bounded(self):
        """At most contacts_kept contacts; the one heard longest ago goes first."""
        now = self.clock.seconds()
        for peer in (ALICE, BOB, CAROL):
            self.freshness.heard(peer, addr(1), now)
        self.freshness.heard(ALICE, addr(1), now + 1)  # heard again: now the newest
        self.freshness.heard(DAVE, addr(4), now + 2)
        self.assertEqual(list(self.freshness.contacts), [CAROL, ALICE, DAVE])

    def test_contacts_for(self):
        """Piggybacked: at most piggyback_contacts, newest first, not the recipient's own, none too old."""
        now = self.clock.seconds()
        self.freshness.heard(ALICE, addr(1), now - 61)
        self.freshness.heard(BOB, addr(2), now - 10)
        self.freshness.heard(CAROL, addr(3), now - 5)
        self.assertEqual(self.freshness.contacts_for(DAVE), [
            {"peer_id": CAROL, "endpoint": addr(3), "age_ms": 5000},
            {"peer_id": BOB, "endpoint": addr(2), "age_ms": 10000},
        ])
        self.assertEqual([c["peer_id"] for c in self.freshness.contacts_for(CAROL)], [BOB])
        contacts = self.freshness.contacts_for(DAVE)
        wire(MessageType.PING, nonce=1, sent_ms=0, flags=0, padding=b"", contacts=contacts)  # fits a PING

    def test_learn_fresher_contact(self):
        """A piggybacked contact fresher than ours becomes a candidate address, dated by its age."""
        now = self.clock.seconds()
        self.freshness.heard(ALICE, addr(1), now - 20)
        self.freshness.heard(BOB, addr(2), now - 1)
        ping = wire(MessageType.PING, nonce=1, sent_ms=0, flags=0, padding=b"", contacts=[
            {"peer_id": ALICE, "endpoint": addr(11), "age_ms": 5000},
            {"peer_id": BOB, "endpoint": addr(12), "age_ms": 5000},
            {"peer_id": CAROL, "endpoint": addr(13), "age_ms": 2500},
        ])
        self.freshness.learn_contacts(ping.contacts)
        self.assertEqual(self.candidates, [(ALICE, addr(11), now - 5), (CAROL, addr(13), now - 2.5)])

    def test_learn_ignores_self(self):
        """A contact about this node itself is ignored."""
        ping = wire(MessageType.PING, nonce=1, sent_ms=0, flags=0, padding=b"",
                    contacts=[{"peer_id": SELF, "endpoint": addr(1), "age_ms": 0}])
        self.freshness.learn_contacts(ping.contacts)
        self.assertEqual(self.candidates, [])


class QueryTests(FreshnessTestCase):
    def test_query_sent_to_fanout(self):
        """A query goes to query_fanout active peers (never the target itself), at hop 0 from us."""
        self.active.insert(0, (TARGET, addr(50)))
        self.freshness.query(TARGET, 300)
        self.assertEqual(self.target_calls, [self.config.query_fanout])
        sent = self.sent.of(MessageType.FRESHNESS_QUERY)
        self.assertEqual([s.address for s in sent], [addr(1), addr(2)])
        for s in sent:
            self.assertEqual(s.fields["origin"], SELF)
            self.assertEqual(s.fields["target"], TARGET)
            self.assertEqual(s.fields["hops"], 0)
            self.assertEqual(s.fields["max_age_s"], 300)
        self.assertEqual(len({s.fields["query_id"] for s in sent}), 1)

    def test_timeout_fires_with_answers(self):
        """After query_timeout the Deferred fires with the answers, freshest first; not before."""
        d = self.freshness.query(TARGET, 300)
        query_id = self.sent[0].fields["query_id"]
        self.freshness.on_answer(frame(ALICE), addr(1),
                                 self.answer_message(query_id, heard_ago_ms=4000, endpoint=addr(60)))
        self.freshness.on_answer(frame(BOB), addr(2),
                                 self.answer_message(query_id, heard_ago_ms=1500, endpoint=addr(61)))
        self.freshness.on_answer(frame(CAROL), addr(3),
                                 self.answer_message(query_id, target=ALICE, endpoint=addr(62)))
        results = []
        d.addCallback(results.append)
        self.clock.advance(self.config.query_timeout - 0.01)
        self.assertEqual(results, [])
        self.clock.advance(0.01)
        self.assertEqual(results, [[Answer(addr(2), 1.5, addr(61)), Answer(addr(1), 4.0, addr(60))]])

    def test_timeout_without_answers(self):
        """A query nobody answers fires with an empty list."""
        d = self.freshness.query(TARGET, 300)
        self.clock.advance(self.config.query_timeout)
        self.assertEqual(self.successResultOf(d), [])

    def test_answered(self):
        """A peer that heard from the target within max age answers with when and where."""
        now = self.clock.seconds()
        self.freshness.heard(TARGET, addr(50), now - 12)
        self.freshness.on_query(frame(ALICE), addr(1), self.query_message(max_age_s=60))
        [answer] = self.sent
        self.assertEqual(answer.type, MessageType.FRESHNESS_ANSWER)
        self.assertEqual(answer.address, addr(1))
        self.assertEqual(answer.fields["query_id"], 7)
        self.assertEqual(answer.fields["heard_ago_ms"], 12000)
        self.assertEqual(answer.fields["path"]["endpoint"], addr(50))
        wire(MessageType.FRESHNESS_ANSWER, **answer.fields)

    def test_too_old_forwarded(self):
        """A contact older than the query's max age does not answer: the query is forwarded."""
        self.freshness.heard(TARGET, addr(50), self.clock.seconds() - 61)
        self.freshness.on_query(frame(ALICE), addr(1), self.query_message(max_age_s=60))
        self.assertEqual(self.sent.of(MessageType.FRESHNESS_ANSWER), [])
        self.assertTrue(self.sent.of(MessageType.FRESHNESS_QUERY))

    def test_forwarded(self):
        """Unanswered, a query goes on to forward_fanout active peers, one hop further."""
        self.active = [(BOB, addr(2)), (CAROL, addr(3)), (DAVE, addr(4))]
        self.freshness.on_query(frame(ALICE), addr(1), self.query_message(hops=1))
        self.assertEqual(self.target_calls, [self.config.forward_fanout + 1])
        sent = self.sent.of(MessageType.FRESHNESS_QUERY)
        self.assertEqual([s.address for s in sent], [addr(2), addr(3)])
        for s in sent:
            self.assertEqual(s.fields["hops"], 2)
            self.assertEqual(s.fields["origin"], ORIGIN)
            self.assertEqual(s.fields["target"], TARGET)
            self.assertEqual(s.fields["query_id"], 7)
        self.assertEqual(self.basics.metrics.get("freshness_queries", role="forwarded"), 1)

    def test_not_forwarded_to_sender_origin_or_target(self):
        """A query is never forwarded back to where it came from, to its origin or to its target."""
        self.active = [(ALICE, addr(1)), (ORIGIN, addr(5)), (TARGET, addr(6))]
        self.freshness.on_query(frame(ALICE), addr(1), self.query_message(hops=1))
        self.assertEqual(self.sent, [])

    def test_hop_limit(self):
        """A query that would reach query_hop_limit hops is not forwarded."""
        limit = self.config.query_hop_limit
        self.freshness.on_query(frame(ALICE), addr(1), self.query_message(query_id=1, hops=limit - 1))
        self.assertEqual(self.sent, [])
        self.freshness.on_query(frame(ALICE), addr(1), self.query_message(query_id=2, hops=limit - 2))
        self.assertEqual({s.fields["hops"] for s in self.sent}, {limit - 1})

    def test_duplicate(self):
        """The same (origin, query id) a second time is dropped and counted."""
        self.freshness.on_query(frame(ALICE), addr(1), self.query_message())
        count = len(self.sent)
        self.freshness.on_query(frame(BOB), addr(2), self.query_message())
        self.assertEqual(len(self.sent), count)
        self.assertEqual(self.basics.metrics.get("freshness_duplicates"), 1)
        # another origin's query with the same id is a different query
        self.freshness.on_query(frame(BOB), addr(2), self.query_message(origin=ALICE))
        self.assertGreater(len(self.sent), count)

    def test_own_query_not_forwarded_back(self):
        """Our own query coming back to us is a duplicate."""
        self.freshness.query(TARGET, 300)
        query_id = self.sent[0].fields["query_id"]
        self.sent.clear()
        self.freshness.on_query(frame(ALICE), addr(1), self.query_message(
            query_id=query_id, origin=SELF, hops=1))
        self.assertEqual(self.sent, [])


class RateTests(FreshnessTestCase):
    config = MeshConfig(query_rate=1.0)

    def test_forwarding_rate_limited(self):
        """Forwarding takes a token (bucket of 2 * query_rate, refilled at query_rate a second)."""
        for query_id in range(3):
            self.freshness.on_query(frame(ALICE), addr(1), self.query_message(query_id=query_id))
        forwarded = {s.fields["query_id"] for s in self.sent.of(MessageType.FRESHNESS_QUERY)}
        self.assertEqual(forwarded, {0, 1})
        self.assertEqual(self.basics.metrics.get("drops", reason="query_rate"), 1)
        self.clock.advance(1)
        self.freshness.on_query(frame(ALICE), addr(1), self.query_message(query_id=3))
        forwarded = {s.fields["query_id"] for s in self.sent.of(MessageType.FRESHNESS_QUERY)}
        self.assertEqual(forwarded, {0, 1, 3})

    def test_answering_not_rate_limited(self):
        """Answering from our own contacts costs no token."""
        self.freshness.heard(TARGET, addr(50), self.clock.seconds())
        for query_id in range(5):
            self.freshness.on_query(frame(ALICE), addr(1), self.query_message(query_id=query_id))
        self.assertEqual(len(self.sent.of(MessageType.FRESHNESS_ANSWER)), 5)

    def test_token_bucket(self):
        """The bucket holds burst tokens and refills at rate per second, never above burst."""
        bucket = TokenBucket(rate=2, burst=3, now=0)
        self.assertEqual([bucket.take(0) for _ in range(4)], [True, True, True, False])
        self.assertTrue(bucket.take(0.5))
        self.assertFalse(bucket.take(0.5))
        self.assertEqual([bucket.take(100) for _ in range(4)], [True, True, True, False])


class AnswerRoutingTests(FreshnessTestCase):
    def test_answer_routed_back(self):
        """An answer to a query we forwarded goes back to the hop the query came from, unchanged."""
        self.freshness.on_query(frame(ERIN), addr(30), self.query_message(query_id=42))
        self.sent.clear()
        self.freshness.on_answer(frame(ALICE), addr(1), self.answer_message(
            42, heard_ago_ms=2500, endpoint=addr(70)))
        [back] = self.sent
        self.assertEqual(back.address, addr(30))
        self.assertEqual(back.type, MessageType.FRESHNESS_ANSWER)
        self.assertEqual(back.fields["query_id"], 42)
        self.assertEqual(back.fields["heard_ago_ms"], 2500)
        self.assertEqual(back.fields["target"], TARGET)
        self.assertEqual(tuple(back.fields["path"]["endpoint"]), addr(70))
        wire(MessageType.FRESHNESS_ANSWER, **back.fields)

    def test_unknown_answer_dropped(self):
        """An answer to a query we never saw goes nowhere."""
        self.freshness.on_answer(frame(ALICE), addr(1), self.answer_message(1234))
        self.assertEqual(self.sent, [])


class MemoryTests(FreshnessTestCase):
    config = MeshConfig(query_memory=2)

    def test_routes_forgotten(self):
        """Only query_memory queries are remembered; the oldest route back is forgotten."""
        for query_id in (1, 2, 3):
            self.freshness.on_query(frame(ERIN), addr(30 + query_id),
                                    self.query_message(query_id=query_id))
        self.sent.clear()
        self.freshness.on_answer(frame(ALICE), addr(1), self.answer_message(1))
        self.assertEqual(self.sent, [])
        self.freshness.on_answer(frame(ALICE), addr(1), self.answer_message(3))
        self.assertEqual([s.address for s in self.sent], [addr(33)])


class StaleTests(FreshnessTestCase):
    def test_peer_stale_pings_freshest_other_address(self):
        """peer_stale asks the mesh and pings the freshest address other than the stale one."""
        stale = addr(60)
        d = self.freshness.peer_stale(TARGET, stale)
        query_id = self.sent[0].fields["query_id"]
        self.assertEqual(self.sent[0].fields["max_age_s"], int(self.config.contact_max_age))
        for responder, ago, endpoint in ((ALICE, 500, stale), (BOB, 3000, addr(61)),
                                         (CAROL, 1000, addr(62))):
            self.freshness.on_answer(frame(responder), self.active[0][1], self.answer_message(
                query_id, heard_ago_ms=ago, endpoint=endpoint))
        self.assertEqual(self.pings, [])
        self.clock.advance(self.config.query_timeout)
        self.assertEqual(self.pings, [(TARGET, addr(62))])
        self.assertEqual(self.successResultOf(d).address, addr(62))
        self.assertEqual(self.basics.metrics.get("freshness_recoveries_tried"), 1)

    def test_peer_stale_twice_asks_once(self):
        """A second peer_stale while the first query is out waits for its answer."""
        first = self.freshness.peer_stale(TARGET, addr(60))
        sent = len(self.sent)
        second = self.freshness.peer_stale(TARGET, addr(60))
        self.assertEqual(len(self.sent), sent)
        query_id = self.sent[0].fields["query_id"]
        self.freshness.on_answer(frame(ALICE), addr(1),
                                 self.answer_message(query_id, endpoint=addr(62)))
        self.clock.advance(self.config.query_timeout)
        self.assertEqual(self.successResultOf(first).address, addr(62))
        self.assertEqual(self.successResultOf(second).address, addr(62))
        self.assertEqual(self.pings, [(TARGET, addr(62))])
        self.freshness.peer_stale(TARGET, addr(62))  # (a new query once that one is done)
        self.assertGreater(len(self.sent), sent)

    def test_peer_stale_nothing_fresher(self):
        """Only the stale address known: no ping, the Deferred fires None."""
        d = self.freshness.peer_stale(TARGET, addr(60))
        query_id = self.sent[0].fields["query_id"]
        self.freshness.on_answer(frame(ALICE), addr(1),
                                 self.answer_message(query_id, endpoint=addr(60)))
        self.clock.advance(self.config.query_timeout)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.pings, [])

    def test_stop_cancels_timeouts(self):
        """stop cancels the pending query timeouts."""
        self.freshness.query(TARGET, 300)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.freshness.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_ends_queries_with_no_answers(self):
        """Whoever waits on a query in flight is not left waiting at stop, and nothing is pinged."""
        d = self.freshness.query(TARGET, 300)
        stale = self.freshness.peer_stale(TARGET, addr(50))
        self.freshness.stop()
        self.assertEqual(self.successResultOf(d), [])
        self.assertIsNone(self.successResultOf(stale))
        self.assertEqual(self.pings, [])


class PathFailedTests(FreshnessTestCase):
    def test_path_failed_drops_and_tells(self):
        """path_failed drops that contact and tells query_fanout active peers, once per (peer, address)."""
        self.freshness.heard(TARGET, addr(50), self.clock.seconds())
        self.freshness.path_failed(TARGET, addr(50))
        self.assertNotIn(TARGET, self.freshness.contacts)
        self.assertEqual(self.target_calls, [self.config.query_fanout])
        sent = self.sent.of(MessageType.PATH_FAILED)
        self.assertEqual([s.address for s in sent], [addr(1), addr(2), addr(3)])
        self.assertEqual(sent[0].fields["target"], TARGET)
        self.assertEqual(sent[0].fields["path"]["endpoint"], addr(50))
        wire(MessageType.PATH_FAILED, **sent[0].fields)
        self.freshness.path_failed(TARGET, addr(50))
        self.assertEqual(len(self.sent), 3)
        self.freshness.path_failed(TARGET, addr(51))
        self.assertEqual(len(self.sent), 6)

    def test_path_failed_keeps_other_address(self):
        """A failed address other than the contact's leaves the contact alone."""
        self.freshness.heard(TARGET, addr(50), self.clock.seconds())
        self.freshness.path_failed(TARGET, addr(51))
        self.assertEqual(self.freshness.contacts[TARGET].address, addr(50))

    def test_on_path_failed_drops_contact(self):
        """A PATH_FAILED report drops our contact at that address if we have not heard it within keepalive."""
        self.freshness.heard(TARGET, addr(50), self.clock.seconds())
        self.clock.advance(self.config.keepalive + 1)
        self.freshness.on_path_failed(frame(ALICE), addr(1), wire(
            MessageType.PATH_FAILED, target=TARGET, path=direct(addr(50))))
        self.assertNotIn(TARGET, self.freshness.contacts)
        self.assertEqual(self.basics.metrics.get("freshness_paths_forgotten"), 1)
        self.assertEqual(self.sent, [])  # not passed on

    def test_on_path_failed_recent_contact_kept(self):
        """A report about an address we heard from within keepalive is not believed."""
        self.freshness.heard(TARGET, addr(50), self.clock.seconds())
        self.clock.advance(self.config.keepalive)
        self.freshness.on_path_failed(frame(ALICE), addr(1), wire(
            MessageType.PATH_FAILED, target=TARGET, path=direct(addr(50))))
        self.assertIn(TARGET, self.freshness.contacts)

    def test_on_path_failed_other_address(self):
        """A report about another address of the peer leaves our contact alone."""
        self.freshness.heard(TARGET, addr(50), self.clock.seconds())
        self.clock.advance(self.config.keepalive + 1)
        self.freshness.on_path_failed(frame(ALICE), addr(1), wire(
            MessageType.PATH_FAILED, target=TARGET, path=direct(addr(51))))
        self.assertIn(TARGET, self.freshness.contacts)
