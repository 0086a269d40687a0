"""
The provider's VM backend with a real guest: libvirtd, C{qemu:///system}
(QEMU with TCG), the C{debian-busybox} image and a bridge of the test's own.

Root only: without root the test skips, saying so.  As root, missing
packages are a failure (run C{scripts/setup-env} as root to install them).
The test starts C{virtlogd} and C{libvirtd} when they are not running, builds
the guest image into C{$OMERTA_TEST_IMAGE_CACHE} (default
C{/var/cache/omerta-test-images}; a cached image is reused, so only the
first run pays the ~4 s build), boots a 1-vcpu 192 MiB guest on bridge
L{BRIDGE}, waits for the guest's marker line with its address on the serial
console and for it to answer ping over the bridge, then destroys it and
checks nothing is left.  Waits poll with a deadline; nothing sleeps.  The
timings go to the test log (C{_trial_temp/test.log}).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import SkipTest

from twisted.internet import defer, reactor, task, utils
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial import unittest

from omerta.roles import guest
from omerta.roles.guest import ImageBuilder
from omerta.roles.vm import HostTools, LibvirtBackend, Resources, VMSpec
from tests.integration import wait_for

IMAGE_CACHE = Path(os.environ.get("OMERTA_TEST_IMAGE_CACHE", "/var/cache/omerta-test-images"))
BRIDGE = "omerta-test0"
BRIDGE_ADDRESS = "10.237.254.1/24"
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
OWNER = "cd" * 32

# Generous for TCG on a busy 2-core CI machine; a guest is normally up in ~3 s.
DAEMON_DEADLINE = 30.0
BOOT_DEADLINE = 120.0
PING_DEADLINE = 30.0

# tool -> the Debian package that provides it
TOOLS = {
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "qemu-system-x86_64": "qemu-system-x86",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "ping": "iputils-ping",
}

log = Logger()


def require_root() -> None:
    if os.geteuid() != 0:
        raise SkipTest("needs root: qemu:///system, a Linux bridge and apt-get download")


def missing_tools() -> list[str]:
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items()
               if shutil.which(tool) is None]
    if not Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so"
                ).exists():
        missing.append("libvirt's QEMU driver (Debian package libvirt-daemon-driver-qemu)")
    try:
        import libvirt  # noqa: F401  (only whether it imports)
    except ImportError:
        missing.append("libvirt-python (pip install '.[libvirt]')")
    return missing


def running(name: str) -> bool:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                return True
        except OSError:
            pass
    return False


def start_daemons() -> None:
    """
    Start virtlogd and libvirtd (NATLAB.md) unless they run already; the
    caller waits for the socket.
    """
    for daemon in ("virtlogd", "libvirtd"):
        if not running(daemon):
            subprocess.run([daemon, "-d"], check=True)
    # NATLAB.md: the kvm group's access to /dev/kvm (Debian's udev default)
    # spares a ~4 s capability re-probe at every domain start, even for TCG
    kvm = Path("/dev/kvm")
    if kvm.exists():
        shutil.chown(kvm, group="kvm")
        kvm.chmod(0o660)


def bridge_exists(name: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def delete_bridge(name: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])


def domain_names() -> list[str]:
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()


def pause(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class RealGuestTests(unittest.TestCase):
    timeout = 400

    def setUp(self):
        require_root()
        missing = missing_tools()
        if missing:
            self.fail("missing for real VMs: " + "; ".join(missing)
                      + "; run scripts/setup-env as root")
        # QEMU runs as libvirt-qemu and must pass through every directory
        # above the disk (docs/provider.md); the checkout may sit in a 0700
        # directory (a clone under /root), so the provider's data dir does not
        top = Path(tempfile.mkdtemp(prefix="omerta-qemu-test-", dir="/var/tmp"))
        top.chmod(0o711)
        self.addCleanup(shutil.rmtree, top, True)
        self.data_dir = top / "provider"

    @defer.inlineCallbacks
    def test_boot_ping_destroy(self):
        """A real guest boots on the bridge, reports its allocated address, answers ping, and destroy leaves nothing behind."""
        yield deferToThread(start_daemons)
        yield defer.ensureDeferred(wait_for(LIBVIRT_SOCKET.exists, DAEMON_DEADLINE,
                                            f"libvirtd's socket {LIBVIRT_SOCKET}"))
        builder = ImageBuilder(IMAGE_CACHE)
        cached = builder.cached(guest.DEFAULT_IMAGE) is not None
        t0 = time.monotonic()
        yield deferToThread(builder.ensure, guest.DEFAULT_IMAGE)
        log.info("guest image ready in {s:.2f} s ({how})", s=time.monotonic() - t0,
                 how="cached" if cached else "built")

        if not (yield deferToThread(bridge_exists, BRIDGE)):
            self.addCleanup(deferToThread, delete_bridge, BRIDGE)
        b = LibvirtBackend(self.data_dir, uri="qemu:///system", images_dir=IMAGE_CACHE,
                           tools=HostTools(image_builder=builder), bridge=BRIDGE,
                           bridge_address=BRIDGE_ADDRESS)
        t0 = time.monotonic()
        b.startService()
        self.addCleanup(self.tearDownBackend, b)
        yield b.whenReady
        log.info("qemu:///system backend ready in {s:.2f} s", s=time.monotonic() - t0)

        t0 = time.monotonic()
        info = yield b.create(VMSpec(vcpus=1, memory_mb=192, disk_gb=1,
                                     image=guest.DEFAULT_IMAGE, owner=OWNER, name="ci"))
        log.info("create() took {s:.2f} s", s=time.monotonic() - t0)
        self.assertEqual(info.state, "shutoff")
        self.assertTrue(info.address.startswith("10.237.254."), info.address)
        serial = b.serial_log_path(info.vm_id)

        t0 = time.monotonic()
        started = yield b.start(info.vm_id)
        self.assertEqual(started.state, "running")
        t_started = time.monotonic() - t0
        marker = f"{guest.MARKER} vm={info.vm_id} ip={info.address}/24"
        end = t0 + BOOT_DEADLINE
        while True:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            if marker in text:
                break
            if guest.ERROR_MARKER in text or time.monotonic() > end:
                self.fail(f"no {marker!r} on the serial console after"
                          f" {time.monotonic() - t0:.1f} s; it ends with:\n{text[-2000:]}")
            yield pause(0.05)
        t_marker = time.monotonic() - t0

        end = time.monotonic() + PING_DEADLINE
        while (yield utils.getProcessValue(shutil.which("ping"),
                                           ["-c1", "-W1", "-n", info.address])) != 0:
            if time.monotonic() > end:
                self.fail(f"{info.address} did not answer ping over {BRIDGE}")
        t_ping = time.monotonic() - t0
        log.info(
            "guest {vm}: start() returned after {a:.2f} s, marker after {b:.2f} s,"
            " ping after {c:.2f} s",
            vm=info.vm_id, a=t_started, b=t_marker, c=t_ping,
        )

        yield b.destroy(info.vm_id)
        self.assertNotIn("omerta-" + info.vm_id, (yield deferToThread(domain_names)))
        self.assertFalse(b.disk_path(info.vm_id).parent.exists())
        self.assertEqual((yield b.list()), [])
        self.assertEqual(b.committed(), Resources())
        # the address is freed: the ledger holds no VM, hence no address
        self.assertEqual(json.loads(b.ledger_path.read_text())["vms"], {})

    @defer.inlineCallbacks
    def tearDownBackend(self, b):
        if not b.running:
            return
        try:
            for vm in (yield b.list()):
                yield b.destroy(vm.vm_id)
        finally:
            yield b.stopService()
