"""
Node identity: an Ed25519 key pair and the peer id derived from it.

The peer id is the first 16 bytes of SHA-256 over a domain label and the raw
public key, shown as 32 lowercase hex digits.  Because it is a hash of the key,
nobody can claim a peer id without holding the matching private key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from omerta import storage

PEER_ID_SIZE = 16
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
IDENTITY_FILE = "identity.key"
_PEER_ID_LABEL = b"omerta peer id v1\x00"
_PEER_ID_TEXT = re.compile(r"[0-9a-f]{32}\Z")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


class IdentityError(Exception):
    """
    An identity, peer id or name is unusable; the message says why.
    """


def peer_id_for(public_key: bytes) -> bytes:
    """
    The 16-byte peer id of a raw 32-byte Ed25519 public key.
    """
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise IdentityError(f"an Ed25519 public key has 32 bytes, not {len(public_key)}")
    return hashlib.sha256(_PEER_ID_LABEL + public_key).digest()[:PEER_ID_SIZE]


def format_peer_id(peer_id: bytes) -> str:
    return peer_id.hex()


def is_peer_id_text(text: str) -> bool:
    """
    Whether C{text} is a full peer id (32 lowercase hex digits).
    """
    return _PEER_ID_TEXT.match(text) is not None


def parse_peer_id(text: str) -> bytes:
    """
    Parse a full peer id given as 32 hex digits.

    @raise IdentityError: with what is wrong.
    """
    lowered = text.strip().lower()
    if not is_peer_id_text(lowered):
        raise IdentityError(
            f"{text!r} is not a peer id: a peer id is 32 hex digits"
            f" (see 'omerta node status' for this node's own)"
        )
    return bytes.fromhex(lowered)


def validate_name(name: str) -> str:
    """
    Check a human node or network name: 1-63 characters, letters, digits,
    '.', '_' or '-', starting with a letter or digit, and not itself shaped
    like a peer id (that would make C{ID_OR_NAME} ambiguous).
    """
    if not _NAME.match(name):
        raise IdentityError(
            f"{name!r} is not a valid name: use 1-63 letters, digits, '.', '_'"
            f" or '-', starting with a letter or digit"
        )
    if is_peer_id_text(name.lower()):
        raise IdentityError(f"{name!r} looks like a peer id; choose a name that does not")
    return name


# Encodings of the small-order points (sign bit cleared): "signatures" by
# these keys can be made without any private key, and OpenSSL accepts them.
_SMALL_ORDER_KEYS = frozenset(bytes.fromhex(h) for h in (
    "00" * 32,
    "01" + "00" * 31,
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
))


def weak_identity_key(public_key: bytes) -> bool:
    """
    Whether an Ed25519 public key is of small order, so that signatures
    "by" it can be made without any private key.
    """
    return public_key[:31] + bytes((public_key[31] & 0x7F,)) in _SMALL_ORDER_KEYS



def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """
    Whether C{signature} is a valid Ed25519 signature of C{data} by
    C{public_key}.  Malformed keys or signatures, and keys of small order
    (whose signatures anyone can forge), are simply invalid.
    """
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    if weak_identity_key(public_key):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, eq=False)
class Identity:
    """
    A node's key pair.  C{repr} never shows the private key.
    """

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> bytes:
        return peer_id_for(self.public_key)

    @property
    def peer_id_text(self) -> str:
        return format_peer_id(self.peer_id)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"<Identity {self.peer_id_text}>"


def load_or_create_identity(data_dir: Path) -> Identity:
    """
    Load the node's identity from C{data_dir}, creating it (mode 0600) on the
    first start.

    @raise storage.StateFileError: the key file is readable by other users,
        unreadable, or not an Ed25519 private key.
    """
    data_dir = storage.ensure_private_dir(Path(data_dir))
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        identity = Identity.generate()
        storage.atomic_write(path, identity.private_pem())
        return identity
    return read_identity(path)


def read_identity(path: Path) -> Identity:
    """
    The identity in an existing key file (as L{load_or_create_identity}
    writes it), checked without changing anything.

    @raise storage.StateFileError: the key file is readable by other users,
        unreadable, or not an Ed25519 private key; the message names it and
        says what to do.
    """
    path = Path(path)
    try:
        storage.check_private(path)
        data = path.read_bytes()
    except OSError as e:
        raise storage.StateFileError(f"cannot read {path}: {e.strerror}") from e
    remedy = (
        "it was left untouched: restore it from a backup, or move it aside to start"
        " as a new node (with a new peer id, so networks must admit it again)"
    )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception as e:  # ValueError, UnsupportedAlgorithm, InternalError, ...
        reason = str(e).split(". See https://", 1)[0]
        raise storage.StateFileError(
            f"{path} is damaged: not a usable private key ({reason}); {remedy}"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise storage.StateFileError(
            f"{path} holds a key that is not Ed25519 (an omerta identity is); {remedy}"
        )
    return Identity(key)
