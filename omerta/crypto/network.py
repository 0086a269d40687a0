"""
Network keys: a network is a 32-byte secret.  Its id is a short hash of the
key, and every key used on the wire is derived from it with HKDF so that the
raw network key never touches a packet.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NETWORK_KEY_SIZE = 32
NETWORK_ID_SIZE = 8
_NETWORK_ID_LABEL = b"omerta network id v1\x00"
_HEX_ID = re.compile(r"[0-9a-f]{16}\Z")


class NetworkKeyError(ValueError):
    """
    Text or bytes that are not a network key; the message says why.
    """


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """
    Decode unpadded (or padded) base64url; raise C{ValueError} on bad input.
    """
    text = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise ValueError("not base64url")
    text = text.rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def is_network_id_text(text: str) -> bool:
    return _HEX_ID.match(text) is not None


@dataclass(frozen=True, eq=True)
class NetworkKey:
    """
    The secret of one network.  C{repr} shows only the network id.
    """

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != NETWORK_KEY_SIZE:
            raise NetworkKeyError(
                f"a network key has {NETWORK_KEY_SIZE} bytes, not {len(self.secret)}"
            )

    @classmethod
    def generate(cls) -> NetworkKey:
        return cls(os.urandom(NETWORK_KEY_SIZE))

    @classmethod
    def from_text(cls, text: str) -> NetworkKey:
        """
        Parse a key given as base64url (43 characters) or 64 hex digits.
        """
        text = text.strip()
        if re.fullmatch(r"[0-9a-fA-F]{64}", text):
            return cls(bytes.fromhex(text))
        try:
            raw = b64url_decode(text)
        except ValueError:
            raw = b""
        if len(raw) != NETWORK_KEY_SIZE:
            raise NetworkKeyError(
                "a network key is 32 bytes written as base64url (43 characters)"
                " or 64 hex digits"
            )
        return cls(raw)

    def to_text(self) -> str:
        return b64url_encode(self.secret)

    @property
    def network_id(self) -> bytes:
        return hashlib.sha256(_NETWORK_ID_LABEL + self.secret).digest()[:NETWORK_ID_SIZE]

    @property
    def network_id_text(self) -> str:
        return self.network_id.hex()

    def derive(self, label: bytes, context: bytes = b"", length: int = 32) -> bytes:
        """
        HKDF-SHA256 of the network key for one purpose (C{label}) and one
        context (for example a sender and its boot id).
        """
        return HKDF(
            algorithm=hashes.SHA256(),
            length=length,
            salt=self.network_id,
            info=b"omerta v1 " + label + b"\x00" + context,
        ).derive(self.secret)

    def __repr__(self) -> str:
        return f"<NetworkKey {self.network_id_text}>"
