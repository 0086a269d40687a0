"""
The invite payload: the bytes behind C{omerta://join/<base64url>}.

Layout (all integers big-endian)::

    version             uint8            = 1
    network_key         32 bytes
    name                uint8 length + UTF-8 (1-63 bytes)
    bootstrap           uint8 count (0-16) of
                            uint16 length + UTF-8 (1-384 bytes), each
                            ID_OR_NAME@host:port
    created_at          uint64           unix seconds
    expires_at          uint64           unix seconds, 0 = never
    creator_public_key  32 bytes         raw Ed25519
    signature           64 bytes         Ed25519 over every byte before it

This module only moves bytes: it checks lengths and counts but neither
verifies the signature nor interprets the bootstrap strings; that is
L{omerta.crypto.invite}'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from construct import (
    Bytes,
    Const,
    ConstructError,
    Int8ub,
    Int16ub,
    Int64ub,
    PascalString,
    PrefixedArray,
    Struct,
    Terminated,
)

from omerta.wire import ParseError

INVITE_VERSION = 1
NETWORK_KEY_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
MAX_NAME_BYTES = 63
MAX_BOOTSTRAP = 16
# An ID_OR_NAME (at most 63) + "@" + a host name (at most 253) + ":65535"
# fits with room to spare.
MAX_BOOTSTRAP_SPEC_BYTES = 384

UnsignedInvite = Struct(
    "version" / Const(INVITE_VERSION, Int8ub),
    "network_key" / Bytes(NETWORK_KEY_SIZE),
    "name" / PascalString(Int8ub, "utf8"),
    "bootstrap" / PrefixedArray(Int8ub, PascalString(Int16ub, "utf8")),
    "created_at" / Int64ub,
    "expires_at" / Int64ub,
    "creator_public_key" / Bytes(PUBLIC_KEY_SIZE),
)
"""
Every field the signature covers, in order.
"""

InvitePayloadStruct = Struct(
    "body" / UnsignedInvite,
    "signature" / Bytes(SIGNATURE_SIZE),
    Terminated,
)
"""
A complete invite payload: the signed fields, the signature, and nothing
after it.
"""


@dataclass(frozen=True)
class InvitePayload:
    """
    A decoded invite payload.  Nothing here is verified beyond its shape.

    @ivar signed_data: the exact bytes the signature covers (everything
        before the signature).
    """

    network_key: bytes = field(repr=False)
    name: str
    bootstrap: tuple[str, ...]
    created_at: int
    expires_at: int
    creator_public_key: bytes
    signature: bytes
    signed_data: bytes = field(repr=False)


def _limits_problem(name: str, bootstrap: tuple[str, ...]) -> str | None:
    """
    What is wrong with the variable-length fields, or C{None}.
    """
    name_bytes = len(name.encode("utf-8"))
    if not 1 <= name_bytes <= MAX_NAME_BYTES:
        return f"network name has {name_bytes} bytes; 1-{MAX_NAME_BYTES} are allowed"
    if len(bootstrap) > MAX_BOOTSTRAP:
        return f"{len(bootstrap)} bootstrap peers; at most {MAX_BOOTSTRAP} are allowed"
    for spec in bootstrap:
        spec_bytes = len(spec.encode("utf-8"))
        if not 1 <= spec_bytes <= MAX_BOOTSTRAP_SPEC_BYTES:
            return (
                f"a bootstrap peer has {spec_bytes} bytes;"
                f" 1-{MAX_BOOTSTRAP_SPEC_BYTES} are allowed"
            )
    return None


def build_invite_body(
    network_key: bytes,
    name: str,
    bootstrap: Iterable[str],
    created_at: int,
    expires_at: int,
    creator_public_key: bytes,
) -> bytes:
    """
    The bytes an invite's signature covers.

    @param expires_at: unix seconds, or 0 for an invite that never expires.
    @raise ValueError: a field does not fit the format.
    """
    bootstrap = tuple(bootstrap)
    problem = _limits_problem(name, bootstrap)
    if problem is not None:
        raise ValueError(problem)
    if len(network_key) != NETWORK_KEY_SIZE:
        raise ValueError(f"a network key has {NETWORK_KEY_SIZE} bytes")
    if len(creator_public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"a creator public key has {PUBLIC_KEY_SIZE} bytes")
    try:
        return UnsignedInvite.build(
            dict(
                network_key=network_key,
                name=name,
                bootstrap=list(bootstrap),
                created_at=created_at,
                expires_at=expires_at,
                creator_public_key=creator_public_key,
            )
        )
    except ConstructError as e:
        raise ValueError(f"cannot encode invite: {e}") from None


def build_invite_payload(
    network_key: bytes,
    name: str,
    bootstrap: Iterable[str],
    created_at: int,
    expires_at: int,
    creator_public_key: bytes,
    signature: bytes,
) -> bytes:
    """
    A complete invite payload: L{build_invite_body} followed by C{signature}
    (which the caller computed over that body).

    @raise ValueError: a field does not fit the format.
    """
    if len(signature) != SIGNATURE_SIZE:
        raise ValueError(f"an Ed25519 signature has {SIGNATURE_SIZE} bytes")
    body = build_invite_body(
        network_key, name, bootstrap, created_at, expires_at, creator_public_key
    )
    return body + signature


def parse_invite_payload(data: bytes) -> InvitePayload:
    """
    Decode an invite payload.

    @raise ParseError: for anything that is not exactly one well-formed
        payload of a known version (including trailing bytes).
    """
    data = bytes(data)
    if not data:
        raise ParseError("empty invite payload")
    if data[0] != INVITE_VERSION:
        raise ParseError(
            f"invite format version {data[0]} is not supported"
            f" (this omerta reads version {INVITE_VERSION})"
        )
    try:
        parsed = InvitePayloadStruct.parse(data)
    except ConstructError as e:
        raise ParseError(f"malformed invite payload: {_first_line(e)}") from None
    body = parsed.body
    bootstrap = tuple(body.bootstrap)
    problem = _limits_problem(body.name, bootstrap)
    if problem is not None:
        raise ParseError(f"malformed invite payload: {problem}")
    return InvitePayload(
        network_key=bytes(body.network_key),
        name=body.name,
        bootstrap=bootstrap,
        created_at=body.created_at,
        expires_at=body.expires_at,
        creator_public_key=bytes(body.creator_public_key),
        signature=bytes(parsed.signature),
        signed_data=data[:-SIGNATURE_SIZE],
    )


def _first_line(error: ConstructError) -> str:
    """
    construct's messages carry a path and a newline; keep the useful tail.
    """
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
