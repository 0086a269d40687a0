"""
The provider role: VMs for consumers, asked for over the mesh.

A provider node answers requests on the C{vm} channel (L{omerta.wire.vm})
of every network it is in.  Requests arrive inside per-pair sessions, so the
sender is authenticated and owns what it creates: only the consumer that
created a VM can see it, ask about it or release it.

    CREATE   check the request, reserve within the quota (atomically, on the
             reactor thread), define and boot the domain with the
             consumer's SSH key, give the consumer a tunnel address and
             make it a WireGuard peer allowed to reach this VM, wait for
             the guest to report its SSH host key, answer with the record
    RELEASE  destroy the VM (domain, disk, address), take its tunnel away
    LIST     the caller's VMs
    STATUS   one of the caller's VMs

What the provider can give is measured (L{omerta.roles.resources}) and
capped by the operator's quota; what is free (capacity minus what the VMs
hold) goes into the node's signed announcement, re-announced whenever a VM
comes or goes, so C{find_peers(requirements)} sees it.

Tunnels (L{omerta.tunnel.provider_side}) are declared from the tunnel
records in C{vm-tunnels.json} (consumer, its WireGuard key, network, tunnel
address, per VM): applied after every change and at start, once the
backend reconciled its VMs, so a restart rebuilds exactly what is held.

Nothing blocks the reactor: the backend runs libvirt on its own thread.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.crypto.wireguard import decode_key, encode_key, load_or_create_key
from omerta.mesh.network import MeshNetwork
from omerta.roles.guest import DEFAULT_IMAGE
from omerta.roles.resources import Capacity, HostResources
from omerta.roles.vm import BadSpec, QuotaExceeded, UnknownVM, VMError, VMInfo, VMSpec
from omerta.storage import StateFileError, read_json, write_json
from omerta.tunnel.addresses import PREFIX, AddressesExhausted, ConsumerPool, provider_subnet
from omerta.wire import ParseError
from omerta.wire.vm import (CHANNEL, MAX_VMS_PER_REPLY, VmOp, VmStatus, build_reply,
                            parse_request)

TUNNELS_FILE = "vm-tunnels.json"
WIREGUARD_KEY_FILE = "wireguard.key"
GUEST_READY_TIMEOUT = 60.0
"""Seconds a new guest has to report its SSH host key before CREATE fails."""


def read_tunnel_records(path: Path) -> dict[str, dict]:
    """
    The tunnel records (VM id -> record) in C{vm-tunnels.json}, checked for
    the fields the provider uses; none while the file does not exist.

    @raise StateFileError: the file is unreadable, not JSON or not of that
        shape; the message names it and says what to do.
    """
    document = read_json(path, dict)
    problem = None
    tunnels = document.get("tunnels", {}) if isinstance(document, dict) else None
    if not isinstance(tunnels, dict):
        problem = "it has no object of tunnel records"
    else:
        for vm_id, record in tunnels.items():
            problem = _tunnel_record_problem(record)
            if problem is not None:
                problem = f"the record of VM {vm_id!r} {problem}"
                break
    if problem is not None:
        raise StateFileError(
            f"{path} is damaged: {problem}; it was left untouched: restore it from a"
            f" backup, or move it aside (the consumers of the VMs held here then lose"
            f" their tunnels until they create new VMs)")
    return dict(tunnels)


def _tunnel_record_problem(record) -> str | None:
    if not isinstance(record, dict):
        return "is not an object"
    owner = record.get("owner")
    if not (isinstance(owner, str) and _is_hex(owner)):
        return f"has owner {owner!r}, not a peer id"
    try:
        decode_key(record.get("consumer_key"))
    except (AttributeError, ValueError):
        return f"has consumer_key {record.get('consumer_key')!r}, not a WireGuard key"
    network, address = record.get("network"), record.get("address")
    if network and not (isinstance(network, str) and _is_hex(network)):
        return f"has network {network!r}, not a network id"
    if address and not isinstance(address, str):
        return f"has address {address!r}, not an address"
    return None


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return bool(text)


class Refused(Exception):
    """A request the provider answers with an error status."""

    def __init__(self, status: VmStatus, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ProviderService(Service):
    """
    @param node: the node: a L{MeshNetwork}, or the
        L{omerta.mesh.service.NodeService} to wrap in one (started before
        this).
    @param backend: an L{omerta.roles.vm.IVMBackend} service (started before
        this; requests wait for its C{whenReady}).
    @param host: the measured L{HostResources}.
    @param max_per_consumer: most VMs one consumer may hold here.
    @param tunnels: a factory C{tunnels(key) -> ProviderTunnels} (called
        with the provider's WireGuard key at start), or None: this provider
        carries no tunnels and its records say so.
    """

    log = Logger()

    def __init__(self, node, backend, host: HostResources, data_dir: Path,
                 max_per_consumer: int = 4, clock=time.time, tunnels=None,
                 guest_ready_timeout: float = GUEST_READY_TIMEOUT):
        self.mesh = node if isinstance(node, MeshNetwork) else MeshNetwork(service=node)
        self.backend = backend
        self.host = host
        self.data_dir = Path(data_dir)
        self.max_per_consumer = max_per_consumer
        self.capacity = Capacity.of(host, backend.quota)
        self.ready = False
        self._clock = clock
        self._tunnels: dict[str, dict] = {}
        self._creating: dict[str, int] = {}  # owner -> creates in progress
        self._pending_addresses: dict[str, str] = {}  # owner -> tunnel address being given
        self._addresses: dict[str, str | None] = {}  # vm id -> guest address
        self.wireguard = None
        self._tunnels_factory = tunnels
        self.tunnels = None
        self.tunnel_error: str | None = None
        self.guest_ready_timeout = guest_ready_timeout
        #: the node's L{omerta.jobs.provider.JobService}, if it runs jobs:
        #: what its running jobs hold is not free for VMs either
        self.jobs = None

    # lifecycle

    def startService(self) -> None:
        super().startService()
        self.wireguard = load_or_create_key(self.data_dir / WIREGUARD_KEY_FILE)
        self._tunnels = read_tunnel_records(self.data_dir / TUNNELS_FILE)
        if self._tunnels_factory is not None:
            self.tunnels = self._tunnels_factory(self.wireguard)
        for network in self.mesh.networks():
            self.mesh.on_channel(CHANNEL, self._handler(network), network=network)
        self.announce_free()
        ready = self.backend.whenReady or defer.succeed(None)
        ready.addCallback(self._ready).addErrback(self._broken)

    def stopService(self):
        super().stopService()
        if self.mesh.started:
            for network in self.mesh.networks():
                self.mesh.on_channel(CHANNEL, None, network=network)
        if self.tunnels is not None:
            # also while the tunnels are still coming up: stop waits for that
            return self.tunnels.stop()

    def _ready(self, _) -> defer.Deferred:
        return self.backend.list().addCallback(
            lambda vms: defer.ensureDeferred(self._reconciled(vms)))

    async def _start_tunnels(self) -> None:
        try:
            await self.tunnels.start()
        except Exception as e:
            self.tunnel_error = f"the provider's tunnel interface did not come up: {e}"
            self.log.error("{error}", error=self.tunnel_error)
            return
        await self._apply_tunnels()

    async def _reconciled(self, vms: list[VMInfo]) -> None:
        self._forget_gone_tunnels({v.vm_id for v in vms})
        self._addresses = {v.vm_id: v.address for v in vms}
        if self.tunnels is not None:
            await self._start_tunnels()
        self.ready = True
        self.announce_free()
        c = self.capacity
        self.log.info(
            "Provider ready: {vms} VM(s) held; offering {cpu} cores, {mem} MiB, {disk} GiB"
            " ({gpus} GPU(s) announced) on {uri}",
            vms=self.backend.committed().vms, cpu=c.cpu_cores, mem=c.memory_mb,
            disk=c.disk_gb, gpus=c.gpus, uri=getattr(self.backend, "uri", "?"))

    def _broken(self, failure) -> None:
        self.log.failure("The VM backend did not start; VM requests are refused", failure)

    # what we offer

    def free(self) -> dict:
        committed = self.backend.committed()
        if self.jobs is not None:
            held = self.jobs.committed()
            committed = replace(committed, cpu_cores=committed.cpu_cores + held.cpu_cores,
                                memory_mb=committed.memory_mb + held.memory_mb)
        return self.capacity.free(committed)

    def announce_free(self) -> None:
        """
        Put what is free into the node's announcement and spread it (in
        every network; nothing is sent when it did not change).
        """
        if self.mesh.started:
            self.mesh.set_resources(self.free())

    # the channel

    def _handler(self, network: str):
        def handle(peer_id: bytes, payload: bytes):
            return defer.ensureDeferred(self._handle(network, peer_id, payload))

        return handle

    async def _handle(self, network: str, peer_id: bytes, payload: bytes) -> bytes:
        metrics = self.mesh.metrics
        try:
            request = parse_request(payload)
            op = VmOp(request.op)
        except (ParseError, ValueError) as e:
            metrics.inc("vm_requests", op="unknown", status="bad_request")
            return build_reply(VmStatus.BAD_REQUEST, f"not a VM request: {e}")
        try:
            if not self.ready:
                raise Refused(VmStatus.UNAVAILABLE, "the provider's VM backend is not ready")
            vms = await self._do(op, peer_id, request.body, network)
        except Refused as e:
            metrics.inc("vm_requests", op=op.name.lower(), status=e.status.name.lower())
            self.log.info("VM {op} from {peer} refused: {detail}", op=op.name.lower(),
                          peer=format_peer_id(peer_id), detail=e.detail)
            return build_reply(e.status, e.detail)
        metrics.inc("vm_requests", op=op.name.lower(), status="ok")
        return build_reply(VmStatus.OK, "", [self._record(network, peer_id, v)
                                            for v in vms[:MAX_VMS_PER_REPLY]])

    async def _do(self, op: VmOp, peer_id: bytes, body, network: str = "") -> list[VMInfo]:
        owner = peer_id.hex()
        if op == VmOp.CREATE:
            return [await self._create(owner, body, network)]
        if op == VmOp.LIST:
            return [v for v in await self.backend.list() if v.owner == owner]
        vm_id = body.vm_id.hex()
        info = await self._owned(vm_id, owner)
        if op == VmOp.STATUS:
            return [info]
        return [await self._release(info)]

    async def _owned(self, vm_id: str, owner: str) -> VMInfo:
        try:
            info = await self.backend.info(vm_id)
        except UnknownVM:
            raise Refused(VmStatus.UNKNOWN_VM, f"no VM {vm_id} on this provider") from None
        if info.owner != owner:
            raise Refused(VmStatus.NOT_YOURS, f"VM {vm_id} belongs to another consumer")
        return info

    async def _create(self, owner: str, body, network: str = "") -> VMInfo:
        held = (sum(1 for v in self._tunnels.values() if v["owner"] == owner)
                + self._creating.get(owner, 0))
        if held >= self.max_per_consumer:
            raise Refused(VmStatus.NO_CAPACITY,
                          f"you hold {held} VMs here, the most one consumer may"
                          f" ({self.max_per_consumer}); release one first")
        # counted while the backend works, so concurrent requests cannot
        # all pass the check above
        self._creating[owner] = self._creating.get(owner, 0) + 1
        try:
            return await self._define_and_boot(owner, body, network)
        finally:
            self._creating[owner] -= 1
            if not self._creating[owner]:
                del self._creating[owner]
                self._pending_addresses.pop(owner, None)

    async def _define_and_boot(self, owner: str, body, network: str = "") -> VMInfo:
        if self.tunnels is not None and not self.tunnels.running:
            raise Refused(VmStatus.UNAVAILABLE,
                          self.tunnel_error or "the provider's tunnels are not up yet")
        spec = VMSpec(vcpus=body.vcpus, memory_mb=body.memory_mb, disk_gb=body.disk_gb,
                      image=body.image or DEFAULT_IMAGE, owner=owner, name=body.name,
                      ssh_key=body.ssh_key)
        held = self.jobs.committed() if self.jobs is not None else None
        if held is not None and (held.cpu_cores or held.memory_mb):
            free = self.free()
            if spec.vcpus > free["cpu_cores"] or spec.memory_mb > free["memory_mb"]:
                raise Refused(VmStatus.NO_CAPACITY,
                              f"{free['cpu_cores']} cpu cores and {free['memory_mb']} MiB are"
                              f" free while running jobs hold {held.cpu_cores} cores and"
                              f" {held.memory_mb} MiB; ask for less or try later")
        try:
            consumer_address = self._consumer_address(owner)
        except AddressesExhausted as e:
            raise Refused(VmStatus.NO_CAPACITY, str(e)) from None
        # held while the backend works: a concurrent request of another
        # consumer must not be given the same address
        self._pending_addresses[owner] = consumer_address
        try:
            info = await self.backend.create(spec)
        except QuotaExceeded as e:
            raise Refused(VmStatus.NO_CAPACITY, str(e)) from None
        except BadSpec as e:
            raise Refused(VmStatus.BAD_REQUEST, str(e)) from None
        except VMError as e:
            raise Refused(VmStatus.FAILED, f"could not define the VM: {e}") from None
        self._tunnels[info.vm_id] = {"owner": owner, "consumer_key": encode_key(body.wg_public_key),
                                     "network": network, "address": consumer_address,
                                     "created_at": self._clock()}
        self._addresses[info.vm_id] = info.address
        self._save_tunnels()
        self.announce_free()
        try:
            info = await self.backend.start(info.vm_id)
            info = await self.backend.wait_ready(info.vm_id, self.guest_ready_timeout)
            self._addresses[info.vm_id] = info.address
            await self._apply_tunnels()
        except VMError as e:
            await self._release(info)
            raise Refused(VmStatus.FAILED, f"the VM did not start: {e}") from None
        except Exception as e:
            await self._release(info)
            raise Refused(VmStatus.FAILED, f"the VM's tunnel could not be set up: {e}") from None
        self.log.info("VM {vm} ({cpu} cores, {mem} MiB) created for {peer}", vm=info.vm_id,
                      cpu=info.vcpus, mem=info.memory_mb, peer=format_peer_id(bytes.fromhex(owner)))
        return info

    async def _release(self, info: VMInfo) -> VMInfo:
        try:
            await self.backend.destroy(info.vm_id)
        except UnknownVM:
            pass  # released meanwhile (a second release): the outcome is the same
        except VMError as e:
            raise Refused(VmStatus.FAILED, f"could not release VM {info.vm_id}: {e}") from None
        self._addresses.pop(info.vm_id, None)
        if self._tunnels.pop(info.vm_id, None) is not None:
            self._save_tunnels()
            await self._apply_tunnels()
        self.announce_free()
        self.log.info("VM {vm} released", vm=info.vm_id)
        return replace(info, state="released", address=None)

    # records

    def _record(self, network: str, peer_id: bytes, info: VMInfo) -> dict:
        connection = self.mesh.connection(peer_id, network=network)
        tunnel = self._tunnels.get(info.vm_id, {})
        carried = self.tunnels is not None and bool(tunnel.get("address"))
        return {
            "vm_id": bytes.fromhex(info.vm_id),
            "name": info.name,
            "state": info.state,
            "vcpus": info.vcpus,
            "memory_mb": info.memory_mb,
            "disk_gb": info.disk_gb,
            "image": info.image,
            "created_ms": int(info.created_at * 1000),
            "address": info.address or "",
            "wg_public_key": self.wireguard.public,
            "path_kind": connection.kind if connection is not None else "unknown",
            "tunnel_address": tunnel.get("address", "") if carried else "",
            "provider_tunnel_address": self.tunnels.address if carried else "",
            "tunnel_prefix": PREFIX if carried else 0,
            "tunnel_state": self._tunnel_state(tunnel),
            "host_key": getattr(info, "host_key", None) or "",
        }

    def _tunnel_state(self, tunnel: dict) -> str:
        if self.tunnels is None:
            return "unavailable: this provider runs without tunnels (--no-tunnels)"
        if not self.tunnels.running:
            return "unavailable: " + (self.tunnel_error or "the provider's tunnels are not up")
        if not tunnel:
            return "released"
        return self.tunnels.state_of(decode_key(tunnel["consumer_key"]))

    # tunnel keys

    def _save_tunnels(self) -> None:
        write_json(self.data_dir / TUNNELS_FILE, {"version": 2, "tunnels": self._tunnels})

    def _consumer_address(self, owner: str) -> str:
        """The owner's tunnel address here: the one it has, else a free one."""
        for tunnel in self._tunnels.values():
            if tunnel["owner"] == owner and tunnel.get("address"):
                return tunnel["address"]
        if owner in self._pending_addresses:
            return self._pending_addresses[owner]
        pool = ConsumerPool(provider_subnet(bytes.fromhex(self.mesh.peer_id)))
        return pool.allocate([*(t.get("address") for t in self._tunnels.values()),
                              *self._pending_addresses.values()])

    def grants(self) -> list:
        """The tunnel grants the records declare, one per consumer key."""
        from omerta.tunnel.provider_side import Grant

        by_key: dict[str, dict] = {}
        vms: dict[str, list[str]] = {}
        for vm_id, tunnel in sorted(self._tunnels.items()):
            if not tunnel.get("address") or not tunnel.get("network"):
                continue  # a record from before tunnels: nothing to carry
            key = tunnel["consumer_key"]
            by_key.setdefault(key, tunnel)
            address = self._addresses.get(vm_id)
            if address:
                vms.setdefault(key, []).append(address)
        return [Grant(bytes.fromhex(t["network"]), bytes.fromhex(t["owner"]), decode_key(key),
                      t["address"], tuple(vms.get(key, ()))) for key, t in by_key.items()]

    async def _apply_tunnels(self) -> None:
        if self.tunnels is not None and self.tunnels.running:
            await self.tunnels.apply(self.grants())

    def _forget_gone_tunnels(self, held: set[str]) -> None:
        """
        Tunnel keys of VMs the backend no longer has (it reconciled them
        away after a crash) go too.
        """
        gone = [vm_id for vm_id in self._tunnels if vm_id not in held]
        for vm_id in gone:
            del self._tunnels[vm_id]
        if gone:
            self._save_tunnels()

    def status(self) -> dict:
        return {
            "ready": self.ready,
            "capacity": {"cpu_cores": self.capacity.cpu_cores,
                         "memory_mb": self.capacity.memory_mb,
                         "disk_gb": self.capacity.disk_gb, "gpus": self.capacity.gpus},
            "free": self.free(),
            "vms": len(self._tunnels),
            "max_per_consumer": self.max_per_consumer,
            "jobs": None if self.jobs is None else self.jobs.status(),
            "tunnels": (None if self.tunnels is None else
                        {"error": self.tunnel_error, **self.tunnels.status()}),
        }
