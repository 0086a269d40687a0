"""
The relay role: reservations for NAT-bound members and the forwarding of
relayed data between two members of a network.

Control is sealed mesh frames (authenticated by the network key, from an
address a pong proved leads to the sender; a request from an address not
proven yet is refused without an answer, since any RELAY_DENY is larger than
the request):

- RELAY_RESERVE(lifetime) from B: "forward to me".  Accepted (RELAY_ACCEPT
  with the granted lifetime and the relay's free sessions) or denied with a
  reason.  B renews before it expires; lifetime 0 releases it.
- RELAY_CONNECT(B) from A: "open a session to B".  Only towards a member with
  a live reservation in the same network; the relay draws a random 8-byte
  session id and sends RELAY_SESSION to both ends.
- RELAY_END(session) from either end closes it; the relay sends RELAY_END to
  both ends when a session ends on its side (expiry, byte limit, no traffic
  from one of its ends for C{session_idle} seconds, the target's
  reservation gone, the relay stopping).  The idle rule frees sessions whose
  ends vanished without a word (a crash, a lost RELAY_END), read from the
  time each leg last sent.

Limits hold per source address and per source IP, not only per peer id: a
member holding the network key can invent peer ids (and answer pings for
them) from one socket, so reservations and the sessions a requester holds
are counted by address and IP too (see L{RelayConfig}), and the packet rate
is one budget per source address shared by all its legs.  A limit that is
reached first ends a session counted against it that has carried nothing
for C{session_reclaim} seconds (its ends are gone or moved on; a live
session is pinged every few seconds), so a node that restarts is not locked
out by its own old sessions.  Denials are counted and at most
C{denials_per_second} go to one address.

Data is L{omerta.wire.relay}: the relay looks the 12-byte header up in a
dict, checks the datagram came from one of the session's two addresses and
the packet rate of that address (a L{Budget} its legs share), notes when the
leg last sent, adds to the session's byte count, and sends the same bytes to
the other address through the socket itself (Twisted's C{Port.write}
re-validates the address on every call).  Nothing else runs per packet;
durations and reservations are checked once a second.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.mesh.peer import is_relayed
from omerta.wire.messages import MessageType, RelayDenyReason, RelayEndReason
from omerta.wire.relay import HEADER_SIZE, session_header

NO_PEER = bytes(16)


@dataclass
class RelayConfig:
    """
    Limits of the relay role (see docs/traversal.md).  "Per IP" is per IPv4
    address, per /64 for IPv6.  Session limits per address and IP count the
    sessions a requester opened (its leg a).
    """

    max_reservations: int = 1000
    reservations_per_address: int = 4   # one node, one socket: one per network
    reservations_per_ip: int = 16       # several nodes behind one NAT
    max_lifetime: int = 120
    max_sessions: int = 50
    sessions_per_peer: int = 8          # a member, as requester or target
    sessions_per_address: int = 8
    sessions_per_ip: int = 16
    sessions_per_ip_to_peer: int = 2    # one IP's share of a target's slots
    session_bytes: int = 1 << 30
    session_duration: float = 3600.0
    session_idle: float = 90.0
    session_reclaim: float = 10.0       # idle this long: ended to make room
    packets_per_second: int = 4000      # per source address, all its legs
    denials_per_second: int = 4         # RELAY_DENY frames to one address


@lru_cache(maxsize=4096)
def source_ip(host: str) -> str:
    """
    What a source host counts under for the per-IP limits: an IPv4 address
    itself, an IPv6 address its /64 (one subscriber's prefix), an
    IPv4-mapped IPv6 address the IPv4 address.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class Budget:
    """
    A count in a one-second window: the packets one source address sent
    through all its legs, or the denials sent to one address.
    """

    __slots__ = ("window_end", "count")

    def __init__(self):
        self.window_end = 0.0
        self.count = 0

    def spend(self, now: float, limit: int) -> bool:
        """
        Count one; whether it is within C{limit} in the current window.
        (L{RelayServer.forward} does the same inline: per packet, a call
        costs more than the check.)
        """
        if now >= self.window_end:
            self.window_end = now + 1.0
            self.count = 0
        self.count += 1
        return self.count <= limit


@dataclass(eq=False)
class Reservation:
    network_id: bytes
    peer_id: bytes
    address: tuple
    expires: float
    granted: float


class Leg:
    """
    One end of a relay session: its address, the packet budget of that
    address (shared with the address's other legs) and when it last sent.
    Bound by L{RelayServer._bind}.
    """

    __slots__ = ("peer_id", "address", "budget", "seen")

    def __init__(self, peer_id: bytes):
        self.peer_id = peer_id
        self.address = None
        self.budget = None
        self.seen = 0.0


class RelaySession:
    __slots__ = ("header", "network_id", "a", "b", "bytes", "packets", "started",
                 "renewed", "deadline", "limited")

    def __init__(self, header: bytes, network_id: bytes, a: Leg, b: Leg, now: float,
                 duration: float):
        self.header = header
        self.network_id = network_id
        self.a = a
        self.b = b
        self.bytes = 0
        self.packets = 0
        self.started = now
        self.renewed = now  # opened, or asked for again by an end
        self.deadline = now + duration
        self.limited = 0

    def involves(self, peer_id: bytes) -> bool:
        return peer_id in (self.a.peer_id, self.b.peer_id)

    def pair(self) -> frozenset:
        return frozenset((self.a.peer_id, self.b.peer_id))

    def last_active(self) -> float:
        """
        When both ends last sent through it (the last datagram of the leg
        quieter of the two), or when an end last asked for the session.
        Liveness pings go both ways, so a session one end stopped using goes
        quiet here even while the other end still calls into it.
        """
        return max(self.renewed, min(self.a.seen, self.b.seen))


class RelayServer:
    """
    The relay role of one node, for every network the node is in.

    @param node: the L{omerta.mesh.node.MeshNode} whose socket it shares.
    """

    log = Logger()

    def __init__(self, node, config: RelayConfig | None = None):
        self.node = node
        self.config = config or RelayConfig()
        self.metrics = node.metrics
        self.clock = node.clock
        self.reservations: dict[tuple[bytes, bytes], Reservation] = {}
        self.sessions: dict[bytes, RelaySession] = {}
        # reservations held by source address and by source IP
        self._reserved_at: Counter = Counter()
        self._reserved_from: Counter = Counter()
        self._budgets: dict[tuple, Budget] = {}   # packets, by source address
        self._denials: dict[tuple, Budget] = {}   # RELAY_DENY sent, by address
        self._sendto = None
        self._loop: LoopingCall | None = None
        self._unsubscribe = None
        # The hot path only adds to a session's ints; totals reach the
        # metrics once a second (L{flush_counters}).
        self.closed_packets = 0
        self.closed_bytes = 0
        self.dropped = 0

    # lifecycle

    def start(self) -> None:
        self._unsubscribe = self.node.events.subscribe("path_changed", self._path_changed)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(1.0, now=False).addErrback(
            lambda f: self.log.failure("Relay tick failed", f))

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for session in list(self.sessions.values()):
            self._end(session, RelayEndReason.RELAY_STOPPING)
        self.reservations.clear()
        self._reserved_at.clear()
        self._reserved_from.clear()
        self._budgets.clear()
        self._denials.clear()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def attach(self, transport) -> None:
        """
        Send relayed data through the socket itself when the transport has
        one (a real UDP port), through C{transport.write} otherwise.
        """
        sock = getattr(transport, "socket", None)
        self._sendto = sock.sendto if sock is not None else transport.write

    # the data path

    def forward(self, datagram: bytes, addr: tuple) -> bool:
        """
        Forward a relayed-data datagram.  Returns False when its session is
        not one of this relay's (the node may be an end of it instead).
        """
        session = self.sessions.get(datagram[:HEADER_SIZE])
        if session is None:
            return False
        a = session.a
        if addr == a.address:
            source, target = a, session.b
        elif addr == session.b.address:
            source, target = session.b, a
        else:
            self.dropped += 1
            self.metrics.inc("relay_drops", reason="not_bound")
            return True
        now = self.clock.seconds()
        source.seen = now
        budget = source.budget
        if now >= budget.window_end:
            budget.window_end = now + 1.0
            budget.count = 0
        budget.count += 1
        if budget.count > self.config.packets_per_second:
            session.limited += 1
            self.dropped += 1
            return True
        session.bytes += len(datagram)
        session.packets += 1
        try:
            self._sendto(datagram, target.address)
        except OSError as e:
            self.dropped += 1
            self.metrics.inc("relay_drops", reason=errno.errorcode.get(e.errno, "oserror").lower())
            return True
        if session.bytes > self.config.session_bytes:
            self._end(session, RelayEndReason.BYTE_LIMIT)
        return True

    # control

    def on_reserve(self, overlay, frame, addr, message) -> None:
        if is_relayed(addr):
            # Forwarding needs the member's own address, not a route.
            self.metrics.inc("relay_drops", reason="relayed_request")
            return
        now = self.clock.seconds()
        config = self.config
        key = (overlay.network_id, frame.sender)
        existing = self.reservations.get(key)
        if message.lifetime_s == 0:
            if existing is not None and existing.address == addr:
                self._drop_reservation(existing, "released")
            return

        def deny(reason, detail, proven=True):
            self._deny(overlay, addr, MessageType.RELAY_RESERVE, NO_PEER, reason, detail,
                       proven)

        if not overlay.liveness.verified(frame.sender, addr):
            return deny(RelayDenyReason.UNPROVEN, "", proven=False)
        if existing is None or existing.address != addr:
            # A new reservation, or one moving here: it counts at this address.
            crowded = self._reservations_crowded(addr)
            if crowded is not None:
                return deny(RelayDenyReason.TOO_MANY_RESERVATIONS, crowded)
        if existing is None and len(self.reservations) >= config.max_reservations:
            return deny(RelayDenyReason.FULL, f"{config.max_reservations} reservations held")
        lifetime = min(message.lifetime_s, config.max_lifetime)
        if existing is None:
            reservation = Reservation(overlay.network_id, frame.sender, addr, now + lifetime, now)
            self.reservations[key] = reservation
            self._count_reservation(reservation, 1)
            self.metrics.inc("relay_reservations", event="granted")
            self.log.info("Relay reservation for {peer} at {address}",
                          peer=format_peer_id(frame.sender), address=f"{addr[0]}:{addr[1]}")
        else:
            if existing.address != addr:
                # The member moved (its NAT rebound): its sessions follow.
                self._moved(existing, addr)
            existing.expires = now + lifetime
            self.metrics.inc("relay_reservations", event="renewed")
        overlay.send(addr, MessageType.RELAY_ACCEPT, lifetime_s=lifetime,
                     session_limit=config.max_sessions,
                     free_sessions=max(0, config.max_sessions - len(self.sessions)))
        return None

    def on_connect(self, overlay, frame, addr, message) -> None:
        if is_relayed(addr):
            self.metrics.inc("relay_drops", reason="relayed_request")
            return None
        target = message.target
        requester = frame.sender
        config = self.config

        def deny(reason, detail, proven=True):
            self._deny(overlay, addr, MessageType.RELAY_CONNECT, target, reason, detail, proven)

        if not overlay.liveness.verified(requester, addr):
            return deny(RelayDenyReason.UNPROVEN, "", proven=False)
        if target == requester:
            return deny(RelayDenyReason.SELF, "a session to yourself")
        reservation = self.reservations.get((overlay.network_id, target))
        if reservation is None:
            return deny(RelayDenyReason.NO_RESERVATION,
                        f"{format_peer_id(target)} holds no reservation here")
        pair = frozenset((requester, target))
        for session in self.sessions.values():
            if session.network_id == overlay.network_id and session.pair() == pair:
                # Either end asking again (a retransmission, both ends
                # failing over at once, a NAT rebinding): one session per
                # pair, its legs at the addresses proven now.
                for leg in (session.a, session.b):
                    self._bind(leg, addr if leg.peer_id == requester else reservation.address)
                session.renewed = self.clock.seconds()
                self._announce(overlay, session)
                return None
        refusal = self._session_limit(requester, target, addr)
        if refusal is not None:
            return deny(*refusal)
        header = session_header(os.urandom(8))
        a, b = Leg(requester), Leg(target)
        self._bind(a, addr)
        self._bind(b, reservation.address)
        session = RelaySession(header, overlay.network_id, a, b, self.clock.seconds(),
                               config.session_duration)
        self.sessions[header] = session
        self.metrics.inc("relay_sessions", event="opened")
        self._announce(overlay, session)
        return None

    def _session_limit(self, requester: bytes, target: bytes, addr: tuple):
        """
        Which limit a new session from C{requester} at C{addr} to C{target}
        would break, as (reason, detail), or None.  A session that counts
        against the broken limit and has been idle for C{session_reclaim}
        seconds (its ends stopped using it without a RELAY_END: a node that
        exited, a lost goodbye) is ended to make room first, so a node that
        comes back is not locked out until C{session_idle} frees the slot.
        """
        now = self.clock.seconds()
        while True:
            broken = self._broken_limit(requester, target, addr)
            if broken is None:
                return None
            reason, detail, counted = broken
            stale = [s for s in self.sessions.values()
                     if counted(s) and now - s.last_active() >= self.config.session_reclaim]
            if not stale:
                return reason, detail
            self.metrics.inc("relay_sessions_reclaimed")
            self._end(min(stale, key=RelaySession.last_active), RelayEndReason.IDLE)

    def _broken_limit(self, requester: bytes, target: bytes, addr: tuple):
        """
        The first limit a new session would break, as (reason, detail,
        predicate of the sessions counted against it), or None.  The limits
        per source (its address, its IP, its IP towards this target) hold
        whatever peer ids the source claims; the one per peer id keeps a
        member's slots.
        """
        config = self.config
        ip = source_ip(addr[0])
        from_address = from_ip = from_ip_to_target = 0
        per_peer = Counter()
        for session in self.sessions.values():
            source = session.a.address
            if source == addr:
                from_address += 1
            if source_ip(source[0]) == ip:
                from_ip += 1
                from_ip_to_target += session.b.peer_id == target
            per_peer[session.a.peer_id] += 1
            per_peer[session.b.peer_id] += 1
        if from_address >= config.sessions_per_address:
            return (RelayDenyReason.TOO_MANY_SESSIONS,
                    f"{from_address} sessions opened from this address",
                    lambda s: s.a.address == addr)
        if from_ip >= config.sessions_per_ip:
            return (RelayDenyReason.TOO_MANY_SESSIONS, f"{from_ip} sessions opened from {ip}",
                    lambda s: source_ip(s.a.address[0]) == ip)
        if from_ip_to_target >= config.sessions_per_ip_to_peer:
            return (RelayDenyReason.TOO_MANY_SESSIONS,
                    f"{from_ip_to_target} sessions from {ip} to {format_peer_id(target)}",
                    lambda s: source_ip(s.a.address[0]) == ip and s.b.peer_id == target)
        for peer in (requester, target):
            if per_peer[peer] >= config.sessions_per_peer:
                return (RelayDenyReason.TOO_MANY_SESSIONS,
                        f"{format_peer_id(peer)} has {per_peer[peer]} sessions here",
                        lambda s, peer=peer: s.involves(peer))
        if len(self.sessions) >= config.max_sessions:
            return (RelayDenyReason.FULL, f"{config.max_sessions} sessions open",
                    lambda s: True)
        return None

    def on_end(self, overlay, frame, addr, message) -> None:
        session = self.sessions.get(session_header(message.session))
        if session is None:
            return
        leg = session.a if session.a.peer_id == frame.sender else session.b
        if leg.peer_id != frame.sender or leg.address != addr:
            self.metrics.inc("relay_drops", reason="end_not_yours")
            return
        self._end(session, RelayEndReason.CLOSED)

    def _announce(self, overlay, session: RelaySession) -> None:
        remaining = max(0, int(session.deadline - self.clock.seconds()))
        for leg, other in ((session.a, session.b), (session.b, session.a)):
            overlay.send(leg.address, MessageType.RELAY_SESSION, session=session.header[4:],
                         peer=other.peer_id, lifetime_s=remaining,
                         max_bytes=self.config.session_bytes)

    def _deny(self, overlay, addr, request, target, reason, detail, proven=True) -> None:
        """
        Count a refusal and answer it with RELAY_DENY, unless the address is
        not proven (any RELAY_DENY is larger than the RELAY_RESERVE or
        RELAY_CONNECT it answers: sent to an unproven, maybe spoofed, address
        it would amplify) or the address had its C{denials_per_second}.
        """
        self.metrics.inc("relay_denied", reason=reason.name.lower())
        if not proven:
            self.metrics.inc("relay_denials_unsent", why="unproven")
            return
        budget = self._denials.get(addr)
        if budget is None:
            budget = self._denials[addr] = Budget()
        if not budget.spend(self.clock.seconds(), self.config.denials_per_second):
            self.metrics.inc("relay_denials_unsent", why="rate_limited")
            return
        overlay.send(addr, MessageType.RELAY_DENY, request=int(request), target=target,
                     reason=int(reason), detail=detail)

    # bookkeeping

    def _end(self, session: RelaySession, reason: RelayEndReason) -> None:
        if self.sessions.pop(session.header, None) is None:
            return
        self.closed_packets += session.packets
        self.closed_bytes += session.bytes
        self.metrics.inc("relay_sessions", event=reason.name.lower())
        if session.limited:
            self.metrics.inc("relay_drops", session.limited, reason="rate_limited")
        overlay = self.node.overlays.get(session.network_id)
        if overlay is None:
            return
        for leg in (session.a, session.b):
            overlay.send(leg.address, MessageType.RELAY_END, session=session.header[4:],
                         reason=int(reason))

    def _bind(self, leg: Leg, address: tuple) -> None:
        """
        Put a leg at C{address}, on the packet budget of that address.
        """
        budget = self._budgets.get(address)
        if budget is None:
            budget = self._budgets[address] = Budget()
        leg.address = address
        leg.budget = budget

    def _count_reservation(self, reservation: Reservation, delta: int) -> None:
        address = reservation.address
        ip = source_ip(address[0])
        self._reserved_at[address] += delta
        self._reserved_from[ip] += delta
        if self._reserved_at[address] <= 0:
            del self._reserved_at[address]
        if self._reserved_from[ip] <= 0:
            del self._reserved_from[ip]

    def _reservations_crowded(self, addr: tuple) -> str | None:
        """
        Why one more reservation may not count at C{addr}, or None.
        """
        config = self.config
        ip = source_ip(addr[0])
        if self._reserved_at[addr] >= config.reservations_per_address:
            return f"{config.reservations_per_address} reservations from this address"
        if self._reserved_from[ip] >= config.reservations_per_ip:
            return f"{config.reservations_per_ip} reservations from {ip}"
        return None

    def _path_changed(self, network: bytes, peer_id: bytes, old, new, **_) -> None:
        """
        A member's path moved.  When a pong proved it at another address of
        its own (its NAT gave it a new mapping), its reservation and its
        sessions' legs follow at once, rather than at its next
        RELAY_RESERVE or RELAY_CONNECT: until then everything relayed to it
        would go to a mapping that no longer exists, and what it sends from
        the new one would be dropped as not bound.  Checked on the next
        turn, once the move is complete.
        """
        if is_relayed(new):
            return
        self.clock.callLater(0, self._follow, network, peer_id, old, new)

    def holder_proven(self, network: bytes, peer_id: bytes, addr: tuple) -> None:
        """
        A pong proved C{addr} leads to C{peer_id}, for the first time.  Its
        reservation follows even when our own link to it does not move
        (the link is on another path, or there is none): a coordinator
        hands out the reservation's address as the member's candidate.
        """
        if (network, peer_id) in self.reservations:
            self._follow(network, peer_id, None, addr)

    def _follow(self, network: bytes, peer_id: bytes, old, new: tuple) -> None:
        """
        C{peer_id} is proven at C{new}, having been at C{old} (the old path
        may have been a relayed one, while our own path to it failed over).
        """
        overlay = self.node.overlays.get(network)
        if overlay is None or not overlay.liveness.verified(peer_id, new):
            return
        reservation = self.reservations.get((network, peer_id))
        if reservation is not None and reservation.address != new:
            crowded = self._reservations_crowded(new)
            if crowded is None:
                self.log.info("Relay reservation for {peer} follows it to {address}",
                              peer=format_peer_id(peer_id), address=f"{new[0]}:{new[1]}")
                self.metrics.inc("relay_reservations", event="moved")
                self._moved(reservation, new)
            else:
                self.metrics.inc("relay_reservations", event="move_refused")
        if old is not None and not is_relayed(old) and old != new:
            self._move_legs(overlay, peer_id, old, new)

    def _move_legs(self, overlay, peer_id: bytes, old: tuple, new: tuple) -> None:
        """
        C{peer_id}'s legs at C{old} move to C{new}, and their sessions are
        announced again: the member may not know of a session opened towards
        it since its NAT moved it (that RELAY_SESSION went to the old
        address).
        """
        for session in self.sessions.values():
            if session.network_id != overlay.network_id:
                continue
            moved = False
            for leg in (session.a, session.b):
                if leg.peer_id == peer_id and leg.address == old:
                    self._bind(leg, new)
                    moved = True
            if moved:
                self.metrics.inc("relay_legs_moved")
                self._announce(overlay, session)

    def _moved(self, reservation: Reservation, addr: tuple) -> None:
        """
        The holder of C{reservation} is at C{addr} now: the reservation and
        the holder's legs at the old address move there.
        """
        overlay = self.node.overlays.get(reservation.network_id)
        if overlay is not None:
            self._move_legs(overlay, reservation.peer_id, reservation.address, addr)
        self._count_reservation(reservation, -1)
        reservation.address = addr
        self._count_reservation(reservation, 1)

    def _drop_reservation(self, reservation: Reservation, event: str) -> None:
        """
        Forget a reservation and end the sessions opened towards its holder
        (their leg b came from it); sessions the holder opened itself, as
        leg a, do not depend on it and stay.
        """
        key = (reservation.network_id, reservation.peer_id)
        if self.reservations.get(key) is not reservation:
            return
        del self.reservations[key]
        self._count_reservation(reservation, -1)
        self.metrics.inc("relay_reservations", event=event)
        for session in list(self.sessions.values()):
            if (session.network_id == reservation.network_id
                    and session.b.peer_id == reservation.peer_id):
                self._end(session, RelayEndReason.RESERVATION_GONE)

    def tick(self) -> None:
        now = self.clock.seconds()
        for reservation in [r for r in self.reservations.values() if r.expires <= now]:
            self._drop_reservation(reservation, "expired")
        for reservation in [r for r in self.reservations.values() if self._gone(r)]:
            # (killed without a goodbye: no session is opened towards it)
            self._drop_reservation(reservation, "holder_offline")
        idle_since = now - self.config.session_idle
        for session in list(self.sessions.values()):
            if session.deadline <= now:
                self._end(session, RelayEndReason.EXPIRED)
            elif session.last_active() <= idle_since:
                self._end(session, RelayEndReason.IDLE)
        self._forget_budgets(now)
        self.flush_counters()

    def _gone(self, reservation: Reservation) -> bool:
        """Whether this node's liveness declared a reservation's holder offline."""
        overlay = self.node.overlays.get(reservation.network_id)
        record = None if overlay is None else overlay.registry.get(reservation.peer_id)
        return record is not None and record.state == "offline"

    def _forget_budgets(self, now: float) -> None:
        """
        Forget the packet budgets of addresses no leg is at any more, and
        the denial counts of windows that ended.
        """
        bound = {leg.address for s in self.sessions.values() for leg in (s.a, s.b)}
        for address in [a for a in self._budgets if a not in bound]:
            del self._budgets[address]
        for address in [a for a, b in self._denials.items() if b.window_end <= now]:
            del self._denials[address]

    def flush_counters(self) -> None:
        metrics = self.metrics
        metrics.set("relay_forwarded_packets",
                    self.closed_packets + sum(s.packets for s in self.sessions.values()))
        metrics.set("relay_forwarded_bytes",
                    self.closed_bytes + sum(s.bytes for s in self.sessions.values()))
        metrics.set("relay_dropped_packets", self.dropped)
        metrics.set("relay_sessions_open", len(self.sessions))
        metrics.set("relay_reservations_held", len(self.reservations))

    def status(self) -> dict:
        now = self.clock.seconds()
        return {
            "reservations": len(self.reservations),
            "sessions": [
                {
                    "a": format_peer_id(s.a.peer_id),
                    "b": format_peer_id(s.b.peer_id),
                    "bytes": s.bytes,
                    "packets": s.packets,
                    "age_s": round(now - s.started, 1),
                    "idle_s": round(max(0.0, now - s.last_active()), 1),
                    "rate_limited": s.limited,
                }
                for s in self.sessions.values()
            ],
            "limits": {
                "max_reservations": self.config.max_reservations,
                "reservations_per_address": self.config.reservations_per_address,
                "reservations_per_ip": self.config.reservations_per_ip,
                "max_sessions": self.config.max_sessions,
                "sessions_per_peer": self.config.sessions_per_peer,
                "sessions_per_address": self.config.sessions_per_address,
                "sessions_per_ip": self.config.sessions_per_ip,
                "sessions_per_ip_to_peer": self.config.sessions_per_ip_to_peer,
                "session_bytes": self.config.session_bytes,
                "session_duration_s": self.config.session_duration,
                "session_idle_s": self.config.session_idle,
                "packets_per_second": self.config.packets_per_second,
                "denials_per_second": self.config.denials_per_second,
            },
        }
