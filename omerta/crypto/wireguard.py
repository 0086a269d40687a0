"""
WireGuard key pairs: X25519 from C{cryptography}, written the way C{wg}
writes them (32 raw bytes, base64, one line), private keys mode 0600.

The provider keeps one key pair for its VM tunnels; a consumer keeps one
per provider it holds VMs from (docs/tunnel.md).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption,
                                                          PrivateFormat, PublicFormat)

from omerta import storage


@dataclass(frozen=True)
class WireGuardKey:
    private: bytes

    @classmethod
    def generate(cls) -> WireGuardKey:
        key = X25519PrivateKey.generate()
        return cls(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    @classmethod
    def from_text(cls, text: str) -> WireGuardKey:
        """
        @raise ValueError: not a base64 32-byte key.
        """
        return cls(decode_key(text))

    @property
    def public(self) -> bytes:
        key = X25519PrivateKey.from_private_bytes(self.private)
        return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def private_text(self) -> str:
        return encode_key(self.private)

    @property
    def public_text(self) -> str:
        return encode_key(self.public)

    def __repr__(self) -> str:  # never print the private half
        return f"WireGuardKey(public={self.public_text})"


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a base64 WireGuard key") from None
    if len(raw) != 32:
        raise ValueError(f"a WireGuard key is 32 bytes, this one {len(raw)}")
    return raw


def load_or_create_key(path: Path) -> WireGuardKey:
    """
    The key pair in C{path} (its private key, base64, as C{wg genkey}
    writes it), created with mode 0600 on first use.

    @raise omerta.storage.StateFileError: the file is readable by others or
        does not hold a key.
    """
    path = Path(path)
    if not path.exists():
        storage.ensure_private_dir(path.parent)
        key = WireGuardKey.generate()
        storage.atomic_write(path, (key.private_text + "\n").encode())
        return key
    storage.check_private(path)
    try:
        return WireGuardKey.from_text(path.read_text())
    except (OSError, ValueError) as e:
        raise storage.StateFileError(f"{path} does not hold a WireGuard private key: {e}") from e
