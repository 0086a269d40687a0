"""
Signed announcements and their dissemination in one network.

- Origination: the node signs its own announcement (sequence numbers only
  grow; a new one on every change and every C{reannounce} seconds) and sends
  it directly to peers it meets.
- Rumour mongering (as memberlist/SWIM do): an announcement this node learns
  that is new or newer becomes a rumour, sent every C{gossip_interval}
  seconds to up to C{fanout} active peers in PEER_LIST batches that fit one
  datagram, each rumour at most C{retransmit_mult * ceil(log10(n + 1))}
  times, and never beyond C{gossip_hop_limit} hops from its origin.  So the
  cost per node per second is bounded whatever the mesh size, and an
  announcement reaches everyone in O(log n) rounds.  Each rumour remembers
  the peers known to hold it (those that sent it to us, or that we sent it
  to): a round passes, in random order, the active peers that hold
  everything pending, so the transmissions go to peers that lack the
  rumour, and a rumour every active peer holds is done.  Without that, a
  peer with few links (one that just joined) is missed by all of them now
  and then and learns the news only from the next digest round.
- Peer-list exchange: on first contact with a peer (bootstrap included) the
  node sends everything it knows and asks for the same back.
- Duplicate suppression: a record whose (peer, sequence) the registry holds
  already is dropped before its signature is checked.
- Sybil bounds: a new identity is charged to the address it arrived from
  (the announcer itself, or the neighbour that passed it on), whatever hop
  count the frame claims; the registry refuses it beyond that source's
  budget (L{omerta.mesh.registry.SourceLimits}: C{source_rate},
  C{source_full}, counted as C{gossip_announcements{outcome=...}}) and what
  it refuses is never passed on.  Only the list this node asks for while it
  knows fewer than C{degree} peers (it is joining) is charged to nobody.
- Anti-entropy compares digests (L{omerta.mesh.antientropy}); this module
  sends the records it finds missing.
- The sequence number is this node's incarnation: L{Gossip.refute} signs a
  new announcement when a notice says this node is suspected or dead
  (L{omerta.mesh.membership}).  A record that arrives for a peer known
  dead here, under the sequence it died with, is answered with the news
  (C{gone_known}).

L{Gossip} is built with L{Basics} and its narrow collaborators (the
registry, what this node says of itself, callables for targets, proofs and
addresses), so it can be built alone on a C{Clock}; the wiring is in
L{omerta.mesh.overlay.Overlay}.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from twisted.logger import Logger

from omerta.crypto.announce import sign_announcement
from omerta.crypto.identity import Identity, peer_id_for
from omerta.mesh import rumours
from omerta.mesh.context import Basics
from omerta.mesh.registry import Outcome, PeerRegistry
from omerta.wire import ParseError
from omerta.wire.messages import parse_record
from omerta.wire.messages import MessageType, PathKind

# Size budget of one PEER_LIST datagram body (keeps frames under ~1200 B).
PEER_LIST_BUDGET = 1100
_ENTRY_OVERHEAD = 1 + 2 + 64
# how long after asking for a full list as a newcomer its answer is
# charged to nobody, and how many such requests are remembered
NEWCOMER_WINDOW = 30.0
NEWCOMER_REQUESTS = 64


def announcer(signed) -> bytes | None:
    """
    The peer id a signed announcement claims (not verified: the registry
    has done that before anyone relies on it).
    """
    try:
        return peer_id_for(parse_record(signed["record"]).public_key)
    except (ParseError, ValueError):
        return None


class Speaker(Protocol):
    """
    What this node says of itself in its announcement (the node satisfies
    it; read at every L{Gossip.own_announcement}, so changes show).
    """

    identity: Identity
    name: str
    nat: Any  # None, or has C{nat_type}
    capabilities: int
    resources: dict


class ActiveLink(Protocol):
    """
    What gossip reads of a peer in the active set.
    """

    established: bool
    address: Any
    last_heard: float
    rtt: float | None


@dataclass
class Rumour:
    signed: dict
    hops: int
    left: int
    # active peers known to hold it: they sent it to us, or we sent it to them
    told: set = field(default_factory=set)

    @property
    def size(self) -> int:
        return _ENTRY_OVERHEAD + len(self.signed["record"])


class Gossip:
    log = Logger()

    def __init__(
        self,
        basics: Basics,
        registry: PeerRegistry,
        me: Speaker,
        *,
        targets: Callable[[int, random.Random], list[tuple[bytes, Any]]],
        verified: Callable[[bytes, Any], bool],
        active_link: Callable[[bytes], ActiveLink | None],
        own_endpoints: Callable[[], list[tuple]],
        own_relayed_paths: Callable[[], list[dict]],
        bootstrap_answered: Callable[[tuple, bytes], None],
        gone_known: Callable[[bytes, Any], None] = lambda peer_id, address: None,
        rng: random.Random | None = None,
    ):
        """
        @param registry: the network's peer registry.
        @param me: what this node announces of itself.
        @param targets: C{targets(count, rng)}, up to C{count} random proven
            healthy active peers as (peer id, address).
        @param verified: C{verified(peer_id, address)}, whether a pong has
            proven the address leads to the peer.
        @param active_link: C{active_link(peer_id)}, the peer's link in the
            active set, or None.
        @param own_endpoints: this node's public endpoints.
        @param own_relayed_paths: this node's relayed paths (announcement
            path dicts).
        @param bootstrap_answered: C{bootstrap_answered(addr, peer_id)},
            called when a peer answers with its own announcement.
        @param gone_known: C{gone_known(peer_id, address)}: an address sent
            the record of a peer this node holds as gone (under the same or
            a newer sequence).
        """
        self.basics = basics
        self.config = basics.config
        self.clock = basics.clock
        self.registry = registry
        self.me = me
        self._targets = targets
        self._verified = verified
        self._active_link = active_link
        self._own_endpoints = own_endpoints
        self._own_relayed_paths = own_relayed_paths
        self._bootstrap_answered = bootstrap_answered
        self._gone_known = gone_known
        self.rng = rng or random.Random()
        self.rumours: dict[bytes, Rumour] = {}
        self._sequence = int(self.clock.seconds() * 1000)
        self._own: dict | None = None
        self._own_fields: tuple | None = None
        self._full_sent: dict[bytes, float] = {}
        self._asked: dict[Any, float] = {}  # address -> until when its list is ours to trust

    # origination

    def own_announcement(self) -> dict:
        """
        This node's current signed announcement (re-signed when what it says
        changed).
        """
        node = self.me
        paths = [
            {"kind": PathKind.DIRECT, "endpoint": endpoint, "via": bytes(16)}
            for endpoint in self._own_endpoints()
        ] + self._own_relayed_paths()
        nat_type = 0 if node.nat is None else int(node.nat.nat_type)
        fields = (node.name, nat_type, int(node.capabilities), tuple(
            (p["kind"], p["endpoint"], p["via"]) for p in paths), tuple(node.resources.items()))
        if self._own is None or fields != self._own_fields:
            self._sequence = max(self._sequence + 1, int(self.clock.seconds() * 1000))
            self._own_fields = fields
            self._own = sign_announcement(
                node.identity,
                self.basics.network_id,
                {
                    "name": node.name,
                    "sequence": self._sequence,
                    "timestamp_ms": int(self.clock.seconds() * 1000),
                    "ttl_s": self.config.announce_ttl,
                    "nat_type": nat_type,
                    "capabilities": int(node.capabilities),
                    "paths": paths,
                    "resources": dict(node.resources),
                },
            )
            self.rumours[node.identity.peer_id] = Rumour(self._own, 0, self._limit())
        return self._own

    @property
    def sequence(self) -> int:
        """The sequence (incarnation) of this node's current announcement."""
        self.own_announcement()
        return self._sequence

    def refute(self, address=None) -> None:
        """
        A notice says this node is suspected or dead: a newer announcement
        (it spreads as a rumour), also straight back to C{address}.
        """
        self.reannounce()
        if address is not None:
            self.announce_to(address)

    def reannounce(self) -> None:
        """
        Periodic: a fresh sequence number and timestamp, spread as a rumour.
        """
        self._own = None
        self.own_announcement()

    def announce_to(self, address) -> None:
        self.basics.send(address, MessageType.ANNOUNCE, hops=0,
                         announcement=self.own_announcement())

    # receiving

    def accept(self, signed, hops: int, sender: bytes | None = None, source=None) -> str:
        """
        Take an announcement into the registry and, if it is new or newer,
        make it a rumour.  C{source}: the address it arrived from, charged
        for a new identity (None charges nobody).
        """
        registry = self.registry
        outcome, peer_id = registry.accept_identified(signed, self.clock.seconds(), source=source)
        self.basics.metrics.inc("gossip_announcements", outcome=str(outcome.value))
        if outcome in (Outcome.DUPLICATE, Outcome.STALE):
            record = registry.get(peer_id)
            if record is not None and record.state == "offline" and source is not None:
                self._gone_known(record.peer_id, source)
            rumour = self.rumours.get(peer_id)
            if (outcome is Outcome.DUPLICATE and rumour is not None
                    and rumour.signed["record"] == signed["record"]):
                rumours.holds(rumour, sender)
        if outcome in (Outcome.NEW, Outcome.UPDATED):
            record = registry.get(peer_id)
            link = self._active_link(record.peer_id)
            if outcome is Outcome.NEW and link is not None and link.established:
                # We talked to it before its announcement arrived.
                registry.heard_from(record.peer_id, link.address, link.last_heard)
                registry.set_rtt(record.peer_id, link.rtt)
            if outcome is Outcome.NEW:
                self.basics.emit("peer_discovered", peer_id=record.peer_id)
            if hops + 1 < self.config.gossip_hop_limit:
                self.rumours[record.peer_id] = Rumour(
                    signed, hops + 1, self._limit(), {sender} if sender is not None else set())
        return outcome

    def on_announce(self, frame, addr, message) -> None:
        signed = message.announcement
        outcome = self.accept(signed, message.hops, sender=frame.sender, source=addr)
        if outcome in (Outcome.NEW, Outcome.UPDATED, Outcome.DUPLICATE):
            if announcer(signed) == frame.sender:
                self._bootstrap_answered(addr, frame.sender)

    def on_peer_list(self, frame, addr, message) -> None:
        asked = self._asked_for(addr)
        for entry in message.announcements:
            outcome = self.accept(entry.announcement, entry.hops, sender=frame.sender,
                                  source=None if asked else addr)
            if outcome in (Outcome.NEW, Outcome.UPDATED, Outcome.DUPLICATE):
                if announcer(entry.announcement) == frame.sender:
                    self._bootstrap_answered(addr, frame.sender)
        if message.request:
            if self._verified(frame.sender, addr):
                last = self._full_sent.get(frame.sender)
                now = self.clock.seconds()
                if last is None or now - last >= self.config.peer_list_interval:
                    self.send_peer_list(addr, request=False, peer_id=frame.sender)
            else:
                # Unproven address: our list goes out when our own ping to it
                # is answered (the overlay's address_proven), not on request.
                self.basics.metrics.inc("drops", reason="peer_list_unverified")

    # sending

    def _asked_for(self, address) -> bool:
        until = self._asked.get(address)
        if until is None:
            return False
        if until < self.clock.seconds():
            del self._asked[address]
            return False
        return True

    def send_peer_list(self, address, request: bool, peer_id: bytes | None = None,
                       records=None) -> None:
        """
        Everything this node knows (its own announcement first), or only
        C{records}, in as many PEER_LIST datagrams as it takes.  Only ever
        sent to addresses a pong has proven.  A request sent while this
        node knows fewer than C{degree} peers (it is joining) makes the
        answer from that address count as ours: charged to no source.
        """
        now = self.clock.seconds()
        if peer_id is not None:
            self._full_sent[peer_id] = now
            while len(self._full_sent) > self.config.proven_memory:
                self._full_sent.pop(next(iter(self._full_sent)))
        if request and len(self.registry) < self.config.degree:
            self._asked[address] = now + NEWCOMER_WINDOW
            while len(self._asked) > NEWCOMER_REQUESTS:
                self._asked.pop(next(iter(self._asked)))
        if records is None:
            records = self.registry.all()
        entries = [Rumour(self.own_announcement(), 0, 0)]
        entries += [Rumour(r.signed, 1, 0) for r in records if r.signed]
        batch, size = [], 0
        for entry in entries:
            if batch and size + entry.size > PEER_LIST_BUDGET:
                self._send_batch(address, batch, request)
                batch, size, request = [], 0, False
            batch.append(entry)
            size += entry.size
        self._send_batch(address, batch, request)

    def _send_batch(self, address, batch, request: bool) -> None:
        self.basics.send(
            address,
            MessageType.PEER_LIST,
            request=request,
            announcements=[{"hops": r.hops, "announcement": r.signed} for r in batch],
        )

    def round(self) -> None:
        """
        One gossip round: the pending rumours to C{fanout} random active peers.
        """
        if not self.rumours:
            return
        rumours.spread(
            self.rumours, self._targets(self.config.max_active, self.rng),
            fanout=self.config.fanout, budget=PEER_LIST_BUDGET, size=lambda r: r.size,
            send=lambda address, batch: self._send_batch(address, batch, False),
            skip=lambda origin, rumour, peer_id: origin == peer_id,
            holder=lambda origin: (origin,))

    def _limit(self) -> int:
        n = len(self.registry) + 1
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))
