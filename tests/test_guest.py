"""
Tests for L{omerta.roles.guest} (guest images) and L{omerta.roles.bridge}
(the VM bridge and its addresses), without root, apt or libvirt.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError
from twisted.trial import unittest

from omerta.roles import bridge, guest
from omerta.roles.bridge import AddressesExhausted, AddressPool, BridgeError, ensure_bridge
from omerta.roles.guest import (
    DEFAULT_IMAGE,
    SSH_FILES,
    SSH_PACKAGES,
    ImageBuilder,
    ImageError,
    UnknownImage,
    VIRTIO_MODULES,
    check_ssh_key,
    host_key_from_serial,
    read_console,
)

RELEASE = "6.1.0-99-cloud-amd64"
KERNEL_PKG = f"linux-image-{RELEASE}"

# a real key, made by dropbearkey
ED25519 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMwfAW7KlGfgnaViiJPnjBeigDcz8iHUIppTqKRdYEmM"
           " alice@laptop")
VM = "0123456789abcdef"


def openssh_line(private_key, comment: str = "") -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    line = private_key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def rsa_key(bits: int, comment: str = "") -> str:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return openssh_line(rsa.generate_private_key(65537, bits), comment)


def ecdsa_key(comment: str = "") -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    return openssh_line(ec.generate_private_key(ec.SECP256R1()), comment)


class Link(str):
    """
    A symbolic link to this target, in L{tar_of}.
    """


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """
    A newc cpio reader for the tests: name -> (mode, content, rdev).
    """
    out = {}
    pos = 0
    while True:
        header = data[pos:pos + 110]
        assert header[:6] == b"070701", header[:6]
        f = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = f[1], f[6], (f[9], f[10]), f[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        content = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, content, rdev)


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, Link):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class FakePackages:
    """
    L{guest.DebianPackages} without apt: a fixed set of packages.
    """

    def __init__(self, missing_tool: bool = False, fail: str | None = None,
                 interrupt_after: str | None = None):
        kernel_files = {f"./boot/vmlinuz-{RELEASE}": b"KERNEL"}
        for m in VIRTIO_MODULES:
            kernel_files[f"./lib/modules/{RELEASE}/kernel/drivers/{m}.ko"] = f"ko:{m}".encode()
        self.debs = {
            guest.KERNEL_METAPACKAGE: (
                {"Depends": f"{KERNEL_PKG} (= 6.1.999-1)", "Version": "6.1.999-1"}, tar_of({})),
            KERNEL_PKG: ({"Version": "6.1.999-1"}, tar_of(kernel_files)),
            guest.BUSYBOX_PACKAGE: (
                {"Version": "1:1.35.0-4"}, tar_of({"./bin/busybox": b"BUSYBOX"})),
        }
        # each SSH file as the package has it; a library's SONAME is a link
        # to the real file, as in Debian, and decoys share its prefix
        ssh: dict[str, dict[str, bytes]] = {p: {} for p in SSH_PACKAGES}
        for package, suffix, dest in SSH_FILES:
            prefix = "./usr/lib" if "/x86_64-linux-gnu/" in suffix else "./usr"
            path = prefix + suffix
            if ".so." in suffix and "ld-linux" not in suffix:
                ssh[package][path] = Link(suffix.rsplit("/", 1)[-1] + ".0.1")
                ssh[package][path + ".0.1"] = f"{package}:{dest}".encode()
                ssh[package][path + ".0.2-decoy"] = b"decoy"
            else:
                ssh[package][path] = f"{package}:{dest}".encode()
        ssh[guest.DROPBEAR_PACKAGE]["./usr/share/doc/dropbear-bin/README"] = b"doc"
        for package, files in ssh.items():
            self.debs[package] = ({"Version": f"{package}-1.0"}, tar_of(files))
        self.missing_tool = missing_tool
        self.fail = fail
        self.interrupt_after = interrupt_after
        self.downloads: list[str] = []

    def check(self):
        if self.missing_tool:
            raise ImageError("building guest images needs apt-get")

    def download(self, package, dest):
        self.downloads.append(package)
        if package == self.fail:
            raise ImageError(f"apt-get download {package} failed")
        path = dest / f"{package}_1_amd64.deb"
        path.write_bytes(b"deb")
        if package == self.interrupt_after:
            raise KeyboardInterrupt()
        return path

    def field(self, deb, name):
        return self.debs[deb.name.split("_")[0]][0][name]

    @contextlib.contextmanager
    def members(self, deb):
        data = self.debs[deb.name.split("_")[0]][1]
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            yield tar


class InitScriptTests(unittest.TestCase):
    def test_module_order(self):
        """init loads the virtio modules in the order NATLAB.md gives, virtio_net after net_failover."""
        script = guest.init_script()
        self.assertIn("for m in " + " ".join(VIRTIO_MODULES) + "; do", script)
        order = list(VIRTIO_MODULES)
        self.assertEqual(
            order[:8],
            ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
             "virtio_pci", "failover", "net_failover", "virtio_net"],
        )

    def test_configures_network_and_prints_marker(self):
        """init reads omerta.ip/gw/vm from the kernel command line, configures eth0 and prints the marker."""
        script = guest.init_script()
        for needle in (
            'omerta.ip=*) ip="${arg#omerta.ip=}"',
            'omerta.gw=*) gw="${arg#omerta.gw=}"',
            'ip addr add "$ip" dev eth0',
            'ip route add default via "$gw"',
            'echo "omerta-guest: up vm=$vm ip=$ip"',
            "mount -t proc proc /proc",
        ):
            self.assertIn(needle, script)
        self.assertTrue(script.startswith("#!/bin/busybox sh\n"))

    def test_shell_syntax(self):
        """The init script is valid POSIX shell."""
        sh = shutil.which("sh")
        if sh is None:
            raise unittest.SkipTest("no sh")
        done = subprocess.run([sh, "-n"], input=guest.init_script().encode(), capture_output=True)
        self.assertEqual((done.returncode, done.stderr), (0, b""))

    def test_cmdline(self):
        """The kernel command line names the serial console, the VM and its address and gateway."""
        self.assertEqual(guest.kernel_cmdline("ab12"), "console=ttyS0 omerta.vm=ab12")
        self.assertEqual(
            guest.kernel_cmdline("ab12", "10.237.0.2/24", "10.237.0.1"),
            "console=ttyS0 omerta.vm=ab12 omerta.ip=10.237.0.2/24 omerta.gw=10.237.0.1",
        )

    def test_cmdline_refuses_injection(self):
        """A value that would add kernel parameters is refused."""
        self.assertRaises(ValueError, guest.kernel_cmdline, "ab", "10.0.0.2/24 init=/bin/sh")

    def test_cmdline_key(self):
        """The SSH key goes on the command line as omerta.key=, its base64url without padding."""
        cmdline = guest.kernel_cmdline("ab12", "10.237.0.2/24", "10.237.0.1", ED25519 + "\n")
        words = cmdline.split(" ")
        self.assertEqual(words[:4], ["console=ttyS0", "omerta.vm=ab12", "omerta.ip=10.237.0.2/24",
                                     "omerta.gw=10.237.0.1"])
        self.assertEqual(len(words), 5)
        name, _, value = words[4].partition("=")
        self.assertEqual(name, "omerta.key")
        self.assertNotIn("=", value)
        self.assertRegex(value, r"^[A-Za-z0-9_-]+$")
        padded = value + "=" * (-len(value) % 4)
        self.assertEqual(base64.urlsafe_b64decode(padded).decode(), ED25519)
        self.assertEqual(guest.kernel_cmdline("ab12", ssh_key=None), "console=ttyS0 omerta.vm=ab12")
        self.assertEqual(guest.kernel_cmdline("ab12", ssh_key=""), "console=ttyS0 omerta.vm=ab12")

    def test_cmdline_length(self):
        """An RSA 4096 key fits within MAX_CMDLINE; a line that would not is refused with a ValueError."""
        cmdline = guest.kernel_cmdline(VM, "10.237.255.254/24", "10.237.255.1",
                                       rsa_key(4096, "someone@a-rather-long-host-name.example"))
        self.assertLessEqual(len(cmdline), guest.MAX_CMDLINE)
        self.assertLess(guest.MAX_CMDLINE, 2048)
        e = self.assertRaises(ValueError, guest.kernel_cmdline, "a" * 600, ssh_key=rsa_key(4096))
        self.assertIn(f"at most {guest.MAX_CMDLINE} are made", str(e))

    def test_init_installs_key_and_starts_ssh(self):
        """init decodes omerta.key into omerta's authorized_keys with strict modes, reports the host key, starts dropbear, then prints the marker."""
        script = guest.init_script()
        for needle in (
            'omerta.key=*) key="${arg#omerta.key=}"',
            "tr '_-' '/+'",
            "base64 -d > /home/omerta/.ssh/authorized_keys",
            "chmod 600 /home/omerta/.ssh/authorized_keys",
            "chown -R 1000:1000 /home/omerta",
            "chmod 700 /home/omerta/.ssh",
            "mount -t devpts",
            'name="omerta-$(echo "$vm" | cut -c1-8)"',
            'hostname "$name"',
            "dropbearkey -t ed25519 -f /etc/dropbear/dropbear_ed25519_host_key",
            "pub=$(dropbearkey -y -f /etc/dropbear/dropbear_ed25519_host_key | grep '^ssh-ed25519 '",
            'echo "omerta-guest: hostkey vm=$vm $pub"',
            "dropbear -r /etc/dropbear/dropbear_ed25519_host_key -p 22 -s -w -E",
        ):
            self.assertIn(needle, script)
        order = [script.index(s) for s in ("mount -t devpts", "hostname", "base64 -d",
                                           "omerta-guest: hostkey", "dropbear -r",
                                           'echo "omerta-guest: up')]
        self.assertEqual(order, sorted(order))

    def test_init_decodes_key(self):
        """The init's decoding of omerta.key, run by sh, gives back the key line for every padding length."""
        sh = shutil.which("sh")
        if sh is None or shutil.which("base64") is None:
            raise unittest.SkipTest("no sh or base64")
        script = guest.init_script()
        start = script.index('  k=$(echo "$key"')
        decode = script[start:script.index("  chmod 600", start)]
        for line in (ED25519, ED25519 + "x", ED25519 + "xy", ecdsa_key("carol")):
            cmdline = guest.kernel_cmdline(VM, ssh_key=line)
            key = cmdline.split("omerta.key=", 1)[1]
            with tempfile.TemporaryDirectory() as home:
                os.mkdir(Path(home, ".ssh"))
                program = f"key={key}\n" + decode.replace("/home/omerta", home)
                done = subprocess.run([sh, "-c", program], capture_output=True)
                self.assertEqual(done.stderr, b"")
                self.assertEqual(Path(home, ".ssh/authorized_keys").read_text(), line + "\n")


class SSHKeyTests(unittest.TestCase):
    def test_supported_types(self):
        """ed25519, ecdsa-sha2-nistp256 and RSA key lines are accepted, stripped, comment kept."""
        self.assertEqual(check_ssh_key("  " + ED25519 + "\n"), ED25519)
        ecdsa = ecdsa_key()
        self.assertEqual(check_ssh_key(ecdsa), ecdsa)
        rsa = rsa_key(2048, "bob")
        self.assertEqual(check_ssh_key(rsa), rsa)

    def test_refused(self):
        """Several lines, another type, a body that is not a key, a mismatched type and options are refused with a ValueError."""
        body = ED25519.split()[1]
        for bad, why in (
            (ED25519 + "\n" + ED25519, "one line"),
            ("ssh-dss " + body, "supported type"),
            ("ssh-ed25519", "supported type"),
            ("", "supported type"),
            ("ssh-ed25519 AAAAnotakey", "bad ssh-ed25519"),
            ("ssh-rsa " + body, "bad ssh-rsa"),
            ('no-pty ' + ED25519, "supported type"),
            (ED25519 + " caf\u00e9", "printable ASCII"),
            (ED25519 + " " + "x" * 1000, "at most"),
        ):
            e = self.assertRaises(ValueError, check_ssh_key, bad)
            self.assertIn(why, str(e), bad)


class ConsoleTests(unittest.TestCase):
    HOST = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKXXrJCpWnnAR7Be7E6VmnMOg0oYNWVvwxZCcCgxTZ0C"

    def test_host_key(self):
        """host_key_from_serial finds the guest's host key line among kernel messages, \\r\\n endings included."""
        text = (f"[    0.1] Linux version 6.1\r\n"
                f"omerta-guest: hostkey vm={VM} {self.HOST}\r\n"
                f"omerta-guest: up vm={VM} ip=10.237.0.2/24\r\n")
        self.assertEqual(host_key_from_serial(text, VM), self.HOST)
        self.assertEqual(read_console(text, VM), guest.ConsoleReport(up=True, host_key=self.HOST))

    def test_other_vm_and_garbage(self):
        """A line of another VM, a truncated line or a malformed key is no host key."""
        for text in (
            "",
            f"omerta-guest: hostkey vm=ffffffffffffffff {self.HOST}\n",
            f"omerta-guest: hostkey vm={VM} {self.HOST[:40]}",
            f"omerta-guest: hostkey vm={VM} ssh-ed25519 \n",
            f"omerta-guest: hostkey vm={VM}0 {self.HOST}\n",
        ):
            self.assertIsNone(host_key_from_serial(text, VM), text)

    def test_last_key_counts(self):
        """When a log holds two boots, the last host key reported is the one returned."""
        older = ED25519.rsplit(" ", 1)[0]
        text = f"omerta-guest: hostkey vm={VM} {older}\nomerta-guest: hostkey vm={VM} {self.HOST}\n"
        self.assertEqual(host_key_from_serial(text, VM), self.HOST)

    def test_marker_and_error(self):
        """The report says up only on this VM's marker and keeps the first error line."""
        self.assertFalse(read_console(f"omerta-guest: up vm={VM}0 ip=\n", VM).up)
        self.assertTrue(read_console(f"omerta-guest: up vm={VM} ip=\n", VM).up)
        text = (f"omerta-guest: error vm={VM} insmod virtio failed\n"
                f"omerta-guest: error vm={VM} no eth0\n")
        self.assertEqual(read_console(text, VM).error,
                         f"omerta-guest: error vm={VM} insmod virtio failed")

    def test_concrete_kernel_package(self):
        """The kernel package is read from the metapackage's Depends."""
        self.assertEqual(
            guest.concrete_kernel_package("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"),
            "linux-image-6.1.0-56-cloud-amd64",
        )
        self.assertRaises(ImageError, guest.concrete_kernel_package, "libc6 (>= 2)")


class CpioTests(unittest.TestCase):
    def test_golden_header(self):
        """A newc entry has the 110-byte header the kernel expects (magic, hex fields, padded name)."""
        archive = guest.cpio_newc({"init": b"hi"}, executables=("init",))
        self.assertEqual(
            archive[:120],
            b"070701" + b"00000001" + b"000081ED" + b"00000000" * 2 + b"00000001"
            + b"00000000" + b"00000002" + b"00000000" * 4 + b"00000005" + b"00000000"
            + b"init\0" + b"\0" + b"hi" + b"\0\0",
        )
        self.assertEqual(len(archive) % 512, 0)

    def test_round_trip(self):
        """Directories, files, executables and a character device read back with their modes."""
        archive = guest.cpio_newc(
            {"bin/x": b"abc", "etc/y": b"12345"}, dirs=("bin", "etc"), executables=("bin/x",),
            chardevs={"dev/console": (5, 1)},
        )
        entries = read_cpio(archive)
        self.assertEqual(entries["bin"][0], 0o040755)
        self.assertEqual(entries["bin/x"][:2], (0o100755, b"abc"))
        self.assertEqual(entries["etc/y"][:2], (0o100644, b"12345"))
        self.assertEqual(entries["dev/console"][0::2], (0o020600, (5, 1)))

    def test_initramfs(self):
        """The initramfs holds busybox, /init, /dev/console and the modules, and is reproducible."""
        modules = {m: m.encode() for m in VIRTIO_MODULES}
        data = guest.make_initramfs(b"BB", modules)
        self.assertEqual(data, guest.make_initramfs(b"BB", modules))
        entries = read_cpio(gzip.decompress(data))
        self.assertEqual(entries["bin/busybox"][:2], (0o100755, b"BB"))
        self.assertEqual(entries["init"][:2], (0o100755, guest.init_script().encode()))
        self.assertEqual(entries["dev/console"][2], (5, 1))
        self.assertEqual(entries["lib/modules/virtio_net.ko"][1], b"virtio_net")

    def test_initramfs_ssh(self):
        """The SSH files are installed executable; passwd, group and shells let omerta (uid 1000, /bin/sh) log in and nobody with a password."""
        data = guest.make_initramfs(b"BB", {}, {"usr/sbin/dropbear": b"DB"})
        entries = read_cpio(gzip.decompress(data))
        self.assertEqual(entries["usr/sbin/dropbear"][:2], (0o100755, b"DB"))
        passwd = entries["etc/passwd"][1].decode().splitlines()
        self.assertIn("omerta:*:1000:1000:omerta:/home/omerta:/bin/sh", passwd)
        self.assertEqual([line.split(":")[1] for line in passwd], ["*"] * len(passwd))
        self.assertIn("omerta:x:1000:", entries["etc/group"][1].decode().splitlines())
        self.assertEqual(entries["etc/shells"][1], b"/bin/sh\n")
        for d in ("etc/dropbear", "home", "lib64", "lib/x86_64-linux-gnu", "var/run"):
            self.assertEqual(entries[d][0], 0o040755, d)


class ImageBuilderTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())

    def test_build(self):
        """ensure builds vmlinuz, initrd.gz and a manifest naming the package versions."""
        packages = FakePackages()
        b = ImageBuilder(self.dir, packages, clock=lambda: 100.0)
        path = b.ensure()
        self.assertEqual(path, self.dir / DEFAULT_IMAGE)
        self.assertEqual((path / "vmlinuz").read_bytes(), b"KERNEL")
        entries = read_cpio(gzip.decompress((path / "initrd.gz").read_bytes()))
        self.assertEqual(entries["bin/busybox"][1], b"BUSYBOX")
        self.assertEqual(entries["lib/modules/virtio.ko"][1], b"ko:virtio")
        manifest = json.loads((path / "manifest.json").read_text())
        self.assertEqual(manifest["packages"], {
            guest.KERNEL_METAPACKAGE: "6.1.999-1", KERNEL_PKG: "6.1.999-1",
            guest.BUSYBOX_PACKAGE: "1:1.35.0-4",
            **{p: f"{p}-1.0" for p in SSH_PACKAGES},
        })
        self.assertEqual(
            sorted(SSH_PACKAGES),
            ["dropbear-bin", "libc6", "libcrypt1", "libgmp10", "libtomcrypt1", "libtommath1",
             "zlib1g"],
        )
        for package, _, dest in SSH_FILES:
            self.assertEqual(entries[dest][:2], (0o100755, f"{package}:{dest}".encode()), dest)
        self.assertEqual(entries["lib64/ld-linux-x86-64.so.2"][1],
                         b"libc6:lib64/ld-linux-x86-64.so.2")
        self.assertEqual(manifest["kernel_release"], RELEASE)
        self.assertEqual(manifest["recipe"], guest.recipe())
        self.assertFalse((path / "debs").exists())
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), [".lock", DEFAULT_IMAGE])
        self.assertEqual(os.stat(path / "vmlinuz").st_mode & 0o777, 0o644)

    def test_cached(self):
        """A second ensure downloads nothing."""
        packages = FakePackages()
        b = ImageBuilder(self.dir, packages)
        b.ensure()
        n = len(packages.downloads)
        b.ensure()
        ImageBuilder(self.dir, packages).ensure()
        self.assertEqual(len(packages.downloads), n)

    def test_rebuilt_when_recipe_changes(self):
        """An image made by another recipe (or damaged) is rebuilt, replacing the old directory."""
        packages = FakePackages()
        b = ImageBuilder(self.dir, packages)
        path = b.ensure()
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["recipe"] = "old"
        (path / "manifest.json").write_text(json.dumps(manifest))
        self.assertIsNone(b.cached(DEFAULT_IMAGE))
        b.ensure()
        self.assertIsNotNone(b.cached(DEFAULT_IMAGE))
        (path / "initrd.gz").write_bytes(b"truncated")
        self.assertIsNone(b.cached(DEFAULT_IMAGE))
        b.ensure()
        self.assertEqual(len(packages.downloads), 3 * (3 + len(SSH_PACKAGES)))
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), [".lock", DEFAULT_IMAGE])

    def test_unknown_image(self):
        """An unknown image name is refused with the list of known ones, before anything is fetched."""
        packages = FakePackages()
        e = self.assertRaises(UnknownImage, ImageBuilder(self.dir, packages).ensure, "windows")
        self.assertIn("known images: debian-busybox", str(e))
        self.assertEqual(packages.downloads, [])

    def test_failure_leaves_nothing(self):
        """A failed build leaves neither an image nor its temporary directory."""
        b = ImageBuilder(self.dir, FakePackages(fail=guest.BUSYBOX_PACKAGE))
        e = self.assertRaises(ImageError, b.ensure)
        self.assertIn("busybox-static", str(e))
        self.assertEqual([p.name for p in self.dir.iterdir()], [".lock"])

    def test_interrupted_build_leftovers_removed(self):
        """A build killed midway leaves no image, and the next build removes its leftovers."""
        b = ImageBuilder(self.dir, FakePackages())
        leftover = self.dir / f".{DEFAULT_IMAGE}.tmp-1-dead"
        (leftover / "debs").mkdir(parents=True)
        self.assertIsNone(b.cached(DEFAULT_IMAGE))
        b.ensure()
        self.assertFalse(leftover.exists())

    def test_package_without_file(self):
        """A package that lacks one of the SSH files fails the build, naming the package and file."""
        packages = FakePackages()
        packages.debs["libgmp10"] = ({"Version": "1"}, tar_of({"./usr/share/doc/x": b""}))
        e = self.assertRaises(ImageError, ImageBuilder(self.dir, packages).ensure)
        self.assertIn("libgmp10 has no file ending in /x86_64-linux-gnu/libgmp.so.10", str(e))
        self.assertEqual([p.name for p in self.dir.iterdir()], [".lock"])

    def test_recipe_bumped(self):
        """An image of the format before SSH (format 1) is not used: it is rebuilt."""
        packages = FakePackages()
        b = ImageBuilder(self.dir, packages)
        path = b.ensure()
        manifest = json.loads((path / "manifest.json").read_text())
        self.assertEqual(manifest["format"], 2)
        manifest["format"] = 1
        (path / "manifest.json").write_text(json.dumps(manifest))
        self.assertIsNone(b.cached(DEFAULT_IMAGE))

    def test_missing_tools(self):
        """Without apt-get the error says what to install."""
        e = self.assertRaises(ImageError, ImageBuilder(self.dir, FakePackages(missing_tool=True)).ensure)
        self.assertIn("apt-get", str(e))

    def test_missing_tools_message(self):
        """DebianPackages.check names the missing tools and what to do."""
        packages = guest.DebianPackages(which=lambda tool: None)
        e = self.assertRaises(ImageError, packages.check)
        self.assertIn("apt-get and dpkg-deb", str(e))
        self.assertIn("Debian", str(e))

    def test_apt_failure_message(self):
        """A failing apt-get download is reported with its stderr and the apt-get update hint."""

        def run(argv, **kw):
            return subprocess.CompletedProcess(argv, 100, b"", b"E: Unable to locate package x")

        packages = guest.DebianPackages(run=run)
        e = self.assertRaises(ImageError, packages.download, "x", Path(self.mktemp()))
        self.assertIn("Unable to locate package x", str(e))
        self.assertIn("apt-get update", str(e))


class AddressPoolTests(unittest.TestCase):
    def test_lowest_free(self):
        """Addresses are handed out lowest first, skipping the gateway and used ones."""
        pool = AddressPool("10.237.0.1/24")
        self.assertEqual(pool.allocate([]), "10.237.0.2")
        self.assertEqual(pool.allocate(["10.237.0.2", None, "10.237.0.4"]), "10.237.0.3")
        self.assertEqual((pool.gateway, pool.prefixlen), ("10.237.0.1", 24))
        self.assertEqual(pool.with_prefix("10.237.0.3"), "10.237.0.3/24")

    def test_gateway_in_the_middle(self):
        """A gateway that is not the first host address is still never handed out."""
        pool = AddressPool("192.168.5.2/30")
        self.assertEqual(pool.allocate([]), "192.168.5.1")
        self.assertRaises(AddressesExhausted, pool.allocate, ["192.168.5.1"])

    def test_exhausted(self):
        """When every host address is used, allocation fails with AddressesExhausted."""
        pool = AddressPool("10.0.0.1/29")
        used = [f"10.0.0.{i}" for i in range(2, 7)]
        e = self.assertRaises(AddressesExhausted, pool.allocate, used)
        self.assertIn("10.0.0.0/29", str(e))

    def test_bad_addresses(self):
        """A bridge address without room for guests or not a host address is refused."""
        for bad in ("10.0.0.1/31", "10.0.0.0/24", "10.0.0.255/24", "nonsense"):
            self.assertRaises(BridgeError, AddressPool, bad)


class Msg(dict):
    def __init__(self, attrs, **fields):
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name):
        return self.attrs.get(name)


class FakeIPRoute:
    """
    The part of pyroute2's IPRoute that ensure_bridge uses.
    """

    def __init__(self, links=None, refuse=False):
        self.links = {}
        for name, kind in (links or {}).items():
            self._add(name, kind)
        self.refuse = refuse
        self.calls = []

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def _add(self, name, kind):
        self.links[name] = {"index": len(self.links) + 1, "kind": kind, "addrs": [], "up": False}

    def _by_index(self, index):
        return next(v for v in self.links.values() if v["index"] == index)

    def link_lookup(self, ifname):
        return [self.links[ifname]["index"]] if ifname in self.links else []

    def link(self, command, **kw):
        self.calls.append(("link", command))
        if self.refuse:
            raise NetlinkError(1, "Operation not permitted")
        if command == "add":
            self._add(kw["ifname"], kw["kind"])
        elif command == "set":
            self._by_index(kw["index"])["up"] = kw["state"] == "up"

    def get_links(self, index):
        kind = self._by_index(index)["kind"]
        return [Msg({"IFLA_LINKINFO": Msg({"IFLA_INFO_KIND": kind}) if kind else None})]

    def get_addr(self, index, family):
        return [Msg({"IFA_ADDRESS": a}, prefixlen=p) for a, p in self._by_index(index)["addrs"]]

    def addr(self, command, index, address, prefixlen):
        self.calls.append(("addr", command))
        self._by_index(index)["addrs"].append((address, prefixlen))


class EnsureBridgeTests(unittest.TestCase):
    def test_creates(self):
        """A missing bridge is created with its address and brought up."""
        ipr = FakeIPRoute()
        self.assertTrue(ensure_bridge("omerta-br0", "10.237.0.1/24", iproute=ipr))
        link = ipr.links["omerta-br0"]
        self.assertEqual((link["kind"], link["addrs"], link["up"]),
                         ("bridge", [("10.237.0.1", 24)], True))

    def test_idempotent(self):
        """Running it again adds no bridge and no second address."""
        ipr = FakeIPRoute()
        ensure_bridge(iproute=ipr)
        self.assertFalse(ensure_bridge(iproute=ipr))
        self.assertEqual(ipr.links[bridge.DEFAULT_BRIDGE]["addrs"], [("10.237.0.1", 24)])
        self.assertEqual([c for c in ipr.calls if c[1] == "add"], [("link", "add"), ("addr", "add")])

    def test_not_a_bridge(self):
        """An existing interface of another kind is refused, not reconfigured."""
        ipr = FakeIPRoute({"omerta-br0": "veth"})
        e = self.assertRaises(BridgeError, ensure_bridge, "omerta-br0", iproute=ipr)
        self.assertIn("is a veth interface", str(e))
        self.assertEqual(ipr.links["omerta-br0"]["addrs"], [])

    def test_not_root(self):
        """A netlink permission error becomes a BridgeError that says root is needed."""
        e = self.assertRaises(BridgeError, ensure_bridge, iproute=FakeIPRoute(refuse=True))
        self.assertIn("needs root", str(e))

    def test_long_name(self):
        """A bridge name longer than the kernel allows is refused."""
        self.assertRaises(BridgeError, ensure_bridge, "x" * 16, iproute=FakeIPRoute())
