"""
NAT behaviour discovery against our own STUN server on the simulated network,
for every NAT model, the single-address fallback, blocked UDP and the mapping
lifetime search.
"""

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from omerta.metrics import Metrics
from omerta.stun.client import StunClient
from omerta.stun.discovery import Behaviour, Discovery, classify
from omerta.stun.endpoint import StunEndpoint, StunSocketProtocol
from omerta.stun.server import StunServer
from omerta.testing.simnet import NAT_MODELS, SimNetwork
from omerta.wire.messages import NatType

P = ("198.51.100.10", 3478)
A = ("198.51.100.11", 3479)
NAT_IP = "203.0.113.1"
INSIDE = "10.0.0.2"
PUBLIC_HOST = "198.51.100.50"

EXPECTED = {
    None: (Behaviour.NO_NAT, Behaviour.ENDPOINT_INDEPENDENT, NatType.PUBLIC),
    "full-cone": (Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ENDPOINT_INDEPENDENT, NatType.FULL_CONE),
    "restricted-cone": (Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_DEPENDENT,
                        NatType.RESTRICTED_CONE),
    "port-restricted": (Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT,
                        NatType.PORT_RESTRICTED_CONE),
    "symmetric": (Behaviour.ADDRESS_AND_PORT_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT,
                  NatType.SYMMETRIC),
}


def stun_server(net, primary=P, alternate=A):
    host = net.host(primary[0])
    if alternate is not None and alternate[0] != primary[0]:
        host.add_address(alternate[0])
    server = StunServer(primary, alternate=alternate)
    locals_ = [primary]
    if alternate is not None:
        locals_ += [(alternate[0], primary[1]), (primary[0], alternate[1]), alternate]
    for local in locals_:
        endpoint = StunEndpoint(local, server.metrics, server=server)
        port = host.reactor.listenUDP(local[1], StunSocketProtocol(endpoint), interface=local[0])
        server.attach(local, port)
    return server


class Probe:
    """
    A client socket on a simulated host, optionally behind a NAT.
    """

    def __init__(self, net, nat=None, timeout=120.0):
        self.net = net
        ip = INSIDE if nat else PUBLIC_HOST
        if nat:
            net.add_nat(NAT_IP, NAT_MODELS[nat](NAT_IP, net.clock, timeout=timeout), [ip])
        self.host = net.host(ip)
        self.metrics = Metrics()
        protocol = StunSocketProtocol(StunEndpoint((ip, 5000), self.metrics))
        self.port = self.host.reactor.listenUDP(5000, protocol, interface=ip)
        self.client = StunClient(self.port.write, self.host.reactor, self.metrics)
        protocol.endpoint.client = self.client
        self.local = (ip, 5000)
        self.extra = 6000

    def open_probe_socket(self, main):
        self.extra += 1
        protocol = StunSocketProtocol(StunEndpoint((self.local[0], self.extra), self.metrics))
        port = self.host.reactor.listenUDP(self.extra, protocol, interface=self.local[0])
        sibling = main.sibling(port.write)
        protocol.endpoint.client = sibling
        return sibling, port.stopListening

    def discover(self, servers, timeout=200, **kw):
        discovery = Discovery(self.client, self.host.reactor, local=self.local,
                              open_probe_socket=self.open_probe_socket)
        d = ensureDeferred(discovery.run(servers, **kw))
        self.net.run_until(lambda: d.called, timeout=timeout)
        return d


class DiscoveryTests(unittest.TestCase):
    def check(self, nat):
        net = SimNetwork(seed=3, latency=0.005)
        stun_server(net)
        probe = Probe(net, nat)
        report = self.successResultOf(probe.discover([P], hairpin=False))
        self.assertEqual((report.mapping, report.filtering, report.nat_type), EXPECTED[nat])
        self.assertTrue(report.rfc5780)
        self.assertEqual(report.mapped[0], NAT_IP if nat else PUBLIC_HOST)
        return report

    def test_public(self):
        """A host with no NAT is public with endpoint-independent filtering."""
        self.check(None)

    def test_full_cone(self):
        """Full cone: EI mapping, EI filtering."""
        self.check("full-cone")

    def test_restricted_cone(self):
        """Restricted cone: EI mapping, address-dependent filtering."""
        self.check("restricted-cone")

    def test_port_restricted_cone(self):
        """Port-restricted cone: EI mapping, address-and-port-dependent filtering."""
        report = self.check("port-restricted")
        self.assertLess(report.duration, 10)

    def test_symmetric(self):
        """Symmetric: address-and-port-dependent mapping."""
        self.check("symmetric")

    def test_filtering_and_mapping_tests_leave_from_fresh_sockets(self):
        """
        The filtering tests ask for answers from addresses the main socket
        never sent to, and the mapping tests must not see what reached the
        NAT for the main socket's port: each runs on a probe socket of its
        own (after its own binding to the server); the main socket only
        asks the server for its mapped address.
        """
        from omerta.wire.stun import Attr, parse

        net = SimNetwork(seed=3, latency=0.005)
        stun_server(net)
        probe = Probe(net, "port-restricted")
        written, send = [], probe.client._send

        def main_socket(data, address):
            written.append((parse(data), address))
            send(data, address)

        probe.client._send = main_socket
        report = self.successResultOf(probe.discover([P], hairpin=False))
        self.assertEqual((report.mapping, report.filtering),
                         EXPECTED["port-restricted"][:2])
        self.assertEqual({address for _, address in written}, {P})
        self.assertEqual([m.get(Attr.CHANGE_REQUEST) for m, _ in written
                          if m.get(Attr.CHANGE_REQUEST) not in (None, (False, False))], [])
        self.assertEqual(probe.extra, 6002)  # one for filtering, one for mapping

    def test_blocked(self):
        """No answer from any server: blocked, after the full RFC 8489 schedule."""
        net = SimNetwork(seed=3)
        probe = Probe(net, "port-restricted")
        report = self.successResultOf(probe.discover([P]))
        self.assertEqual(report.nat_type, NatType.BLOCKED)
        self.assertAlmostEqual(report.duration, 39.5, places=1)

    def test_single_address_servers_cone(self):
        """Two single-address servers seeing one mapping: EI mapping, filtering unknown."""
        net = SimNetwork(seed=3)
        stun_server(net, P, None)
        stun_server(net, ("198.51.100.20", 3478), None)
        probe = Probe(net, "port-restricted")
        report = self.successResultOf(probe.discover([P, ("198.51.100.20", 3478)], hairpin=False))
        self.assertEqual((report.mapping, report.filtering), (Behaviour.ENDPOINT_INDEPENDENT, Behaviour.UNKNOWN))
        self.assertFalse(report.rfc5780)
        self.assertEqual(report.nat_type, NatType.UNKNOWN)

    def test_single_address_servers_symmetric(self):
        """Two single-address servers seeing different mappings: symmetric."""
        net = SimNetwork(seed=3)
        stun_server(net, P, None)
        stun_server(net, ("198.51.100.20", 3478), None)
        probe = Probe(net, "symmetric")
        report = self.successResultOf(probe.discover([P, ("198.51.100.20", 3478)], hairpin=False))
        self.assertEqual(report.mapping, Behaviour.DEPENDENT)
        self.assertEqual(report.nat_type, NatType.SYMMETRIC)

    def test_first_server_down(self):
        """An unreachable first server is skipped for the next one."""
        net = SimNetwork(seed=3)
        stun_server(net)
        probe = Probe(net, "full-cone")
        report = self.successResultOf(probe.discover([("198.51.100.99", 3478), P], hairpin=False))
        self.assertEqual(report.nat_type, NatType.FULL_CONE)
        self.assertEqual(report.servers, [P])

    def test_lifetime(self):
        """The lifetime search brackets a 20 s NAT timeout within its resolution."""
        net = SimNetwork(seed=3, latency=0.005)
        stun_server(net)
        probe = Probe(net, "port-restricted", timeout=20.0)
        report = self.successResultOf(
            probe.discover([P], hairpin=False, lifetime_budget=400, timeout=500)
        )
        life = report.lifetime
        # Silence measured by the client excludes the round trips, so the
        # NAT's 20 s lies between alive and dead plus a few milliseconds.
        self.assertLess(life.alive, 20.0)
        self.assertGreaterEqual(life.dead + 0.05, 20.0)
        self.assertLessEqual(life.dead - life.alive, 1.0)

    def test_lifetime_budget_respected(self):
        """The lifetime search stops within its budget."""
        net = SimNetwork(seed=3, latency=0.005)
        stun_server(net)
        probe = Probe(net, "port-restricted", timeout=1000.0)
        report = self.successResultOf(
            probe.discover([P], hairpin=False, lifetime_budget=60, timeout=500)
        )
        self.assertIsNone(report.lifetime.dead)
        self.assertLessEqual(report.duration, 60 + 5)

    def test_classify_table(self):
        """The classic type follows from mapping and filtering."""
        for mapping, filtering, nat_type in EXPECTED.values():
            self.assertEqual(classify(mapping, filtering), nat_type)
        self.assertEqual(classify(Behaviour.ENDPOINT_INDEPENDENT, Behaviour.UNKNOWN), NatType.UNKNOWN)
