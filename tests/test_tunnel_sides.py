"""
The two ends of a VM's tunnel with the system left out: the provider's
declared grants (L{ProviderTunnels.apply}) and the consumer's interfaces per
provider (L{ConsumerTunnels}), on fake WireGuard devices, a fake firewall
and a fake tunnel plane; the work a worker thread would do runs inline.
tests/test_wgdevice.py and tests/test_tunnel_firewall.py test the real
devices and rules, tests/test_tunnel_e2e.py the whole.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.crypto.wireguard import WireGuardKey
from omerta.tunnel import addresses
from omerta.tunnel.consumer_side import ConsumerTunnels, TunnelError
from omerta.tunnel.provider_side import Grant, ProviderTunnels
from omerta.wire.tunnel import TO_CONSUMER, TO_PROVIDER

NETWORK = b"n" * 8


def inline(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


class FakeDevice:
    made: list[FakeDevice] = []

    def __init__(self, name, private_key, *, mtu, state_dir):
        self.name, self.mtu = name, mtu
        self.listen_port = None
        self.addresses: list[str] = []
        self.peers_set: dict[bytes, tuple] = {}
        self.routes: set[str] = set()
        self.handshake: float | None = None
        self.is_up = False
        FakeDevice.made.append(self)

    def up(self, addresses):
        self.addresses, self.listen_port, self.is_up = list(addresses), 51000, True

    def set_peer(self, key, endpoint, allowed, keepalive=None):
        self.peers_set[key] = (endpoint, tuple(allowed), keepalive)

    def remove_peer(self, key):
        self.peers_set.pop(key, None)

    def add_route(self, prefix):
        self.routes.add(prefix)

    def remove_route(self, prefix):
        self.routes.discard(prefix)

    def peers(self):
        return {k: SimpleNamespace(last_handshake=self.handshake) for k in self.peers_set}

    def down(self):
        self.is_up = False


class FakeFirewall:
    def __init__(self, table, interface, address):
        self.table, self.interface, self.address = table, interface, address
        self.installed = False
        self.pairs: set = set()

    def install(self):
        self.installed = True

    def sync(self, pairs):
        self.pairs = set(pairs)

    def remove(self):
        self.installed = False


class FakePlane:
    def __init__(self):
        self.endpoints: dict[tuple, SimpleNamespace] = {}
        self.next_port = 40000

    def open(self, network_id, peer_id, kind, wg_port):
        key = (network_id, peer_id, kind)
        if key not in self.endpoints:
            self.next_port += 1
            self.endpoints[key] = SimpleNamespace(address=("127.0.0.1", self.next_port),
                                                  wg_port=wg_port)
        self.endpoints[key].wg_port = wg_port
        return self.endpoints[key]

    def close(self, network_id, peer_id, kind):
        self.endpoints.pop((network_id, peer_id, kind), None)

    def get(self, network_id, peer_id, kind):
        return self.endpoints.get((network_id, peer_id, kind))


def fake_node(peer_id: bytes, clock=None):
    return SimpleNamespace(peer_id=peer_id, tunnels=FakePlane(), clock=clock or Clock(),
                           overlays={})


class ProviderTunnelsTests(unittest.TestCase):
    def setUp(self):
        self.node = fake_node(os.urandom(16))
        self.tunnels = ProviderTunnels(self.node, WireGuardKey.generate(), self.mktemp(),
                                       "omerta-br0", run=inline, device_factory=FakeDevice,
                                       firewall_factory=FakeFirewall)
        self.patch(__import__("omerta.tunnel.wgdevice", fromlist=["reap_stale"]),
                   "reap_stale", lambda *a, **k: [])
        self.patch(__import__("omerta.tunnel.firewall", fromlist=["enable_forwarding"]),
                   "enable_forwarding", lambda name: None)
        self.successResultOf(self.tunnels.start())
        self.device = self.tunnels.device

    def grant(self, consumer: bytes, key: bytes, address: str, *vms: str) -> Grant:
        return Grant(NETWORK, consumer, key, address, tuple(vms))

    def test_up_on_its_own_subnet(self):
        subnet = addresses.provider_subnet(self.node.peer_id)
        self.assertEqual(self.device.addresses, [f"{subnet[1]}/24"])
        self.assertEqual(self.device.mtu, 1360)
        self.assertTrue(self.tunnels.firewall.installed)
        self.assertTrue(self.device.name.startswith("omp"))

    def test_apply_declares_peers_endpoints_and_pairs(self):
        alice, bob = os.urandom(16), os.urandom(16)
        ka, kb = os.urandom(32), os.urandom(32)
        self.successResultOf(self.tunnels.apply([
            self.grant(alice, ka, "100.64.7.2", "10.237.0.2", "10.237.0.3"),
            self.grant(bob, kb, "100.64.7.3", "10.237.0.4")]))
        endpoint_a = self.node.tunnels.get(NETWORK, alice, TO_PROVIDER)
        self.assertEqual(endpoint_a.wg_port, self.device.listen_port)
        self.assertEqual(self.device.peers_set[ka], (endpoint_a.address, ("100.64.7.2/32",), None))
        self.assertEqual(self.tunnels.firewall.pairs,
                         {("100.64.7.2", "10.237.0.2"), ("100.64.7.2", "10.237.0.3"),
                          ("100.64.7.3", "10.237.0.4")})
        # bob releases everything: his peer, endpoint and pairs go, alice's stay
        self.successResultOf(self.tunnels.apply([
            self.grant(alice, ka, "100.64.7.2", "10.237.0.2", "10.237.0.3")]))
        self.assertEqual(set(self.device.peers_set), {ka})
        self.assertIsNone(self.node.tunnels.get(NETWORK, bob, TO_PROVIDER))
        self.assertEqual(self.tunnels.firewall.pairs,
                         {("100.64.7.2", "10.237.0.2"), ("100.64.7.2", "10.237.0.3")})
        self.assertEqual(self.tunnels.state_of(ka), "ready")
        self.assertEqual(self.tunnels.state_of(kb), "no peer for this consumer")

    def test_a_new_key_replaces_the_old_peer(self):
        alice = os.urandom(16)
        old, new = os.urandom(32), os.urandom(32)
        self.successResultOf(self.tunnels.apply([self.grant(alice, old, "100.64.7.2")]))
        self.successResultOf(self.tunnels.apply([self.grant(alice, new, "100.64.7.2")]))
        self.assertEqual(set(self.device.peers_set), {new})
        self.assertIsNotNone(self.node.tunnels.get(NETWORK, alice, TO_PROVIDER))

    def test_stopped_before_it_started_leaves_nothing(self):
        """A provider stopped while its tunnels are not up yet sets nothing up after."""
        tunnels = ProviderTunnels(self.node, WireGuardKey.generate(), self.mktemp(), None,
                                  run=inline, device_factory=FakeDevice,
                                  firewall_factory=FakeFirewall)
        self.successResultOf(tunnels.stop())
        self.successResultOf(tunnels.start())
        self.assertFalse(tunnels.running)
        self.assertFalse(tunnels.firewall.installed)

    def test_stop_takes_everything_down(self):
        alice = os.urandom(16)
        self.successResultOf(self.tunnels.apply([self.grant(alice, os.urandom(32),
                                                            "100.64.7.2")]))
        self.successResultOf(self.tunnels.stop())
        self.assertFalse(self.device.is_up)
        self.assertFalse(self.tunnels.firewall.installed)
        self.assertEqual(self.node.tunnels.endpoints, {})
        self.assertFalse(self.tunnels.running)


class ConsumerTunnelsTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.node = fake_node(os.urandom(16), self.clock)
        self.data_dir = self.mktemp()
        self.tunnels = ConsumerTunnels(self.node, self.data_dir, run=inline,
                                       device_factory=FakeDevice)
        self.patch(ConsumerTunnels, "check", staticmethod(lambda: None))
        self.provider = os.urandom(16)
        self.provider_key = os.urandom(32)

    def ensure(self, vms, provider=None, address="100.64.7.2", provider_address="100.64.7.1",
               key=None):
        return self.tunnels.ensure(NETWORK, provider or self.provider,
                                   provider_key=key or self.provider_key, address=address,
                                   provider_address=provider_address, prefix=24, vms=vms)

    def test_one_interface_per_provider(self):
        tunnel = self.successResultOf(self.ensure({"vm1": "10.237.0.2"}))
        device = tunnel.device
        self.assertTrue(device.name.startswith("omc"))
        self.assertEqual(device.addresses, ["100.64.7.2/24"])
        endpoint = self.node.tunnels.get(NETWORK, self.provider, TO_CONSUMER)
        self.assertEqual(endpoint.wg_port, device.listen_port)
        self.assertEqual(device.peers_set[self.provider_key],
                         (endpoint.address, ("100.64.7.1/32", "10.237.0.2/32"), 25))
        self.assertEqual(device.routes, {"10.237.0.2/32"})
        # a second VM from the same provider: same interface, one more route
        again = self.successResultOf(self.ensure({"vm2": "10.237.0.3"}))
        self.assertIs(again.device, device)
        self.assertEqual(device.routes, {"10.237.0.2/32", "10.237.0.3/32"})
        self.assertEqual(device.peers_set[self.provider_key][1],
                         ("100.64.7.1/32", "10.237.0.2/32", "10.237.0.3/32"))
        key_file = os.path.join(self.data_dir, "tunnels", f"{self.provider.hex()}.key")
        self.assertEqual(os.stat(key_file).st_mode & 0o777, 0o600)

    def test_state(self):
        self.successResultOf(self.ensure({"vm1": None}))
        self.assertEqual(self.tunnels.state(self.provider)["state"], "handshaking")
        self.tunnels.tunnels[self.provider].device.handshake = self.clock.seconds() - 5
        state = self.tunnels.state(self.provider)
        self.assertEqual((state["state"], state["address"], state["provider_address"]),
                         ("up", "100.64.7.2/24", "100.64.7.1"))
        self.tunnels.tunnels[self.provider].device.handshake = self.clock.seconds() - 600
        self.assertEqual(self.tunnels.state(self.provider)["state"], "handshaking")
        self.assertIsNone(self.tunnels.state(os.urandom(16)))

    def test_last_vm_released_takes_the_tunnel_down(self):
        tunnel = self.successResultOf(self.ensure({"vm1": "10.237.0.2", "vm2": "10.237.0.3"}))
        device = tunnel.device
        self.successResultOf(self.tunnels.forget(self.provider, "vm1"))
        self.assertTrue(device.is_up)
        self.assertEqual(device.routes, {"10.237.0.3/32"})
        self.assertEqual(device.peers_set[self.provider_key][1],
                         ("100.64.7.1/32", "10.237.0.3/32"))
        self.successResultOf(self.tunnels.forget(self.provider, "vm2"))
        self.assertFalse(device.is_up)
        self.assertIsNone(self.node.tunnels.get(NETWORK, self.provider, TO_CONSUMER))
        self.assertEqual(self.tunnels.tunnels, {})

    def test_overlapping_providers_refused(self):
        self.successResultOf(self.ensure({"vm1": None}))
        failure = self.failureResultOf(self.ensure({"vm9": None}, provider=os.urandom(16),
                                                   address="100.64.7.9"), TunnelError)
        self.assertIn("overlaps", str(failure.value))

    def test_provider_reinstalled_starts_afresh(self):
        first = self.successResultOf(self.ensure({"vm1": None})).device
        second = self.successResultOf(self.ensure({"vm2": None}, key=os.urandom(32))).device
        self.assertIsNot(first, second)
        self.assertFalse(first.is_up)
        self.assertTrue(second.is_up)

    def test_bad_addresses_refused(self):
        self.failureResultOf(self.ensure({"vm1": "not-an-address"}), TunnelError)
        self.failureResultOf(self.ensure({"vm1": None}, address="::1"), TunnelError)

    def test_stop(self):
        device = self.successResultOf(self.ensure({"vm1": None})).device
        self.successResultOf(self.tunnels.stop())
        self.assertFalse(device.is_up)
        self.assertEqual(self.node.tunnels.endpoints, {})


class RestoreTests(unittest.TestCase):
    def test_held_vms_get_their_tunnels_back_at_start(self):
        """
        A node that starts again brings up the tunnels of the VMs its data
        directory holds (those of its networks, with tunnel addresses), one
        interface per provider.
        """
        from omerta.roles.consumer import ConsumerStore, HeldVM
        from omerta.tunnel.consumer_side import ConsumerTunnelService
        from omerta.tunnel import wgdevice

        data_dir = self.mktemp()
        provider, other_network = os.urandom(16), b"o" * 8
        key = WireGuardKey.generate()

        def vm(vm_id, network, **tunnel):
            return HeldVM(vm_id=vm_id, provider=provider.hex(), provider_name="p",
                          network=network.hex(), created_at=1.0, vcpus=1, memory_mb=256,
                          disk_gb=1, image="debian-busybox", name="", state="running",
                          address=tunnel.pop("address", None), wg_public_key="",
                          provider_wg_key=key.public_text, path_kind="direct", **tunnel)

        with ConsumerStore(data_dir).update() as state:
            tunnel = dict(tunnel_address="100.64.7.2", provider_tunnel_address="100.64.7.1",
                          tunnel_prefix=24)
            state.vms["a" * 16] = vm("a" * 16, NETWORK, address="10.237.0.2", **tunnel)
            state.vms["b" * 16] = vm("b" * 16, NETWORK, address="10.237.0.3", **tunnel)
            state.vms["c" * 16] = vm("c" * 16, other_network, **tunnel)  # not this node's
            state.vms["d" * 16] = vm("d" * 16, NETWORK)  # a provider without tunnels
        node = fake_node(os.urandom(16))
        node.overlays = {NETWORK: object()}
        node_service = SimpleNamespace(node=node, data_dir=data_dir)
        self.patch(ConsumerTunnels, "check", staticmethod(lambda: None))
        self.patch(wgdevice, "reap_stale", lambda *a, **k: [])
        FakeDevice.made = []
        service = ConsumerTunnelService(node_service, run=inline, device_factory=FakeDevice)
        service.startService()
        self.successResultOf(service.restored)
        self.assertIs(node_service.consumer_tunnels, service.tunnels)
        [device] = FakeDevice.made
        self.assertEqual(device.addresses, ["100.64.7.2/24"])
        self.assertEqual(device.routes, {"10.237.0.2/32", "10.237.0.3/32"})
        self.assertEqual(set(service.tunnels.tunnels[provider].vms), {"a" * 16, "b" * 16})
        self.successResultOf(service.stopService())
        self.assertFalse(device.is_up)
