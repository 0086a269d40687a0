"""
The VM backend's worker: everything that blocks, on one dedicated thread.

L{LibvirtWorker} owns a single-thread pool and the libvirt connection.  Every
libvirt call (opening the connection included), every guest image build and
bridge setup, every disk creation and removal, the permissions QEMU needs,
every read of a guest's serial log and every write of the ledger file run on
that thread, in submission order: a libvirt connection is used from a single
thread, and an operation submitted after another sees its effects.  Each method returns a Deferred
that fires on the reactor thread with plain values (a state word, a path, a
dict); the worker keeps no bookkeeping of its own, so the caller (the
backend, on the reactor thread) owns all state.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from omerta.roles import bridge as bridges
from omerta.roles import guest
from omerta.roles.domainxml import domain_name, parse_domain_metadata
from omerta.roles.vmledger import LedgerSnapshot, read_ledger
from omerta.roles.vmtypes import BadSpec, VMError
from omerta.storage import ensure_private_dir

# virDomainState -> the word we report
STATES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}

LOST = "lost"
"""The state word of a VM whose domain is gone."""

SERIAL_READ_LIMIT = 1 << 20
"""How much of a serial log is read, from its start: a guest reports itself
in the first few tens of kilobytes."""


@dataclass(frozen=True)
class HostTools:
    """
    The blocking host operations the worker calls; tests pass fakes.

    @ivar connect: opens a libvirt connection from its URI (default
        C{libvirt.open}).
    @ivar image_builder: builds and caches QEMU guest images (default a
        L{guest.ImageBuilder} on the images directory).
    @ivar bridge_setup: called with C{(bridge, bridge_address)} before a
        QEMU VM is defined or started (default L{bridges.ensure_bridge}).
    """

    connect: Callable[[str], Any] | None = None
    image_builder: guest.ImageBuilder | None = None
    bridge_setup: Callable[[str, str], Any] = bridges.ensure_bridge


@dataclass(frozen=True)
class VMPaths:
    """
    Where a provider keeps its VMs' files; absolute, since the paths go into
    domain XML read by libvirtd.
    """

    data_dir: Path
    images_dir: Path

    def vm_dir(self, vm_id: str) -> Path:
        return self.data_dir / "vms" / vm_id

    def disk(self, vm_id: str) -> Path:
        return self.vm_dir(vm_id) / "disk.raw"

    def serial_log(self, vm_id: str) -> Path:
        return self.vm_dir(vm_id) / "serial.log"


@dataclass(frozen=True)
class TaggedDomain:
    """
    A libvirt domain carrying this provider's metadata.
    """

    vm_id: str
    name: str
    state: str


def _add_search(directory: Path) -> None:
    """
    Add search permission for group and others to C{directory} (chmod
    go+x): they may open files in it by name but not list it.
    """
    mode = stat.S_IMODE(directory.stat().st_mode)
    wanted = mode | stat.S_IXGRP | stat.S_IXOTH
    if wanted != mode:
        os.chmod(directory, wanted)


class LibvirtWorker:
    """
    Blocking VM work on one dedicated thread; see the module docstring.

    L{start} it before use and L{stop} it at the end; while it is not
    running every method fails with L{VMError}.

    @param kind: C{"test"} (libvirt's test driver: no image, bridge or
        permissions) or C{"qemu"}.
    @param bridge: the bridge QEMU guests are plugged into; empty or
        C{None} for none.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        uri: str,
        kind: str,
        paths: VMPaths,
        bridge: str | None = None,
        bridge_address: str = bridges.DEFAULT_BRIDGE_ADDRESS,
        tools: HostTools = HostTools(),
    ) -> None:
        self.reactor = reactor
        self.uri = uri
        self.kind = kind
        self.paths = paths
        self.bridge = bridge
        self.bridge_address = bridge_address
        self.image_builder = (
            tools.image_builder
            if tools.image_builder is not None
            else guest.ImageBuilder(paths.images_dir)
        )
        self._connect = tools.connect
        self._bridge_setup = tools.bridge_setup
        self._pool: ThreadPool | None = None
        self._conn = None  # used on the worker thread only

    # -- the thread --------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="omerta-libvirt")
        self._pool.start()

    def stop(self) -> defer.Deferred:
        """
        Close the connection (on the thread) and stop the thread.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return defer.succeed(None)
        d = deferToThreadPool(self.reactor, pool, self._close)

        def stopPool(result):
            pool.stop()
            return result

        return d.addBoth(stopPool)

    def _run(self, f, *args) -> defer.Deferred:
        """
        Run C{f} on the worker thread.
        """
        if self._pool is None:
            return defer.fail(VMError("VM backend is not running"))
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    # -- setup -------------------------------------------------------------

    def open_data_dir(self, ledger_path: Path) -> defer.Deferred:
        """
        Create the data directory (reachable by QEMU's user for the C{qemu}
        kind) and read the ledger document stored in it.

        @return: Deferred firing with the document (C{{}} if none).
        """
        return self._run(self._open_data_dir, ledger_path)

    def _open_data_dir(self, ledger_path: Path) -> dict:
        ensure_private_dir(self.paths.data_dir)
        if self.kind == "qemu":
            self._make_reachable()
        return read_ledger(ledger_path)

    def connect(self) -> defer.Deferred:
        """
        Open the libvirt connection.
        """
        return self._run(self._open_connection)

    def _open_connection(self) -> None:
        connect = self._connect
        if connect is None:
            import libvirt

            connect = libvirt.open
        self._conn = connect(self.uri)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def write(self, snapshot: LedgerSnapshot) -> defer.Deferred:
        """
        Write a snapshot of the ledger (atomically, with fsync).
        """
        return self._run(snapshot.write)

    def _make_reachable(self) -> None:
        """
        Let QEMU, which libvirt runs as an unprivileged user (C{libvirt-qemu}
        on Debian), reach the disks and images: search (never read) permission
        on the data directory; warn about an ancestor that still blocks it.
        """
        _add_search(self.paths.data_dir)
        for target in (self.paths.data_dir, self.paths.images_dir):
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

    # -- facts -------------------------------------------------------------

    def survey(self, provider_id: str) -> defer.Deferred:
        """
        The domains tagged with C{provider_id}.

        @return: Deferred firing with a dict of L{TaggedDomain} by VM id, in
            libvirt's order.
        """
        return self._run(self._survey, provider_id)

    def _survey(self, provider_id: str) -> dict[str, TaggedDomain]:
        ours: dict[str, TaggedDomain] = {}
        for dom in self._conn.listAllDomains(0):
            meta = parse_domain_metadata(dom.XMLDesc(0))
            if meta is None or meta["provider"] != provider_id:
                continue
            ours[meta["vm_id"]] = TaggedDomain(meta["vm_id"], dom.name(), self._state_of(dom))
        return ours

    def vm_states(self, vm_ids: Iterable[str]) -> defer.Deferred:
        """
        @return: Deferred firing with the state word (C{running},
            C{shutoff}, ..., L{LOST}) of each VM, by id.
        """
        return self._run(self._vm_states, list(vm_ids))

    def _vm_states(self, vm_ids: list[str]) -> dict[str, str]:
        return {v: self._state_of(self._domain(v)) for v in vm_ids}

    def console_reports(self, vm_ids: Iterable[str]) -> defer.Deferred:
        """
        What each VM's guest reported on its serial console
        (L{guest.read_console}); a VM without a serial log reported nothing.

        @return: Deferred firing with a L{guest.ConsoleReport} by VM id.
        """
        return self._run(self._console_reports, list(vm_ids))

    def _console_reports(self, vm_ids: list[str]) -> dict[str, guest.ConsoleReport]:
        out = {}
        for vm_id in vm_ids:
            try:
                with open(self.paths.serial_log(vm_id), "rb") as f:
                    text = f.read(SERIAL_READ_LIMIT).decode(errors="replace")
            except FileNotFoundError:
                text = ""
            out[vm_id] = guest.read_console(text, vm_id)
        return out

    @staticmethod
    def _state_of(dom) -> str:
        if dom is None:
            return LOST
        return STATES.get(dom.state(0)[0], "unknown")

    def _domain(self, vm_id: str, name: str | None = None):
        import libvirt

        try:
            return self._conn.lookupByName(name or domain_name(vm_id))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _existing(self, vm_id: str):
        dom = self._domain(vm_id)
        if dom is None:
            raise VMError(f"the domain of VM {vm_id} is gone; reconcile forgets it")
        return dom

    # -- operations --------------------------------------------------------

    def prepare_image(self, image: str) -> defer.Deferred:
        """
        For the C{qemu} kind, build (or find cached) the image and set up the
        bridge.

        @return: Deferred firing with the image directory.
        """
        return self._run(self._prepare, image)

    def _prepare(self, image: str) -> Path:
        if self.kind != "qemu":
            return self.paths.images_dir / image
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

    def define_vm(self, vm_id: str, xml: str, disk_gb: int) -> defer.Deferred:
        """
        Create VM C{vm_id}'s (sparse, mode 0600) disk and define its domain;
        on failure nothing is left.

        @return: Deferred firing with the new domain's state word.
        """
        return self._run(self._define, vm_id, xml, disk_gb)

    def _define(self, vm_id: str, xml: str, disk_gb: int) -> str:
        disk = self.paths.disk(vm_id)
        try:
            ensure_private_dir(disk.parent.parent)
            ensure_private_dir(disk.parent)
            if self.kind == "qemu":
                _add_search(disk.parent.parent)
                _add_search(disk.parent)
            # 0600: libvirt hands the file to QEMU's user while it runs
            fd = os.open(disk, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                f.truncate(disk_gb * 1024**3)  # sparse
            dom = self._conn.defineXML(xml)
        except BaseException:
            self._remove_disk(vm_id)
            raise
        return self._state_of(dom)

    def start_vm(self, vm_id: str, image: str) -> defer.Deferred:
        """
        Boot VM C{vm_id} unless it runs; for the C{qemu} kind prepare its
        image and the bridge again first (a host reboot removes the bridge).

        @return: Deferred firing with its state word.
        """
        return self._run(self._start, vm_id, image)

    def _start(self, vm_id: str, image: str) -> str:
        dom = self._existing(vm_id)
        if not dom.isActive():
            if self.kind == "qemu":
                self._prepare(image)
            self._boot(dom)
        return self._state_of(dom)

    def _boot(self, dom) -> None:
        import libvirt

        try:
            dom.create()
        except libvirt.libvirtError as e:
            if "Permission denied" not in str(e):
                raise
            raise VMError(
                f"{e} (QEMU runs as an unprivileged user: every directory above"
                f" {self.paths.data_dir} and {self.paths.images_dir} needs search"
                f" permission, chmod o+x)"
            ) from e

    def stop_vm(self, vm_id: str) -> defer.Deferred:
        """
        Power VM C{vm_id} off at once (C{virDomainDestroy}).

        @return: Deferred firing with its state word.
        """
        return self._run(self._stop, vm_id)

    def _stop(self, vm_id: str) -> str:
        dom = self._existing(vm_id)
        if dom.isActive():
            dom.destroy()
        return self._state_of(dom)

    def destroy_vm(self, vm_id: str, name: str | None = None) -> defer.Deferred:
        """
        Power off and undefine VM C{vm_id}'s domain (named C{name}, default
        L{domain_name}) if it exists, and delete its disk.
        """
        return self._run(self._destroy, vm_id, name)

    def _destroy(self, vm_id: str, name: str | None) -> None:
        dom = self._domain(vm_id, name)
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        self._remove_disk(vm_id)

    def remove_disk(self, vm_id: str) -> defer.Deferred:
        """
        Delete VM C{vm_id}'s disk, serial log and directory, if any.
        """
        return self._run(self._remove_disk, vm_id)

    def _remove_disk(self, vm_id: str) -> None:
        directory = self.paths.vm_dir(vm_id)
        for p in (self.paths.disk(vm_id), self.paths.serial_log(vm_id)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        try:
            directory.rmdir()
        except (FileNotFoundError, OSError):
            pass
