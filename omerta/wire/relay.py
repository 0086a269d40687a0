"""
Relayed data: the one frame a relay forwards without opening.

    offset size field
    0      2    magic      0xF0 0x4D, as an envelope
    2      1    version    1
    3      1    type       0x80 (RELAY_DATA)
    4      8    session    the relay session id, chosen by the relay
    12     n    payload    a whole sealed envelope frame of the sender

The relay looks the first 12 bytes up in its session table, checks that the
datagram came from one of the two addresses bound to the session, and sends
the same bytes on to the other one.  It never opens the payload: the receiver
does, with the network key and, for application data, the per-pair session
key, so the relay can neither read nor forge what it carries.  The receiver
also checks that the payload's sender is the peer the session was opened
with.

L{HEADER} is the precompiled struct; L{RelayDataStruct} the construct
definition of the same bytes (the specification; a test proves them equal).
"""

from __future__ import annotations

import struct

import construct as c

from omerta.wire import ParseError
from omerta.wire.envelope import MAGIC, VERSION

RELAY_DATA = 0x80
SESSION_SIZE = 8

HEADER = struct.Struct("!2sBB8s")
HEADER_SIZE = HEADER.size
PREFIX = HEADER.pack(MAGIC, VERSION, RELAY_DATA, bytes(SESSION_SIZE))[:4]
"""The first four bytes of every relayed-data frame."""

RelayDataStruct = c.Struct(
    "magic" / c.Const(MAGIC),
    "version" / c.Const(VERSION, c.Int8ub),
    "type" / c.Const(RELAY_DATA, c.Int8ub),
    "session" / c.Bytes(SESSION_SIZE),
    "payload" / c.GreedyBytes,
)


def session_header(session: bytes) -> bytes:
    """
    The 12-byte header of every datagram of a relay session: the key of the
    relay's and the endpoints' session tables.
    """
    if len(session) != SESSION_SIZE:
        raise ValueError(f"a relay session id is {SESSION_SIZE} bytes, not {len(session)}")
    return PREFIX + session


def is_relay_data(datagram: bytes) -> bool:
    return datagram.startswith(PREFIX)


def parse(datagram: bytes) -> tuple[bytes, bytes]:
    """
    Split a relayed-data frame into (session, payload).

    @raise ParseError: not a relayed-data frame, or no payload.
    """
    if not datagram.startswith(PREFIX) or len(datagram) <= HEADER_SIZE:
        raise ParseError("not a relayed-data frame")
    return datagram[4:HEADER_SIZE], datagram[HEADER_SIZE:]
