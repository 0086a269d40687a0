"""
The provider's VM backend with a real guest: libvirtd, C{qemu:///system}
(QEMU with TCG), the C{debian-busybox} image and a bridge of the test's own.

Root only: without root the test skips, saying so.  As root, missing
packages are a failure (run C{scripts/setup-env} as root to install them).
The test starts C{virtlogd} and C{libvirtd} when they are not running, builds
the guest image into C{$OMERTA_TEST_IMAGE_CACHE} (default
C{/var/cache/omerta-test-images}; a cached image is reused, so only the
first run pays the ~10 s build), boots a 1-vcpu 192 MiB guest on bridge
L{BRIDGE} with a freshly made ed25519 key as the consumer's, waits
(L{LibvirtBackend.wait_ready}) for the guest's marker line with its address
on the serial console and its reported host key, for it to answer ping over
the bridge, and for C{ssh omerta@ADDR hostname} (strict host key checking
against the reported key only) to print its host name; root is refused.
Then it destroys the VM and checks nothing is left.  Waits poll with a
deadline; nothing sleeps.  The timings go to the test log
(C{_trial_temp/test.log}).
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

from twisted.internet import defer, utils
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
SSH_DEADLINE = 60.0

# tool -> the Debian package that provides it
TOOLS = {
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "qemu-system-x86_64": "qemu-system-x86",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "ping": "iputils-ping",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
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


def make_key(directory: Path) -> tuple[Path, str]:
    """
    A new ed25519 key pair without passphrase in C{directory}: the private
    key's path and the public key line.
    """
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "consumer@test",
                    "-f", str(key)], check=True, capture_output=True)
    return key, key.with_suffix(".pub").read_text().strip()


def ssh_argv(key: Path, known_hosts: Path, user: str, address: str, *command: str) -> list[str]:
    """
    An ssh command line that trusts only C{known_hosts}, logs in with
    C{key} only, never asks anything and reads no configuration.
    """
    return [
        "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        "-o", "LogLevel=ERROR", f"{user}@{address}", *command,
    ]


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
    def test_boot_ping_ssh_destroy(self):
        """A real guest boots on the bridge, reports its address and host key, answers ping, lets the consumer's key in over ssh (not root), and destroy leaves nothing behind."""
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

        keys = Path(self.mktemp())
        keys.mkdir(mode=0o700)
        key, public_key = make_key(keys)
        t0 = time.monotonic()
        info = yield b.create(VMSpec(vcpus=1, memory_mb=192, disk_gb=1,
                                     image=guest.DEFAULT_IMAGE, owner=OWNER, name="ci",
                                     ssh_key=public_key))
        log.info("create() took {s:.2f} s", s=time.monotonic() - t0)
        self.assertEqual(info.state, "shutoff")
        self.assertTrue(info.address.startswith("10.237.254."), info.address)
        serial = b.serial_log_path(info.vm_id)

        t0 = time.monotonic()
        started = yield b.start(info.vm_id)
        self.assertEqual(started.state, "running")
        t_started = time.monotonic() - t0
        try:
            ready = yield b.wait_ready(info.vm_id, BOOT_DEADLINE)
        except Exception as e:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            self.fail(f"{e}; the console ends with:\n{text[-2000:]}")
        t_marker = time.monotonic() - t0
        self.assertIn(f"{guest.MARKER} vm={info.vm_id} ip={info.address}/24",
                      serial.read_text(errors="replace"))
        self.assertRegex(ready.host_key, r"^ssh-ed25519 AAAA[A-Za-z0-9+/]+=*$")
        self.assertEqual(ready.host_key, guest.host_key_from_serial(serial.read_text(), info.vm_id))
        self.assertEqual((yield b.info(info.vm_id)).host_key, ready.host_key)

        end = time.monotonic() + PING_DEADLINE
        while (yield utils.getProcessValue(shutil.which("ping"),
                                           ["-c1", "-W1", "-n", info.address])) != 0:
            if time.monotonic() > end:
                self.fail(f"{info.address} did not answer ping over {BRIDGE}")
        t_ping = time.monotonic() - t0

        # the reported host key is the only one trusted, the fresh key the
        # only one offered: a hostname printed proves both
        known_hosts = keys / "known_hosts"
        known_hosts.write_text(f"{info.address} {ready.host_key}\n")
        ssh = shutil.which("ssh")
        end = time.monotonic() + SSH_DEADLINE
        while True:
            out, err, code = yield utils.getProcessOutputAndValue(
                ssh, ssh_argv(key, known_hosts, "omerta", info.address, "hostname"))
            if code == 0 or time.monotonic() > end:
                break
        self.assertEqual((code, out.decode().strip()), (0, f"omerta-{info.vm_id[:8]}"),
                         err.decode(errors="replace"))
        t_ssh = time.monotonic() - t0
        # an interactive session gets a pty (devpts is mounted)
        out, err, code = yield utils.getProcessOutputAndValue(
            ssh, ["-tt", *ssh_argv(key, known_hosts, "omerta", info.address, "tty; id -u")])
        self.assertEqual((code, out.decode().split()), (0, ["/dev/pts/0", "1000"]),
                         err.decode(errors="replace"))
        out, err, code = yield utils.getProcessOutputAndValue(
            ssh, ssh_argv(key, known_hosts, "root", info.address, "true"))
        self.assertEqual(code, 255, "root logged in")
        self.assertIn(b"Permission denied", err)
        log.info(
            "guest {vm}: start() returned after {a:.2f} s, ready (marker, host key) after"
            " {b:.2f} s, ping after {c:.2f} s, ssh hostname after {d:.2f} s",
            vm=info.vm_id, a=t_started, b=t_marker, c=t_ping, d=t_ssh,
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
