"""
The bodies of mesh frames, one construct definition per message type.

A body travels sealed inside an envelope (L{omerta.wire.envelope}); the type
byte is in the envelope's clear header.  Values are construct Containers:
attribute access on parse, plain dicts (or keyword arguments) on build.

Type ranges:

    0x01-0x0f  discovery, gossip and liveness
    0x10-0x1f  relay control
    0x20-0x2f  hole punching
    0x30-0x3f  application data and request/response
    0x80-0xff  reserved for unsealed data-path frames (relayed data), whose
               layout is not an envelope
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct

import construct as c

from omerta.wire import ParseError
from omerta.wire.codec import ENDPOINT, PEER_ID, SHORT_TEXT, build, parse_exact


class MessageType(enum.IntEnum):
    PING = 0x01
    PONG = 0x02
    ANNOUNCE = 0x03
    PEER_LIST = 0x04
    FIND_PEER = 0x05
    PEER_INFO = 0x06
    PEER_NOT_FOUND = 0x07
    FRESHNESS_QUERY = 0x08
    FRESHNESS_ANSWER = 0x09
    PATH_FAILED = 0x0A
    INDIRECT_PING = 0x0B
    INDIRECT_ACK = 0x0C
    MEMBERSHIP = 0x0D
    SYNC_DIGEST = 0x0E
    SYNC_SUMMARY = 0x0F
    RELAY_RESERVE = 0x10
    RELAY_ACCEPT = 0x11
    RELAY_DENY = 0x12
    RELAY_END = 0x13
    RELAY_CONNECT = 0x14
    RELAY_SESSION = 0x15
    PUNCH_REQUEST = 0x20
    PUNCH_EXECUTE = 0x21
    PUNCH_PROBE = 0x22
    PUNCH_ACK = 0x23
    PUNCH_RESULT = 0x24
    PUNCH_READY = 0x25
    APP_DATA = 0x30
    REQUEST = 0x31
    RESPONSE = 0x32
    HANDSHAKE_INIT = 0x38
    HANDSHAKE_RESP = 0x39
    SESSION_DATA = 0x3A


class NoticeKind(enum.IntEnum):
    """What a MEMBERSHIP notice says of a peer (L{omerta.mesh.membership})."""

    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class NatType(enum.IntEnum):
    UNKNOWN = 0
    PUBLIC = 1
    FULL_CONE = 2
    RESTRICTED_CONE = 3
    PORT_RESTRICTED_CONE = 4
    SYMMETRIC = 5
    BLOCKED = 6


class PathKind(enum.IntEnum):
    DIRECT = 1
    RELAYED = 2
    PUNCHABLE = 3
    LAN = 4


class Capability(enum.IntFlag):
    NONE = 0
    RELAY = 1
    PROVIDER = 2
    STUN = 4
    COORDINATOR = 8


#: The capabilities of a server: it answers strangers by trade, so its
#: announced address is worth a datagram whatever NAT type it reports (the
#: first relay of a network has no STUN server to classify itself with).
SERVING = Capability.RELAY | Capability.STUN


class CandidateKind(enum.IntEnum):
    HOST = 1
    SERVER_REFLEXIVE = 2
    RELAYED = 3


class PunchStrategy(enum.IntEnum):
    """
    What the coordinator tells one side of a hole punch (the other side gets
    the mirror image): both probe at once, this side first, the other side
    first (this one answers what arrives), or no punch at all.  Between two
    port-restricted cones: LEAD_HOLD (probe first, then hold the own mapping open
    with probes that die before the peer's router) and FOLLOW_RETRY (probe
    just after, and if nothing came through, go quiet until the peer's
    router forgot what the leader's probes left there, then probe again);
    see L{omerta.mesh.punch}.
    """

    SIMULTANEOUS = 1
    YOU_FIRST = 2
    THEY_FIRST = 3
    IMPOSSIBLE = 4
    LEAD_HOLD = 5
    FOLLOW_RETRY = 6


class ResponseStatus(enum.IntEnum):
    OK = 0
    ERROR = 1
    NO_SUCH_CHANNEL = 2
    TIMEOUT = 3


class RelayDenyReason(enum.IntEnum):
    FULL = 1
    NOT_A_RELAY = 2
    NOT_A_MEMBER = 3
    RATE_LIMITED = 4
    TOO_MANY_SESSIONS = 5
    NO_RESERVATION = 6
    UNPROVEN = 7
    SELF = 8
    TOO_MANY_RESERVATIONS = 9


class RelayEndReason(enum.IntEnum):
    CLOSED = 1
    EXPIRED = 2
    BYTE_LIMIT = 3
    RESERVATION_GONE = 4
    RELAY_STOPPING = 5
    REPLACED = 6
    IDLE = 7


Contact = c.Struct(
    "peer_id" / PEER_ID,
    "endpoint" / ENDPOINT,
    "age_ms" / c.Int32ub,
)

Path = c.Struct(
    "kind" / c.Int8ub,
    "endpoint" / ENDPOINT,
    "via" / PEER_ID,
)

Resources = c.Struct(
    "cpu_cores" / c.Int16ub,
    "memory_mb" / c.Int32ub,
    "disk_gb" / c.Int32ub,
    "gpus" / c.Int8ub,
)

AnnouncementRecord = c.Struct(
    "public_key" / c.Bytes(32),
    "name" / SHORT_TEXT,
    "sequence" / c.Int64ub,
    "timestamp_ms" / c.Int64ub,
    "ttl_s" / c.Int32ub,
    "nat_type" / c.Int8ub,
    "capabilities" / c.Int16ub,
    "paths" / c.PrefixedArray(c.Int8ub, Path),
    "resources" / Resources,
)
"""
The signed part of an announcement.  It travels as raw bytes inside
L{SignedAnnouncement} so the signature is checked over exactly the bytes the
signer produced.
"""

SignedAnnouncement = c.Struct(
    "record" / c.Prefixed(c.Int16ub, c.GreedyBytes),
    "signature" / c.Bytes(64),
)

PING_PROVE = 0x01
"""PING flag: answer with an identity proof (L{omerta.crypto.proof})."""

PROOF = c.Prefixed(c.Int8ub, c.GreedyBytes)
"""
Empty, or an identity proof: the sender's 32-byte Ed25519 public key and a
64-byte signature (L{omerta.crypto.proof}).
"""

PADDING = c.Prefixed(c.Int16ub, c.GreedyBytes)
"""
Zero bytes that make a request as large as the answer it asks for, so an
answer to an address not proven yet is never larger than its request.
"""

Notice = c.Struct(
    "kind" / c.Int8ub,
    "peer" / PEER_ID,
    "sequence" / c.Int64ub,
    "by" / PEER_ID,
    "signature" / c.Prefixed(c.Int8ub, c.GreedyBytes),
)
"""
A membership notice about C{peer}'s announcement number C{sequence}:
suspected or declared dead by C{by}, or left (then C{signature} is the
peer's own, L{omerta.mesh.membership.leave_signature}; empty otherwise).
"""

Candidate = c.Struct(
    "kind" / c.Int8ub,
    "endpoint" / ENDPOINT,
)

BODIES: dict[MessageType, c.Construct] = {
    MessageType.PING: c.Struct(
        "nonce" / c.Int64ub,
        "sent_ms" / c.Int64ub,
        "flags" / c.Int8ub,
        "contacts" / c.PrefixedArray(c.Int8ub, Contact),
        "padding" / PADDING,
    ),
    MessageType.PONG: c.Struct(
        "nonce" / c.Int64ub,
        "echo_ms" / c.Int64ub,
        "observed" / ENDPOINT,
        "contacts" / c.PrefixedArray(c.Int8ub, Contact),
        "proof" / PROOF,
    ),
    MessageType.ANNOUNCE: c.Struct(
        "hops" / c.Int8ub,
        "announcement" / SignedAnnouncement,
    ),
    MessageType.PEER_LIST: c.Struct(
        "request" / c.Flag,
        "announcements" / c.PrefixedArray(
            c.Int8ub, c.Struct("hops" / c.Int8ub, "announcement" / SignedAnnouncement)
        ),
    ),
    MessageType.FIND_PEER: c.Struct(
        "query_id" / c.Int64ub,
        "target" / PEER_ID,
        "hops" / c.Int8ub,
    ),
    MessageType.PEER_INFO: c.Struct(
        "query_id" / c.Int64ub,
        "announcement" / SignedAnnouncement,
    ),
    MessageType.PEER_NOT_FOUND: c.Struct(
        "query_id" / c.Int64ub,
        "target" / PEER_ID,
    ),
    MessageType.FRESHNESS_QUERY: c.Struct(
        "query_id" / c.Int64ub,
        "origin" / PEER_ID,
        "target" / PEER_ID,
        "max_age_s" / c.Int32ub,
        "hops" / c.Int8ub,
    ),
    MessageType.FRESHNESS_ANSWER: c.Struct(
        "query_id" / c.Int64ub,
        "target" / PEER_ID,
        "heard_ago_ms" / c.Int32ub,
        "path" / Path,
    ),
    MessageType.PATH_FAILED: c.Struct(
        "target" / PEER_ID,
        "path" / Path,
    ),
    MessageType.INDIRECT_PING: c.Struct(
        "nonce" / c.Int64ub,
        "target" / PEER_ID,
        "endpoint" / ENDPOINT,
    ),
    MessageType.INDIRECT_ACK: c.Struct(
        "nonce" / c.Int64ub,
        "target" / PEER_ID,
        "alive" / c.Flag,
        "rtt_us" / c.Int32ub,
    ),
    MessageType.MEMBERSHIP: c.Struct(
        "notices" / c.PrefixedArray(c.Int8ub, Notice),
    ),
    MessageType.SYNC_DIGEST: c.Struct(
        "buckets" / c.Int16ub,
        "hashes" / c.PrefixedArray(c.Int16ub, c.Int32ub),
    ),
    MessageType.SYNC_SUMMARY: c.Struct(
        "buckets" / c.Int16ub,
        "indices" / c.PrefixedArray(c.Int8ub, c.Int16ub),
        "entries" / c.PrefixedArray(c.Int8ub, c.Struct("peer" / PEER_ID,
                                                       "sequence" / c.Int64ub)),
        "want" / c.PrefixedArray(c.Int8ub, PEER_ID),
    ),
    MessageType.RELAY_RESERVE: c.Struct(
        "lifetime_s" / c.Int32ub,
    ),
    MessageType.RELAY_ACCEPT: c.Struct(
        "lifetime_s" / c.Int32ub,
        "session_limit" / c.Int16ub,
        "free_sessions" / c.Int16ub,
    ),
    MessageType.RELAY_DENY: c.Struct(
        "request" / c.Int8ub,
        "target" / PEER_ID,
        "reason" / c.Int8ub,
        "detail" / SHORT_TEXT,
    ),
    MessageType.RELAY_END: c.Struct(
        "session" / c.Bytes(8),
        "reason" / c.Int8ub,
    ),
    MessageType.RELAY_CONNECT: c.Struct(
        "target" / PEER_ID,
    ),
    MessageType.RELAY_SESSION: c.Struct(
        "session" / c.Bytes(8),
        "peer" / PEER_ID,
        "lifetime_s" / c.Int32ub,
        "max_bytes" / c.Int64ub,
    ),
    MessageType.PUNCH_REQUEST: c.Struct(
        "attempt_id" / c.Int64ub,
        "target" / PEER_ID,
        "nat_type" / c.Int8ub,
        "candidates" / c.PrefixedArray(c.Int8ub, Candidate),
    ),
    MessageType.PUNCH_EXECUTE: c.Struct(
        "attempt_id" / c.Int64ub,
        "peer" / PEER_ID,
        "strategy" / c.Int8ub,
        "start_in_ms" / c.Int32ub,
        "spray" / c.Int16ub,
        "candidates" / c.PrefixedArray(c.Int8ub, Candidate),
    ),
    MessageType.PUNCH_PROBE: c.Struct(
        "attempt_id" / c.Int64ub,
        "seq" / c.Int16ub,
        "sent_ms" / c.Int64ub,
        "padding" / PADDING,
    ),
    MessageType.PUNCH_ACK: c.Struct(
        "attempt_id" / c.Int64ub,
        "seq" / c.Int16ub,
        "observed" / ENDPOINT,
        "proof" / PROOF,
    ),
    MessageType.PUNCH_READY: c.Struct(
        "attempt_id" / c.Int64ub,
    ),
    MessageType.PUNCH_RESULT: c.Struct(
        "attempt_id" / c.Int64ub,
        "peer" / PEER_ID,
        "success" / c.Flag,
        "endpoint" / ENDPOINT,
        "elapsed_ms" / c.Int32ub,
    ),
    MessageType.APP_DATA: c.Struct(
        "channel" / SHORT_TEXT,
        "payload" / c.GreedyBytes,
    ),
    MessageType.REQUEST: c.Struct(
        "request_id" / c.Int64ub,
        "trace_id" / c.Bytes(8),
        "channel" / SHORT_TEXT,
        "timeout_ms" / c.Int32ub,
        "payload" / c.GreedyBytes,
    ),
    MessageType.RESPONSE: c.Struct(
        "request_id" / c.Int64ub,
        "trace_id" / c.Bytes(8),
        "status" / c.Int8ub,
        "payload" / c.GreedyBytes,
    ),
    MessageType.HANDSHAKE_INIT: c.Struct(
        "handshake_id" / c.Int64ub,
        "initiator_key" / c.Bytes(32),
        "ephemeral" / c.Bytes(32),
        "responder" / PEER_ID,
        "timestamp_ms" / c.Int64ub,
        "signature" / c.Bytes(64),
    ),
    MessageType.HANDSHAKE_RESP: c.Struct(
        "handshake_id" / c.Int64ub,
        "responder_key" / c.Bytes(32),
        "ephemeral" / c.Bytes(32),
        "signature" / c.Bytes(64),
    ),
    MessageType.SESSION_DATA: c.Struct(
        "session_id" / c.Int64ub,
        "counter" / c.Int64ub,
        "sealed" / c.GreedyBytes,
    ),
}


def build_body(msg_type: MessageType, value=None, **fields) -> bytes:
    """
    Build the body of a message of C{msg_type} from a dict or keywords.
    """
    fast = _FAST_BUILD.get(msg_type)
    if fast is not None:
        return fast(value if value is not None else fields)
    return build(BODIES[msg_type], value if value is not None else fields, msg_type.name)


def parse_body(msg_type: int, body: bytes):
    """
    Parse the body of a message of type C{msg_type}.

    @raise ParseError: unknown type, or a body that does not match it.
    """
    try:
        kind = MessageType(msg_type)
    except ValueError:
        raise ParseError(f"unknown message type 0x{msg_type:02x}") from None
    fast = _FAST_PARSE.get(kind)
    if fast is not None:
        return fast(body)
    return parse_exact(BODIES[kind], body, kind.name)


def build_record(value=None, **fields) -> bytes:
    return build(AnnouncementRecord, value if value is not None else fields, "announcement")


def parse_record(data: bytes):
    return parse_exact(AnnouncementRecord, data, "announcement record")


# -- the per-packet fast path -------------------------------------------------
#
# PING and PONG go with every keepalive and every `omerta mesh ping`.
# construct takes 25-40 us to build or parse one (60-95 us from cold caches,
# which is how an idle node meets them); these take 2-3 us.  They give and
# take exactly the bytes of the construct definitions above, which stay the
# specification (tests/test_messages.py proves the two identical); every
# other type goes through construct.

_PING_HEAD = struct.Struct("!QQB")  # nonce, sent_ms, flags
_PONG_HEAD = struct.Struct("!QQ")   # nonce, echo_ms
_PORT = struct.Struct("!H")
_AGE = struct.Struct("!I")


def _pack_endpoint(endpoint) -> bytes:
    host, port = endpoint
    try:
        return b"\x04" + socket.inet_pton(socket.AF_INET, host) + _PORT.pack(port)
    except (OSError, TypeError):
        ip = ipaddress.ip_address(host)
        return bytes((ip.version,)) + ip.packed + _PORT.pack(port)


def _unpack_endpoint(data: bytes, at: int) -> tuple[tuple[str, int], int]:
    family = data[at]
    if family == 4:
        end = at + 5
        host = socket.inet_ntop(socket.AF_INET, data[at + 1:end])
    elif family == 6:
        end = at + 17
        host = str(ipaddress.IPv6Address(data[at + 1:end]))
    else:
        raise ParseError(f"unknown address family {family}")
    (port,) = _PORT.unpack_from(data, end)
    return (host, port), end + 2


def _pack_contacts(contacts) -> bytes:
    parts = [bytes((len(contacts),))]
    for contact in contacts:
        peer_id = contact["peer_id"]
        if len(peer_id) != 16:
            raise ValueError("a contact's peer id is 16 bytes")
        parts.append(peer_id + _pack_endpoint(contact["endpoint"]) + _AGE.pack(contact["age_ms"]))
    return b"".join(parts)


def _unpack_contacts(data: bytes, at: int) -> tuple[c.ListContainer, int]:
    contacts = c.ListContainer()
    count = data[at]
    at += 1
    for _ in range(count):
        peer_id = data[at:at + 16]
        if len(peer_id) != 16:
            raise ParseError("a contact cut short")
        endpoint, at = _unpack_endpoint(data, at + 16)
        (age_ms,) = _AGE.unpack_from(data, at)
        at += 4
        contacts.append(c.Container(peer_id=peer_id, endpoint=endpoint, age_ms=age_ms))
    return contacts, at


def _build_ping(fields) -> bytes:
    padding = fields["padding"]
    try:
        return b"".join((
            _PING_HEAD.pack(fields["nonce"], fields["sent_ms"], fields["flags"]),
            _pack_contacts(fields["contacts"]), _PORT.pack(len(padding)), padding))
    except (struct.error, ValueError, OverflowError) as e:
        raise ValueError(f"cannot build PING: {e}") from None


def _parse_ping(body: bytes):
    try:
        nonce, sent_ms, flags = _PING_HEAD.unpack_from(body)
        contacts, at = _unpack_contacts(body, _PING_HEAD.size)
        (size,) = _PORT.unpack_from(body, at)
    except (struct.error, IndexError, ValueError) as e:  # ParseError is a ValueError
        raise ParseError(f"PING: {e}") from None
    at += 2
    if at + size != len(body):
        raise ParseError(f"PING: {len(body) - at} bytes of padding, {size} announced")
    return c.Container(nonce=nonce, sent_ms=sent_ms, flags=flags, contacts=contacts,
                       padding=body[at:])


def _build_pong(fields) -> bytes:
    proof = fields["proof"]
    try:
        return b"".join((
            _PONG_HEAD.pack(fields["nonce"], fields["echo_ms"]),
            _pack_endpoint(fields["observed"]), _pack_contacts(fields["contacts"]),
            bytes((len(proof),)), proof))
    except (struct.error, ValueError, OverflowError) as e:
        raise ValueError(f"cannot build PONG: {e}") from None


def _parse_pong(body: bytes):
    try:
        nonce, echo_ms = _PONG_HEAD.unpack_from(body)
        observed, at = _unpack_endpoint(body, _PONG_HEAD.size)
        contacts, at = _unpack_contacts(body, at)
        size = body[at]
    except (struct.error, IndexError, ValueError) as e:  # ParseError is a ValueError
        raise ParseError(f"PONG: {e}") from None
    at += 1
    if at + size != len(body):
        raise ParseError(f"PONG: {len(body) - at} bytes of proof, {size} announced")
    return c.Container(nonce=nonce, echo_ms=echo_ms, observed=observed, contacts=contacts,
                       proof=body[at:])


_FAST_BUILD = {MessageType.PING: _build_ping, MessageType.PONG: _build_pong}
_FAST_PARSE = {MessageType.PING: _parse_ping, MessageType.PONG: _parse_pong}
