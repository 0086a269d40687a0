"""
Building blocks shared by the omerta codecs: strict parsing that turns every
decoder failure into L{ParseError}, and construct types for the values that
recur across messages (peer ids, endpoints, short strings).
"""

from __future__ import annotations

import io
import ipaddress

import string

import construct as c

from omerta.wire import ParseError

PEER_ID = c.Bytes(16)
NO_PEER = bytes(16)
SHORT_TEXT = c.PascalString(c.Int8ub, "utf8")


def parse_exact(con: c.Construct, data: bytes, what: str):
    """
    Parse all of C{data} with C{con}.

    @raise ParseError: on any decoding problem or on trailing bytes; the
        message starts with C{what}.
    """
    stream = io.BytesIO(data)
    try:
        value = con.parse_stream(stream)
    except (c.ConstructError, UnicodeError, ValueError, OverflowError) as e:
        raise ParseError(f"{what}: {e}") from None
    if stream.tell() != len(data):
        raise ParseError(f"{what}: {len(data) - stream.tell()} trailing bytes")
    return value


def as_plain(value):
    """
    A parsed construct value as plain dicts and lists, without construct's
    private keys (C{_io}): for comparing, printing or serialising.
    """
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [as_plain(v) for v in value]
    return value


def build(con: c.Construct, value, what: str) -> bytes:
    """
    Build C{value} with C{con}; a value that does not fit the format raises
    C{ValueError} naming C{what} (a programming error, not bad input).
    """
    try:
        return con.build(value)
    except (c.ConstructError, UnicodeError, OverflowError) as e:
        raise ValueError(f"cannot build {what}: {e}") from None


class _EndpointAdapter(c.Adapter):
    """
    An (ip, port) tuple on the wire as family (4 or 6), packed address, port.
    """

    def _decode(self, obj, context, path):
        return (str(ipaddress.ip_address(obj.address)), obj.port)

    def _encode(self, obj, context, path):
        host, port = obj
        ip = ipaddress.ip_address(host)
        return {"family": ip.version, "address": ip.packed, "port": port}


ENDPOINT = _EndpointAdapter(
    c.Struct(
        "family" / c.Int8ub,
        "address"
        / c.Switch(
            c.this.family,
            {4: c.Bytes(4), 6: c.Bytes(16)},
            default=c.Error,
        ),
        "port" / c.Int16ub,
    )
)


def hex_id(text: str, what: str) -> bytes:
    """
    An 8-byte id as printed (16 hex digits) to its wire form.

    @raise ValueError: not 16 hex digits (the message names C{what}).
    """
    if len(text) != 16 or any(ch not in string.hexdigits for ch in text):
        raise ValueError(f"a {what} id is 16 hex digits, not {text!r}")
    return bytes.fromhex(text)
