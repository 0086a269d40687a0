"""
The hole-punch coordinator on relays (L{omerta.mesh.punch} has the two
ends and the strategies): it takes a PUNCH_REQUEST, vouches for the
candidates it passes on, picks the strategy from both NAT types and sends
each end its PUNCH_EXECUTE; where one end goes first, the other's execute
waits for that end's PUNCH_READY.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.mesh.punch import _FIRST, MAX_HOST_CANDIDATES, S, attempt_timeout, choose_strategy
from omerta.wire.messages import CandidateKind, MessageType, PathKind


@dataclass
class _Coordinated:
    attempt_id: int
    pair: frozenset
    started: float
    results: dict = field(default_factory=dict)
    executes: list = field(default_factory=list)  # (address, fields) sent to each side
    repeats: int = 0
    timeout: float = 0.0  # how long its sides try (L{attempt_timeout})
    seen: dict = field(default_factory=dict)  # peer id -> address it was reached at
    first: bytes | None = None  # the side that goes first (YOU_FIRST, LEAD_HOLD), if any
    ready: int = 0  # PUNCH_READY messages of the first side taken

    def due(self) -> list:
        """
        The executes that may go now: both, or while the side that goes
        first has not said its first probes left, only that side's (the
        other side's probes would reach its router first).
        """
        return [(address, fields) for address, fields in self.executes
                if self.first is None or self.ready or fields["peer"] != self.first]


class Coordinator:
    """
    Hole-punch coordination on a relay node, for every network it is in.
    """

    log = Logger()

    def __init__(self, node, max_attempts: int = 256, spray: int = 128):
        self.node = node
        self.metrics = node.metrics
        self.max_attempts = max_attempts
        self.spray = spray
        self.attempts: dict[int, _Coordinated] = {}

    def _peer_address(self, overlay, peer_id: bytes):
        relay = self.node.relay
        if relay is not None:
            reservation = relay.reservations.get((overlay.network_id, peer_id))
            if reservation is not None:
                return reservation.address
        link = overlay.liveness.links.get(peer_id)
        if link is not None and link.verified and type(link.address) is tuple:
            return link.address
        return None

    def on_request(self, overlay, frame, addr, message) -> None:
        config = overlay.config
        now = overlay.clock.seconds()
        a, b = frame.sender, message.target
        for attempt_id, attempt in list(self.attempts.items()):
            if now - attempt.started > attempt.timeout + 5:
                self._finish(attempt_id)
        known = self.attempts.get(message.attempt_id)
        if known is not None:
            # The requester asks again (its request, or an execute, may have
            # been lost): the same executes again, to both sides, a few times
            # at most; a side that has its execute already ignores the copy.
            if known.pair == frozenset((a, b)) and known.repeats < config.punch_request_retries:
                known.repeats += 1
                for address, fields in known.due():
                    overlay.send(address, MessageType.PUNCH_EXECUTE, **fields)
                self.metrics.inc("punch_coordinated", outcome="repeated")
            return
        impossible = dict(attempt_id=message.attempt_id, peer=b,
                          strategy=int(S.IMPOSSIBLE), start_in_ms=0, spray=0, candidates=[])
        if not overlay.liveness.verified(a, addr) or a == b:
            self.metrics.inc("punch_coordinated", outcome="refused")
            overlay.send(addr, MessageType.PUNCH_EXECUTE, **impossible)
            return
        b_address = self._peer_address(overlay, b)
        record_b = overlay.registry.get(b)
        pair = frozenset((a, b))
        for attempt_id, running in list(self.attempts.items()):
            if running.pair == pair and (running.seen.get(a) != addr
                                         or running.seen.get(b) != b_address):
                # One side is somewhere else now (its NAT lost its mapping):
                # what that attempt probes is stale, start afresh.
                self._finish(attempt_id)
                self.metrics.inc("punch_coordinated", outcome="superseded")
        running = next((x for x in self.attempts.values() if x.pair == pair), None)
        if running is not None and b_address is not None:
            # The other side started a punch with the requester, whose
            # execute it did not take (lost, or unsolicited from a relay
            # it holds no reservation on): the requester joins that
            # attempt, its own request answered with its side's execute
            # (once the side that goes first is ready, if it is the other).
            for _address, fields in running.executes:
                if fields["peer"] == b:
                    if (_address, fields) in running.due():
                        overlay.send(addr, MessageType.PUNCH_EXECUTE, **fields)
                        self.metrics.inc("punch_coordinated", outcome="joined")
                    else:
                        self.metrics.inc("punch_coordinated", outcome="waiting")
                    return
        busy = running is not None
        if b_address is None or record_b is None or busy or len(self.attempts) >= self.max_attempts:
            self.metrics.inc("punch_coordinated",
                             outcome="busy" if busy else "unreachable")
            overlay.send(addr, MessageType.PUNCH_EXECUTE, **impossible)
            return
        strategy_a, strategy_b, spray_a, spray_b = choose_strategy(
            message.nat_type, record_b.nat_type, self.spray)
        if strategy_a == S.IMPOSSIBLE:
            self.metrics.inc("punch_coordinated", outcome="impossible")
            overlay.send(addr, MessageType.PUNCH_EXECUTE, **impossible)
            return
        candidates_a = _vouched(
            [(c.kind, tuple(c.endpoint)) for c in message.candidates], addr)
        candidates_b = _vouched(
            [(CandidateKind.SERVER_REFLEXIVE, tuple(e))
             for kind, e, _via in record_b.paths if kind == PathKind.DIRECT], b_address)
        dropped = len(message.candidates) + 1 - len(candidates_a)
        if dropped:
            self.metrics.inc("punch_candidates_refused", dropped)
        rtt_a = _rtt(overlay, a)
        rtt_b = _rtt(overlay, b)
        lead = max(rtt_a, rtt_b) / 2 + config.punch_margin
        start_a = int(1000 * (lead - rtt_a / 2))
        start_b = int(1000 * (lead - rtt_b / 2))
        coordinated = self.attempts[message.attempt_id] = _Coordinated(
            message.attempt_id, pair, now, timeout=attempt_timeout(config, strategy_a),
            seen={a: addr, b: b_address})
        if strategy_a in _FIRST:
            # b's execute waits for a's PUNCH_READY, and b starts on it
            coordinated.first, start_b = a, 0
        elif strategy_b in _FIRST:
            coordinated.first, start_a = b, 0
        coordinated.executes = [
            (addr, dict(attempt_id=message.attempt_id, peer=b, strategy=int(strategy_a),
                        start_in_ms=start_a, spray=spray_a, candidates=candidates_b)),
            (b_address, dict(attempt_id=message.attempt_id, peer=a, strategy=int(strategy_b),
                             start_in_ms=start_b, spray=spray_b, candidates=candidates_a)),
        ]
        for address, fields in coordinated.due():
            overlay.send(address, MessageType.PUNCH_EXECUTE, **fields)
        self.metrics.inc("punch_coordinated", outcome="executed")
        self.log.debug("Punch {a} <-> {b}: {sa}/{sb}", a=format_peer_id(a), b=format_peer_id(b),
                       sa=strategy_a.name, sb=strategy_b.name)

    def on_ready(self, overlay, frame, addr, message) -> None:
        """
        The side that goes first says its first probes left: the other
        side's execute goes now (again for a repeated READY: that execute
        may have been lost; a bounded number of times).
        """
        attempt = self.attempts.get(message.attempt_id)
        if attempt is None or attempt.first is None or frame.sender != attempt.first:
            self.metrics.inc("drops", reason="punch_unexpected_ready")
            return
        if attempt.ready > overlay.config.punch_request_retries:
            return
        attempt.ready += 1
        for address, fields in attempt.executes:
            if fields["peer"] == attempt.first:
                overlay.send(address, MessageType.PUNCH_EXECUTE, **fields)
        self.metrics.inc("punch_coordinated", outcome="ready")

    def on_result(self, overlay, frame, addr, message) -> None:
        attempt = self.attempts.get(message.attempt_id)
        if attempt is None or frame.sender not in attempt.pair:
            return
        attempt.results[frame.sender] = message.success
        self.metrics.inc("punch_results", outcome="success" if message.success else "failure")
        if len(attempt.results) == 2:
            self._finish(message.attempt_id)

    def _finish(self, attempt_id: int) -> None:
        self.attempts.pop(attempt_id, None)


def _rtt(overlay, peer_id: bytes) -> float:
    link = overlay.liveness.links.get(peer_id)
    if link is not None and link.rtt is not None:
        return link.rtt
    record = overlay.registry.get(peer_id)
    if record is not None and record.rtt is not None:
        return record.rtt
    return 0.1


def _vouched(candidates: list[tuple], seen_at: tuple) -> list[dict]:
    """
    The candidates a coordinator passes on for a peer it sees at
    C{seen_at} (a proven address): that address first, then named
    server-reflexive candidates on the same IP address, then at most
    L{MAX_HOST_CANDIDATES} host candidates that are not global addresses.
    At most 8 in all.
    """
    out = [{"kind": int(CandidateKind.SERVER_REFLEXIVE), "endpoint": seen_at}]
    seen, hosts = {seen_at}, 0
    for kind, endpoint in candidates:
        if endpoint in seen or len(out) >= 8:
            continue
        if kind == CandidateKind.HOST:
            if hosts >= MAX_HOST_CANDIDATES or not _local_scope(endpoint[0]):
                continue
            hosts += 1
        elif endpoint[0] != seen_at[0]:
            continue
        seen.add(endpoint)
        out.append({"kind": int(kind), "endpoint": endpoint})
    return out


def _local_scope(host: str) -> bool:
    """Whether an address is private, loopback or link-local (not global)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_private or address.is_loopback or address.is_link_local
