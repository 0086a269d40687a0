"""
WireGuard on the provider host: one interface for all of its consumers.

Each consumer holding VMs here is one WireGuard peer: its public key (sent
with its VM request), its tunnel address (the only source WireGuard accepts
from it: AllowedIPs), and as endpoint the loopback address the node's tunnel
plane keeps for that member (L{omerta.mesh.tunnel}).  Forwarding from the
interface goes only to the consumer's own VMs, by nftables rules that drop
everything else (L{omerta.tunnel.firewall}): not the host, not another
consumer's VM, not the provider's other networks or uplink.  The provider
answers ping on its own tunnel address, which is how a consumer of a VM
without a guest (libvirt's test driver) sees the tunnel work.

What should exist is declared, not patched: L{ProviderTunnels.apply} takes
every grant (consumer, key, addresses, VMs) and makes the interface's peers,
the plane's endpoints and the firewall's pairs exactly that; the provider
calls it after every create and release and once at start from its ledger,
so nothing stale survives a crash.

The blocking work (wireguard-go, UAPI, netlink, nft) runs on a worker
thread; the plane's endpoints are opened on the reactor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.crypto.wireguard import WireGuardKey, encode_key
from omerta.tunnel import addresses, worker
from omerta.wire.tunnel import TO_PROVIDER

INTERFACE_PREFIX = "omp"
MTU = 1360
"""
Inner packets up to 1360 bytes: + 32 WireGuard + 38 tunnel frame + 12 relay
header + 48 IPv6/UDP = 1490, within a 1492-byte PPPoE link.
"""


@dataclass(frozen=True)
class Grant:
    """One consumer's right to reach some of this provider's VMs."""

    network_id: bytes
    consumer_id: bytes
    consumer_key: bytes
    consumer_address: str
    vm_addresses: tuple[str, ...] = ()


class TunnelsUnavailable(Exception):
    """The host cannot carry tunnels; the message says what is missing."""


class ProviderTunnels:
    """
    @param node: the L{omerta.mesh.node.MeshNode} (its tunnel plane).
    @param bridge: the VMs' bridge (forwarding is enabled on it and on the
        tunnel interface only), or None without guests.
    """

    log = Logger()

    def __init__(self, node, key: WireGuardKey, state_dir: Path, bridge: str | None, *,
                 run: Callable | None = None, device_factory=None,
                 firewall_factory=None):
        from omerta.tunnel.firewall import TunnelFirewall
        from omerta.tunnel.wgdevice import WireGuardDevice, interface_name

        self.node = node
        self.key = key
        self.state_dir = Path(state_dir)
        self.bridge = bridge
        self.subnet = addresses.provider_subnet(node.peer_id)
        self.address = addresses.provider_address(node.peer_id)
        self.interface = interface_name(INTERFACE_PREFIX, node.peer_id)
        self._run = run or worker.run
        self._device_factory = device_factory or WireGuardDevice
        self.firewall = (firewall_factory or TunnelFirewall)(
            "omerta_" + self.interface.replace("-", "_"), self.interface, self.address)
        self.device = None
        self.grants: dict[bytes, Grant] = {}  # consumer key -> grant
        self._lock = defer.DeferredLock()
        self._stopping = False

    # lifecycle

    @staticmethod
    def check() -> None:
        """
        @raise TunnelsUnavailable: no wireguard-go, not root, no nftables or
            no forwarding; the message names what to install or do.
        """
        from omerta.tunnel.firewall import FirewallUnavailable, check_nftables
        from omerta.tunnel.wgdevice import WireGuardUnavailable, check_available

        try:
            check_available()
            check_nftables()
        except (WireGuardUnavailable, FirewallUnavailable) as e:
            raise TunnelsUnavailable(str(e)) from None
        try:
            with open("/proc/sys/net/ipv4/conf/all/forwarding") as f:
                f.read()
        except OSError as e:
            raise TunnelsUnavailable(f"this host has no IPv4 forwarding to switch on ({e})"
                                     ) from None

    def start(self) -> defer.Deferred:
        return self._lock.run(lambda: self._run(self._start))

    def _start(self) -> None:
        from omerta.tunnel.firewall import enable_forwarding
        from omerta.tunnel.wgdevice import reap_stale

        if self._stopping:
            return  # stopped before it started: nothing to set up, nothing to leave behind
        reap_stale(INTERFACE_PREFIX, self.state_dir, own={self.interface})
        self.state_dir.mkdir(parents=True, exist_ok=True)
        device = self._device_factory(self.interface, self.key.private, mtu=MTU,
                                      state_dir=self.state_dir)
        device.up([f"{self.address}/{addresses.PREFIX}"])
        try:
            enable_forwarding(self.interface)
            self._bridge_forwarding()
            self.firewall.install()
        except Exception:
            device.down()
            raise
        self.device = device
        self.log.info("Tunnels: {interface} at {address}/{prefix}, WireGuard port {port}",
                      interface=self.interface, address=self.address,
                      prefix=addresses.PREFIX, port=device.listen_port)

    def stop(self) -> defer.Deferred:
        """
        Take everything down; safe at any time, also while L{start} runs (it
        waits for it) or before it (start then does nothing).
        """
        self._stopping = True
        return self._lock.run(lambda: self._run(self._stop)).addCallback(self._closed)

    def _stop(self) -> None:
        if self.device is not None:
            self.device.down()
        self.firewall.remove()

    def _closed(self, _) -> None:
        plane = self.node.tunnels
        for grant in self.grants.values():
            if plane is not None:
                plane.close(grant.network_id, grant.consumer_id, TO_PROVIDER)
        self.grants = {}
        self.device = None

    @property
    def running(self) -> bool:
        return self.device is not None

    # grants

    def apply(self, grants: list[Grant]) -> defer.Deferred:
        """Make the peers, endpoints and firewall pairs exactly C{grants}."""
        return self._lock.run(self._apply, list(grants))

    @defer.inlineCallbacks
    def _apply(self, grants: list[Grant]):
        if self.device is None:
            return
        plane = self.node.tunnels
        wanted = {g.consumer_key: g for g in grants}
        gone = [g for k, g in self.grants.items() if k not in wanted]
        port = self.device.listen_port
        endpoints = {}
        for key, grant in wanted.items():
            endpoints[key] = plane.open(grant.network_id, grant.consumer_id, TO_PROVIDER,
                                        port).address
        yield self._run(self._configure, wanted, gone, endpoints)
        open_for = {(g.network_id, g.consumer_id) for g in wanted.values()}
        for grant in gone:
            if (grant.network_id, grant.consumer_id) not in open_for:
                plane.close(grant.network_id, grant.consumer_id, TO_PROVIDER)
        self.grants = wanted

    def _bridge_forwarding(self) -> None:
        """
        Forwarding on the VMs' bridge once it exists (the VM backend creates
        it with the first guest; every apply looks again).
        """
        from omerta.tunnel.firewall import enable_forwarding

        if self.bridge and Path(f"/proc/sys/net/ipv4/conf/{self.bridge}").exists():
            enable_forwarding(self.bridge)

    def _configure(self, wanted: dict, gone: list[Grant], endpoints: dict) -> None:
        device = self.device
        self._bridge_forwarding()
        for grant in gone:
            device.remove_peer(grant.consumer_key)
        for key, grant in wanted.items():
            device.set_peer(key, endpoints[key], [f"{grant.consumer_address}/32"])
        self.firewall.sync({(g.consumer_address, vm)
                            for g in wanted.values() for vm in g.vm_addresses})

    # state

    def state_of(self, consumer_key: bytes) -> str:
        if self.device is None:
            return "down: the provider's tunnel interface is not up"
        if consumer_key not in self.grants:
            return "no peer for this consumer"
        return "ready"

    def status(self) -> dict:
        return {
            "interface": self.interface,
            "address": f"{self.address}/{addresses.PREFIX}",
            "listen_port": None if self.device is None else self.device.listen_port,
            "public_key": self.key.public_text,
            "consumers": [{"peer_id": format_peer_id(g.consumer_id),
                           "public_key": encode_key(g.consumer_key),
                           "address": g.consumer_address,
                           "vms": list(g.vm_addresses)} for g in self.grants.values()],
        }
