"""
The one node builder: what it wires, and the bootstrap retries on a Clock.
"""

from __future__ import annotations

from twisted.trial import unittest

from omerta.addressing import parse_bootstrap
from omerta.crypto.identity import Identity
from omerta.crypto.network import NetworkKey
from omerta.mesh.builder import build_node
from omerta.mesh.node import MeshConfig
from omerta.testing.udp import MemoryUDPReactor

KEY = NetworkKey(bytes(range(32)))


class BuilderTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryUDPReactor()
        self.relay_id = Identity.generate().peer_id_text

    def build(self, **options):
        return build_node(Identity.generate(), [KEY], reactor=self.reactor,
                          interface="127.0.0.1", **options)

    def test_wiring(self):
        built = self.build(port=7400, relay=True, name="r")
        self.assertIs(built.protocol.handler, built.node)
        self.assertIs(built.protocol.relay, built.node.relay)
        self.assertIsNotNone(built.node.relay)
        self.assertEqual(built.node.local_port, 7400)
        self.assertEqual(set(built.keys), {KEY.network_id})
        self.assertIsNone(self.build().node.relay)

    def test_bootstrap_addresses(self):
        """IP bootstraps are ready to contact; host names wait for the caller."""
        built = self.build(bootstrap=[
            parse_bootstrap(f"{self.relay_id}@127.0.0.2:7400"),
            parse_bootstrap(f"{self.relay_id}@relay.example:7400"),
        ])
        self.assertEqual([b.address for b in built.node.bootstraps],
                         [("127.0.0.2", 7400), None])

    def test_bootstrap_backoff(self):
        """Contacted at once, then after 1, 2, 4, ... s, capped; stop ends it."""
        config = MeshConfig(bootstrap_retry_initial=1.0, bootstrap_retry_max=4.0)
        built = self.build(config=config,
                           bootstrap=[parse_bootstrap(f"{self.relay_id}@127.0.0.2:7400")])
        contacts = []
        self.patch(built.node, "contact_bootstraps",
                   lambda: contacts.append(self.reactor.seconds()) or True)
        built.bootstrapper.start()
        for _ in range(12):
            self.reactor.advance(1)
        self.assertEqual(contacts, [0, 1, 3, 7, 11])
        built.stop()
        self.assertFalse(built.bootstrapper.pending)
        self.reactor.advance(10)
        self.assertEqual(len(contacts), 5)

    def test_bootstrap_ends_when_all_answered(self):
        built = self.build(bootstrap=[parse_bootstrap(f"{self.relay_id}@127.0.0.2:7400")])
        built.node.bootstraps[0].reached = True
        built.bootstrapper.start()
        self.assertFalse(built.bootstrapper.pending)
