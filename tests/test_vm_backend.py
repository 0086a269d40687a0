"""
Tests for L{omerta.roles.vm}: the libvirt VM backend on libvirt's test driver
and, for the qemu kind, on a fake connection.  The ledger alone is tested in
L{tests.test_vm_ledger}, the domain XML in L{tests.test_domain_xml}.
"""

from __future__ import annotations

import json
import os
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

from twisted.internet import defer
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from omerta.metrics import Metrics
from omerta.roles import guest, vm
from omerta.roles.vm import (
    HostTools,
    IVMBackend,
    LibvirtBackend,
    Quota,
    QuotaExceeded,
    UnknownVM,
    VMSpec,
    build_domain_xml,
)
from omerta.roles.vmledger import VMLedger

try:
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None
    if os.geteuid() == 0:
        raise  # as root the environment can install it: never skip silently

OWNER = "ab" * 32
SSH_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMwfAW7KlGfgnaViiJPnjBeigDcz8iHUIppTqKRdYEmM"
           " alice@laptop")
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKXXrJCpWnnAR7Be7E6VmnMOg0oYNWVvwxZCcCgxTZ0C"


def spec(**kw) -> VMSpec:
    values = dict(vcpus=1, memory_mb=128, disk_gb=1, image="busybox", owner=OWNER, name="t")
    values.update(kw)
    return VMSpec(**values)


class RecordingConnection:
    """
    A libvirt connection proxy that records the thread of every call, on the
    connection and on the domains it returns.
    """

    def __init__(self, conn, threads):
        self._conn = conn
        self._threads = threads

    def __getattr__(self, name):
        target = getattr(self._conn, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            self._threads.append((name, threading.current_thread()))
            result = target(*args, **kwargs)
            if isinstance(result, libvirt.virDomain):
                return RecordingConnection(result, self._threads)
            if isinstance(result, list):
                return [
                    RecordingConnection(r, self._threads)
                    if isinstance(r, libvirt.virDomain)
                    else r
                    for r in result
                ]
            return result

        return call


class FixedTimeReactor:
    """
    A reactor whose clock stands still at C{now}; everything else is the
    real reactor's.
    """

    def __init__(self, reactor, now):
        self._reactor = reactor
        self.now = now

    def seconds(self):
        return self.now

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class ClockedReactor:
    """
    The real reactor (threads, callFromThread) whose timers are a
    L{Clock}'s, so a test decides when a backoff has passed.
    """

    def __init__(self, reactor):
        from twisted.internet.task import Clock

        self._reactor = reactor
        self.clock = Clock()

    def callLater(self, *args, **kw):
        return self.clock.callLater(*args, **kw)

    def seconds(self):
        return self.clock.seconds()

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class LibvirtBackendTests(unittest.TestCase):
    skip = None if libvirt is not None else "libvirt-python is not installed (and not root)"

    def setUp(self):
        # test:///default keeps its state while one connection is open: hold
        # one for the whole test so a "restarted" backend finds its domains,
        # and close it afterwards so the next test starts from a fresh driver
        self.keeper = libvirt.open("test:///default")
        self.addCleanup(self.keeper.close)
        self.data_dir = Path(self.mktemp())
        self.metrics = Metrics()

    @defer.inlineCallbacks
    def backend(self, **kw):
        kw.setdefault("metrics", self.metrics)
        b = LibvirtBackend(self.data_dir, **kw)
        b.startService()
        self.addCleanup(lambda: b.stopService() if b.running else None)
        yield b.whenReady
        return b

    def ours(self):
        return sorted(
            d.name() for d in self.keeper.listAllDomains(0) if d.name().startswith("omerta-")
        )

    @defer.inlineCallbacks
    def test_interface(self):
        """LibvirtBackend provides IVMBackend."""
        b = yield self.backend()
        self.assertTrue(verifyObject(IVMBackend, b))

    @defer.inlineCallbacks
    def test_lifecycle(self):
        """create defines a stopped VM; start, info, list, stop and destroy drive it through libvirt."""
        b = yield self.backend()
        info = yield b.create(spec(vcpus=2, memory_mb=256, disk_gb=2))
        self.assertEqual(info.state, "shutoff")
        self.assertEqual((info.vcpus, info.memory_mb, info.disk_gb, info.owner), (2, 256, 2, OWNER))
        self.assertEqual(self.ours(), ["omerta-" + info.vm_id])
        self.assertTrue(b.disk_path(info.vm_id).exists())
        self.assertEqual((yield b.start(info.vm_id)).state, "running")
        self.assertEqual((yield b.info(info.vm_id)).state, "running")
        self.assertEqual([i.vm_id for i in (yield b.list())], [info.vm_id])
        self.assertEqual((yield b.stop(info.vm_id)).state, "shutoff")
        self.assertEqual(b.committed(), vm.Resources(vms=1, cpu_cores=2, memory_mb=256, disk_gb=2))
        yield b.destroy(info.vm_id)
        self.assertEqual(self.ours(), [])
        self.assertFalse(b.disk_path(info.vm_id).exists())
        self.assertEqual((yield b.list()), [])
        self.assertEqual(b.committed(), vm.Resources())
        self.assertEqual(self.metrics.get("vm_created"), 1)
        self.assertEqual(self.metrics.get("vm_destroyed"), 1)

    @defer.inlineCallbacks
    def test_destroy_running(self):
        """destroy powers off a running VM before undefining it."""
        b = yield self.backend()
        info = yield b.create(spec())
        yield b.start(info.vm_id)
        yield b.destroy(info.vm_id)
        self.assertEqual(self.ours(), [])

    @defer.inlineCallbacks
    def test_unknown_vm(self):
        """Operations on an id this provider never created fail with UnknownVM."""
        b = yield self.backend()
        for op in (b.info, b.start, b.stop, b.destroy):
            yield self.assertFailure(op("0" * 16), UnknownVM)

    @defer.inlineCallbacks
    def test_bad_spec(self):
        """A spec with no memory or a path as image is refused before libvirt is called."""
        b = yield self.backend()
        yield self.assertFailure(b.create(spec(memory_mb=0)), vm.BadSpec)
        yield self.assertFailure(b.create(spec(image="../etc")), vm.BadSpec)
        yield self.assertFailure(b.create(spec(owner="not hex")), vm.BadSpec)
        self.assertEqual(self.ours(), [])

    @defer.inlineCallbacks
    def test_quota_max_vms(self):
        """A request beyond max_vms is refused with reason max_vms and nothing is defined."""
        b = yield self.backend(quota=Quota(max_vms=1))
        yield b.create(spec())
        e = yield self.assertFailure(b.create(spec()), QuotaExceeded)
        self.assertEqual(e.reason, "max_vms")
        self.assertEqual(len(self.ours()), 1)
        self.assertEqual(self.metrics.get("vm_quota_refused", reason="max_vms"), 1)

    @defer.inlineCallbacks
    def test_quota_memory(self):
        """Memory headroom counts every committed VM, including ones still being defined."""
        b = yield self.backend(quota=Quota(memory_mb=300))
        first = b.create(spec(memory_mb=200))  # not yet fired: reserved
        e = yield self.assertFailure(b.create(spec(memory_mb=200)), QuotaExceeded)
        self.assertEqual(e.reason, "memory")
        self.assertIn("100 of 300 free", str(e))
        yield first
        yield b.create(spec(memory_mb=100))

    @defer.inlineCallbacks
    def test_quota_released_by_destroy(self):
        """Destroying a VM gives its resources back to the quota."""
        b = yield self.backend(quota=Quota(max_vms=1, cpu_cores=2, disk_gb=1))
        info = yield b.create(spec(vcpus=2))
        yield self.assertFailure(b.create(spec()), QuotaExceeded)
        yield b.destroy(info.vm_id)
        yield b.create(spec(vcpus=2))

    @defer.inlineCallbacks
    def test_ledger_persisted(self):
        """The ledger is written atomically (no temp file left, mode 0600) and a restarted backend reloads it."""
        b = yield self.backend()
        info = yield b.create(spec(name="web"))
        document = json.loads(b.ledger_path.read_text())
        self.assertEqual(document["vms"][info.vm_id]["state"], "defined")
        self.assertEqual(document["vms"][info.vm_id]["owner"], OWNER)
        self.assertEqual(os.stat(b.ledger_path).st_mode & 0o777, 0o600)
        self.assertEqual([p.name for p in self.data_dir.iterdir() if ".tmp" in p.name], [])
        provider = b.provider_id
        yield b.stopService()
        b2 = yield self.backend()
        self.assertEqual(b2.provider_id, provider)
        self.assertEqual(b2.lastReconcile, vm.ReconcileReport())
        [again] = yield b2.list()
        self.assertEqual((again.vm_id, again.name, again.created_at), (info.vm_id, "web", info.created_at))

    @defer.inlineCallbacks
    def test_reconcile_lost(self):
        """After a restart, a ledger entry whose domain vanished is removed with its disk, and a warning names it."""
        b = yield self.backend()
        info = yield b.create(spec())
        yield b.stopService()
        self.keeper.lookupByName("omerta-" + info.vm_id).undefine()
        with capturedLogs() as events:
            b2 = yield self.backend()
        self.assertEqual(b2.lastReconcile.lost, [info.vm_id])
        self.assertEqual(
            [(e["log_level"], e["owner"]) for e in events if e.get("vm_id") == info.vm_id],
            [(LogLevel.warn, OWNER)],
        )
        self.assertEqual((yield b2.list()), [])
        self.assertFalse(b2.disk_path(info.vm_id).exists())
        self.assertNotIn(info.vm_id, json.loads(b2.ledger_path.read_text())["vms"])
        self.assertEqual(self.metrics.get("vm_reconciled", outcome="lost"), 1)

    @defer.inlineCallbacks
    def test_reconcile_orphan(self):
        """A domain tagged with this provider's id but never recorded is destroyed with a warning; others are left alone."""
        b = yield self.backend()
        provider = b.provider_id
        yield b.stopService()
        orphan = self.keeper.defineXML(
            build_domain_xml("test", "00" * 8, provider, spec(), 1.0, Path("/nonexistent"))
        )
        orphan.create()
        stranger = self.keeper.defineXML(
            build_domain_xml("test", "11" * 8, "another-provider", spec(), 1.0, Path("/x"))
        )
        with capturedLogs() as events:
            b2 = yield self.backend()
        self.assertEqual(b2.lastReconcile.orphans_destroyed, ["omerta-" + "00" * 8])
        self.assertEqual(
            [e["log_level"] for e in events if e.get("name") == "omerta-" + "00" * 8],
            [LogLevel.warn],
        )
        self.assertEqual(self.ours(), ["omerta-" + "11" * 8])
        self.assertEqual((yield b2.list()), [])
        stranger.undefine()

    @defer.inlineCallbacks
    def test_reconcile_completes_defining(self):
        """An entry recorded as defining whose domain exists is kept and marked defined."""
        b = yield self.backend()
        info = yield b.create(spec())
        yield b.stopService()
        document = json.loads(b.ledger_path.read_text())
        document["vms"][info.vm_id]["state"] = "defining"
        b.ledger_path.write_text(json.dumps(document))
        b2 = yield self.backend()
        self.assertEqual(b2.lastReconcile.completed, [info.vm_id])
        self.assertEqual([i.vm_id for i in (yield b2.list())], [info.vm_id])

    @defer.inlineCallbacks
    def test_off_reactor_thread(self):
        """Every libvirt call, including opening the connection, runs on the worker thread."""
        threads = []

        def connect(uri):
            threads.append(("open", threading.current_thread()))
            return RecordingConnection(libvirt.open(uri), threads)

        b = yield self.backend(tools=HostTools(connect=connect))
        info = yield b.create(spec())
        yield b.start(info.vm_id)
        yield b.list()
        yield b.stop(info.vm_id)
        yield b.destroy(info.vm_id)
        yield b.stopService()
        names = {n for n, _ in threads}
        self.assertTrue({"open", "defineXML", "lookupByName", "create", "destroy", "undefine", "close"} <= names)
        reactor_thread = threading.current_thread()
        self.assertEqual([n for n, t in threads if t is reactor_thread], [])

    @defer.inlineCallbacks
    def test_ledger_on_reactor_thread(self):
        """The ledger is loaded, read and changed on the reactor thread only."""
        threads = []
        for name in ("load", "snapshot", "reserve", "mark_defined", "remove", "settle",
                     "entry", "ids", "committed"):
            def recording(self_, *args, _original=getattr(VMLedger, name), **kwargs):
                threads.append(threading.current_thread())
                return _original(self_, *args, **kwargs)

            self.patch(VMLedger, name, recording)
        b = yield self.backend()
        info = yield b.create(spec())
        yield b.start(info.vm_id)
        yield b.list()
        yield b.destroy(info.vm_id)
        yield b.reconcile()
        self.assertTrue(threads)
        self.assertEqual(set(threads), {threading.current_thread()})

    @defer.inlineCallbacks
    def test_no_address_on_test_driver(self):
        """The test driver's VMs get no address and no bridge is set up."""
        calls = []
        b = yield self.backend(tools=HostTools(bridge_setup=lambda *a: calls.append(a)))
        info = yield b.create(spec())
        self.assertIsNone(info.address)
        yield b.start(info.vm_id)
        self.assertEqual(calls, [])

    @defer.inlineCallbacks
    def test_created_at_from_reactor_clock(self):
        """A VM's created_at is the reactor's time, as the ledger and the domain metadata record it."""
        from twisted.internet import reactor

        b = yield self.backend(reactor=FixedTimeReactor(reactor, 1234.5))
        info = yield b.create(spec())
        self.assertEqual(info.created_at, 1234.5)
        dom = self.keeper.lookupByName("omerta-" + info.vm_id)
        self.assertEqual(vm.parse_domain_metadata(dom.XMLDesc(0))["created_at"], 1234.5)

    @defer.inlineCallbacks
    def test_reconcile_spares_create_in_flight(self):
        """A reconcile while a create is under way neither loses nor orphans that VM."""
        b = yield self.backend()
        creating = b.create(spec())
        report = yield b.reconcile()
        self.assertEqual(report, vm.ReconcileReport())
        info = yield creating
        self.assertEqual([i.vm_id for i in (yield b.list())], [info.vm_id])
        self.assertEqual((yield b.reconcile()), vm.ReconcileReport())

    @defer.inlineCallbacks
    def test_bad_ssh_key(self):
        """A spec whose SSH key is not a supported public key line is a BadSpec saying why."""
        b = yield self.backend()
        e = yield self.assertFailure(b.create(spec(ssh_key="ssh-dss AAAA")), vm.BadSpec)
        self.assertIn("supported type", str(e))
        self.assertEqual(self.ours(), [])

    @defer.inlineCallbacks
    def test_wait_ready_test_driver(self):
        """On the test driver wait_ready fires at once with the VM's info and no host key; an unknown id fails."""
        b = yield self.backend()
        info = yield b.create(spec(ssh_key=SSH_KEY))
        yield b.start(info.vm_id)
        ready = yield b.wait_ready(info.vm_id, 0)
        self.assertEqual((ready.vm_id, ready.state, ready.host_key), (info.vm_id, "running", None))
        yield self.assertFailure(b.wait_ready("0" * 16, 1), UnknownVM)

    @defer.inlineCallbacks
    def test_libvirt_unreachable_at_start_is_tried_again(self):
        """
        libvirtd not answering yet when the provider starts: the backend
        logs it and connects again after 1 s, then 2 s, and is ready once
        libvirt answers.
        """
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        clocked = ClockedReactor(reactor)
        attempts = []

        def connect(uri):
            attempts.append(uri)
            if len(attempts) <= 2:
                raise libvirt.libvirtError("Failed to connect socket to libvirt-sock")
            return libvirt.open(uri)

        b = LibvirtBackend(self.data_dir, reactor=clocked, metrics=self.metrics,
                           tools=vm.HostTools(connect=connect))
        self.addCleanup(lambda: b.stopService() if b.running else None)
        with capturedLogs() as events:
            b.startService()
            for wanted, wait in ((1, 1.0), (2, 2.0)):
                for _ in range(500):  # (the attempt runs on the worker thread)
                    if len(attempts) == wanted and clocked.clock.getDelayedCalls():
                        break
                    yield deferLater(reactor, 0.01, lambda: None)
                self.assertEqual(len(attempts), wanted)
                self.assertFalse(b.whenReady.called)
                clocked.clock.advance(wait - 0.01)
                self.assertEqual(len(attempts), wanted, "tried again before the backoff")
                clocked.clock.advance(0.01)
            yield b.whenReady
        self.assertEqual(len(attempts), 3)
        self.assertEqual(self.metrics.get("vm_backend_connect_failures"), 2)
        warned = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warned), 2)
        self.assertIn("trying again in 1 s", warned[0]["log_format"].format(**warned[0]))

    @defer.inlineCallbacks
    def test_stopping_while_libvirt_is_unreachable(self):
        """A backend stopped while it waits to connect again fails whenReady and leaves no timer."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        clocked = ClockedReactor(reactor)

        def connect(uri):
            raise libvirt.libvirtError("Failed to connect socket to libvirt-sock")

        b = LibvirtBackend(self.data_dir, reactor=clocked, metrics=self.metrics,
                           tools=vm.HostTools(connect=connect))
        with capturedLogs():
            b.startService()
            for _ in range(500):
                if clocked.clock.getDelayedCalls():
                    break
                yield deferLater(reactor, 0.01, lambda: None)
            yield b.stopService()
            yield self.assertFailure(b.whenReady, vm.VMError)
        self.assertEqual(clocked.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_not_running(self):
        """A stopped backend fails calls instead of touching libvirt on the reactor thread."""
        b = yield self.backend()
        yield b.stopService()
        yield self.assertFailure(b.list(), vm.VMError)


class FakeDomain:
    """
    A libvirt domain as the fake connection keeps it.
    """

    def __init__(self, conn, xml):
        self._conn = conn
        self.xml = xml
        self.active = False
        self._name = ET.fromstring(xml).findtext("name")

    def name(self):
        return self._name

    def XMLDesc(self, flags):
        return self.xml

    def isActive(self):
        return self.active

    def create(self):
        self.active = True

    def destroy(self):
        self.active = False

    def undefine(self):
        del self._conn.domains[self._name]

    def state(self, flags):
        return [1 if self.active else 5, 0]


class FakeConnection:
    """
    The part of a qemu:///system connection the backend uses, in memory, so
    the qemu kind's bookkeeping is tested without root or libvirtd.
    """

    def __init__(self):
        self.domains = {}
        self.threads = []

    def listAllDomains(self, flags):
        return list(self.domains.values())

    def defineXML(self, xml):
        self.threads.append(threading.current_thread())
        dom = FakeDomain(self, xml)
        self.domains[dom.name()] = dom
        return dom

    def lookupByName(self, name):
        if name not in self.domains:
            e = libvirt.libvirtError(f"no domain {name}")
            e.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, f"no domain {name}")
            raise e
        return self.domains[name]

    def close(self):
        pass


class FakeImageBuilder:
    def __init__(self, root, error=None):
        self.root = Path(root)
        self.error = error
        self.calls = []

    def ensure(self, name):
        self.calls.append((name, threading.current_thread()))
        if self.error is not None:
            raise self.error
        return self.root / name


class QemuKindTests(unittest.TestCase):
    """
    The qemu kind (image, bridge, addresses) on a fake connection.
    """

    skip = LibvirtBackendTests.skip

    def setUp(self):
        self.conn = FakeConnection()
        self.data_dir = Path(self.mktemp())
        self.images = FakeImageBuilder("/images")
        self.bridges = []
        self.metrics = Metrics()

    @defer.inlineCallbacks
    def backend(self, **kw):
        kw.setdefault("metrics", self.metrics)
        tools = HostTools(
            connect=lambda uri: self.conn,
            image_builder=self.images,
            bridge_setup=lambda *a: self.bridges.append((a, threading.current_thread())),
        )
        b = LibvirtBackend(self.data_dir, uri="qemu:///system", tools=tools, **kw)
        b.startService()
        self.addCleanup(lambda: b.stopService() if b.running else None)
        yield b.whenReady
        return b

    def xml(self, vm_id):
        return ET.fromstring(self.conn.domains["omerta-" + vm_id].xml)

    @defer.inlineCallbacks
    def test_addresses_and_cmdline(self):
        """Each VM gets its own address on the default bridge, passed with the gateway and its id on the kernel command line."""
        b = yield self.backend()
        one = yield b.create(spec(image="debian-busybox"))
        two = yield b.create(spec(image="debian-busybox"))
        self.assertEqual((one.address, two.address), ("10.237.0.2", "10.237.0.3"))
        dom = self.xml(one.vm_id)
        self.assertEqual(
            dom.findtext("os/cmdline"),
            f"console=ttyS0 omerta.vm={one.vm_id} omerta.ip=10.237.0.2/24 omerta.gw=10.237.0.1",
        )
        self.assertEqual(dom.findtext("os/kernel"), "/images/debian-busybox/vmlinuz")
        self.assertEqual(dom.find("devices/interface/source").get("bridge"), "omerta-br0")
        self.assertEqual([a for a, _ in self.bridges], [("omerta-br0", "10.237.0.1/24")] * 2)
        self.assertEqual([n for n, _ in self.images.calls], ["debian-busybox"] * 2)
        document = json.loads(b.ledger_path.read_text())
        self.assertEqual(document["vms"][two.vm_id]["address"], "10.237.0.3")

    @defer.inlineCallbacks
    def test_blocking_work_off_reactor(self):
        """Image builds and bridge setup run on the worker thread, not the reactor thread."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        yield b.start(info.vm_id)
        reactor_thread = threading.current_thread()
        threads = [t for _, t in self.images.calls + self.bridges] + self.conn.threads
        self.assertEqual(len(threads), 5)
        self.assertNotIn(reactor_thread, threads)

    @defer.inlineCallbacks
    def test_address_freed_and_persisted(self):
        """A destroyed VM's address is free again; a restarted backend never hands out one in use."""
        b = yield self.backend()
        one = yield b.create(spec(image="debian-busybox"))
        two = yield b.create(spec(image="debian-busybox"))
        yield b.destroy(one.vm_id)
        yield b.stopService()
        b2 = yield self.backend()
        three = yield b2.create(spec(image="debian-busybox"))
        four = yield b2.create(spec(image="debian-busybox"))
        self.assertEqual((three.address, four.address), (one.address, "10.237.0.4"))
        self.assertEqual((yield b2.info(two.vm_id)).address, two.address)

    @defer.inlineCallbacks
    def test_addresses_exhausted(self):
        """With no address left, create fails with QuotaExceeded(addresses) and defines nothing."""
        b = yield self.backend(bridge_address="10.237.0.1/30")
        yield b.create(spec(image="debian-busybox"))
        e = yield self.assertFailure(b.create(spec(image="debian-busybox")), QuotaExceeded)
        self.assertEqual(e.reason, "addresses")
        self.assertEqual(len(self.conn.domains), 1)
        self.assertEqual(b.committed().vms, 1)

    @defer.inlineCallbacks
    def test_unknown_image(self):
        """An unknown image is a BadSpec listing the known images; no address is used."""
        b = yield self.backend()
        e = yield self.assertFailure(b.create(spec(image="windows")), vm.BadSpec)
        self.assertIn("debian-busybox", str(e))
        self.assertEqual((self.conn.domains, self.images.calls), ({}, []))
        self.assertEqual((yield b.create(spec(image="debian-busybox"))).address, "10.237.0.2")

    @defer.inlineCallbacks
    def test_image_failure(self):
        """A failed image build fails create with its message, and the slot and address are released."""
        from omerta.roles.guest import ImageError

        self.images.error = ImageError("apt-get download busybox-static failed")
        b = yield self.backend()
        e = yield self.assertFailure(b.create(spec(image="debian-busybox")), vm.VMError)
        self.assertIn("busybox-static", str(e))
        self.assertEqual((self.conn.domains, b.committed()), ({}, vm.Resources()))
        self.assertEqual(json.loads(b.ledger_path.read_text())["vms"], {})
        self.assertEqual(self.metrics.get("vm_create_failed"), 1)
        self.images.error = None
        self.assertEqual((yield b.create(spec(image="debian-busybox"))).address, "10.237.0.2")

    @defer.inlineCallbacks
    def test_no_bridge(self):
        """bridge="" gives a VM without a NIC or address, and no bridge is set up."""
        b = yield self.backend(bridge="")
        info = yield b.create(spec(image="debian-busybox"))
        self.assertIsNone(info.address)
        self.assertIsNone(self.xml(info.vm_id).find("devices/interface"))
        self.assertNotIn("omerta.ip", self.xml(info.vm_id).findtext("os/cmdline"))
        self.assertEqual(self.bridges, [])

    @defer.inlineCallbacks
    def test_start_prepares_again(self):
        """start sets up the bridge (gone after a host reboot) and checks the image again."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        yield b.start(info.vm_id)
        self.assertEqual(len(self.bridges), 2)
        self.assertEqual(len(self.images.calls), 2)

    @defer.inlineCallbacks
    def test_qemu_can_reach_files(self):
        """The data directory gets search permission for QEMU's user; the disk stays 0600."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        self.assertEqual(os.stat(self.data_dir).st_mode & 0o777, 0o711)
        self.assertEqual(os.stat(b.disk_path(info.vm_id).parent).st_mode & 0o777, 0o711)
        self.assertEqual(os.stat(b.disk_path(info.vm_id)).st_mode & 0o777, 0o600)

    @defer.inlineCallbacks
    def test_cmdline_carries_ssh_key(self):
        """The spec's SSH key is kept in the ledger and passed to the guest as omerta.key on its kernel command line."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox", ssh_key=SSH_KEY))
        self.assertEqual(
            self.xml(info.vm_id).findtext("os/cmdline"),
            guest.kernel_cmdline(info.vm_id, "10.237.0.2/24", "10.237.0.1", SSH_KEY),
        )
        self.assertIn(" omerta.key=", self.xml(info.vm_id).findtext("os/cmdline"))
        document = json.loads(b.ledger_path.read_text())
        self.assertEqual(document["vms"][info.vm_id]["ssh_key"], SSH_KEY)

    def console(self, b, vm_id, *lines):
        """
        Append lines to VM C{vm_id}'s serial log, as its guest would.
        """
        with open(b.serial_log_path(vm_id), "a") as f:
            f.write("".join(line + "\r\n" for line in lines))

    def booted(self, b, vm_id):
        self.console(b, vm_id, "[    0.000000] Linux version 6.1.0",
                     f"{guest.HOSTKEY_MARKER} vm={vm_id} {HOST_KEY}",
                     f"{guest.MARKER} vm={vm_id} ip=10.237.0.2/24")

    @defer.inlineCallbacks
    def test_wait_ready(self):
        """wait_ready looks at the serial log on the worker thread until the guest's marker, then fires with its host key, kept in the ledger."""
        b = yield self.backend()
        b.POLL_INTERVAL = 0.01
        info = yield b.create(spec(image="debian-busybox"))
        yield b.start(info.vm_id)
        looks = []
        read_console = guest.read_console

        def reading(text, vm_id):
            looks.append(threading.current_thread())
            if len(looks) == 1:  # the guest finishes booting after the first look
                self.booted(b, vm_id)
            return read_console(text, vm_id)

        self.patch(guest, "read_console", reading)
        ready = yield b.wait_ready(info.vm_id, 30)
        self.assertEqual((ready.state, ready.host_key), ("running", HOST_KEY))
        self.assertEqual(len(looks), 2)
        self.assertNotIn(threading.current_thread(), looks)
        document = json.loads(b.ledger_path.read_text())
        self.assertEqual(document["vms"][info.vm_id]["host_key"], HOST_KEY)

    @defer.inlineCallbacks
    def test_wait_ready_guest_error(self):
        """A guest's error line fails wait_ready with a VMError quoting it and naming the serial log."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        yield b.start(info.vm_id)
        self.console(b, info.vm_id, f"{guest.ERROR_MARKER} vm={info.vm_id} no eth0")
        e = yield self.assertFailure(b.wait_ready(info.vm_id, 30), vm.VMError)
        self.assertIn("no eth0", str(e))
        self.assertIn(str(b.serial_log_path(info.vm_id)), str(e))

    @defer.inlineCallbacks
    def test_wait_ready_without_host_key(self):
        """A guest that says it is up without having reported a host key fails wait_ready: ssh could not be trusted."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        yield b.start(info.vm_id)
        self.console(b, info.vm_id, f"{guest.MARKER} vm={info.vm_id} ip=10.237.0.2/24")
        e = yield self.assertFailure(b.wait_ready(info.vm_id, 30), vm.VMError)
        self.assertIn("no SSH host key", str(e))

    @defer.inlineCallbacks
    def test_wait_ready_timeout(self):
        """A guest silent until the deadline fails wait_ready with a VMError naming the serial log."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        yield b.start(info.vm_id)
        e = yield self.assertFailure(b.wait_ready(info.vm_id, 0), vm.VMError)
        self.assertIn("not up after 0 s", str(e))
        self.assertIn(str(b.serial_log_path(info.vm_id)), str(e))

    @defer.inlineCallbacks
    def test_wait_ready_not_running(self):
        """wait_ready on a VM that is not running fails at once, even if an old boot left a marker in its log."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        self.booted(b, info.vm_id)
        e = yield self.assertFailure(b.wait_ready(info.vm_id, 30), vm.VMError)
        self.assertIn("is shutoff", str(e))

    @defer.inlineCallbacks
    def test_info_and_list_fill_host_key(self):
        """info and list report the host key once the running guest printed it; stop forgets it."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        yield b.start(info.vm_id)
        self.assertIsNone((yield b.info(info.vm_id)).host_key)
        self.booted(b, info.vm_id)
        [listed] = yield b.list()
        self.assertEqual(listed.host_key, HOST_KEY)
        self.assertEqual((yield b.info(info.vm_id)).host_key, HOST_KEY)
        stopped = yield b.stop(info.vm_id)
        self.assertIsNone(stopped.host_key)
        self.assertIsNone((yield b.info(info.vm_id)).host_key)
        self.assertNotIn("host_key", json.loads(b.ledger_path.read_text())["vms"][info.vm_id])

    @defer.inlineCallbacks
    def test_host_key_kept_in_ledger(self):
        """A host key once read is kept: a restarted backend reports it without reading the log."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        yield b.start(info.vm_id)
        self.booted(b, info.vm_id)
        yield b.wait_ready(info.vm_id, 30)
        yield b.stopService()
        b.serial_log_path(info.vm_id).unlink()
        b2 = yield self.backend()
        self.assertEqual((yield b2.info(info.vm_id)).host_key, HOST_KEY)

    @defer.inlineCallbacks
    def test_start_forgets_host_key(self):
        """A new boot makes a new host key: start forgets the old one until the guest reports again."""
        b = yield self.backend()
        info = yield b.create(spec(image="debian-busybox"))
        yield b.start(info.vm_id)
        self.booted(b, info.vm_id)
        yield b.wait_ready(info.vm_id, 30)
        yield b.stop(info.vm_id)
        b.serial_log_path(info.vm_id).unlink()  # QEMU truncates it at start
        started = yield b.start(info.vm_id)
        self.assertIsNone(started.host_key)
        self.assertIsNone((yield b.info(info.vm_id)).host_key)
