"""
Tests for L{omerta.roles.vmledger}: the VM ledger alone, on a Clock.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.roles.bridge import AddressPool
from omerta.roles.vmledger import LEDGER_VERSION, LedgerSnapshot, VMLedger, read_ledger
from omerta.roles.vmtypes import Quota, QuotaExceeded, Resources, UnknownVM, VMError, VMInfo, VMSpec

OWNER = "ab" * 32
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMwfAW7KlGfgnaViiJPnjBeigDcz8iHUIppTqKRdYEmM"


def spec(**kw) -> VMSpec:
    values = dict(vcpus=1, memory_mb=128, disk_gb=1, image="busybox", owner=OWNER, name="t")
    values.update(kw)
    return VMSpec(**values)


class Crash(Exception):
    pass


class VMLedgerTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000.5)
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "vms.json"

    def ledger(self, **kw) -> VMLedger:
        kw.setdefault("uri", "test:///default")
        ledger = VMLedger(self.path, self.clock, **kw)
        ledger.load({})
        return ledger

    def test_reserve_records_defining_entry(self):
        """reserve records the spec in state defining, created at the clock's time."""
        ledger = self.ledger()
        entry = ledger.reserve("aa" * 8, spec(vcpus=2, name="web"))
        self.assertEqual(
            entry,
            {"vm_id": "aa" * 8, "state": "defining", "created_at": 1000.5, "address": None,
             "vcpus": 2, "memory_mb": 128, "disk_gb": 1, "image": "busybox", "owner": OWNER,
             "name": "web", "ssh_key": ""},
        )
        self.assertIn("aa" * 8, ledger)
        self.assertEqual(ledger.entry("aa" * 8), entry)

    def test_created_at_follows_clock(self):
        """Each entry's created_at is the clock's time when it was reserved; ids() lists oldest first."""
        ledger = self.ledger()
        ledger.reserve("bb" * 8, spec())
        self.clock.advance(5)
        ledger.reserve("aa" * 8, spec())
        self.assertEqual(ledger.entry("aa" * 8)["created_at"], 1005.5)
        self.assertEqual(ledger.ids(), ["bb" * 8, "aa" * 8])

    def test_entry_is_a_copy(self):
        """Changing a returned entry leaves the ledger as it was."""
        ledger = self.ledger()
        ledger.reserve("aa" * 8, spec()).update(state="defined")
        ledger.entry("aa" * 8)["vcpus"] = 99
        self.assertEqual(ledger.entry("aa" * 8)["state"], "defining")
        self.assertEqual(ledger.committed().cpu_cores, 1)

    def test_committed(self):
        """committed adds up every entry, defining ones included; remove gives it back."""
        ledger = self.ledger()
        ledger.reserve("aa" * 8, spec(vcpus=2, memory_mb=256, disk_gb=3))
        ledger.reserve("bb" * 8, spec())
        ledger.mark_defined("bb" * 8)
        self.assertEqual(ledger.committed(), Resources(vms=2, cpu_cores=3, memory_mb=384, disk_gb=4))
        self.assertEqual(ledger.remove("aa" * 8)["vcpus"], 2)
        self.assertIsNone(ledger.remove("aa" * 8))
        self.assertEqual(ledger.committed(), Resources(vms=1, cpu_cores=1, memory_mb=128, disk_gb=1))

    def test_quota_refusals(self):
        """Each quota limit refuses with its reason and what is free; nothing is recorded."""
        cases = [
            (Quota(max_vms=1), spec(), "max_vms", "asked for 1 VMs, 0 of 1 free"),
            (Quota(cpu_cores=2), spec(vcpus=2), "cpu", "asked for 2 cpu cores, 1 of 2 free"),
            (Quota(memory_mb=300), spec(memory_mb=200), "memory",
             "asked for 200 MiB of memory, 172 of 300 free"),
            (Quota(disk_gb=1), spec(disk_gb=1), "disk", "asked for 1 GiB of disk, 0 of 1 free"),
        ]
        for quota, second, reason, message in cases:
            ledger = self.ledger(quota=quota)
            ledger.reserve("aa" * 8, spec())
            e = self.assertRaises(QuotaExceeded, ledger.reserve, "bb" * 8, second)
            self.assertEqual((e.reason, str(e)), (reason, message))
            self.assertNotIn("bb" * 8, ledger)
            self.assertEqual(ledger.committed().vms, 1)

    def test_quota_fits_exactly(self):
        """A request that uses the last of the quota is accepted."""
        ledger = self.ledger(quota=Quota(max_vms=2, cpu_cores=2, memory_mb=256, disk_gb=2))
        ledger.reserve("aa" * 8, spec())
        ledger.reserve("bb" * 8, spec())
        self.assertEqual(ledger.committed(), Resources(2, 2, 256, 2))

    def test_no_addresses_without_pool(self):
        """Without an address pool (test driver, no bridge) entries get no address."""
        self.assertIsNone(self.ledger().reserve("aa" * 8, spec())["address"])

    def test_address_allocation_and_free(self):
        """Addresses are handed out lowest first, freed by remove and handed out again."""
        ledger = self.ledger(addresses=AddressPool("10.237.0.1/24"))
        one = ledger.reserve("aa" * 8, spec())["address"]
        two = ledger.reserve("bb" * 8, spec())["address"]
        self.assertEqual((one, two), ("10.237.0.2", "10.237.0.3"))
        ledger.remove("aa" * 8)
        self.assertEqual(ledger.reserve("cc" * 8, spec())["address"], "10.237.0.2")
        self.assertEqual(ledger.reserve("dd" * 8, spec())["address"], "10.237.0.4")

    def test_addresses_exhausted(self):
        """With no address left, reserve refuses with reason addresses and records nothing."""
        ledger = self.ledger(addresses=AddressPool("10.237.0.1/30"))
        ledger.reserve("aa" * 8, spec())
        e = self.assertRaises(QuotaExceeded, ledger.reserve, "bb" * 8, spec())
        self.assertEqual(e.reason, "addresses")
        self.assertEqual(len(ledger), 1)

    def test_quota_before_addresses(self):
        """A request over quota is refused for the quota even when addresses are exhausted too."""
        ledger = self.ledger(quota=Quota(max_vms=1), addresses=AddressPool("10.237.0.1/30"))
        ledger.reserve("aa" * 8, spec())
        e = self.assertRaises(QuotaExceeded, ledger.reserve, "bb" * 8, spec())
        self.assertEqual(e.reason, "max_vms")

    def test_info(self):
        """info combines the entry with the state word it is given."""
        ledger = self.ledger(addresses=AddressPool("10.237.0.1/24"))
        ledger.reserve("aa" * 8, spec(name="web", image="debian-busybox"))
        self.assertEqual(
            ledger.info("aa" * 8, "running"),
            VMInfo(vm_id="aa" * 8, name="web", state="running", vcpus=1, memory_mb=128,
                   disk_gb=1, owner=OWNER, created_at=1000.5, address="10.237.0.2",
                   image="debian-busybox"),
        )

    def test_unknown_vm(self):
        """entry, info, mark_defined and set_host_key of an id never reserved raise UnknownVM."""
        ledger = self.ledger()
        self.assertRaises(UnknownVM, ledger.entry, "00" * 8)
        self.assertRaises(UnknownVM, ledger.info, "00" * 8, "running")
        self.assertRaises(UnknownVM, ledger.mark_defined, "00" * 8)
        self.assertRaises(UnknownVM, ledger.set_host_key, "00" * 8, HOST_KEY)

    def test_ssh_key_recorded(self):
        """The spec's SSH key is kept in the entry, for the kernel command line of every define."""
        ledger = self.ledger()
        key = "ssh-ed25519 " + HOST_KEY.split()[1] + " alice"
        self.assertEqual(ledger.reserve("aa" * 8, spec(ssh_key=key))["ssh_key"], key)

    def test_host_key(self):
        """set_host_key records the guest's host key in the entry and info; None forgets it; it says whether anything changed."""
        ledger = self.ledger()
        ledger.reserve("aa" * 8, spec())
        self.assertIsNone(ledger.info("aa" * 8, "running").host_key)
        self.assertTrue(ledger.set_host_key("aa" * 8, HOST_KEY))
        self.assertFalse(ledger.set_host_key("aa" * 8, HOST_KEY))
        self.assertEqual(ledger.info("aa" * 8, "running").host_key, HOST_KEY)
        self.assertEqual(ledger.snapshot().document["vms"]["aa" * 8]["host_key"], HOST_KEY)
        self.assertTrue(ledger.set_host_key("aa" * 8, None))
        self.assertFalse(ledger.set_host_key("aa" * 8, None))
        self.assertNotIn("host_key", ledger.entry("aa" * 8))
        self.assertIsNone(ledger.info("aa" * 8, "shutoff").host_key)

    def test_persistence_round_trip(self):
        """A written snapshot, read and loaded into a new ledger, gives the same entries, provider id and addresses."""
        ledger = self.ledger(addresses=AddressPool("10.237.0.1/24"))
        ledger.reserve("aa" * 8, spec(name="web"))
        ledger.mark_defined("aa" * 8)
        ledger.reserve("bb" * 8, spec())
        ledger.snapshot().write()
        document = read_ledger(self.path)
        self.assertEqual(
            (document["version"], document["provider"], document["uri"]),
            (LEDGER_VERSION, ledger.provider_id, "test:///default"),
        )
        again = VMLedger(self.path, Clock(), addresses=AddressPool("10.237.0.1/24"))
        again.load(document)
        self.assertEqual(again.provider_id, ledger.provider_id)
        self.assertEqual(again.ids(), ledger.ids())
        for vm_id in ledger.ids():
            self.assertEqual(again.entry(vm_id), ledger.entry(vm_id))
        self.assertEqual(again.reserve("cc" * 8, spec())["address"], "10.237.0.4")

    def test_snapshot_is_a_copy(self):
        """A snapshot keeps the state of its moment: later changes to the ledger do not reach it."""
        ledger = self.ledger()
        ledger.reserve("aa" * 8, spec())
        snapshot = ledger.snapshot()
        ledger.mark_defined("aa" * 8)
        ledger.reserve("bb" * 8, spec())
        self.assertEqual(list(snapshot.document["vms"]), ["aa" * 8])
        self.assertEqual(snapshot.document["vms"]["aa" * 8]["state"], "defining")

    def test_write_is_atomic(self):
        """The file is written 0600 with no temporary left; a write that fails before the rename leaves the old file."""
        ledger = self.ledger()
        ledger.reserve("aa" * 8, spec())
        ledger.snapshot().write()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.dir), ["vms.json"])
        before = self.path.read_bytes()

        def crash(src, dst):
            raise Crash()

        ledger.reserve("bb" * 8, spec())
        self.patch(os, "replace", crash)
        self.assertRaises(Crash, ledger.snapshot().write)
        self.assertEqual(self.path.read_bytes(), before)
        self.assertEqual(os.listdir(self.dir), ["vms.json"])

    def test_missing_file_is_empty(self):
        """A ledger file that does not exist yet reads as an empty document."""
        self.assertEqual(read_ledger(self.path), {})

    def test_provider_id(self):
        """An empty ledger gets a random provider id; a stored one is kept; one given explicitly wins."""
        fresh = self.ledger()
        self.assertEqual(len(bytes.fromhex(fresh.provider_id)), 8)
        self.assertNotEqual(self.ledger().provider_id, fresh.provider_id)
        stored = VMLedger(self.path, self.clock)
        stored.load(fresh.snapshot().document)
        self.assertEqual(stored.provider_id, fresh.provider_id)
        given = VMLedger(self.path, self.clock, provider_id="p1")
        given.load(fresh.snapshot().document)
        self.assertEqual(given.provider_id, "p1")

    def test_unknown_version(self):
        """A ledger of another version is refused with a message naming the file."""
        ledger = VMLedger(self.path, self.clock)
        e = self.assertRaises(VMError, ledger.load, {"version": 99, "vms": {}})
        self.assertIn(str(self.path), str(e))
        self.assertIn("99", str(e))

    def test_snapshot_document(self):
        """The snapshot is the vms.json document, written to the ledger's path."""
        ledger = self.ledger(provider_id="p1")
        snapshot = ledger.snapshot()
        self.assertIsInstance(snapshot, LedgerSnapshot)
        self.assertEqual(snapshot.path, self.path)
        snapshot.write()
        self.assertEqual(
            json.loads(self.path.read_text()),
            {"version": LEDGER_VERSION, "provider": "p1", "uri": "test:///default", "vms": {}},
        )


class SettleTests(unittest.TestCase):
    """
    L{VMLedger.settle}: the reconcile decisions, given the tagged domains.
    """

    def setUp(self):
        self.ledger = VMLedger(Path("/nonexistent/vms.json"), Clock())
        self.ledger.load({})

    def test_agreeing(self):
        """A ledger that agrees with libvirt is left as it is."""
        self.ledger.reserve("aa" * 8, spec())
        self.ledger.mark_defined("aa" * 8)
        settled = self.ledger.settle(["aa" * 8])
        self.assertEqual((settled.lost, settled.completed, settled.orphans), ({}, [], []))
        self.assertEqual(self.ledger.entry("aa" * 8)["state"], "defined")

    def test_lost(self):
        """An entry whose domain is gone is forgotten and returned, freeing its resources."""
        self.ledger.reserve("aa" * 8, spec(vcpus=2))
        self.ledger.mark_defined("aa" * 8)
        settled = self.ledger.settle([])
        self.assertEqual(list(settled.lost), ["aa" * 8])
        self.assertEqual(settled.lost["aa" * 8]["vcpus"], 2)
        self.assertNotIn("aa" * 8, self.ledger)
        self.assertEqual(self.ledger.committed(), Resources())

    def test_completed(self):
        """An entry still defining whose domain exists is marked defined."""
        self.ledger.reserve("aa" * 8, spec())
        settled = self.ledger.settle(["aa" * 8])
        self.assertEqual(settled.completed, ["aa" * 8])
        self.assertEqual(self.ledger.entry("aa" * 8)["state"], "defined")

    def test_orphans(self):
        """Tagged domains with no entry are named as orphans, in the order given."""
        self.ledger.reserve("aa" * 8, spec())
        settled = self.ledger.settle(["cc" * 8, "aa" * 8, "bb" * 8])
        self.assertEqual(settled.orphans, ["cc" * 8, "bb" * 8])
        self.assertIn("aa" * 8, self.ledger)

    def test_busy_left_alone(self):
        """An entry whose create is under way is neither lost nor completed."""
        self.ledger.reserve("aa" * 8, spec())
        self.ledger.reserve("bb" * 8, spec())
        settled = self.ledger.settle(["bb" * 8], busy={"aa" * 8, "bb" * 8})
        self.assertEqual((settled.lost, settled.completed, settled.orphans), ({}, [], []))
        self.assertEqual(self.ledger.entry("aa" * 8)["state"], "defining")
        self.assertEqual(self.ledger.entry("bb" * 8)["state"], "defining")
