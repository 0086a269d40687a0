"""
Coordinated hole punching.

1. A asks a coordinator (a relay both A and B reach; B holds a reservation
   there or has a session through it) with PUNCH_REQUEST: target B, A's NAT
   type, A's candidates (host address and the STUN-mapped one).
2. The coordinator adds the address it sees A at, takes B's candidates from
   B's signed announcement and from where it reaches B, picks a strategy from
   the two NAT types (L{choose_strategy}), and sends PUNCH_EXECUTE to both
   with the other's candidates and a start delay computed from its measured
   round trips so both start at the same moment.
3. Both sides send PUNCH_PROBE from the node's single socket (so the mapping
   STUN discovered is the one punched) to every candidate, at 0, 0.1, 0.3,
   0.7, 1.5, 3.1, 4.7 ... s (100 ms doubling, capped at 1.6 s) until
   C{punch_timeout}.  A probe is answered with PUNCH_ACK to the address it
   came from, and that address (peer-reflexive, the only way to learn a
   symmetric NAT's new mapping) becomes a candidate probed at once.
4. The first ACK with a valid identity proof (L{omerta.crypto.proof}: the
   peer's signature over the attempt id and the probe's sequence number)
   wins: its source address is the punched path.  Both report PUNCH_RESULT
   to the coordinator.

Probes and acks are sealed frames of the network, accepted only for an
attempt this node knows with that peer; a probe is padded to the size of
the ack it asks for, so an ack is never larger than its probe.

The coordinator passes on only candidates it can vouch for, so no member can
make another send probes to addresses of its choosing: the address it sees
the requester at, server-reflexive candidates on that same IP address, and
at most two host candidates in private, loopback or link-local ranges (a
LAN peer's own address; never a global one).
For symmetric towards port-restricted NATs the coordinator asks the
port-restricted side to "spray": probe C{spray} ports of the symmetric
side's address around the ports it was seen on, within the same schedule
(port prediction, which only helps NATs that allocate ports sequentially).

Who goes first is chosen for routers without an input filter too
(L{choose_strategy}), and the side that goes first (YOU_FIRST) opens only
its own NATs for the first C{punch_hold_after} seconds: its probes leave
with an IP TTL one above its NAT depth (L{omerta.stun.hops}, measured at
start), cross its NATs and die at the next router, so none reaches the
other router before the other side has sent (which would move that side's
mapping there, and on Linux make the moved port the one its later
destinations get too); the other side's probes, sent at full TTL, come
through the mapping the first side opened, and are answered at full TTL.
Later rounds go all the way.  Between two port-restricted cones no order works
there: the first probe to arrive leaves a conntrack entry on the other
router that moves its host's mapping.  So the leader (LEAD_HOLD) opens
its own NATs first without reaching the follower's router: its opening
probes (all but the last round) leave with an IP TTL one above its NAT
depth (L{omerta.stun.hops}, measured at start),
so they cross every NAT of its own and die at the first router beyond, and
its node sends the follower nothing that could go further.  The follower
(FOLLOW_RETRY) probes C{punch_hold_margin} later at full TTL, through the
mapping the leader opened; the leader answers and probes back at full TTL.
Wherever a router lies between the two NATs (on any real path) that is the
punch.  Where none does (two NATs on one Ethernet segment), the leader's
opening probes reach the other router all the same; then, after
C{punch_hold_after} seconds, the leader only keeps its own mapping alive
with probes that die at its outermost NAT (TTL of its NAT depth: they
refresh its NATs), while the follower goes quiet for C{punch_hold_forget}
seconds (the router forgets unanswered UDP in 30 s) and probes again: from
its own mapping this time, through the one the leader held.  A leader whose
NAT depth is unknown sends its opening probes with TTL 1 and only its last
opening round at full TTL.  On routers that drop what nobody asked for, the
opening rounds succeed either way.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from omerta.crypto import proof
from omerta.crypto.identity import format_peer_id
from omerta.mesh.context import Basics
from omerta.wire.envelope import MIN_FRAME_SIZE
from omerta.wire.messages import (Capability, CandidateKind, MessageType, NatType,
                                  PunchStrategy, build_body)

S = PunchStrategy
N = NatType

_PROBE_SIZE = len(build_body(MessageType.PUNCH_PROBE, attempt_id=0, seq=0, sent_ms=0,
                             padding=b""))
_ACK_SIZE = len(build_body(MessageType.PUNCH_ACK, attempt_id=0, seq=0, observed=("::", 0),
                           proof=bytes(proof.PROOF_SIZE)))
PROBE_PADDING = bytes(_ACK_SIZE - _PROBE_SIZE)
"""Makes a probe as large as the largest ack with its proof."""
MAX_HOST_CANDIDATES = 2

# Reachable at the mapped address by anyone once it has sent anything.
_OPEN = (N.PUBLIC, N.FULL_CONE)


def choose_strategy(a: int, b: int, spray: int = 128) -> tuple[S, S, int, int]:
    """
    The strategy for each side of a punch between NAT types C{a} (the
    requester) and C{b}: C{(strategy_a, strategy_b, spray_a, spray_b)}.

    The order is chosen so that the first probe to reach each router finds
    the mapping it needs open: a router without an input filter keeps a
    conntrack entry for a probe that arrived before its host sent to the
    prober, which moves the host's mapping towards the prober (or catches
    the prober's later probes), for as long as probes keep coming and 30 s
    after.

    - either side blocked, or both symmetric: impossible;
    - a side reachable by anyone (public, full cone): the other side goes
      first, the open side answers where the probes come from;
    - a restricted cone (filtering by address only) goes first: its probes
      open it for the other's address whatever port the other's probes
      then come from (a symmetric NAT's new mapping, or a mapping a probe
      that came first moved), which it learns from them;
    - symmetric with a port-restricted cone: the symmetric side first (its
      new mapping is learnt from its probes), the cone side also sprays
      ports of the symmetric side's address (port prediction);
    - two port-restricted cones, or unknown types (nodes that have not
      classified their NAT yet, most often behind one): C{a} leads (opens
      its own NATs first) and holds its mapping, C{b} follows and retries
      after the other router forgot (see the module docstring);
    - otherwise (unknown with symmetric): simultaneous open.
    """
    a, b = _nat(a), _nat(b)
    if N.BLOCKED in (a, b) or (a == N.SYMMETRIC and b == N.SYMMETRIC):
        return S.IMPOSSIBLE, S.IMPOSSIBLE, 0, 0
    if a in _OPEN and b in _OPEN:
        return S.SIMULTANEOUS, S.SIMULTANEOUS, 0, 0
    if a in _OPEN:
        return S.THEY_FIRST, S.YOU_FIRST, 0, 0
    if b in _OPEN:
        return S.YOU_FIRST, S.THEY_FIRST, 0, 0
    if a == N.RESTRICTED_CONE:
        return S.YOU_FIRST, S.THEY_FIRST, 0, 0
    if b == N.RESTRICTED_CONE:
        return S.THEY_FIRST, S.YOU_FIRST, 0, 0
    if a == N.SYMMETRIC and b == N.PORT_RESTRICTED_CONE:
        return S.YOU_FIRST, S.THEY_FIRST, 0, spray
    if b == N.SYMMETRIC and a == N.PORT_RESTRICTED_CONE:
        return S.THEY_FIRST, S.YOU_FIRST, spray, 0
    if {a, b} <= {N.PORT_RESTRICTED_CONE, N.UNKNOWN}:
        return S.LEAD_HOLD, S.FOLLOW_RETRY, 0, 0
    return S.SIMULTANEOUS, S.SIMULTANEOUS, 0, 0


_HOLDING = (S.LEAD_HOLD, S.FOLLOW_RETRY)
_FIRST = (S.YOU_FIRST, S.LEAD_HOLD)
"""Strategies of a side that goes first: the other side's execute waits for
its PUNCH_READY."""
HOLD_GAP = 0.05
"""Seconds between the last opening round and the start of a hold."""

# How far a probe round goes (the second item of a round; None: all the way).
QUIET = "quiet"
"""Nothing to the peer's addresses at all (FOLLOW_RETRY waiting)."""
KEEP = "keep"
"""IP TTL of our NAT depth (at least 1): refreshes our NATs, dies at the last."""
OPEN = "open"
"""IP TTL of our NAT depth + 1: opens our NATs, dies at the first router
beyond (TTL 1 while the depth is unknown)."""


def _strategy_name(value: int) -> str:
    try:
        return S(value).name
    except ValueError:
        return str(value)


def attempt_timeout(config, strategy: int) -> float:
    """How long an attempt with C{strategy} lasts before it is given up."""
    return config.punch_hold_timeout if strategy in _HOLDING else config.punch_timeout


def _nat(value: int) -> NatType:
    try:
        return NatType(value)
    except ValueError:
        return N.UNKNOWN


def probe_schedule(timeout: float, first: float = 0.1, cap: float = 1.6) -> list[float]:
    """
    Offsets (seconds from the start) of the probe rounds: 0, then gaps of
    100 ms doubling up to C{cap}, until C{timeout}.
    """
    out, t, gap = [0.0], 0.0, first
    while t + gap < timeout:
        t += gap
        out.append(round(t, 6))
        gap = min(cap, gap * 2)
    return out


def spray_ports(seen: list[int], count: int) -> list[int]:
    """
    C{count} ports to probe for a symmetric NAT seen using ports C{seen}:
    the ports just above and below each, nearest first (sequential
    allocators hand out the next port for a new destination).
    """
    out: list[int] = []
    for distance in range(1, count + 1):
        for port in seen:
            for candidate in (port + distance, port - distance):
                if 1024 <= candidate <= 65535 and candidate not in out and candidate not in seen:
                    out.append(candidate)
                    if len(out) >= count:
                        return out
    return out


# -- the two ends ---------------------------------------------------------------


@dataclass
class Attempt:
    attempt_id: int
    peer_id: bytes
    coordinator: tuple | None
    started: float
    deferred: Deferred
    targets: list = field(default_factory=list)
    spray: list = field(default_factory=list)
    seq: int = 0
    sent: dict = field(default_factory=dict)   # seq -> time
    calls: list = field(default_factory=list)
    result: tuple | None = None
    executed: bool = False
    strategy: int = 0
    probes: int = 0
    probes_answered: bool = False  # a probe of the peer's reached us
    holding: bool = False  # LEAD_HOLD: probes that die before the peer's router
    held: set = field(default_factory=set)  # addresses the node's sends are held back to
    rounds: int = 0
    give_up: Any = None    # the delayed call that ends the attempt


class Puncher:
    """
    This node's side of hole punches, in one network.

    Built from L{Basics} and narrow collaborators, so a test can build it
    alone on a C{Clock}:

    @param registry: the network's members (a relay's capabilities; the
        round trip a punch measured is recorded there).
    @param nat: C{nat()} is this node's NAT report (C{nat_type}), or None.
    @param nat_hops: C{nat_hops()} is how many NATs this host is behind
        (L{omerta.stun.hops}), or None while unknown; by default the NAT
        report's C{nat_hops}.
    @param local_port: C{local_port()} is the port of the node's socket
        (0 before it is bound).
    @param public_endpoints: C{public_endpoints()} lists the node's
        server-reflexive (STUN-mapped, observed) addresses.
    @param proven: C{proven(peer_id, address, boot)}: an ack with its
        identity proof proved the address leads to the peer's run C{boot}.
    @param holds_reservation: C{holds_reservation(relay_id)}: this node holds
        a reservation on that relay (only such a relay may start a punch this
        node did not ask for).
    @param on_punched: C{on_punched(peer_id, address)}: a punch this node
        answered (did not request) found a path.  A requested punch's path is
        the result of L{request}'s Deferred instead.
    @param local_address: C{local_address(towards)}, the local address
        traffic to C{towards} leaves from, or None.
    @param hold: C{hold(address, hops)}: until released, everything the
        node sends to C{address} leaves with an IP TTL of C{hops}, or (0)
        is not sent at all: while a punch holds its mapping open or waits
        for the peer's router to forget, nothing else of the node (a
        liveness ping to the peer's address) may reach the peer's router.
    @param release: C{release(address)} ends a C{hold}.
    """

    log = Logger()

    def __init__(self, basics: Basics, registry, *, nat: Callable[[], Any],
                 local_port: Callable[[], int], public_endpoints: Callable[[], list],
                 proven: Callable[[bytes, tuple, bytes], None],
                 holds_reservation: Callable[[bytes], bool],
                 on_punched: Callable[[bytes, tuple], None],
                 local_address: Callable[[tuple], str | None] | None = None,
                 hold: Callable[[tuple, int], None] = lambda address, hops: None,
                 release: Callable[[tuple], None] = lambda address: None,
                 nat_hops: Callable[[], int | None] | None = None):
        self.basics = basics
        self.config = basics.config
        self.clock = basics.clock
        self.metrics = basics.metrics
        self.registry = registry
        self.nat = nat
        self.nat_hops = nat_hops or (lambda: getattr(self.nat(), "nat_hops", None))
        self.local_port = local_port
        self.public_endpoints = public_endpoints
        self.proven = proven
        self.holds_reservation = holds_reservation
        self.on_punched = on_punched
        self.local_address = local_address or _local_address
        self.hold = hold
        self.release = release
        self.attempts: dict[int, Attempt] = {}

    def own_candidates(self, towards: tuple) -> list[dict]:
        """
        Host (the local address the node's traffic to C{towards} leaves
        from) and server-reflexive (STUN-mapped, observed) candidates.
        """
        out = []
        host = self.local_address(towards)
        port = self.local_port()
        if host is not None and port:
            out.append({"kind": int(CandidateKind.HOST), "endpoint": (host, port)})
        for endpoint in self.public_endpoints():
            if all(c["endpoint"] != endpoint for c in out):
                out.append({"kind": int(CandidateKind.SERVER_REFLEXIVE), "endpoint": endpoint})
        return out

    def request(self, peer_id: bytes, coordinator: tuple) -> Deferred:
        """
        Ask C{coordinator} (relay id, address) for a punch to C{peer_id}.
        Fires with the punched address, or None.  While an attempt with the
        peer runs (asked for by either side), fires with its result instead.
        """
        relay_id, address = coordinator
        d = Deferred()
        running = next((a for a in self.attempts.values()
                        if a.peer_id == peer_id and a.result is None), None)
        if running is not None:
            # One punch with a peer at a time, whichever side (or
            # coordinator) started it: a second one would probe through
            # the quiet a hold needs.  This one's answer is its answer.
            self.metrics.inc("punch_requests_joined")

            def answer(result):
                d.callback(result)
                return result

            running.deferred.addCallback(answer)
            return d
        attempt_id = int.from_bytes(os.urandom(8), "big")
        now = self.clock.seconds()
        attempt = Attempt(attempt_id, peer_id, address, now, d)
        self._add(attempt)
        nat = self.nat()
        request = dict(attempt_id=attempt_id, target=peer_id,
                       nat_type=0 if nat is None else int(nat.nat_type),
                       candidates=self.own_candidates(address))
        self.basics.send(address, MessageType.PUNCH_REQUEST, **request)
        self.metrics.inc("punch_attempts", role="initiator")
        self._end_after(attempt, self.config.punch_timeout)
        # A lost request, or a lost execute to either side, would cost the
        # whole attempt: ask again while nothing has answered (the
        # coordinator repeats the same executes).
        for n in range(1, self.config.punch_request_retries + 1):
            attempt.calls.append(self.clock.callLater(
                n * self.config.punch_request_retry, self._ask_again, attempt_id, request))
        return d

    def _asked(self, peer_id: bytes, coordinator: tuple) -> Attempt | None:
        """
        Our own request to C{coordinator} for a punch with C{peer_id} that
        no execute has answered yet, if any.
        """
        return next((a for a in self.attempts.values()
                     if a.peer_id == peer_id and a.coordinator == coordinator
                     and not a.executed and a.result is None), None)

    def _end_after(self, attempt: Attempt, timeout: float) -> None:
        """Give the attempt up C{timeout} seconds after it started."""
        if attempt.give_up is not None and attempt.give_up.active():
            attempt.give_up.cancel()
        delay = max(0.0, attempt.started + timeout - self.clock.seconds())
        attempt.give_up = self.clock.callLater(delay, self._give_up, attempt.attempt_id)
        attempt.calls.append(attempt.give_up)

    def _ask_again(self, attempt_id: int, request: dict) -> None:
        attempt = self.attempts.get(attempt_id)
        if attempt is None or attempt.result is not None or attempt.probes_answered:
            return
        self.basics.send(attempt.coordinator, MessageType.PUNCH_REQUEST, **request)
        self.metrics.inc("punch_requests_repeated")

    def _add(self, attempt: Attempt) -> None:
        while len(self.attempts) >= self.config.max_punch_attempts:
            self._give_up(next(iter(self.attempts)))
        self.attempts[attempt.attempt_id] = attempt

    def on_execute(self, frame, addr, message) -> None:
        attempt = self.attempts.get(message.attempt_id)
        asked = None if attempt is not None else self._asked(message.peer, addr)
        if attempt is not None:
            if attempt.coordinator != addr or attempt.peer_id != message.peer or attempt.executed:
                self.metrics.inc("drops", reason="punch_unexpected_execute")
                return
        elif asked is not None:
            # The coordinator we asked answers with the attempt the peer
            # already started with us: ours becomes that one.
            del self.attempts[asked.attempt_id]
            asked.attempt_id = message.attempt_id
            self.attempts[asked.attempt_id] = asked
            attempt = asked
            self.metrics.inc("punch_attempts_joined")
        else:
            record = self.registry.get(frame.sender)
            if (record is None or not record.capabilities & (Capability.RELAY | Capability.COORDINATOR)
                    or not self.holds_reservation(frame.sender)):
                # Only a relay we hold a reservation on may start a punch we
                # did not ask for: no member can make us probe addresses.
                self.metrics.inc("drops", reason="punch_unsolicited")
                return
            if message.strategy == S.IMPOSSIBLE:
                return
            attempt = Attempt(message.attempt_id, message.peer, addr,
                              self.clock.seconds(), Deferred())
            self._add(attempt)
            attempt.deferred.addCallback(self._answered_punch, message.peer)
            self.metrics.inc("punch_attempts", role="responder")
        attempt.executed = True
        if message.strategy == S.IMPOSSIBLE:
            self._give_up(message.attempt_id)
            return
        timeout = attempt_timeout(self.config, message.strategy)
        self._end_after(attempt, timeout)
        self.log.debug("Punch {attempt:x} with {peer}: {strategy}, start in {start} ms,"
                       " candidates {targets}, {depth} NAT(s) deep", attempt=message.attempt_id,
                       depth=self.nat_hops(),
                       peer=format_peer_id(message.peer), start=message.start_in_ms,
                       strategy=_strategy_name(message.strategy),
                       targets=[tuple(c.endpoint) for c in message.candidates])
        attempt.targets = [tuple(c.endpoint) for c in message.candidates][:8]
        attempt.strategy = message.strategy
        if message.spray:
            # around the ports the peer's NAT was seen using (server-reflexive)
            reflexive = [tuple(c.endpoint) for c in message.candidates
                         if c.kind == CandidateKind.SERVER_REFLEXIVE]
            hosts = sorted({t[0] for t in reflexive})
            share = -(-message.spray // max(1, len(hosts)))
            for host in hosts:
                ports = [t[1] for t in reflexive if t[0] == host]
                attempt.spray += [(host, p) for p in spray_ports(ports, share)]
            attempt.spray = attempt.spray[:message.spray]
        delay = message.start_in_ms / 1000
        if message.strategy in (S.THEY_FIRST, S.FOLLOW_RETRY):
            # well after the side that goes first, whatever the two ends'
            # load: a probe of ours that reached its router before its first
            # one left would move its mapping
            delay += self.config.punch_hold_margin
        # (from now: the attempt started when it was asked for or executed)
        remaining = attempt.started + timeout - self.clock.seconds()
        for offset, reach in self._rounds(message.strategy, remaining - delay):
            attempt.calls.append(self.clock.callLater(delay + offset, self._probe_round,
                                                      message.attempt_id, reach))

    def _rounds(self, strategy: int, length: float) -> list[tuple[float, str | None]]:
        """
        The probe rounds of one side, as (offset, how far: None, L{OPEN},
        L{KEEP} or L{QUIET}), for an attempt C{length} seconds long from
        this side's start.
        """
        config = self.config
        # The side that goes first opens only its own NATs until
        # punch_hold_after (a probe of ours on the other router before the
        # other side sent would move its mapping), then goes all the way:
        # where the depth is wrong (a router that did not answer), those
        # rounds still open the path on routers that drop what nobody asked for.
        def first(offsets: list[float]) -> list[tuple[float, str | None]]:
            return [(t, OPEN if t < config.punch_hold_after else None) for t in offsets]

        if strategy == S.YOU_FIRST:
            return first(probe_schedule(length))
        if strategy not in _HOLDING:
            return [(offset, None) for offset in probe_schedule(length)]
        opening = probe_schedule(config.punch_hold_after + 1e-6)
        # the hold (and the follower's quiet) starts right after the opening
        # rounds: from then on nothing of ours may reach the other router
        start = config.punch_hold_after + HOLD_GAP
        if strategy == S.LEAD_HOLD:
            keepalives, t = [], start
            while t < length:
                keepalives.append((t, KEEP))
                t += config.punch_hold_keepalive
            if self.nat_hops():
                # Every opening round stops beyond our NATs: one at full
                # TTL would reach the follower's router before the
                # follower's probes left whenever its execute came late.
                return [(t, OPEN) for t in opening] + keepalives
            return first(opening) + keepalives
        resume = config.punch_hold_after + config.punch_hold_forget
        return ([(offset, None) for offset in opening] + [(start, QUIET)]
                + [(resume + offset, None) for offset in probe_schedule(max(0.0, length - resume))])

    def _hop_limit(self, reach: str) -> int | None:
        """The IP TTL of a round that goes C{reach} (None: no limit)."""
        depth = self.nat_hops()
        if reach == KEEP:
            return max(1, depth or 0)
        # (depth unknown, or a public host: 1, through no router at all;
        # the rounds after punch_hold_after go all the way)
        return (depth or 0) + 1

    def _answered_punch(self, address, peer_id: bytes):
        if address is not None:
            self.on_punched(peer_id, address)
        return address

    def _probe_round(self, attempt_id: int, reach: str | None = None) -> None:
        attempt = self.attempts.get(attempt_id)
        if attempt is None or attempt.result is not None:
            return
        if reach == QUIET:
            # FOLLOW_RETRY: quiet towards the leader until its router forgot
            # (unless the leader came through already: then we answer)
            if not attempt.probes_answered:
                self._hold(attempt, 0)
            return
        targets = list(attempt.targets)
        round_number = attempt.rounds
        attempt.rounds += 1
        if attempt.spray and round_number < 4:
            # spread the spray over the first rounds
            share = -(-len(attempt.spray) // 4)
            targets += attempt.spray[round_number * share:(round_number + 1) * share]
        hops = None if reach is None or attempt.probes_answered else self._hop_limit(reach)
        if hops is not None:
            # Through our NATs, not to the peer's router (what arrives there
            # unasked moves the peer's mapping, or is what we wait out).
            attempt.holding = True
            self._hold(attempt, hops)  # (the node sends them with that TTL)
            for target in targets:
                self._probe(attempt, target)
            if reach == KEEP:
                self.metrics.inc("punch_hold_keepalives")
        else:
            self._release(attempt)
            for target in targets:
                self._probe(attempt, target)
        if round_number == 0 and attempt.strategy in _FIRST:
            self._ready(attempt.attempt_id)
            for n in range(1, self.config.punch_request_retries + 1):
                attempt.calls.append(self.clock.callLater(
                    n * self.config.punch_request_retry, self._ready, attempt.attempt_id))

    def _ready(self, attempt_id: int) -> None:
        """
        PUNCH_READY to the coordinator: our first probes left, the other
        side may start (again while nothing of it arrived: the READY or
        the other side's execute may have been lost).
        """
        attempt = self.attempts.get(attempt_id)
        if attempt is None or attempt.result is not None or attempt.probes_answered:
            return
        self.basics.send(attempt.coordinator, MessageType.PUNCH_READY, attempt_id=attempt_id)
        self.metrics.inc("punch_ready")

    def _hold(self, attempt: Attempt, hops: int) -> None:
        for target in attempt.targets:
            self.hold(target, hops)
            attempt.held.add(target)

    def _release(self, attempt: Attempt) -> None:
        for target in attempt.held:
            self.release(target)
        attempt.held.clear()

    def _probe(self, attempt: Attempt, target: tuple) -> None:
        now = self.clock.seconds()
        attempt.seq = (attempt.seq + 1) & 0xFFFF
        attempt.sent[attempt.seq] = now
        attempt.probes += 1
        self.basics.send_to(attempt.peer_id, target, MessageType.PUNCH_PROBE,
                            attempt_id=attempt.attempt_id, seq=attempt.seq,
                            sent_ms=int(now * 1000), padding=PROBE_PADDING)
        self.metrics.inc("punch_probes")

    def on_probe(self, frame, addr, message) -> None:
        attempt = self.attempts.get(message.attempt_id)
        if attempt is None or attempt.peer_id != frame.sender:
            self.metrics.inc("drops", reason="punch_unknown_attempt")
            return
        if MIN_FRAME_SIZE + len(frame.body) < MIN_FRAME_SIZE + _ACK_SIZE:
            self.metrics.inc("drops", reason="punch_probe_smaller_than_ack")
            return
        first_heard = not attempt.probes_answered
        attempt.probes_answered = True
        # the path is open: what we send the peer may go all the way now
        self._release(attempt)
        answer = self.basics.prover.prove(proof.PUNCH_ACK, frame.sender,
                                          _ack_challenge(message.attempt_id, message.seq))
        self.basics.send_to(frame.sender, addr, MessageType.PUNCH_ACK,
                            attempt_id=message.attempt_id, seq=message.seq, observed=addr,
                            proof=answer)
        if attempt.result is not None:
            return
        if addr not in attempt.targets and len(attempt.targets) < 16:
            # Peer-reflexive: the mapping its NAT made towards us.
            attempt.targets.append(addr)
            self._probe(attempt, addr)
        elif attempt.holding or first_heard:
            # The follower came through the mapping we held, or the peer
            # came through at all: probe it back now.
            attempt.holding = False
            self._probe(attempt, addr)
        if first_heard:
            # and a few times soon: one lost answer would otherwise wait for
            # the next round of the schedule, seconds away while holding
            # or quiet
            for offset in probe_schedule(self.config.punch_hold_after)[1:]:
                attempt.calls.append(self.clock.callLater(offset, self._probe_back,
                                                          attempt.attempt_id, addr))

    def _probe_back(self, attempt_id: int, address: tuple) -> None:
        attempt = self.attempts.get(attempt_id)
        if attempt is not None and attempt.result is None:
            self._probe(attempt, address)

    def on_ack(self, frame, addr, message) -> None:
        attempt = self.attempts.get(message.attempt_id)
        if (attempt is None or attempt.peer_id != frame.sender
                or message.seq not in attempt.sent):
            self.metrics.inc("drops", reason="punch_unknown_ack")
            return
        if attempt.result is not None:
            return
        if not self.basics.prover.check(proof.PUNCH_ACK, message.proof, frame.sender,
                                        frame.boot,
                                        _ack_challenge(message.attempt_id, message.seq)):
            self.metrics.inc("drops", reason="punch_unproven_ack")
            return
        now = self.clock.seconds()
        rtt = now - attempt.sent[message.seq]
        attempt.result = addr
        self._release(attempt)
        self.proven(frame.sender, addr, frame.boot)
        self.registry.set_rtt(frame.sender, rtt)
        self.metrics.inc("punch_success")
        elapsed = now - attempt.started
        self.log.info("Punched a path to {peer} at {address} in {elapsed:.2f} s",
                      peer=format_peer_id(frame.sender), address=f"{addr[0]}:{addr[1]}",
                      elapsed=elapsed)
        self._report(attempt, addr)
        # Keep answering the peer's probes for a moment, then forget.
        attempt.calls.append(self.clock.callLater(self.config.punch_linger,
                                                  self._forget, attempt.attempt_id))
        if not attempt.deferred.called:
            attempt.deferred.callback(addr)
        for other in [a for a in self.attempts.values()
                      if a.peer_id == frame.sender and a.result is None]:
            # another attempt with the peer (both asked at once; one still
            # holding) has its answer too
            self._settle(other, addr)

    def _report(self, attempt: Attempt, addr: tuple | None) -> None:
        """PUNCH_RESULT to the attempt's coordinator: the path, or (None) none."""
        if attempt.coordinator is None:
            return
        self.basics.send(attempt.coordinator, MessageType.PUNCH_RESULT,
                         attempt_id=attempt.attempt_id, peer=attempt.peer_id,
                         success=addr is not None, endpoint=addr or ("0.0.0.0", 0),
                         elapsed_ms=int(1000 * (self.clock.seconds() - attempt.started)))

    def _settle(self, attempt: Attempt, addr: tuple) -> None:
        """End an attempt with the path another attempt with its peer found."""
        attempt.result = addr
        if attempt.executed:
            self._report(attempt, addr)
        self._forget(attempt.attempt_id)
        if not attempt.deferred.called:
            attempt.deferred.callback(addr)

    def _give_up(self, attempt_id: int) -> None:
        attempt = self.attempts.get(attempt_id)
        if attempt is None:
            return
        if attempt.result is None:
            self.metrics.inc("punch_failure")
            self.log.debug("Punch {attempt:x} with {peer} gave up after {elapsed:.1f} s:"
                           " {probes} probes sent, the peer's {heard}",
                           attempt=attempt_id, peer=format_peer_id(attempt.peer_id),
                           elapsed=self.clock.seconds() - attempt.started, probes=attempt.probes,
                           heard="heard" if attempt.probes_answered else "never heard")
            if attempt.executed:
                self._report(attempt, None)
        self._forget(attempt_id)
        if not attempt.deferred.called:
            attempt.deferred.callback(None)

    def _forget(self, attempt_id: int) -> None:
        attempt = self.attempts.pop(attempt_id, None)
        if attempt is None:
            return
        self._release(attempt)
        for call in attempt.calls:
            if call.active():
                call.cancel()

    def stop(self) -> None:
        for attempt_id in list(self.attempts):
            self._give_up(attempt_id)


def _ack_challenge(attempt_id: int, seq: int) -> bytes:
    return attempt_id.to_bytes(8, "big") + seq.to_bytes(2, "big")


def _local_address(towards: tuple) -> str | None:
    """
    The local address the kernel would send from towards C{towards} (a
    connected UDP socket; nothing is sent).
    """
    family = socket.AF_INET6 if ":" in towards[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((towards[0], towards[1] or 9))
            return s.getsockname()[0]
    except OSError:
        return None
