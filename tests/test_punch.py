"""
This node's side of a hole punch, built alone: L{Puncher} on a C{Clock} with
fake collaborators (no overlay, no node, no socket).
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.trial import unittest

from omerta.crypto import proof
from omerta.crypto.sealing import OpenedFrame
from omerta.mesh.punch import HOLD_GAP, PROBE_PADDING, Puncher, probe_schedule, spray_ports
from omerta.testing.fakes import BOOT, NETWORK, fake_basics, fake_prover, fixed_identity
from omerta.wire.messages import (Capability, CandidateKind, MessageType, NatType,
                                  PunchStrategy, build_body, parse_body)

RELAY = b"r" * 16
IDENTITIES = {i.peer_id: i for i in (fixed_identity(0x70), fixed_identity(0x6F))}
PEER, OTHER = IDENTITIES
COORDINATOR = ("198.51.100.1", 7400)
MAPPED = ("192.0.2.10", 50000)          # this node's STUN-mapped address
PEER_HOST = ("10.9.0.5", 7400)           # the peer's candidates
PEER_MAPPED = ("203.0.113.9", 40001)
PEER_OTHER = ("203.0.113.9", 40777)      # the peer seen from another mapping
ATTEMPT = 0x1122334455667788


class FakeRegistry:
    """The registry's part a puncher uses: C{get} a record, C{set_rtt}."""

    def __init__(self):
        self.records = {}
        self.rtts = []

    def add(self, peer_id: bytes, capabilities: int) -> None:
        self.records[peer_id] = SimpleNamespace(peer_id=peer_id, capabilities=capabilities)

    def get(self, peer_id: bytes):
        return self.records.get(peer_id)

    def set_rtt(self, peer_id: bytes, rtt) -> bool:
        self.rtts.append((peer_id, rtt))
        return True


def candidate(kind: CandidateKind, endpoint: tuple) -> dict:
    return {"kind": int(kind), "endpoint": endpoint}


class PuncherTests(unittest.TestCase):
    def setUp(self):
        self.basics, self.sent, self.events = fake_basics()
        self.clock = self.basics.clock
        self.metrics = self.basics.metrics
        self.config = self.basics.config
        self.registry = FakeRegistry()
        self.registry.add(RELAY, Capability.RELAY)
        self.registry.add(PEER, Capability.NONE)
        self.held = {RELAY}
        self.proven = []
        self.punched = []
        self.puncher = Puncher(
            self.basics, self.registry,
            nat=lambda: SimpleNamespace(nat_type=NatType.PORT_RESTRICTED_CONE),
            local_port=lambda: 7400,
            public_endpoints=lambda: [MAPPED],
            proven=lambda peer, address, boot: self.proven.append((peer, address)),
            holds_reservation=lambda relay_id: relay_id in self.held,
            on_punched=lambda peer, address: self.punched.append((peer, address)),
            local_address=lambda towards: "10.0.0.2",
            hold=self.sent.hold, release=self.sent.release)

    # helpers

    def deliver(self, msg_type: MessageType, sender: bytes, addr: tuple, signer=None,
                **fields):
        """
        Hand the puncher a frame as the overlay does: opened, then parsed.
        Probes are padded and acks proven by C{signer} (the sender's own
        identity unless given) as a real peer's are, unless the test says.
        """
        if msg_type == MessageType.PUNCH_PROBE:
            fields.setdefault("padding", PROBE_PADDING)
        if msg_type == MessageType.PUNCH_ACK and "proof" not in fields:
            prover = fake_prover(signer or IDENTITIES[sender], BOOT)
            fields["proof"] = prover.prove(
                proof.PUNCH_ACK, self.basics.peer_id,
                fields["attempt_id"].to_bytes(8, "big") + fields["seq"].to_bytes(2, "big"))
        body = build_body(msg_type, fields)
        frame = OpenedFrame(int(msg_type), NETWORK, sender, BOOT, 1, body)
        handler = {MessageType.PUNCH_EXECUTE: self.puncher.on_execute,
                   MessageType.PUNCH_PROBE: self.puncher.on_probe,
                   MessageType.PUNCH_ACK: self.puncher.on_ack}[msg_type]
        handler(frame, addr, parse_body(msg_type, body))

    def request(self):
        """Ask the coordinator for a punch to PEER; the attempt id and Deferred."""
        d = self.puncher.request(PEER, (RELAY, COORDINATOR))
        attempt_id = self.sent.of(MessageType.PUNCH_REQUEST)[-1].fields["attempt_id"]
        results = []
        d.addCallback(results.append)
        return attempt_id, results

    def execute(self, attempt_id: int, strategy=PunchStrategy.SIMULTANEOUS, start_in_ms=0,
                spray=0, candidates=None, sender=RELAY, addr=COORDINATOR, peer=PEER):
        if candidates is None:
            candidates = [candidate(CandidateKind.HOST, PEER_HOST),
                          candidate(CandidateKind.SERVER_REFLEXIVE, PEER_MAPPED)]
        self.deliver(MessageType.PUNCH_EXECUTE, sender, addr, attempt_id=attempt_id, peer=peer,
                     strategy=int(strategy), start_in_ms=start_in_ms, spray=spray,
                     candidates=candidates)

    def probes(self):
        return self.sent.of(MessageType.PUNCH_PROBE)

    def advance_in_steps(self, seconds: float) -> None:
        """Advance the clock by C{seconds}, stopping at each timer on the way."""
        end = self.clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.clock.advance(max(0, min(due) - self.clock.seconds()))
        self.clock.advance(end - self.clock.seconds())

    def drops(self) -> dict:
        return self.metrics.by_label("drops", "reason")

    # requesting

    def test_request_asks_the_coordinator_with_own_nat_and_candidates(self):
        """A request sends PUNCH_REQUEST to the coordinator: target, NAT type, host and mapped candidates."""
        _, results = self.request()
        (request,) = self.sent.of(MessageType.PUNCH_REQUEST)
        self.assertEqual(request.address, COORDINATOR)
        self.assertEqual(request.fields["target"], PEER)
        self.assertEqual(request.fields["nat_type"], int(NatType.PORT_RESTRICTED_CONE))
        self.assertEqual(request.fields["candidates"],
                         [candidate(CandidateKind.HOST, ("10.0.0.2", 7400)),
                          candidate(CandidateKind.SERVER_REFLEXIVE, MAPPED)])
        self.assertEqual(results, [])
        self.assertEqual(self.metrics.get("punch_attempts", role="initiator"), 1)
        self.assertEqual(self.probes(), [])

    def test_own_candidates_skip_an_unbound_port_and_duplicates(self):
        """No host candidate before the socket is bound; a mapped address equal to the host one is listed once."""
        basics, _, _ = fake_basics()
        port = [0]
        puncher = Puncher(basics, FakeRegistry(), nat=lambda: None, local_port=lambda: port[0],
                          public_endpoints=lambda: [("10.0.0.2", 7400)],
                          proven=lambda p, a, b: None, holds_reservation=lambda r: False,
                          on_punched=lambda p, a: None, local_address=lambda t: "10.0.0.2")
        self.assertEqual(puncher.own_candidates(COORDINATOR),
                         [candidate(CandidateKind.SERVER_REFLEXIVE, ("10.0.0.2", 7400))])
        port[0] = 7400
        self.assertEqual(puncher.own_candidates(COORDINATOR),
                         [candidate(CandidateKind.HOST, ("10.0.0.2", 7400))])

    def test_request_without_nat_report_says_unknown(self):
        """Before NAT discovery the request carries NAT type 0 (unknown)."""
        basics, sent, _ = fake_basics()
        puncher = Puncher(basics, FakeRegistry(), nat=lambda: None, local_port=lambda: 0,
                          public_endpoints=lambda: [], proven=lambda p, a, b: None,
                          holds_reservation=lambda r: False, on_punched=lambda p, a: None,
                          local_address=lambda t: None)
        puncher.request(PEER, (RELAY, COORDINATOR))
        (request,) = sent.of(MessageType.PUNCH_REQUEST)
        self.assertEqual(request.fields["nat_type"], 0)
        self.assertEqual(request.fields["candidates"], [])

    # executing

    def test_execute_probes_every_candidate_on_the_schedule(self):
        """After the start delay every candidate is probed at each offset of probe_schedule, then nothing."""
        attempt_id, _ = self.request()
        self.execute(attempt_id, start_in_ms=200)
        self.assertEqual(self.probes(), [])
        self.advance_in_steps(self.config.punch_timeout + 1)
        schedule = probe_schedule(self.config.punch_timeout - 0.2)
        expected = [(int(round((0.2 + offset) * 1000)), target)
                    for offset in schedule for target in (PEER_HOST, PEER_MAPPED)]
        got = [(p.fields["sent_ms"], p.address) for p in self.probes()]
        self.assertEqual(len(got), len(expected))
        for (ms, address), (want_ms, want_address) in zip(got, expected):
            self.assertEqual(address, want_address)
            self.assertLessEqual(abs(ms - want_ms), 1)  # sent_ms truncates
        self.assertEqual({p.fields["attempt_id"] for p in self.probes()}, {attempt_id})
        self.assertEqual([p.fields["seq"] for p in self.probes()],
                         list(range(1, len(expected) + 1)))
        self.assertEqual(self.metrics.get("punch_probes"), len(expected))

    def test_they_first_waits_the_margin_longer(self):
        """THEY_FIRST starts probing punch_hold_margin after the coordinator's start delay."""
        attempt_id, _ = self.request()
        self.execute(attempt_id, strategy=PunchStrategy.THEY_FIRST, start_in_ms=100)
        start = 0.1 + self.config.punch_hold_margin
        self.clock.advance(start - 0.001)
        self.assertEqual(self.probes(), [])
        self.clock.advance(0.001)
        self.assertEqual([p.address for p in self.probes()], [PEER_HOST, PEER_MAPPED])

    def probe_times(self, start: float = 0.0) -> list[tuple[float, int | None]]:
        """(seconds after C{start}, hop limit) of each probe round, from sent_ms."""
        rounds = []
        for p in self.probes():
            at = (round(p.fields["sent_ms"] / 1000 - start, 2), p.hops)
            if not rounds or rounds[-1] != at:
                rounds.append(at)
        return rounds

    def test_lead_hold_keeps_its_mapping_with_probes_that_die_on_the_way(self):
        """
        LEAD_HOLD with the NAT depth unknown: the opening rounds limited to
        one hop but the last (all the way), then every punch_hold_keepalive
        a round limited to one hop (it refreshes the own NAT's mapping and
        dies there), until punch_hold_timeout.
        """
        attempt_id, results = self.request()
        self.execute(attempt_id, strategy=PunchStrategy.LEAD_HOLD)
        config = self.config
        self.advance_in_steps(config.punch_hold_timeout + 1)
        opening = [(t, 1) for t in probe_schedule(config.punch_hold_after + 1e-6)]
        opening[-1] = (opening[-1][0], None)
        keepalive = config.punch_hold_after + HOLD_GAP
        holds = []
        while keepalive < config.punch_hold_timeout:
            holds.append((round(keepalive, 2), 1))
            keepalive += config.punch_hold_keepalive
        self.assertEqual(self.probe_times(), opening + holds)
        self.assertEqual(self.metrics.get("punch_hold_keepalives"), len(holds))
        self.assertEqual(results, [None])  # given up at punch_hold_timeout, not before
        self.assertEqual(self.metrics.get("punch_failure"), 1)

    def test_hold_keepalives_cross_every_nat_of_our_own(self):
        """
        Behind two NATs (a carrier-grade NAT), every opening round leaves
        with TTL 3 (they open both and die at the next router: none reaches
        the follower's router, however late the follower starts), and the
        keepalives with TTL 2 (they refresh both and die at the outer one).
        (With the depth unknown, the last goes at full TTL: the test above.)
        """
        self.puncher.nat = lambda: SimpleNamespace(nat_type=NatType.PORT_RESTRICTED_CONE,
                                                   nat_hops=2)
        attempt_id, _ = self.request()
        self.execute(attempt_id, strategy=PunchStrategy.LEAD_HOLD)
        self.advance_in_steps(self.config.punch_hold_timeout)
        opening = probe_schedule(self.config.punch_hold_after + 1e-6)
        rounds = self.probe_times()
        self.assertEqual(rounds[:len(opening)], [(t, 3) for t in opening])
        self.assertEqual({hops for _, hops in rounds[len(opening):]}, {2})

    def test_first_side_opens_its_own_nats_for_a_second(self):
        """
        YOU_FIRST behind one NAT: the rounds of the first punch_hold_after
        seconds leave with TTL 2 (through our NAT, dead at the next router),
        the later ones at full TTL; with the depth unknown, TTL 1.
        """
        self.puncher.nat = lambda: SimpleNamespace(nat_type=NatType.RESTRICTED_CONE, nat_hops=1)
        attempt_id, _ = self.request()
        self.execute(attempt_id, strategy=PunchStrategy.YOU_FIRST)
        self.advance_in_steps(self.config.punch_timeout)
        rounds = self.probe_times()
        after = self.config.punch_hold_after
        self.assertEqual(rounds, [(t, 2 if t < after else None)
                                  for t in probe_schedule(self.config.punch_timeout)])

        # the depth unknown (or a public host's, 0): TTL 1, through no
        # router at all (a punch the peer asked for, through a relay we
        # hold a reservation on)
        self.puncher.nat = lambda: SimpleNamespace(nat_type=NatType.RESTRICTED_CONE)
        before = len(self.probes())
        self.execute(0x5555, strategy=PunchStrategy.YOU_FIRST, peer=OTHER)
        self.advance_in_steps(1.0)
        self.assertNotEqual(self.probes()[before:], [])
        self.assertEqual({p.hops for p in self.probes()[before:]}, {1})

    def test_leader_opens_its_nats_without_reaching_the_follower_router(self):
        """
        LEAD_HOLD behind one NAT: everything the node sends the follower's
        addresses leaves with TTL 2 from the first opening round; the
        follower's probe through the opened mapping is acked and probed back
        at full TTL, and the hold ends.
        """
        held = self.sent.held
        self.puncher.nat = lambda: SimpleNamespace(nat_type=NatType.PORT_RESTRICTED_CONE,
                                                   nat_hops=1)
        attempt_id, _ = self.request()
        self.execute(attempt_id, strategy=PunchStrategy.LEAD_HOLD)
        self.clock.advance(0)
        self.assertEqual([(p.address, p.hops) for p in self.probes()],
                         [(PEER_HOST, 2), (PEER_MAPPED, 2)])
        self.assertEqual(held, {PEER_HOST: 2, PEER_MAPPED: 2})
        self.assertEqual(self.metrics.get("punch_hold_keepalives"), 0)
        self.advance_in_steps(self.config.punch_hold_margin)
        before = len(self.probes())
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED, attempt_id=attempt_id, seq=1,
                     sent_ms=0)
        self.assertEqual(held, {})
        (ack,) = self.sent.of(MessageType.PUNCH_ACK)
        self.assertEqual(ack.hops, None)
        self.assertEqual([(p.address, p.hops) for p in self.probes()[before:]],
                         [(PEER_MAPPED, None)])

    def test_follow_retry_goes_quiet_until_routers_forget(self):
        """
        FOLLOW_RETRY: the opening rounds after the margin, then nothing until
        punch_hold_forget after they ended, then probe rounds again.
        """
        attempt_id, _ = self.request()
        self.execute(attempt_id, strategy=PunchStrategy.FOLLOW_RETRY)
        config = self.config
        self.advance_in_steps(config.punch_hold_timeout + 1)
        start = config.punch_hold_margin
        resume = config.punch_hold_after + config.punch_hold_forget
        expected = [(t, None) for t in probe_schedule(config.punch_hold_after + 1e-6)]
        expected += [(round(resume + t, 2), None) for t in probe_schedule(
            config.punch_hold_timeout - start - resume)]
        self.assertEqual(self.probe_times(start), expected)

    def test_the_node_holds_back_what_else_it_sends_the_peer(self):
        """
        While the leader holds its mapping, everything the node sends to the
        follower's addresses is held to the same TTL, and while the follower
        waits, nothing of its node goes to the leader's; both end when the
        path opens or the attempt ends.
        """
        held = {}
        self.puncher.hold = lambda address, hops: held.__setitem__(address, hops)
        self.puncher.release = lambda address: held.pop(address, None)
        config = self.config
        leading, _ = self.request()
        self.execute(leading, strategy=PunchStrategy.LEAD_HOLD)
        self.advance_in_steps(config.punch_hold_after)
        self.assertEqual(held, {})
        self.advance_in_steps(HOLD_GAP)
        self.assertEqual(held, {PEER_HOST: 1, PEER_MAPPED: 1})
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED, attempt_id=leading, seq=1,
                     sent_ms=0)
        self.assertEqual(held, {})

        self.held = {RELAY}
        following = 0x5555
        self.execute(following, strategy=PunchStrategy.FOLLOW_RETRY, peer=OTHER)
        self.advance_in_steps(config.punch_hold_margin + config.punch_hold_after + 0.1)
        self.assertEqual(held, {PEER_HOST: 0, PEER_MAPPED: 0})
        self.advance_in_steps(config.punch_hold_forget)
        self.assertEqual(held, {})
        self.advance_in_steps(config.punch_hold_timeout)
        self.assertEqual(held, {})

    def test_one_punch_with_a_peer_at_a_time(self):
        """
        Asking for a punch while one with the peer runs (the peer asked,
        through another coordinator) asks nobody and gets that one's result.
        """
        self.execute(ATTEMPT, strategy=PunchStrategy.FOLLOW_RETRY)
        before = len(self.sent.of(MessageType.PUNCH_REQUEST))
        results = []
        self.puncher.request(PEER, (RELAY, COORDINATOR)).addCallback(results.append)
        self.assertEqual(len(self.sent.of(MessageType.PUNCH_REQUEST)), before)
        self.assertEqual(self.metrics.get("punch_requests_joined"), 1)
        self.clock.advance(self.config.punch_hold_margin)
        seq = self.probes()[-1].fields["seq"]
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_MAPPED, attempt_id=ATTEMPT, seq=seq,
                     observed=MAPPED)
        self.assertEqual(results, [PEER_MAPPED])

    def test_held_mapping_answered_at_once(self):
        """
        A probe of the follower that comes through the held mapping is
        acked and probed back at once at full TTL (the follower's address
        was a target already), and later rounds are not limited any more.
        """
        attempt_id, _ = self.request()
        self.execute(attempt_id, strategy=PunchStrategy.LEAD_HOLD)
        self.advance_in_steps(self.config.punch_hold_after + self.config.punch_hold_keepalive)
        self.assertEqual(self.probes()[-1].hops, 1)
        before = len(self.probes())
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED,
                     attempt_id=attempt_id, seq=1, sent_ms=0)
        back = self.probes()[before:]
        self.assertEqual([(p.address, p.hops) for p in back], [(PEER_MAPPED, None)])
        self.advance_in_steps(self.config.punch_hold_keepalive)
        self.assertEqual({p.hops for p in self.probes()[before:]}, {None})

    def test_another_attempt_that_punched_settles_a_holding_one(self):
        """
        The peer asked too (its execute reached us first from another
        coordinator): the attempt that found a path ends the one still
        holding, with that path.
        """
        first, first_results = self.request()
        self.execute(first, strategy=PunchStrategy.LEAD_HOLD)
        second = 0x7777
        self.execute(second)  # the peer's, through a relay we hold a reservation on
        self.clock.advance(0.01)
        seq = [p for p in self.probes() if p.fields["attempt_id"] == second][-1].fields["seq"]
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_MAPPED, attempt_id=second, seq=seq,
                     observed=MAPPED)
        self.assertEqual(first_results, [PEER_MAPPED])
        self.assertEqual(self.punched, [(PEER, PEER_MAPPED)])
        self.assertEqual(self.puncher.attempts.keys() - {second}, set())

    def test_spray_spreads_ports_over_the_first_four_rounds(self):
        """Asked to spray, the first four rounds add a quarter each of the ports around the peer's mapped port."""
        attempt_id, _ = self.request()
        self.execute(attempt_id, spray=8)
        sprayed = [(PEER_MAPPED[0], port) for port in spray_ports([PEER_MAPPED[1]], 8)]
        schedule = probe_schedule(self.config.punch_timeout)
        for round_number, offset in enumerate(schedule[:6]):
            before = len(self.probes())
            self.clock.advance(offset - self.clock.seconds())
            targets = [p.address for p in self.probes()[before:]]
            extra = sprayed[2 * round_number:2 * round_number + 2] if round_number < 4 else []
            self.assertEqual(targets, [PEER_HOST, PEER_MAPPED] + extra)
        self.assertEqual(len(sprayed), 8)

    def test_no_spray_unless_asked(self):
        """Without spray only the candidates are probed."""
        attempt_id, _ = self.request()
        self.execute(attempt_id)
        self.advance_in_steps(2)
        self.assertEqual({p.address for p in self.probes()}, {PEER_HOST, PEER_MAPPED})

    def test_execute_for_a_known_attempt_from_elsewhere_is_dropped(self):
        """An EXECUTE for our attempt from another address, for another peer, or a second time is dropped and counted."""
        attempt_id, _ = self.request()
        self.execute(attempt_id, addr=("198.51.100.99", 7400))
        self.execute(attempt_id, peer=OTHER)
        self.assertEqual(self.drops(), {"punch_unexpected_execute": 2})
        self.advance_in_steps(1)
        self.assertEqual(self.probes(), [])
        self.execute(attempt_id)
        before = len(self.probes())
        self.execute(attempt_id, candidates=[candidate(CandidateKind.HOST, ("192.0.2.99", 1))])
        self.assertEqual(self.drops(), {"punch_unexpected_execute": 3})
        self.advance_in_steps(1)
        self.assertNotIn(("192.0.2.99", 1), [p.address for p in self.probes()[before:]])

    def test_impossible_gives_up_at_once(self):
        """An IMPOSSIBLE answer fires the Deferred with None and reports failure without probing."""
        attempt_id, results = self.request()
        self.execute(attempt_id, strategy=PunchStrategy.IMPOSSIBLE, candidates=[])
        self.assertEqual(results, [None])
        (result,) = self.sent.of(MessageType.PUNCH_RESULT)
        self.assertFalse(result.fields["success"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.probes(), [])

    # unsolicited executes (this node is the punch's target)

    def test_relay_holding_our_reservation_starts_a_punch(self):
        """An EXECUTE from a relay we hold a reservation on starts a responder attempt that probes."""
        self.execute(ATTEMPT)
        self.assertEqual(self.metrics.get("punch_attempts", role="responder"), 1)
        self.clock.advance(0)
        self.assertEqual([p.address for p in self.probes()], [PEER_HOST, PEER_MAPPED])

    def test_unsolicited_execute_from_others_is_dropped(self):
        """A member that is not a relay, or a relay we hold nothing on, cannot make us probe."""
        self.registry.add(OTHER, Capability.RELAY)
        self.execute(ATTEMPT, sender=PEER)        # not a relay
        self.execute(ATTEMPT, sender=OTHER)       # a relay, no reservation there
        self.execute(ATTEMPT, sender=b"u" * 16)   # unknown
        self.assertEqual(self.drops(), {"punch_unsolicited": 3})
        self.assertEqual(self.puncher.attempts, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.advance_in_steps(1)
        self.assertEqual(self.sent, [])

    def test_coordinator_we_asked_may_answer_with_the_peers_attempt(self):
        """
        The peer started a punch with us whose execute we did not take (no
        reservation on its coordinator); our own request to that
        coordinator is answered with that attempt: ours becomes it.
        """
        self.held.clear()
        _, results = self.request()
        self.execute(ATTEMPT)
        self.assertEqual(list(self.puncher.attempts), [ATTEMPT])
        self.assertEqual(self.metrics.get("punch_attempts_joined"), 1)
        self.assertEqual(self.drops(), {})
        self.clock.advance(0)
        self.assertEqual([p.address for p in self.probes()], [PEER_HOST, PEER_MAPPED])
        self.assertEqual({p.fields["attempt_id"] for p in self.probes()}, {ATTEMPT})
        probe = self.probes()[-1]
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_MAPPED, attempt_id=ATTEMPT,
                     seq=probe.fields["seq"], observed=MAPPED)
        self.assertEqual(results, [PEER_MAPPED])

    def test_only_the_coordinator_we_asked_answers_for_our_request(self):
        self.held.clear()
        self.registry.add(OTHER, Capability.RELAY)
        self.request()
        self.execute(ATTEMPT, sender=OTHER, addr=("198.51.100.99", 7400))
        self.assertEqual(self.drops(), {"punch_unsolicited": 1})

    def test_unsolicited_impossible_is_ignored(self):
        """An unsolicited IMPOSSIBLE starts nothing and reports nothing."""
        self.execute(ATTEMPT, strategy=PunchStrategy.IMPOSSIBLE, candidates=[])
        self.assertEqual(self.puncher.attempts, {})
        self.assertEqual(self.sent, [])

    # probes

    def test_probe_answered_with_an_ack_no_larger(self):
        """A probe for an attempt with that peer gets an ACK to its source, no larger than the probe."""
        self.execute(ATTEMPT)
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED,
                     attempt_id=ATTEMPT, seq=7, sent_ms=1234)
        (ack,) = self.sent.of(MessageType.PUNCH_ACK)
        self.assertEqual(ack.address, PEER_MAPPED)
        self.assertEqual({k: v for k, v in ack.fields.items() if k != "proof"},
                         {"attempt_id": ATTEMPT, "seq": 7, "observed": PEER_MAPPED})
        self.assertTrue(fake_prover(IDENTITIES[PEER]).check(
            proof.PUNCH_ACK, ack.fields["proof"], self.basics.peer_id, BOOT,
            ATTEMPT.to_bytes(8, "big") + (7).to_bytes(2, "big")))
        probe = build_body(MessageType.PUNCH_PROBE, attempt_id=ATTEMPT, seq=7, sent_ms=1234,
                           padding=PROBE_PADDING)
        self.assertLessEqual(len(build_body(MessageType.PUNCH_ACK, ack.fields)), len(probe))

    def test_probe_smaller_than_its_ack_gets_none(self):
        """An unpadded probe would make the ack an amplifier: it gets nothing."""
        self.execute(ATTEMPT)
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED,
                     attempt_id=ATTEMPT, seq=7, sent_ms=1234, padding=b"")
        self.assertEqual(self.sent.of(MessageType.PUNCH_ACK), [])
        self.assertEqual(self.drops(), {"punch_probe_smaller_than_ack": 1})

    def test_own_probes_are_as_large_as_the_acks_they_ask_for(self):
        self.execute(ATTEMPT)
        self.clock.advance(0)
        for sent in self.probes():
            self.assertEqual(sent.fields["padding"], PROBE_PADDING)

    def test_probe_source_becomes_a_candidate_probed_at_once(self):
        """A probe from a new address (peer-reflexive) makes that address a target, probed at once."""
        self.execute(ATTEMPT)
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_OTHER,
                     attempt_id=ATTEMPT, seq=1, sent_ms=0)
        self.assertEqual([p.address for p in self.probes()], [PEER_OTHER])
        self.clock.advance(0)
        self.assertEqual([p.address for p in self.probes()[1:]],
                         [PEER_HOST, PEER_MAPPED, PEER_OTHER])

    def test_the_side_that_goes_first_says_when_its_probes_left(self):
        """
        YOU_FIRST and LEAD_HOLD send PUNCH_READY to the coordinator right
        after their first probe round, again every punch_request_retry
        while nothing of the peer arrived; the sides that go second or at
        once never do.
        """
        for strategy in PunchStrategy:
            if strategy == PunchStrategy.IMPOSSIBLE:
                continue
            self.sent.clear()
            attempt_id = 0x1000 + int(strategy)
            self.execute(attempt_id, strategy=strategy, start_in_ms=100)
            self.clock.advance(0.099)
            self.assertEqual(self.sent.of(MessageType.PUNCH_READY), [])
            self.advance_in_steps(0.001 + self.config.punch_request_retry * 5)
            readies = self.sent.of(MessageType.PUNCH_READY)
            if strategy in (PunchStrategy.YOU_FIRST, PunchStrategy.LEAD_HOLD):
                self.assertEqual(len(readies), 1 + self.config.punch_request_retries, strategy)
                self.assertEqual({(r.address, r.fields["attempt_id"]) for r in readies},
                                 {(COORDINATOR, attempt_id)})
                first_probe = self.sent.index(self.probes()[0])
                self.assertLess(first_probe, self.sent.index(readies[0]))
            else:
                self.assertEqual(readies, [], strategy)
            self.puncher.stop()

    def test_ready_not_repeated_once_the_peer_is_heard(self):
        self.execute(ATTEMPT, strategy=PunchStrategy.LEAD_HOLD)
        self.clock.advance(0)
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED, attempt_id=ATTEMPT, seq=1,
                     sent_ms=0)
        self.advance_in_steps(self.config.punch_request_retry * 5)
        self.assertEqual(len(self.sent.of(MessageType.PUNCH_READY)), 1)

    def test_first_probe_heard_is_probed_back_a_few_times_soon(self):
        """
        The first probe that comes through is answered and its source
        probed back at once and 0.1, 0.3 and 0.7 s after (one lost
        answer would otherwise wait for the next round, seconds away while
        holding or quiet), until an ack ends the attempt.
        """
        self.execute(ATTEMPT, strategy=PunchStrategy.FOLLOW_RETRY)
        self.advance_in_steps(self.config.punch_hold_after + 1)  # quiet now
        before = len(self.probes())
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED, attempt_id=ATTEMPT, seq=1,
                     sent_ms=0)
        start = self.clock.seconds()
        self.advance_in_steps(2)
        back = [(round(p.fields["sent_ms"] / 1000 - start, 2), p.address, p.hops)
                for p in self.probes()[before:]]
        self.assertEqual(back, [(t, PEER_MAPPED, None) for t in (0, 0.1, 0.3, 0.7)])
        # (and the quiet does not hold back our acks any more)
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED, attempt_id=ATTEMPT, seq=2,
                     sent_ms=0)
        self.assertEqual(self.sent.of(MessageType.PUNCH_ACK)[-1].hops, None)
        self.assertEqual(self.sent.held, {})

    def test_probe_for_unknown_attempt_or_wrong_peer_is_dropped(self):
        """Probes for an attempt we do not know, or from another peer, get no ACK and are counted."""
        self.execute(ATTEMPT)
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED,
                     attempt_id=ATTEMPT + 1, seq=1, sent_ms=0)
        self.deliver(MessageType.PUNCH_PROBE, OTHER, PEER_MAPPED,
                     attempt_id=ATTEMPT, seq=1, sent_ms=0)
        self.assertEqual(self.sent.of(MessageType.PUNCH_ACK), [])
        self.assertEqual(self.probes(), [])
        self.assertEqual(self.drops(), {"punch_unknown_attempt": 2})

    # acks

    def test_first_authenticated_ack_wins(self):
        """The first ACK of a sent probe gives the path: Deferred, proof, rtt, PUNCH_RESULT; later ACKs change nothing."""
        attempt_id, results = self.request()
        self.clock.advance(0.5)
        self.execute(attempt_id)
        self.clock.advance(0)
        first, second = self.probes()
        self.clock.advance(0.04)
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_MAPPED, attempt_id=attempt_id,
                     seq=second.fields["seq"], observed=MAPPED)
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_HOST, attempt_id=attempt_id,
                     seq=first.fields["seq"], observed=MAPPED)
        self.assertEqual(results, [PEER_MAPPED])
        self.assertEqual(self.proven, [(PEER, PEER_MAPPED)])
        self.assertEqual(len(self.registry.rtts), 1)
        self.assertAlmostEqual(self.registry.rtts[0][1], 0.04)
        (result,) = self.sent.of(MessageType.PUNCH_RESULT)
        self.assertEqual(result.address, COORDINATOR)
        self.assertEqual(result.fields["attempt_id"], attempt_id)
        self.assertEqual(result.fields["peer"], PEER)
        self.assertTrue(result.fields["success"])
        self.assertEqual(result.fields["endpoint"], PEER_MAPPED)
        self.assertEqual(result.fields["elapsed_ms"], 540)
        self.assertEqual(self.metrics.get("punch_success"), 1)
        self.assertEqual(self.punched, [])  # a requested punch's path is the Deferred's

    def test_no_more_probes_after_success(self):
        """Once punched, the remaining probe rounds send nothing."""
        attempt_id, _ = self.request()
        self.execute(attempt_id)
        self.clock.advance(0)
        seq = self.probes()[0].fields["seq"]
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_HOST, attempt_id=attempt_id,
                     seq=seq, observed=MAPPED)
        sent = len(self.probes())
        self.advance_in_steps(self.config.punch_timeout)
        self.assertEqual(len(self.probes()), sent)

    def test_answered_punch_hands_the_path_over(self):
        """A responder's punch that succeeds calls on_punched with the ACK's source address."""
        self.execute(ATTEMPT)
        self.clock.advance(0)
        seq = self.probes()[1].fields["seq"]
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_OTHER, attempt_id=ATTEMPT,
                     seq=seq, observed=MAPPED)
        self.assertEqual(self.punched, [(PEER, PEER_OTHER)])
        (result,) = self.sent.of(MessageType.PUNCH_RESULT)
        self.assertEqual(result.address, COORDINATOR)
        self.assertTrue(result.fields["success"])

    def test_unauthenticated_acks_are_dropped(self):
        """ACKs for an unknown attempt, from another peer, for a seq never sent, or without the peer's own proof are dropped and counted."""
        attempt_id, results = self.request()
        self.execute(attempt_id)
        self.clock.advance(0)
        seq = self.probes()[0].fields["seq"]
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_HOST, attempt_id=attempt_id + 1,
                     seq=seq, observed=MAPPED)
        self.deliver(MessageType.PUNCH_ACK, OTHER, PEER_HOST, attempt_id=attempt_id,
                     seq=seq, observed=MAPPED)
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_HOST, attempt_id=attempt_id,
                     seq=seq + 100, observed=MAPPED)
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_HOST, attempt_id=attempt_id,
                     seq=seq, observed=MAPPED, signer=IDENTITIES[OTHER])
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_HOST, attempt_id=attempt_id,
                     seq=seq, observed=MAPPED, proof=b"")
        self.assertEqual(self.drops(), {"punch_unknown_ack": 3, "punch_unproven_ack": 2})
        self.assertEqual(results, [])
        self.assertEqual(self.proven, [])
        self.assertEqual(self.sent.of(MessageType.PUNCH_RESULT), [])

    def test_probes_answered_for_a_while_after_success(self):
        """After success the attempt answers probes for punch_linger seconds, then is forgotten."""
        self.execute(ATTEMPT)
        self.clock.advance(0)
        seq = self.probes()[0].fields["seq"]
        self.deliver(MessageType.PUNCH_ACK, PEER, PEER_HOST, attempt_id=ATTEMPT,
                     seq=seq, observed=MAPPED)
        self.clock.advance(self.config.punch_linger - 0.01)
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_HOST, attempt_id=ATTEMPT, seq=9,
                     sent_ms=0)
        self.assertEqual(len(self.sent.of(MessageType.PUNCH_ACK)), 1)
        self.clock.advance(0.01)
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_HOST, attempt_id=ATTEMPT, seq=10,
                     sent_ms=0)
        self.assertEqual(len(self.sent.of(MessageType.PUNCH_ACK)), 1)
        self.assertEqual(self.drops(), {"punch_unknown_attempt": 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # giving up

    def test_timeout_gives_up_and_reports(self):
        """Without an ACK by punch_timeout the Deferred fires None and failure is reported."""
        attempt_id, results = self.request()
        self.execute(attempt_id)
        self.clock.advance(self.config.punch_timeout - 0.01)
        self.assertEqual(results, [])
        self.clock.advance(0.01)
        self.assertEqual(results, [None])
        (result,) = self.sent.of(MessageType.PUNCH_RESULT)
        self.assertEqual(result.address, COORDINATOR)
        self.assertFalse(result.fields["success"])
        self.assertEqual(result.fields["endpoint"], ("0.0.0.0", 0))
        self.assertEqual(result.fields["elapsed_ms"], int(1000 * self.config.punch_timeout))
        self.assertEqual(self.metrics.get("punch_failure"), 1)
        self.assertEqual(self.puncher.attempts, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_request_asked_again_while_nothing_answers(self):
        """A lost request or execute does not cost the attempt: asked again, twice."""
        attempt_id, _ = self.request()
        self.advance_in_steps(self.config.punch_timeout - 1)
        requests = self.sent.of(MessageType.PUNCH_REQUEST)
        self.assertEqual(len(requests), 1 + self.config.punch_request_retries)
        self.assertEqual({r.fields["attempt_id"] for r in requests}, {attempt_id})
        self.assertEqual({r.address for r in requests}, {COORDINATOR})

    def test_request_not_repeated_once_the_peer_is_heard(self):
        attempt_id, _ = self.request()
        self.execute(attempt_id)
        self.deliver(MessageType.PUNCH_PROBE, PEER, PEER_MAPPED, attempt_id=attempt_id, seq=1,
                     sent_ms=0)
        self.advance_in_steps(self.config.punch_timeout - 1)
        self.assertEqual(len(self.sent.of(MessageType.PUNCH_REQUEST)), 1)

    def test_timeout_before_execute_reports_nothing(self):
        """A request the coordinator never answered fails silently towards it."""
        _, results = self.request()
        self.clock.advance(self.config.punch_timeout)
        self.assertEqual(results, [None])
        self.assertEqual(self.sent.of(MessageType.PUNCH_RESULT), [])

    def test_responder_timeout_does_not_hand_over(self):
        """A responder's failed punch reports failure and does not call on_punched."""
        self.execute(ATTEMPT)
        self.clock.advance(self.config.punch_timeout)
        self.assertEqual(self.punched, [])
        (result,) = self.sent.of(MessageType.PUNCH_RESULT)
        self.assertFalse(result.fields["success"])

    def test_oldest_attempt_given_up_beyond_the_limit(self):
        """Past max_punch_attempts the oldest attempt is given up to make room."""
        basics, _, _ = fake_basics(config=type(self.config)(max_punch_attempts=2))
        puncher = Puncher(basics, FakeRegistry(), nat=lambda: None, local_port=lambda: 0,
                          public_endpoints=lambda: [], proven=lambda p, a, b: None,
                          holds_reservation=lambda r: False, on_punched=lambda p, a: None,
                          local_address=lambda t: None)
        results = []
        for peer in (PEER, OTHER, RELAY):
            puncher.request(peer, (RELAY, COORDINATOR)).addCallback(
                lambda r, peer=peer: results.append((peer, r)))
        self.assertEqual(results, [(PEER, None)])
        self.assertEqual(len(puncher.attempts), 2)

    def test_stop_gives_up_and_cancels_timers(self):
        """stop() fires every Deferred with None and leaves no timer behind."""
        attempt_id, results = self.request()
        self.execute(attempt_id)
        self.execute(ATTEMPT)
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        self.puncher.stop()
        self.assertEqual(results, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.puncher.attempts, {})
        sent = len(self.sent)
        self.advance_in_steps(self.config.punch_timeout + 1)
        self.assertEqual(len(self.sent), sent)
