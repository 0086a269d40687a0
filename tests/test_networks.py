"""
Tests for L{omerta.networks}.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from omerta import storage
from omerta.addressing import AddressError
from omerta.crypto.identity import Identity, IdentityError
from omerta.crypto.invite import InviteError, make_invite
from omerta.crypto.network import NetworkKey, NetworkKeyError
from omerta.networks import NETWORKS_FILE, MembershipError, NetworkStore
from omerta.storage import StateFileError

NOW = 1_700_000_000
ALICE = Identity(Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))
BOB = Identity(Ed25519PrivateKey.from_private_bytes(b"\x02" * 32))


def numbered_key(n: int) -> NetworkKey:
    return NetworkKey(hashlib.sha256(b"test key %d" % n).digest())


def keys_sharing_prefix() -> tuple[NetworkKey, NetworkKey]:
    """
    Two deterministic keys whose network ids share their first 4 hex digits.
    """
    seen: dict[str, NetworkKey] = {}
    n = 0
    while True:
        key = numbered_key(n)
        prefix = key.network_id_text[:4]
        if prefix in seen:
            return seen[prefix], key
        seen[prefix] = key
        n += 1


class NetworkStoreTests(SynchronousTestCase):
    """
    Creating, joining, finding and leaving networks.
    """

    def setUp(self) -> None:
        self.data_dir = Path(self.mktemp())
        self.store = NetworkStore(self.data_dir)
        self.path = self.data_dir / NETWORKS_FILE

    def invite_from_bob(self, key: NetworkKey, name: str = "bobnet", **kw: object) -> str:
        arguments: dict = dict(bootstrap=[f"{BOB.peer_id_text}@192.0.2.9:7400"], created_at=NOW)
        arguments.update(kw)
        return make_invite(BOB, key, name, **arguments)

    def test_createMakesMembership(self) -> None:
        """
        create stores a network made by this node with itself as bootstrap
        peer and an invite that parses back to the same key.
        """
        m = self.store.create(ALICE, "lab", "192.0.2.7:7400", now=NOW + 0.7)
        self.assertEqual(len(m.network_id), 16)
        self.assertEqual(m.network_id, m.key.network_id_text)
        self.assertTrue(m.created_by_me)
        self.assertEqual(m.creator_peer_id, ALICE.peer_id_text)
        self.assertEqual([str(b) for b in m.bootstrap], [f"{ALICE.peer_id_text}@192.0.2.7:7400"])
        self.assertEqual((m.created_at, m.joined_at, m.expires_at), (NOW, NOW, None))
        other = NetworkStore(Path(self.mktemp()))
        joined = other.join(m.invite, NOW).membership
        self.assertEqual(joined.key, m.key)
        self.assertEqual(self.store.list(), [m])

    def test_createWithoutEndpoint(self) -> None:
        """
        Without an endpoint the invite has no bootstrap peer.
        """
        m = self.store.create(ALICE, "lab", now=NOW)
        self.assertEqual(m.bootstrap, ())

    def test_createWithExpiry(self) -> None:
        """
        An expiry is stored and carried by the invite.
        """
        m = self.store.create(ALICE, "lab", now=NOW, expires_at=NOW + 60)
        self.assertEqual(m.expires_at, NOW + 60)
        other = NetworkStore(Path(self.mktemp()))
        self.assertRaises(InviteError, other.join, m.invite, NOW + 60)

    def test_createFreshKeys(self) -> None:
        """
        Two created networks get different keys.
        """
        a = self.store.create(ALICE, "one", now=NOW)
        b = self.store.create(ALICE, "two", now=NOW)
        self.assertNotEqual(a.key, b.key)

    def test_createBadEndpointWritesNothing(self) -> None:
        """
        A bad endpoint is refused before anything is written.
        """
        self.assertRaises(AddressError, self.store.create, ALICE, "lab", "nope", now=NOW)
        self.assertFalse(self.path.exists())

    def test_createBadName(self) -> None:
        """
        A name that is not a valid name is refused.
        """
        self.assertRaises(IdentityError, self.store.create, ALICE, "two words", now=NOW)

    def test_createDuplicateName(self) -> None:
        """
        A second network under a name already in use is refused.
        """
        self.store.create(ALICE, "lab", now=NOW)
        error = self.assertRaises(MembershipError, self.store.create, ALICE, "lab", now=NOW)
        self.assertIn("already in a network named 'lab'", str(error))

    def test_joinInvite(self) -> None:
        """
        Joining an invite stores its key, name, peers, creator and link.
        """
        key = numbered_key(1)
        link = self.invite_from_bob(key, expires_at=NOW + 3600)
        result = self.store.join(link, NOW + 5)
        m = result.membership
        self.assertFalse(result.updated)
        self.assertEqual(m.key, key)
        self.assertEqual(m.name, "bobnet")
        self.assertFalse(m.created_by_me)
        self.assertEqual(m.creator_peer_id, BOB.peer_id_text)
        self.assertEqual(m.created_at, NOW)
        self.assertEqual(m.joined_at, NOW + 5)
        self.assertEqual(m.expires_at, NOW + 3600)
        self.assertEqual(m.invite, link)
        self.assertEqual(len(m.bootstrap), 1)

    def test_joinInviteLocalName(self) -> None:
        """
        A name given to join replaces the invite's.
        """
        m = self.store.join(self.invite_from_bob(numbered_key(1)), NOW, name="mine").membership
        self.assertEqual(m.name, "mine")

    def test_joinBareKey(self) -> None:
        """
        A bare key (base64url or hex) joins with the given name and no peers.
        """
        a = self.store.join(numbered_key(1).to_text(), NOW, name="a").membership
        b = self.store.join(numbered_key(2).secret.hex(), NOW, name="b").membership
        self.assertEqual(a.key, numbered_key(1))
        self.assertEqual(b.key, numbered_key(2))
        self.assertEqual(a.bootstrap, ())
        self.assertIsNone(a.invite)
        self.assertIsNone(a.creator_peer_id)
        self.assertIsNone(a.created_at)

    def test_joinBareKeyNeedsName(self) -> None:
        """
        A bare key without a name is refused, saying to pass --name.
        """
        error = self.assertRaises(MembershipError, self.store.join, numbered_key(1).to_text(), NOW)
        self.assertIn("--name", str(error))
        self.assertFalse(self.path.exists())

    def test_joinBadKey(self) -> None:
        """
        Text that is neither a key nor an invite is refused with both forms
        named.
        """
        error = self.assertRaises(NetworkKeyError, self.store.join, "abc", NOW, name="x")
        self.assertIn("omerta://join/", str(error))
        self.assertIn("43 characters", str(error))

    def test_joinBadInvite(self) -> None:
        """
        A damaged invite is refused with InviteError and nothing is written.
        """
        self.assertRaises(InviteError, self.store.join, "omerta://join/AAAA", NOW)
        self.assertFalse(self.path.exists())

    def test_joinTwice(self) -> None:
        """
        Joining the same invite again is refused and changes nothing.
        """
        link = self.invite_from_bob(numbered_key(1))
        self.store.join(link, NOW)
        before = self.path.read_bytes()
        error = self.assertRaises(MembershipError, self.store.join, link, NOW + 1)
        self.assertIn("already in network bobnet", str(error))
        self.assertEqual(self.path.read_bytes(), before)

    def test_joinTwiceExistOk(self) -> None:
        """
        With exist_ok, joining again returns the membership and writes nothing.
        """
        link = self.invite_from_bob(numbered_key(1))
        first = self.store.join(link, NOW).membership
        self.store.join(numbered_key(2).to_text(), NOW, name="k")
        before = self.path.read_bytes()
        again = self.store.join(link, NOW + 1, exist_ok=True)
        self.assertEqual((again.membership, again.updated), (first, False))
        bare = self.store.join(numbered_key(2).to_text(), NOW + 1, exist_ok=True)
        self.assertEqual(bare.membership.name, "k")
        self.assertEqual(self.path.read_bytes(), before)

    def test_joinBareKeyTwice(self) -> None:
        """
        Joining a network already joined, by bare key, is refused.
        """
        self.store.join(self.invite_from_bob(numbered_key(1)), NOW)
        self.assertRaises(
            MembershipError, self.store.join, numbered_key(1).to_text(), NOW, name="again"
        )

    def test_joinNewerInviteUpdates(self) -> None:
        """
        A newer invite to a network already joined replaces its bootstrap
        peers, invite and expiry, keeping the local name and join time.
        """
        key = numbered_key(1)
        self.store.join(self.invite_from_bob(key), NOW, name="local")
        newer = self.invite_from_bob(
            key,
            bootstrap=[f"{BOB.peer_id_text}@198.51.100.1:7400", "relay-2@relay.example:7401"],
            created_at=NOW + 100,
            expires_at=NOW + 1000,
        )
        result = self.store.join(newer, NOW + 200)
        self.assertTrue(result.updated)
        m = self.store.get("local")
        self.assertEqual(m, result.membership)
        self.assertEqual(len(m.bootstrap), 2)
        self.assertEqual((m.joined_at, m.created_at, m.expires_at), (NOW, NOW + 100, NOW + 1000))
        self.assertEqual(m.invite, newer)
        self.assertEqual(len(self.store.list()), 1)

    def test_joinInviteAfterBareKey(self) -> None:
        """
        An invite to a network joined with a bare key fills in its peers.
        """
        key = numbered_key(1)
        self.store.join(key.to_text(), NOW, name="k")
        result = self.store.join(self.invite_from_bob(key), NOW)
        self.assertTrue(result.updated)
        self.assertEqual(result.membership.creator_peer_id, BOB.peer_id_text)
        self.assertEqual(result.membership.name, "k")

    def test_joinNameInUse(self) -> None:
        """
        Joining an invite whose name is already used locally is refused,
        suggesting --name.
        """
        self.store.create(ALICE, "bobnet", now=NOW)
        error = self.assertRaises(
            MembershipError, self.store.join, self.invite_from_bob(numbered_key(1)), NOW
        )
        self.assertIn("--name", str(error))

    def test_severalNetworks(self) -> None:
        """
        A node can be in several networks; list keeps their order and keys()
        maps every network id to its key.
        """
        created = self.store.create(ALICE, "mine", now=NOW)
        joined = self.store.join(self.invite_from_bob(numbered_key(1)), NOW).membership
        bare = self.store.join(numbered_key(2).to_text(), NOW, name="bare").membership
        self.assertEqual(self.store.list(), [created, joined, bare])
        self.assertEqual(
            self.store.keys(),
            {m.key.network_id: m.key for m in (created, joined, bare)},
        )

    def test_getByIdPrefixAndName(self) -> None:
        """
        get finds a network by full id (any case), unique prefix or name.
        """
        m = self.store.join(numbered_key(1).to_text(), NOW, name="lab").membership
        self.store.join(numbered_key(2).to_text(), NOW, name="other")
        self.assertEqual(self.store.get(m.network_id), m)
        self.assertEqual(self.store.get(m.network_id.upper()), m)
        self.assertEqual(self.store.get(m.network_id[:6]), m)
        self.assertEqual(self.store.get("lab"), m)

    def test_getUnknown(self) -> None:
        """
        An unknown ref says so and points at 'omerta network list'.
        """
        self.store.join(numbered_key(1).to_text(), NOW, name="lab")
        error = self.assertRaises(MembershipError, self.store.get, "nothing")
        self.assertIn("no network matches 'nothing'", str(error))
        self.assertIn("omerta network list", str(error))

    def test_getShortPrefix(self) -> None:
        """
        A prefix under 4 hex digits is not used and the error says why.
        """
        m = self.store.join(numbered_key(1).to_text(), NOW, name="lab").membership
        error = self.assertRaises(MembershipError, self.store.get, m.network_id[:3])
        self.assertIn("at least 4 hex digits", str(error))

    def test_getAmbiguousPrefix(self) -> None:
        """
        A prefix shared by two networks is refused, listing both.
        """
        a, b = keys_sharing_prefix()
        self.store.join(a.to_text(), NOW, name="a")
        self.store.join(b.to_text(), NOW, name="b")
        error = self.assertRaises(MembershipError, self.store.get, a.network_id_text[:4])
        self.assertIn("matches 2 networks", str(error))
        self.assertIn(f"{a.network_id_text} (a)", str(error))
        self.assertIn(f"{b.network_id_text} (b)", str(error))
        self.assertEqual(self.store.get(a.network_id_text).name, "a")

    def test_getAmbiguousNameAndPrefix(self) -> None:
        """
        A ref that is one network's name and another's id prefix is refused,
        listing both.
        """
        target = self.store.join(numbered_key(1).to_text(), NOW, name="x").membership
        prefix = target.network_id[:4]
        self.store.join(numbered_key(2).to_text(), NOW, name=prefix)
        error = self.assertRaises(MembershipError, self.store.get, prefix)
        self.assertIn(target.network_id, str(error))

    def test_leave(self) -> None:
        """
        Leaving a joined network removes it and its key.
        """
        m = self.store.join(self.invite_from_bob(numbered_key(1)), NOW).membership
        self.store.create(ALICE, "mine", now=NOW)
        self.assertEqual(self.store.leave("bobnet"), m)
        self.assertEqual([x.name for x in self.store.list()], ["mine"])
        self.assertNotIn(numbered_key(1).to_text(), self.path.read_text())

    def test_leaveCreatedRefused(self) -> None:
        """
        Leaving a network this node created needs force, and says why.
        """
        m = self.store.create(ALICE, "mine", now=NOW)
        error = self.assertRaises(MembershipError, self.store.leave, m.network_id)
        self.assertIn("leaving deletes the only copy of its key", str(error))
        self.assertIn("--force", str(error))
        self.assertEqual(self.store.list(), [m])
        self.store.leave(m.network_id, force=True)
        self.assertEqual(self.store.list(), [])

    def test_leaveUnknown(self) -> None:
        """
        Leaving an unknown network is an error.
        """
        self.assertRaises(MembershipError, self.store.leave, "nothing")

    def test_reprHidesKey(self) -> None:
        """
        A membership's repr shows neither the key nor the invite link.
        """
        m = self.store.create(ALICE, "lab", "192.0.2.7:7400", now=NOW)
        self.assertNotIn(m.key.to_text(), repr(m))
        self.assertNotIn("omerta://join/", repr(m))
        self.assertIn(m.network_id, repr(m))


class NetworksFileTests(SynchronousTestCase):
    """
    The networks.json file: format, permissions, corruption and crashes.
    """

    def setUp(self) -> None:
        self.data_dir = Path(self.mktemp())
        self.store = NetworkStore(self.data_dir)
        self.path = self.data_dir / NETWORKS_FILE

    def write_raw(self, data: bytes) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(data)
        os.chmod(self.path, 0o600)

    def assertRefusedEverywhere(self, fragment: str) -> None:
        """
        Every method raises StateFileError naming the file, and the file's
        bytes are unchanged afterwards.
        """
        before = self.path.read_bytes()
        calls = [
            lambda: self.store.list(),
            lambda: self.store.keys(),
            lambda: self.store.get("lab"),
            lambda: self.store.create(ALICE, "new", now=NOW),
            lambda: self.store.join(numbered_key(9).to_text(), NOW, name="n"),
            lambda: self.store.leave("lab", force=True),
        ]
        for call in calls:
            error = self.assertRaises(StateFileError, call)
            self.assertIn(str(self.path), str(error))
            self.assertIn(fragment, str(error))
        self.assertEqual(self.path.read_bytes(), before)

    def test_format(self) -> None:
        """
        The file has version 1 and one record per network with its key.
        """
        m = self.store.create(ALICE, "lab", "192.0.2.7:7400", now=NOW)
        document = json.loads(self.path.read_text())
        self.assertEqual(document["version"], 1)
        [record] = document["networks"]
        self.assertEqual(
            record,
            {
                "network_id": m.network_id,
                "name": "lab",
                "key": m.key.to_text(),
                "bootstrap": [f"{ALICE.peer_id_text}@192.0.2.7:7400"],
                "created_at": NOW,
                "joined_at": NOW,
                "creator_peer_id": ALICE.peer_id_text,
                "created_by_me": True,
                "invite": m.invite,
                "expires_at": None,
            },
        )

    def test_reloaded(self) -> None:
        """
        A second store over the same directory sees the same memberships.
        """
        self.store.create(ALICE, "lab", "192.0.2.7:7400", now=NOW)
        self.store.join(numbered_key(1).to_text(), NOW, name="k")
        self.assertEqual(NetworkStore(self.data_dir).list(), self.store.list())

    def test_missingFileIsEmpty(self) -> None:
        """
        Without a file there are no networks and nothing is written.
        """
        self.assertEqual(self.store.list(), [])
        self.assertEqual(self.store.keys(), {})
        self.assertFalse(self.data_dir.exists())

    def test_modePrivate(self) -> None:
        """
        networks.json is created with mode 0600 and its directory 0700.
        """
        self.store.create(ALICE, "lab", now=NOW)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)

    def test_readableByOthersRefused(self) -> None:
        """
        A networks.json other users can read is refused with the chmod fix.
        """
        self.store.create(ALICE, "lab", now=NOW)
        os.chmod(self.path, 0o644)
        self.assertRefusedEverywhere("chmod 600")

    def test_corruptJson(self) -> None:
        """
        A file that is not JSON is refused by every method and left as is.
        """
        self.write_raw(b'{"version": 1, "networks": [')
        self.assertRefusedEverywhere("corrupt")

    def test_notUtf8(self) -> None:
        """
        A file that is not UTF-8 is refused and left as is.
        """
        self.write_raw(b"\xff\xfe\x00garbage")
        self.assertRefusedEverywhere("corrupt")

    def test_unknownVersion(self) -> None:
        """
        A file of a newer format version is refused, naming the version.
        """
        self.write_raw(json.dumps({"version": 2, "networks": []}).encode())
        self.assertRefusedEverywhere("version 2")

    def test_wrongStructure(self) -> None:
        """
        Files with the wrong shape are refused and left as is.
        """
        self.store.create(ALICE, "lab", now=NOW)
        good = json.loads(self.path.read_text())
        record = good["networks"][0]

        def variant(**changes: object) -> bytes:
            return json.dumps(
                {"version": 1, "networks": [{**record, **changes}]}
            ).encode()

        without_name = {k: v for k, v in record.items() if k != "name"}
        cases = [
            (b"[]", "top level"),
            (b'{"networks": []}', "version"),
            (b'{"version": 1}', "networks"),
            (b'{"version": 1, "networks": {}}', "networks"),
            (b'{"version": 1, "networks": [3]}', "network #1"),
            (json.dumps({"version": 1, "networks": [without_name]}).encode(), "'name'"),
            (variant(key="short"), "network #1"),
            (variant(network_id="0" * 16), "does not match"),
            (variant(bootstrap="x@1.2.3.4:5"), "bootstrap"),
            (variant(bootstrap=["nonsense"]), "network #1"),
            (variant(created_by_me="yes"), "created_by_me"),
            (variant(joined_at=True), "joined_at"),
            (variant(creator_peer_id="abc"), "network #1"),
            (
                json.dumps({"version": 1, "networks": [record, record]}).encode(),
                "appears twice",
            ),
        ]
        for data, fragment in cases:
            self.write_raw(data)
            self.assertRefusedEverywhere(fragment)

    def test_crashBeforeRename(self) -> None:
        """
        A crash between writing the temporary file and renaming it leaves
        the old file intact and no temporary file behind.
        """
        self.store.create(ALICE, "lab", now=NOW)
        before = self.path.read_bytes()

        class Crash(Exception):
            pass

        def crash(tmp: Path) -> None:
            self.assertTrue(tmp.exists())
            raise Crash()

        self.patch(
            storage,
            "atomic_write",
            functools.partial(storage.atomic_write, _before_rename=crash),
        )
        self.assertRaises(Crash, self.store.join, numbered_key(1).to_text(), NOW, name="k")
        self.assertEqual(self.path.read_bytes(), before)
        self.assertEqual(sorted(os.listdir(self.data_dir)), [NETWORKS_FILE])
        self.assertEqual([m.name for m in self.store.list()], ["lab"])
