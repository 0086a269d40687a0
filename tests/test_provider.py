"""
The provider protocol end to end on the simulated network: a consumer node
asks a provider node (L{omerta.roles.provider.ProviderService}) for VMs over
the mesh's request/response layer.  The VM backend is L{FakeBackend}, an
in-memory L{IVMBackend} with the real backend's quota rule, so these tests
run on the simulator's clock; the libvirt backend itself is tested in
tests/test_vm_backend.py (test driver) and tests/test_vm_qemu.py (real
guests).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import replace

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from omerta.mesh.messaging import RemoteError
from omerta.mesh.network import MeshNetwork
from omerta.roles.provider import ProviderService
from omerta.roles.resources import HostResources
from omerta.roles.vm import (BadSpec, IVMBackend, Quota, QuotaExceeded, Resources, UnknownVM,
                             VMError, VMInfo, VMSpec)
from omerta.storage import read_json
from omerta.wire.messages import Capability
from omerta.wire.vm import CHANNEL, VmOp, VmStatus, build_request, parse_reply
from omerta.tunnel.addresses import provider_subnet
from tests.test_node import MeshFixture

HOST = HostResources(cpu_cores=4, memory_mb=8192, disk_gb=100, gpus=())


@implementer(IVMBackend)
class FakeBackend:
    """
    VMs in a dict.  C{fail_start} makes the next start fail; C{whenReady}
    is a Deferred the test may hold back.
    """

    def __init__(self, quota: Quota = Quota(), ready: bool = True):
        self.quota = quota
        self.vms: dict[str, VMInfo] = {}
        self.fail_start = False
        self.whenReady = defer.succeed(None) if ready else defer.Deferred()
        self.uri = "fake:///"

    def committed(self) -> Resources:
        vms = list(self.vms.values())
        return Resources(len(vms), sum(v.vcpus for v in vms), sum(v.memory_mb for v in vms),
                         sum(v.disk_gb for v in vms))

    def create(self, spec: VMSpec):
        try:
            spec.validate()
        except BadSpec:
            return defer.fail()
        q, c = self.quota, self.committed()
        if q.max_vms is not None and c.vms + 1 > q.max_vms:
            return defer.fail(QuotaExceeded("max_vms", f"{q.max_vms} VMs held"))
        if q.cpu_cores is not None and c.cpu_cores + spec.vcpus > q.cpu_cores:
            return defer.fail(QuotaExceeded("cpu", f"asked for {spec.vcpus} cpu cores,"
                                                   f" {q.cpu_cores - c.cpu_cores} free"))
        vm_id = secrets.token_hex(8)
        self.vms[vm_id] = VMInfo(vm_id, spec.name, "shutoff", spec.vcpus, spec.memory_mb,
                                 spec.disk_gb, spec.owner, 1000.0)
        return defer.succeed(self.vms[vm_id])

    def start(self, vm_id):
        if self.fail_start:
            return defer.fail(VMError("qemu exploded"))
        self.vms[vm_id] = replace(self._get(vm_id), state="running", address="10.237.0.2")
        return defer.succeed(self.vms[vm_id])

    def stop(self, vm_id):
        self.vms[vm_id] = replace(self._get(vm_id), state="shutoff")
        return defer.succeed(self.vms[vm_id])

    def destroy(self, vm_id):
        self._get(vm_id)
        del self.vms[vm_id]
        return defer.succeed(None)

    def list(self):
        return defer.succeed(list(self.vms.values()))

    def info(self, vm_id):
        try:
            return defer.succeed(self._get(vm_id))
        except UnknownVM:
            return defer.fail()

    def wait_ready(self, vm_id, timeout):
        try:
            info = self._get(vm_id)
        except UnknownVM:
            return defer.fail()
        self.vms[vm_id] = replace(info, host_key="ssh-ed25519 AAAAguest")
        return defer.succeed(self.vms[vm_id])

    def _get(self, vm_id) -> VMInfo:
        if vm_id not in self.vms:
            raise UnknownVM(f"no VM {vm_id!r} on this provider")
        return self.vms[vm_id]


class FakeTunnels:
    """What the provider declares to its tunnels (L{ProviderTunnels}), recorded."""

    def __init__(self):
        self.address = "100.64.9.1"
        self.running = False
        self.grants: list = []
        self.applied = 0

    def start(self):
        self.running = True
        return defer.succeed(None)

    def stop(self):
        self.running = False
        return defer.succeed(None)

    def apply(self, grants):
        self.grants = list(grants)
        self.applied += 1
        return defer.succeed(None)

    def state_of(self, key):
        return "ready" if any(g.consumer_key == key for g in self.grants) else "no peer"

    def status(self):
        return {"interface": "ompfake"}


class ProviderTests(unittest.TestCase):
    def setUp(self):
        self.mesh = MeshFixture(self)
        self.mesh.start_relay()
        self.provider_node = self.mesh.node("10.0.0.2", "provider",
                                            capabilities=Capability.PROVIDER)
        self.backend = FakeBackend(Quota(max_vms=3, cpu_cores=HOST.cpu_cores,
                                         memory_mb=4096, disk_gb=50))
        self.data_dir = self.provider_node.data_dir
        self.provider = self.start_provider(self.backend)
        self.alice = self.mesh.node("10.0.0.3", "alice")
        self.bob = self.mesh.node("10.0.0.4", "bob")
        self.assertTrue(self.mesh.net.run_until(
            lambda: all(self.knows(c, self.provider_node) for c in (self.alice, self.bob)), 10))

    def start_provider(self, backend, **options) -> ProviderService:
        self.tunnels = FakeTunnels()
        options.setdefault("tunnels", lambda key: self.tunnels)
        provider = ProviderService(self.provider_node, backend, HOST, self.data_dir, **options)
        provider.startService()
        self.addCleanup(lambda: provider.running and provider.stopService())
        return provider

    @staticmethod
    def knows(service, other) -> bool:
        return service.node.overlay().registry.get(other.node.peer_id) is not None

    def ask(self, consumer, op: VmOp, **body):
        return self.ask_raw(consumer, build_request(op, **body))

    def ask_raw(self, consumer, payload: bytes):
        results = []
        consumer.node.overlay().messaging.request(
            self.provider_node.node.peer_id, CHANNEL, payload, timeout=10).addBoth(results.append)
        self.mesh.net.run_until(lambda: bool(results), 12)
        self.assertTrue(results, "no reply")
        if not isinstance(results[0], bytes):
            results[0].raiseException()
        return parse_reply(results[0])

    def create(self, consumer, **overrides):
        body = dict(vcpus=1, memory_mb=256, disk_gb=1, image="debian-busybox", name="t",
                    wg_public_key=os.urandom(32))
        body.update(overrides)
        return self.ask(consumer, VmOp.CREATE, **body)

    def announced(self, consumer) -> dict:
        record = consumer.node.overlay().registry.get(self.provider_node.node.peer_id)
        return record.resources.as_dict()

    def test_backend_fake_is_an_ivmbackend(self):
        self.assertTrue(verifyObject(IVMBackend, self.backend))

    def test_lifecycle(self):
        """
        Create, list, status, release: the reply names the VM, the
        provider's WireGuard key and path; the free resources in the
        provider's announcement go down and back up.
        """
        before = self.announced(self.alice)
        self.assertEqual(before["cpu_cores"], 4)
        reply = self.create(self.alice, vcpus=2, memory_mb=1024, disk_gb=5)
        self.assertEqual(reply.status, VmStatus.OK, reply.detail)
        vm = reply.vms[0]
        self.assertEqual((vm.state, vm.vcpus, vm.memory_mb, vm.disk_gb), ("running", 2, 1024, 5))
        self.assertEqual(vm.address, "10.237.0.2")
        self.assertEqual(vm.wg_public_key, self.provider.wireguard.public)
        self.assertEqual(vm.path_kind, "direct")
        self.assertEqual(vm.host_key, "ssh-ed25519 AAAAguest")
        self.assertEqual((vm.provider_tunnel_address, vm.tunnel_prefix, vm.tunnel_state),
                         ("100.64.9.1", 24, "ready"))
        self.assertIn(ipaddress.ip_address(vm.tunnel_address),
                      provider_subnet(self.provider_node.node.peer_id))
        self.assertTrue(self.mesh.net.run_until(
            lambda: self.announced(self.alice)["cpu_cores"] == 2, 5),
            "the smaller free capacity was never announced")
        self.assertEqual(self.announced(self.alice)["memory_mb"], 4096 - 1024)

        listed = self.ask(self.alice, VmOp.LIST)
        self.assertEqual([v.vm_id for v in listed.vms], [vm.vm_id])
        status = self.ask(self.alice, VmOp.STATUS, vm_id=vm.vm_id)
        self.assertEqual(status.vms[0].state, "running")

        released = self.ask(self.alice, VmOp.RELEASE, vm_id=vm.vm_id)
        self.assertEqual((released.status, released.vms[0].state), (VmStatus.OK, "released"))
        self.assertEqual(self.backend.vms, {})
        self.assertEqual(self.ask(self.alice, VmOp.LIST).vms, [])
        self.assertTrue(self.mesh.net.run_until(
            lambda: self.announced(self.alice) == before, 5))
        gone = self.ask(self.alice, VmOp.STATUS, vm_id=vm.vm_id)
        self.assertEqual(gone.status, VmStatus.UNKNOWN_VM)

    def test_consumer_key_kept_until_release(self):
        key = os.urandom(32)
        vm = self.create(self.alice, wg_public_key=key).vms[0]
        tunnels = read_json(self.data_dir / "vm-tunnels.json", dict)["tunnels"]
        self.assertEqual(set(tunnels), {vm.vm_id.hex()})
        self.assertEqual(tunnels[vm.vm_id.hex()]["owner"], self.alice.node.peer_id.hex())
        self.ask(self.alice, VmOp.RELEASE, vm_id=vm.vm_id)
        self.assertEqual(read_json(self.data_dir / "vm-tunnels.json", dict)["tunnels"], {})

    def test_tunnel_grants_follow_the_vms(self):
        """
        Each consumer is one grant (its key, one tunnel address, its VMs);
        a release takes the VM out, the last one the whole grant.
        """
        alice_key, bob_key = os.urandom(32), os.urandom(32)
        first = self.create(self.alice, wg_public_key=alice_key).vms[0]
        self.create(self.alice, wg_public_key=alice_key)
        bobs = self.create(self.bob, wg_public_key=bob_key).vms[0]
        grants = {g.consumer_key: g for g in self.tunnels.grants}
        self.assertEqual(set(grants), {alice_key, bob_key})
        alice, bob = grants[alice_key], grants[bob_key]
        self.assertEqual(alice.consumer_id, self.alice.node.peer_id)
        self.assertEqual(alice.vm_addresses, ("10.237.0.2", "10.237.0.2"))
        self.assertEqual(alice.consumer_address, first.tunnel_address)
        self.assertNotEqual(alice.consumer_address, bob.consumer_address)
        self.assertEqual(bob.consumer_address, bobs.tunnel_address)
        self.ask(self.bob, VmOp.RELEASE, vm_id=bobs.vm_id)
        self.assertEqual([g.consumer_key for g in self.tunnels.grants], [alice_key])

    def test_concurrent_consumers_get_different_tunnel_addresses(self):
        """Two consumers' creates in flight at once never share a tunnel address."""
        slow = defer.Deferred()
        create = self.backend.create
        self.backend.create = lambda spec: slow.addCallback(lambda _: create(spec))
        replies = []
        for consumer in (self.alice, self.bob):
            payload = build_request(VmOp.CREATE, vcpus=1, memory_mb=256, disk_gb=1,
                                    image="debian-busybox", name="", wg_public_key=os.urandom(32))
            consumer.node.overlay().messaging.request(
                self.provider_node.node.peer_id, CHANNEL, payload, timeout=10
            ).addCallback(lambda answer: replies.append(parse_reply(answer)))
        self.mesh.net.run(1)
        self.backend.create = create
        slow.callback(None)
        self.mesh.net.run_until(lambda: len(replies) == 2, 5)
        self.assertEqual([r.status for r in replies], [VmStatus.OK, VmStatus.OK])
        addresses = {r.vms[0].tunnel_address for r in replies}
        self.assertEqual(len(addresses), 2, addresses)
        self.assertEqual(len({g.consumer_address for g in self.tunnels.grants}), 2)

    def test_tunnels_rebuilt_at_restart(self):
        """A restarted provider declares the grants its records hold, before serving."""
        key = os.urandom(32)
        vm = self.create(self.alice, wg_public_key=key).vms[0]
        self.provider.stopService()
        self.provider = self.start_provider(self.backend)
        self.mesh.net.run(0.1)
        self.assertEqual([(g.consumer_key, g.consumer_address) for g in self.tunnels.grants],
                         [(key, vm.tunnel_address)])

    def test_without_tunnels_the_record_says_so(self):
        self.provider.stopService()
        self.provider = self.start_provider(self.backend, tunnels=None)
        vm = self.create(self.alice).vms[0]
        self.assertEqual((vm.tunnel_address, vm.provider_tunnel_address), ("", ""))
        self.assertIn("without tunnels", vm.tunnel_state)

    def test_only_the_owner(self):
        """Another consumer can neither see, ask about nor release a VM."""
        vm = self.create(self.alice).vms[0]
        self.assertEqual(self.ask(self.bob, VmOp.LIST).vms, [])
        status = self.ask(self.bob, VmOp.STATUS, vm_id=vm.vm_id)
        self.assertEqual(status.status, VmStatus.NOT_YOURS)
        self.assertEqual(status.vms, [])
        release = self.ask(self.bob, VmOp.RELEASE, vm_id=vm.vm_id)
        self.assertEqual(release.status, VmStatus.NOT_YOURS)
        self.assertIn(vm.vm_id.hex(), self.backend.vms)

    def test_quota_refused(self):
        reply = self.create(self.alice, vcpus=5)
        self.assertEqual(reply.status, VmStatus.NO_CAPACITY)
        self.assertIn("cpu cores", reply.detail)
        for _ in range(3):
            self.assertEqual(self.create(self.bob).status, VmStatus.OK)
        full = self.create(self.alice)
        self.assertEqual(full.status, VmStatus.NO_CAPACITY)
        self.assertEqual(self.provider_node.metrics.get(
            "vm_requests", op="create", status="no_capacity"), 2)

    def test_running_jobs_leave_less_room_for_vms(self):
        """What running compute jobs hold is not free for VMs either."""
        from types import SimpleNamespace

        from omerta.roles.vmtypes import Resources

        self.provider.jobs = SimpleNamespace(committed=lambda: Resources(cpu_cores=3,
                                                                         memory_mb=512))
        reply = self.create(self.alice, vcpus=2)
        self.assertEqual(reply.status, VmStatus.NO_CAPACITY)
        self.assertIn("while running jobs hold 3 cores", reply.detail)
        self.assertEqual(self.create(self.alice, vcpus=1).status, VmStatus.OK)

    def test_per_consumer_cap(self):
        self.provider.max_per_consumer = 2
        self.assertEqual(self.create(self.alice).status, VmStatus.OK)
        self.assertEqual(self.create(self.alice).status, VmStatus.OK)
        third = self.create(self.alice)
        self.assertEqual(third.status, VmStatus.NO_CAPACITY)
        self.assertIn("release one first", third.detail)
        self.assertEqual(self.create(self.bob).status, VmStatus.OK)

    def test_per_consumer_cap_holds_for_concurrent_requests(self):
        """Requests in flight at once count against the cap while the backend works."""
        self.provider.max_per_consumer = 1
        slow = defer.Deferred()
        create = self.backend.create
        self.backend.create = lambda spec: slow.addCallback(lambda _: create(spec))
        payload = build_request(VmOp.CREATE, vcpus=1, memory_mb=256, disk_gb=1,
                                image="debian-busybox", name="", wg_public_key=bytes(32))
        replies = []
        for _ in range(2):
            self.alice.node.overlay().messaging.request(
                self.provider_node.node.peer_id, CHANNEL, payload, timeout=10
            ).addCallback(lambda answer: replies.append(parse_reply(answer)))
        self.mesh.net.run_until(lambda: len(replies) == 1, 5)
        slow.callback(None)
        self.mesh.net.run_until(lambda: len(replies) == 2, 5)
        self.assertEqual(sorted(r.status for r in replies), [VmStatus.OK, VmStatus.NO_CAPACITY])
        self.assertEqual(len(self.backend.vms), 1)

    def test_bad_requests(self):
        garbage = self.ask_raw(self.alice, b"\x01\x09junk")
        self.assertEqual(garbage.status, VmStatus.BAD_REQUEST)
        self.assertIn("not a VM request", garbage.detail)
        bad_image = self.create(self.alice, image="../etc")
        self.assertEqual(bad_image.status, VmStatus.BAD_REQUEST)
        no_memory = self.create(self.alice, memory_mb=1)
        self.assertEqual(no_memory.status, VmStatus.BAD_REQUEST)
        unknown = self.ask(self.alice, VmOp.RELEASE, vm_id=os.urandom(8))
        self.assertEqual(unknown.status, VmStatus.UNKNOWN_VM)
        self.assertEqual(self.backend.vms, {})

    def test_failed_start_leaves_nothing(self):
        self.backend.fail_start = True
        reply = self.create(self.alice)
        self.assertEqual(reply.status, VmStatus.FAILED)
        self.assertIn("qemu exploded", reply.detail)
        self.assertEqual(self.backend.vms, {})
        self.assertEqual(read_json(self.data_dir / "vm-tunnels.json", dict)["tunnels"], {})

    def test_not_ready(self):
        """Until the backend has reconciled, requests are refused, not queued forever."""
        self.provider.stopService()
        slow = FakeBackend(ready=False)
        self.provider = self.start_provider(slow)
        self.assertEqual(self.create(self.alice).status, VmStatus.UNAVAILABLE)
        slow.whenReady.callback(None)
        self.assertEqual(self.create(self.alice).status, VmStatus.OK)

    def test_restart_forgets_keys_of_vms_gone(self):
        """
        After a restart the tunnel keys of VMs the backend reconciled away
        are dropped; the others stay, with their owners.
        """
        kept = self.create(self.alice).vms[0].vm_id.hex()
        lost = self.create(self.bob).vms[0].vm_id.hex()
        self.provider.stopService()
        del self.backend.vms[lost]  # e.g. its domain vanished while we were down
        self.provider = self.start_provider(self.backend)
        self.mesh.net.run(0.1)
        tunnels = read_json(self.data_dir / "vm-tunnels.json", dict)["tunnels"]
        self.assertEqual(set(tunnels), {kept})
        self.assertEqual(self.ask(self.alice, VmOp.STATUS, vm_id=bytes.fromhex(kept)).status,
                         VmStatus.OK)

    def test_on_the_mesh_api(self):
        """A provider built on a MeshNetwork serves the vm channel; stopped, it serves it no more."""
        self.provider.stopService()
        self.provider = ProviderService(MeshNetwork(service=self.provider_node), self.backend,
                                        HOST, self.data_dir)
        self.provider.startService()
        self.addCleanup(lambda: self.provider.running and self.provider.stopService())
        self.assertEqual(self.create(self.alice).status, VmStatus.OK)
        self.provider.stopService()
        self.assertRaises(RemoteError, self.create, self.alice)
