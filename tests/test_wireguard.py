"""
WireGuard keys (omerta.crypto.wireguard): X25519 checked against the RFC
7748 test vector, the base64 text form C{wg} uses, key files created 0600
and refused when others can read them or they hold no key, and a repr that
never shows the private half.
"""

import base64
import os
import stat
from pathlib import Path

from twisted.trial import unittest

from omerta.crypto.wireguard import (
    WireGuardKey,
    decode_key,
    encode_key,
    load_or_create_key,
)
from omerta.storage import StateFileError


def unhex(text):
    return bytes.fromhex("".join(text.split()))


# RFC 7748 section 6.1: Alice's private key and the public key it gives.
ALICE_PRIVATE = unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = unhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
# The same two in the base64 form of 'wg genkey' / 'wg pubkey'.
ALICE_PRIVATE_TEXT = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo="
ALICE_PUBLIC_TEXT = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class KeyTests(unittest.TestCase):
    def test_text_constants(self):
        """The base64 constants are the RFC bytes."""
        self.assertEqual(base64.b64decode(ALICE_PRIVATE_TEXT), ALICE_PRIVATE)
        self.assertEqual(base64.b64decode(ALICE_PUBLIC_TEXT), ALICE_PUBLIC)

    def test_rfc7748_public_key(self):
        """The public key of RFC 7748's Alice is the RFC's."""
        key = WireGuardKey(ALICE_PRIVATE)
        self.assertEqual(key.public, ALICE_PUBLIC)
        self.assertEqual(key.public_text, ALICE_PUBLIC_TEXT)
        self.assertEqual(key.private_text, ALICE_PRIVATE_TEXT)

    def test_from_text(self):
        """A base64 line, trailing newline included, is a key."""
        self.assertEqual(WireGuardKey.from_text(ALICE_PRIVATE_TEXT + "\n").public, ALICE_PUBLIC)

    def test_generate(self):
        """Generated keys are 32 bytes, 44 base64 characters, and differ each time."""
        one, two = WireGuardKey.generate(), WireGuardKey.generate()
        self.assertEqual((len(one.private), len(one.public)), (32, 32))
        self.assertEqual((len(one.private_text), len(one.public_text)), (44, 44))
        self.assertNotEqual(one.private, two.private)
        self.assertEqual(WireGuardKey.from_text(one.private_text), one)

    def test_encode_decode(self):
        """encode_key and decode_key are inverses on 32 bytes."""
        raw = bytes(range(32))
        self.assertEqual(decode_key(encode_key(raw)), raw)

    def test_decode_refuses(self):
        """Text that is not base64 of 32 bytes is a ValueError that says which."""
        for bad in ("", "not base64!", "é" * 44, ALICE_PRIVATE_TEXT[:-2], "AAAA"):
            self.assertRaises(ValueError, decode_key, bad)
        error = self.assertRaises(ValueError, decode_key, base64.b64encode(bytes(16)).decode())
        self.assertIn("32 bytes", str(error))
        self.assertIn("16", str(error))
        error = self.assertRaises(ValueError, WireGuardKey.from_text, "%%%")
        self.assertIn("base64", str(error))

    def test_repr_hides_private(self):
        """repr and str show the public key and never the private one."""
        key = WireGuardKey(ALICE_PRIVATE)
        for shown in (repr(key), str(key), f"{key}", repr([key]), repr({"k": key})):
            self.assertIn(ALICE_PUBLIC_TEXT, shown)
            self.assertNotIn(ALICE_PRIVATE_TEXT, shown)
            self.assertNotIn(ALICE_PRIVATE.hex(), shown)
            self.assertNotIn(repr(ALICE_PRIVATE), shown)


class KeyFileTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.path = self.dir / "wireguard.key"

    def write(self, data: bytes, mode=0o600):
        self.dir.mkdir(exist_ok=True)
        self.path.write_bytes(data)
        os.chmod(self.path, mode)

    def test_created(self):
        """A missing key file is created, mode 0600 in a 0700 directory, as one base64 line."""
        key = load_or_create_key(self.path)
        self.assertEqual(mode_of(self.path), 0o600)
        self.assertEqual(mode_of(self.dir), 0o700)
        self.assertEqual(self.path.read_text(), key.private_text + "\n")
        self.assertEqual(os.listdir(self.dir), ["wireguard.key"])

    def test_kept(self):
        """The second call returns the key the first one made."""
        first = load_or_create_key(self.path)
        self.assertEqual(load_or_create_key(self.path), first)

    def test_reads_wg_genkey_file(self):
        """A file written like 'wg genkey > key' is read."""
        self.write((ALICE_PRIVATE_TEXT + "\n").encode())
        self.assertEqual(load_or_create_key(self.path).public, ALICE_PUBLIC)

    def test_refuses_readable_by_others(self):
        """A key file others can read or write is refused with the fix, and left untouched."""
        for mode in (0o644, 0o640, 0o604, 0o620):
            self.write((ALICE_PRIVATE_TEXT + "\n").encode(), mode)
            error = self.assertRaises(StateFileError, load_or_create_key, self.path)
            self.assertIn(f"chmod 600 {self.path}", str(error))
            self.assertEqual(mode_of(self.path), mode)
            self.assertEqual(self.path.read_text(), ALICE_PRIVATE_TEXT + "\n")

    def test_refuses_garbage(self):
        """A file that holds no key is refused with its name, and never replaced."""
        for data in (b"", b"hello\n", b"\xff\xfe\x00garbage", base64.b64encode(bytes(31))):
            self.write(data)
            error = self.assertRaises(StateFileError, load_or_create_key, self.path)
            self.assertIn(str(self.path), str(error))
            self.assertIn("WireGuard private key", str(error))
            self.assertEqual(self.path.read_bytes(), data)
