"""
Liveness built alone: keepalives, pongs proving a path, suspicion with
indirect probes, offline, challenges that never amplify, on a Clock with
fakes for every collaborator.
"""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

from twisted.trial import unittest

from omerta.crypto import proof
from omerta.mesh.liveness import (BUSY_RETRY_MIN, BUSY_SILENCE, CHALLENGE_SIZE, PONG_SIZE, PROVEN_PONG_SIZE,
                                  UNKNOWN_ENDPOINT, Liveness, nonce_bytes)
from omerta.mesh.peer import Connections, RelayRoute, State
from omerta.testing.fakes import BOOT, fake_basics, fake_prover, fixed_identity
from omerta.wire.envelope import MIN_FRAME_SIZE
from omerta.wire.messages import PING_PROVE, MessageType

IDENTITIES = {i.peer_id: i for i in (fixed_identity(0x0A), fixed_identity(0x0B),
                                     fixed_identity(0x0C))}
PEER, HELPER, MEMBER = IDENTITIES
RESTARTED = b"\x01" * 8
AT, ELSEWHERE, HELPER_AT = ("198.51.100.7", 7400), ("203.0.113.9", 40000), ("198.51.100.8", 7400)


class FakeRegistry:
    def __init__(self):
        self.states, self.rtts = [], {}

    def set_state(self, peer_id, state, now):
        self.states.append((peer_id, state))

    def set_rtt(self, peer_id, rtt):
        self.rtts[peer_id] = rtt

    def get(self, peer_id):
        from types import SimpleNamespace

        return SimpleNamespace(rtt=self.rtts[peer_id]) if peer_id in self.rtts else None

    def all(self):
        return []

    def __len__(self):
        return 0


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
            address_proven=lambda peer_id, address: self.proven.append((peer_id, address)),
            run_proven=lambda peer_id, boot: self.runs.append((peer_id, boot)),
            unreachable=lambda peer_id: self.unreachable.append(peer_id),
            restarted=lambda peer_id: self.restarts.append(peer_id),
            challenged=lambda peer_id: self.challenges.append(peer_id))
        self.runs, self.unreachable, self.restarts, self.challenges = [], [], [], []

    def pings_to(self, address):
        return [s for s in self.sent.of(MessageType.PING) if s.address == address]

    def pong(self, sender, addr, nonce, observed=("192.0.2.1", 5000), boot=BOOT,
             signer=None, proven=None, arrived=None):
        """
        C{sender}'s pong from its run C{boot}, with the proof its ping asked
        for (or C{proven}: force one or none), signed by C{signer} (the
        sender's identity unless a member forges it).
        """
        asked = any(s.fields["nonce"] == nonce and s.fields["flags"] & PING_PROVE
                    for s in self.sent.of(MessageType.PING))
        signed = b""
        if asked if proven is None else proven:
            prover = fake_prover(signer or IDENTITIES[sender], boot)
            signed = prover.prove(proof.PONG, self.basics.peer_id, nonce_bytes(nonce))
        self.liveness.on_pong(SimpleNamespace(sender=sender, boot=boot, arrived=arrived), addr,
                              SimpleNamespace(nonce=nonce, echo_ms=0, observed=observed,
                                              contacts=[], proof=signed))

    def on_ping(self, sender, addr, nonce, flags=0, size=CHALLENGE_SIZE):
        self.liveness.on_ping(
            SimpleNamespace(sender=sender, body=bytes(size - MIN_FRAME_SIZE)), addr,
            SimpleNamespace(nonce=nonce, sent_ms=5, flags=flags, contacts=[]))

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

    def test_the_round_trip_is_the_wires(self):
        """
        A ping's round trip runs from when its datagram left (what send_to
        returns) to when the pong's arrived (frame.arrived): neither end's
        building, sealing, opening or decoding counts in it.
        """
        send_to = self.basics.send_to
        self.liveness.basics = dataclasses.replace(
            self.basics, send_to=lambda *args, **fields: (
                send_to(*args, **fields), self.clock.seconds() + 0.003)[1])
        self.liveness.connect(PEER, AT)
        nonce = self.liveness.ping(PEER, AT)   # left at 0.003
        self.clock.advance(0.05)               # decoded at 0.05
        self.pong(PEER, AT, nonce, arrived=0.0042)
        self.assertAlmostEqual(self.registry.rtts[PEER], 0.0012)
        self.assertAlmostEqual(self.connections.get(PEER).rtt, 0.0012)

    def test_a_member_cannot_prove_another_members_address(self):
        """
        A pong with the peer's sender id but without its proof, or with a
        proof signed by another member, proves nothing and moves nothing.
        """
        self.liveness.connect(PEER, AT)
        self.pong(PEER, AT, self.liveness.ping(PEER, AT), proven=False)
        self.pong(PEER, AT, self.liveness.ping(PEER, AT), signer=IDENTITIES[MEMBER])
        self.assertIs(self.connections.get(PEER).state, State.UNPROVEN)
        self.assertFalse(self.liveness.verified(PEER, AT))
        self.assertEqual(self.basics.metrics.get("drops", reason="unproven_pong"), 1)
        self.assertEqual(self.basics.metrics.get("drops", reason="bad_proof"), 1)
        self.assertEqual(self.proven, [])

    def test_a_forged_pong_does_not_spoil_the_real_answer(self):
        """A forgery that races the real pong leaves the ping outstanding for it."""
        self.liveness.connect(PEER, AT)
        nonce = self.liveness.ping(PEER, AT)
        self.pong(PEER, AT, nonce, signer=IDENTITIES[MEMBER])
        self.pong(PEER, AT, nonce)
        self.assertTrue(self.liveness.verified(PEER, AT))

    def test_a_forged_pong_does_not_move_a_path(self):
        """
        A member that answers the challenge of a frame it sent from its own
        address in another member's name cannot take that member's path.
        """
        link = self.connect_and_prove(PEER, AT)
        self.sent.clear()
        self.liveness.heard(PEER, ELSEWHERE, self.clock.seconds(), CHALLENGE_SIZE, BOOT)
        (challenge,) = self.pings_to(ELSEWHERE)
        self.assertTrue(challenge.fields["flags"] & PING_PROVE)
        self.pong(PEER, ELSEWHERE, challenge.fields["nonce"], signer=IDENTITIES[MEMBER])
        self.assertEqual(link.address, AT)
        self.assertEqual(self.events.of("path_changed"), [])

    def test_frames_of_an_unproven_run_count_for_nothing(self):
        """
        A frame under the peer's id from another run (a forgery, a replay
        of an earlier run, or a restart) neither keeps the peer alive nor
        unproves its path; it draws a challenge asking for a proof.
        """
        link = self.connect_and_prove(PEER, AT)
        self.sent.clear()
        self.clock.advance(1)
        heard = link.last_heard
        self.assertIsNone(self.liveness.heard(PEER, AT, self.clock.seconds(), CHALLENGE_SIZE,
                                              RESTARTED))
        self.assertEqual(link.last_heard, heard)
        self.assertTrue(link.verified)
        (challenge,) = self.pings_to(AT)
        self.assertTrue(challenge.fields["flags"] & PING_PROVE)
        self.assertEqual(self.runs, [(PEER, BOOT)])
        # the real run answers the challenge: nothing changes
        self.pong(PEER, AT, challenge.fields["nonce"])
        self.assertEqual(self.runs, [(PEER, BOOT)])
        self.assertTrue(link.verified)
        self.assertIs(self.liveness.heard(PEER, AT, self.clock.seconds(), 100, BOOT), link)

    def test_a_proven_new_run_is_a_restart(self):
        """The peer's new run, once proven, replaces the old one and is proven afresh."""
        link = self.connect_and_prove(PEER, AT)
        self.sent.clear()
        self.liveness.heard(PEER, AT, self.clock.seconds(), CHALLENGE_SIZE, RESTARTED)
        (challenge,) = self.pings_to(AT)
        self.pong(PEER, AT, challenge.fields["nonce"], boot=RESTARTED)
        self.assertEqual(self.runs, [(PEER, BOOT), (PEER, RESTARTED)])
        self.assertEqual(self.restarts, [PEER])  # the first run proven was no restart
        self.assertTrue(link.verified)
        self.assertIs(self.liveness.heard(PEER, AT, self.clock.seconds(), 100, RESTARTED), link)
        self.assertIsNone(self.liveness.heard(PEER, AT, self.clock.seconds(), 100, BOOT))

    def test_keepalives_ask_for_no_proof_once_proven(self):
        """A proven path and run need no signature per keepalive; a pong without one measures it."""
        link = self.connect_and_prove(PEER, AT)
        nonce = self.liveness.ping(PEER, AT)
        (ping,) = [s for s in self.pings_to(AT) if s.fields["nonce"] == nonce]
        self.assertFalse(ping.fields["flags"] & PING_PROVE)
        self.clock.advance(0.05)
        self.pong(PEER, AT, nonce)
        self.assertAlmostEqual(link.rtt, 0.05)

    def test_pong_from_wrong_peer_or_nonce_dropped(self):
        self.liveness.connect(PEER, AT)
        nonce = self.liveness.ping(PEER, AT)
        self.pong(HELPER, AT, nonce)
        self.pong(PEER, AT, nonce + 1)
        self.assertEqual(self.basics.metrics.get("drops", reason="unexpected_pong"), 2)
        self.assertIs(self.connections.get(PEER).state, State.UNPROVEN)

    def test_ping_answered_with_pong_observed_address(self):
        self.on_ping(PEER, AT, 7)
        (pong,) = self.sent.of(MessageType.PONG)
        self.assertEqual((pong.address, pong.fields["nonce"], pong.fields["observed"]),
                         (AT, 7, AT))
        self.assertEqual(pong.fields["proof"], b"")

    def test_pong_carries_a_proof_when_asked(self):
        """The proof is this node's signature over the pinger's nonce, for the pinger only."""
        self.on_ping(PEER, AT, 7, flags=PING_PROVE)
        (pong,) = self.sent.of(MessageType.PONG)
        checker = fake_prover(IDENTITIES[PEER])
        self.assertTrue(checker.check(proof.PONG, pong.fields["proof"], self.basics.peer_id,
                                      BOOT, nonce_bytes(7)))
        other = fake_prover(IDENTITIES[HELPER])
        self.assertFalse(other.check(proof.PONG, pong.fields["proof"], self.basics.peer_id,
                                     BOOT, nonce_bytes(7)))

    def test_answering_a_challenge_is_told(self):
        """
        The node hears when it proved itself to a peer (the relay client
        then asks again what that relay ignored from an unproven address).
        """
        self.on_ping(PEER, AT, 7)
        self.assertEqual(self.challenges, [])
        self.on_ping(PEER, AT, 8, flags=PING_PROVE)
        self.assertEqual(self.challenges, [PEER])
        self.on_ping(PEER, AT, 9, flags=PING_PROVE, size=PROVEN_PONG_SIZE - 1)
        self.assertEqual(self.challenges, [PEER], "no pong sent, nothing proven")

    def test_no_pong_larger_than_the_ping_to_an_unproven_address(self):
        """A ping smaller than its answer from an address not proven gets nothing."""
        self.on_ping(PEER, AT, 7, flags=PING_PROVE, size=PROVEN_PONG_SIZE - 1)
        self.on_ping(PEER, AT, 8, size=PONG_SIZE - 1)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.basics.metrics.get("drops", reason="ping_smaller_than_pong"), 2)

    def test_own_pings_are_as_large_as_their_answers(self):
        """Every ping this node sends is padded to the size of the pong it asks for."""
        from omerta.wire.messages import build_body

        self.liveness.ping(PEER, AT)
        link = self.connect_and_prove(PEER, AT)
        self.liveness.ping(PEER, link.address)
        for sent in self.sent.of(MessageType.PING):
            size = MIN_FRAME_SIZE + len(build_body(MessageType.PING, sent.fields))
            wanted = PROVEN_PONG_SIZE if sent.fields["flags"] & PING_PROVE else PONG_SIZE
            self.assertGreaterEqual(size, wanted)

    def run_periods(self, periods):
        for _ in range(int(periods * self.config.keepalive)):
            self.clock.advance(1)
            self.liveness.tick()

    def tick_for(self, seconds, step=0.25):
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)
            self.liveness.tick()

    def test_only_a_quiet_link_is_pinged(self):
        """
        A link is pinged once it has been quiet for a keepalive; frames from
        the peer (its own keepalives, traffic) keep it from being pinged.
        """
        self.connect_and_prove(PEER, AT)
        self.sent.clear()
        for _ in range(8):
            self.tick_for(self.config.keepalive / 2)
            self.liveness.heard(PEER, AT, self.clock.seconds(), 100, BOOT)
        self.assertEqual(self.pings_to(AT), [])
        self.tick_for(self.config.keepalive)
        self.assertEqual(len(self.pings_to(AT)), 1)

    def busy_then_silent(self, every=0.2, frames=20) -> float:
        """Frames from PEER every C{every} seconds, then silence; returns when it began."""
        for _ in range(frames):
            self.clock.advance(every)
            self.liveness.heard(PEER, AT, self.clock.seconds(), 100, BOOT)
            self.liveness.tick()
        self.sent.clear()
        return self.clock.seconds()

    def test_a_busy_link_that_falls_silent_is_pinged_at_once(self):
        """
        Frames every 0.2 s, then silence: the ping goes out after about
        BUSY_SILENCE gaps, not a whole keepalive.
        """
        self.connect_and_prove(PEER, AT)
        silent_at = self.busy_then_silent()
        while not self.pings_to(AT) and self.clock.seconds() - silent_at < 5:
            self.tick_for(0.05, step=0.05)
        took = self.clock.seconds() - silent_at
        self.assertLessEqual(took, BUSY_SILENCE * 0.2 + 0.1)
        self.assertLess(took, self.config.keepalive)

    def test_a_busy_link_that_falls_silent_is_given_up_quickly(self):
        """
        Frames every 0.2 s over a 10 ms path, then silence: the ping is
        repeated after BUSY_RETRY_MIN (4 round trips are less), so the path
        manager hears the path failed about 1.5 s after the last frame, not
        the 2.3 s that ping_retry spacing takes.
        """
        link = self.connect_and_prove(PEER, AT)
        link.conn.rtt = 0.010
        silent_at = self.busy_then_silent()
        while not self.failed_links and self.clock.seconds() - silent_at < 5:
            self.tick_for(0.05, step=0.05)
        took = self.clock.seconds() - silent_at
        pings = self.pings_to(AT)
        self.assertEqual(len(pings), 1 + self.config.ping_retries)
        self.assertLessEqual(took, BUSY_SILENCE * 0.2 + 3 * BUSY_RETRY_MIN + 0.1)
        self.assertEqual(self.failed_links, [link])

    def test_a_path_without_its_own_round_trip_uses_the_peers_last(self):
        """
        A busy path that moved lately has no round trip measured yet: its
        retries are spaced by the last round trip the peer's pongs showed
        (on the path before), not by ping_retry.
        """
        link = self.connect_and_prove(PEER, AT)
        link.conn.rtt = None
        self.registry.rtts[PEER] = 0.010
        silent_at = self.busy_then_silent()
        while not self.failed_links and self.clock.seconds() - silent_at < 5:
            self.tick_for(0.05, step=0.05)
        took = self.clock.seconds() - silent_at
        self.assertLessEqual(took, BUSY_SILENCE * 0.2 + 3 * BUSY_RETRY_MIN + 0.1)
        self.assertEqual(self.failed_links, [link])

    def test_a_relayed_peer_never_pinged_uses_the_relays_round_trip(self):
        """
        A peer we only answer, through a relay, has no round trip of ours:
        when its busy relayed path falls silent, the retries are spaced by
        twice the relay's round trip.
        """
        from omerta.mesh.peer import RelayRoute

        relay = self.connect_and_prove(HELPER, HELPER_AT)
        relay.conn.rtt = 0.005
        route = RelayRoute(HELPER_AT[0], HELPER_AT[1], bytes(12))
        link = self.connect_and_prove(PEER, route)
        link.conn.rtt = None
        self.registry.rtts.pop(PEER)  # (never a pong of ours from it)
        for _ in range(20):
            self.clock.advance(0.2)
            self.liveness.heard(PEER, route, self.clock.seconds(), 100, BOOT)
            self.liveness.heard(HELPER, HELPER_AT, self.clock.seconds(), 100, BOOT)
            self.liveness.tick()
        silent_at = self.clock.seconds()
        while not self.failed_links and self.clock.seconds() - silent_at < 5:
            self.clock.advance(0.05)
            self.liveness.heard(HELPER, HELPER_AT, self.clock.seconds(), 100, BOOT)
            self.liveness.tick()
        took = self.clock.seconds() - silent_at
        self.assertLessEqual(took, BUSY_SILENCE * 0.2 + 3 * BUSY_RETRY_MIN + 0.1)
        self.assertEqual(self.failed_links, [link])

    def test_a_round_is_retried_then_missed(self):
        """
        An unanswered keepalive is retried every ping_retry up to
        ping_retries times; a round with no answer is missed and, with no
        other path, the peer suspected: about keepalive + 1.5 s after the
        last frame (1 s more when the peer has the lower id and pings first).
        """
        link = self.connect_and_prove(PEER, AT)
        self.sent.clear()
        last = link.last_heard
        while link.conn.state is not State.SUSPECT and self.clock.seconds() - last < 30:
            self.tick_for(0.25)
        took = self.clock.seconds() - last
        config = self.config
        self.assertEqual(len(self.pings_to(AT)), 1 + config.ping_retries)
        bound = config.keepalive + (config.ping_retries + 1) * config.ping_retry
        if PEER < self.basics.peer_id:
            bound += config.ping_retries * config.ping_retry  # (the peer pings first)
        self.assertGreaterEqual(took, bound)
        self.assertLessEqual(took, bound + config.liveness_tick * 2)
        self.assertEqual(self.failed_links, [link])

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
        # a link's suspicion is this node's alone: the registry is not told
        self.assertEqual(self.registry.states, [])
        indirect = self.sent.of(MessageType.INDIRECT_PING)
        self.assertEqual([(s.address, s.fields["target"]) for s in indirect], [(HELPER_AT, PEER)])
        self.assertEqual(self.freshness.stale, [(PEER, AT)])
        self.assertEqual([d["peer_id"] for d in self.events.of("peer_suspected")], [PEER])
        for _ in range(int(self.config.indirect_timeout) + 1):
            tick_with_helper_alive()
        self.assertNotIn(PEER, self.liveness.links)
        self.assertIs(conn.state, State.OFFLINE)
        # the link is dropped; declaring the peer gone is the membership's
        # call, told it is unreachable from here
        self.assertEqual(self.registry.states, [])
        self.assertEqual(self.unreachable, [PEER])
        self.assertEqual([d["peer_id"] for d in self.events.of("peer_disconnected")], [PEER])
        self.assertEqual(self.freshness.failed, [(PEER, AT)])

    def test_positive_indirect_ack_clears_suspicion(self):
        self.connect_and_prove(HELPER, HELPER_AT)
        link = self.connect_and_prove(PEER, AT)
        self.liveness._suspect(link, self.clock.seconds())
        self.liveness.on_indirect_ack(SimpleNamespace(sender=HELPER), HELPER_AT, SimpleNamespace(
            nonce=link.indirect_nonce, target=PEER, alive=True))
        self.assertIs(link.conn.state, State.ACTIVE)
        self.assertEqual(self.unreachable, [])

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

    def test_a_full_active_set_challenges_a_stranger_once_per_retry(self):
        """
        With no room for a link, frames from a stranger draw a ping asking
        for a proof at most once per challenge_retry per address (a node
        that a whole mesh contacts at once must not ping back every frame).
        """
        for i in range(self.config.max_active):
            self.liveness.connect(bytes([i]) * 16, ("198.51.100.50", 1000 + i))
        for _ in range(5):
            self.assertIsNone(self.liveness.heard(PEER, AT, self.clock.seconds(),
                                                  CHALLENGE_SIZE, BOOT))
            self.clock.advance(0.1)
        self.assertEqual(len(self.pings_to(AT)), 1)
        self.clock.advance(self.config.challenge_retry)
        self.liveness.heard(PEER, AT, self.clock.seconds(), CHALLENGE_SIZE, BOOT)
        self.assertEqual(len(self.pings_to(AT)), 2)

    def test_ping_through_a_relay_reveals_no_address(self):
        route = RelayRoute("198.51.100.1", 7400, bytes(12))
        self.on_ping(PEER, route, 7)
        (pong,) = self.sent.of(MessageType.PONG)
        self.assertEqual((pong.address, pong.fields["observed"]), (route, UNKNOWN_ENDPOINT))


class RefillTests(unittest.TestCase):
    def test_a_large_registry_is_sampled_not_listed(self):
        """Refilling the active set from thousands of records draws a few, never lists them all."""
        basics, sent, _ = fake_basics()
        records = [SimpleNamespace(peer_id=i.to_bytes(16, "big"), state="online")
                   for i in range(5000)]

        class Large:
            draws = 0

            def __len__(self):
                return len(records)

            def all(self):
                raise AssertionError("listed every record")

            def sample(self, count, rng, wanted):
                Large.draws += 1
                return [r for r in rng.sample(records, 4 * count) if wanted(r)][:count]

            def set_state(self, *args):
                pass

        liveness = Liveness(
            basics, Connections(basics.emit, lambda frame, address: None), Large(),
            FakeFreshness(), rng=random.Random(1), path_failed=lambda link: False,
            known_addresses=lambda peer_id: set(),
            address_of=lambda peer_id: ("198.51.100.9", int.from_bytes(peer_id, "big") + 1),
            relay_of=lambda address: None, announce_to=lambda address: None,
            observed_address=lambda address: None, address_proven=lambda p, a: None)
        liveness.tick()
        self.assertEqual(len(liveness.links), basics.config.degree)
        self.assertEqual(Large.draws, 1)
