"""
Per-pair sessions: who said it.

The network key only proves membership, so a member (a relay, say) could read
and forge the frames two other members exchange.  A session gives one pair of
members keys nobody else has: a one-round-trip handshake of fresh X25519 keys,
each signed with the sender's Ed25519 identity, then ChaCha20-Poly1305 per
direction.  The layout is in docs/identity.md ("Per-peer sessions").

Handshake, initiator A to responder B::

    HANDSHAKE_INIT  handshake_id, A's identity key, A's ephemeral, B's peer id,
                    A's clock; signed by A over
                    "omerta hs init v1\\0" || network id || those fields
    HANDSHAKE_RESP  handshake_id, B's identity key, B's ephemeral; signed by B
                    over "omerta hs resp v1\\0" || network id
                    || SHA-256(INIT body) || B's identity key || B's ephemeral

    HKDF-SHA256(X25519(eA, eB), salt = SHA-256(INIT body || RESP body),
                info = "omerta session v1\\0" || network id || A id || B id)
        -> key A->B (32) || key B->A (32) || session id (8)

Both signatures bind the network, both identities and A's ephemeral; B's also
binds its own ephemeral and the whole INIT, so a member in the middle cannot
swap a key without breaking a signature.  The ephemeral private keys live only
until the keys are derived, so a later theft of an identity key does not open
recorded sessions.

A responder's new session is I{unconfirmed} until the first SESSION_DATA under
it opens: only then has the initiator proved it holds the keys, so only then
does the responder send with it (until then it keeps sending with the session
it had, or has none).  A replayed INIT therefore never diverts the
responder's traffic.  The initiator should send something soon after the
handshake completes.

Everything here is pure: no I/O, no clock (every call that needs the time
takes C{now}, in seconds), randomness injectable for golden tests.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import os
import struct
from collections import OrderedDict
from typing import Callable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from omerta.crypto.identity import Identity, peer_id_for, verify_signature, weak_identity_key
from omerta.crypto.network import NETWORK_ID_SIZE
from omerta.crypto.sealing import ReplayWindow
from omerta.wire.messages import MessageType, build_body

_INIT_LABEL = b"omerta hs init v1\x00"
_RESP_LABEL = b"omerta hs resp v1\x00"
_SESSION_LABEL = b"omerta session v1\x00"
_U64 = struct.Struct(">Q")
_AAD = struct.Struct(">QQB")
_NONCE_PAD = bytes(4)
_KEY_SIZE = 32

# The Ed25519 public keys whose "signatures" anyone can make: the eight
# small-order points and the two non-canonical encodings of such points
# (y = p, p + 1), with the sign bit cleared.  OpenSSL verifies signatures
# against them, so a handshake refuses them (the same list as libsodium).

MAX_COUNTER = 2**64 - 1
REKEY_AFTER_MESSAGES = 2**32
"""After this many messages in either direction a session asks to be rekeyed."""

HANDSHAKE_REASONS = frozenset({
    "malformed",        # fields missing, or raw body not the encoding of the fields
    "from_self",        # an INIT from our own identity
    "sender_mismatch",  # envelope sender is not the owner of the signing key
    "weak_key",         # a small-order Ed25519 key, whose signatures anyone can forge
    "wrong_responder",  # INIT addressed to another peer
    "stale_timestamp",  # INIT clock more than max_skew away from ours
    "replayed",         # (initiator, ephemeral) already seen within the window
    "bad_signature",
    "bad_ephemeral",    # X25519 gave the all-zero secret (low-order point)
    "busy",             # replay cache full of unexpired entries
    "collision",        # simultaneous initiation that our own handshake wins
    "unknown_handshake",  # RESP for no pending handshake (or an expired one)
    "wrong_peer",       # RESP from a peer other than the one we asked
    "duplicate_session",  # derived session id already in use (never expected)
})
SESSION_REASONS = frozenset({
    "malformed", "wrong_session", "replay", "too_old", "bad_tag", "exhausted",
})


class HandshakeError(Exception):
    """
    A handshake message that was refused.  C{reason} is one of
    L{HANDSHAKE_REASONS}, stable, for drop-counter labels.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SessionError(Exception):
    """
    A SESSION_DATA message that was refused (or a seal that must not happen).
    C{reason} is one of L{SESSION_REASONS}.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


def _nonce(counter: int) -> bytes:
    return _NONCE_PAD + _U64.pack(counter)


class Session:
    """
    The keys one node shares with one peer, and the counters under them.

    Direction byte 0 is initiator to responder, 1 the other way; it is in
    the AAD next to the session id and the counter (the keys already differ
    per direction, the byte makes a reflected frame fail even if they did
    not).
    """

    __slots__ = (
        "peer_id", "session_id", "role", "created_at", "max_age", "confirmed",
        "retire_at", "_send", "_recv", "_send_dir", "_recv_dir", "_sent",
        "_window", "_rekey_after", "_reject_after",
    )

    def __init__(
        self,
        peer_id: bytes,
        session_id: int,
        role: Role,
        created_at: float,
        send_key: bytes,
        recv_key: bytes,
        *,
        max_age: float = 3600.0,
        rekey_after: int = REKEY_AFTER_MESSAGES,
        reject_after: int = MAX_COUNTER,
    ):
        self.peer_id = peer_id
        self.session_id = session_id
        self.role = role
        self.created_at = created_at
        self.max_age = max_age
        self.confirmed = role is Role.INITIATOR
        self.retire_at: float | None = None
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self._send_dir = 0 if role is Role.INITIATOR else 1
        self._recv_dir = 1 - self._send_dir
        self._sent = 0
        self._window = ReplayWindow()
        self._rekey_after = rekey_after
        self._reject_after = min(reject_after, MAX_COUNTER)

    @property
    def sent(self) -> int:
        """The counter of the last message sealed (0 before the first)."""
        return self._sent

    @property
    def received(self) -> int:
        """The highest counter opened so far (0 before the first)."""
        return self._window.top

    @property
    def expires_at(self) -> float:
        return self.created_at + self.max_age

    def expired(self, now: float) -> bool:
        return now >= self.created_at + self.max_age

    @property
    def needs_rekey(self) -> bool:
        """Whether either direction has used up its message budget."""
        return max(self._sent, self._window.top) >= self._rekey_after

    def seal(self, inner_type: int, body: bytes) -> dict:
        """
        Seal one inner message; returns the SESSION_DATA fields.

        @raise SessionError: C{exhausted} when the counter would pass
            C{reject_after}; counters never wrap.
        """
        if self._sent >= self._reject_after:
            raise SessionError("exhausted", "rekey: this session has sealed its last message")
        self._sent = counter = self._sent + 1
        sealed = self._send.encrypt(
            _nonce(counter),
            bytes((inner_type,)) + body,
            _AAD.pack(self.session_id, counter, self._send_dir),
        )
        return {"session_id": self.session_id, "counter": counter, "sealed": sealed}

    def open(self, fields: Mapping) -> tuple[int, bytes]:
        """
        Authenticate and decrypt SESSION_DATA fields (a dict or the parsed
        Container); returns C{(inner_type, body)}.  The replay window only
        moves for messages whose tag verified.

        @raise SessionError: malformed, wrong_session, replay, too_old, bad_tag.
        """
        try:
            session_id = fields["session_id"]
            counter = fields["counter"]
            sealed = fields["sealed"]
        except (KeyError, TypeError):
            raise SessionError("malformed", "not SESSION_DATA fields") from None
        if type(session_id) is not int or not isinstance(sealed, (bytes, bytearray, memoryview)):
            raise SessionError("malformed", "session id or sealed bytes of the wrong type")
        if session_id != self.session_id:
            raise SessionError("wrong_session")
        if not isinstance(counter, int) or not 0 < counter <= MAX_COUNTER:
            raise SessionError("malformed", "counter out of range")
        window = self._window
        if not window.fresh(counter):
            too_old = window.top - counter >= ReplayWindow.SIZE
            raise SessionError("too_old" if too_old else "replay")
        try:
            plain = self._recv.decrypt(
                _nonce(counter), bytes(sealed), _AAD.pack(session_id, counter, self._recv_dir)
            )
        except InvalidTag:
            raise SessionError("bad_tag") from None
        except (TypeError, ValueError, OverflowError):
            raise SessionError("malformed", "sealed is not bytes of a usable size") from None
        window.mark(counter)
        self.confirmed = True
        if not plain:
            raise SessionError("malformed", "no inner type")
        return plain[0], plain[1:]

    def __repr__(self) -> str:
        return (f"<Session {self.session_id:016x} {self.role.value}"
                f" with {self.peer_id.hex()}>")


# the handshake


def _field(fields: Mapping, name: str):
    try:
        return fields[name]
    except (KeyError, TypeError):
        raise HandshakeError("malformed", f"no {name}") from None


def _build(msg_type: MessageType, fields: dict) -> bytes:
    try:
        return build_body(msg_type, fields)
    except ValueError as e:
        raise HandshakeError("malformed", str(e)) from None


def _init_signed(network_id: bytes, f: Mapping) -> bytes:
    return b"".join((
        _INIT_LABEL, network_id, _U64.pack(f["handshake_id"]), f["initiator_key"],
        f["ephemeral"], f["responder"], _U64.pack(f["timestamp_ms"]),
    ))


def _resp_signed(network_id: bytes, init_body: bytes, f: Mapping) -> bytes:
    return b"".join((
        _RESP_LABEL, network_id, hashlib.sha256(init_body).digest(),
        f["responder_key"], f["ephemeral"],
    ))


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _agree(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise HandshakeError("bad_ephemeral") from None


def _derive(
    shared: bytes,
    init_body: bytes,
    resp_body: bytes,
    network_id: bytes,
    initiator: bytes,
    responder: bytes,
) -> tuple[bytes, bytes, int]:
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * _KEY_SIZE + 8,
        salt=hashlib.sha256(init_body + resp_body).digest(),
        info=_SESSION_LABEL + network_id + initiator + responder,
    ).derive(shared)
    return okm[:_KEY_SIZE], okm[_KEY_SIZE:2 * _KEY_SIZE], _U64.unpack(okm[2 * _KEY_SIZE:])[0]


class _Pending:
    __slots__ = ("peer_id", "handshake_id", "ephemeral", "init_body", "started")

    def __init__(self, peer_id, handshake_id, ephemeral, init_body, started):
        self.peer_id = peer_id
        self.handshake_id = handshake_id
        self.ephemeral = ephemeral
        self.init_body = init_body
        self.started = started


class _Peer:
    """
    The sessions with one peer.

    - C{current}: confirmed, used to send.
    - C{next}: made by answering the peer's INIT, not yet confirmed by a
      message from the peer; opens but is not used to send.
    - C{old}: replaced sessions that still open in-flight messages until
      their C{retire_at}; C{retire_at is None} means the grace period has not
      started because the peer may not have switched yet (it switches when
      the first message under C{current} reaches it).
    """

    __slots__ = ("current", "next", "old")

    def __init__(self) -> None:
        self.current: Session | None = None
        self.next: Session | None = None
        self.old: list[Session] = []

    def sessions(self):
        if self.current is not None:
            yield self.current
        if self.next is not None:
            yield self.next
        yield from self.old


class SessionTable:
    """
    The sessions of one node in one network.

    @param max_skew: seconds an INIT's timestamp may differ from our clock;
        also how long a pending handshake waits for its RESP.
    @param retry_after: seconds before L{initiate} replaces a pending
        handshake with a fresh one (before that it returns None).
    @param max_age: a session's lifetime.
    @param grace: how long a replaced session still opens in-flight messages
        once the peer has switched.
    @param max_peers: peers with sessions; the least recently used goes first.
    @param max_pending: own handshakes in flight; the oldest goes first.
    @param max_replay: remembered INITs; when all are unexpired, new INITs
        are refused (C{busy}) rather than a replay let through.
    @param rng: C{rng(n)} returns n random bytes (handshake ids, ephemerals).
    """

    MAX_OLD = 3

    def __init__(
        self,
        identity: Identity,
        network_id: bytes,
        *,
        max_skew: float = 120.0,
        retry_after: float = 5.0,
        max_age: float = 3600.0,
        grace: float = 30.0,
        max_peers: int = 4096,
        max_pending: int = 256,
        max_replay: int = 16384,
        rng: Callable[[int], bytes] = os.urandom,
    ):
        if len(network_id) != NETWORK_ID_SIZE:
            raise ValueError(f"a network id has {NETWORK_ID_SIZE} bytes, not {len(network_id)}")
        self.identity = identity
        self.network_id = network_id
        self.peer_id = identity.peer_id
        self._public_key = identity.public_key
        self.max_skew = max_skew
        self.retry_after = retry_after
        self.max_age = max_age
        self.grace = grace
        self.max_peers = max_peers
        self.max_pending = max_pending
        self.max_replay = max_replay
        self._rng = rng
        self._peers: OrderedDict[bytes, _Peer] = OrderedDict()
        self._by_id: dict[int, Session] = {}
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._pending_by_id: dict[int, _Pending] = {}
        self._seen: dict[tuple[bytes, bytes], float] = {}
        self._seen_heap: list[tuple[float, tuple[bytes, bytes]]] = []

    def __len__(self) -> int:
        """The number of peers with at least one session."""
        return len(self._peers)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    # initiator

    def initiate(self, peer_id: bytes, now: float,
                 restart: bool = False) -> tuple[dict, int] | None:
        """
        Start a handshake with C{peer_id}: returns the HANDSHAKE_INIT fields
        and the handshake id, or None when one is already in flight (younger
        than C{retry_after}, unless C{restart}: it went out on a path that
        has since been replaced).  An older one is replaced: its RESP will
        be C{unknown_handshake}.
        """
        if peer_id == self.peer_id:
            raise ValueError("a node does not open a session with itself")
        pending = self._pending.get(peer_id)
        if pending is not None:
            if not restart and now < pending.started + self.retry_after:
                return None
            self._forget_pending(peer_id)
        self._trim_pending(now)
        handshake_id = _U64.unpack(self._rng(8))[0]
        while handshake_id in self._pending_by_id:
            handshake_id = _U64.unpack(self._rng(8))[0]
        ephemeral = X25519PrivateKey.from_private_bytes(self._rng(32))
        fields = {
            "handshake_id": handshake_id,
            "initiator_key": self._public_key,
            "ephemeral": _raw_public(ephemeral),
            "responder": peer_id,
            "timestamp_ms": max(0, int(now * 1000)),
        }
        fields["signature"] = self.identity.sign(_init_signed(self.network_id, fields))
        pending = _Pending(peer_id, handshake_id, ephemeral,
                           build_body(MessageType.HANDSHAKE_INIT, fields), now)
        self._pending[peer_id] = pending
        self._pending_by_id[handshake_id] = pending
        return fields, handshake_id

    def on_resp(self, sender: bytes, fields: Mapping, now: float) -> Session:
        """
        Complete our handshake with the HANDSHAKE_RESP C{fields} that
        C{sender} (the envelope's sender) sent.  A refused RESP leaves the
        pending handshake in place, so a forged one cannot cancel it.

        @raise HandshakeError: malformed, unknown_handshake, wrong_peer,
            sender_mismatch, weak_key, bad_signature, bad_ephemeral,
            duplicate_session.
        """
        values = {name: _field(fields, name)
                  for name in ("handshake_id", "responder_key", "ephemeral", "signature")}
        resp_body = _build(MessageType.HANDSHAKE_RESP, values)
        pending = self._pending_by_id.get(values["handshake_id"])
        if pending is None or now > pending.started + self.max_skew:
            raise HandshakeError("unknown_handshake")
        if sender != pending.peer_id:
            raise HandshakeError("wrong_peer")
        if peer_id_for(values["responder_key"]) != sender:
            raise HandshakeError("sender_mismatch")
        if weak_identity_key(values["responder_key"]):
            raise HandshakeError("weak_key")
        signed = _resp_signed(self.network_id, pending.init_body, values)
        if not verify_signature(values["responder_key"], values["signature"], signed):
            raise HandshakeError("bad_signature")
        shared = _agree(pending.ephemeral, values["ephemeral"])
        i2r, r2i, session_id = _derive(shared, pending.init_body, resp_body,
                                       self.network_id, self.peer_id, sender)
        session = Session(sender, session_id, Role.INITIATOR, now, i2r, r2i,
                          max_age=self.max_age)
        self._install(session, now)
        self._forget_pending(sender)
        return session

    # responder

    def on_init(
        self, sender: bytes, fields: Mapping, raw_body: bytes | None, now: float
    ) -> tuple[dict, Session]:
        """
        Answer the HANDSHAKE_INIT C{fields} (C{raw_body} its bytes as
        received, or None to rebuild them) from C{sender}.  Returns the
        HANDSHAKE_RESP fields and the new, unconfirmed session.

        When we have a handshake in flight towards the same peer, the one
        initiated by the lower peer id wins: ours if our id is lower
        (C{collision}), theirs otherwise (ours is abandoned).

        @raise HandshakeError: malformed, sender_mismatch, weak_key,
            wrong_responder, from_self, stale_timestamp, replayed,
            bad_signature, bad_ephemeral, busy, collision, duplicate_session.
        """
        values = {name: _field(fields, name) for name in (
            "handshake_id", "initiator_key", "ephemeral", "responder",
            "timestamp_ms", "signature")}
        init_body = _build(MessageType.HANDSHAKE_INIT, values)
        if raw_body is not None and bytes(raw_body) != init_body:
            raise HandshakeError("malformed", "body bytes do not match the fields")
        initiator = peer_id_for(values["initiator_key"])
        if sender != initiator:
            raise HandshakeError("sender_mismatch")
        if weak_identity_key(values["initiator_key"]):
            raise HandshakeError("weak_key")
        if values["responder"] != self.peer_id:
            raise HandshakeError("wrong_responder")
        if initiator == self.peer_id:
            raise HandshakeError("from_self")
        if abs(values["timestamp_ms"] - now * 1000) > self.max_skew * 1000:
            raise HandshakeError("stale_timestamp")
        seen_key = (initiator, values["ephemeral"])
        if self._seen.get(seen_key, -1.0) >= now:
            raise HandshakeError("replayed")
        signed = _init_signed(self.network_id, values)
        if not verify_signature(values["initiator_key"], values["signature"], signed):
            raise HandshakeError("bad_signature")
        ephemeral = X25519PrivateKey.from_private_bytes(self._rng(32))
        shared = _agree(ephemeral, values["ephemeral"])
        self._remember_init(seen_key, values["timestamp_ms"] / 1000 + self.max_skew, now)
        pending = self._pending.get(initiator)
        if pending is not None and now <= pending.started + self.max_skew:
            if self.peer_id < initiator:
                raise HandshakeError("collision", "our own handshake wins")
        response = {
            "handshake_id": values["handshake_id"],
            "responder_key": self._public_key,
            "ephemeral": _raw_public(ephemeral),
        }
        response["signature"] = self.identity.sign(
            _resp_signed(self.network_id, init_body, response))
        resp_body = build_body(MessageType.HANDSHAKE_RESP, response)
        i2r, r2i, session_id = _derive(shared, init_body, resp_body,
                                       self.network_id, initiator, self.peer_id)
        session = Session(initiator, session_id, Role.RESPONDER, now, r2i, i2r,
                          max_age=self.max_age)
        self._install(session, now)
        if pending is not None:
            self._forget_pending(initiator)
        return response, session

    def _remember_init(self, key: tuple, until: float, now: float) -> None:
        seen, heap = self._seen, self._seen_heap
        while heap and heap[0][0] < now:
            expiry, old = heapq.heappop(heap)
            if seen.get(old) == expiry:
                del seen[old]
        if len(seen) >= self.max_replay:
            raise HandshakeError("busy", "too many recent handshakes to tell replays apart")
        seen[key] = until
        heapq.heappush(heap, (until, key))

    # lookup

    def get(self, peer_id: bytes, now: float) -> Session | None:
        """
        The session to send to C{peer_id} with: confirmed and not expired.
        """
        entry = self._peers.get(peer_id)
        if entry is None:
            return None
        self._settle(peer_id, entry, now)
        if peer_id in self._peers:
            self._peers.move_to_end(peer_id)
        return entry.current

    def by_id(self, session_id: int, now: float | None = None) -> Session | None:
        """
        The session a SESSION_DATA message names: current, awaiting
        confirmation, or replaced but within its grace period.  Without
        C{now}, sessions that expired since the last L{expire} still count.
        """
        session = self._by_id.get(session_id)
        if session is None:
            return None
        peer_id = session.peer_id
        if now is not None:
            self._settle(peer_id, self._peers[peer_id], now)
            if self._by_id.get(session_id) is not session:
                return None
        self._peers.move_to_end(peer_id)
        return session

    def drop(self, peer_id: bytes) -> None:
        """Forget every session and pending handshake with C{peer_id}."""
        entry = self._peers.pop(peer_id, None)
        if entry is not None:
            for session in entry.sessions():
                self._by_id.pop(session.session_id, None)
        self._forget_pending(peer_id)

    def expire(self, now: float) -> int:
        """
        Drop expired sessions, finished grace periods, stale pending
        handshakes and replay-cache entries; returns the sessions dropped.
        """
        before = len(self._by_id)
        for peer_id, entry in list(self._peers.items()):
            self._settle(peer_id, entry, now)
        for peer_id, pending in list(self._pending.items()):
            if now > pending.started + self.max_skew:
                self._forget_pending(peer_id)
        seen, heap = self._seen, self._seen_heap
        while heap and heap[0][0] < now:
            expiry, key = heapq.heappop(heap)
            if seen.get(key) == expiry:
                del seen[key]
        return before - len(self._by_id)

    # state of one peer

    def _install(self, session: Session, now: float) -> None:
        if session.session_id in self._by_id:
            raise HandshakeError("duplicate_session")
        peer_id = session.peer_id
        entry = self._peers.get(peer_id)
        if entry is not None:
            self._settle(peer_id, entry, now)
        entry = self._peers.get(peer_id)
        if entry is None:
            entry = self._peers[peer_id] = _Peer()
            while len(self._peers) > self.max_peers:
                self._evict(self._peers.popitem(last=False)[1])
        else:
            self._peers.move_to_end(peer_id)
        self._by_id[session.session_id] = session
        if session.role is Role.INITIATOR:
            displaced = [s for s in (entry.current, entry.next) if s is not None]
            entry.current, entry.next = session, None
            for old in displaced:
                self._retire(entry, old, None)
        else:
            if entry.next is not None:
                self._retire(entry, entry.next, now + self.grace)
            entry.next = session

    def _retire(self, entry: _Peer, session: Session, at: float | None) -> None:
        session.retire_at = at
        entry.old.append(session)
        while len(entry.old) > self.MAX_OLD:
            self._by_id.pop(entry.old.pop(0).session_id, None)

    def _settle(self, peer_id: bytes, entry: _Peer, now: float) -> None:
        by_id = self._by_id
        nxt = entry.next
        if nxt is not None and nxt.confirmed and not nxt.expired(now):
            if entry.current is not None:
                self._retire(entry, entry.current, now + self.grace)
            entry.current, entry.next = nxt, None
        for name in ("current", "next"):
            session = getattr(entry, name)
            if session is not None and session.expired(now):
                by_id.pop(session.session_id, None)
                setattr(entry, name, None)
        current = entry.current
        switched = current is None or current.sent > 0 or current.received > 0
        kept = []
        for session in entry.old:
            if session.retire_at is None and switched:
                session.retire_at = now + self.grace
            if session.expired(now) or (session.retire_at is not None and now >= session.retire_at):
                by_id.pop(session.session_id, None)
            else:
                kept.append(session)
        entry.old = kept
        if current is None and entry.next is None and not kept:
            del self._peers[peer_id]

    def _evict(self, entry: _Peer) -> None:
        for session in entry.sessions():
            self._by_id.pop(session.session_id, None)

    def _trim_pending(self, now: float) -> None:
        for peer_id, pending in list(self._pending.items()):
            if now > pending.started + self.max_skew:
                self._forget_pending(peer_id)
        while len(self._pending) >= self.max_pending:
            self._forget_pending(next(iter(self._pending)))

    def _forget_pending(self, peer_id: bytes) -> None:
        pending = self._pending.pop(peer_id, None)
        if pending is not None:
            self._pending_by_id.pop(pending.handshake_id, None)
