"""
The peer registry of one network: every peer known by a verified, unexpired
signed announcement, with what this node has learnt about it since (liveness
state, last direct endpoint, round-trip time, reputation).

Pure logic: nothing here reads a clock, a socket or a timer.  Every method
that depends on time takes C{now}, a float in seconds on the same clock the
caller uses everywhere else (the reactor's C{seconds()}).  The only I/O is the
explicit L{PeerRegistry.save} / L{PeerRegistry.load} of a JSON state file.
With an C{events} bus (L{omerta.mesh.events.Events}) it emits
C{peer_changed(network, peer_id, change)} whenever a record is added or
replaced (C{change="announcement"}), its liveness state or round-trip time
changes (C{"state"}, C{"rtt"}) or it is dropped (C{"removed"}), so a waiter
can re-check on the change instead of polling.

Rules applied to an incoming announcement (L{PeerRegistry.accept}), in order
(a record whose peer and sequence number are already held, or older, is
settled as C{duplicate} / C{stale} first, before its signature is checked:
gossip delivers each record many times and a check costs ~90 us):

 1. it must be a C{SignedAnnouncement} the wire format can carry (record of at
    most 65535 bytes, 64-byte signature) whose record parses: else
    C{malformed};
 2. the signature must verify for this network: else C{bad_signature};
 3. its name, if any, must be a valid node name (which is never shaped like a
    peer id): else C{malformed};
 4. our own announcement coming back is C{own};
 5. C{timestamp_ms + ttl_s} must lie in the future and C{timestamp_ms} no
    further than C{clock_skew_s} ahead of C{now}: else C{expired}; a record
    is kept for at most C{max_ttl_s} after it arrives, whatever TTL it
    claims (a member cannot make its records, or thousands of invented
    identities, live for years);
 6. against the record held for the same peer: the same sequence is a
    C{duplicate} (what gossip uses to stop forwarding), a lower one is
    C{stale};
 7. a name belongs to the first key that announced it for as long as that
    key's record is unexpired (names compare case-insensitively, so
    C{Provider-1} cannot shadow C{provider-1}): else C{name_taken}; once it
    has expired, the new key's record is stored and the expired one
    dropped, but the name's first key is remembered (C{name_memory_s} after
    its last announcement, saved with the peers): when it comes back it is
    accepted and the name resolves to it again, and while it is away a
    newcomer's claim makes the name ambiguous (L{PeerRegistry.lookup}), so
    a newcomer can never take a name over;
 8. a new peer announced from a C{source} address (what the gossip layer
    passes) is charged to that source: each source address and each source
    IP has a token bucket of new identities (L{SourceLimits}), and the
    records a source IP introduced that are still held are capped: else
    C{source_rate} / C{source_full}, settled before the signature check;
 9. a new peer when C{max_peers} records are held evicts the newest
    never-contacted record of the source IP holding the most records, if
    that source holds more than the newcomer's own; else it is C{full}.
    Peers this node heard from, or learnt without a source (loaded, or a
    list it asked for as a newcomer), are never evicted by newcomers;
10. otherwise the record is stored: C{new} or C{updated}.

The sequence number is the peer's incarnation (SWIM): a newer announcement
refutes whatever was believed of an older one, so a peer C{suspect} or
C{offline} (declared dead, or left) under sequence C{s} is alive again
(C{unknown} until heard from) once an announcement above C{s} is accepted,
and only then: a frame from a peer declared offline does not revive it
(L{omerta.mesh.membership} asks the peer to refute instead).

A digest of who is alive (L{PeerRegistry.digest}: 256 buckets by the first
byte of the peer id, each the XOR of a 64-bit hash of (peer id, sequence)
of its live records, folded to fewer buckets on request) is kept as records
change, so the digest-based anti-entropy costs O(buckets), not O(records).

Periodic work costs nothing per idle record: expiry pops a heap, offline
clean-up reads an index of offline peers in the order they went offline,
the statistics are counters kept as records change, L{PeerRegistry.save}
writes only when something it writes changed, and
L{PeerRegistry.sample} picks records without listing them all, and the
anti-entropy digest is kept as records change.

Reputation is an exponentially weighted moving average in [0, 1], see
L{PeerRegistry.record_outcome}.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import heapq
import ipaddress
import json
import math
import os
import random
import time
import types
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from twisted.logger import Logger

from omerta import storage
from omerta.addressing import Endpoint
from omerta.crypto.announce import AnnouncementError, open_announcement
from omerta.crypto.identity import (
    IdentityError,
    peer_id_for,
    format_peer_id,
    is_peer_id_text,
    validate_name,
)
from omerta.wire import ParseError
from omerta.wire.codec import NO_PEER
from omerta.wire.messages import parse_record
from omerta.wire.messages import Capability, NatType, PathKind

Address = tuple[str, int]

STATE_VERSION = 1
MAX_RECORD_SIZE = 0xFFFF
SIGNATURE_SIZE = 64
MIN_PREFIX = 4
INITIAL_REPUTATION = 0.5
DIGEST_LEAVES = 256
"""Buckets of the live-record digest (by the first byte of the peer id)."""


def digest_hash(peer_id: bytes, sequence: int) -> int:
    """
    The 64-bit hash of one live record in the digest.
    """
    return int.from_bytes(hashlib.blake2b(peer_id + sequence.to_bytes(8, "big"),
                                          digest_size=8).digest(), "big")


class Outcome(enum.StrEnum):
    """
    What L{PeerRegistry.accept} did with an announcement.  Each value is a
    lowercase token fit for a metrics label (C{outcome=...}).
    """

    NEW = "new"
    UPDATED = "updated"
    DUPLICATE = "duplicate"
    STALE = "stale"
    EXPIRED = "expired"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    NAME_TAKEN = "name_taken"
    OWN = "own"
    FULL = "full"
    SOURCE_RATE = "source_rate"
    SOURCE_FULL = "source_full"


ACCEPTED = frozenset({Outcome.NEW, Outcome.UPDATED})
"""
The outcomes after which the registry holds the announcement as its newest:
the ones worth passing on to other peers.
"""


class PeerState(enum.StrEnum):
    """
    What this node believes about a peer's liveness.

    C{unknown}: known only from an announcement (gossip, or loaded from the
    state file); never heard from directly since.
    """

    ONLINE = "online"
    SUSPECT = "suspect"
    OFFLINE = "offline"
    UNKNOWN = "unknown"


class PeerNotFound(LookupError):
    """
    No peer matches a reference (id, id prefix or name).
    """


class AmbiguousPeer(LookupError):
    """
    A reference matches several peers; C{candidates} lists them as
    C{(hex id, name)} pairs.
    """

    def __init__(self, ref: str, candidates: list[tuple[str, str]], why: str = ""):
        shown = ", ".join(f"{pid} ({name})" if name else pid for pid, name in candidates)
        why = why or f"{ref!r} matches {len(candidates)} peers"
        super().__init__(f"{why}: {shown}; give more digits of the peer id")
        self.ref = ref
        self.candidates = candidates


@dataclass(frozen=True, slots=True)
class Resources:
    """
    What a peer announces it offers.
    """

    cpu_cores: int = 0
    memory_mb: int = 0
    disk_gb: int = 0
    gpus: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "cpu_cores": self.cpu_cores,
            "memory_mb": self.memory_mb,
            "disk_gb": self.disk_gb,
            "gpus": self.gpus,
        }


@dataclass(frozen=True, slots=True)
class Requirements:
    """
    Minimums for L{PeerRegistry.find_peers}: announced resources at least
    these, every bit of C{capabilities} set, and (by default) online.
    """

    cpu_cores: int = 0
    memory_mb: int = 0
    disk_gb: int = 0
    gpus: int = 0
    capabilities: int = 0
    online_only: bool = True

    def met_by(self, peer: PeerRecord) -> bool:
        r = peer.resources
        return (
            r.cpu_cores >= self.cpu_cores
            and r.memory_mb >= self.memory_mb
            and r.disk_gb >= self.disk_gb
            and r.gpus >= self.gpus
            and peer.capabilities & self.capabilities == self.capabilities
            and (not self.online_only or peer.state == PeerState.ONLINE)
        )


PathEntry = tuple[int, Address, "bytes | None"]


@dataclass(slots=True, eq=False)
class PeerRecord:
    """
    One peer of the network, as its latest accepted announcement describes it
    plus what this node observed.

    C{signed} is the C{SignedAnnouncement} value exactly as received
    (C{{"record": bytes, "signature": bytes}}), so it can be gossiped on and
    verified again.  C{expires_at} is the receipt time plus the TTL, capped by
    the announcement's own timestamp plus the TTL.
    """

    peer_id: bytes
    public_key: bytes
    name: str
    sequence: int
    timestamp_ms: int
    ttl_s: int
    expires_at: float
    nat_type: int
    capabilities: int
    paths: list[PathEntry]
    resources: Resources
    signed: dict[str, bytes]
    first_seen: float
    state: PeerState = PeerState.UNKNOWN
    state_since: float = 0.0
    last_heard: float | None = None
    endpoint: Address | None = None
    rtt: float | None = None
    reputation: float = INITIAL_REPUTATION
    learned_via: bytes | None = None
    source: str | None = None  # the source IP key that introduced it (None: none charged)
    gone: str | None = None  # while offline: "failed" (declared dead) or "left"
    gone_sequence: int = 0  # while offline: only an announcement above it revives

    @property
    def peer_id_text(self) -> str:
        return format_peer_id(self.peer_id)

    def expired(self, now: float) -> bool:
        return self.expires_at <= now

    def as_dict(self, now: float) -> dict[str, Any]:
        """
        JSON-ready view for the status file and the CLI; field names are
        stable.
        """
        return {
            "peer_id": self.peer_id_text,
            "public_key": self.public_key.hex(),
            "name": self.name,
            "sequence": self.sequence,
            "timestamp_ms": self.timestamp_ms,
            "ttl_s": self.ttl_s,
            "expires_in_s": round(self.expires_at - now, 3),
            "nat_type": _enum_name(NatType, self.nat_type),
            "capabilities": capability_names(self.capabilities),
            "paths": [
                {
                    "kind": _enum_name(PathKind, kind),
                    "endpoint": str(Endpoint(*address)),
                    "via": None if via is None else format_peer_id(via),
                }
                for kind, address, via in self.paths
            ],
            "resources": self.resources.as_dict(),
            "state": str(self.state),
            "gone": self.gone,
            "state_for_s": round(now - self.state_since, 3),
            "endpoint": None if self.endpoint is None else str(Endpoint(*self.endpoint)),
            "last_heard_ago_s": None if self.last_heard is None else round(now - self.last_heard, 3),
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "reputation": round(self.reputation, 4),
            "first_seen_ago_s": round(now - self.first_seen, 3),
            "learned_via": None if self.learned_via is None else format_peer_id(self.learned_via),
        }


def capability_names(flags: int) -> list[str]:
    """
    The lowercase names of the capability bits set in C{flags}.
    """
    return [cap.name.lower() for cap in Capability if cap and flags & cap]


def _enum_name(kind: type[enum.IntEnum], value: int) -> str | int:
    try:
        return kind(value).name.lower()
    except ValueError:
        return value


def _name_key(name: str) -> str:
    return name.casefold()


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """
    How many new identities one source may introduce into the registry.

    A source is the address an announcement arrived from (the announcer
    itself, or the neighbour that passed it on): its IP (for a relayed
    frame, the relay session) and its (IP, port).  Each has a token bucket
    of new identities: C{*_burst} at once, refilled at C{*_per_minute}.  The
    records introduced by one IP that are still held are capped at
    C{max_per_ip}.  Updates of peers already held cost nothing.  At most
    C{sources_kept} buckets are kept (least recently used dropped: a
    dropped bucket starts full again).
    """

    address_burst: int = 32
    address_per_minute: float = 12.0
    ip_burst: int = 64
    ip_per_minute: float = 30.0
    max_per_ip: int = 1000
    sources_kept: int = 4096


def source_keys(source) -> tuple[str, str]:
    """
    The (IP key, address key) a source address is charged under: a
    (host, port) pair gives its host and C{host:port}; a relay route (a
    3-tuple with the session header) is one source of its own.
    """
    if len(source) == 3:
        host, port, header = source
        key = f"relay {host}:{port} {bytes(header).hex()}"
        return key, key
    host, port = source[0], source[1]
    return str(host), f"{host}:{port}"


class _Buckets:
    """
    Token buckets by key, least recently used dropped beyond C{kept}.
    """

    def __init__(self, burst: float, per_minute: float, kept: int):
        self.burst = burst
        self.rate = per_minute / 60.0
        self.kept = kept
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def level(self, key: str, now: float) -> float:
        tokens, stamp = self._state.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - stamp) * self.rate)

    def take(self, key: str, now: float) -> None:
        self._state[key] = (self.level(key, now) - 1, now)
        self._state.move_to_end(key)
        while len(self._state) > self.kept:
            self._state.popitem(last=False)


class PeerRegistry:
    """
    The verified peers of one network.

    @param network_id: the 8-byte id of the network; announcements are
        verified against it.
    @param own_peer_id: this node's peer id; its announcements are C{own}.
    @param max_peers: the most records held; a new peer beyond it is C{full}.
    @param clock_skew_s: how far in the future an announcement's timestamp
        may be.
    @param reputation_alpha: weight of the newest outcome in the reputation
        average.
    @param slow_latency_s: the latency at which a success counts half.
    @param limits: the bounds on new identities per source (L{SourceLimits}).
    @param name_memory_s: how long the first key of a name is remembered
        after its last announcement.
    """

    log = Logger()

    def __init__(
        self,
        network_id: bytes,
        own_peer_id: bytes,
        max_peers: int = 10000,
        clock_skew_s: float = 300,
        *,
        max_ttl_s: float = 7200,
        reputation_alpha: float = 0.1,
        slow_latency_s: float = 10.0,
        limits: SourceLimits | None = None,
        name_memory_s: float = 86400.0,
        events=None,
    ) -> None:
        if max_peers < 0:
            raise ValueError("max_peers must not be negative")
        if not 0 < reputation_alpha <= 1:
            raise ValueError("reputation_alpha must be in (0, 1]")
        if slow_latency_s <= 0:
            raise ValueError("slow_latency_s must be positive")
        self.network_id = network_id
        self.own_peer_id = own_peer_id
        self.max_peers = max_peers
        self.clock_skew_s = clock_skew_s
        self.max_ttl_s = max_ttl_s
        self.reputation_alpha = reputation_alpha
        self.slow_latency_s = slow_latency_s
        self._peers: dict[bytes, PeerRecord] = {}
        self._damaged: set[Path] = set()  # damaged files that could not be moved aside
        # name key -> the peers holding it (normally one; two while a
        # remembered first key is back and a newcomer's record lives on)
        self._names: dict[str, dict[bytes, None]] = {}
        # name key -> [first key, since, last announced]: who a name belongs to
        self._claims: OrderedDict[str, list] = OrderedDict()
        self.name_memory_s = name_memory_s
        self.events = events
        self.limits = limits or SourceLimits()
        self._ip_buckets = _Buckets(self.limits.ip_burst, self.limits.ip_per_minute,
                                    self.limits.sources_kept)
        self._address_buckets = _Buckets(self.limits.address_burst,
                                         self.limits.address_per_minute,
                                         self.limits.sources_kept)
        self._introduced: dict[str, dict[bytes, None]] = {}  # source IP -> peers it introduced
        self.evicted = 0
        # what periodic work reads, kept as records change (nothing scans)
        self._expiry: list[tuple[float, int, bytes, PeerRecord]] = []
        self._heap_counter = 0
        self._offline: dict[bytes, float] = {}  # offline peers, in the order they went offline
        self._order: list[bytes] = []  # peer ids, for sampling without listing
        self._index: dict[bytes, int] = {}
        self._state_counts: Counter = Counter()
        # live records by digest bucket, and each bucket's XOR of hashes
        self._leaves = [0] * DIGEST_LEAVES
        self._live: list[dict[bytes, None]] = [{} for _ in range(DIGEST_LEAVES)]
        self._capability_counts: Counter = Counter()
        self._version = 0  # grows when anything save() writes changes
        self._saved: tuple[int, bytes] | None = None  # (version, the file's bytes)
        self.work = 0  # records touched by periodic methods (a cost counter for tests)

    def _changed(self, peer_id: bytes, change: str) -> None:
        if self.events is not None:
            self.events.emit("peer_changed", network=self.network_id, peer_id=peer_id,
                             change=change)

    # -- announcements -----------------------------------------------------

    def accept(self, signed, now: float, via: bytes | None = None, source=None) -> Outcome:
        """
        Verify an announcement nobody has checked yet and apply the rules in
        the module docstring.

        @param signed: a C{SignedAnnouncement} value: a parsed construct
            Container or a dict with C{record} and C{signature} bytes.
        @param via: the neighbour that passed it on (gossip), or None when it
            came from the announcer itself.  Accepting never marks a peer
            online: that takes a direct frame (L{heard_from}).
        @param source: the address (or relay route) the announcement arrived
            from, charged for a new peer (L{SourceLimits}); None charges
            nobody (a state file, a list this node asked for as a newcomer).
        """
        return self._accept(signed, now, via, source)[0]

    def accept_identified(self, signed, now: float, via: bytes | None = None,
                          source=None) -> tuple[Outcome, bytes | None]:
        """
        L{accept}, also returning the announcer's id: once the signature
        has been verified, or for a duplicate or stale record the id of the
        peer held (None when refused before either).
        """
        return self._accept(signed, now, via, source)

    def _accept(self, signed, now: float, via: bytes | None,
                source=None) -> tuple[Outcome, bytes | None]:
        """
        L{accept_identified}.
        """
        raw = _signed_value(signed)
        if raw is None:
            return Outcome.MALFORMED, None
        # Gossip delivers each record many times: a (peer, sequence) already
        # held is settled before the ~90 us signature check.  A forgery that
        # reuses a held sequence number is dropped just the same.
        try:
            claimed = parse_record(raw["record"])
        except ParseError:
            return Outcome.MALFORMED, None
        held = self._peers.get(peer_id_for(claimed.public_key))
        if held is not None and claimed.sequence <= held.sequence:
            duplicate = claimed.sequence == held.sequence
            return (Outcome.DUPLICATE if duplicate else Outcome.STALE), held.peer_id
        keys = None
        if held is None and source is not None:
            # A new identity: the source pays, and a refusal costs no
            # signature check.
            keys = source_keys(source)
            refused = self._source_refusal(keys, now)
            if refused is not None:
                return refused, None
        try:
            record = open_announcement(self.network_id, types.SimpleNamespace(**raw))
        except AnnouncementError as e:
            if e.reason == "bad_signature":
                return Outcome.BAD_SIGNATURE, None
            return Outcome.MALFORMED, None
        if record.name:
            try:
                validate_name(record.name)
            except IdentityError:
                return Outcome.MALFORMED, None
        peer_id = record.peer_id
        if peer_id == self.own_peer_id:
            return Outcome.OWN, peer_id

        now_ms = now * 1000
        if record.timestamp_ms > now_ms + self.clock_skew_s * 1000:
            return Outcome.EXPIRED, peer_id
        valid_until = record.timestamp_ms / 1000 + record.ttl_s
        if valid_until <= now:
            return Outcome.EXPIRED, peer_id

        held = self._peers.get(peer_id)
        if held is not None:
            if record.sequence == held.sequence:
                return Outcome.DUPLICATE, peer_id
            if record.sequence < held.sequence:
                return Outcome.STALE, peer_id

        evict: list[bytes] = []
        if record.name:
            name_key = _name_key(record.name)
            claim = self._claim(name_key, now)
            for holder_id in self._names.get(name_key, ()):
                if holder_id == peer_id:
                    continue
                if self._peers[holder_id].expired(now):
                    evict.append(holder_id)
                elif claim is None or claim[0] != peer_id:
                    return Outcome.NAME_TAKEN, peer_id
        victim = None
        if held is None and len(self._peers) - len(evict) >= self.max_peers:
            victim = self._victim(keys[0] if keys else None)
            if victim is None:
                return Outcome.FULL, peer_id

        for gone in evict:
            self.remove(gone)
        if victim is not None:
            self.remove(victim)
            self.evicted += 1
        peer = PeerRecord(
            peer_id=peer_id,
            public_key=bytes(record.public_key),
            name=record.name,
            sequence=record.sequence,
            timestamp_ms=record.timestamp_ms,
            ttl_s=record.ttl_s,
            expires_at=min(now + min(record.ttl_s, self.max_ttl_s), valid_until),
            nat_type=_known(NatType, record.nat_type),
            capabilities=record.capabilities,
            paths=[
                (
                    _known(PathKind, path.kind),
                    tuple(path.endpoint),
                    None if path.via == NO_PEER else bytes(path.via),
                )
                for path in record.paths
            ],
            resources=Resources(
                cpu_cores=record.resources.cpu_cores,
                memory_mb=record.resources.memory_mb,
                disk_gb=record.resources.disk_gb,
                gpus=record.resources.gpus,
            ),
            signed=raw,
            first_seen=now,
            state_since=now,
            learned_via=via,
        )
        if held is not None:
            peer.first_seen = held.first_seen
            if held.state == PeerState.OFFLINE and record.sequence <= held.gone_sequence:
                # (a leave signed under a later sequence than this one)
                peer.state, peer.state_since = held.state, held.state_since
                peer.gone, peer.gone_sequence = held.gone, held.gone_sequence
            elif held.state in (PeerState.SUSPECT, PeerState.OFFLINE):
                # a newer incarnation refutes the suspicion or the death
                self._offline.pop(peer_id, None)
            else:
                peer.state = held.state
                peer.state_since = held.state_since
            peer.last_heard = held.last_heard
            peer.endpoint = held.endpoint
            peer.rtt = held.rtt
            peer.reputation = held.reputation
            peer.source = held.source
            self._unindex(held)
        else:
            if keys is not None:
                self._ip_buckets.take(keys[0], now)
                self._address_buckets.take(keys[1], now)
                peer.source = keys[0]
                self._introduced.setdefault(keys[0], {})[peer_id] = None
            self._index[peer_id] = len(self._order)
            self._order.append(peer_id)
        self._peers[peer_id] = peer
        self._reindex(peer)
        if peer.name:
            self._claim_name(_name_key(peer.name), peer_id, now)
        self._changed(peer_id, "announcement")
        return (Outcome.UPDATED if held is not None else Outcome.NEW), peer_id

    def _source_refusal(self, keys: tuple[str, str], now: float) -> Outcome | None:
        """
        Whether a source may introduce one more identity now (nothing is
        charged until the record is stored).
        """
        ip, address = keys
        if len(self._introduced.get(ip, ())) >= self.limits.max_per_ip:
            return Outcome.SOURCE_FULL
        if self._ip_buckets.level(ip, now) < 1 or self._address_buckets.level(address, now) < 1:
            return Outcome.SOURCE_RATE
        return None

    def _victim(self, incoming_ip: str | None) -> bytes | None:
        """
        The record a newcomer may evict from a full registry: the newest
        never-contacted record of the source IP that introduced the most
        records, if that is more than the newcomer's own source holds (so a
        flood evicts its own records first and never a peer this node heard
        from); None when there is none.  Runs only when the registry is
        full, over the sources, not the records.
        """
        if not self._introduced:
            return None
        ip, members = max(self._introduced.items(), key=lambda item: len(item[1]))
        own = len(self._introduced.get(incoming_ip, ())) if incoming_ip is not None else 0
        if ip == incoming_ip or len(members) <= own + 1:
            return None
        for peer_id in reversed(members):
            peer = self._peers[peer_id]
            if peer.last_heard is None and peer.state == PeerState.UNKNOWN:
                return peer_id
        return None

    # -- names -----------------------------------------------------------------

    def _claim(self, name_key: str, now: float) -> list | None:
        """
        The remembered first key of a name, [peer id, since, last
        announced], unless it lapsed.
        """
        claim = self._claims.get(name_key)
        if claim is None:
            return None
        if claim[0] not in self._peers and claim[2] + self.name_memory_s <= now:
            del self._claims[name_key]
            return None
        return claim

    def _claim_name(self, name_key: str, peer_id: bytes, now: float) -> None:
        self._names.setdefault(name_key, {})[peer_id] = None
        claim = self._claim(name_key, now)
        if claim is None:
            self._claims[name_key] = [peer_id, now, now]
        elif claim[0] == peer_id:
            claim[2] = now
        else:
            return
        self._claims.move_to_end(name_key)
        limit = 2 * self.max_peers + 64
        for _ in range(len(self._claims)):
            # forget the oldest names whose first key is not held (held
            # ones go to the back: there are at most max_peers of them)
            if len(self._claims) <= limit:
                break
            oldest = next(iter(self._claims))
            if self._claims[oldest][0] in self._peers:
                self._claims.move_to_end(oldest)
            else:
                del self._claims[oldest]

    def _drop_name(self, peer: PeerRecord) -> None:
        if not peer.name:
            return
        name_key = _name_key(peer.name)
        holders = self._names.get(name_key)
        if holders is not None:
            holders.pop(peer.peer_id, None)
            if not holders:
                del self._names[name_key]

    # -- indexes -----------------------------------------------------------

    def _reindex_expiry(self, peer: PeerRecord) -> None:
        self._heap_counter += 1
        heapq.heappush(self._expiry, (peer.expires_at, self._heap_counter, peer.peer_id, peer))

    def _reindex(self, peer: PeerRecord) -> None:
        """
        Count a record that is now held (new or replacing another).
        """
        self._heap_counter += 1
        heapq.heappush(self._expiry, (peer.expires_at, self._heap_counter, peer.peer_id, peer))
        if len(self._expiry) > 4 * len(self._peers) + 64:
            # replaced records' entries wait in the heap until their expiry:
            # rebuild now and then (amortised O(1) per change)
            self._expiry = [entry for entry in self._expiry
                            if self._peers.get(entry[2]) is entry[3]]
            heapq.heapify(self._expiry)
        self._state_counts[peer.state] += 1
        for flag in _flags(peer.capabilities):
            self._capability_counts[flag] += 1
        if peer.state != PeerState.OFFLINE:
            self._digest_add(peer)
        self._version += 1

    def _digest_add(self, peer: PeerRecord) -> None:
        bucket = peer.peer_id[0]
        self._live[bucket][peer.peer_id] = None
        self._leaves[bucket] ^= digest_hash(peer.peer_id, peer.sequence)

    def _digest_remove(self, peer: PeerRecord) -> None:
        bucket = peer.peer_id[0]
        if self._live[bucket].pop(peer.peer_id, 0) is None:
            self._leaves[bucket] ^= digest_hash(peer.peer_id, peer.sequence)

    def _unindex(self, peer: PeerRecord) -> None:
        """
        Uncount a record that is replaced or dropped.
        """
        self._drop_name(peer)
        self._state_counts[peer.state] -= 1
        if peer.state != PeerState.OFFLINE:
            self._digest_remove(peer)
        for flag in _flags(peer.capabilities):
            self._capability_counts[flag] -= 1
        self._version += 1

    # -- observations ------------------------------------------------------

    def heard_from(self, peer_id: bytes, endpoint: Address | None, now: float) -> bool:
        """
        A frame arrived from C{peer_id} (directly from C{endpoint}, or
        through a relay when C{endpoint} is None): the peer is online, unless
        it was declared offline (only a newer announcement revives it).
        Only peers with a verified announcement are tracked.

        @return: False if the peer is not in the registry.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        if peer.state != PeerState.OFFLINE:
            self._set_state(peer, PeerState.ONLINE, now)
        if peer.last_heard is None:
            self._version += 1  # contacted: no longer evictable, and saved so
        peer.last_heard = now
        if endpoint is not None and peer.endpoint != (endpoint[0], endpoint[1]):
            peer.endpoint = (endpoint[0], endpoint[1])
            self._version += 1
        return True

    def set_rtt(self, peer_id: bytes, rtt: float | None) -> bool:
        """
        Record the peer's round-trip time in seconds (the caller smooths).

        @return: False if the peer is not in the registry.
        """
        if rtt is not None and not (math.isfinite(rtt) and rtt >= 0):
            raise ValueError(f"an RTT is a finite number of seconds >= 0, not {rtt!r}")
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        peer.rtt = rtt
        self._changed(peer_id, "rtt")
        return True

    def set_state(self, peer_id: bytes, state: str, now: float,
                  gone: str | None = None, sequence: int | None = None) -> bool:
        """
        Set a peer's liveness state (one of L{PeerState}); C{gone} says why
        a peer is offline ("failed" or "left"), C{sequence} under which
        announcement number (the one held, if None): only a higher one
        revives it.

        @return: False if the peer is not in the registry.
        @raise ValueError: an unknown state.
        """
        state = PeerState(state)
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        self._set_state(peer, state, now, gone, sequence)
        return True

    def _set_state(self, peer: PeerRecord, state: PeerState, now: float,
                   gone: str | None = None, sequence: int | None = None) -> None:
        if state == PeerState.OFFLINE:
            peer.gone = gone or peer.gone or "failed"
            peer.gone_sequence = max(peer.gone_sequence, peer.sequence,
                                     0 if sequence is None else sequence)
        else:
            peer.gone, peer.gone_sequence = None, 0
        if peer.state != state:
            self._state_counts[peer.state] -= 1
            self._state_counts[state] += 1
            if state == PeerState.OFFLINE:
                self._digest_remove(peer)
            elif peer.state == PeerState.OFFLINE:
                self._digest_add(peer)
            peer.state = state
            peer.state_since = now
            self._offline.pop(peer.peer_id, None)
            if state == PeerState.OFFLINE:
                self._offline[peer.peer_id] = now
            self._version += 1
            self._changed(peer.peer_id, "state")

    def restore_reputation(self, peer_id: bytes, reputation: float) -> bool:
        """
        Set a peer's reputation to one kept from earlier runs (a consumer's
        record of its providers); values outside [0, 1] are clamped.
        Returns whether the peer is known.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        peer.reputation = min(1.0, max(0.0, float(reputation)))
        self._version += 1
        return True

    def record_outcome(
        self, peer_id: bytes, success: bool, latency: float | None = None
    ) -> float | None:
        """
        Fold the outcome of an interaction (a request, a connection, a job)
        into the peer's reputation and return the new score.

        Each outcome scores C{s}: 0 for a failure; for a success
        C{1 - 0.5 * min(latency / slow_latency_s, 1)} (1 when no latency is
        given), so a success always beats a failure and a slow one counts
        less.  The reputation is then C{r <- (1 - alpha) * r + alpha * s},
        starting at 0.5; as a convex combination of values in [0, 1] it stays
        in [0, 1], and after n outcomes the oldest weighs C{(1 - alpha)^n}.

        @return: the new reputation, or None if the peer is not in the
            registry.
        @raise ValueError: a latency that is negative or not finite.
        """
        if latency is not None and not (math.isfinite(latency) and latency >= 0):
            raise ValueError(f"a latency is a finite number of seconds >= 0, not {latency!r}")
        peer = self._peers.get(peer_id)
        if peer is None:
            return None
        if not success:
            score = 0.0
        elif latency is None:
            score = 1.0
        else:
            score = 1.0 - 0.5 * min(latency / self.slow_latency_s, 1.0)
        alpha = self.reputation_alpha
        peer.reputation = min(1.0, max(0.0, (1 - alpha) * peer.reputation + alpha * score))
        self._version += 1
        return peer.reputation

    def remove(self, peer_id: bytes) -> bool:
        """
        Forget a peer.

        @return: False if it was not in the registry.
        """
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return False
        self._unindex(peer)
        self._offline.pop(peer_id, None)
        if peer.source is not None:
            members = self._introduced.get(peer.source)
            if members is not None:
                members.pop(peer_id, None)
                if not members:
                    del self._introduced[peer.source]
        index = self._index.pop(peer_id)
        last = self._order.pop()
        if last != peer_id:
            self._order[index] = last
            self._index[last] = index
        self._changed(peer_id, "removed")
        return True

    def expire(self, now: float) -> list[bytes]:
        """
        Drop every peer whose announcement has expired: pops the expiry
        heap, so a call costs O(log n) per record that expired (or was
        replaced) since the last, nothing per idle record.

        @return: the ids dropped.
        """
        gone = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, _, peer_id, peer = heapq.heappop(heap)
            self.work += 1
            if self._peers.get(peer_id) is peer:
                gone.append(peer_id)
                self.remove(peer_id)
        return gone

    def cleanup_offline(self, now: float, after: float) -> list[bytes]:
        """
        Drop every peer that has been C{offline} for longer than C{after}
        seconds: reads the offline peers oldest first and stops at the
        first recent one.

        @return: the ids dropped.
        """
        gone = []
        for peer_id, since in self._offline.items():
            self.work += 1
            if now - since <= after:
                break
            gone.append(peer_id)
        for peer_id in gone:
            self.remove(peer_id)
        return gone

    # -- look-ups ------------------------------------------------------------

    def get(self, peer_id: bytes) -> PeerRecord | None:
        return self._peers.get(peer_id)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[PeerRecord]:
        return iter(list(self._peers.values()))

    def all(self) -> list[PeerRecord]:
        return list(self._peers.values())

    def live(self) -> list[PeerRecord]:
        """Every record not known to be gone."""
        return [p for p in self._peers.values() if p.state != PeerState.OFFLINE]

    def online(self) -> list[PeerRecord]:
        return [p for p in self._peers.values() if p.state == PeerState.ONLINE]

    def lookup(self, ref: str) -> PeerRecord:
        """
        Find one peer by its full hex id, a unique hex prefix of at least 4
        digits, or its name (case-insensitive).

        A reference that is both a name and a prefix of another peer's id is
        ambiguous rather than resolved silently, so nobody can capture a
        look-up by choosing a hex-looking name or grinding an id prefix.

        @raise PeerNotFound: nothing matches.
        @raise AmbiguousPeer: more than one peer matches.
        """
        text = ref.strip()
        lowered = text.lower()
        if is_peer_id_text(lowered):
            peer = self._peers.get(bytes.fromhex(lowered))
            if peer is None:
                raise PeerNotFound(f"no peer {lowered} in this network")
            return peer
        matches: dict[bytes, PeerRecord] = {}
        by_name = self._by_name(text)
        if by_name is not None:
            matches[by_name.peer_id] = by_name
        is_prefix = len(lowered) >= MIN_PREFIX and all(ch in "0123456789abcdef" for ch in lowered)
        if is_prefix:
            for pid, peer in self._peers.items():
                if peer.peer_id_text.startswith(lowered):
                    matches[pid] = peer
        if len(matches) == 1:
            return next(iter(matches.values()))
        if matches:
            raise AmbiguousPeer(
                text, sorted((p.peer_id_text, p.name) for p in matches.values())
            )
        hint = "" if is_prefix else f" (an id prefix needs at least {MIN_PREFIX} hex digits)"
        raise PeerNotFound(f"no peer named or with an id starting {text!r} in this network{hint}")

    def _by_name(self, text: str) -> PeerRecord | None:
        """
        The peer a name resolves to: its remembered first key when that is
        held; else its only holder, unless the first key is remembered (it
        is away, and the holder is a newcomer to the name).

        @raise AmbiguousPeer: a newcomer holds a name whose first key is
            away, or two keys hold it (listing them).
        """
        name_key = _name_key(text)
        holders = self._names.get(name_key)
        if not holders:
            return None
        claim = self._claims.get(name_key)
        if claim is not None and claim[0] in holders:
            return self._peers[claim[0]]
        if claim is None and len(holders) == 1:
            return self._peers[next(iter(holders))]
        candidates = [(format_peer_id(pid), self._peers[pid].name) for pid in holders]
        why = f"the name {text!r} is announced by {len(holders)} peer(s)"
        if claim is not None and claim[0] not in holders:
            candidates.append((format_peer_id(claim[0]), text))
            why += (f" that took it while {format_peer_id(claim[0])}, which announced it"
                    " first, is away")
        raise AmbiguousPeer(text, sorted(candidates), why)

    def sample(self, count: int, rng: random.Random,
               wanted: Callable[[PeerRecord], bool] = lambda record: True,
               tries: int | None = None) -> list[PeerRecord]:
        """
        Up to C{count} distinct random records for which C{wanted} is true,
        drawn without listing the registry: at most C{tries} (default
        C{4 * count + 8}) draws, so the cost is O(count) whatever the size.
        """
        found: dict[bytes, PeerRecord] = {}
        order = self._order
        for _ in range(4 * count + 8 if tries is None else tries):
            if len(found) >= count or not order:
                break
            self.work += 1
            peer = self._peers[order[rng.randrange(len(order))]]
            if peer.peer_id not in found and wanted(peer):
                found[peer.peer_id] = peer
        return list(found.values())

    def digest(self, buckets: int, extra: tuple = ()) -> list[int]:
        """
        The live-record digest folded to C{buckets} (a power of two up to
        L{DIGEST_LEAVES}; bucket i holds the peers whose id starts with a
        byte b with b % buckets == i), each value cut to 32 bits.
        C{extra}: (peer id, sequence) pairs counted as if held (this node's
        own record).
        """
        folded = [0] * buckets
        for leaf, value in enumerate(self._leaves):
            folded[leaf % buckets] ^= value
        for peer_id, sequence in extra:
            folded[peer_id[0] % buckets] ^= digest_hash(peer_id, sequence)
        return [value & 0xFFFFFFFF for value in folded]

    def bucket(self, index: int, buckets: int) -> list[PeerRecord]:
        """
        The live records in bucket C{index} of the digest folded to C{buckets}.
        """
        found = [self._peers[peer_id] for leaf in range(index, DIGEST_LEAVES, buckets)
                 for peer_id in self._live[leaf]]
        self.work += len(found)
        return found

    def find_peers(
        self,
        requirements: Requirements,
        max_results: int = 10,
        now: float | None = None,
    ) -> list[PeerRecord]:
        """
        Peers whose announced resources meet every minimum of
        C{requirements}, best first: highest reputation, then lowest RTT
        (unknown RTT last), then peer id.  Never this node or a peer known
        to be gone; with C{now}, never a peer whose announcement has expired.
        """
        found = [
            peer
            for pid, peer in self._peers.items()
            if pid != self.own_peer_id
            and peer.state != PeerState.OFFLINE
            and requirements.met_by(peer)
            and (now is None or not peer.expired(now))
        ]
        found.sort(
            key=lambda p: (-p.reputation, p.rtt is None, p.rtt or 0.0, p.peer_id)
        )
        return found[: max(0, max_results)]

    def statistics(self) -> dict[str, Any]:
        """
        Counts: C{total}, C{by_state} (every state, zeros included) and
        C{by_capability} (peers announcing each capability).
        """
        by_state = {str(state): self._state_counts[state] for state in PeerState}
        by_capability = {cap.name.lower(): self._capability_counts[cap]
                         for cap in Capability if cap}
        return {"total": len(self._peers), "by_state": by_state, "by_capability": by_capability}

    # -- persistence -------------------------------------------------------

    def save(self, path: Path) -> bool:
        """
        Write every held announcement with its reputation, last endpoint,
        first-seen and last-heard time, expiry, the source that introduced
        it and the first keys of names to C{path}, atomically.  The file's
        bytes are rebuilt only if something other than a last-heard time,
        round-trip time or liveness state changed since they were last
        built; otherwise the same bytes are written again (no work per
        record; the caller's periodic write still happens, so a full disk
        is still noticed).

        @return: whether the bytes were rebuilt.
        @raise storage.StateFileError: L{load} found C{path} damaged and
            could not move it aside; it is not overwritten while it is there.
        """
        path = Path(path)
        if path in self._damaged:
            if path.exists():
                raise storage.StateFileError(
                    f"the known peers are not saved to {path}: it was damaged when"
                    f" loaded and is left untouched; move it aside (or delete it)")
            self._damaged.discard(path)
        if self._saved is not None and self._saved[0] == self._version:
            storage.atomic_write(path, self._saved[1])
            return False
        version = self._version
        peers = []
        for peer in self._peers.values():
            self.work += 1
            peers.append(
                {
                    "peer_id": peer.peer_id_text,
                    "record": base64.b64encode(peer.signed["record"]).decode("ascii"),
                    "signature": base64.b64encode(peer.signed["signature"]).decode("ascii"),
                    "reputation": peer.reputation,
                    "endpoint": None if peer.endpoint is None else list(peer.endpoint),
                    "last_heard": peer.last_heard,
                    "first_seen": peer.first_seen,
                    "expires_at": peer.expires_at,
                    "source": peer.source,
                }
            )
        names = [[name, format_peer_id(peer_id), since, last]
                 for name, (peer_id, since, last) in self._claims.items()]
        document = {"version": STATE_VERSION, "network_id": self.network_id.hex(),
                    "peers": peers, "names": names}
        data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
        self._saved = (version, data)
        storage.atomic_write(path, data)
        return True

    def load(self, path: Path, now: float) -> dict[str, int]:
        """
        Add the peers saved in C{path} (a missing file adds none).

        Every announcement goes through L{accept} again, so forged, tampered
        and expired entries are skipped (each logged); the rest start
        C{unknown}: candidates to contact, not known to be online.  A peer
        already in the registry keeps its live state.

        A damaged file (unreadable, not JSON, of another version or for
        another network) is moved aside to C{PATH.damaged-TIME} (UTC, from
        C{now}) so that the next L{save} does not overwrite it; if it cannot
        be moved, it stays and L{save} refuses to replace it.

        @return: how many entries had each outcome (C{new} = loaded).
        @raise storage.StateFileError: the file was damaged; the message
            says what is wrong and where the file is now.
        """
        path = Path(path)
        try:
            document = storage.read_json(path, lambda: None)
        except storage.StateFileError as e:
            cause = e.__cause__
            if isinstance(cause, OSError):
                problem = f"cannot be read ({cause.strerror})"
            else:
                problem = f"is not JSON ({cause})"
            raise self._set_aside(path, problem, now) from e
        if document is None:
            return {}
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            raise self._set_aside(
                path, f"is not a version {STATE_VERSION} peer registry file", now)
        if document.get("network_id") != self.network_id.hex():
            raise self._set_aside(
                path, f"holds the peers of network {document.get('network_id')!r},"
                f" not {self.network_id.hex()}", now)
        entries = document.get("peers")
        if not isinstance(entries, list):
            raise self._set_aside(path, "has no list of peers", now)
        self._load_claims(document.get("names"), now)
        counts: dict[str, int] = {}
        for index, entry in enumerate(entries):
            outcome = self._load_entry(entry, now)
            counts[str(outcome)] = counts.get(str(outcome), 0) + 1
            if outcome != Outcome.NEW:
                self.log.warn(
                    "Skipped peer {index} of {path}: {outcome}",
                    index=index,
                    path=str(path),
                    outcome=str(outcome),
                )
        return counts

    def _load_claims(self, names: Any, now: float) -> None:
        """
        Remember the first keys of names from a state file (bad entries are
        skipped): loaded before the records, so a newcomer saved beside a
        name's first key does not take the name at restart.
        """
        if not isinstance(names, list):
            return
        for item in names:
            if not (isinstance(item, list) and len(item) == 4):
                continue
            name, peer_id, since, last = item
            if not (isinstance(name, str) and isinstance(peer_id, str)
                    and is_peer_id_text(peer_id) and _is_number(since) and _is_number(last)):
                continue
            if last > now or last + self.name_memory_s <= now:
                continue
            name_key = _name_key(name)
            if name_key not in self._claims:
                self._claims[name_key] = [bytes.fromhex(peer_id), min(float(since), now),
                                          float(last)]

    def _set_aside(self, path: Path, problem: str, now: float) -> storage.StateFileError:
        """
        Move the damaged C{path} aside (or, failing that, remember not to
        overwrite it) and return the error that says which.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        aside = path.with_name(f"{path.name}.damaged-{stamp}")
        suffix = 1
        while aside.exists():
            aside = path.with_name(f"{path.name}.damaged-{stamp}-{suffix}")
            suffix += 1
        try:
            os.rename(path, aside)
        except OSError as e:
            self._damaged.add(path)
            return storage.StateFileError(
                f"{path} {problem}; it could not be moved aside ({e.strerror}) and is left"
                f" untouched (not overwritten): move it aside or delete it, then restart")
        return storage.StateFileError(
            f"{path} {problem}; it was moved aside to {aside} (the node starts without"
            f" the peers it knew; delete that file when you no longer need it)")

    def _load_entry(self, entry: Any, now: float) -> Outcome:
        if not isinstance(entry, dict):
            return Outcome.MALFORMED
        try:
            signed = {
                "record": base64.b64decode(entry["record"], validate=True),
                "signature": base64.b64decode(entry["signature"], validate=True),
            }
        except (KeyError, TypeError, ValueError, binascii.Error):
            return Outcome.MALFORMED
        outcome, peer_id = self._accept(signed, now, None)
        if outcome != Outcome.NEW:
            return outcome
        peer = self._peers[peer_id]
        expires_at = entry.get("expires_at")
        if _is_number(expires_at) and expires_at < peer.expires_at:
            # the cap counts from the first arrival, not from each restart
            if expires_at <= now:
                self.remove(peer_id)
                return Outcome.EXPIRED
            peer.expires_at = float(expires_at)
            self._reindex_expiry(peer)
        source = entry.get("source")
        if isinstance(source, str) and source:
            members = self._introduced.setdefault(source, {})
            members[peer_id] = None
            peer.source = source
        reputation = entry.get("reputation")
        if _is_number(reputation) and 0 <= reputation <= 1:
            peer.reputation = float(reputation)
        peer.endpoint = _endpoint_or_none(entry.get("endpoint"))
        last_heard = entry.get("last_heard")
        peer.last_heard = float(last_heard) if _is_number(last_heard) else None
        first_seen = entry.get("first_seen")
        if _is_number(first_seen) and first_seen <= now:
            peer.first_seen = float(first_seen)
        return outcome


def _flags(capabilities: int) -> list[Capability]:
    return [cap for cap in Capability if cap and capabilities & cap]


def _signed_value(signed) -> dict[str, bytes] | None:
    """
    The C{record} and C{signature} of a C{SignedAnnouncement} as a plain
    dict of bytes, or None if it is not one the wire format can carry.
    """
    try:
        if isinstance(signed, dict):
            record, signature = signed["record"], signed["signature"]
        else:
            record, signature = signed.record, signed.signature
    except (KeyError, AttributeError, TypeError):
        return None
    if not isinstance(record, (bytes, bytearray)) or not isinstance(signature, (bytes, bytearray)):
        return None
    if len(record) > MAX_RECORD_SIZE or len(signature) != SIGNATURE_SIZE:
        return None
    return {"record": bytes(record), "signature": bytes(signature)}


def _known(kind: type[enum.IntEnum], value: int) -> int:
    """
    C{value} as a member of C{kind} when it names one; unknown values (from a
    newer peer) are kept as plain ints.
    """
    try:
        return kind(value)
    except ValueError:
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _endpoint_or_none(value: Any) -> Address | None:
    if not (isinstance(value, list) and len(value) == 2):
        return None
    host, port = value
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        return None
    if not 0 < port < 65536:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, port)

