"""
Path management: where to send a datagram so it reaches a peer, and keeping
the best path live.

A peer can be reached over three kinds of path:

- C{direct}: the peer's own address (public, or on the same LAN);
- C{punched}: an address a hole punch opened through the NATs;
- C{relayed}: a session on a relay (L{RelayRoute}), which works whatever the
  NATs.

The path in use is the address of the peer's liveness link: keepalives go on
it (15 s), and a path whose pings go unanswered (3 in a row over at least
C{path_dead_after} seconds: a keepalive and its two retries, or three
application pings) is given up: the link moves to a relay session (an open
one at once, else one is asked for), and an upgrade back to a direct path is
tried on a schedule by hole punching (5 s after a direct path failed, then
30 s, doubling to 10 min; a failed punch is first tried again 1 s later,
twice).  Messages are retried by the request/response
layer, which asks C{message_address} at every transmission, so they follow the
move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred

from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.stun.hops import is_global
from omerta.mesh.context import Basics
from omerta.mesh.peer import (DIRECT, PUNCHED, RELAYED, Connections, PeerConnection, RelayRoute,
                              Path, State, is_relayed)  # noqa: F401 (re-exported)
from omerta.wire.messages import SERVING, NatType, PathKind

@dataclass(frozen=True)
class Connection:
    """
    How this node reaches a peer right now (what C{connect()} returns).

    @ivar endpoint: where the datagrams go: the peer's address, or the
        relay's for a relayed path.
    @ivar local_port: this node's UDP port they leave from.
    @ivar kind: C{"direct"}, C{"punched"} or C{"relayed"}.
    @ivar rtt: the last measured round-trip time in seconds, or None.
    @ivar via: the relay's peer id for a relayed path.
    """

    peer_id: bytes
    endpoint: tuple
    local_port: int
    kind: str
    rtt: float | None
    via: bytes | None = None

    @property
    def direct(self) -> bool:
        return self.kind != RELAYED

    def as_dict(self) -> dict:
        return {
            "peer_id": self.peer_id.hex(),
            "endpoint": f"{self.endpoint[0]}:{self.endpoint[1]}",
            "local_port": self.local_port,
            "kind": self.kind,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "via": None if self.via is None else self.via.hex(),
        }


# NAT types a peer can be reached at directly, without any punch.
OPEN_NATS = (NatType.PUBLIC,)
# NAT types whose router may drop a datagram from an address its host has
# not sent to (unknown: a node that has not finished NAT discovery is most
# often behind one).  A ping to such a peer's public address cannot reach
# it, and a router without an input filter keeps a conntrack entry for it
# that moves the peer's mapping towards us, spoiling the punch
# (omerta.mesh.punch).
FILTERING_NATS = (NatType.UNKNOWN, NatType.RESTRICTED_CONE, NatType.PORT_RESTRICTED_CONE,
                  NatType.SYMMETRIC)


class PathManager:
    log = Logger()

    def __init__(self, basics: Basics, connections: Connections, registry, *,
                 liveness, relays, freshness,
                 punch: Callable[[bytes, tuple], Deferred],
                 announce_to: Callable[[object], None],
                 local_port: Callable[[], int],
                 path_ready: Callable[[bytes], None] = lambda peer_id: None,
                 max_candidates: int = 4096):
        """
        @param liveness: the overlay's L{omerta.mesh.liveness.Liveness} (its
            links are the paths in use; it connects, pings, switches paths).
        @param relays: the L{omerta.mesh.relayclient.RelayClient} (sessions).
        @param freshness: the L{omerta.mesh.freshness.Freshness} (recent
            contacts; failed paths reported).
        @param punch: C{punch(peer_id, coordinator)}: a hole punch; the
            Deferred fires with the punched address or None.
        @param announce_to: send our announcement to an address or route.
        @param local_port: this node's UDP port.
        @param path_ready: told a peer's link took a new path (a relay
            session, a punched address): messages waiting for one can go.
        """
        self.basics = basics
        self.clock = basics.clock
        self.metrics = basics.metrics
        self.config = basics.config
        self.connections = connections
        self.registry = registry
        self.liveness = liveness
        self.relays = relays
        self.freshness = freshness
        self._punch = punch
        self._announce_to = announce_to
        self._local_port = local_port
        self._path_ready = path_ready
        self.max_candidates = max_candidates
        self._candidates: dict[bytes, tuple[tuple, float]] = {}

    def state(self, peer_id: bytes) -> PeerConnection:
        return self.connections.open(peer_id)

    # addresses others told us about

    def candidate(self, peer_id: bytes, address: tuple, heard: float) -> None:
        """
        A third party says C{peer_id} was at C{address} at time C{heard}.
        """
        current = self._candidates.get(peer_id)
        if current is None and len(self._candidates) >= self.max_candidates:
            return
        if current is None or current[1] < heard:
            self._candidates[peer_id] = (address, heard)

    def direct_address(self, peer_id: bytes) -> tuple | None:
        """
        The best guess at the peer's own address: a recent contact, a
        candidate, its announced address, where it was last heard.
        """
        contact = self.freshness.contacts.get(peer_id)
        candidate = self._candidates.get(peer_id)
        if contact is not None and (candidate is None or candidate[1] <= contact.heard):
            return contact.address
        if candidate is not None:
            return candidate[0]
        record = self.registry.get(peer_id)
        if record is None:
            return None
        # The peer's own signed word about where it is, when it is newer than
        # our last direct contact, beats that contact.
        announced = [tuple(e) for kind, e, _via in record.paths if kind == PathKind.DIRECT]
        heard = record.last_heard
        if announced and (heard is None or record.timestamp_ms / 1000 >= heard
                          or record.endpoint is None):
            return announced[0]
        if record.endpoint is not None:
            return tuple(record.endpoint)
        return announced[0] if announced else None

    def address_of(self, peer_id: bytes):
        """
        Where a datagram for C{peer_id} goes now: the live link's path, else
        an open relay session, else the peer's direct address.
        """
        link = self.liveness.links.get(peer_id)
        if link is not None and (not link.conn.suspected or link.conn.path.relayed):
            return link.address
        route = self.relays.route_to(peer_id)
        if route is not None:
            return route
        if link is not None:
            return link.address
        return self.direct_address(peer_id)

    def link_address(self, peer_id: bytes):
        """
        Where the liveness links may ping C{peer_id} (a new link, a
        reconnect): L{address_of}, but None for the global address of a
        peer behind a filtering NAT (L{may_reach}) unless it reached us from
        there lately.  Such a ping cannot arrive, and on a router that
        accepts unsolicited datagrams it leaves an entry that moves the
        peer's mapping, for the punch to come and for every new peer.
        """
        address = self.address_of(peer_id)
        if (address is None or type(address) is RelayRoute
                or self.may_reach(peer_id, address)):
            return address
        return None

    def message_address(self, peer_id: bytes):
        """
        Where a message for C{peer_id} goes: L{address_of}, unless that is
        only the public address of a filtering NAT and we have no link to
        the peer (L{link_address} is None).  Then start the ways
        that work (L{establish}: a relay session and a punch) and return
        None; the message waits for L{path_ready}.
        """
        if peer_id in self.liveness.links:
            return self.address_of(peer_id)
        address = self.link_address(peer_id)
        if address is None and self.address_of(peer_id) is not None:
            self.establish(peer_id)
        return address

    def opening(self, peer_id: bytes) -> bool:
        """Whether a relay session or a punch to C{peer_id} is under way."""
        state = self.connections.get(peer_id)
        return peer_id in self.relays.pending or (state is not None and state.punching)

    def known_addresses(self, peer_id: bytes) -> set[tuple]:
        """
        Every direct address this node itself has for C{peer_id}: its link, a
        recent contact, a candidate, the registry's endpoint and announced
        direct paths.
        """
        out = set()
        link = self.liveness.links.get(peer_id)
        if link is not None and not link.conn.path.relayed:
            out.add(link.address)
        contact = self.freshness.contacts.get(peer_id)
        if contact is not None:
            out.add(contact.address)
        candidate = self._candidates.get(peer_id)
        if candidate is not None:
            out.add(candidate[0])
        record = self.registry.get(peer_id)
        if record is not None:
            if record.endpoint is not None:
                out.add(tuple(record.endpoint))
            out.update(tuple(e) for kind, e, _via in record.paths if kind == PathKind.DIRECT)
        return out

    def connection(self, peer_id: bytes) -> Connection | None:
        link = self.liveness.links.get(peer_id)
        if link is None or link.conn.suspected:
            return None
        path = link.conn.path
        via = path.relay_id if path.relayed else None
        return Connection(peer_id, path.endpoint, self._local_port(), path.kind,
                          link.rtt, via)

    # what a peer's announcement says about reaching it

    def needs_traversal(self, peer_id: bytes) -> bool:
        """
        Whether the peer sits behind a NAT that a plain datagram to its
        address will not cross (anything but a public address, as far as
        its signed announcement says).
        """
        record = self.registry.get(peer_id)
        if record is None:
            return False
        return record.nat_type not in OPEN_NATS

    # establishing

    def establish(self, peer_id: bytes) -> None:
        """
        Start every way to reach C{peer_id} that may work: a ping to its
        direct address, a relay session through one of the relays it
        announces, and a hole punch coordinated by that relay.  The liveness
        link takes whichever answers first; a punched path replaces a
        relayed one when it succeeds.
        """
        address = self.direct_address(peer_id)
        link = self.liveness.links.get(peer_id)
        if (address is not None and (link is None or not link.conn.path.relayed)
                and self.may_reach(peer_id, address)):
            self.liveness.connect(peer_id, address)
            self._announce_to(address)
            self.liveness.ping(peer_id, address)
        if self.needs_traversal(peer_id) or address is None:
            self.relays.open_session(peer_id)
            self.try_punch(peer_id)

    def may_reach(self, peer_id: bytes, address: tuple) -> bool:
        """
        Whether a plain datagram to C{address} may reach C{peer_id}: not
        when its announcement says a filtering NAT (L{FILTERING_NATS})
        stands in front of that (global) address, unless the peer reached
        us from it lately (its router then expects us).  Its LAN address,
        or one of a public host, a full cone or a server (L{SERVING}), is
        worth the ping.
        """
        record = self.registry.get(peer_id)
        if (record is None or record.nat_type not in FILTERING_NATS or not is_global(address[0])
                or record.capabilities & SERVING):
            return True
        contact = self.freshness.contacts.get(peer_id)
        return contact is not None and contact.address == address

    def relay_session_opened(self, peer_id: bytes, route: RelayRoute, requested: bool) -> None:
        """
        A relay session to C{peer_id} is open.  When we asked for it and have
        no live path (or are failing over), the link takes it.
        """
        link = self.liveness.links.get(peer_id)
        if link is None:
            if not requested:
                return
            self.liveness.connect(peer_id, route)
        elif link.conn.state is State.ACTIVE and link.conn.failing_over_since is None:
            return  # a proven path that answers: keep it
        else:
            self.liveness.switch(link, route, proven=False)
        self._announce_to(route)
        self.liveness.ping(peer_id, route)
        self._path_ready(peer_id)

    def relay_session_closed(self, peer_id: bytes, route: RelayRoute) -> None:
        link = self.liveness.links.get(peer_id)
        if link is not None and link.address == route:
            self.path_failed(link)

    # hole punching

    def try_punch(self, peer_id: bytes) -> None:
        state = self.state(peer_id)
        if state.punching:
            return
        coordinator = self.relays.coordinator_for(peer_id)
        if coordinator is None:
            return
        state.punching = True
        state.punch_attempts += 1
        d = self._punch(peer_id, coordinator)
        d.addCallback(self._punched, peer_id)

    def _punched(self, address, peer_id: bytes) -> None:
        state = self.state(peer_id)
        state.punching = False
        now = self.clock.seconds()
        if address is None:
            if state.quick_punches < self.config.punch_retries_soon:
                # A first failure is often a lost datagram or a coordinator
                # that has not proven our address yet: try again soon.
                state.quick_punches += 1
                state.next_upgrade = now + self.config.punch_retry_soon
                return
            self._schedule_upgrade(state, now)
            return
        state.quick_punches = 0
        self.use_punched(peer_id, address)

    def use_punched(self, peer_id: bytes, address: tuple) -> None:
        """
        A probe/ack exchange proved C{address} reaches the peer directly.
        """
        now = self.clock.seconds()
        state = self.state(peer_id)
        link = self.liveness.links.get(peer_id)
        already = link is not None and link.address == address and link.verified
        record = self.registry.get(peer_id)
        nat = NatType.UNKNOWN if record is None else record.nat_type
        # Punched: the peer is behind a NAT (a public peer's address is just
        # direct, and so is one of unknown NAT a plain ping reached first).
        if nat != NatType.PUBLIC and not (already and nat == NatType.UNKNOWN):
            state.mark_punched(address, now)
        if already:
            return
        state.next_upgrade = None
        state.upgrade_backoff = 0.0
        if link is None:
            # (the ack's proof already proved the address: the link starts proven)
            self.liveness.connect(peer_id, address)
        elif link.address != address and (link.conn.path.relayed or link.conn.suspected
                                          or not link.verified):
            self.liveness.switch(link, address, proven=True)
        self.liveness.ping(peer_id, address)
        self._path_ready(peer_id)

    # failure and upgrade

    def path_failed(self, link) -> bool:
        """
        The link's path stopped answering.  Move it to another path if there
        is one, or start opening one (True); False, with nothing changed,
        when there is no other path to try (the caller then suspects the
        peer as before).
        """
        now = self.clock.seconds()
        peer_id = link.peer_id
        state = link.conn
        old = state.path
        if state.failing_over_since is not None:
            if now - state.failing_over_since < self.config.failover_timeout:
                return True
            state.gave_up()
            return False
        route = self.relays.route_to(peer_id)
        if route == old.address:
            route = None
        # the relay whose session is still open but does not answer is not
        # asked again (one that ended the session itself may be)
        failed_relay = self.relays.relay_of(old.address)
        if route is None and not self.relays.can_open(peer_id, exclude_relay=failed_relay):
            return False
        self._forget_path(state, old)
        if route is None:
            # the failed session is gone now: ask another relay
            route = self.relays.route_to(peer_id)
        if route is not None:
            self.log.info("Path to {peer} failed; moving to a relay session",
                          peer=format_peer_id(peer_id))
            self.liveness.switch(link, route, proven=False)
            self.liveness.ping(peer_id, route)
            # and the relay itself: if our NAT moved us (which may be why the
            # path failed), it drops what we send through the session until
            # it has proven our new address, which this ping starts
            self.relays.ping_relay_of(route)
            self.metrics.inc("path_failovers", to="relayed")
        else:
            self.relays.open_session(peer_id, exclude_relay=failed_relay)
            state.path_dead(now)
            self.metrics.inc("path_failovers", to="relay_requested")
        # a direct path that failed may come back soon (a NAT rebinding)
        self._schedule_upgrade(state, now, soon=not old.relayed)
        return True

    def _forget_path(self, state: PeerConnection, old: Path) -> None:
        if old.relayed:
            self.relays.session_failed(old.address)
        else:
            state.forget_punched(old.address)
            self.freshness.path_failed(state.peer_id, old.address)

    def _schedule_upgrade(self, state: PeerConnection, now: float, soon: bool = False) -> None:
        config = self.config
        if soon:
            state.upgrade_backoff = config.upgrade_first
            state.quick_punches = 0  # a path that worked failed: quick retries again
        else:
            state.upgrade_backoff = min(config.upgrade_max,
                                        max(config.upgrade_initial, 2 * state.upgrade_backoff))
        state.next_upgrade = now + state.upgrade_backoff

    def tick(self) -> None:
        """
        Every second: upgrade attempts due on relayed links; a relayed link
        to a peer that needs no traversal tries its direct address.
        """
        now = self.clock.seconds()
        for link in list(self.liveness.links.values()):
            if not link.conn.path.relayed:
                continue
            state = link.conn
            if state.next_upgrade is None:
                self._schedule_upgrade(state, now)
                continue
            if now >= state.next_upgrade and not state.punching:
                state.next_upgrade = None
                self.try_punch(link.peer_id)
                if state.punching:
                    self.metrics.inc("path_upgrade_attempts")
                else:
                    self._schedule_upgrade(state, now)

    def punch_attempts(self, peer_id: bytes) -> int:
        """How many hole punches this node asked for towards C{peer_id}."""
        connection = self.connections.get(peer_id)
        return 0 if connection is None else connection.punch_attempts

    def statistics(self) -> dict:
        kinds = {DIRECT: 0, PUNCHED: 0, RELAYED: 0}
        for link in self.liveness.links.values():
            if not link.conn.suspected:
                kinds[link.conn.path.kind] += 1
        return kinds

