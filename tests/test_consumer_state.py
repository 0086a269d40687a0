"""
The consumer's state file (omerta.roles.consumer): VMs held and provider
scores kept in consumer.json (mode 0600, atomic, locked read-modify-write,
nothing saved when the change fails), damaged or foreign files refused and
left untouched, VMs found by id or prefix, provider outcomes recorded.
"""

import dataclasses
import fcntl
import json
import os
import stat
from pathlib import Path

from twisted.trial import unittest

from omerta.roles.consumer import (
    LOCK_FILE,
    STATE_FILE,
    VERSION,
    ConsumerState,
    ConsumerStateError,
    ConsumerStore,
    HeldVM,
    ProviderScore,
)
from omerta.storage import StateFileError


class Boom(Exception):
    pass


def held(vm_id="0123456789abcdef", **changes) -> HeldVM:
    vm = HeldVM(
        vm_id=vm_id,
        provider="aa" * 16,
        provider_name="prov-1",
        network="lab",
        created_at=1_700_000_000.5,
        vcpus=2,
        memory_mb=2048,
        disk_gb=10,
        image="debian-busybox",
        name="web",
        state="running",
        address="10.99.0.2",
        wg_public_key="cHVibGlj",
        provider_wg_key="cHJvdmlkZXI=",
        path_kind="direct",
        tunnel_address="100.64.7.2",
        provider_tunnel_address="100.64.7.1",
        tunnel_prefix=24,
    )
    return dataclasses.replace(vm, **changes)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.data_dir = Path(self.mktemp())
        self.store = ConsumerStore(self.data_dir)
        self.path = self.data_dir / STATE_FILE

    def test_load_nothing_yet(self):
        """With no file, load gives an empty state and creates nothing."""
        state = self.store.load()
        self.assertEqual((state.vms, state.providers), ({}, {}))
        self.assertFalse(self.data_dir.exists())

    def test_update_saves(self):
        """What the body of update() changes is there for the next load."""
        vm = held()
        with self.store.update() as state:
            state.vms[vm.vm_id] = vm
            state.record_outcome("aa" * 16, True, 1.5, 1000.0, 0.7)
        loaded = self.store.load()
        self.assertEqual(loaded.vms, {vm.vm_id: vm})
        self.assertEqual(loaded.providers, {
            "aa" * 16: ProviderScore(reputation=0.7, successes=1, last_latency_s=1.5,
                                     last_outcome_at=1000.0)})

    def test_document_layout(self):
        """The file is JSON with the version, the VMs and the providers by key."""
        with self.store.update() as state:
            state.vms["0123456789abcdef"] = held()
        document = json.loads(self.path.read_text())
        self.assertEqual(document["version"], VERSION)
        self.assertEqual(document["vms"]["0123456789abcdef"], dataclasses.asdict(held()))
        self.assertEqual(document["providers"], {})

    def test_modes(self):
        """consumer.json and consumer.lock are 0600, a new data dir 0700."""
        with self.store.update() as state:
            state.vms["0123456789abcdef"] = held()
        self.assertEqual(mode_of(self.path), 0o600)
        self.assertEqual(mode_of(self.data_dir / LOCK_FILE), 0o600)
        self.assertEqual(mode_of(self.data_dir), 0o700)

    def test_no_temp_files_left(self):
        """An atomic rewrite leaves only the state and lock files."""
        for vm_id in ("0123456789abcdef", "fedcba9876543210"):
            with self.store.update() as state:
                state.vms[vm_id] = held(vm_id)
        self.assertEqual(sorted(os.listdir(self.data_dir)), sorted([STATE_FILE, LOCK_FILE]))

    def test_body_raises_saves_nothing_new(self):
        """A body that raises leaves no file when there was none."""
        with self.assertRaises(Boom):
            with self.store.update() as state:
                state.vms["0123456789abcdef"] = held()
                raise Boom()
        self.assertFalse(self.path.exists())

    def test_body_raises_keeps_old_file(self):
        """A body that raises leaves the previous file byte for byte."""
        with self.store.update() as state:
            state.vms["0123456789abcdef"] = held()
        before = self.path.read_bytes()
        with self.assertRaises(Boom):
            with self.store.update() as state:
                del state.vms["0123456789abcdef"]
                state.vms["fedcba9876543210"] = held("fedcba9876543210")
                raise Boom()
        self.assertEqual(self.path.read_bytes(), before)

    def test_two_stores_keep_both(self):
        """Updates through two stores on one directory (two commands) keep each other's VMs."""
        other = ConsumerStore(self.data_dir)
        with self.store.update() as state:
            state.vms["0123456789abcdef"] = held()
        with other.update() as state:
            state.vms["fedcba9876543210"] = held("fedcba9876543210")
        with self.store.update() as state:
            state.record_outcome("bb" * 16, False, None, 5.0, None)
        loaded = ConsumerStore(self.data_dir).load()
        self.assertEqual(sorted(loaded.vms), ["0123456789abcdef", "fedcba9876543210"])
        self.assertEqual(list(loaded.providers), ["bb" * 16])

    def _lock_is_free(self) -> bool:
        """Whether another open file description could take consumer.lock now."""
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # also drops the lock if we took it
        return True

    def test_lock_held_during_body(self):
        """While the body runs, consumer.lock is exclusively locked; afterwards it is free."""
        with self.store.update():
            self.assertFalse(self._lock_is_free())
        self.assertTrue(self._lock_is_free())

    def test_lock_released_when_body_raises(self):
        """A body that raises does not leave consumer.lock locked."""
        with self.assertRaises(Boom):
            with self.store.update():
                raise Boom()
        self.assertTrue(self._lock_is_free())

    def test_lock_released_when_load_fails(self):
        """A state file update() refuses does not leave consumer.lock locked."""
        self.data_dir.mkdir()
        self.path.write_text("{not json")
        self.assertRaises(StateFileError, self.store.update().__enter__)
        self.assertTrue(self._lock_is_free())


class RefusalTests(unittest.TestCase):
    def setUp(self):
        self.data_dir = Path(self.mktemp())
        self.data_dir.mkdir()
        self.store = ConsumerStore(self.data_dir)
        self.path = self.data_dir / STATE_FILE

    def write(self, content, mode=0o600):
        self.path.write_text(content if isinstance(content, str) else json.dumps(content))
        os.chmod(self.path, mode)
        return self.path.read_bytes()

    def assertRefusedUntouched(self, content, error=ConsumerStateError, mode=0o600):
        """load() and update() raise C{error} and the file keeps its bytes and mode."""
        before = self.write(content, mode)
        failure = self.assertRaises(error, self.store.load)
        with self.assertRaises(error):
            with self.store.update() as state:
                state.vms["0123456789abcdef"] = held()
        self.assertEqual(self.path.read_bytes(), before)
        self.assertEqual(mode_of(self.path), mode)
        return failure

    def test_other_version(self):
        """A file of another version is refused with both versions named, untouched."""
        error = self.assertRefusedUntouched({"version": VERSION + 1, "vms": {}})
        self.assertIn(f"version {VERSION + 1}", str(error))
        self.assertIn(f"version {VERSION}", str(error))
        self.assertIn("untouched", str(error))

    def test_no_version(self):
        """A non-empty document without a version is refused."""
        self.assertRefusedUntouched({"vms": {}})

    def test_not_json(self):
        """A file that is not JSON is refused (as a state file error), untouched."""
        error = self.assertRefusedUntouched("{damaged", error=StateFileError)
        self.assertIn(str(self.path), str(error))

    def test_foreign_fields(self):
        """A VM entry with fields a HeldVM lacks is refused, untouched."""
        vm = dict(dataclasses.asdict(held()), colour="red")
        error = self.assertRefusedUntouched(
            {"version": VERSION, "vms": {"0123456789abcdef": vm}})
        self.assertIn(str(self.path), str(error))

    def test_missing_fields(self):
        """A provider entry missing its reputation is refused, untouched."""
        self.assertRefusedUntouched({"version": VERSION, "providers": {"aa": {"successes": 1}}})

    def test_wrong_shapes(self):
        """Documents of the wrong shape are refused as ConsumerStateError, untouched."""
        for document in ([1, 2], [], '"text"', 7, None,
                         {"version": VERSION, "vms": []},
                         {"version": VERSION, "vms": None},
                         {"version": VERSION, "vms": {"x": "text"}},
                         {"version": VERSION, "providers": [1]}):
            self.assertRefusedUntouched(document)

    def test_world_readable(self):
        """A consumer.json others can read is refused with the chmod that fixes it, untouched."""
        with self.store.update() as state:
            state.vms["0123456789abcdef"] = held()
        error = self.assertRefusedUntouched(self.path.read_text(), error=StateFileError,
                                            mode=0o644)
        self.assertIn(f"chmod 600 {self.path}", str(error))

    def test_group_writable(self):
        """A consumer.json its group can write is refused too."""
        self.assertRefusedUntouched({}, error=StateFileError, mode=0o620)

    def test_empty_document(self):
        """An empty JSON object is an empty state."""
        self.write({})
        state = self.store.load()
        self.assertEqual((state.vms, state.providers), ({}, {}))


class FindTests(unittest.TestCase):
    def setUp(self):
        self.state = ConsumerState(vms={
            vm_id: held(vm_id) for vm_id in ("0123456789abcdef", "0123ffffffffffff",
                                             "fedcba9876543210")})

    def test_by_id(self):
        """A full id finds its VM."""
        self.assertEqual(self.state.find("0123456789abcdef").vm_id, "0123456789abcdef")

    def test_by_prefix(self):
        """A prefix only one VM has finds it."""
        self.assertEqual(self.state.find("fe").vm_id, "fedcba9876543210")
        self.assertEqual(self.state.find("01234").vm_id, "0123456789abcdef")

    def test_case_and_spaces(self):
        """Upper case and surrounding spaces are forgiven."""
        self.assertEqual(self.state.find("  FEDCBA\n").vm_id, "fedcba9876543210")

    def test_ambiguous(self):
        """A prefix several VMs share asks for more of the id."""
        error = self.assertRaises(LookupError, self.state.find, "0123")
        self.assertIn("matches 2 VMs", str(error))
        self.assertIn("more of the id", str(error))

    def test_unknown(self):
        """An id nobody has names the VMs held and the command that lists them."""
        error = self.assertRaises(LookupError, self.state.find, "99")
        self.assertIn("'99'", str(error))
        self.assertIn("0123456789abcdef, 0123ffffffffffff, fedcba9876543210", str(error))
        self.assertIn("omerta vm list", str(error))

    def test_empty_ref(self):
        """An empty reference matches no VM, even when only one is held."""
        state = ConsumerState(vms={"0123456789abcdef": held()})
        self.assertRaises(LookupError, state.find, "")
        self.assertRaises(LookupError, state.find, "  ")

    def test_none_held(self):
        """With no VMs held the message says so."""
        error = self.assertRaises(LookupError, ConsumerState().find, "01")
        self.assertIn("held: none", str(error))


class OutcomeTests(unittest.TestCase):
    def test_first_outcome(self):
        """A provider's first outcome starts it at reputation 0.5 unless one is given."""
        state = ConsumerState()
        state.record_outcome("aa", False, None, 10.0, None)
        self.assertEqual(state.providers["aa"], ProviderScore(
            reputation=0.5, successes=0, failures=1, last_latency_s=None, last_outcome_at=10.0))

    def test_counts_and_latest(self):
        """Outcomes add up; the latest latency, time and reputation are kept, rounded."""
        state = ConsumerState()
        state.record_outcome("aa", True, 0.123456, 10.0, 0.612345678)
        state.record_outcome("aa", True, 2.0, 20.0, None)
        state.record_outcome("aa", False, None, 30.0, 0.4)
        self.assertEqual(state.providers["aa"], ProviderScore(
            reputation=0.4, successes=2, failures=1, last_latency_s=None, last_outcome_at=30.0))
        state.record_outcome("aa", True, 0.123456, 40.0, 0.612345678)
        self.assertEqual((state.providers["aa"].last_latency_s, state.providers["aa"].reputation),
                         (0.123, 0.6123))

    def test_providers_apart(self):
        """Each provider has its own score."""
        state = ConsumerState()
        state.record_outcome("aa", True, 1.0, 1.0, 0.9)
        state.record_outcome("bb", False, None, 2.0, 0.1)
        self.assertEqual((state.providers["aa"].successes, state.providers["bb"].failures), (1, 1))


class HeldVMTests(unittest.TestCase):
    def test_public_holds_no_private_key(self):
        """public() is every field; none of them is a private key (those stay in key files)."""
        document = held().public()
        self.assertEqual(set(document), {f.name for f in dataclasses.fields(HeldVM)})
        self.assertFalse(any("private" in name for name in document))

    def test_version_1_read(self):
        """A version 1 file (a key pair per VM, the provider's endpoint) is read as version 2."""
        old = dict(dataclasses.asdict(held()), wg_private_key="cHJpdmF0ZQ==",
                   provider_endpoint="192.0.2.1:51820")
        for name in ("tunnel_address", "provider_tunnel_address", "tunnel_prefix",
                     "host_key", "ssh_key"):
            del old[name]
        state = ConsumerState.from_document({"version": 1, "vms": {"0123456789abcdef": old}},
                                            Path("x"))
        vm = state.vms["0123456789abcdef"]
        self.assertIsNone(vm.tunnel_address)
        self.assertNotIn("cHJpdmF0ZQ==", json.dumps(state.as_document()))

    def test_document_round_trip(self):
        """A state turned into its document and back is equal, None address included."""
        state = ConsumerState(vms={"0123456789abcdef": held(address=None)})
        state.record_outcome("aa", True, 1.0, 2.0, 0.75)
        document = json.loads(json.dumps(state.as_document()))
        self.assertEqual(ConsumerState.from_document(document, Path("x")), state)
