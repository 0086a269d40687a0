"""
Node identities: key files, peer ids, names.
"""

import os
import stat

from twisted.trial import unittest

from omerta.crypto.identity import (
    IDENTITY_FILE,
    Identity,
    IdentityError,
    load_or_create_identity,
    parse_peer_id,
    peer_id_for,
    validate_name,
    verify_signature,
)
from omerta.storage import StateFileError


class IdentityFileTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()

    def test_created_private(self):
        """The first start creates a 0600 key file in a 0700 directory."""
        load_or_create_identity(self.dir)
        path = os.path.join(self.dir, IDENTITY_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)

    def test_stable(self):
        """Loading again gives the same peer id."""
        first = load_or_create_identity(self.dir)
        self.assertEqual(load_or_create_identity(self.dir).peer_id, first.peer_id)

    def test_world_readable_refused(self):
        """A key file other users can read is refused with the chmod that fixes it."""
        load_or_create_identity(self.dir)
        path = os.path.join(self.dir, IDENTITY_FILE)
        os.chmod(path, 0o644)
        error = self.assertRaises(StateFileError, load_or_create_identity, self.dir)
        self.assertIn("chmod 600", str(error))

    def test_corrupt_key_left_alone(self):
        """A damaged key file is an error and is not replaced."""
        os.makedirs(self.dir)
        path = os.path.join(self.dir, IDENTITY_FILE)
        with open(path, "wb") as f:
            f.write(b"not a key")
        os.chmod(path, 0o600)
        self.assertRaises(StateFileError, load_or_create_identity, self.dir)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"not a key")

    def test_repr_hides_key(self):
        """repr shows the peer id and nothing secret."""
        identity = Identity.generate()
        self.assertEqual(repr(identity), f"<Identity {identity.peer_id_text}>")


class PeerIdTests(unittest.TestCase):
    def test_derived_from_key(self):
        """The peer id is a function of the public key and differs between keys."""
        a, b = Identity.generate(), Identity.generate()
        self.assertEqual(a.peer_id, peer_id_for(a.public_key))
        self.assertNotEqual(a.peer_id, b.peer_id)
        self.assertEqual(len(a.peer_id_text), 32)

    def test_parse(self):
        """A peer id parses from hex, case-insensitively; other text is refused."""
        identity = Identity.generate()
        self.assertEqual(parse_peer_id(identity.peer_id_text.upper()), identity.peer_id)
        self.assertRaises(IdentityError, parse_peer_id, "xyz")

    def test_signatures(self):
        """Signatures verify for the signer only and for the signed data only."""
        a, b = Identity.generate(), Identity.generate()
        sig = a.sign(b"data")
        self.assertTrue(verify_signature(a.public_key, sig, b"data"))
        self.assertFalse(verify_signature(b.public_key, sig, b"data"))
        self.assertFalse(verify_signature(a.public_key, sig, b"other"))
        self.assertFalse(verify_signature(b"short", sig, b"data"))

    def test_names(self):
        """Names are short and plain, and may not pose as peer ids."""
        self.assertEqual(validate_name("provider-1"), "provider-1")
        for bad in ("", "-x", "a b", "x" * 64, "é", "0123456789abcdef0123456789abcdef"):
            self.assertRaises(IdentityError, validate_name, bad)


class WeakKeyTests(unittest.TestCase):
    def test_small_order_key_signatures_refused(self):
        """A 'signature' by a small-order key (the all-zero key) never verifies."""
        self.assertFalse(verify_signature(bytes(32), bytes(64), b"anything"))
        self.assertFalse(verify_signature(b"\x01" + bytes(31), b"\x01" + bytes(63), b""))
