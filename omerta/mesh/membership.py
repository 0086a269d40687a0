"""
Who is in the network and who is gone: SWIM's suspicion and dissemination,
with Lifeguard's refinements, on top of signed announcements.

- Incarnation: a peer's incarnation is the C{sequence} of its signed
  announcement.  Only the peer can sign a higher one, so only the peer can
  refute what is said of it, and nobody can refute in its name.
- Evidence: when neither this node nor the helpers it asked (indirect
  pings, L{omerta.mesh.liveness}) can reach a peer of its active set, this
  node I{suspects} it: a SUSPECT notice (peer, sequence, by this node).
- Suspicion: every node holding a suspicion of peer X under sequence s runs
  a timer.  Its length grows with the size of the network and shrinks with
  independent confirmations (Lifeguard): from C{suspicion_max_mult} times
  the minimum with one suspecter down to the minimum
  C{suspicion_mult * log10(n)} seconds once C{suspicion_confirmations} other
  nodes suspect it too.  When it fires, X is I{offline} (declared dead):
  its registry record says so, C{find_peers} no longer offers it, and a
  DEAD notice spreads.  A frame from X meanwhile clears this node's own
  suspicion (the registry marks it online).
- Dissemination: notices travel as rumours, like announcements (sent to up
  to C{fanout} active peers every C{gossip_interval}, each notice at most
  C{retransmit_mult * ceil(log10(n + 1))} times and only to peers not known
  to hold it: those it came from and those it went to), so everyone hears of a
  suspicion or a death in O(log n) rounds; a suspicion is also told to the
  suspect itself, when this node has a working link to it.
- Refutation: a node that hears it is suspected or dead under its current
  sequence signs a new announcement (a higher sequence), which spreads as
  a rumour and, by the registry's incarnation rule, clears the suspicion or
  death everywhere.  Refuting counts against this node's local health
  (L{omerta.mesh.liveness.Liveness.local_health}): a node that is itself
  slow or cut off suspects others more slowly (Lifeguard).
- Leaving: a node that stops cleanly sends a LEFT notice signed with its
  own key to its active peers; it spreads the same way, and it is gone at
  once for everyone who hears it.
- A peer declared offline is revived only by a newer announcement; a
  frame from it (it was only cut off) makes this node tell it it was
  declared dead, so it refutes.

Notices about unknown peers, or about another sequence than the one held,
are dropped: a notice never makes this node learn or believe more than the
signed announcements it holds.  Any member can still suspect any other (the
network key is shared): the suspect refutes, and the cost is bounded by the
rumour limits and L{MAX_SUSPICIONS}.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id, verify_signature
from omerta.mesh import rumours
from omerta.mesh.context import Basics
from omerta.mesh.registry import PeerRecord, PeerRegistry, PeerState
from omerta.wire.messages import MessageType, NoticeKind

LEAVE_LABEL = b"omerta leave v1\x00"

NOTICE_BUDGET = 1100
"""Bytes of notices per MEMBERSHIP datagram."""

MAX_SUSPICIONS = 1024
"""Suspicions held at once; beyond it new ones are refused (and counted)."""

MAX_RUMOURS = 512
"""Notices waiting to be spread; beyond it the oldest is dropped."""

TELL_INTERVAL = 5.0
"""A peer declared offline is told so at most this often per address."""


def leave_message(network_id: bytes, peer_id: bytes, sequence: int) -> bytes:
    return LEAVE_LABEL + network_id + peer_id + sequence.to_bytes(8, "big")


def notice(kind: NoticeKind, peer_id: bytes, sequence: int, by: bytes,
           signature: bytes = b"") -> dict:
    return {"kind": int(kind), "peer": peer_id, "sequence": sequence, "by": by,
            "signature": signature}


def _size(entry: dict) -> int:
    return 1 + 16 + 8 + 16 + 1 + len(entry["signature"])


@dataclass
class Suspicion:
    """
    A suspicion this node holds: of which incarnation, since when, and by
    whom (the first suspecter, then the confirmations, in order).
    """

    sequence: int
    since: float
    by: dict[bytes, None]


@dataclass
class _Rumour:
    entry: dict
    left: int
    # active peers known to hold it: they sent it to us, or we sent it to them
    told: set = field(default_factory=set)


class Membership:
    log = Logger()

    def __init__(
        self,
        basics: Basics,
        registry: PeerRegistry,
        *,
        own_sequence: Callable[[], int],
        refute: Callable[[Any], None],
        targets: Callable[[int, random.Random], list[tuple[bytes, Any]]],
        link_address: Callable[[bytes], Any],
        drop_link: Callable[[bytes], None],
        health: Callable[[int], None] = lambda change: None,
        rng: random.Random | None = None,
    ):
        """
        @param own_sequence: the sequence of this node's current announcement.
        @param refute: C{refute(address)}: sign a newer announcement (it
            spreads as a rumour) and send it to C{address} too.
        @param targets: C{targets(count, rng)}: up to C{count} random proven
            healthy active peers as (peer id, address).
        @param link_address: the address of a working, proven link to a
            peer, or None.
        @param drop_link: take a peer declared offline out of the active set.
        @param health: C{health(change)}: raise (+1) or lower (-1) this
            node's local health score.
        """
        self.basics = basics
        self.config = basics.config
        self.clock = basics.clock
        self.metrics = basics.metrics
        self.me = basics.peer_id
        self.registry = registry
        self._own_sequence = own_sequence
        self._refute = refute
        self._targets = targets
        self._link_address = link_address
        self._drop_link = drop_link
        self._health = health
        self.rng = rng or random.Random()
        self.suspicions: dict[bytes, Suspicion] = {}
        self.rumours: OrderedDict[tuple, _Rumour] = OrderedDict()
        self._told: OrderedDict[tuple, float] = OrderedDict()
        self._refuted_for = -1

    # evidence and timers

    def suspect(self, peer_id: bytes) -> None:
        """
        Neither this node nor its helpers could reach C{peer_id}.
        """
        record = self.registry.get(peer_id)
        if record is not None and record.state != PeerState.OFFLINE:
            self._suspect(record, self.me, self.clock.seconds())

    def _suspect(self, record: PeerRecord, by: bytes, now: float,
                 sender: bytes | None = None) -> None:
        held = self.suspicions.get(record.peer_id)
        if held is None or held.sequence != record.sequence:
            if len(self.suspicions) >= MAX_SUSPICIONS:
                self.metrics.inc("membership_refused", reason="suspicions_full")
                return
            self.suspicions[record.peer_id] = Suspicion(record.sequence, now, {by: None})
            self.registry.set_state(record.peer_id, "suspect", now)
            self.metrics.inc("membership_suspected", by="self" if by == self.me else "rumour")
            self.basics.emit("member_suspected", peer_id=record.peer_id)
            entry = notice(NoticeKind.SUSPECT, record.peer_id, record.sequence, by)
            self._spread(entry, sender)
            address = self._link_address(record.peer_id)
            if address is not None:
                # (Lifeguard's buddy system: the suspect hears it first-hand)
                self._send(address, [entry])
        elif by not in held.by and len(held.by) <= self.config.suspicion_confirmations:
            held.by[by] = None
            self.metrics.inc("membership_confirmations")
            self._spread(notice(NoticeKind.SUSPECT, record.peer_id, record.sequence, by), sender)
        else:
            rumours.holds(self.rumours.get((record.peer_id, NoticeKind.SUSPECT, by)), sender)

    def timeout(self, suspicion: Suspicion) -> float:
        """
        Seconds from C{suspicion.since} until the suspect is declared dead
        (Lifeguard: from C{max} with one suspecter down to C{min} with
        C{suspicion_confirmations} more, logarithmically).
        """
        config = self.config
        low = config.suspicion_mult * math.log10(max(len(self.registry) + 1, 10))
        high = config.suspicion_max_mult * low
        wanted = config.suspicion_confirmations
        confirmations = min(len(suspicion.by) - 1, wanted)
        if wanted <= 0:
            return low
        return max(low, high - (high - low) * math.log(confirmations + 1) / math.log(wanted + 1))

    def tick(self) -> None:
        """
        Periodic (every C{gossip_interval}): suspicions whose time is up.
        """
        now = self.clock.seconds()
        for peer_id, suspicion in list(self.suspicions.items()):
            record = self.registry.get(peer_id)
            if (record is None or record.sequence != suspicion.sequence
                    or record.state != PeerState.SUSPECT):
                # refuted, heard from, or forgotten meanwhile
                del self.suspicions[peer_id]
                continue
            if now - suspicion.since >= self.timeout(suspicion):
                self._gone(record, "failed", now)
                self._spread(notice(NoticeKind.DEAD, peer_id, record.sequence, self.me))

    def _gone(self, record: PeerRecord, reason: str, now: float,
              sequence: int | None = None) -> None:
        self.suspicions.pop(record.peer_id, None)
        self.registry.set_state(record.peer_id, "offline", now, gone=reason, sequence=sequence)
        self.metrics.inc("membership_gone", reason=reason)
        self.log.info("Peer {peer} is gone ({reason})", peer=format_peer_id(record.peer_id),
                      reason=reason)
        self.basics.emit("peer_gone", peer_id=record.peer_id, reason=reason)
        self._drop_link(record.peer_id)

    # notices

    def on_membership(self, frame, addr, message) -> None:
        now = self.clock.seconds()
        for entry in message.notices:
            self.heard_notice(entry, addr, now, frame.sender)

    def heard_notice(self, entry, addr, now: float, sender: bytes | None = None) -> None:
        """
        One notice, from C{addr} (member C{sender}, when known).
        """
        peer_id = bytes(entry.peer)
        if peer_id == self.me:
            self._about_me(entry, addr)
            return
        record = self.registry.get(peer_id)
        kind = entry.kind
        if record is None or entry.sequence < record.sequence or (
                entry.sequence > record.sequence and kind != NoticeKind.LEFT):
            # (a leave is signed by the peer: it may be under a sequence
            # whose announcement has not arrived here yet)
            self.metrics.inc("membership_notices", outcome="stale")
            return
        if record.state == PeerState.OFFLINE:
            self.metrics.inc("membership_notices", outcome="duplicate")
            # (the sender holds the news, whoever it names as the one who
            # declared it)
            for key in [k for k in self.rumours if k[0] == peer_id and k[1] == kind]:
                rumours.holds(self.rumours.get(key), sender)
            return
        if kind == NoticeKind.SUSPECT:
            self._suspect(record, bytes(entry.by), now, sender)
        elif kind == NoticeKind.DEAD:
            self._gone(record, "failed", now)
            self._spread(notice(NoticeKind.DEAD, peer_id, entry.sequence, bytes(entry.by)),
                         sender)
        elif kind == NoticeKind.LEFT:
            if not verify_signature(record.public_key, bytes(entry.signature), leave_message(
                    self.basics.network_id, peer_id, entry.sequence)):
                self.metrics.inc("membership_notices", outcome="bad_signature")
                return
            self._gone(record, "left", now, entry.sequence)
            self._spread(notice(NoticeKind.LEFT, peer_id, entry.sequence, bytes(16),
                                bytes(entry.signature)), sender)
        else:
            self.metrics.inc("membership_notices", outcome="unknown_kind")
            return
        self.metrics.inc("membership_notices", outcome="accepted")

    def _about_me(self, entry, addr) -> None:
        """
        A notice about this node: refute a suspicion or a death of the
        current incarnation (once per incarnation).
        """
        sequence = self._own_sequence()
        if entry.kind in (NoticeKind.SUSPECT, NoticeKind.DEAD) and entry.sequence >= sequence:
            if self._refuted_for == sequence:
                return
            self._refuted_for = sequence
            self.metrics.inc("membership_refuted")
            self.log.info("Refuting a {kind} notice about this node",
                          kind=NoticeKind(entry.kind).name.lower())
            self._health(+1)
            self._refute(addr)

    def tell(self, peer_id: bytes, address) -> None:
        """
        Tell C{address} that C{peer_id} was declared offline (it still holds
        it alive, or it is the peer itself, cut off for a while): at most
        once per L{TELL_INTERVAL} per (peer, address).
        """
        record = self.registry.get(peer_id)
        if record is None or record.state != PeerState.OFFLINE:
            return
        now = self.clock.seconds()
        key = (peer_id, address)
        if now - self._told.get(key, float("-inf")) < TELL_INTERVAL:
            return
        self._told[key] = now
        self._told.move_to_end(key)
        while len(self._told) > self.config.proven_memory:
            self._told.popitem(last=False)
        self.metrics.inc("membership_told")
        self._send(address, [notice(NoticeKind.DEAD, peer_id, record.sequence, self.me)])

    def leave(self) -> None:
        """
        This node stops cleanly: a signed LEFT notice to every active peer.
        """
        sequence = self._own_sequence()
        signature = self.basics.prover.identity.sign(
            leave_message(self.basics.network_id, self.me, sequence))
        entry = notice(NoticeKind.LEFT, self.me, sequence, bytes(16), signature)
        for _, address in self._targets(self.config.max_active, self.rng):
            self._send(address, [entry])

    # dissemination

    def _spread(self, entry: dict, sender: bytes | None = None) -> None:
        key = (entry["peer"], entry["kind"], entry["by"])
        n = len(self.registry) + 1
        limit = self.config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))
        self.rumours[key] = _Rumour(entry, limit, {sender} if sender is not None else set())
        self.rumours.move_to_end(key)
        while len(self.rumours) > MAX_RUMOURS:
            self.rumours.popitem(last=False)
            self.metrics.inc("membership_refused", reason="rumours_full")

    def round(self) -> None:
        """
        One gossip round of notices: the active peers in random order, each
        sent the pending notices it is not known to hold (never a LEFT to
        the peer it is about), until C{fanout} were sent something.  A
        notice every active peer holds is done.
        """
        self.tick()
        if not self.rumours:
            return
        rumours.spread(
            self.rumours, self._targets(self.config.max_active, self.rng),
            fanout=self.config.fanout, budget=NOTICE_BUDGET, size=lambda r: _size(r.entry),
            send=lambda address, batch: self._send(address, [r.entry for r in batch]),
            skip=lambda key, rumour, peer_id: (rumour.entry["peer"] == peer_id
                                               and rumour.entry["kind"] == NoticeKind.LEFT),
            holder=lambda key: (key[0],))

    def _send(self, address, entries: list[dict]) -> None:
        self.basics.send(address, MessageType.MEMBERSHIP, notices=entries)
