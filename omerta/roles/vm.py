"""
The provider's VM backend: domains on libvirt, behind L{IVMBackend}.

L{LibvirtBackend} defines, starts, stops and destroys libvirt domains from a
L{VMSpec}.  It is a thin coordinator over three parts, each usable alone:

  - L{omerta.roles.vmledger.VMLedger}: the bookkeeping (the VMs, quota,
    committed resources, guest addresses), used only on the reactor thread
    and timed by the reactor's clock;
  - L{omerta.roles.vmworker.LibvirtWorker}: every blocking operation
    (libvirt calls, image and bridge preparation, disks, permissions, writes
    of the ledger file) on one dedicated thread, in submission order,
    returning plain values;
  - L{omerta.roles.domainxml}: the domain XML, as pure functions.

The worker never touches the ledger: the backend asks it for facts, updates
the ledger on the reactor thread and hands it a snapshot to write, so no
lock is needed.  The values, the interface and the errors live in
L{omerta.roles.vmtypes}; this module re-exports them.

Bookkeeping
===========

The VMs this provider created are recorded in C{<data_dir>/vms.json} (written
atomically with L{omerta.storage.write_json}).  Each domain is named
C{omerta-<vm_id>} and carries an C{<omerta:vm>} element in its libvirt
C{<metadata>} with the provider id, the owner and the spec, so a restarted
provider can recognise its own domains even on a shared hypervisor.

A VM is reserved in the ledger (state C{defining}: quota, address) on the
reactor thread when it is requested, written to the file I{before} its
domain is defined, and its disk is created just before the definition.
L{LibvirtBackend.reconcile} runs at start and settles every disagreement
between the ledger and libvirt: the worker lists the domains tagged with
this provider's id, the ledger decides, and the worker carries it out:

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
Each VM gets an address of the bridge's subnet when it is reserved, so no two
VMs ever share one; it is kept in the ledger entry's C{address} (so it
survives a restart) and is free again once the entry goes (destroy, or
reconcile finding the domain lost).  The guest learns it from the kernel
command line (L{guest.kernel_cmdline}).  QEMU runs as an unprivileged user,
so the data directory gets search permission (0711) and the disk is 0600
(libvirt hands it to QEMU's user while the VM runs).

A consumer logs into a QEMU guest over SSH as C{omerta}: the spec's
C{ssh_key} goes to the guest on its kernel command line, and the guest makes
a host key at each boot and prints it on its serial console
(C{<data_dir>/vms/<id>/serial.log}).  The backend reads that log on the
worker thread (for L{LibvirtBackend.info}, L{LibvirtBackend.list} and
L{LibvirtBackend.wait_ready}) until it finds the key, then keeps it in the
ledger entry until the VM is started or stopped again.

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

import secrets
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from omerta.roles import bridge as bridges
from omerta.roles import guest
from omerta.roles.domainxml import (
    DOMAIN_PREFIX,
    OMERTA_NS,
    OMERTA_PREFIX,
    build_domain_xml,
    domain_name,
    metadata_element,
    parse_domain_metadata,
)
from omerta.roles.vmledger import LEDGER_NAME, LEDGER_VERSION, VMLedger
from omerta.roles.vmtypes import (
    DEFAULT_URI,
    BadSpec,
    IVMBackend,
    Quota,
    QuotaExceeded,
    ReconcileReport,
    Resources,
    UnknownVM,
    VMError,
    VMInfo,
    VMSpec,
)
from omerta.roles.vmworker import HostTools, LibvirtWorker, VMPaths

__all__ = [
    "DEFAULT_URI",
    "DOMAIN_PREFIX",
    "LEDGER_NAME",
    "LEDGER_VERSION",
    "OMERTA_NS",
    "OMERTA_PREFIX",
    "BadSpec",
    "HostTools",
    "IVMBackend",
    "LibvirtBackend",
    "Quota",
    "QuotaExceeded",
    "ReconcileReport",
    "Resources",
    "UnknownVM",
    "VMError",
    "VMInfo",
    "VMSpec",
    "build_domain_xml",
    "domain_name",
    "metadata_element",
    "parse_domain_metadata",
]


@implementer(IVMBackend)
class LibvirtBackend(service.Service):
    """
    VMs as libvirt domains; see the module docstring for the bookkeeping.

    Start it with C{startService()} and wait for L{whenReady} (the
    connection is open, the ledger loaded and reconciled) before use.  Call
    it on the reactor thread only.  A libvirt that cannot be reached at
    start (libvirtd still starting, or restarting) is tried again after
    L{CONNECT_RETRY_INITIAL} seconds, doubling to L{CONNECT_RETRY_MAX}, until
    it answers or the service stops; each failure is logged.

    @param reactor: runs the worker's results back and is the clock of the
        ledger's timestamps (default the global reactor).
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
    @param tools: the blocking host operations (libvirt connection, image
        builder, bridge setup); tests pass fakes.
    """

    log = Logger()

    POLL_INTERVAL = 0.25
    CONNECT_RETRY_INITIAL = 1.0
    CONNECT_RETRY_MAX = 30.0
    """Seconds between two looks at a booting guest's serial log in
    L{wait_ready}: QEMU writes a file, there is no event to wait on."""

    def __init__(
        self,
        data_dir: Path,
        reactor=None,
        uri: str = DEFAULT_URI,
        quota: Quota = Quota(),
        metrics=None,
        bridge: str | None = None,
        bridge_address: str = bridges.DEFAULT_BRIDGE_ADDRESS,
        images_dir: Path | None = None,
        provider_id: str | None = None,
        tools: HostTools = HostTools(),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: rule 4, lazily
        self.reactor = reactor
        # absolute: the paths go into domain XML, read by libvirtd
        self.data_dir = Path(data_dir).absolute()
        self.uri = uri
        self.metrics = metrics
        if bridge is None and self.domain_kind == "qemu":
            bridge = bridges.DEFAULT_BRIDGE
        self.bridge = bridge
        self.bridge_address = bridge_address
        self.addresses = bridges.AddressPool(bridge_address)
        self.images_dir = Path(images_dir) if images_dir is not None else self.data_dir / "images"
        self.paths = VMPaths(self.data_dir, self.images_dir)
        networked = self.domain_kind == "qemu" and bool(bridge)
        self.ledger = VMLedger(
            self.data_dir / LEDGER_NAME,
            reactor,
            quota,
            addresses=self.addresses if networked else None,
            uri=uri,
            provider_id=provider_id,
        )
        self.worker = LibvirtWorker(
            reactor, uri, self.domain_kind, self.paths, bridge, bridge_address, tools
        )
        # VMs whose create is under way; reconcile leaves their entries alone
        self._creating: set[str] = set()
        self.whenReady: defer.Deferred | None = None
        self._retry: defer.Deferred | None = None  # the wait before connecting again
        self.lastReconcile: ReconcileReport | None = None

    # -- paths and kinds ---------------------------------------------------

    @property
    def quota(self) -> Quota:
        return self.ledger.quota

    @property
    def ledger_path(self) -> Path:
        return self.ledger.path

    @property
    def provider_id(self) -> str:
        assert self.ledger.provider_id is not None, "backend not started"
        return self.ledger.provider_id

    def disk_path(self, vm_id: str) -> Path:
        return self.paths.disk(vm_id)

    def serial_log_path(self, vm_id: str) -> Path:
        return self.paths.serial_log(vm_id)

    @property
    def domain_kind(self) -> str:
        return "test" if self.uri.startswith("test:") else "qemu"

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.worker.start()
        self.whenReady = defer.ensureDeferred(self._open())

    async def _open(self) -> ReconcileReport:
        document = await self.worker.open_data_dir(self.ledger.path)
        self.ledger.load(document)
        await self._connect()
        await self._save()
        return await self.reconcile()

    async def _connect(self) -> None:
        delay = self.CONNECT_RETRY_INITIAL
        while True:
            try:
                await self.worker.connect()
                return
            except Exception as e:
                if not self.running:
                    raise
                self._inc("vm_backend_connect_failures")
                self.log.warn(
                    "libvirt at {uri} is not reachable ({error}); trying again in {delay:g} s",
                    uri=self.uri, error=str(e).strip() or type(e).__name__, delay=delay)
            self._retry = task.deferLater(self.reactor, delay, lambda: None)
            try:
                await self._retry
            except defer.CancelledError:
                raise VMError("the VM backend stopped before libvirt answered") from None
            finally:
                self._retry = None
            delay = min(delay * 2, self.CONNECT_RETRY_MAX)

    def stopService(self):
        super().stopService()
        if self._retry is not None:
            self._retry.cancel()
        return self.worker.stop()

    def _save(self) -> defer.Deferred:
        return self.worker.write(self.ledger.snapshot())

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
        return defer.ensureDeferred(self._reconcile())

    async def _reconcile(self) -> ReconcileReport:
        tagged = await self.worker.survey(self.provider_id)
        settled = self.ledger.settle(list(tagged), busy=self._creating)
        report = ReconcileReport(completed=settled.completed)
        for vm_id, entry in settled.lost.items():
            self.log.warn(
                "VM {vm_id} of {owner} is in the ledger but its domain is"
                " gone; forgetting it",
                vm_id=vm_id,
                owner=entry["owner"],
            )
            await self.worker.remove_disk(vm_id)
            report.lost.append(vm_id)
        for vm_id in settled.orphans:
            name = tagged[vm_id].name
            self.log.warn(
                "domain {name} carries this provider's tag but was never"
                " recorded; destroying it",
                name=name,
            )
            await self.worker.destroy_vm(vm_id, name)
            report.orphans_destroyed.append(name)
        await self._save()
        self.lastReconcile = report
        for _ in report.lost:
            self._inc("vm_reconciled", outcome="lost")
        for _ in report.orphans_destroyed:
            self._inc("vm_reconciled", outcome="orphan_destroyed")
        self._gauge()
        return report

    # -- operations --------------------------------------------------------

    def committed(self) -> Resources:
        return self.ledger.committed()

    def create(self, spec: VMSpec) -> defer.Deferred:
        vm_id = secrets.token_hex(8)
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
            entry = self.ledger.reserve(vm_id, spec)
        except QuotaExceeded as e:
            self._inc("vm_quota_refused", reason=e.reason)
            return defer.fail()
        except VMError:
            return defer.fail()
        self._gauge()
        self._creating.add(vm_id)
        d = defer.ensureDeferred(self._create(vm_id, spec, entry))

        def failed(f):
            self.ledger.remove(vm_id)
            self._gauge()
            self._inc("vm_create_failed")
            return self._save().addBoth(lambda _: f)

        def created(info):
            self._inc("vm_created")
            return info

        def settled(result):
            self._creating.discard(vm_id)
            return result

        return d.addCallbacks(created, failed).addBoth(settled)

    async def _create(self, vm_id: str, spec: VMSpec, entry: dict[str, Any]) -> VMInfo:
        image_dir = await self.worker.prepare_image(spec.image)
        await self._save()  # the intent, before the domain exists
        xml = build_domain_xml(
            self.domain_kind,
            vm_id,
            self.provider_id,
            spec,
            entry["created_at"],
            self.disk_path(vm_id),
            image_dir=image_dir,
            serial_log=self.serial_log_path(vm_id),
            bridge=self.bridge,
            cmdline=self._cmdline(vm_id, entry["address"], entry.get("ssh_key") or None),
        )
        state = await self.worker.define_vm(vm_id, xml, spec.disk_gb)
        self.ledger.mark_defined(vm_id)
        await self._save()
        return self.ledger.info(vm_id, state)

    def _cmdline(self, vm_id: str, address: str | None, ssh_key: str | None = None
                 ) -> str | None:
        if self.domain_kind != "qemu":
            return None
        return guest.kernel_cmdline(
            vm_id,
            self.addresses.with_prefix(address) if address else None,
            self.addresses.gateway if address else None,
            ssh_key,
        )

    async def _learn_host_keys(self, states: dict[str, str]) -> None:
        """
        Record the host keys the running guests without one have printed
        on their serial consoles since the last look.
        """
        if self.domain_kind != "qemu":
            return
        waiting = [
            v for v, state in states.items()
            if state == "running" and v in self.ledger
            and self.ledger.entry(v).get("host_key") is None
        ]
        if not waiting:
            return
        reports = await self.worker.console_reports(waiting)
        changed = False
        for vm_id, report in reports.items():
            if report.host_key is not None and vm_id in self.ledger:
                changed |= self.ledger.set_host_key(vm_id, report.host_key)
        if changed:
            await self._save()

    def info(self, vm_id: str) -> defer.Deferred:
        return defer.ensureDeferred(self._info(vm_id))

    async def _info(self, vm_id: str) -> VMInfo:
        self.ledger.entry(vm_id)
        states = await self.worker.vm_states([vm_id])
        await self._learn_host_keys(states)
        return self.ledger.info(vm_id, states[vm_id])

    def list(self) -> defer.Deferred:
        return defer.ensureDeferred(self._list())

    async def _list(self) -> list[VMInfo]:
        ids = self.ledger.ids()
        states = await self.worker.vm_states(ids)
        await self._learn_host_keys(states)
        return [self.ledger.info(v, states[v]) for v in ids if v in self.ledger]

    def wait_ready(self, vm_id: str, timeout: float) -> defer.Deferred:
        """
        Wait until VM C{vm_id}'s guest is up: it printed L{guest.MARKER} (its
        SSH server listens) after its host key on its serial console.  The
        log is read on the worker thread every L{POLL_INTERVAL} seconds.  On
        the test driver there is no guest: it fires at once, C{host_key}
        C{None}.

        @param timeout: seconds to wait, on the reactor's clock.
        @return: Deferred firing with the L{VMInfo}, C{host_key} filled in;
            it fails with L{UnknownVM}, or with L{VMError} naming the serial
            log when the guest reports an error, is not running, or is not up
            within C{timeout}.
        """
        return defer.ensureDeferred(self._wait_ready(vm_id, timeout))

    async def _wait_ready(self, vm_id: str, timeout: float) -> VMInfo:
        self.ledger.entry(vm_id)
        if self.domain_kind != "qemu":
            return await self._info(vm_id)
        deadline = self.reactor.seconds() + timeout
        serial = self.serial_log_path(vm_id)
        while True:
            state = (await self.worker.vm_states([vm_id]))[vm_id]
            report = (await self.worker.console_reports([vm_id]))[vm_id]
            self.ledger.entry(vm_id)  # destroyed meanwhile: UnknownVM
            if report.error is not None:
                raise VMError(f"the guest of VM {vm_id} failed: {report.error!r} (its console"
                              f" is in {serial})")
            if state != "running":
                raise VMError(f"VM {vm_id} is {state}, its guest will not come up (its console"
                              f" is in {serial})")
            if report.up and report.host_key is not None:
                if self.ledger.set_host_key(vm_id, report.host_key):
                    await self._save()
                return self.ledger.info(vm_id, state)
            if report.up:
                raise VMError(f"the guest of VM {vm_id} is up but reported no SSH host key"
                              f" (its console is in {serial})")
            left = deadline - self.reactor.seconds()
            if left <= 0:
                raise VMError(f"the guest of VM {vm_id} was not up after {timeout:g} s (its"
                              f" console is in {serial})")
            await task.deferLater(self.reactor, min(self.POLL_INTERVAL, left), lambda: None)

    def start(self, vm_id: str) -> defer.Deferred:
        """
        Boot the VM unless it runs.  A new boot makes a new host key, so
        the one known is forgotten until the guest reports it again.
        """
        return defer.ensureDeferred(self._start(vm_id))

    async def _start(self, vm_id: str) -> VMInfo:
        image = self.ledger.entry(vm_id).get("image", "")
        state = await self.worker.start_vm(vm_id, image)
        await self._forget_host_key(vm_id)
        return self.ledger.info(vm_id, state)

    async def _forget_host_key(self, vm_id: str) -> None:
        if vm_id in self.ledger and self.ledger.set_host_key(vm_id, None):
            await self._save()

    def stop(self, vm_id: str) -> defer.Deferred:
        """
        Power the VM off at once (C{virDomainDestroy}); the small guests have
        no ACPI agent, so a graceful shutdown would only time out.
        """
        return defer.ensureDeferred(self._stop(vm_id))

    async def _stop(self, vm_id: str) -> VMInfo:
        self.ledger.entry(vm_id)
        state = await self.worker.stop_vm(vm_id)
        await self._forget_host_key(vm_id)
        return self.ledger.info(vm_id, state)

    def destroy(self, vm_id: str) -> defer.Deferred:
        return defer.ensureDeferred(self._destroy(vm_id))

    async def _destroy(self, vm_id: str) -> None:
        self.ledger.entry(vm_id)
        await self.worker.destroy_vm(vm_id)
        self.ledger.remove(vm_id)
        await self._save()
        self._inc("vm_destroyed")
        self._gauge()
