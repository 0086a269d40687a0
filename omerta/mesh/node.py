"""
The mesh controller of the foundation: it answers authenticated frames,
exchanges signed announcements with the peers it meets, measures round trips
with ping/pong and keeps a bounded table of the peers it has heard from.

Gossip, SWIM liveness, freshness queries and messaging build on this in
L{omerta.mesh} as the product grows; the seams they use are L{MeshNode.send}
and the handler table in L{MeshNode.frame_received}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from twisted.logger import Logger

from omerta.addressing import BootstrapSpec
from omerta.crypto.announce import AnnouncementError, open_announcement, sign_announcement
from omerta.crypto.identity import Identity, format_peer_id
from omerta.crypto.network import NetworkKey
from omerta.crypto.sealing import FrameSealer, OpenedFrame
from omerta.metrics import Metrics
from omerta.wire import ParseError
from omerta.wire.messages import (
    Capability,
    MessageType,
    NatType,
    build_body,
    parse_body,
)

Address = tuple[str, int]


@dataclass
class MeshConfig:
    """
    Timing and size knobs (defaults from DESIGN.md §6).
    """

    keepalive: float = 15.0
    suspect_after_missed: int = 3
    bootstrap_retry_initial: float = 1.0
    bootstrap_retry_max: float = 30.0
    announce_ttl: int = 3600
    max_peers: int = 10000
    max_outstanding_pings: int = 1024


@dataclass
class PeerSighting:
    """
    What this node knows about a peer it has heard from.
    """

    peer_id: bytes
    endpoint: Address
    first_seen: float
    last_seen: float
    networks: set[bytes] = field(default_factory=set)
    boot: bytes = b""
    name: str = ""
    public_key: bytes | None = None
    capabilities: int = 0
    sequence: int = -1
    rtt: float | None = None
    frames: int = 0
    announced_to_boot: bytes = b""

    def as_status(self, now: float, stale_after: float) -> dict:
        return {
            "peer_id": format_peer_id(self.peer_id),
            "name": self.name,
            "endpoint": f"{self.endpoint[0]}:{self.endpoint[1]}",
            "networks": sorted(n.hex() for n in self.networks),
            "capabilities": _capability_names(self.capabilities),
            "verified": self.public_key is not None,
            "state": "online" if now - self.last_seen <= stale_after else "stale",
            "last_seen_ago_s": round(now - self.last_seen, 3),
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "frames": self.frames,
        }


def _capability_names(flags: int) -> list[str]:
    return [c.name.lower() for c in Capability if c and flags & c]


@dataclass
class _Bootstrap:
    """
    A peer to bootstrap from, in the networks named (every network of this
    node when C{networks} is None: a spec given on the command line).
    """

    spec: BootstrapSpec
    networks: set[bytes] | None = None
    address: Address | None = None
    reached: bool = False


class MeshNode:
    """
    The controller behind a node's socket.

    @param networks: the networks this node belongs to.
    @param clock: an C{IReactorTime} provider.
    @param bootstrap: peers to start from in every network.
    @param network_bootstrap: peers to start from in one network only (from
        that network's invite), by network id; never contacted in the other
        networks, whose ids they need not learn.
    """

    log = Logger()

    def __init__(
        self,
        identity: Identity,
        networks: list[NetworkKey],
        *,
        clock,
        metrics: Metrics,
        name: str = "",
        capabilities: Capability = Capability.NONE,
        bootstrap: list[BootstrapSpec] = (),
        network_bootstrap: dict[bytes, list[BootstrapSpec]] | None = None,
        config: MeshConfig | None = None,
    ):
        self.identity = identity
        self.peer_id = identity.peer_id
        self.clock = clock
        self.metrics = metrics
        self.name = name
        self.capabilities = capabilities
        self.config = config or MeshConfig()
        self.sealers = {key.network_id: FrameSealer(key, self.peer_id) for key in networks}
        self.peers: dict[bytes, PeerSighting] = {}
        self.bootstraps: list[_Bootstrap] = []
        for spec in bootstrap:
            self._add_bootstrap(spec, None)
        for network_id, specs in (network_bootstrap or {}).items():
            for spec in specs:
                self._add_bootstrap(spec, network_id)
        self.transport = None
        self.nat = None
        self._sequence = int(clock.seconds() * 1000)
        self._pings: dict[int, tuple[float, bytes]] = {}
        self._handlers = {
            MessageType.PING: self._on_ping,
            MessageType.PONG: self._on_pong,
            MessageType.ANNOUNCE: self._on_announce,
        }

    def _add_bootstrap(self, spec: BootstrapSpec, network_id: bytes | None) -> None:
        if self._is_self(spec):
            return
        for boot in self.bootstraps:
            if boot.spec == spec:
                if boot.networks is not None:
                    if network_id is None:
                        boot.networks = None
                    else:
                        boot.networks.add(network_id)
                return
        self.bootstraps.append(
            _Bootstrap(spec, None if network_id is None else {network_id})
        )

    def _is_self(self, spec: BootstrapSpec) -> bool:
        if spec.peer_id is not None:
            return spec.peer_id == self.identity.peer_id_text
        return bool(self.name) and spec.name == self.name

    # sending

    def send(self, network_id: bytes, address: Address, msg_type: MessageType, **fields) -> None:
        """
        Seal a message for one network and send it to C{address}.
        """
        frame = self.sealers[network_id].seal(msg_type, build_body(msg_type, fields))
        self.transport.write(frame, address)
        self.metrics.inc("frames_out", type=msg_type.name.lower())
        self.metrics.inc("bytes_out", len(frame))

    def _announcement(self, network_id: bytes) -> dict:
        self._sequence += 1
        return sign_announcement(
            self.identity,
            network_id,
            {
                "name": self.name,
                "sequence": self._sequence,
                "timestamp_ms": int(self.clock.seconds() * 1000),
                "ttl_s": self.config.announce_ttl,
                "nat_type": NatType.UNKNOWN if self.nat is None else self.nat.nat_type,
                "capabilities": int(self.capabilities),
                "paths": [],
                "resources": {"cpu_cores": 0, "memory_mb": 0, "disk_gb": 0, "gpus": 0},
            },
        )

    def announce_to(self, network_id: bytes, address: Address) -> None:
        self.send(
            network_id,
            address,
            MessageType.ANNOUNCE,
            hops=0,
            announcement=self._announcement(network_id),
        )

    def ping(self, network_id: bytes, address: Address, peer_id: bytes = b"") -> None:
        if len(self._pings) >= self.config.max_outstanding_pings:
            self._pings.pop(next(iter(self._pings)))
        nonce = int.from_bytes(os.urandom(8), "big")
        now = self.clock.seconds()
        self._pings[nonce] = (now, peer_id)
        self.send(
            network_id, address, MessageType.PING, nonce=nonce, sent_ms=int(now * 1000), contacts=[]
        )

    # periodic work, driven by the service

    def contact_bootstraps(self) -> bool:
        """
        Announce and ping every bootstrap peer not reached yet, in every
        network.  Returns whether any remain unreached.
        """
        pending = [b for b in self.bootstraps if not b.reached and b.address is not None]
        for boot in pending:
            for network_id in self.sealers:
                if boot.networks is None or network_id in boot.networks:
                    self.announce_to(network_id, boot.address)
                    self.ping(network_id, boot.address)
        return any(not b.reached for b in self.bootstraps)

    def keepalive(self) -> None:
        """
        Ping every known peer on one network it shares with us.
        """
        for peer in list(self.peers.values()):
            network_id = next(iter(peer.networks))
            self.ping(network_id, peer.endpoint, peer.peer_id)
        self._update_gauges()

    def _update_gauges(self) -> None:
        now = self.clock.seconds()
        stale = self._stale_after()
        online = sum(1 for p in self.peers.values() if now - p.last_seen <= stale)
        self.metrics.set("peers", online, state="online")
        self.metrics.set("peers", len(self.peers) - online, state="stale")

    def _stale_after(self) -> float:
        return self.config.keepalive * self.config.suspect_after_missed

    # receiving

    def frame_received(self, frame: OpenedFrame, addr: Address) -> None:
        handler = self._handlers.get(frame.type)
        if handler is None:
            self.metrics.inc("drops", reason="unhandled_type")
            return
        try:
            message = parse_body(frame.type, frame.body)
        except ParseError as e:
            self.metrics.inc("drops", reason="malformed_body")
            self.log.debug("Malformed body from {addr}: {error}", addr=addr, error=str(e))
            return
        peer = self._sighting(frame, addr)
        if peer is None:
            return
        handler(frame, addr, peer, message)
        if peer.announced_to_boot != frame.boot:
            # First frame of this peer's run: introduce ourselves and measure
            # the round trip now rather than at the next keepalive.
            peer.announced_to_boot = frame.boot
            self.announce_to(frame.network_id, addr)
            self.ping(frame.network_id, addr, peer.peer_id)

    def _sighting(self, frame: OpenedFrame, addr: Address) -> PeerSighting | None:
        now = self.clock.seconds()
        peer = self.peers.get(frame.sender)
        if peer is None:
            if len(self.peers) >= self.config.max_peers:
                self.metrics.inc("drops", reason="peer_table_full")
                return None
            peer = PeerSighting(frame.sender, addr, now, now)
            self.peers[frame.sender] = peer
            self.log.info(
                "New peer {peer_id} at {addr}",
                peer_id=format_peer_id(frame.sender),
                addr=f"{addr[0]}:{addr[1]}",
            )
        elif peer.endpoint != addr:
            self.log.info(
                "Peer {peer_id} moved to {addr}",
                peer_id=format_peer_id(frame.sender),
                addr=f"{addr[0]}:{addr[1]}",
            )
            peer.endpoint = addr
        peer.last_seen = now
        peer.boot = frame.boot
        peer.frames += 1
        peer.networks.add(frame.network_id)
        for boot in self.bootstraps:
            if boot.address == addr and not boot.reached and boot.spec.peer_id is None:
                boot.reached = True
        return peer

    def _on_ping(self, frame: OpenedFrame, addr: Address, peer: PeerSighting, ping) -> None:
        self.send(
            frame.network_id,
            addr,
            MessageType.PONG,
            nonce=ping.nonce,
            echo_ms=ping.sent_ms,
            observed=addr,
            contacts=[],
        )

    def _on_pong(self, frame: OpenedFrame, addr: Address, peer: PeerSighting, pong) -> None:
        sent = self._pings.pop(pong.nonce, None)
        if sent is None:
            self.metrics.inc("drops", reason="unexpected_pong")
            return
        peer.rtt = self.clock.seconds() - sent[0]

    def _on_announce(self, frame: OpenedFrame, addr: Address, peer: PeerSighting, msg) -> None:
        try:
            record = open_announcement(frame.network_id, msg.announcement, sender=frame.sender)
        except AnnouncementError as e:
            self.metrics.inc("drops", reason=e.reason)
            self.log.warn(
                "Rejected announcement from {addr}: {reason}", addr=addr, reason=e.reason
            )
            return
        if not self._check_bootstrap_identity(addr, format_peer_id(record.peer_id)):
            return
        if record.sequence <= peer.sequence:
            self.metrics.inc("drops", reason="stale_sequence")
            return
        peer.sequence = record.sequence
        peer.public_key = record.public_key
        peer.name = record.name
        peer.capabilities = record.capabilities

    def _check_bootstrap_identity(self, addr: Address, peer_id: str) -> bool:
        """
        Mark bootstrap specs at C{addr} that name C{peer_id} as reached.
        False when specs there name only other ids: the answer does not come
        from the peer the operator asked for.
        """
        expected = [b for b in self.bootstraps if b.address == addr and b.spec.peer_id]
        matched = [b for b in expected if b.spec.peer_id == peer_id]
        for boot in matched:
            boot.reached = True
        if expected and not matched:
            self.metrics.inc("drops", reason="bootstrap_mismatch")
            self.log.warn(
                "Bootstrap {specs} answered as peer {peer_id}; not counted as reached",
                specs=", ".join(str(b.spec) for b in expected),
                peer_id=peer_id,
            )
            return False
        return True

    # status

    def status(self) -> dict:
        now = self.clock.seconds()
        stale = self._stale_after()
        return {
            "peer_id": self.identity.peer_id_text,
            "name": self.name,
            "capabilities": _capability_names(self.capabilities),
            "networks": sorted(n.hex() for n in self.sealers),
            "bootstrap": [
                {"spec": str(b.spec), "reached": b.reached} for b in self.bootstraps
            ],
            "peers": [
                p.as_status(now, stale)
                for p in sorted(self.peers.values(), key=lambda p: p.peer_id)
            ],
        }
