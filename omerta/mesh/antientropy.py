"""
Digest-based anti-entropy: how two members find the records one of them
missed without sending each other everything.

Every C{sync_interval} a node sends one random proven active peer a
SYNC_DIGEST: who it holds alive, as B bucket hashes (B a power of two, about
one bucket per 16 records, at most 256; each the XOR of a hash of (peer id,
sequence) of the live records whose id's first byte is that bucket modulo
B, this node's own record included; L{PeerRegistry.digest} keeps them as
records change).  In step, nothing more is sent: 4 bytes per bucket, at
most ~1 KB, whatever the size of the network.

Otherwise the receiver answers with a SYNC_SUMMARY of up to
L{SUMMARY_BUCKETS} differing buckets chosen at random: (peer id, sequence)
of each live record in them, whole buckets per datagram (C{indices} lists
the buckets a datagram holds completely).  The first node then sends the
records the other lacks or holds older (a PEER_LIST), tells it of the peers
it holds alive that are known dead here (a MEMBERSHIP notice), and asks
for the records it lacks itself (a SYNC_SUMMARY whose C{want} lists them),
which come back as a PEER_LIST.  Every answer goes only to an address a
pong proved to be the sender's, so none can be reflected at a stranger.

When more than half of the buckets differ, or the sender's digest is four
times narrower than ours (a node that is starting, or one back from a long
partition), a few buckets per exchange would take minutes: the receiver
sends its live records instead, as a peer list, at most once per
L{FULL_LIST_INTERVAL} to the same peer.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any, Callable

from omerta.mesh.context import Basics
from omerta.mesh.registry import DIGEST_LEAVES, PeerRegistry, PeerState
from omerta.wire.messages import MessageType

SUMMARY_BUCKETS = 4
"""Differing buckets summarised per digest received."""

SUMMARY_ENTRIES = 44
"""(peer id, sequence) entries per SYNC_SUMMARY datagram (24 bytes each)."""

WANT_MAX = 40
"""Records asked for, or sent, per summary."""

FULL_LIST_INTERVAL = 30.0
"""A peer whose digest differs in most buckets gets our whole list at most this often."""


def bucket_count(records: int) -> int:
    """
    The digest width for a registry of C{records}: a power of two, about
    one bucket per 16 records, between 1 and L{DIGEST_LEAVES}.
    """
    buckets = 1
    while buckets * 16 < records and buckets < DIGEST_LEAVES:
        buckets *= 2
    return buckets


class AntiEntropy:
    def __init__(
        self,
        basics: Basics,
        registry: PeerRegistry,
        *,
        own_sequence: Callable[[], int],
        targets: Callable[[int, random.Random], list[tuple[bytes, Any]]],
        verified: Callable[[bytes, Any], bool],
        send_records: Callable[[Any, list], None],
        tell_gone: Callable[[bytes, Any], None],
        rng: random.Random | None = None,
    ):
        """
        @param own_sequence: the sequence of this node's announcement.
        @param targets: C{targets(count, rng)}: random proven active peers.
        @param verified: C{verified(peer_id, address)}: whether a pong
            proved the address is the peer's.
        @param send_records: C{send_records(address, records)}: send these
            registry records (and this node's own announcement) as a
            PEER_LIST.
        @param tell_gone: C{tell_gone(peer_id, address)}: tell the address
            that a peer is known dead here.
        """
        self.basics = basics
        self.metrics = basics.metrics
        self.me = basics.peer_id
        self.registry = registry
        self._own_sequence = own_sequence
        self._targets = targets
        self._verified = verified
        self._send_records = send_records
        self._tell_gone = tell_gone
        self.rng = rng or random.Random()
        self._full_sent: OrderedDict[bytes, float] = OrderedDict()

    def _own(self) -> tuple[tuple[bytes, int]]:
        return ((self.me, self._own_sequence()),)

    def sync(self) -> None:
        """
        Periodic: our digest to one random proven active peer.
        """
        buckets = bucket_count(len(self.registry) + 1)
        for _, address in self._targets(1, self.rng):
            self.basics.send(address, MessageType.SYNC_DIGEST, buckets=buckets,
                             hashes=self.registry.digest(buckets, self._own()))

    def _proven(self, frame, addr, buckets: int) -> bool:
        if not self._verified(frame.sender, addr):
            self.metrics.inc("drops", reason="sync_unverified")
            return False
        if buckets < 1 or buckets > DIGEST_LEAVES or buckets & (buckets - 1):
            self.metrics.inc("drops", reason="sync_malformed")
            return False
        return True

    def on_digest(self, frame, addr, message) -> None:
        buckets = message.buckets
        if not self._proven(frame, addr, buckets):
            return
        if len(message.hashes) != buckets:
            self.metrics.inc("drops", reason="sync_malformed")
            return
        ours = self.registry.digest(buckets, self._own())
        differ = [i for i in range(buckets) if ours[i] != message.hashes[i]]
        if not differ:
            self.metrics.inc("sync_digests", outcome="in_step")
            return
        far_apart = (2 * len(differ) > buckets >= 8
                     or bucket_count(len(self.registry) + 1) >= 4 * buckets)
        if far_apart and self._full_list_due(frame.sender):
            self.metrics.inc("sync_digests", outcome="far_apart")
            self._send_records(addr, self.registry.live())
            return
        self.metrics.inc("sync_digests", outcome="differ")
        chosen = self.rng.sample(differ, min(SUMMARY_BUCKETS, len(differ)))
        self._summarise(addr, buckets, chosen)

    def _full_list_due(self, peer_id: bytes) -> bool:
        now = self.basics.clock.seconds()
        if now - self._full_sent.get(peer_id, float("-inf")) < FULL_LIST_INTERVAL:
            return False
        self._full_sent[peer_id] = now
        self._full_sent.move_to_end(peer_id)
        while len(self._full_sent) > self.basics.config.proven_memory:
            self._full_sent.popitem(last=False)
        return True

    def _summarise(self, address, buckets: int, indices: list[int]) -> None:
        """
        The live records of C{indices}, whole buckets per datagram (a bucket
        too large for one is sent in part and not listed as complete).
        """
        me, sequence = self._own()[0]
        complete: list[int] = []
        entries: list[dict] = []
        for index in sorted(indices):
            bucket = [{"peer": r.peer_id, "sequence": r.sequence}
                      for r in self.registry.bucket(index, buckets)]
            if me[0] % buckets == index:
                bucket.append({"peer": me, "sequence": sequence})
            if entries and len(entries) + len(bucket) > SUMMARY_ENTRIES:
                self._send_summary(address, buckets, complete, entries, [])
                complete, entries = [], []
            if len(bucket) <= SUMMARY_ENTRIES:
                complete.append(index)
            entries.extend(bucket[:SUMMARY_ENTRIES])
        self._send_summary(address, buckets, complete, entries, [])

    def _send_summary(self, address, buckets, indices, entries, want) -> None:
        self.basics.send(address, MessageType.SYNC_SUMMARY, buckets=buckets,
                         indices=indices, entries=entries, want=want)

    def on_summary(self, frame, addr, message) -> None:
        buckets = message.buckets
        if not self._proven(frame, addr, buckets):
            return
        self._answer_wants(addr, [bytes(p) for p in message.want[:WANT_MAX]])
        theirs = {bytes(e.peer): e.sequence for e in message.entries}
        want, send = [], {}
        for peer_id, sequence in theirs.items():
            if peer_id == self.me:
                continue  # (our announcement goes with any list we send)
            record = self.registry.get(peer_id)
            if record is None or record.sequence < sequence:
                want.append(peer_id)
            elif record.state == PeerState.OFFLINE:
                self._tell_gone(peer_id, addr)
            elif record.sequence > sequence:
                send[peer_id] = record
        for index in message.indices:
            if index >= buckets:
                continue
            for record in self.registry.bucket(index, buckets):
                if record.peer_id not in theirs:
                    send[record.peer_id] = record
        if send or (self.me[0] % buckets in message.indices and self.me not in theirs):
            self.metrics.inc("sync_records_sent", len(send))
            self._send_records(addr, list(send.values())[:WANT_MAX])
        if want:
            self.metrics.inc("sync_records_wanted", len(want))
            self._send_summary(addr, buckets, [], [], want[:WANT_MAX])

    def _answer_wants(self, address, wanted: list[bytes]) -> None:
        records = []
        for peer_id in wanted:
            record = self.registry.get(peer_id)
            if record is None:
                continue
            if record.state == PeerState.OFFLINE:
                self._tell_gone(peer_id, address)
            else:
                records.append(record)
        if records:
            self._send_records(address, records)
