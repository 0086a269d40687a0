"""
WireGuard on the consumer's node: one interface per provider it holds VMs
from, kept by the running node (C{omerta up}), restored when it restarts.

The interface (C{omc} + a hash of both peer ids) has the tunnel address the
provider gave this consumer, a route to each VM held there, and one
WireGuard peer, the provider, whose endpoint is the loopback address of the
node's tunnel plane for that provider (L{omerta.mesh.tunnel}); AllowedIPs
are the provider's tunnel address and the VMs' addresses, so nothing else
can come out of this tunnel.  The key pair is the consumer's for that
provider (C{DATA_DIR/tunnels/<provider id>.key}, 0600); its public half
goes with every VM request to the provider.

The blocking work (wireguard-go, UAPI, netlink) runs on a worker thread.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from omerta.crypto.wireguard import WireGuardKey, load_or_create_key
from omerta.tunnel import worker
from omerta.tunnel.provider_side import MTU
from omerta.wire.tunnel import TO_CONSUMER

INTERFACE_PREFIX = "omc"
KEEPALIVE = 25
"""WireGuard keepalive: the tunnel stays handshaken while held."""
HANDSHAKE_FRESH = 180.0
"""A handshake younger than this means the tunnel is up (WireGuard rekeys every 120 s)."""


class TunnelError(Exception):
    """A tunnel could not be set up; the message says why and what to do."""


@dataclass
class ProviderTunnel:
    """The consumer's tunnel to one provider."""

    network_id: bytes
    provider_id: bytes
    interface: str
    address: str
    provider_address: str
    prefix: int
    provider_key: bytes
    vms: dict[str, str | None] = field(default_factory=dict)
    """The VMs held there: vm id -> guest address (None without a guest)."""

    def vm_addresses(self) -> list[str]:
        return sorted({a for a in self.vms.values() if a})
    device: object = None


def tunnel_key(data_dir: Path, provider_id_hex: str) -> WireGuardKey:
    """The consumer's WireGuard key pair for one provider, created on first use."""
    return load_or_create_key(Path(data_dir) / "tunnels" / f"{provider_id_hex}.key")


class ConsumerTunnels:
    """
    @param node: the L{omerta.mesh.node.MeshNode} (its peer id, tunnel plane).
    @param data_dir: the node's data directory (keys, wireguard-go logs).
    """

    log = Logger()

    def __init__(self, node, data_dir: Path, *, run: Callable | None = None,
                 device_factory=None):
        self.node = node
        self.data_dir = Path(data_dir)
        self._run = run or worker.run
        self._device_factory = device_factory
        self.tunnels: dict[bytes, ProviderTunnel] = {}
        self._lock = defer.DeferredLock()

    @staticmethod
    def check() -> None:
        """
        @raise TunnelError: this node cannot carry tunnels (no wireguard-go,
            not root), with what to do.
        """
        from omerta.tunnel.wgdevice import WireGuardUnavailable, check_available

        try:
            check_available()
        except WireGuardUnavailable as e:
            raise TunnelError(str(e)) from None

    def ensure(self, network_id: bytes, provider_id: bytes, *, provider_key: bytes,
               address: str, provider_address: str, prefix: int,
               vms: dict[str, str | None]) -> defer.Deferred:
        """
        The tunnel to C{provider_id}, brought up if it is down, carrying
        C{vms} (vm id -> guest address or None) besides those it carries.
        """
        return self._lock.run(lambda: defer.ensureDeferred(self._ensure(
            network_id, provider_id, provider_key, address, provider_address, prefix, vms)))

    async def _ensure(self, network_id, provider_id, provider_key, address, provider_address,
                      prefix, vms) -> ProviderTunnel:
        from omerta.tunnel.wgdevice import interface_name

        self.check()
        for addr in [address, provider_address] + [a for a in vms.values() if a]:
            try:
                ipaddress.IPv4Address(addr)
            except ValueError:
                raise TunnelError(f"the provider gave an address that is not IPv4: {addr!r}"
                                  ) from None
        tunnel = self.tunnels.get(provider_id)
        if tunnel is not None and (tunnel.address != address
                                   or tunnel.provider_key != provider_key
                                   or tunnel.network_id != network_id):
            await self._down(tunnel)  # the provider was reinstalled: start afresh
            tunnel = None
        self._check_overlap(provider_id, address, prefix)
        if tunnel is None:
            tunnel = ProviderTunnel(network_id, provider_id,
                                    interface_name(INTERFACE_PREFIX, self.node.peer_id,
                                                   provider_id),
                                    address, provider_address, prefix, provider_key)
        new_vms = {vm: a for vm, a in vms.items() if tunnel.vms.get(vm) != a}
        tunnel.vms.update(vms)
        self.tunnels[provider_id] = tunnel
        if tunnel.device is None:
            key = tunnel_key(self.data_dir, provider_id.hex())
            await self._run(self._up, tunnel, key)
        plane = self.node.tunnels
        endpoint = plane.open(network_id, provider_id, TO_CONSUMER, tunnel.device.listen_port)
        await self._run(self._peer, tunnel, endpoint.address, tunnel.vm_addresses(),
                        [a for a in new_vms.values() if a])
        return tunnel

    def _check_overlap(self, provider_id: bytes, address: str, prefix: int) -> None:
        mine = ipaddress.IPv4Interface(f"{address}/{prefix}").network
        for other in self.tunnels.values():
            if other.provider_id == provider_id:
                continue
            theirs = ipaddress.IPv4Interface(f"{other.address}/{other.prefix}").network
            if mine.overlaps(theirs):
                raise TunnelError(
                    f"the provider's tunnel subnet {mine} overlaps that of provider"
                    f" {other.provider_id.hex()[:16]} ({theirs}): release the VMs held there"
                    f" first")

    def _up(self, tunnel: ProviderTunnel, key: WireGuardKey) -> None:
        from omerta.tunnel.wgdevice import WireGuardDevice

        factory = self._device_factory or WireGuardDevice
        state_dir = self.data_dir / "tunnels"
        device = factory(tunnel.interface, key.private, mtu=MTU, state_dir=state_dir)
        try:
            device.up([f"{tunnel.address}/{tunnel.prefix}"])
        except Exception as e:
            device.down()
            raise TunnelError(f"WireGuard interface {tunnel.interface} did not come up: {e}"
                              ) from None
        tunnel.device = device

    def _peer(self, tunnel: ProviderTunnel, endpoint: tuple, vm_addresses: list[str],
              new_addresses: list[str]) -> None:
        device = tunnel.device
        allowed = [f"{tunnel.provider_address}/32"] + [f"{a}/32" for a in vm_addresses]
        device.set_peer(tunnel.provider_key, endpoint, allowed, keepalive=KEEPALIVE)
        for address in new_addresses:
            if ipaddress.IPv4Address(address) not in ipaddress.IPv4Interface(
                    f"{tunnel.address}/{tunnel.prefix}").network:
                device.add_route(f"{address}/32")

    def forget(self, provider_id: bytes, vm_id: str) -> defer.Deferred:
        """
        The VM C{vm_id} is no longer held: its route goes, and the whole
        tunnel when it was the last VM held from that provider.
        """
        return self._lock.run(lambda: defer.ensureDeferred(self._forget(provider_id, vm_id)))

    async def _forget(self, provider_id: bytes, vm_id: str) -> None:
        tunnel = self.tunnels.get(provider_id)
        if tunnel is None:
            return
        address = tunnel.vms.pop(vm_id, None)
        if not tunnel.vms:
            await self._down(tunnel)
            return
        if tunnel.device is not None and address:
            remaining = tunnel.vm_addresses()
            endpoint = self.node.tunnels.get(tunnel.network_id, provider_id, TO_CONSUMER)
            if endpoint is not None:
                await self._run(self._peer, tunnel, endpoint.address, remaining, [])
            await self._run(self._drop_route, tunnel, address)

    @staticmethod
    def _drop_route(tunnel: ProviderTunnel, address: str) -> None:
        try:
            tunnel.device.remove_route(f"{address}/32")
        except Exception:
            pass  # gone with the interface or never added (inside the subnet)

    async def _down(self, tunnel: ProviderTunnel) -> None:
        self.tunnels.pop(tunnel.provider_id, None)
        if self.node.tunnels is not None:
            self.node.tunnels.close(tunnel.network_id, tunnel.provider_id, TO_CONSUMER)
        if tunnel.device is not None:
            device, tunnel.device = tunnel.device, None
            await self._run(device.down)

    def stop(self) -> defer.Deferred:
        """Every tunnel down (the node stops)."""
        async def stop_all():
            for tunnel in list(self.tunnels.values()):
                await self._down(tunnel)
        return self._lock.run(lambda: defer.ensureDeferred(stop_all()))

    def reap(self) -> defer.Deferred:
        """Interfaces a crashed run of this node left behind go (at start)."""
        from omerta.tunnel.wgdevice import reap_stale

        return self._run(reap_stale, INTERFACE_PREFIX, self.data_dir / "tunnels",
                         {t.interface for t in self.tunnels.values()})

    # state

    def state(self, provider_id: bytes) -> dict | None:
        """The tunnel to a provider as documents show it, or None."""
        tunnel = self.tunnels.get(provider_id)
        if tunnel is None:
            return None
        state = "down"
        handshake = None
        if tunnel.device is not None:
            state = "handshaking"
            try:
                stats = tunnel.device.peers().get(tunnel.provider_key)
            except Exception:
                stats = None
            if stats is not None and stats.last_handshake:
                handshake = stats.last_handshake
                if self.node.clock.seconds() - handshake < HANDSHAKE_FRESH:
                    state = "up"
        connection = None
        overlay = self.node.overlays.get(tunnel.network_id)
        if overlay is not None:
            connection = overlay.paths.connection(tunnel.provider_id)
        return {
            "interface": tunnel.interface,
            "address": f"{tunnel.address}/{tunnel.prefix}",
            "provider_address": tunnel.provider_address,
            "state": state,
            "last_handshake": handshake,
            "path_kind": None if connection is None else connection.kind,
        }

    def provider_key_of(self, provider_id: bytes) -> bytes | None:
        tunnel = self.tunnels.get(provider_id)
        return None if tunnel is None else tunnel.provider_key



class ConsumerTunnelService(Service):
    """
    The running node's tunnels to the providers of the VMs held in its data
    directory: set as C{node_service.consumer_tunnels} once the node runs,
    every held VM's tunnel restored at start (left behind interfaces of a
    crashed run removed first), every tunnel down at stop.  Tunnels need
    root and wireguard-go; without them VMs are still granted and listed,
    and their documents say why there is no tunnel.
    """

    log = Logger()

    def __init__(self, node_service, **tunnel_options):
        self.node_service = node_service
        self.tunnels: ConsumerTunnels | None = None
        self.restored: defer.Deferred | None = None
        self._options = tunnel_options  # ConsumerTunnels' run= and device_factory= (tests)

    def startService(self) -> None:
        super().startService()
        node = self.node_service.node
        self.tunnels = ConsumerTunnels(node, self.node_service.data_dir, **self._options)
        self.node_service.consumer_tunnels = self.tunnels
        try:
            ConsumerTunnels.check()
        except TunnelError as e:
            self.log.info("No VM tunnels on this node: {why}", why=str(e))
            return
        self.restored = defer.ensureDeferred(self._restore()).addErrback(
            lambda f: self.log.failure("Restoring VM tunnels failed", f))

    async def _restore(self) -> None:
        from omerta.crypto.wireguard import decode_key
        from omerta.roles.consumer import ConsumerStore

        await self.tunnels.reap()
        held = ConsumerStore(self.node_service.data_dir).load().vms.values()
        overlays = self.node_service.node.overlays
        for vm in held:
            if not (vm.tunnel_address and vm.provider_tunnel_address):
                continue
            network_id = bytes.fromhex(vm.network)
            if network_id not in overlays:
                continue
            try:
                await self.tunnels.ensure(
                    network_id, bytes.fromhex(vm.provider),
                    provider_key=decode_key(vm.provider_wg_key), address=vm.tunnel_address,
                    provider_address=vm.provider_tunnel_address, prefix=vm.tunnel_prefix,
                    vms={vm.vm_id: vm.address})
            except Exception as e:
                self.log.warn("The tunnel of VM {vm} was not restored: {error}", vm=vm.vm_id,
                              error=str(e))
            else:
                self.log.info("Restored the tunnel of VM {vm}", vm=vm.vm_id)

    def stopService(self):
        super().stopService()
        if self.tunnels is not None:
            return self.tunnels.stop()
