"""
The member's side of relaying, in one network.

- Reservations: a node that is not on a public address keeps reservations on
  up to C{relay_count} relays (members announcing the RELAY capability),
  chosen by round-trip time among those not recently failed or full, renewed
  every C{reserve_refresh} seconds.  A request not yet accepted is asked
  again after 0.5 s, 1 s, then every C{reserve_retry} seconds; one that goes
  unanswered C{reserve_tries} times, a relay that goes offline or denies,
  is replaced, and not picked again for C{relay_avoid} seconds unless it
  announces anew (a relay declared dead that restarted is taken back at
  once) or no other relay is left to hold.
  Each live reservation is announced as a RELAYED path ("reach me via R"),
  re-signed whenever the set changes.  A relay seen to restart (a new run
  proven) has forgotten us: the reservation is renewed at once and the
  sessions it carried are closed.
- Sessions: to reach a peer through one of the relays it announces, send
  RELAY_CONNECT; the relay answers both ends with RELAY_SESSION and the
  session's route (L{omerta.mesh.paths.RelayRoute}) becomes a path to the
  peer.  Sessions are also registered with the node, which receives the
  relayed data.
- Refusals: a relay that denies a session to a peer, or whose session to it
  failed, is not asked for that peer again before a backoff (1 s doubling to
  C{relay_retry_max}) has passed; no other relay free, nothing is sent.  A
  denial as C{no_reservation} is news about the peer: its relayed path
  through that relay is gone, and stays so (L{RelayClient.can_open} says
  False) until the backoff passes or the peer announces anew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.safe_text import printable
from omerta.mesh.context import Basics
from omerta.mesh.peer import RelayRoute, is_relayed
from omerta.wire.messages import (Capability, MessageType, PathKind,
                                  RelayDenyReason, RelayEndReason)
from omerta.wire.relay import session_header


@dataclass
class Held:
    """
    A reservation this node holds (or is asking for) on one relay.
    """

    relay_id: bytes
    address: tuple
    live: bool = False
    expires: float = 0.0
    sent: float = 0.0
    unanswered: int = 0
    free_sessions: int | None = None
    # the last request was accepted (else it is asked again after
    # reserve_retry, not reserve_refresh, even while still live)
    confirmed: bool = False


@dataclass
class ClientSession:
    network_id: bytes
    peer_id: bytes
    relay_id: bytes
    route: RelayRoute
    opened: float
    requested: bool


@dataclass
class _Refusal:
    """
    A relay that refused a session to one peer (or whose session failed):
    not asked for that peer before C{until}.  C{gone_in}: the sequence of
    the peer's announcement when the relay said it holds no reservation for
    the peer (that path is gone until the peer announces again), else None.
    """

    until: float
    backoff: float
    gone_in: int | None = None


@dataclass
class _Pending:
    """A RELAY_CONNECT in flight, resent every second until answered."""

    relay_id: bytes
    address: tuple
    sent: float
    last_sent: float


class RelayClient:
    log = Logger()

    def __init__(self, basics: Basics, registry, routes: dict, *,
                 needs_relays: Callable[[], bool],
                 direct_address: Callable[[bytes], tuple | None],
                 reannounce: Callable[[], None],
                 session_opened: Callable[[bytes, RelayRoute, bool], None],
                 session_closed: Callable[[bytes, RelayRoute], None],
                 ping_relay: Callable[[bytes, tuple], object] = lambda relay_id, address: None):
        """
        @param routes: the node's table of relay sessions by header (shared
            by its networks: relayed data arrives on the one socket).
        @param needs_relays: whether this node needs reservations (it is
            not on a public address).
        @param direct_address: a relay's (or any peer's) direct address.
        @param reannounce: re-sign and spread our announcement (our relayed
            paths changed).
        @param session_opened: C{(peer_id, route, requested)}: a session to
            a peer opened (the path manager decides whether to use it).
        @param session_closed: C{(peer_id, route)}: a session ended.
        @param ping_relay: C{(relay_id, address)}: ping a relay (as large as
            a challenge, so a relay that has not proven our address yet
            challenges it: see L{challenged}).
        """
        self.basics = basics
        self.config = basics.config
        self.clock = basics.clock
        self.metrics = basics.metrics
        self.send = basics.send
        self.registry = registry
        self.routes = routes
        self.needs_relays = needs_relays
        self._direct_address = direct_address
        self._reannounce = reannounce
        self._session_opened = session_opened
        self._session_closed = session_closed
        self._ping_relay = ping_relay
        self.held: dict[bytes, Held] = {}
        # relay id -> (until, the sequence of its announcement then): a relay
        # that failed us is not picked again before `until`, unless it has
        # announced anew since (it restarted, or came back)
        self.avoid: dict[bytes, tuple[float, int | None]] = {}
        self.sessions: dict[bytes, dict[bytes, ClientSession]] = {}  # peer -> relay -> session
        self.pending: dict[bytes, _Pending] = {}  # peer -> connect in flight
        self._refused: dict[bytes, dict[bytes, _Refusal]] = {}  # peer -> relay -> refusal

    def candidates(self, now: float) -> list:
        """
        Relays we could reserve on, best first: members with the RELAY
        capability, not offline, with a direct address; by round-trip time
        (unknown last), the ones avoided after a failure after all others.
        Avoiding one is for choosing among relays, not for holding fewer
        than we could: a relay that came back online without a new
        announcement (killed and restarted before we declared it offline)
        is taken again while there is no other.
        """
        out = []
        for record in self.registry.all():
            if not record.capabilities & Capability.RELAY or record.state == "offline":
                continue
            if record.peer_id in self.held:
                continue
            address = self._direct_address(record.peer_id)
            if address is None:
                continue
            out.append((self._avoided(record.peer_id, now), record.rtt is None,
                        record.rtt or 0.0, record.peer_id, address))
        out.sort()
        return [(peer_id, address) for *_, peer_id, address in out]

    # reservations

    def tick(self) -> None:
        """
        Every second: keep the reservations, resend or give up the session
        requests in flight, forget old refusals.
        """
        now = self.clock.seconds()
        self._keep_reservations(now)
        self._forget_refusals(now)
        for peer_id, pending in list(self.pending.items()):
            if now - pending.sent >= self.config.relay_connect_timeout:
                del self.pending[peer_id]
                self.refused(peer_id, pending.relay_id)
                self.basics.emit("relay_session", peer_id=peer_id, relay_id=pending.relay_id,
                                 outcome="timed_out")
            elif now - pending.last_sent >= 1.0:
                # lost on the way (or its answer was): ask again
                pending.last_sent = now
                self.send(pending.address, MessageType.RELAY_CONNECT, target=peer_id)

    def _keep_reservations(self, now: float) -> None:
        config = self.config
        if not self.needs_relays():
            if self.held:
                for held in self.held.values():
                    self.send(held.address, MessageType.RELAY_RESERVE, lifetime_s=0)
                self.held.clear()
                self._reannounce()
            return
        changed = False
        for held in list(self.held.values()):
            record = self.registry.get(held.relay_id)
            gone = record is None or record.state == "offline"
            if held.unanswered >= config.reserve_tries or gone or (
                    held.live and held.expires <= now):
                self._lose(held, now, "no answer" if not gone else "offline")
                changed = changed or held.live
                continue
            due = held.sent + (config.reserve_refresh if held.confirmed else min(
                config.reserve_retry, 0.5 * 2 ** max(0, held.unanswered - 1)))
            if now >= due:
                self._reserve(held, now)
        for relay_id, address in self.candidates(now)[:max(0, config.relay_count - len(self.held))]:
            held = self.held[relay_id] = Held(relay_id, address)
            self._reserve(held, now)
        if changed:
            self._reannounce()

    def _avoided(self, relay_id: bytes, now: float) -> bool:
        avoided = self.avoid.get(relay_id)
        if avoided is None:
            return False
        until, sequence = avoided
        if until <= now:
            del self.avoid[relay_id]
            return False
        record = self.registry.get(relay_id)
        return record is None or record.sequence == sequence

    def _reserve(self, held: Held, now: float) -> None:
        if held.sent and now - held.sent < 0.5:
            return
        held.sent = now
        held.unanswered += 1
        held.confirmed = False
        self.send(held.address, MessageType.RELAY_RESERVE,
                          lifetime_s=self.config.reserve_lifetime)

    def _lose(self, held: Held, now: float, why: str) -> None:
        self.held.pop(held.relay_id, None)
        record = self.registry.get(held.relay_id)
        self.avoid[held.relay_id] = (now + self.config.relay_avoid,
                                     None if record is None else record.sequence)
        if held.live:
            self.log.info("Lost relay reservation on {relay}: {why}",
                          relay=format_peer_id(held.relay_id), why=printable(why))
            self.metrics.inc("relay_reservations_lost")
        through = [sessions[held.relay_id] for sessions in self.sessions.values()
                   if held.relay_id in sessions]
        for session in through:  # closing one changes self.sessions
            self._close(session)

    def peer_restarted(self, peer_id: bytes) -> None:
        """
        C{peer_id} restarted: if it is one of our relays it forgot our
        reservation and every session it carried, so renew the reservation
        now (not at the next refresh) and close those sessions (their
        peers' paths move elsewhere or are asked for again).
        """
        held = self.held.get(peer_id)
        through = [sessions[peer_id] for sessions in self.sessions.values()
                   if peer_id in sessions]
        if held is None and not through:
            return
        self.log.info("Relay {relay} restarted: renewing our reservation on it",
                      relay=format_peer_id(peer_id))
        self.metrics.inc("relay_restarts_seen")
        for session in through:
            self._close(session, tell_relay=False)
        if held is not None:
            held.sent = 0.0
            held.unanswered = 0
            self._reserve(held, self.clock.seconds())

    def on_accept(self, frame, addr, message) -> None:
        held = self.held.get(frame.sender)
        if held is None or held.address != addr:
            self.metrics.inc("drops", reason="unexpected_relay_accept")
            return
        now = self.clock.seconds()
        was_live = held.live
        held.live = True
        held.confirmed = True
        held.unanswered = 0
        held.expires = now + message.lifetime_s
        held.free_sessions = message.free_sessions
        if not was_live:
            self.log.info("Relay reservation on {relay} at {address}",
                          relay=format_peer_id(frame.sender), address=f"{addr[0]}:{addr[1]}")
            self._reannounce()

    def on_deny(self, frame, addr, message) -> None:
        now = self.clock.seconds()
        reason = message.reason
        self.metrics.inc("relay_denials", reason=_reason_name(reason))
        if message.request == MessageType.RELAY_RESERVE:
            held = self.held.get(frame.sender)
            if held is None or held.address != addr:
                return
            if reason == RelayDenyReason.UNPROVEN:
                held.unanswered = 0  # it answered; the ping in flight proves us
                return
            self.log.info("Relay {relay} refused a reservation: {detail}",
                          relay=format_peer_id(frame.sender), detail=printable(message.detail))
            self._lose(held, now, message.detail)
            return
        if message.request == MessageType.RELAY_CONNECT:
            pending = self.pending.get(message.target)
            if pending is None or frame.sender != pending.relay_id:
                return
            if reason == RelayDenyReason.UNPROVEN:
                # Our address is being proven (the relay's challenge ping is
                # on its way): the once-a-second resend in tick() asks again.
                return
            del self.pending[message.target]
            self.refused(message.target, frame.sender,
                         gone=reason == RelayDenyReason.NO_RESERVATION)
            self.basics.emit("relay_session", peer_id=message.target, relay_id=frame.sender,
                             outcome="denied")
            # Another relay the peer announces, if one is not backing off;
            # never this one again at once.
            self.open_session(message.target)

    def refused(self, peer_id: bytes, relay_id: bytes, gone: bool = False) -> None:
        """
        C{relay_id} denied a session to C{peer_id}, or its session failed:
        back off before asking it for this peer again (doubling while it
        keeps refusing).  C{gone}: the relay holds no reservation for the
        peer, so the peer's announced path through it is gone.
        """
        now = self.clock.seconds()
        refusals = self._refused.get(peer_id)
        if refusals is None:
            if len(self._refused) >= self.config.max_active * 64:
                self._refused.pop(next(iter(self._refused)))
            refusals = self._refused[peer_id] = {}
        last = refusals.get(relay_id)
        backoff = self.config.relay_retry_initial if last is None else min(
            self.config.relay_retry_max, 2 * last.backoff)
        gone_in = None
        if gone:
            record = self.registry.get(peer_id)
            gone_in = None if record is None else record.sequence
        refusals[relay_id] = _Refusal(now + backoff, backoff, gone_in)

    def _backing_off(self, peer_id: bytes, relay_id: bytes, now: float) -> bool:
        refusal = self._refused.get(peer_id, {}).get(relay_id)
        return refusal is not None and refusal.until > now

    def _gone(self, peer_id: bytes, relay_id: bytes, now: float) -> bool:
        """
        Whether the relay said it holds no reservation for the peer, within
        the backoff and since the peer's last announcement.
        """
        refusal = self._refused.get(peer_id, {}).get(relay_id)
        if refusal is None or refusal.gone_in is None or refusal.until <= now:
            return False
        record = self.registry.get(peer_id)
        return record is not None and record.sequence == refusal.gone_in

    def retry_at(self, peer_id: bytes) -> float | None:
        """
        When the first relay the peer announces that is backing off may be
        asked again (None: none is backing off).
        """
        refusals = self._refused.get(peer_id, {})
        times = [refusals[r].until for r, _ in self.announced_relays(peer_id) if r in refusals]
        return min(times) if times else None

    def _forget_refusals(self, now: float) -> None:
        """
        Refusals whose backoff has passed and stayed quiet as long again are
        forgotten: the next refusal starts from the initial backoff.
        """
        for peer_id, refusals in list(self._refused.items()):
            for relay_id, refusal in list(refusals.items()):
                if now >= refusal.until + refusal.backoff:
                    del refusals[relay_id]
            if not refusals:
                del self._refused[peer_id]

    def own_paths(self) -> list[dict]:
        """
        The RELAYED paths to announce: one per live reservation.
        """
        return [
            {"kind": PathKind.RELAYED, "endpoint": held.address, "via": held.relay_id}
            for held in sorted(self.held.values(), key=lambda h: h.relay_id)
            if held.live
        ]

    # sessions

    def announced_relays(self, peer_id: bytes) -> list[tuple[bytes, tuple]]:
        """
        The relays a peer says it can be reached through, as (relay id,
        address we reach the relay at).
        """
        record = self.registry.get(peer_id)
        if record is None:
            return []
        out = []
        for kind, endpoint, via in record.paths:
            if kind != PathKind.RELAYED or via == self.basics.peer_id:
                continue
            address = self._direct_address(via) or tuple(endpoint)
            out.append((via, address))
        return out

    def can_open(self, peer_id: bytes, exclude_relay: bytes | None = None) -> bool:
        """
        Whether the peer announces a relay (other than C{exclude_relay}) to
        open a session through, now or once a backoff has passed: not one
        that said the peer's path through it is gone.
        """
        now = self.clock.seconds()
        return any(r != exclude_relay and not self._gone(peer_id, r, now)
                   for r, _ in self.announced_relays(peer_id))

    def open_session(self, peer_id: bytes, exclude_relay: bytes | None = None) -> bool:
        """
        Ask a relay the peer announces for a session to it.  Returns whether
        a request went out (or one is already in flight); False when every
        relay it announces is backing off after a refusal (the caller asks
        again later).
        """
        now = self.clock.seconds()
        if peer_id in self.pending:
            return True
        relays = [(r, a) for r, a in self.announced_relays(peer_id)
                  if r != exclude_relay and not self._backing_off(peer_id, r, now)]
        fresh = [(r, a) for r, a in relays if not self._avoided(r, now)]
        relays = fresh or relays
        if not relays:
            return False

        def rank(item):
            record = self.registry.get(item[0])
            rtt = None if record is None else record.rtt
            return (item[0] not in self.held, rtt is None, rtt or 0.0)

        relays.sort(key=rank)
        relay_id, address = relays[0]
        self.pending[peer_id] = _Pending(relay_id, address, now, now)
        self.send(address, MessageType.RELAY_CONNECT, target=peer_id)
        # A relay ignores a request from an address it has not proven (our
        # NAT may have moved us since we last spoke): the ping draws its
        # challenge, and the request goes again once we answered it.
        self._ping_relay(relay_id, address)
        self.metrics.inc("relay_connects")
        return True

    def challenged(self, peer_id: bytes) -> None:
        """
        C{peer_id} asked us to prove our address, and the proof is on its
        way: if it is a relay we are asking for a session or a reservation,
        it ignored that request (it came from an address it had not proven:
        our NAT gave us a new mapping), so ask again now, right behind the
        proof, rather than at the next retry.
        """
        now = self.clock.seconds()
        for target, pending in self.pending.items():
            if pending.relay_id == peer_id:
                pending.last_sent = now
                self.send(pending.address, MessageType.RELAY_CONNECT, target=target)
                self.metrics.inc("relay_requests_after_challenge")
        held = self.held.get(peer_id)
        if held is not None and not held.confirmed:
            held.sent = 0.0
            held.unanswered = 0  # it answers: it is there
            self._reserve(held, now)
            self.metrics.inc("relay_requests_after_challenge")

    def on_session(self, frame, addr, message) -> None:
        relay_id = frame.sender
        record = self.registry.get(relay_id)
        if record is None or not record.capabilities & Capability.RELAY:
            self.metrics.inc("drops", reason="relay_session_not_a_relay")
            return
        peer_id = message.peer
        pending = self.pending.get(peer_id)
        requested = pending is not None and relay_id == pending.relay_id
        if not requested and relay_id not in self.held:
            # Only a relay we asked, or one we hold a reservation on, may
            # open a session to us.
            self.metrics.inc("drops", reason="relay_session_unsolicited")
            return
        if requested:
            del self.pending[peer_id]
            self._refused.get(peer_id, {}).pop(relay_id, None)
        route = RelayRoute(addr[0], addr[1], session_header(message.session))
        sessions = self.sessions.setdefault(peer_id, {})
        old = sessions.get(relay_id)
        if old is not None and old.route != route:
            self._close(old, tell_relay=False)
        session = ClientSession(self.basics.network_id, peer_id, relay_id, route,
                                self.clock.seconds(), requested)
        sessions[relay_id] = session
        self.routes[route.header] = session
        self.metrics.inc("relay_sessions_joined")
        self._session_opened(peer_id, route, requested)
        if requested:
            self.basics.emit("relay_session", peer_id=peer_id, relay_id=relay_id,
                             outcome="opened")

    def on_end(self, frame, addr, message) -> None:
        session = self.routes.get(session_header(message.session))
        if (session is None or session.relay_id != frame.sender
                or session.route.relay_address != addr):
            return
        self._close(session, tell_relay=False)

    def _close(self, session: ClientSession, tell_relay: bool = True,
               notify: bool = True) -> None:
        sessions = self.sessions.get(session.peer_id, {})
        if sessions.get(session.relay_id) is session:
            del sessions[session.relay_id]
            if not sessions:
                self.sessions.pop(session.peer_id, None)
        self.routes.pop(session.route.header, None)
        if tell_relay:
            self.send(session.route.relay_address, MessageType.RELAY_END,
                         session=session.route.header[4:], reason=int(RelayEndReason.CLOSED))
        if notify:
            self._session_closed(session.peer_id, session.route)

    def session_failed(self, route: RelayRoute) -> None:
        """
        The link stopped answering through C{route}: forget the session and
        do not pick its relay for this peer again soon.
        """
        session = self.routes.get(route.header)
        if session is not None:
            self.refused(session.peer_id, session.relay_id)
            self._close(session, tell_relay=False, notify=False)

    def route_to(self, peer_id: bytes) -> RelayRoute | None:
        sessions = self.sessions.get(peer_id)
        if not sessions:
            return None
        return max(sessions.values(), key=lambda s: s.opened).route

    def ping_relay_of(self, route: RelayRoute) -> None:
        """
        Ping the relay of session C{route} at its own address.
        """
        relay_id = self.relay_of(route)
        if relay_id is not None:
            self._ping_relay(relay_id, route.relay_address)

    def relay_of(self, route) -> bytes | None:
        if not is_relayed(route):
            return None
        session = self.routes.get(route.header)
        return None if session is None else session.relay_id

    def coordinator_for(self, peer_id: bytes) -> tuple | None:
        """
        A relay both we and the peer reach, to coordinate a hole punch: the
        one carrying our session with the peer, else one it announces.
        """
        sessions = self.sessions.get(peer_id)
        if sessions:
            session = max(sessions.values(), key=lambda s: s.opened)
            return session.relay_id, session.route.relay_address
        relays = self.announced_relays(peer_id)
        return relays[0] if relays else None

    def stop(self) -> None:
        """
        Leaving: end our sessions and release our reservations on the
        relays, so they do not hold them for a node that is gone.
        """
        for sessions in list(self.sessions.values()):
            for session in list(sessions.values()):
                self._close(session, notify=False)
        for held in self.held.values():
            self.send(held.address, MessageType.RELAY_RESERVE, lifetime_s=0)
        self.held.clear()
        self.pending.clear()

    def status(self) -> dict:
        now = self.clock.seconds()
        return {
            "reservations": [
                {"relay": format_peer_id(h.relay_id), "address": f"{h.address[0]}:{h.address[1]}",
                 "live": h.live, "expires_in_s": round(max(0.0, h.expires - now), 1)
                 if h.live else None}
                for h in self.held.values()
            ],
            "sessions": [
                {"peer": format_peer_id(s.peer_id), "relay": format_peer_id(s.relay_id)}
                for sessions in self.sessions.values() for s in sessions.values()
            ],
        }


def _reason_name(reason: int) -> str:
    try:
        return RelayDenyReason(reason).name.lower()
    except ValueError:
        return str(reason)
