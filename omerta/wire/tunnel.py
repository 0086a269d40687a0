"""
Tunnel data: one WireGuard datagram carried between two members.

    offset size field
    0      2    magic      0xF0 0x4D, as an envelope
    2      1    version    1
    3      1    type       0x81 (TUNNEL_DATA)
    4      8    session    the per-pair session id (omerta.crypto.session)
    12     8    counter    the session's message counter in this direction
    20     n    sealed     ChaCha20-Poly1305 under the session's key of
                           0x81 || kind (1) || the WireGuard datagram
    20+n   16   tag        (the last 16 bytes of sealed)

It is the session's SESSION_DATA without the envelope around it: one AEAD
per datagram instead of two, with the same key, nonce, replay window and
associated data (session id, counter, direction).  Only the two members of
the pair hold the key (their signed handshake binds both identities and the
network), so neither a relay nor another member can forge or replay one,
and the receiver knows the sender from the session alone.  The 0x81 inside
the sealed part keeps a tunnel datagram from ever opening as a SESSION_DATA
message and the other way round.

C{kind} says which of the receiver's WireGuard interfaces the datagram is
for: L{TO_PROVIDER} (the provider's interface, that terminates its
consumers; a consumer sends these) or L{TO_CONSUMER} (the consumer's
interface for that provider; a provider sends these).  A node that is both
a consumer and a provider of the same peer keeps the two apart.

Over a relay the whole frame is the payload of a RELAY_DATA frame
(omerta.wire.relay), 12 more bytes.

L{HEADER} is the precompiled struct of the clear 20 bytes;
L{TunnelDataStruct} the construct definition of the frame (the
specification; a test proves them equal).
"""

from __future__ import annotations

import struct

import construct as c

from omerta.wire import ParseError
from omerta.wire.envelope import MAGIC, VERSION

TUNNEL_DATA = 0x81
INNER_TYPE = TUNNEL_DATA
"""The first byte of the sealed plaintext."""

TO_PROVIDER = 1
TO_CONSUMER = 2
KINDS = (TO_PROVIDER, TO_CONSUMER)

HEADER = struct.Struct("!2sBBQQ")
MAGIC_VERSION_TYPE = (MAGIC, VERSION, TUNNEL_DATA)
"""The first three fields of L{HEADER}, for C{HEADER.pack(*MAGIC_VERSION_TYPE, ...)}."""
HEADER_SIZE = HEADER.size
PREFIX = MAGIC + bytes((VERSION, TUNNEL_DATA))
"""The first four bytes of every tunnel frame."""
TAG_SIZE = 16

OVERHEAD = HEADER_SIZE + 2 + TAG_SIZE
"""Bytes a tunnel frame adds to a WireGuard datagram (38)."""

TunnelDataStruct = c.Struct(
    "magic" / c.Const(MAGIC),
    "version" / c.Const(VERSION, c.Int8ub),
    "type" / c.Const(TUNNEL_DATA, c.Int8ub),
    "session_id" / c.Int64ub,
    "counter" / c.Int64ub,
    "sealed" / c.GreedyBytes,
)


def header(session_id: int, counter: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, TUNNEL_DATA, session_id, counter)


def parse(frame: bytes) -> tuple[int, int, bytes]:
    """
    Split a tunnel frame into (session id, counter, sealed).

    @raise ParseError: not a tunnel frame, or too short to hold a tag.
    """
    if not frame.startswith(PREFIX) or len(frame) < HEADER_SIZE + TAG_SIZE + 2:
        raise ParseError("not a tunnel frame")
    _, _, _, session_id, counter = HEADER.unpack_from(frame)
    return session_id, counter, frame[HEADER_SIZE:]
