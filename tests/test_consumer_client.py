"""
The consumer client (L{omerta.roles.consumer_client}) on the simulated
network: a program with only a MeshNetwork and a data directory chooses a
provider, asks for VMs, lists, shows and releases them; every outcome is
kept in consumer.json.  The providers are real L{ProviderService}s on the
in-memory L{FakeBackend}; time is the simulator's.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.trial import unittest

from omerta.addressing import BootstrapSpec, Endpoint
from omerta.mesh.network import MeshNetwork, NotJoined
from omerta.crypto.wireguard import load_or_create_key
from omerta.roles.consumer import ConsumerStore, ProviderScore
from omerta.roles.consumer_client import (ConsumerClient, ConsumerError, NoAnswer, NoRoom,
                                          NotAProvider, NothingAnswered, ProviderNotFound,
                                          Refused, Unreachable, VmRequest)
from omerta.roles.provider import ProviderService
from omerta.roles.vm import Quota
from omerta.storage import read_json
from omerta.wire.messages import Capability
from omerta.wire.vm import VmStatus
from tests.test_node import PORT, MeshFixture
from tests.test_provider import HOST, FakeBackend

NOW = 1_800_000_000.0


class ClientTests(unittest.TestCase):
    def setUp(self):
        self.fixture = MeshFixture(self)
        self.net = self.fixture.net
        self.fixture.start_relay()
        self.backends = {}
        self.providers = {}
        for ip, name in (("10.0.0.2", "provider-1"), ("10.0.0.3", "provider-2")):
            self.add_provider(ip, name)
        self.data_dir = os.path.abspath(self.mktemp())
        self.mesh = self.program_mesh(self.data_dir, "10.0.0.9")
        self.client = ConsumerClient(self.mesh, self.data_dir, now=lambda: NOW)
        self.assertTrue(self.net.run_until(
            lambda: {"provider-1", "provider-2"} <= {r.name for r in self.mesh.known_peers()}
            and all(r.resources.cpu_cores for r in self.mesh.known_peers()
                    if r.capabilities & Capability.PROVIDER), 20))

    def add_provider(self, ip, name, quota=Quota(max_vms=3, cpu_cores=4, memory_mb=4096,
                                                 disk_gb=50)):
        node = self.fixture.node(ip, name, capabilities=Capability.PROVIDER)
        backend = FakeBackend(quota)
        provider = ProviderService(node, backend, HOST, node.data_dir)
        provider.startService()
        self.addCleanup(lambda: provider.running and provider.stopService())
        self.backends[name], self.providers[name] = backend, provider
        return node

    def program_mesh(self, data_dir, ip, **options) -> MeshNetwork:
        """What a program does: a MeshNetwork from an invite, started."""
        options.setdefault("invites", [self.fixture.membership.invite])
        mesh = MeshNetwork(data_dir, port=PORT, interface=ip, nat_interval=0,
                           reactor=self.net.host(ip).reactor, **options)
        self.successResultOf(mesh.start())
        self.addCleanup(lambda: mesh.service.running and mesh.stop())
        return mesh

    def result(self, d, timeout=70):
        self.net.run_until(lambda: d.called, timeout)
        return self.successResultOf(d)

    def failure(self, d, *kinds, timeout=70):
        self.net.run_until(lambda: d.called, timeout)
        return self.failureResultOf(d, *kinds)

    def state(self) -> dict:
        return read_json(f"{self.data_dir}/consumer.json", dict)

    def test_request_by_name(self):
        """A VM requested by the provider's name is granted, kept with its key pair, and the outcome scored."""
        granted = self.result(self.client.request(VmRequest(vcpus=2, memory_mb=512, name="web"),
                                                  provider="provider-1"))
        vm = granted.vm
        self.assertEqual((vm.vcpus, vm.memory_mb, vm.name, vm.state), (2, 512, "web", "running"))
        self.assertEqual(vm.provider_name, "provider-1")
        self.assertEqual(vm.network, self.mesh.network_id())
        self.assertEqual(vm.provider_wg_key, self.providers["provider-1"].wireguard.public_text)
        self.assertEqual(granted.connection.kind, "direct")
        self.assertEqual(granted.provider.name, "provider-1")
        self.assertEqual(list(self.backends["provider-1"].vms), [vm.vm_id])
        stored = self.state()["vms"][vm.vm_id]
        self.assertNotIn("private", " ".join(stored))
        # the tunnel key for that provider is its own 0600 file, its public half sent
        key_file = Path(self.data_dir) / "tunnels" / f"{vm.provider}.key"
        self.assertEqual(stat.S_IMODE(key_file.stat().st_mode), 0o600)
        self.assertEqual(load_or_create_key(key_file).public_text, vm.wg_public_key)
        # no SSH key given: one was made for this VM, named after it
        self.assertEqual(Path(vm.ssh_key), Path(self.data_dir) / "ssh" / vm.vm_id)
        self.assertEqual(stat.S_IMODE(Path(vm.ssh_key).stat().st_mode), 0o600)
        self.assertEqual(self.client.held(), [vm])
        [score] = self.state()["providers"].values()
        self.assertEqual((score["successes"], score["failures"], score["last_outcome_at"]),
                         (1, 0, NOW))
        self.assertGreater(score["reputation"], 0.5)

    def test_find_ranks_by_kept_reputation(self):
        """find_provider picks the provider consumer.json scores best among those with room."""
        ids = {r.name: r.peer_id_text for r in self.mesh.known_peers()}
        with ConsumerStore(self.data_dir).update() as state:
            state.providers[ids["provider-1"]] = ProviderScore(reputation=0.2)
            state.providers[ids["provider-2"]] = ProviderScore(reputation=0.9)
        granted = self.result(self.client.request(VmRequest()))
        self.assertEqual(granted.vm.provider_name, "provider-2")
        with ConsumerStore(self.data_dir).update() as state:
            state.providers[ids["provider-1"]] = ProviderScore(reputation=0.95)
        found = self.result(self.client.find_provider(VmRequest(), timeout=10))
        self.assertEqual(found.name, "provider-1")

    def test_no_room(self):
        """A request no provider announces room for fails with NoRoom, listing the offers."""
        error = self.failure(self.client.request(VmRequest(memory_mb=1 << 20)), NoRoom).value
        self.assertIn("no online provider announces room for 1 cores, 1048576 MiB", str(error))
        self.assertIn("provider-1 (", str(error))
        self.assertEqual(self.backends["provider-1"].vms, {})

    def test_not_a_provider(self):
        """Asking the relay, or a name nobody has, fails saying so."""
        error = self.failure(self.client.provider("relay", timeout=10), NotAProvider).value
        self.assertIn("is not a provider", str(error))
        missing = self.failure(self.client.provider("provider-9", timeout=30),
                               ProviderNotFound).value
        self.assertEqual((missing.ref, missing.known), ("provider-9", 3))

    def test_refused_is_scored(self):
        """A refusal for capacity fails with Refused and counts against the provider."""
        error = self.failure(self.client.request(VmRequest(vcpus=8), provider="provider-1"),
                             Refused).value
        self.assertEqual(error.status, VmStatus.NO_CAPACITY)
        self.assertRegex(str(error), r"provider-1 \(\w+\) refused: no capacity: ")
        [score] = self.state()["providers"].values()
        self.assertEqual((score["successes"], score["failures"]), (0, 1))
        self.assertEqual(self.client.held(), [])

    def test_no_answer_is_scored(self):
        """A provider that stopped serving the vm channel gives NoAnswer, scored as a failure."""
        self.providers["provider-1"].stopService()
        self.failure(self.client.request(VmRequest(), provider="provider-1"), NoAnswer)
        [score] = self.state()["providers"].values()
        self.assertEqual(score["failures"], 1)

    def test_refresh_show_release(self):
        """refresh marks VMs running, gone or unknown; show asks the provider; release forgets."""
        first = self.result(self.client.request(VmRequest(), provider="provider-1")).vm
        second = self.result(self.client.request(VmRequest(), provider="provider-1")).vm
        other = self.result(self.client.request(VmRequest(), provider="provider-2")).vm
        del self.backends["provider-1"].vms[second.vm_id]  # lost at the provider
        self.providers["provider-2"].stopService()
        problems = self.result(self.client.refresh(timeout=30))
        self.assertIsNone(problems[first.provider])
        self.assertIsInstance(problems[other.provider], NoAnswer)
        states = {v.vm_id: v.state for v in self.client.held()}
        self.assertEqual(states, {first.vm_id: "running", second.vm_id: "gone",
                                  other.vm_id: "unknown"})

        shown, connection = self.result(self.client.show(first.vm_id[:6], timeout=10))
        self.assertEqual((shown.vm_id, shown.state), (first.vm_id, "running"))
        self.assertEqual(connection.kind, "direct")

        released = self.result(self.client.release(first.vm_id, timeout=10))
        self.assertEqual(released.vm_id, first.vm_id)
        self.assertEqual(self.backends["provider-1"].vms, {})
        report = self.result(self.client.release_all(timeout=30))
        self.assertEqual(report.released, [second.vm_id])  # gone there: forgotten here
        self.assertEqual([(held.vm_id, type(error)) for held, error in report.failed],
                         [(other.vm_id, NoAnswer)])
        self.assertEqual(report.elsewhere, [])
        self.assertEqual([v.vm_id for v in self.client.held()], [other.vm_id])

    def test_release_elsewhere(self):
        """VMs held in another network are not asked about; release of one says where it is."""
        vm = self.result(self.client.request(VmRequest(), provider="provider-1")).vm
        with ConsumerStore(self.data_dir).update() as state:
            state.vms[vm.vm_id].network = "00" * 8
        report = self.result(self.client.release_all(timeout=10))
        self.assertEqual((report.released, report.elsewhere), ([], [vm.vm_id]))
        error = self.failure(self.client.release(vm.vm_id, timeout=10), ConsumerError).value
        self.assertIn(f"held in network {'00' * 8}", str(error))
        self.assertEqual(list(self.backends["provider-1"].vms), [vm.vm_id])

    def test_unreachable(self):
        """A provider that is gone cannot be connected to: Unreachable, saying what was tried."""
        record = self.result(self.client.provider("provider-2", timeout=10))
        self.result(self.providers["provider-2"].mesh.stop())
        self.net.run(MeshNetwork.FRESH_CONTACT + 1)
        error = self.failure(self.client.connect(record, timeout=3), Unreachable).value
        self.assertIn("direct 10.0.0.3:7400 unanswered", error.attempts)

    def test_provider_at_endpoint(self):
        """provider_at finds whoever answers at a bootstrap endpoint, with no discovery."""
        data_dir = os.path.abspath(self.mktemp())
        endpoint = Endpoint("10.0.0.2", PORT)
        mesh = self.program_mesh(data_dir, "10.0.0.10", bootstrap=[BootstrapSpec(endpoint)])
        client = ConsumerClient(mesh, data_dir)
        record = self.result(client.provider_at(endpoint, timeout=10))
        self.assertEqual(record.name, "provider-1")
        nobody = Endpoint("10.0.0.77", PORT)
        self.failureResultOf(client.provider_at(nobody, timeout=1), ValueError)

    def test_nothing_answers_at_endpoint(self):
        """An endpoint where nothing answers fails with NothingAnswered at the timeout."""
        data_dir = os.path.abspath(self.mktemp())
        endpoint = Endpoint("10.0.0.77", PORT)
        mesh = self.program_mesh(data_dir, "10.0.0.11", bootstrap=[BootstrapSpec(endpoint)])
        error = self.failure(ConsumerClient(mesh, data_dir).provider_at(endpoint, timeout=5),
                             NothingAnswered).value
        self.assertEqual(error.endpoint, endpoint)

    def test_not_joined(self):
        """Without any bootstrap peer answering, the client fails with NotJoined at the timeout."""
        data_dir = os.path.abspath(self.mktemp())
        self.fixture.relay.stopService()
        lonely = self.program_mesh(data_dir, "10.0.0.12")
        started = self.net.clock.seconds()
        self.failure(ConsumerClient(lonely, data_dir).find_provider(VmRequest(), timeout=4),
                     NotJoined)
        self.assertAlmostEqual(self.net.clock.seconds() - started, 4, delta=0.1)

    def test_local_methods_need_no_mesh(self):
        """held, held_vm and scores read consumer.json without a mesh."""
        vm = self.result(self.client.request(VmRequest(), provider="provider-1")).vm
        offline = ConsumerClient(None, self.data_dir)
        self.assertEqual(offline.held_vm(vm.vm_id[:5]).vm_id, vm.vm_id)
        self.assertEqual(list(offline.scores()), [vm.provider])
        self.assertRaises(LookupError, offline.held_vm, "ffff")
