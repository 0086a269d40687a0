"""
The path seam: where to send a datagram so it reaches a peer.

Today every path is direct: the address a live keepalive link uses, else the
freshest address heard from the peer, else an address learned from a
piggybacked contact, else the DIRECT path in the peer's signed announcement.
Relayed and hole-punched paths plug in here (a path kind, an address, a
relay), without the messaging, gossip or liveness code changing.
"""

from __future__ import annotations

from dataclasses import dataclass

from omerta.wire.messages import PathKind


@dataclass(frozen=True)
class Connection:
    """
    How this node reaches a peer right now (what C{connect()} returns).

    @ivar endpoint: the peer's address the datagrams go to.
    @ivar local_port: this node's UDP port they leave from.
    @ivar kind: C{"direct"} (later also C{"relayed"}, C{"punched"}).
    @ivar rtt: the last measured round-trip time in seconds, or None.
    """

    peer_id: bytes
    endpoint: tuple
    local_port: int
    kind: str
    rtt: float | None
    via: bytes | None = None

    def as_dict(self) -> dict:
        return {
            "peer_id": self.peer_id.hex(),
            "endpoint": f"{self.endpoint[0]}:{self.endpoint[1]}",
            "local_port": self.local_port,
            "kind": self.kind,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "via": None if self.via is None else self.via.hex(),
        }


class DirectPaths:
    def __init__(self, overlay, max_candidates: int = 4096):
        self.overlay = overlay
        self.max_candidates = max_candidates
        self._candidates: dict[bytes, tuple[tuple, float]] = {}

    def candidate(self, peer_id: bytes, address: tuple, heard: float) -> None:
        """
        A third party says C{peer_id} was at C{address} at time C{heard}.
        """
        current = self._candidates.get(peer_id)
        if current is None and len(self._candidates) >= self.max_candidates:
            return
        if current is None or current[1] < heard:
            self._candidates[peer_id] = (address, heard)

    def address_of(self, peer_id: bytes) -> tuple | None:
        overlay = self.overlay
        address = overlay.liveness.address_of(peer_id)
        if address is not None:
            return address
        contact = overlay.freshness.contacts.get(peer_id)
        candidate = self._candidates.get(peer_id)
        if contact is not None and (candidate is None or candidate[1] <= contact.heard):
            return contact.address
        if candidate is not None:
            return candidate[0]
        record = overlay.registry.get(peer_id)
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

    def known_addresses(self, peer_id: bytes) -> set[tuple]:
        """
        Every address this node itself has for C{peer_id}: its link, a
        recent contact, a candidate, the registry's endpoint and announced
        paths.
        """
        overlay = self.overlay
        out = set()
        address = overlay.liveness.address_of(peer_id)
        if address is not None:
            out.add(address)
        contact = overlay.freshness.contacts.get(peer_id)
        if contact is not None:
            out.add(contact.address)
        candidate = self._candidates.get(peer_id)
        if candidate is not None:
            out.add(candidate[0])
        record = overlay.registry.get(peer_id)
        if record is not None:
            if record.endpoint is not None:
                out.add(tuple(record.endpoint))
            out.update(tuple(e) for _kind, e, _via in record.paths)
        return out

    def connection(self, peer_id: bytes) -> Connection | None:
        overlay = self.overlay
        link = overlay.liveness.links.get(peer_id)
        if link is None or link.suspected_at is not None:
            return None
        return Connection(peer_id, link.address, overlay.node.local_port, "direct", link.rtt)
