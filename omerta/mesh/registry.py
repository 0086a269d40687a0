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
    has expired, the new key takes the name and the expired record is
    dropped;
 8. a new peer when C{max_peers} records are held is C{full};
 9. otherwise the record is stored: C{new} or C{updated}.

Reputation is an exponentially weighted moving average in [0, 1], see
L{PeerRegistry.record_outcome}.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import math
import os
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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

    def __init__(self, ref: str, candidates: list[tuple[str, str]]):
        shown = ", ".join(f"{pid} ({name})" if name else pid for pid, name in candidates)
        super().__init__(
            f"{ref!r} matches {len(candidates)} peers: {shown}; give more digits of the peer id"
        )
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
        self._names: dict[str, bytes] = {}
        self.events = events

    def _changed(self, peer_id: bytes, change: str) -> None:
        if self.events is not None:
            self.events.emit("peer_changed", network=self.network_id, peer_id=peer_id,
                             change=change)

    # -- announcements -----------------------------------------------------

    def accept(self, signed, now: float, via: bytes | None = None) -> Outcome:
        """
        Verify an announcement nobody has checked yet and apply the rules in
        the module docstring.

        @param signed: a C{SignedAnnouncement} value: a parsed construct
            Container or a dict with C{record} and C{signature} bytes.
        @param via: the neighbour that passed it on (gossip), or None when it
            came from the announcer itself.  Accepting never marks a peer
            online: that takes a direct frame (L{heard_from}).
        """
        return self._accept(signed, now, via)[0]

    def _accept(self, signed, now: float, via: bytes | None) -> tuple[Outcome, bytes | None]:
        """
        L{accept}, also returning the announcer's id once the signature has
        been verified.
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

        evict = None
        if record.name:
            holder_id = self._names.get(_name_key(record.name))
            if holder_id is not None and holder_id != peer_id:
                holder = self._peers[holder_id]
                if not holder.expired(now):
                    return Outcome.NAME_TAKEN, peer_id
                evict = holder_id
        if held is None and len(self._peers) - (evict is not None) >= self.max_peers:
            return Outcome.FULL, peer_id

        if evict is not None:
            self.remove(evict)
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
            peer.state = held.state
            peer.state_since = held.state_since
            peer.last_heard = held.last_heard
            peer.endpoint = held.endpoint
            peer.rtt = held.rtt
            peer.reputation = held.reputation
            if held.name and self._names.get(_name_key(held.name)) == peer_id:
                del self._names[_name_key(held.name)]
        self._peers[peer_id] = peer
        if peer.name:
            self._names[_name_key(peer.name)] = peer_id
        self._changed(peer_id, "announcement")
        return (Outcome.UPDATED if held is not None else Outcome.NEW), peer_id

    # -- observations ------------------------------------------------------

    def heard_from(self, peer_id: bytes, endpoint: Address | None, now: float) -> bool:
        """
        A frame arrived from C{peer_id} (directly from C{endpoint}, or
        through a relay when C{endpoint} is None): the peer is online.  Only
        peers with a verified announcement are tracked.

        @return: False if the peer is not in the registry.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        self._set_state(peer, PeerState.ONLINE, now)
        peer.last_heard = now
        if endpoint is not None:
            peer.endpoint = (endpoint[0], endpoint[1])
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

    def set_state(self, peer_id: bytes, state: str, now: float) -> bool:
        """
        Set a peer's liveness state (one of L{PeerState}).

        @return: False if the peer is not in the registry.
        @raise ValueError: an unknown state.
        """
        state = PeerState(state)
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        self._set_state(peer, state, now)
        return True

    def _set_state(self, peer: PeerRecord, state: PeerState, now: float) -> None:
        if peer.state != state:
            peer.state = state
            peer.state_since = now
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
        return peer.reputation

    def remove(self, peer_id: bytes) -> bool:
        """
        Forget a peer.

        @return: False if it was not in the registry.
        """
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return False
        if peer.name and self._names.get(_name_key(peer.name)) == peer_id:
            del self._names[_name_key(peer.name)]
        self._changed(peer_id, "removed")
        return True

    def expire(self, now: float) -> list[bytes]:
        """
        Drop every peer whose announcement has expired.

        @return: the ids dropped.
        """
        gone = [pid for pid, peer in self._peers.items() if peer.expired(now)]
        for pid in gone:
            self.remove(pid)
        return gone

    def cleanup_offline(self, now: float, after: float) -> list[bytes]:
        """
        Drop every peer that has been C{offline} for longer than C{after}
        seconds.

        @return: the ids dropped.
        """
        gone = [
            pid
            for pid, peer in self._peers.items()
            if peer.state == PeerState.OFFLINE and now - peer.state_since > after
        ]
        for pid in gone:
            self.remove(pid)
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
        by_name = self._names.get(_name_key(text))
        if by_name is not None:
            matches[by_name] = self._peers[by_name]
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

    def find_peers(
        self,
        requirements: Requirements,
        max_results: int = 10,
        now: float | None = None,
    ) -> list[PeerRecord]:
        """
        Peers whose announced resources meet every minimum of
        C{requirements}, best first: highest reputation, then lowest RTT
        (unknown RTT last), then peer id.  Never this node; with C{now},
        never a peer whose announcement has expired.
        """
        found = [
            peer
            for pid, peer in self._peers.items()
            if pid != self.own_peer_id
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
        by_state = {str(state): 0 for state in PeerState}
        by_capability = {cap.name.lower(): 0 for cap in Capability if cap}
        for peer in self._peers.values():
            by_state[str(peer.state)] += 1
            for name in capability_names(peer.capabilities):
                by_capability[name] += 1
        return {"total": len(self._peers), "by_state": by_state, "by_capability": by_capability}

    # -- persistence -------------------------------------------------------

    def save(self, path: Path) -> None:
        """
        Write every held announcement with its reputation, last endpoint and
        last-heard time to C{path}, atomically.

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
        peers = []
        for peer in self._peers.values():
            peers.append(
                {
                    "peer_id": peer.peer_id_text,
                    "record": base64.b64encode(peer.signed["record"]).decode("ascii"),
                    "signature": base64.b64encode(peer.signed["signature"]).decode("ascii"),
                    "reputation": peer.reputation,
                    "endpoint": None if peer.endpoint is None else list(peer.endpoint),
                    "last_heard": peer.last_heard,
                    "first_seen": peer.first_seen,
                }
            )
        storage.write_json(
            path,
            {"version": STATE_VERSION, "network_id": self.network_id.hex(), "peers": peers},
        )

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

