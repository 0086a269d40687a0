"""
Signed announcements and their dissemination in one network.

- Origination: the node signs its own announcement (sequence numbers only
  grow; a new one on every change and every C{reannounce} seconds) and sends
  it directly to peers it meets.
- Rumour mongering (as memberlist/SWIM do): an announcement this node learns
  that is new or newer becomes a rumour, sent every C{gossip_interval}
  seconds to C{fanout} random active peers in PEER_LIST batches that fit one
  datagram, each rumour at most C{retransmit_mult * ceil(log10(n + 1))}
  times, and never beyond C{gossip_hop_limit} hops from its origin.  So the
  cost per node per second is bounded whatever the mesh size, and an
  announcement reaches everyone in O(log n) rounds.
- Peer-list exchange: on first contact with a peer (bootstrap included) the
  node sends everything it knows and asks for the same back.
- Duplicate suppression: a record whose (peer, sequence) the registry holds
  already is dropped before its signature is checked.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from twisted.logger import Logger

from omerta.crypto.announce import sign_announcement
from omerta.crypto.identity import peer_id_for
from omerta.wire import ParseError
from omerta.wire.messages import parse_record
from omerta.mesh.registry import Outcome
from omerta.wire.messages import MessageType, PathKind

# Size budget of one PEER_LIST datagram body (keeps frames under ~1200 B).
PEER_LIST_BUDGET = 1100
_ENTRY_OVERHEAD = 1 + 2 + 64


def announcer(signed) -> bytes | None:
    """
    The peer id a signed announcement claims (not verified: the registry
    has done that before anyone relies on it).
    """
    try:
        return peer_id_for(parse_record(signed["record"]).public_key)
    except (ParseError, ValueError):
        return None


@dataclass
class Rumour:
    signed: dict
    hops: int
    left: int

    @property
    def size(self) -> int:
        return _ENTRY_OVERHEAD + len(self.signed["record"])


class Gossip:
    log = Logger()

    def __init__(self, overlay, rng: random.Random | None = None):
        self.overlay = overlay
        self.config = overlay.config
        self.rng = rng or random.Random()
        self.rumours: dict[bytes, Rumour] = {}
        self._sequence = int(overlay.clock.seconds() * 1000)
        self._own: dict | None = None
        self._own_fields: tuple | None = None
        self._full_sent: dict[bytes, float] = {}

    # origination

    def own_announcement(self) -> dict:
        """
        This node's current signed announcement (re-signed when what it says
        changed).
        """
        overlay = self.overlay
        node = overlay.node
        paths = [
            {"kind": PathKind.DIRECT, "endpoint": endpoint, "via": bytes(16)}
            for endpoint in overlay.own_endpoints()
        ] + overlay.own_relayed_paths()
        nat_type = 0 if node.nat is None else int(node.nat.nat_type)
        fields = (node.name, nat_type, int(node.capabilities), tuple(
            (p["kind"], p["endpoint"], p["via"]) for p in paths), tuple(node.resources.items()))
        if self._own is None or fields != self._own_fields:
            self._sequence = max(self._sequence + 1, int(overlay.clock.seconds() * 1000))
            self._own_fields = fields
            self._own = sign_announcement(
                node.identity,
                overlay.network_id,
                {
                    "name": node.name,
                    "sequence": self._sequence,
                    "timestamp_ms": int(overlay.clock.seconds() * 1000),
                    "ttl_s": self.config.announce_ttl,
                    "nat_type": nat_type,
                    "capabilities": int(node.capabilities),
                    "paths": paths,
                    "resources": dict(node.resources),
                },
            )
            self.rumours[node.identity.peer_id] = Rumour(self._own, 0, self._limit())
        return self._own

    def reannounce(self) -> None:
        """
        Periodic: a fresh sequence number and timestamp, spread as a rumour.
        """
        self._own = None
        self.own_announcement()

    def announce_to(self, address) -> None:
        self.overlay.send(address, MessageType.ANNOUNCE, hops=0,
                          announcement=self.own_announcement())

    # receiving

    def accept(self, signed, hops: int, sender: bytes | None = None) -> str:
        overlay = self.overlay
        outcome = overlay.registry.accept(signed, overlay.clock.seconds())
        overlay.metrics.inc("gossip_announcements", outcome=str(outcome.value))
        if outcome in (Outcome.NEW, Outcome.UPDATED):
            record = overlay.registry.get(announcer(signed))
            link = overlay.liveness.links.get(record.peer_id)
            if outcome is Outcome.NEW and link is not None and link.established:
                # We talked to it before its announcement arrived.
                overlay.registry.heard_from(record.peer_id, link.address, link.last_heard)
                overlay.registry.set_rtt(record.peer_id, link.rtt)
            if outcome is Outcome.NEW:
                overlay.events.emit("peer_discovered", network=overlay.network_id,
                                    peer_id=record.peer_id)
            if hops + 1 < self.config.gossip_hop_limit:
                self.rumours[record.peer_id] = Rumour(signed, hops + 1, self._limit())
        return outcome

    def on_announce(self, frame, addr, message) -> None:
        signed = message.announcement
        outcome = self.accept(signed, message.hops)
        if outcome in (Outcome.NEW, Outcome.UPDATED, Outcome.DUPLICATE):
            if announcer(signed) == frame.sender:
                self.overlay.bootstrap_answered(addr, frame.sender)

    def on_peer_list(self, frame, addr, message) -> None:
        for entry in message.announcements:
            outcome = self.accept(entry.announcement, entry.hops)
            if outcome in (Outcome.NEW, Outcome.UPDATED, Outcome.DUPLICATE):
                if announcer(entry.announcement) == frame.sender:
                    self.overlay.bootstrap_answered(addr, frame.sender)
        if message.request:
            if self.overlay.liveness.verified(frame.sender, addr):
                last = self._full_sent.get(frame.sender)
                now = self.overlay.clock.seconds()
                if last is None or now - last >= self.config.peer_list_interval:
                    self.send_peer_list(addr, request=False, peer_id=frame.sender)
            else:
                # Unproven address: our list goes out when our own ping to it
                # is answered (Overlay.link_verified), not on request.
                self.overlay.metrics.inc("drops", reason="peer_list_unverified")

    # sending

    def send_peer_list(self, address, request: bool, peer_id: bytes | None = None) -> None:
        """
        Everything this node knows (its own announcement first), in as many
        PEER_LIST datagrams as it takes.  Only ever sent to addresses a pong
        has proven.
        """
        if peer_id is not None:
            self._full_sent[peer_id] = self.overlay.clock.seconds()
            while len(self._full_sent) > self.config.proven_memory:
                self._full_sent.pop(next(iter(self._full_sent)))
        entries = [Rumour(self.own_announcement(), 0, 0)]
        entries += [Rumour(r.signed, 1, 0) for r in self.overlay.registry.all() if r.signed]
        batch, size = [], 0
        for entry in entries:
            if batch and size + entry.size > PEER_LIST_BUDGET:
                self._send_batch(address, batch, request)
                batch, size, request = [], 0, False
            batch.append(entry)
            size += entry.size
        self._send_batch(address, batch, request)

    def _send_batch(self, address, batch, request: bool) -> None:
        self.overlay.send(
            address,
            MessageType.PEER_LIST,
            request=request,
            announcements=[{"hops": r.hops, "announcement": r.signed} for r in batch],
        )

    def sync(self) -> None:
        """
        Anti-entropy: every C{sync_interval}, a full peer-list exchange with
        one random proven active peer, so a node that no rumour reached (or
        that missed some) catches up.
        """
        targets = self.overlay.liveness.gossip_targets(1, self.rng)
        for peer_id, address in targets:
            self.send_peer_list(address, request=True, peer_id=peer_id)

    def round(self) -> None:
        """
        One gossip round: the pending rumours to C{fanout} random active peers.
        """
        if not self.rumours:
            return
        targets = self.overlay.liveness.gossip_targets(self.config.fanout, self.rng)
        if not targets:
            return
        for peer_id, address in targets:
            batch, size = [], 0
            for origin, rumour in sorted(self.rumours.items(), key=lambda kv: -kv[1].left):
                if origin == peer_id:
                    continue
                if size + rumour.size > PEER_LIST_BUDGET:
                    break
                batch.append(rumour)
                size += rumour.size
            if batch:
                self._send_batch(address, batch, False)
                for rumour in batch:
                    rumour.left -= 1
        self.rumours = {k: r for k, r in self.rumours.items() if r.left > 0}

    def _limit(self) -> int:
        n = len(self.overlay.registry) + 1
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))
