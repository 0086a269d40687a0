"""
The mesh envelope: the clear header every omerta frame starts with.

    offset size field
    0      2    magic          0xF0 0x4D ("\\xf0M"; never a STUN first byte)
    2      1    version        1
    3      1    type           L{omerta.wire.messages.MessageType} (bits 0-5),
                               bit 6 L{ADDRESSED}
    4      8    network id     first 8 bytes of SHA-256 over the network key
    12     16   sender         the sender's peer id
    28     8    boot id        random per sender process start
    36     8    counter        per (network, sender, boot); the AEAD nonce
    44     n+16 sealed body    ChaCha20-Poly1305(body), 16-byte tag last

The whole header is the AEAD's associated data, so no field of it can be
changed without the tag failing.  An I{addressed} frame (type bit 6 set)
also binds its receiver: the associated data is the header followed by the
receiver's peer id and boot id (24 bytes that are not sent, since the
receiver knows them), so the frame opens only at that node and only in that
run of it.  A sender addresses its frames once it has proven the
receiver's current run; before that (first contact) they are unaddressed.

L{HEADER} is the precompiled C{struct} used on the per-packet path;
L{HeaderStruct} is the construct definition of the same bytes, kept as the
readable specification.  A test proves the two byte-identical.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import construct as c

from omerta.wire import ParseError
from omerta.wire.codec import PEER_ID

MAGIC = b"\xf0M"
VERSION = 1
TAG_SIZE = 16
NETWORK_ID_SIZE = 8
BOOT_ID_SIZE = 8
ADDRESSED = 0x40
"""Type-byte flag: the frame is bound to its receiver's peer id and boot id."""

HeaderStruct = c.Struct(
    "magic" / c.Const(MAGIC),
    "version" / c.Int8ub,
    "type" / c.Int8ub,
    "network_id" / c.Bytes(NETWORK_ID_SIZE),
    "sender" / PEER_ID,
    "boot" / c.Bytes(BOOT_ID_SIZE),
    "counter" / c.Int64ub,
)

HEADER = struct.Struct("!2sBB8s16s8sQ")
HEADER_SIZE = HEADER.size
MIN_FRAME_SIZE = HEADER_SIZE + TAG_SIZE
assert HeaderStruct.sizeof() == HEADER_SIZE


class Header(NamedTuple):
    magic: bytes
    version: int
    type: int
    network_id: bytes
    sender: bytes
    boot: bytes
    counter: int

    @property
    def message_type(self) -> int:
        """The message type, without the L{ADDRESSED} flag."""
        return self.type & ~ADDRESSED

    @property
    def addressed(self) -> bool:
        return bool(self.type & ADDRESSED)


def is_frame(datagram: bytes) -> bool:
    """
    Whether a datagram claims to be an omerta frame (cheap first-bytes test
    used by the socket's demultiplexer).
    """
    return datagram[:2] == MAGIC


def parse_header(frame: bytes) -> Header:
    """
    Parse the clear header of a frame (fast path).

    @raise ParseError: too short for a header and a tag, wrong magic, or an
        unsupported version.
    """
    if len(frame) < MIN_FRAME_SIZE:
        raise ParseError(f"frame of {len(frame)} bytes is shorter than {MIN_FRAME_SIZE}")
    header = Header._make(HEADER.unpack_from(frame))
    if header.magic != MAGIC:
        raise ParseError("not an omerta frame (bad magic)")
    if header.version != VERSION:
        raise ParseError(f"unsupported frame version {header.version}")
    return header


def build_header(
    msg_type: int, network_id: bytes, sender: bytes, boot: bytes, counter: int
) -> bytes:
    """
    Build a clear header (fast path); sizes are the caller's responsibility.
    """
    return HEADER.pack(MAGIC, VERSION, msg_type, network_id, sender, boot, counter)
