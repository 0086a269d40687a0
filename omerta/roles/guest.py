"""
Guest images for the provider's QEMU VMs, built from Debian packages.

An image is a directory C{<images_dir>/<name>/} holding C{vmlinuz},
C{initrd.gz} and C{manifest.json}.  The one image there is, C{debian-busybox},
boots Debian's cloud kernel straight into an initramfs made of
C{busybox-static}, the virtio modules, Debian's Dropbear SSH server
(C{dropbear-bin} with the shared libraries it needs, L{SSH_FILES}) and an
C{/init} script (L{init_script}) that brings up C{eth0} with the address on
the kernel command line (L{kernel_cmdline}), installs the consumer's public
key from there for the user C{omerta}, makes an ed25519 host key, prints its
public half (L{HOSTKEY_MARKER}, read back by L{host_key_from_serial}),
starts Dropbear on port 22 and then prints L{MARKER} on the serial console.

Building (L{ImageBuilder.ensure}) blocks for a few seconds: call it from a
worker thread, never from the reactor.  It is:

  - cached: a directory whose manifest names this builder's recipe (format,
    init script, module list, the files taken from each package) is used as
    is; C{manifest.json} records the
    Debian package versions it was made from;
  - atomic: everything is made in C{.<name>.tmp-*} next to the image and
    renamed into place at the end, so a killed build leaves no half-made
    image (its leftovers are removed by the next build);
  - serialised: an C{flock} on C{<images_dir>/.lock} keeps two processes
    sharing a cache from building the same image at once.

Packages are fetched with C{apt-get download} (the concrete kernel package
is the C{Depends} of the C{linux-image-cloud-amd64} metapackage) and read
with C{dpkg-deb}; nothing is installed on the host.  The initramfs is
written by L{cpio_newc} and C{gzip} here, so the host needs no cpio.

Pre-build an image with C{python -m omerta.roles.guest <data_dir>/images}.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import posixpath
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from twisted.logger import Logger

from omerta.storage import atomic_write

DEFAULT_IMAGE = "debian-busybox"
KNOWN_IMAGES = (DEFAULT_IMAGE,)
IMAGE_FORMAT = 2
MANIFEST = "manifest.json"
MARKER = "omerta-guest: up"
"""The guest prints C{omerta-guest: up vm=<id> ip=<address/prefix>} once its
SSH server listens."""
ERROR_MARKER = "omerta-guest: error"
HOSTKEY_MARKER = "omerta-guest: hostkey"
"""The guest prints C{omerta-guest: hostkey vm=<id> ssh-ed25519 AAAA...}
before L{MARKER}."""

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
DROPBEAR_PACKAGE = "dropbear-bin"

GUEST_USER = "omerta"
GUEST_UID = 1000
HOST_KEY = "/etc/dropbear/dropbear_ed25519_host_key"

_LIBDIR = "lib/x86_64-linux-gnu"
SSH_FILES = (
    (DROPBEAR_PACKAGE, "/sbin/dropbear", "usr/sbin/dropbear"),
    (DROPBEAR_PACKAGE, "/bin/dropbearkey", "usr/bin/dropbearkey"),
    ("libc6", "/x86_64-linux-gnu/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
    ("libc6", "/x86_64-linux-gnu/libc.so.6", f"{_LIBDIR}/libc.so.6"),
    ("libcrypt1", "/x86_64-linux-gnu/libcrypt.so.1", f"{_LIBDIR}/libcrypt.so.1"),
    ("libtomcrypt1", "/x86_64-linux-gnu/libtomcrypt.so.1", f"{_LIBDIR}/libtomcrypt.so.1"),
    ("libtommath1", "/x86_64-linux-gnu/libtommath.so.1", f"{_LIBDIR}/libtommath.so.1"),
    ("libgmp10", "/x86_64-linux-gnu/libgmp.so.10", f"{_LIBDIR}/libgmp.so.10"),
    ("zlib1g", "/x86_64-linux-gnu/libz.so.1", f"{_LIBDIR}/libz.so.1"),
)
"""What the SSH server is made of: (Debian package, the end of the file's
path in the package (a symbolic link is followed), its path in the
initramfs).  The libraries are what C{dropbear} and C{dropbearkey} link
(libtomcrypt needs libgmp); the dynamic loader goes where their C{PT_INTERP}
names it.  Every file is installed executable."""

SSH_PACKAGES = tuple(dict.fromkeys(package for package, _, _ in SSH_FILES))

ETC_FILES = {
    "etc/passwd": f"root:*:0:0:root:/root:/bin/sh\n"
                  f"{GUEST_USER}:*:{GUEST_UID}:{GUEST_UID}:{GUEST_USER}:/home/{GUEST_USER}"
                  f":/bin/sh\n",
    "etc/group": f"root:x:0:\ntty:x:5:\n{GUEST_USER}:x:{GUEST_UID}:\n",
    "etc/shells": "/bin/sh\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
}
"""The accounts Dropbear looks up: C{*} is no password at all (not C{!},
which Dropbear takes for a locked account); the login shell must be listed
in C{/etc/shells}."""

SSH_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa")
MAX_KEY_LINE = 1000
"""The longest public key line accepted, in bytes (an RSA 4096 key is ~740
with a short comment), so the kernel command line stays under
L{MAX_CMDLINE}."""
MAX_CMDLINE = 1536
"""The longest kernel command line made, in bytes: x86's limit is 2048,
including what QEMU and the kernel add."""

VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
)
"""Loaded in this order by the guest's init (each needs the ones before)."""

# directories of the initramfs; busybox --install fills bin and sbin
_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "lib",
         "lib/modules", _LIBDIR, "lib64", "etc", "etc/dropbear", "root", "home", "var",
         "var/run", "var/log", "run")


class ImageError(Exception):
    """
    An image cannot be built or used; the message says what to do.
    """


class UnknownImage(ImageError):
    """
    No image of this name can be built.
    """


def check_name(name: str) -> None:
    """
    @raise UnknownImage: C{name} is not one of L{KNOWN_IMAGES}.
    """
    if name not in KNOWN_IMAGES:
        raise UnknownImage(
            f"unknown image {name!r}; known images: {', '.join(KNOWN_IMAGES)}"
        )


def init_script(modules: Iterable[str] = VIRTIO_MODULES) -> str:
    """
    The guest's C{/init}: mount the kernel file systems (devpts too, for
    the ptys of interactive SSH sessions), name the host
    C{omerta-<first 8 hex of the vm id>}, load the virtio modules, configure
    C{eth0} from C{omerta.ip}/C{omerta.gw} on the kernel command line,
    install C{omerta.key} (base64url, see L{kernel_cmdline}) as the user
    C{omerta}'s C{authorized_keys}, make the SSH host key and print it
    (L{HOSTKEY_MARKER}), start Dropbear (public-key logins only, no root;
    it listens before it goes to the background), print the marker line and
    stay alive.  Each failure prints an L{ERROR_MARKER} line.
    """
    names = " ".join(modules)
    home = f"/home/{GUEST_USER}"
    keys = f"{home}/.ssh/authorized_keys"
    return f"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
vm=; ip=; gw=; key=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    omerta.vm=*) vm="${{arg#omerta.vm=}}" ;;
    omerta.ip=*) ip="${{arg#omerta.ip=}}" ;;
    omerta.gw=*) gw="${{arg#omerta.gw=}}" ;;
    omerta.key=*) key="${{arg#omerta.key=}}" ;;
  esac
done
name="omerta-$(echo "$vm" | cut -c1-8)"
hostname "$name"
echo "127.0.0.1 localhost" > /etc/hosts
echo "127.0.1.1 $name" >> /etc/hosts
for m in {names}; do
  [ -d /sys/module/$m ] || insmod /lib/modules/$m.ko || echo "{ERROR_MARKER} vm=$vm insmod $m failed"
done
ip link set lo up
if [ -n "$ip" ]; then
  n=0
  while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
  if [ ! -e /sys/class/net/eth0 ]; then
    echo "{ERROR_MARKER} vm=$vm no eth0"
  else
    ip addr add "$ip" dev eth0
    ip link set eth0 up
    [ -n "$gw" ] && ip route add default via "$gw"
  fi
fi
mkdir -p {home}/.ssh
if [ -n "$key" ]; then
  k=$(echo "$key" | tr '_-' '/+')
  while [ $(( ${{#k}} % 4 )) -ne 0 ]; do k="$k="; done
  if echo "$k" | base64 -d > {keys}; then
    echo >> {keys}
  else
    echo "{ERROR_MARKER} vm=$vm omerta.key is not base64"
  fi
  chmod 600 {keys}
fi
chown -R {GUEST_UID}:{GUEST_UID} {home}
chmod 755 {home}
chmod 700 {home}/.ssh
if dropbearkey -t ed25519 -f {HOST_KEY} > /dev/null 2>&1; then
  pub=$(dropbearkey -y -f {HOST_KEY} | grep '^ssh-ed25519 ' | cut -d' ' -f1,2)
  echo "{HOSTKEY_MARKER} vm=$vm $pub"
  dropbear -r {HOST_KEY} -p 22 -s -w -E || echo "{ERROR_MARKER} vm=$vm dropbear did not start"
else
  echo "{ERROR_MARKER} vm=$vm dropbearkey failed"
fi
echo "{MARKER} vm=$vm ip=$ip"
while true; do sleep 3600; done
"""


def check_ssh_key(line: str) -> str:
    """
    An OpenSSH public key line (C{ssh-ed25519 AAAA... comment}) of one of
    L{SSH_KEY_TYPES}, checked: one printable ASCII line of at most
    L{MAX_KEY_LINE} bytes whose key parses and matches its type.

    @return: the line without surrounding white space.
    @raise ValueError: saying what is wrong.
    """
    line = line.strip()
    if not line.isascii() or not line.isprintable():
        raise ValueError("an SSH public key is one line of printable ASCII"
                         " (the contents of a .pub file)")
    if len(line) > MAX_KEY_LINE:
        raise ValueError(f"the SSH public key line is {len(line)} bytes, at most"
                         f" {MAX_KEY_LINE} fit on the kernel command line")
    words = line.split(None, 2)
    if len(words) < 2 or words[0] not in SSH_KEY_TYPES:
        raise ValueError(f"not an OpenSSH public key of a supported type"
                         f" ({', '.join(SSH_KEY_TYPES)}): {line[:30]!r}")
    try:
        load_ssh_public_key(f"{words[0]} {words[1]}".encode())
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"bad {words[0]} public key: {e}") from None
    return line


def kernel_cmdline(vm_id: str, address: str | None = None, gateway: str | None = None,
                   ssh_key: str | None = None) -> str:
    """
    The kernel command line of a VM.

    @param address: the guest's C{eth0} address with its prefix length
        (C{10.237.0.2/24}), or C{None} for no network configuration.
    @param ssh_key: the consumer's OpenSSH public key line (see
        L{check_ssh_key}), passed as C{omerta.key=} its base64url without
        padding; the guest installs it for the user C{omerta}.
    @raise ValueError: a value is unsafe, the key is refused, or the line
        would be longer than L{MAX_CMDLINE}.
    """
    for value in (vm_id, address, gateway):
        if value is not None and not re.fullmatch(r"[0-9A-Za-z.:/_-]+", value):
            raise ValueError(f"unsafe kernel command line value {value!r}")
    words = ["console=ttyS0", f"omerta.vm={vm_id}"]
    if address is not None:
        words.append(f"omerta.ip={address}")
    if gateway is not None:
        words.append(f"omerta.gw={gateway}")
    if ssh_key:
        encoded = urlsafe_b64encode(check_ssh_key(ssh_key).encode()).rstrip(b"=").decode()
        words.append(f"omerta.key={encoded}")
    cmdline = " ".join(words)
    if len(cmdline) > MAX_CMDLINE:
        raise ValueError(f"the kernel command line would be {len(cmdline)} bytes, at most"
                         f" {MAX_CMDLINE} are made (use a shorter key or comment)")
    return cmdline


@dataclass(frozen=True)
class ConsoleReport:
    """
    What a guest said about itself on its serial console.

    @ivar up: it printed L{MARKER} (its SSH server listens).
    @ivar host_key: its SSH host public key (C{ssh-ed25519 AAAA...}), or
        C{None} before it printed a valid one.
    @ivar error: its first L{ERROR_MARKER} line, or C{None}.
    """

    up: bool = False
    host_key: str | None = None
    error: str | None = None


def read_console(text: str, vm_id: str) -> ConsoleReport:
    """
    What guest C{vm_id} reported in C{text}, its serial console output
    (the last host key line counts).
    """
    up = re.compile(re.escape(f"{MARKER} vm={vm_id}") + r"(\s|$)")
    hostkey = re.compile(re.escape(f"{HOSTKEY_MARKER} vm={vm_id} ") + r"(\S+ \S+)")
    report = ConsoleReport()
    for line in text.splitlines():
        if up.search(line):
            report = ConsoleReport(True, report.host_key, report.error)
        found = hostkey.search(line)
        if found:
            try:
                key = check_ssh_key(found.group(1))
            except ValueError:
                continue
            report = ConsoleReport(report.up, key, report.error)
        if report.error is None and ERROR_MARKER in line:
            error = line[line.index(ERROR_MARKER):].strip()
            report = ConsoleReport(report.up, report.host_key, error)
    return report


def host_key_from_serial(text: str, vm_id: str) -> str | None:
    """
    The SSH host public key guest C{vm_id} printed on its serial console
    (C{text}), as C{<type> <base64>}, or C{None} if it has printed none.
    """
    return read_console(text, vm_id).host_key


def concrete_kernel_package(depends: str) -> str:
    """
    The kernel package a C{linux-image-*-amd64} metapackage depends on.

    >>> concrete_kernel_package("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)")
    'linux-image-6.1.0-56-cloud-amd64'
    """
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0]
        if re.fullmatch(r"linux-image-\d[\w.+-]*", name):
            return name
    raise ImageError(f"no kernel package in the metapackage's Depends: {depends!r}")


def recipe() -> str:
    """
    A digest of what the image is made of besides the packages; a cached
    image with another recipe is rebuilt.
    """
    text = json.dumps([IMAGE_FORMAT, init_script(), list(VIRTIO_MODULES), list(_DIRS),
                       list(SSH_FILES), ETC_FILES])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- cpio ---------------------------------------------------------------------


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
                ino: int = 0) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def cpio_newc(files: dict[str, bytes], dirs: Iterable[str] = (),
              executables: Iterable[str] = (), chardevs: dict[str, tuple[int, int]] | None = None,
              ) -> bytes:
    """
    A C{newc} cpio archive (what the kernel unpacks as an initramfs), owned by
    root, with mtime 0 so the same input gives the same bytes.

    @param files: path -> content of regular files (mode 0644, or 0755 when
        named in C{executables}).
    @param chardevs: path -> (major, minor) of character devices (mode 0600).
    """
    executables = set(executables)
    parts = []
    ino = 1
    for d in dirs:
        parts.append(_cpio_entry(d, 0o040755, ino=ino))
        ino += 1
    for path, (major, minor) in (chardevs or {}).items():
        parts.append(_cpio_entry(path, 0o020600, rdev=(major, minor), ino=ino))
        ino += 1
    for path, data in files.items():
        mode = 0o100755 if path in executables else 0o100644
        parts.append(_cpio_entry(path, mode, data, ino=ino))
        ino += 1
    parts.append(_cpio_entry("TRAILER!!!", 0))
    archive = b"".join(parts)
    return archive + b"\0" * (-len(archive) % 512)


def make_initramfs(busybox: bytes, modules: dict[str, bytes],
                   ssh: dict[str, bytes] | None = None) -> bytes:
    """
    The gzipped initramfs: busybox, the modules (name -> C{.ko} bytes, in
    C{/lib/modules}), the SSH server's files (initramfs path -> bytes, see
    L{SSH_FILES}; installed executable), L{ETC_FILES}, C{/init} and
    C{/dev/console}.
    """
    ssh = ssh or {}
    files = {"bin/busybox": busybox, "init": init_script().encode()}
    for name, data in modules.items():
        files[f"lib/modules/{name}.ko"] = data
    files.update(ssh)
    files.update((path, text.encode()) for path, text in ETC_FILES.items())
    archive = cpio_newc(
        files, dirs=_DIRS, executables=("bin/busybox", "init", *ssh),
        chardevs={"dev/console": (5, 1)},
    )
    return gzip.compress(archive, compresslevel=6, mtime=0)


# -- Debian packages ----------------------------------------------------------


class DebianPackages:
    """
    Fetches C{.deb} files with C{apt-get download} and reads them with
    C{dpkg-deb}; the seam L{ImageBuilder} tests replace.
    """

    def __init__(self, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                 which: Callable[[str], str | None] = shutil.which) -> None:
        self._run = run
        self._which = which

    def check(self) -> None:
        """
        @raise ImageError: C{apt-get} or C{dpkg-deb} is missing.
        """
        missing = [tool for tool in ("apt-get", "dpkg-deb") if self._which(tool) is None]
        if missing:
            raise ImageError(
                f"building guest images needs {' and '.join(missing)} (a Debian or Ubuntu"
                f" host); install apt and dpkg, or copy a built image into the image"
                f" directory"
            )

    def _command(self, argv: list[str], cwd: Path | None = None) -> bytes:
        try:
            done = self._run(argv, cwd=cwd, capture_output=True, check=False)
        except OSError as e:
            raise ImageError(f"cannot run {argv[0]}: {e}") from e
        if done.returncode != 0:
            stderr = done.stderr.decode(errors="replace").strip()
            hint = ""
            if argv[0] == "apt-get":
                hint = (
                    "; run 'apt-get update' as root if the package lists are"
                    " missing or stale"
                )
                if os.geteuid() != 0:
                    hint += " (this process is not root)"
            raise ImageError(
                f"{' '.join(argv)} failed with exit status {done.returncode}:"
                f" {stderr or '(no output)'}{hint}"
            )
        return done.stdout

    def download(self, package: str, dest: Path) -> Path:
        """
        Download the candidate version of C{package} into C{dest}.
        """
        before = set(dest.glob("*.deb"))
        self._command(["apt-get", "download", "-q", package], cwd=dest)
        new = [p for p in dest.glob("*.deb") if p not in before]
        mine = [p for p in new if p.name.startswith(package + "_")]
        if len(mine) != 1:
            raise ImageError(f"apt-get download {package} left {[p.name for p in new]}")
        return mine[0]

    def field(self, deb: Path, name: str) -> str:
        return self._command(["dpkg-deb", "-f", str(deb), name]).decode().strip()

    @contextlib.contextmanager
    def members(self, deb: Path) -> Iterator[tarfile.TarFile]:
        """
        The package's files as a streaming tar archive (C{dpkg-deb
        --fsys-tarfile}); read the members in order.
        """
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=err
                )
            except OSError as e:
                raise ImageError(f"cannot run dpkg-deb: {e}") from e
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    yield tar
            finally:
                while proc.stdout.read(1 << 16):  # the padding after the archive
                    pass
                proc.stdout.close()
                code = proc.wait()
            if code != 0:
                err.seek(0)
                raise ImageError(
                    f"dpkg-deb --fsys-tarfile {deb} failed: {err.read().decode(errors='replace')}"
                )


def _extract(packages: DebianPackages, deb: Path, wanted: Callable[[str], str | None]
             ) -> dict[str, bytes]:
    """
    Files of C{deb} for which C{wanted(path)} returns a key, by key.
    """
    out: dict[str, bytes] = {}
    with packages.members(deb) as tar:
        for member in tar:
            key = wanted(member.name)
            if key is not None and member.isfile():
                out[key] = tar.extractfile(member).read()
    return out


def _package_files(packages: DebianPackages, deb: Path, suffixes: Iterable[str]
                   ) -> dict[str, bytes]:
    """
    The files of C{deb} whose path ends with one of C{suffixes}, by suffix;
    a symbolic link (C{libz.so.1 -> libz.so.1.2.13}) is followed within the
    package.
    """
    suffixes = list(suffixes)
    stems = tuple(s.rsplit("/", 1)[-1] for s in suffixes)
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    with packages.members(deb) as tar:
        for member in tar:
            path = posixpath.normpath("/" + member.name)
            if member.issym():
                links[path] = posixpath.normpath(
                    posixpath.join(posixpath.dirname(path), member.linkname))
            elif member.isfile() and posixpath.basename(path).startswith(stems):
                files[path] = tar.extractfile(member).read()
    out: dict[str, bytes] = {}
    for suffix in suffixes:
        for path in sorted(set(files) | set(links)):
            if not path.endswith(suffix):
                continue
            for _ in range(8):
                if path not in links:
                    break
                path = links[path]
            if path in files:
                out[suffix] = files[path]
                break
    return out


# -- the builder --------------------------------------------------------------


class ImageBuilder:
    """
    Builds and caches guest images in C{images_dir}; see the module
    docstring.  Every method blocks: call them off the reactor thread.
    """

    log = Logger()

    def __init__(self, images_dir: Path, packages: DebianPackages | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.images_dir = Path(images_dir)
        self.packages = packages if packages is not None else DebianPackages()
        self._clock = clock

    def path(self, name: str) -> Path:
        return self.images_dir / name

    def cached(self, name: str) -> dict | None:
        """
        The manifest of a usable cached image, or C{None}.
        """
        directory = self.path(name)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict):
            return None
        if manifest.get("format") != IMAGE_FORMAT or manifest.get("recipe") != recipe():
            return None
        sizes = manifest.get("sizes", {})
        for f in ("vmlinuz", "initrd.gz"):
            try:
                if (directory / f).stat().st_size != sizes.get(f):
                    return None
            except OSError:
                return None
        return manifest

    def ensure(self, name: str = DEFAULT_IMAGE) -> Path:
        """
        The directory of image C{name}, built first unless cached.

        @raise UnknownImage: no such image.
        @raise ImageError: building failed; nothing is left half-made.
        """
        check_name(name)
        if self.cached(name) is not None:
            return self.path(name)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        # images are public Debian bits; QEMU (not root) must read them
        os.chmod(self.images_dir, 0o755)
        with open(self.images_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.cached(name) is not None:  # another process built it
                return self.path(name)
            self._remove_leftovers(name)
            self._build(name)
        return self.path(name)

    def _remove_leftovers(self, name: str) -> None:
        # under the lock, so no build is running: any temp dir is a leftover
        for p in self.images_dir.glob(f".{name}.*"):
            self.log.info("removing leftover {path} of an interrupted image build", path=p)
            shutil.rmtree(p, ignore_errors=True)

    def _build(self, name: str) -> None:
        self.packages.check()
        started = self._clock()
        tmp = self.images_dir / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o755)
        try:
            manifest = self._make(name, tmp)
            manifest["build_seconds"] = round(self._clock() - started, 3)
            atomic_write(tmp / MANIFEST,
                         (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(),
                         mode=0o644)
            final = self.path(name)
            if final.exists():
                old = self.images_dir / f".{name}.old-{secrets.token_hex(4)}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.images_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.log.info(
            "built guest image {name} in {seconds:.1f} s from {packages}",
            name=name, seconds=manifest["build_seconds"], packages=manifest["packages"],
        )

    def _make(self, name: str, out: Path) -> dict:
        debs = out / "debs"
        debs.mkdir()
        # apt's sandbox user must be able to write here, or apt warns
        os.chmod(debs, 0o777)
        p = self.packages
        meta = p.download(KERNEL_METAPACKAGE, debs)
        kernel_pkg = concrete_kernel_package(p.field(meta, "Depends"))
        kernel_deb = p.download(kernel_pkg, debs)
        busybox_deb = p.download(BUSYBOX_PACKAGE, debs)
        ssh_debs = {package: p.download(package, debs) for package in SSH_PACKAGES}
        versions = {
            KERNEL_METAPACKAGE: p.field(meta, "Version"),
            kernel_pkg: p.field(kernel_deb, "Version"),
            BUSYBOX_PACKAGE: p.field(busybox_deb, "Version"),
        }
        versions.update((package, p.field(deb, "Version")) for package, deb in ssh_debs.items())

        def kernel_file(path: str) -> str | None:
            base = path.rsplit("/", 1)[-1]
            if re.fullmatch(r"\.?/boot/vmlinuz-.*", path):
                return "vmlinuz:" + base[len("vmlinuz-"):]
            if "/lib/modules/" in path and base.endswith(".ko"):
                module = base[:-3].replace("-", "_")
                if module in VIRTIO_MODULES:
                    return module
            return None

        found = _extract(p, kernel_deb, kernel_file)
        kernels = [k for k in found if k.startswith("vmlinuz:")]
        if len(kernels) != 1:
            raise ImageError(f"{kernel_pkg} holds {len(kernels)} kernels, expected one")
        release = kernels[0].split(":", 1)[1]
        vmlinuz = found.pop(kernels[0])
        missing = [m for m in VIRTIO_MODULES if m not in found]
        if missing:
            raise ImageError(f"{kernel_pkg} lacks the modules {', '.join(missing)}")
        modules = {m: found[m] for m in VIRTIO_MODULES}
        busybox = _extract(p, busybox_deb, lambda path: "busybox" if path in (
            "./bin/busybox", "bin/busybox") else None).get("busybox")
        if busybox is None:
            raise ImageError(f"{BUSYBOX_PACKAGE} has no /bin/busybox")
        ssh = {}
        for package, deb in ssh_debs.items():
            wanted = [(suffix, dest) for pkg, suffix, dest in SSH_FILES if pkg == package]
            found = _package_files(p, deb, [suffix for suffix, _ in wanted])
            for suffix, dest in wanted:
                if suffix not in found:
                    raise ImageError(f"{package} has no file ending in {suffix}")
                ssh[dest] = found[suffix]
        initrd = make_initramfs(busybox, modules, ssh)
        _write(out / "vmlinuz", vmlinuz)
        _write(out / "initrd.gz", initrd)
        shutil.rmtree(debs)
        return {
            "format": IMAGE_FORMAT,
            "name": name,
            "recipe": recipe(),
            "packages": versions,
            "kernel_release": release,
            "modules": list(VIRTIO_MODULES),
            "sizes": {"vmlinuz": len(vmlinuz), "initrd.gz": len(initrd)},
            "sha256": {
                "vmlinuz": hashlib.sha256(vmlinuz).hexdigest(),
                "initrd.gz": hashlib.sha256(initrd).hexdigest(),
            },
            "built_at": self._clock(),
        }


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """
    C{python -m omerta.roles.guest IMAGES_DIR [NAME]}: build (or find
    cached) an image ahead of time, e.g. C{<data_dir>/images}.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m omerta.roles.guest",
        description="Build a guest image for the provider's QEMU VMs (cached).",
    )
    parser.add_argument("images_dir", type=Path, help="e.g. <data dir>/images")
    parser.add_argument("name", nargs="?", default=DEFAULT_IMAGE, choices=KNOWN_IMAGES)
    args = parser.parse_args(argv)
    builder = ImageBuilder(args.images_dir)
    started = time.monotonic()
    try:
        path = builder.ensure(args.name)
    except ImageError as e:
        parser.exit(1, f"error: {e}\n")
    manifest = builder.cached(args.name) or {}
    print(f"{path} ({time.monotonic() - started:.1f} s): {manifest.get('packages')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
