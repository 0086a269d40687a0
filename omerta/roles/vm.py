"""
The provider's VM backend: domains on libvirt, behind L{IVMBackend}.

L{LibvirtBackend} defines, starts, stops and destroys libvirt domains from a
L{VMSpec}.  Every libvirt call (and every fsync of the ledger) runs on one
dedicated worker thread, never on the reactor thread: a libvirt connection is
used from a single thread, and calls are serialised in submission order.

Bookkeeping
===========

The VMs this provider created are recorded in C{<data_dir>/vms.json} (written
atomically with L{omerta.storage.write_json}).  Each domain is named
C{omerta-<vm_id>} and carries an C{<omerta:vm>} element in its libvirt
C{<metadata>} with the provider id, the owner and the spec, so a restarted
provider can recognise its own domains even on a shared hypervisor.

A VM is recorded in the ledger (state C{defining}) I{before} its domain is
defined, and its disk is created after.  L{LibvirtBackend.reconcile} runs at
start and settles every disagreement between the ledger and libvirt:

  - a ledger entry whose domain is gone (crash between record and define, or
    someone undefined it by hand) is removed, its disk deleted, and reported
    as C{lost};
  - a ledger entry still C{defining} whose domain exists is completed;
  - a domain tagged with I{this} provider's id but absent from the ledger is
    an orphan: nobody can account for it (the ledger was lost or rolled
    back), so it is destroyed and undefined, and its disk deleted.  Domains
    without our metadata, or tagged with another provider id, are never
    touched.

Nothing leaks and nothing is forgotten: after reconcile the ledger and the
set of tagged domains are equal.

QEMU guests
===========

For a C{qemu:} URI the domains are real TCG guests: before a VM is defined
(and again before it is started, since a host reboot removes the bridge) the
worker thread makes sure its image exists (L{guest.ImageBuilder}, cached in
C{images_dir}, default C{<data_dir>/images}) and that the bridge exists
(L{bridges.ensure_bridge}, default C{omerta-br0} with C{10.237.0.1/24}).
Each VM gets an address of the bridge's subnet when it is created, on the
reactor thread together with its quota reservation, so no two VMs ever share
one; it is kept in the ledger entry's C{address} (so it survives a restart)
and is free again once the entry goes (destroy, or reconcile finding the
domain lost).  The guest learns it from the kernel command line
(L{guest.kernel_cmdline}).  QEMU runs as an unprivileged user, so the data
directory gets search permission (0711) and the disk is 0600 (libvirt hands
it to QEMU's user while the VM runs).

The test driver
===============

C{test:///default} keeps its state in memory, shared by the connections that
are open at the same time in one process and reset when the last one closes.
A "restart" of a provider on the test driver therefore only finds its domains
if another connection stays open meanwhile (the tests hold one); a file URI
(C{test:///path/node.xml}) is re-read from the file at every open, so it does
not remember defined domains across opens either.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from omerta.roles import bridge as bridges
from omerta.roles import guest
from omerta.storage import ensure_private_dir, read_json, write_json

OMERTA_NS = "https://omerta.invalid/xmlns/libvirt-vm/1"
OMERTA_PREFIX = "omerta"
DOMAIN_PREFIX = "omerta-"
LEDGER_NAME = "vms.json"
LEDGER_VERSION = 1

DEFAULT_URI = "test:///default"


class VMError(Exception):
    """
    A VM operation failed; the message says why.
    """


class QuotaExceeded(VMError):
    """
    A request does not fit in what the provider's quota leaves free.

    @ivar reason: a short machine-readable word (C{max_vms}, C{cpu},
        C{memory}, C{disk}).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownVM(VMError):
    """
    No VM with this id was created by this provider.
    """


class BadSpec(VMError):
    """
    A L{VMSpec} asks for something impossible (zero memory, bad image name).
    """


@dataclass(frozen=True)
class VMSpec:
    """
    What a consumer asks for.
    """

    vcpus: int
    memory_mb: int
    disk_gb: int
    image: str
    owner: str
    """The requesting peer id, hex."""
    name: str = ""
    """A label chosen by the consumer; the domain name is always
    C{omerta-<vm_id>}."""

    def validate(self) -> None:
        if self.vcpus < 1 or self.memory_mb < 16 or self.disk_gb < 0:
            raise BadSpec(
                f"need vcpus >= 1, memory_mb >= 16 and disk_gb >= 0, got"
                f" vcpus={self.vcpus} memory_mb={self.memory_mb}"
                f" disk_gb={self.disk_gb}"
            )
        if not self.image or "/" in self.image or self.image.startswith("."):
            raise BadSpec(f"bad image name {self.image!r}")
        try:
            bytes.fromhex(self.owner)
        except ValueError:
            raise BadSpec(f"owner must be a hex peer id, got {self.owner!r}")


@dataclass(frozen=True)
class VMInfo:
    """
    What the provider knows about one of its VMs.
    """

    vm_id: str
    name: str
    state: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    owner: str
    created_at: float
    address: str | None = None
    image: str = ""


@dataclass(frozen=True)
class Quota:
    """
    The most this provider commits to VMs; C{None} means unlimited.
    """

    max_vms: int | None = None
    cpu_cores: int | None = None
    memory_mb: int | None = None
    disk_gb: int | None = None


@dataclass(frozen=True)
class Resources:
    """
    Resources committed to (or free for) VMs.
    """

    vms: int = 0
    cpu_cores: int = 0
    memory_mb: int = 0
    disk_gb: int = 0


@dataclass
class ReconcileReport:
    """
    What L{LibvirtBackend.reconcile} changed.
    """

    lost: list[str] = field(default_factory=list)
    """Ledger entries whose domain was gone; removed."""
    orphans_destroyed: list[str] = field(default_factory=list)
    """Domain names tagged as ours but not in the ledger; destroyed."""
    completed: list[str] = field(default_factory=list)
    """Entries recorded as C{defining} whose domain existed; kept."""


class IVMBackend(Interface):
    """
    Creates and manages VMs for consumers.  Every method returns a Deferred.
    """

    quota = Attribute("The L{Quota} enforced by L{create}.")

    def create(spec):
        """
        Define a VM (not started) from a L{VMSpec}.

        @return: Deferred firing with its L{VMInfo}; fails with
            L{QuotaExceeded} or L{BadSpec}.
        """

    def start(vm_id):
        """
        Boot a defined VM.  @return: Deferred firing with its L{VMInfo}.
        """

    def stop(vm_id):
        """
        Power a VM off (it stays defined).  @return: Deferred of L{VMInfo}.
        """

    def destroy(vm_id):
        """
        Stop, undefine and delete the disk of a VM, and forget it.
        @return: Deferred firing with C{None}.
        """

    def list():
        """
        @return: Deferred firing with a list of L{VMInfo}, one per VM this
            provider created.
        """

    def info(vm_id):
        """
        @return: Deferred firing with the L{VMInfo}; fails with L{UnknownVM}.
        """

    def committed():
        """
        @return: the L{Resources} committed to VMs (synchronous: it reads the
            ledger in memory).
        """


# virDomainState -> the word we report
_STATES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}


def domain_name(vm_id: str) -> str:
    return DOMAIN_PREFIX + vm_id


def _metadata_element(vm_id: str, provider: str, spec: VMSpec, created_at: float):
    tag = ET.Element(
        f"{{{OMERTA_NS}}}vm",
        {"id": vm_id, "provider": provider, "created": repr(created_at)},
    )
    for key in ("owner", "name", "image", "vcpus", "memory_mb", "disk_gb"):
        ET.SubElement(tag, f"{{{OMERTA_NS}}}{key}").text = str(getattr(spec, key))
    return tag


def build_domain_xml(
    kind: str,
    vm_id: str,
    provider: str,
    spec: VMSpec,
    created_at: float,
    disk_path: Path,
    image_dir: Path | None = None,
    serial_log: Path | None = None,
    bridge: str | None = None,
    cmdline: str | None = None,
) -> str:
    """
    The libvirt domain XML for a VM.

    @param kind: C{"test"} for libvirt's test driver, C{"qemu"} for QEMU
        with TCG (kernel C{vmlinuz} and C{initrd.gz} from C{image_dir}, serial
        console to C{serial_log}, a virtio NIC on C{bridge} when given).
    @param cmdline: the kernel command line of a C{qemu} domain; default
        L{guest.kernel_cmdline} without network configuration.
    """
    if kind not in ("test", "qemu"):
        raise ValueError(f"unknown domain kind {kind!r}")
    ET.register_namespace(OMERTA_PREFIX, OMERTA_NS)
    dom = ET.Element("domain", type=kind)
    ET.SubElement(dom, "name").text = domain_name(vm_id)
    ET.SubElement(dom, "uuid").text = str(uuid.uuid5(uuid.NAMESPACE_URL, OMERTA_NS + vm_id))
    if spec.name:
        ET.SubElement(dom, "title").text = spec.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    ET.SubElement(dom, "metadata").append(
        _metadata_element(vm_id, provider, spec, created_at)
    )
    os_ = ET.SubElement(dom, "os")
    if kind == "qemu":
        ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
        image_dir = Path(image_dir) if image_dir is not None else Path(".")
        ET.SubElement(os_, "kernel").text = str(image_dir / "vmlinuz")
        ET.SubElement(os_, "initrd").text = str(image_dir / "initrd.gz")
        ET.SubElement(os_, "cmdline").text = cmdline or guest.kernel_cmdline(vm_id)
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "destroy"
        ET.SubElement(dom, "on_crash").text = "destroy"
    else:
        ET.SubElement(os_, "type").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    if spec.disk_gb > 0:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        if kind == "qemu":
            ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=str(disk_path))
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if kind == "qemu":
        if bridge:
            nic = ET.SubElement(devices, "interface", type="bridge")
            ET.SubElement(nic, "source", bridge=bridge)
            ET.SubElement(nic, "model", type="virtio")
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(serial_log))
        ET.SubElement(serial, "target", port="0")
        ET.SubElement(devices, "console", type="file").append(
            ET.Element("target", type="serial", port="0")
        )
    return ET.tostring(dom, encoding="unicode")


def _add_search(directory: Path) -> None:
    """
    Add search permission for group and others to C{directory} (chmod
    go+x): they may open files in it by name but not list it.
    """
    mode = stat.S_IMODE(directory.stat().st_mode)
    wanted = mode | stat.S_IXGRP | stat.S_IXOTH
    if wanted != mode:
        os.chmod(directory, wanted)


def parse_domain_metadata(xml: str) -> dict[str, Any] | None:
    """
    The C{<omerta:vm>} metadata of a domain's XML, or C{None} if it has none.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    tag = root.find(f"metadata/{{{OMERTA_NS}}}vm")
    if tag is None:
        return None
    out: dict[str, Any] = {
        "vm_id": tag.get("id", ""),
        "provider": tag.get("provider", ""),
        "created_at": float(tag.get("created") or 0),
    }
    for child in tag:
        key = child.tag.split("}", 1)[-1]
        out[key] = child.text or ""
    return out


@implementer(IVMBackend)
class LibvirtBackend(service.Service):
    """
    VMs as libvirt domains; see the module docstring for the bookkeeping.

    Start it with C{startService()} and wait for L{whenReady} (the
    connection is open, the ledger loaded and reconciled) before use.

    @param connect: opens the connection, called on the worker thread with
        the URI (default C{libvirt.open}); tests pass a wrapper.
    @param provider_id: tag written into every domain's metadata; defaults to
        a random id kept in the ledger, so that two providers sharing one
        hypervisor never reconcile each other's domains.
    @param bridge: the Linux bridge QEMU guests are plugged into; for a
        C{qemu} URI C{None} means L{bridges.DEFAULT_BRIDGE} and C{""} means
        no network at all.  Ignored by the test driver.
    @param bridge_address: the host's address on the bridge with its prefix;
        guests get the other addresses of that subnet (see
        L{bridges.AddressPool}) and it as their gateway.
    @param images_dir: where guest images are cached (default
        C{<data_dir>/images}); see L{guest.ImageBuilder}.
    @param image_builder: builds and caches images (tests pass a fake).
    @param bridge_setup: called with C{(bridge, bridge_address)} on the
        worker thread before a QEMU VM is defined or started (default
        L{bridges.ensure_bridge}).
    """

    log = Logger()

    def __init__(
        self,
        data_dir: Path,
        reactor=None,
        uri: str = DEFAULT_URI,
        quota: Quota = Quota(),
        metrics=None,
        provider_id: str | None = None,
        connect: Callable[[str], Any] | None = None,
        bridge: str | None = None,
        clock: Callable[[], float] = time.time,
        bridge_address: str = bridges.DEFAULT_BRIDGE_ADDRESS,
        images_dir: Path | None = None,
        image_builder: guest.ImageBuilder | None = None,
        bridge_setup: Callable[[str, str], Any] = bridges.ensure_bridge,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: rule 4, lazily
        self.reactor = reactor
        # absolute: the paths go into domain XML, read by libvirtd
        self.data_dir = Path(data_dir).absolute()
        self.uri = uri
        self.quota = quota
        self.metrics = metrics
        if bridge is None and self.domain_kind == "qemu":
            bridge = bridges.DEFAULT_BRIDGE
        self.bridge = bridge
        self.bridge_address = bridge_address
        self.addresses = bridges.AddressPool(bridge_address)
        self.images_dir = Path(images_dir) if images_dir is not None else self.data_dir / "images"
        self.image_builder = (
            image_builder if image_builder is not None else guest.ImageBuilder(self.images_dir)
        )
        self._bridge_setup = bridge_setup
        self._provider_id = provider_id
        self._connect = connect
        self._clock = clock
        self._pool: ThreadPool | None = None
        self._conn = None
        self._vms: dict[str, dict[str, Any]] = {}
        # guards self._vms, which the reactor thread reads and reserves in
        # and the worker thread updates; never held across a libvirt call
        self._lock = threading.Lock()
        self.whenReady: defer.Deferred | None = None
        self.lastReconcile: ReconcileReport | None = None

    # -- paths and kinds ---------------------------------------------------

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / LEDGER_NAME

    @property
    def provider_id(self) -> str:
        assert self._provider_id is not None, "backend not started"
        return self._provider_id

    def disk_path(self, vm_id: str) -> Path:
        return self.data_dir / "vms" / vm_id / "disk.raw"

    @property
    def domain_kind(self) -> str:
        return "test" if self.uri.startswith("test:") else "qemu"

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="omerta-libvirt")
        self._pool.start()
        self.whenReady = self._run(self._open).addCallback(lambda _: self.reconcile())

    def stopService(self):
        super().stopService()
        pool, self._pool = self._pool, None
        if pool is None:
            return defer.succeed(None)

        def close():
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        d = deferToThreadPool(self.reactor, pool, close)

        def stopPool(result):
            pool.stop()
            return result

        return d.addBoth(stopPool)

    def _run(self, f, *args, **kwargs) -> defer.Deferred:
        """
        Run C{f} on the worker thread.
        """
        if self._pool is None:
            return defer.fail(VMError("VM backend is not running"))
        return deferToThreadPool(self.reactor, self._pool, f, *args, **kwargs)

    def _open(self) -> None:
        # worker thread
        ensure_private_dir(self.data_dir)
        if self.domain_kind == "qemu":
            self._make_reachable()
        document = read_json(self.ledger_path, dict)
        if document and document.get("version") != LEDGER_VERSION:
            raise VMError(
                f"{self.ledger_path} has version {document.get('version')!r},"
                f" this omerta understands {LEDGER_VERSION}"
            )
        if self._provider_id is None:
            self._provider_id = document.get("provider") or secrets.token_hex(8)
        self._vms = dict(document.get("vms", {}))
        if self._connect is None:
            import libvirt

            self._connect = libvirt.open
        self._conn = self._connect(self.uri)
        self._save()

    def _save(self) -> None:
        # worker thread
        with self._lock:
            vms = {k: dict(v) for k, v in self._vms.items()}
        write_json(
            self.ledger_path,
            {
                "version": LEDGER_VERSION,
                "provider": self._provider_id,
                "uri": self.uri,
                "vms": vms,
            },
        )

    def _inc(self, name: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, **labels)

    def _gauge(self) -> None:
        if self.metrics is not None:
            c = self.committed()
            self.metrics.set("vm_committed_vms", c.vms)
            self.metrics.set("vm_committed_cpu_cores", c.cpu_cores)
            self.metrics.set("vm_committed_memory_mb", c.memory_mb)
            self.metrics.set("vm_committed_disk_gb", c.disk_gb)

    # -- reconcile ---------------------------------------------------------

    def reconcile(self) -> defer.Deferred:
        """
        Make the ledger and libvirt agree (see the module docstring).

        @return: Deferred firing with a L{ReconcileReport}.
        """
        return self._run(self._reconcile).addCallback(self._reconciled)

    def _reconcile(self) -> ReconcileReport:
        # worker thread
        report = ReconcileReport()
        ours: dict[str, Any] = {}
        for dom in self._conn.listAllDomains(0):
            meta = parse_domain_metadata(dom.XMLDesc(0))
            if meta is None or meta["provider"] != self._provider_id:
                continue
            ours[meta["vm_id"]] = dom
        for vm_id in list(self._vms):
            entry = self._vms[vm_id]
            if vm_id not in ours:
                self.log.warn(
                    "VM {vm_id} of {owner} is in the ledger but its domain is"
                    " gone; forgetting it",
                    vm_id=vm_id,
                    owner=entry["owner"],
                )
                with self._lock:
                    del self._vms[vm_id]
                self._remove_disk(vm_id)
                report.lost.append(vm_id)
            elif entry.get("state") == "defining":
                with self._lock:
                    entry["state"] = "defined"
                report.completed.append(vm_id)
        for vm_id, dom in ours.items():
            if vm_id in self._vms:
                continue
            name = dom.name()
            self.log.warn(
                "domain {name} carries this provider's tag but was never"
                " recorded; destroying it",
                name=name,
            )
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            self._remove_disk(vm_id)
            report.orphans_destroyed.append(name)
        self._save()
        return report

    def _reconciled(self, report: ReconcileReport) -> ReconcileReport:
        self.lastReconcile = report
        for _ in report.lost:
            self._inc("vm_reconciled", outcome="lost")
        for _ in report.orphans_destroyed:
            self._inc("vm_reconciled", outcome="orphan_destroyed")
        self._gauge()
        return report

    # -- quota -------------------------------------------------------------

    def committed(self) -> Resources:
        with self._lock:
            vms = list(self._vms.values())
        return Resources(
            vms=len(vms),
            cpu_cores=sum(v["vcpus"] for v in vms),
            memory_mb=sum(v["memory_mb"] for v in vms),
            disk_gb=sum(v["disk_gb"] for v in vms),
        )

    def _check_quota(self, spec: VMSpec) -> None:
        q, c = self.quota, self.committed()
        checks = (
            ("max_vms", q.max_vms, c.vms, 1, "VMs"),
            ("cpu", q.cpu_cores, c.cpu_cores, spec.vcpus, "cpu cores"),
            ("memory", q.memory_mb, c.memory_mb, spec.memory_mb, "MiB of memory"),
            ("disk", q.disk_gb, c.disk_gb, spec.disk_gb, "GiB of disk"),
        )
        for reason, limit, used, wanted, unit in checks:
            if limit is not None and used + wanted > limit:
                self._inc("vm_quota_refused", reason=reason)
                raise QuotaExceeded(
                    reason,
                    f"asked for {wanted} {unit}, {max(limit - used, 0)} of"
                    f" {limit} free",
                )

    # -- operations --------------------------------------------------------

    def create(self, spec: VMSpec) -> defer.Deferred:
        vm_id = secrets.token_hex(8)
        entry = {
            "vm_id": vm_id,
            "state": "defining",
            "created_at": self._clock(),
            "address": None,
            **asdict(spec),
        }
        try:
            spec.validate()
            if self.domain_kind == "qemu":
                try:
                    guest.check_name(spec.image)
                except guest.UnknownImage as e:
                    raise BadSpec(str(e))
            # quota check, address allocation and reservation happen together
            # on the reactor thread, so two concurrent requests cannot both
            # fit in one slot or get one address
            self._check_quota(spec)
            with self._lock:
                if self._networked:
                    used = [v.get("address") for v in self._vms.values()]
                    try:
                        entry["address"] = self.addresses.allocate(used)
                    except bridges.AddressesExhausted as e:
                        self._inc("vm_quota_refused", reason="addresses")
                        raise QuotaExceeded("addresses", str(e))
                self._vms[vm_id] = entry
        except VMError:
            return defer.fail()
        self._gauge()
        d = self._run(self._create, vm_id, spec, entry)

        def failed(f):
            with self._lock:
                self._vms.pop(vm_id, None)
            self._gauge()
            self._inc("vm_create_failed")
            return self._run(self._save).addBoth(lambda _: f)

        def created(info):
            self._inc("vm_created")
            return info

        return d.addCallbacks(created, failed)

    @property
    def _networked(self) -> bool:
        return self.domain_kind == "qemu" and bool(self.bridge)

    def _prepare(self, image: str) -> Path:
        """
        Build (or find cached) a QEMU guest's image and set up the bridge.

        @return: the image directory.
        """
        # worker thread: both block (an image build takes seconds)
        try:
            image_dir = self.image_builder.ensure(image)
        except guest.UnknownImage as e:
            raise BadSpec(str(e))
        except guest.ImageError as e:
            raise VMError(f"guest image {image}: {e}")
        if self.bridge:
            try:
                self._bridge_setup(self.bridge, self.bridge_address)
            except bridges.BridgeError as e:
                raise VMError(str(e))
        return image_dir

    def _make_reachable(self) -> None:
        """
        Let QEMU, which libvirt runs as an unprivileged user (C{libvirt-qemu}
        on Debian), reach the disks and images: search (never read) permission
        on the data directory; warn about an ancestor that still blocks it.
        """
        # worker thread
        _add_search(self.data_dir)
        for target in (self.data_dir, self.images_dir):
            for d in reversed(target.resolve().parents):
                try:
                    mode = d.stat().st_mode
                except FileNotFoundError:
                    break
                if not mode & stat.S_IXOTH:
                    self.log.warn(
                        "QEMU runs as an unprivileged user and cannot reach {target}:"
                        " {blocker} has mode {mode:04o}; run 'chmod o+x {blocker}' or"
                        " use a data directory elsewhere (e.g. under /var/lib)",
                        target=target, blocker=d, mode=stat.S_IMODE(mode),
                    )
                    break

    def serial_log_path(self, vm_id: str) -> Path:
        return self.disk_path(vm_id).parent / "serial.log"

    def _create(self, vm_id: str, spec: VMSpec, entry: dict) -> VMInfo:
        # worker thread: prepare image and bridge, record intent, define,
        # create the disk, record done
        kind = self.domain_kind
        image_dir = self.images_dir / spec.image
        cmdline = None
        if kind == "qemu":
            image_dir = self._prepare(spec.image)
            address = entry.get("address")
            cmdline = guest.kernel_cmdline(
                vm_id,
                self.addresses.with_prefix(address) if address else None,
                self.addresses.gateway if address else None,
            )
        self._save()
        disk = self.disk_path(vm_id)
        xml = build_domain_xml(
            kind,
            vm_id,
            self._provider_id,
            spec,
            entry["created_at"],
            disk,
            image_dir=image_dir,
            serial_log=self.serial_log_path(vm_id),
            bridge=self.bridge,
            cmdline=cmdline,
        )
        try:
            ensure_private_dir(disk.parent.parent)
            ensure_private_dir(disk.parent)
            if kind == "qemu":
                _add_search(disk.parent.parent)
                _add_search(disk.parent)
            # 0600: libvirt hands the file to QEMU's user while it runs
            fd = os.open(disk, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                f.truncate(spec.disk_gb * 1024**3)  # sparse
            dom = self._conn.defineXML(xml)
        except BaseException:
            self._remove_disk(vm_id)
            raise
        with self._lock:
            entry["state"] = "defined"
        self._save()
        return self._info_of(vm_id, dom)

    def _remove_disk(self, vm_id: str) -> None:
        directory = self.disk_path(vm_id).parent
        for p in (directory / "disk.raw", directory / "serial.log"):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        try:
            directory.rmdir()
        except (FileNotFoundError, OSError):
            pass

    def _entry(self, vm_id: str) -> dict:
        try:
            return self._vms[vm_id]
        except KeyError:
            raise UnknownVM(f"no VM {vm_id!r} on this provider")

    def _domain(self, vm_id: str):
        import libvirt

        try:
            return self._conn.lookupByName(domain_name(vm_id))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _info_of(self, vm_id: str, dom) -> VMInfo:
        e = self._vms[vm_id]
        if dom is None:
            state = "lost"
        else:
            state = _STATES.get(dom.state(0)[0], "unknown")
        return VMInfo(
            vm_id=vm_id,
            name=e["name"],
            state=state,
            vcpus=e["vcpus"],
            memory_mb=e["memory_mb"],
            disk_gb=e["disk_gb"],
            owner=e["owner"],
            created_at=e["created_at"],
            address=e.get("address"),
            image=e.get("image", ""),
        )

    def _call(self, work, vm_id: str) -> defer.Deferred:
        try:
            self._entry(vm_id)
        except UnknownVM:
            return defer.fail()
        return self._run(work, vm_id)

    def info(self, vm_id: str) -> defer.Deferred:
        return self._call(lambda v: self._info_of(v, self._domain(v)), vm_id)

    def list(self) -> defer.Deferred:
        ids = sorted(self._vms, key=lambda v: (self._vms[v]["created_at"], v))

        def work():
            return [self._info_of(v, self._domain(v)) for v in ids if v in self._vms]

        return self._run(work)

    def start(self, vm_id: str) -> defer.Deferred:
        def work(v):
            dom = self._existing(v)
            if not dom.isActive():
                if self.domain_kind == "qemu":
                    # after a host reboot the bridge is gone; the image may
                    # have been removed: both are cheap to check
                    self._prepare(self._vms[v]["image"])
                self._boot(dom)
            return self._info_of(v, dom)

        return self._call(work, vm_id)

    def stop(self, vm_id: str) -> defer.Deferred:
        """
        Power the VM off at once (C{virDomainDestroy}); the small guests have
        no ACPI agent, so a graceful shutdown would only time out.
        """

        def work(v):
            dom = self._existing(v)
            if dom.isActive():
                dom.destroy()
            return self._info_of(v, dom)

        return self._call(work, vm_id)

    def _boot(self, dom) -> None:
        import libvirt

        try:
            dom.create()
        except libvirt.libvirtError as e:
            if "Permission denied" not in str(e):
                raise
            raise VMError(
                f"{e} (QEMU runs as an unprivileged user: every directory above"
                f" {self.data_dir} and {self.images_dir} needs search permission,"
                f" chmod o+x)"
            ) from e

    def _existing(self, vm_id: str):
        dom = self._domain(vm_id)
        if dom is None:
            raise VMError(f"the domain of VM {vm_id} is gone; reconcile forgets it")
        return dom

    def destroy(self, vm_id: str) -> defer.Deferred:
        def work(v):
            dom = self._domain(v)
            if dom is not None:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            self._remove_disk(v)
            with self._lock:
                self._vms.pop(v, None)
            self._save()

        def done(_):
            self._inc("vm_destroyed")
            self._gauge()

        return self._call(work, vm_id).addCallback(done)
