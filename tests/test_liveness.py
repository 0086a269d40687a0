"""
Liveness built alone: keepalives, pongs proving a path, suspicion with
indirect probes, offline, challenges that never amplify, on a Clock with
fakes for every collaborator.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from twisted.trial import unittest

from omerta.mesh.liveness import CHALLENGE_SIZE, UNKNOWN_ENDPOINT, Liveness
from omerta.mesh.peer import Connections, RelayRoute, State
from omerta.testing.fakes import fake_basics
from omerta.wire.messages import MessageType

PEER, HELPER = b"\x0a" * 16, b"\x0b" * 16
AT, ELSEWHERE, HELPER_AT = ("198.51.100.7", 7400), ("203.0.113.9", 40000), ("198.51.100.8", 7400)


class FakeRegistry:
    def __init__(self):
        self.states, self.rtts = [], {}

    def set_state(self, peer_id, state, now):
        self.states.append((peer_id, state))

    def set_rtt(self, peer_id, rtt):
        self.rtts[peer_id] = rtt

    def all(self):
        return []


class FakeFreshness:
    def __init__(self):
        self.stale, self.failed, self.learnt = [], [], []

    def contacts_for(self, peer_id):
        return []

    def learn_contacts(self, contacts):
        self.learnt.extend(contacts)

    def peer_stale(self, peer_id, address):
        self.stale.append((peer_id, address))

    def path_failed(self, peer_id, address):
        self.failed.append((peer_id, address))


class LivenessTests(unittest.TestCase):
    def setUp(self):
        self.basics, self.sent, self.events = fake_basics()
        self.clock = self.basics.clock
        self.config = self.basics.config
        self.connections = Connections(self.basics.emit, lambda frame, address: None)
        self.registry = FakeRegistry()
        self.freshness = FakeFreshness()
        self.path_failed_result = False
        self.failed_links, self.proven, self.observed = [], [], []
        self.known = {PEER: {AT}, HELPER: {HELPER_AT}}
        self.liveness = Liveness(
            self.basics, self.connections, self.registry, self.freshness,
            rng=random.Random(1),
            path_failed=lambda link: self.failed_links.append(link) or self.path_failed_result,
            known_addresses=lambda peer_id: self.known.get(peer_id, set()),
            address_of=lambda peer_id: None,
            relay_of=lambda address: None,
            announce_to=lambda address: None,
            observed_address=self.observed.append,
            address_proven=lambda peer_id, address: self.proven.append((peer_id, address)))

    def pings_to(self, address):
        return [s for s in self.sent.of(MessageType.PING) if s.address == address]

    def pong(self, sender, addr, nonce, observed=("192.0.2.1", 5000)):
        self.liveness.on_pong(SimpleNamespace(sender=sender), addr, SimpleNamespace(
            nonce=nonce, echo_ms=0, observed=observed, contacts=[]))

    def connect_and_prove(self, peer_id, address):
        self.liveness.connect(peer_id, address)
        nonce = self.liveness.ping(peer_id, address)
        self.clock.advance(0.02)
        self.pong(peer_id, address, nonce)
        return self.liveness.links[peer_id]

    def test_pong_proves_the_path(self):
        self.liveness.connect(PEER, AT)
        conn = self.connections.get(PEER)
        self.assertIs(conn.state, State.UNPROVEN)
        nonce = self.liveness.ping(PEER, AT)
        self.clock.advance(0.02)
        self.pong(PEER, AT, nonce)
        self.assertIs(conn.state, State.ACTIVE)
        self.assertAlmostEqual(conn.rtt, 0.02)
        self.assertAlmostEqual(self.registry.rtts[PEER], 0.02)
        self.assertEqual(self.proven, [(PEER, AT)])
        self.assertEqual(self.observed, [("192.0.2.1", 5000)])
        self.assertTrue(self.liveness.verified(PEER, AT))

    def test_pong_from_wrong_peer_or_nonce_dropped(self):
        self.liveness.connect(PEER, AT)
        nonce = self.liveness.ping(PEER, AT)
        self.pong(HELPER, AT, nonce)
        self.pong(PEER, AT, nonce + 1)
        self.assertEqual(self.basics.metrics.get("drops", reason="unexpected_pong"), 2)
        self.assertIs(self.connections.get(PEER).state, State.UNPROVEN)

    def test_ping_answered_with_pong_observed_address(self):
        self.liveness.on_ping(SimpleNamespace(sender=PEER), AT, SimpleNamespace(
            nonce=7, sent_ms=5, contacts=[]))
        (pong,) = self.sent.of(MessageType.PONG)
        self.assertEqual((pong.address, pong.fields["nonce"], pong.fields["observed"]),
                         (AT, 7, AT))

    def run_periods(self, periods):
        for _ in range(int(periods * self.config.keepalive)):
            self.clock.advance(1)
            self.liveness.tick()

    def test_missed_keepalives_suspect_then_offline(self):
        self.connect_and_prove(HELPER, HELPER_AT)
        link = self.connect_and_prove(PEER, AT)
        conn = link.conn
        silence = []

        def tick_with_helper_alive():
            self.clock.advance(1)
            self.liveness.heard(HELPER, HELPER_AT, self.clock.seconds(), CHALLENGE_SIZE)
            self.liveness.tick()
            silence.append(conn.state)

        while conn.state is not State.SUSPECT and len(silence) < 100:
            tick_with_helper_alive()
        self.assertIs(conn.state, State.SUSPECT)
        self.assertTrue(self.failed_links, "the path manager was not asked first")
        self.assertIn((PEER, "suspect"), self.registry.states)
        indirect = self.sent.of(MessageType.INDIRECT_PING)
        self.assertEqual([(s.address, s.fields["target"]) for s in indirect], [(HELPER_AT, PEER)])
        self.assertEqual(self.freshness.stale, [(PEER, AT)])
        self.assertEqual([d["peer_id"] for d in self.events.of("peer_suspected")], [PEER])
        for _ in range(int(self.config.indirect_timeout) + 1):
            tick_with_helper_alive()
        self.assertNotIn(PEER, self.liveness.links)
        self.assertIs(conn.state, State.OFFLINE)
        self.assertIn((PEER, "offline"), self.registry.states)
        self.assertEqual([d["peer_id"] for d in self.events.of("peer_disconnected")], [PEER])
        self.assertEqual(self.freshness.failed, [(PEER, AT)])

    def test_positive_indirect_ack_clears_suspicion(self):
        self.connect_and_prove(HELPER, HELPER_AT)
        link = self.connect_and_prove(PEER, AT)
        self.liveness._suspect(link, self.clock.seconds())
        self.liveness.on_indirect_ack(SimpleNamespace(sender=HELPER), HELPER_AT, SimpleNamespace(
            nonce=link.indirect_nonce, target=PEER, alive=True))
        self.assertIs(link.conn.state, State.ACTIVE)
        self.assertIn((PEER, "online"), self.registry.states)

    def test_path_manager_takes_over_a_dead_path(self):
        self.path_failed_result = True
        link = self.connect_and_prove(PEER, AT)
        self.run_periods(4)
        self.assertTrue(self.failed_links)
        self.assertIsNot(link.conn.state, State.SUSPECT)

    def test_frame_from_new_address_is_challenged_not_followed(self):
        link = self.connect_and_prove(PEER, AT)
        self.sent.clear()
        now = self.clock.seconds()
        self.assertIsNone(self.liveness.heard(PEER, ELSEWHERE, now, CHALLENGE_SIZE))
        self.assertEqual(link.address, AT, "an unproven source address moved the link")
        (challenge,) = self.pings_to(ELSEWHERE)
        self.assertEqual(challenge.fields["contacts"], [])
        self.clock.advance(0.01)
        self.pong(PEER, ELSEWHERE, challenge.fields["nonce"])
        self.assertEqual(link.address, ELSEWHERE)
        self.assertEqual([(d["old"], d["new"]) for d in self.events.of("path_changed")],
                         [(AT, ELSEWHERE)])

    def test_no_amplification_towards_unproven_addresses(self):
        """A frame smaller than the challenge gets nothing back; one as large, one ping."""
        self.liveness.heard(PEER, ELSEWHERE, 0.0, CHALLENGE_SIZE - 1)
        self.assertEqual(self.sent, [])
        self.liveness.heard(PEER, ELSEWHERE, 0.0, CHALLENGE_SIZE)
        self.liveness.heard(PEER, ELSEWHERE, 0.1, CHALLENGE_SIZE)  # within challenge_retry
        self.assertEqual(len(self.pings_to(ELSEWHERE)), 1)

    def test_indirect_ping_only_to_known_addresses(self):
        request = SimpleNamespace(nonce=1, target=PEER, endpoint=ELSEWHERE)
        self.liveness.on_indirect_ping(SimpleNamespace(sender=HELPER), HELPER_AT, request)
        self.assertEqual(self.sent, [])
        self.assertEqual(
            self.basics.metrics.get("drops", reason="indirect_unknown_endpoint"), 1)
        request = SimpleNamespace(nonce=2, target=PEER, endpoint=AT)
        self.liveness.on_indirect_ping(SimpleNamespace(sender=HELPER), HELPER_AT, request)
        self.assertEqual(len(self.pings_to(AT)), 1)
        self.clock.advance(self.config.indirect_timeout)
        (ack,) = self.sent.of(MessageType.INDIRECT_ACK)
        self.assertEqual((ack.address, ack.fields["alive"]), (HELPER_AT, False))

    def test_active_set_bounded(self):
        for i in range(self.config.max_active + 3):
            self.liveness.connect(bytes([i]) * 16, ("198.51.100.50", 1000 + i))
        self.assertEqual(len(self.liveness.links), self.config.max_active)

    def test_ping_through_a_relay_reveals_no_address(self):
        route = RelayRoute("198.51.100.1", 7400, bytes(12))
        self.liveness.on_ping(SimpleNamespace(sender=PEER), route, SimpleNamespace(
            nonce=7, sent_ms=5, contacts=[]))
        (pong,) = self.sent.of(MessageType.PONG)
        self.assertEqual((pong.address, pong.fields["observed"]), (route, UNKNOWN_ENDPOINT))
