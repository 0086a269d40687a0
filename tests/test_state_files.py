"""
Damaged state files in a data directory: each is refused with a message
naming the file and what to do (a usage error before a daemon starts,
C{omerta: error: ...} from the CLI), never with a traceback, and left as
it was.
"""

import io
import json
import os
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from twisted.python.usage import UsageError
from twisted.trial import unittest

from omerta.app import relay_tap
from omerta.app.cli import main
from omerta.crypto.identity import IDENTITY_FILE, load_or_create_identity
from omerta.networks import NetworkStore
from omerta.storage import StateFileError, write_json


def make_member_dir(testcase):
    data_dir = os.path.abspath(testcase.mktemp())
    identity = load_or_create_identity(data_dir)
    NetworkStore(data_dir).create(identity, "lab", "127.0.0.1:7400", now=time.time())
    return data_dir


def damage_identity(data_dir, offset=2):
    """
    Change one byte inside the key's algorithm identifier: still PEM, but
    cryptography raises UnsupportedAlgorithm (unknown algorithm, offset 0)
    or InternalError (Ed448 with an Ed25519 key, offset 2), not ValueError.
    """
    path = os.path.join(data_dir, IDENTITY_FILE)
    with open(path, "rb") as f:
        pem = f.read()
    der = bytearray(serialization.load_pem_private_key(pem, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    der[der.index(bytes.fromhex("2b6570")) + offset] ^= 0x01  # OID 1.3.101.112
    import base64

    damaged = (b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(bytes(der))
               + b"-----END PRIVATE KEY-----\n")
    with open(path, "wb") as f:
        f.write(damaged)
    return path, damaged


def run_cli(data_dir, *args):
    out, err = io.StringIO(), io.StringIO()
    code = main(["--data-dir", data_dir, *args], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


class DamagedIdentityTests(unittest.TestCase):
    def setUp(self):
        self.dir = make_member_dir(self)
        with open(os.path.join(self.dir, IDENTITY_FILE), "rb") as f:
            self.original = f.read()

    def assertUntouched(self, path, content):
        with open(path, "rb") as f:
            self.assertEqual(f.read(), content)

    def test_damaged_algorithm_is_state_file_error(self):
        """A key file damaged in its algorithm is a StateFileError naming it and what to do."""
        for offset in (0, 2):
            path, damaged = damage_identity(self.dir, offset)
            error = self.assertRaises(StateFileError, load_or_create_identity, self.dir)
            self.assertIn(path, str(error))
            self.assertIn("restore it from a backup", str(error))
            self.assertUntouched(path, damaged)
            with open(path, "wb") as f:
                f.write(self.original)

    def test_other_key_type_refused(self):
        """A PEM key that is not Ed25519 is refused with what to do."""
        path = os.path.join(self.dir, IDENTITY_FILE)
        rsa = generate_private_key(65537, 1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        with open(path, "wb") as f:
            f.write(rsa)
        error = self.assertRaises(StateFileError, load_or_create_identity, self.dir)
        self.assertIn("not Ed25519", str(error))
        self.assertIn("move it aside", str(error))

    def test_daemon_refuses_with_usage_error(self):
        """The daemon's option parsing refuses a damaged key file before anything starts."""
        path, damaged = damage_identity(self.dir)
        error = self.assertRaises(
            UsageError, relay_tap.Options().parseOptions, ["--data-dir", self.dir])
        self.assertIn(path, str(error))
        self.assertIn("restore it from a backup", str(error))
        self.assertUntouched(path, damaged)

    def test_daemon_refuses_garbage(self):
        """A key file that is not PEM at all is a usage error too."""
        path = os.path.join(self.dir, IDENTITY_FILE)
        with open(path, "wb") as f:
            f.write(b"garbage")
        error = self.assertRaises(
            UsageError, relay_tap.Options().parseOptions, ["--data-dir", self.dir])
        self.assertIn(path, str(error))

    def test_cli_reports_error(self):
        """Commands that need the identity print 'omerta: error: ...' naming the file."""
        path, damaged = damage_identity(self.dir)
        for args in (["node", "status"], ["network", "create", "--name", "other"]):
            code, _, err = run_cli(self.dir, *args)
            self.assertEqual(code, 2, args)
            self.assertTrue(err.startswith("omerta: error: "), err)
            self.assertIn(path, err)
            self.assertNotIn("Traceback", err)
        self.assertUntouched(path, damaged)


class DamagedStatusTests(unittest.TestCase):
    def setUp(self):
        self.dir = make_member_dir(self)
        self.path = os.path.join(self.dir, "status.json")
        self.peer_id = load_or_create_identity(self.dir).peer_id_text

    def status(self, **changes):
        document = {
            "pid": os.getpid(), "running": True, "peer_id": self.peer_id, "name": "n",
            "listen": "127.0.0.1:7400", "networks": [], "capabilities": ["provider"],
            "resources": {"cpu_cores": 1, "memory_mb": 2, "disk_gb": 3, "gpus": 0},
            "peers": [{"peer_id": "ab" * 16, "name": "relay", "endpoint": "1.2.3.4:7400",
                       "state": "online", "last_heard_ago_s": 1.0, "rtt_ms": 0.5}],
            "metrics": {"frames_in": 3, "frames_out": [{"labels": {}, "value": 2}],
                        "drops": [{"labels": {"reason": "x"}, "value": 1}]},
            "updated_at": time.time(),
        }
        document.update(changes)
        write_json(self.path, document)

    def test_good_file_shown(self):
        """A well-formed status file is shown (the checks refuse nothing a node writes)."""
        self.status()
        code, out, err = run_cli(self.dir, "node", "status")
        self.assertEqual(code, 0, err)
        self.assertIn("relay", out)

    def test_wrong_types_reported(self):
        """A status file with fields of the wrong type is named in an error, not a traceback."""
        cases = [
            {"pid": "123"}, {"pid": [1]}, {"updated_at": "yesterday"}, {"running": "yes"},
            {"peers": {"a": 1}}, {"peers": ["x"]}, {"peers": [{"peer_id": 5}]},
            {"peers": [{"peer_id": "ab" * 16, "name": None, "state": "online",
                        "rtt_ms": "fast"}]},
            {"peers": [{"peer_id": "ab" * 16, "name": 7, "state": "online", "rtt_ms": None}]},
            {"resources": {"cpu_cores": "many"}}, {"capabilities": "provider"},
            {"networks": [["x"]]}, {"metrics": {"frames_out": [{"value": "2"}]}},
            {"metrics": {"drops": [{"value": 1}]}}, {"metrics": []},
        ]
        for changes in cases:
            self.status(**changes)
            code, _, err = run_cli(self.dir, "node", "status")
            self.assertEqual(code, 2, changes)
            self.assertTrue(err.startswith("omerta: error: "), (changes, err))
            self.assertIn(self.path, err)
            self.assertNotIn("Traceback", err)

    def test_not_an_object(self):
        """A status file holding a list is refused by name."""
        write_json(self.path, [1, 2])
        code, _, err = run_cli(self.dir, "node", "status")
        self.assertEqual(code, 2)
        self.assertIn("not an object", err)


class DamagedProviderStateTests(unittest.TestCase):
    """
    The provider's wireguard.key and vm-tunnels.json are checked by its
    option parsing, so a damaged one is a usage error (twistd exits
    non-zero) rather than a half-started provider.
    """

    def setUp(self):
        self.dir = make_member_dir(self)

    def parse(self):
        from omerta.app import provider_tap

        return provider_tap.Options().parseOptions(["--data-dir", self.dir, "--no-tunnels"])

    def write(self, name, content, mode=0o600):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def test_world_readable_wireguard_key(self):
        """A wireguard.key others can read stops the provider with the chmod that fixes it."""
        from omerta.crypto.wireguard import WireGuardKey

        path = self.write("wireguard.key", WireGuardKey.generate().private_text.encode(), 0o644)
        error = self.assertRaises(UsageError, self.parse)
        self.assertIn(f"chmod 600 {path}", str(error))

    def test_damaged_wireguard_key(self):
        """A wireguard.key that holds no key stops the provider, naming it and what to do."""
        for content in (b"not a key\n", b"\xff\xfe", b"AAAA\n"):
            path = self.write("wireguard.key", content)
            error = self.assertRaises(UsageError, self.parse)
            self.assertIn(path, str(error))
            self.assertIn("restore it from a backup", str(error))
            with open(path, "rb") as f:
                self.assertEqual(f.read(), content)

    def test_damaged_tunnel_records(self):
        """A vm-tunnels.json that is not JSON or not of the records' shape stops the provider."""
        good = {"owner": "ab" * 16, "consumer_key": "A" * 43 + "=",
                "network": "cd" * 8, "address": "100.64.0.2"}
        cases = [
            b"{damaged", b"[]", b'{"tunnels": []}', b'{"tunnels": {"vm": "x"}}',
            json.dumps({"tunnels": {"vm": dict(good, owner=7)}}).encode(),
            json.dumps({"tunnels": {"vm": dict(good, owner="zz")}}).encode(),
            json.dumps({"tunnels": {"vm": dict(good, consumer_key="short")}}).encode(),
            json.dumps({"tunnels": {"vm": dict(good, consumer_key=None)}}).encode(),
            json.dumps({"tunnels": {"vm": dict(good, network=[1])}}).encode(),
        ]
        for content in cases:
            path = self.write("vm-tunnels.json", content)
            error = self.assertRaises(UsageError, self.parse)
            self.assertIn(path, str(error), content)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), content)

    def test_good_tunnel_records_read(self):
        """Records as the provider writes them (with or without a tunnel address) are accepted."""
        from omerta.roles.provider import read_tunnel_records

        records = {"a": {"owner": "ab" * 16, "consumer_key": "A" * 43 + "=",
                         "network": "cd" * 8, "address": "100.64.0.2", "created_at": 1.0},
                   "b": {"owner": "ab" * 16, "consumer_key": "A" * 43 + "="}}
        path = self.write("vm-tunnels.json", json.dumps({"version": 2, "tunnels": records}).encode())
        self.assertEqual(read_tunnel_records(path), records)
        os.unlink(path)
        self.assertEqual(read_tunnel_records(path), {})
