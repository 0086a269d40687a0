"""
Tell apart what arrives on a node's single socket by its first bytes.

- STUN (RFC 8489): the two top bits of the first byte are zero, the length
  field covers the rest of the datagram in 4-byte units.  The magic cookie
  0x2112A442 at offset 4 marks RFC 5389/8489 messages; classic RFC 3489
  messages have a transaction id there instead and are classified as STUN
  too, so the STUN layer can answer old clients.
- omerta frames start with the envelope magic (first byte 0xF0).
- Anything else is junk.
"""

from __future__ import annotations

import enum

from omerta.wire.envelope import MAGIC

STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
STUN_HEADER_SIZE = 20


class Kind(enum.Enum):
    STUN = "stun"
    FRAME = "frame"
    JUNK = "junk"


def classify(datagram: bytes) -> Kind:
    if datagram[:2] == MAGIC:
        return Kind.FRAME
    size = len(datagram)
    if (
        size >= STUN_HEADER_SIZE
        and datagram[0] & 0xC0 == 0
        and int.from_bytes(datagram[2:4], "big") == size - STUN_HEADER_SIZE
        and size % 4 == 0
    ):
        return Kind.STUN
    return Kind.JUNK
