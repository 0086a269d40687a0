"""
One peer's connection in one network: the path datagrams take to it now, as
a value, and what this node believes of the peer, as an explicit state
machine.

    UNPROVEN --proven--> ACTIVE --missed--> SUSPECT --offline--> OFFLINE
        ^                  |  ^                |
        +---- moved -------+  +--- heard ------+
                           |
                           +--path_dead--> FAILING_OVER --moved--> UNPROVEN

Liveness (keepalives, pongs, indirect probes), the path manager (failover,
upgrades), the relay client (sessions) and the puncher (punched addresses)
feed it inputs; none of them writes its fields.  Every change of path is one
transition, L{PeerConnection.move}, which emits C{path_changed}.
L{PeerConnection.send} puts a datagram on whatever path is current, so a
user of it (a tunnel) never sees a failover or an upgrade.

Whether the current path is I{proven} (a pong to a nonce sent on it, or a
hole-punch ack, showed it leads to this peer) is kept beside the state: a
suspected peer may have been proven or not, and keeps that when it answers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

DIRECT = "direct"
PUNCHED = "punched"
RELAYED = "relayed"


class RelayRoute(NamedTuple):
    """
    A peer reached through a relay session: datagrams go to the relay at
    (host, port) prefixed with the session's 12-byte C{header}.  It stands in
    for an address everywhere the mesh keeps one (a 3-tuple never equals a
    (host, port) pair).
    """

    host: str
    port: int
    header: bytes

    @property
    def relay_address(self) -> tuple:
        return (self.host, self.port)


def is_relayed(address) -> bool:
    """Whether an address is a relay session's route (for addresses not yet a L{Path})."""
    return type(address) is RelayRoute


@dataclass(frozen=True)
class Path:
    """
    Where datagrams to a peer go: C{address} is the peer's own (host, port)
    for a direct or punched path, a L{RelayRoute} for a relayed one (then
    C{relay_id} names the relay when known).
    """

    kind: str
    address: object
    relay_id: bytes | None = None

    @property
    def relayed(self) -> bool:
        return self.kind == RELAYED

    @property
    def endpoint(self) -> tuple:
        """The (host, port) datagrams go to: the peer's, or the relay's."""
        return self.address.relay_address if self.relayed else self.address


class State(enum.Enum):
    UNPROVEN = "unproven"
    ACTIVE = "active"
    SUSPECT = "suspect"
    FAILING_OVER = "failing_over"
    OFFLINE = "offline"


class Input(enum.Enum):
    MOVED = "moved"              # the path changed (unproven yet, or proven with it)
    PROVEN = "proven"            # a pong or punch ack proved the current path
    MISSED = "missed"            # keepalives went unanswered: suspect the peer
    HEARD = "heard"              # a frame or a positive indirect ack: not suspect
    PATH_DEAD = "path_dead"      # the path stopped answering, another is being opened
    GAVE_UP = "gave_up"          # failover found nothing in time
    OFFLINE = "offline"          # declared offline (left the active set)


S, I = State, Input
TRANSITIONS: dict[tuple[State, Input], State] = {
    (S.UNPROVEN, I.MOVED): S.UNPROVEN,
    (S.UNPROVEN, I.PROVEN): S.ACTIVE,
    (S.UNPROVEN, I.MISSED): S.SUSPECT,
    (S.UNPROVEN, I.HEARD): S.UNPROVEN,
    (S.UNPROVEN, I.PATH_DEAD): S.FAILING_OVER,
    (S.UNPROVEN, I.OFFLINE): S.OFFLINE,
    (S.ACTIVE, I.MOVED): S.UNPROVEN,
    (S.ACTIVE, I.PROVEN): S.ACTIVE,
    (S.ACTIVE, I.MISSED): S.SUSPECT,
    (S.ACTIVE, I.HEARD): S.ACTIVE,
    (S.ACTIVE, I.PATH_DEAD): S.FAILING_OVER,
    (S.ACTIVE, I.OFFLINE): S.OFFLINE,
    (S.SUSPECT, I.MOVED): S.UNPROVEN,
    (S.SUSPECT, I.PROVEN): S.SUSPECT,
    (S.SUSPECT, I.HEARD): S.ACTIVE,
    (S.SUSPECT, I.OFFLINE): S.OFFLINE,
    # a suspect's path may fail too (its relay session ended): it stays
    # suspect while a new path is sought, and the indirect probes decide
    (S.SUSPECT, I.PATH_DEAD): S.SUSPECT,
    (S.SUSPECT, I.GAVE_UP): S.SUSPECT,
    (S.UNPROVEN, I.GAVE_UP): S.UNPROVEN,
    (S.ACTIVE, I.GAVE_UP): S.ACTIVE,
    (S.FAILING_OVER, I.MOVED): S.UNPROVEN,
    (S.FAILING_OVER, I.PROVEN): S.FAILING_OVER,
    (S.FAILING_OVER, I.PATH_DEAD): S.FAILING_OVER,
    (S.FAILING_OVER, I.HEARD): S.FAILING_OVER,
    (S.FAILING_OVER, I.GAVE_UP): S.ACTIVE,
    (S.FAILING_OVER, I.MISSED): S.SUSPECT,
    (S.FAILING_OVER, I.OFFLINE): S.OFFLINE,
    (S.OFFLINE, I.MOVED): S.UNPROVEN,
    (S.OFFLINE, I.PROVEN): S.OFFLINE,
    (S.OFFLINE, I.HEARD): S.OFFLINE,
    (S.OFFLINE, I.OFFLINE): S.OFFLINE,
}
"""Every allowed (state, input) pair; anything else is a programming error."""


class BadTransition(Exception):
    pass


@dataclass(eq=False)
class PeerConnection:
    """
    One peer's connection.  C{emit(kind, **data)} is the events sink
    (C{path_changed}, C{peer_suspected}); C{transmit(datagram, address)}
    writes a sealed frame to an address or relay route.
    """

    peer_id: bytes
    emit: Callable[..., None]
    transmit: Callable[[bytes, object], None]
    path: Path | None = None       # None: never had one
    state: State = State.OFFLINE
    proven: bool = False
    rtt: float | None = None
    suspected_at: float | None = None
    failing_over_since: float | None = None
    # hole punching and upgrades (the path manager's inputs)
    punched: dict = field(default_factory=dict)   # address -> time punched
    punching: bool = False
    punch_attempts: int = 0
    quick_punches: int = 0   # failed punches retried soon, before the backoff
    next_upgrade: float | None = None
    upgrade_backoff: float = 0.0

    # the machine

    def _input(self, what: Input) -> State:
        try:
            self.state = TRANSITIONS[(self.state, what)]
        except KeyError:
            raise BadTransition(f"{what.value} in state {self.state.value}") from None
        return self.state

    def move(self, path: Path, now: float, proven: bool = False) -> None:
        """
        The peer is reached over C{path} from now on (proven with it, or
        not yet).  Suspicion and failover end: the new path gets its own
        chance.
        """
        old = self.path
        self._input(Input.MOVED)
        self.path = path
        self.proven = False
        self.rtt = None
        self.suspected_at = None
        self.failing_over_since = None
        if proven:
            self.prove()
        if old is not None and old.address != path.address:
            self.emit("path_changed", peer_id=self.peer_id, old=old.address, new=path.address,
                      path_kind=path.kind)

    def prove(self) -> None:
        """A pong or a punch ack showed the current path leads to the peer."""
        self.proven = True
        self._input(Input.PROVEN)

    def measured(self, rtt: float) -> None:
        """A pong on the current path took C{rtt} seconds."""
        self.rtt = rtt

    def unprove(self) -> None:
        """A new run of the peer: its path must be proven again."""
        self.proven = False
        if self.state is State.ACTIVE:
            self.state = State.UNPROVEN

    def suspect(self, now: float) -> None:
        self._input(Input.MISSED)
        self.suspected_at = now
        self.emit("peer_suspected", peer_id=self.peer_id)

    def heard(self) -> None:
        """A frame or a positive indirect ack: the peer is not suspect."""
        if self.state is State.SUSPECT:
            self.suspected_at = None
            self._input(Input.HEARD)
            if not self.proven:
                self.state = State.UNPROVEN

    def path_dead(self, now: float) -> None:
        """The path stopped answering; another one is being opened."""
        if self.failing_over_since is None:
            self.failing_over_since = now
        self._input(Input.PATH_DEAD)

    def gave_up(self) -> None:
        """Failover found no path in time: liveness decides (suspect, offline)."""
        self.failing_over_since = None
        self._input(Input.GAVE_UP)
        if self.state is State.ACTIVE and not self.proven:
            self.state = State.UNPROVEN

    def offline(self) -> None:
        self.suspected_at = None
        self.failing_over_since = None
        self._input(Input.OFFLINE)

    # what it says

    @property
    def suspected(self) -> bool:
        return self.state is State.SUSPECT

    @property
    def live(self) -> bool:
        """A path not under suspicion (it may be unproven yet)."""
        return self.state in (State.UNPROVEN, State.ACTIVE, State.FAILING_OVER)

    def mark_punched(self, address: tuple, now: float) -> None:
        """
        A probe/ack exchange proved C{address} reaches the peer through its
        NAT; the current path at that address becomes a punched one.
        """
        self.punched[address] = now
        while len(self.punched) > 4:
            self.punched.pop(next(iter(self.punched)))
        if self.path is not None and self.path.address == address and self.path.kind == DIRECT:
            self.path = Path(PUNCHED, address)

    def forget_punched(self, address) -> None:
        self.punched.pop(address, None)

    def path_to(self, address, relay_id: bytes | None = None) -> Path:
        """The path value for C{address}: relayed, punched (proven so before) or direct."""
        if is_relayed(address):
            return Path(RELAYED, address, relay_id)
        return Path(PUNCHED if address in self.punched else DIRECT, address)

    # the data plane

    def send(self, datagram: bytes) -> bool:
        """
        Send a sealed frame on the current path (direct, punched or
        relayed); returns False, sending nothing, without a path.
        """
        if self.path is None or self.state is State.OFFLINE:
            return False
        self.transmit(datagram, self.path.address)
        return True


class Connections:
    """
    The table of peer connections of one network, at most C{limit}: the
    oldest without a live link is forgotten first.
    """

    def __init__(self, emit: Callable[..., None], transmit: Callable[[bytes, object], None],
                 limit: int = 4096):
        self._emit = emit
        self._transmit = transmit
        self.limit = limit
        self._peers: dict[bytes, PeerConnection] = {}

    def get(self, peer_id: bytes) -> PeerConnection | None:
        return self._peers.get(peer_id)

    def open(self, peer_id: bytes) -> PeerConnection:
        """
        The peer's connection, created (offline, no path yet) if it has none.
        """
        connection = self._peers.get(peer_id)
        if connection is None:
            if len(self._peers) >= self.limit:
                victim = next((p for p, c in self._peers.items() if c.state is State.OFFLINE),
                              next(iter(self._peers)))
                del self._peers[victim]
            connection = PeerConnection(peer_id, self._emit, self._transmit)
            self._peers[peer_id] = connection
        return connection

    def values(self):
        return self._peers.values()

    def __contains__(self, peer_id: bytes) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)
