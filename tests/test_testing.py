"""
The test infrastructure itself: the fake UDP port, the memory reactor, the
heap clock and the simulated network with its NAT model.
"""

import os
import random

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
    IReactorUDP,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, LoopingCall
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from omerta.testing.load import CpuLoad
from omerta.testing.simnet import (
    INatModel,
    NoNat,
    PortRestrictedConeNat,
    SimClock,
    SimNetwork,
)
from omerta.testing.udp import FakeDatagramPort, MemoryUDPReactor


class Recorder(DatagramProtocol):
    """
    Keeps every datagram with the time it arrived; counts start/stop.
    """

    def __init__(self, clock=None, reply=None):
        self.clock = clock
        self.reply = reply
        self.received = []
        self.started = 0
        self.stopped = 0

    def startProtocol(self):
        self.started += 1

    def stopProtocol(self):
        self.stopped += 1

    def datagramReceived(self, data, addr):
        when = self.clock.seconds() if self.clock is not None else None
        self.received.append((data, addr, when))
        if self.reply is not None:
            self.transport.write(self.reply, addr)

    def payloads(self):
        return [data for data, _, _ in self.received]


class FakeDatagramPortTests(unittest.TestCase):
    def test_interfaces(self):
        """The fake port provides IUDPTransport and IListeningPort."""
        port = FakeDatagramPort(Recorder())
        verifyObject(IUDPTransport, port)
        verifyObject(IListeningPort, port)

    def test_write_recorded_and_sent(self):
        """write records (packet, addr) and calls the send hook with the port."""
        calls = []
        port = FakeDatagramPort(
            Recorder(), send=lambda *args: calls.append(args)
        )
        port.write(b"hello", ("192.0.2.1", 3478))
        self.assertEqual(port.written, [(b"hello", ("192.0.2.1", 3478))])
        self.assertEqual(calls, [(b"hello", ("192.0.2.1", 3478), port)])

    def test_socket_sendto(self):
        """socket.sendto records and sends like write and returns the length."""
        calls = []
        port = FakeDatagramPort(Recorder(), send=lambda *args: calls.append(args))
        self.assertEqual(port.socket.sendto(b"abc", ("192.0.2.1", 1)), 3)
        self.assertEqual(port.written, [(b"abc", ("192.0.2.1", 1))])
        self.assertEqual(len(calls), 1)

    def test_write_checks_address(self):
        """write refuses host names, the other family and missing addresses."""
        port = FakeDatagramPort(Recorder(), "127.0.0.1", 5000)
        self.assertRaises(
            error.InvalidAddressError, port.write, b"x", ("example.com", 1)
        )
        self.assertRaises(error.InvalidAddressError, port.write, b"x", ("::1", 1))
        self.assertRaises(ValueError, port.write, b"x")
        self.assertEqual(port.written, [])

    def test_write_too_long(self):
        """A datagram larger than UDP allows raises MessageLengthError."""
        port = FakeDatagramPort(Recorder())
        self.assertRaises(
            error.MessageLengthError, port.write, b"x" * 65508, ("192.0.2.1", 1)
        )

    def test_get_host(self):
        """getHost returns an IPv4Address or IPv6Address of the bound address."""
        self.assertEqual(
            FakeDatagramPort(Recorder(), "10.0.0.1", 9).getHost(),
            IPv4Address("UDP", "10.0.0.1", 9),
        )
        self.assertEqual(
            FakeDatagramPort(Recorder(), "::1", 9).getHost(),
            IPv6Address("UDP", "::1", 9),
        )
        self.assertEqual(
            FakeDatagramPort(Recorder(), "", 9).getHost(),
            IPv4Address("UDP", "0.0.0.0", 9),
        )

    def test_stop_listening(self):
        """stopListening stops the protocol once and fires its Deferred."""
        protocol = Recorder()
        port = FakeDatagramPort(protocol)
        port.startListening()
        self.assertIs(protocol.transport, port)
        self.assertEqual(protocol.started, 1)
        self.successResultOf(port.stopListening())
        self.successResultOf(port.stopListening())
        self.assertEqual(protocol.stopped, 1)
        self.assertIsNone(protocol.transport)
        self.assertTrue(port.closed)
        self.assertFalse(port.connected)

    def test_write_after_close(self):
        """Writes after stopListening are kept aside, counted and never sent."""
        calls = []
        port = FakeDatagramPort(Recorder(), send=lambda *args: calls.append(args))
        port.startListening()
        port.stopListening()
        port.write(b"late", ("192.0.2.1", 1))
        port.socket.sendto(b"later", ("192.0.2.1", 1))
        self.assertEqual(port.written, [])
        self.assertEqual(calls, [])
        self.assertEqual(port.writes_after_close, 2)
        self.assertEqual(
            [packet for packet, _ in port.written_after_close], [b"late", b"later"]
        )

    def test_connect_unsupported(self):
        """connect raises NotImplementedError with an explanation."""
        port = FakeDatagramPort(Recorder())
        exc = self.assertRaises(NotImplementedError, port.connect, "192.0.2.1", 1)
        self.assertIn("connected UDP", str(exc))

    def test_broadcast_flag(self):
        """setBroadcastAllowed/getBroadcastAllowed keep a flag."""
        port = FakeDatagramPort(Recorder())
        self.assertFalse(port.getBroadcastAllowed())
        port.setBroadcastAllowed(True)
        self.assertTrue(port.getBroadcastAllowed())


class MemoryUDPReactorTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryUDPReactor()

    def test_provides_reactor_udp(self):
        """MemoryUDPReactor provides IReactorUDP and IReactorTime."""
        verifyObject(IReactorUDP, self.reactor)
        verifyObject(IReactorTime, self.reactor)

    def test_ephemeral_ports(self):
        """Port 0 allocates 40000, 40001, ... skipping ports already bound."""
        self.reactor.listenUDP(40001, Recorder())
        ports = [self.reactor.listenUDP(0, Recorder()) for _ in range(3)]
        self.assertEqual([p.getHost().port for p in ports], [40000, 40002, 40003])
        self.assertEqual(
            sorted(self.reactor.udpPorts),
            [("", 40000), ("", 40001), ("", 40002), ("", 40003)],
        )

    def test_listen_connects_protocol(self):
        """listenUDP connects the protocol to the port it returns."""
        protocol = Recorder()
        port = self.reactor.listenUDP(5000, protocol, interface="127.0.0.1")
        self.assertIs(protocol.transport, port)
        self.assertEqual(protocol.started, 1)
        self.assertIs(self.reactor.udpPorts[("127.0.0.1", 5000)], port)
        self.assertEqual(port.getHost(), IPv4Address("UDP", "127.0.0.1", 5000))

    def test_address_in_use(self):
        """Binding a bound address, or a wildcard over it, is CannotListenError."""
        self.reactor.listenUDP(5000, Recorder(), interface="127.0.0.1")
        self.assertRaises(
            error.CannotListenError,
            self.reactor.listenUDP,
            5000,
            Recorder(),
            interface="127.0.0.1",
        )
        self.assertRaises(
            error.CannotListenError, self.reactor.listenUDP, 5000, Recorder()
        )
        self.reactor.listenUDP(5000, Recorder(), interface="127.0.0.2")
        self.reactor.listenUDP(5000, Recorder(), interface="::")

    def test_stop_frees_address(self):
        """A stopped port leaves udpPorts and its address can be bound again."""
        port = self.reactor.listenUDP(5000, Recorder())
        port.stopListening()
        self.assertEqual(self.reactor.udpPorts, {})
        self.reactor.listenUDP(5000, Recorder())

    def test_deliver(self):
        """deliver hands a datagram to the protocol by port, key or number."""
        protocol = Recorder()
        port = self.reactor.listenUDP(5000, protocol)
        self.reactor.deliver(port, b"a", ("192.0.2.1", 1))
        self.reactor.deliver(("", 5000), b"b", ("192.0.2.1", 1))
        self.reactor.deliver(5000, b"c", ("192.0.2.1", 1))
        self.assertEqual(protocol.payloads(), [b"a", b"b", b"c"])

    def test_deliver_closed(self):
        """deliver refuses a closed port."""
        port = self.reactor.listenUDP(5000, Recorder())
        port.stopListening()
        self.assertRaises(
            ValueError, self.reactor.deliver, port, b"a", ("192.0.2.1", 1)
        )

    def test_clock(self):
        """The reactor's clock drives timers scheduled by the protocol."""
        fired = []
        self.reactor.callLater(1.0, fired.append, True)
        self.reactor.advance(1.0)
        self.assertEqual(fired, [True])


class SimClockTests(unittest.TestCase):
    def test_same_schedule_as_clock(self):
        """SimClock runs a random workload in the same order, at the same times, as Clock."""

        def workload(clock):
            rng = random.Random(7)
            log = []
            calls = []

            def fire(name):
                log.append((name, clock.seconds()))
                if rng.random() < 0.3:
                    calls.append(clock.callLater(rng.random(), fire, name + "'"))

            for step in range(400):
                choice = rng.random()
                live = [c for c in calls if c.active()]
                if choice < 0.5 or not live:
                    calls.append(clock.callLater(rng.random() * 5, fire, f"c{step}"))
                elif choice < 0.6:
                    rng.choice(live).cancel()
                elif choice < 0.7:
                    rng.choice(live).reset(rng.random() * 5)
                elif choice < 0.8:
                    rng.choice(live).delay(rng.random() * 2 - 1)
                else:
                    clock.advance(rng.random())
                    pending = [c.getTime() for c in clock.getDelayedCalls()]
                    log.append(("pending", pending))
            clock.advance(100)
            return log

        self.assertEqual(workload(SimClock()), workload(Clock()))

    def test_delayed_calls(self):
        """getDelayedCalls lists only pending calls, earliest first."""
        clock = SimClock()
        late = clock.callLater(3, lambda: None)
        early = clock.callLater(1, lambda: None)
        cancelled = clock.callLater(2, lambda: None)
        cancelled.cancel()
        self.assertEqual(clock.getDelayedCalls(), [early, late])
        self.assertEqual(clock.next_call_time(), 1)
        clock.advance(1)
        self.assertEqual(clock.getDelayedCalls(), [late])
        self.assertEqual(clock.calls, [late])

    def test_looping_call(self):
        """A LoopingCall runs on SimClock as on Clock."""
        clock = SimClock()
        ticks = []
        loop = LoopingCall(lambda: ticks.append(clock.seconds()))
        loop.clock = clock
        loop.start(1.0)
        clock.pump([1.0, 1.0, 1.0])
        loop.stop()
        self.assertEqual(ticks, [0.0, 1.0, 2.0, 3.0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stale_entries_purged(self):
        """Cancelling many calls does not keep the heap growing."""
        clock = SimClock()
        for _ in range(10):
            for call in [clock.callLater(5, lambda: None) for _ in range(100)]:
                call.cancel()
        self.assertLess(len(clock._heap), 200)
        self.assertEqual(clock.getDelayedCalls(), [])


class SimNetworkTests(unittest.TestCase):
    def make(self, **kwargs):
        self.net = SimNetwork(**kwargs)
        self.a = self.net.host("192.0.2.1")
        self.b = self.net.host("192.0.2.2")
        self.proto_a = Recorder(self.net.clock)
        self.proto_b = Recorder(self.net.clock)
        self.port_a = self.a.reactor.listenUDP(1000, self.proto_a)
        self.port_b = self.b.reactor.listenUDP(2000, self.proto_b)
        return self.net

    def send_many(self, count, spacing=0.001):
        for i in range(count):
            self.port_a.write(b"%d" % i, ("192.0.2.2", 2000))
            self.net.run(spacing)
        self.net.run(1.0)

    def test_reactor_facade(self):
        """A host's reactor provides IReactorUDP and IReactorTime on the shared clock."""
        net = SimNetwork()
        reactor = net.host("192.0.2.1").reactor
        verifyObject(IReactorUDP, reactor)
        verifyObject(IReactorTime, reactor)
        call = reactor.callLater(2, lambda: None)
        self.assertEqual(reactor.getDelayedCalls(), [call])
        net.run(2)
        self.assertEqual(reactor.seconds(), net.clock.seconds())
        self.assertEqual(reactor.seconds(), 2)

    def test_latency(self):
        """A datagram arrives from the sender's address exactly after the latency."""
        net = self.make(latency=0.050)
        self.port_a.write(b"hi", ("192.0.2.2", 2000))
        net.run(0.049)
        self.assertEqual(self.proto_b.received, [])
        net.run(0.002)
        self.assertEqual(self.proto_b.received, [(b"hi", ("192.0.2.1", 1000), 0.050)])
        self.assertEqual((net.sent, net.delivered), (1, 1))

    def test_reply(self):
        """A protocol can answer through its transport; the reply makes the round trip."""
        net = self.make(latency=0.010)
        self.proto_b.reply = b"pong"
        self.port_a.write(b"ping", ("192.0.2.2", 2000))
        net.run(1)
        self.assertEqual(self.proto_a.received, [(b"pong", ("192.0.2.2", 2000), 0.020)])

    def test_host_counters(self):
        """Hosts count the datagrams and bytes they send and receive."""
        net = self.make()
        self.port_a.write(b"12345", ("192.0.2.2", 2000))
        net.run(1)
        self.assertEqual((self.a.packets_sent, self.a.bytes_sent), (1, 5))
        self.assertEqual((self.b.packets_received, self.b.bytes_received), (1, 5))
        self.assertEqual((self.a.packets_received, self.b.packets_sent), (0, 0))

    def test_jitter(self):
        """With jitter, delays stay within latency ± jitter and vary."""
        net = self.make(latency=0.050, jitter=0.020)
        for _ in range(50):
            self.port_a.write(b"x", ("192.0.2.2", 2000))
        net.run(1)
        delays = {when for _, _, when in self.proto_b.received}
        self.assertEqual(len(self.proto_b.received), 50)
        self.assertGreater(len(delays), 10)
        self.assertTrue(all(0.030 <= d <= 0.070 for d in delays), delays)

    def test_loss_reproducible(self):
        """Loss follows the seed: same seed, same survivors; about the set fraction lost."""
        survivors = []
        for _ in range(2):
            net = self.make(seed=42, loss=0.3)
            self.send_many(1000, spacing=0)
            survivors.append(self.proto_b.payloads())
            self.assertEqual(net.dropped["loss"] + net.delivered, 1000)
            self.assertTrue(250 <= net.dropped["loss"] <= 350, net.dropped)
        self.assertEqual(survivors[0], survivors[1])
        self.make(seed=43, loss=0.3)
        self.send_many(1000, spacing=0)
        self.assertNotEqual(self.proto_b.payloads(), survivors[0])

    def test_unbound(self):
        """Datagrams to an address nobody bound are dropped and counted."""
        net = self.make()
        self.port_a.write(b"x", ("192.0.2.2", 9999))
        self.port_a.write(b"x", ("192.0.2.99", 2000))
        net.run(1)
        self.assertEqual(net.dropped["unbound"], 2)
        self.assertEqual(net.delivered, 0)

    def test_stopped_port_unbound(self):
        """After stopListening a port receives nothing and its address is free."""
        net = self.make()
        self.port_b.stopListening()
        self.assertEqual(self.proto_b.stopped, 1)
        self.port_a.write(b"x", ("192.0.2.2", 2000))
        net.run(1)
        self.assertEqual(net.dropped["unbound"], 1)
        self.b.reactor.listenUDP(2000, Recorder())

    def test_in_flight_to_stopped_port(self):
        """A datagram in flight when the port closes is dropped as unbound."""
        net = self.make()
        self.port_a.write(b"x", ("192.0.2.2", 2000))
        self.port_b.stopListening()
        net.run(1)
        self.assertEqual((net.dropped["unbound"], net.delivered), (1, 0))

    def test_duplicate(self):
        """With duplicate=1 every datagram arrives twice."""
        net = self.make(duplicate=1.0)
        self.send_many(5)
        expected = sorted([b"%d" % i for i in range(5)] * 2)
        self.assertEqual(sorted(self.proto_b.payloads()), expected)
        self.assertEqual((net.duplicated, net.delivered, net.sent), (5, 10, 5))

    def test_reorder(self):
        """With reorder set, some datagrams arrive after ones sent later; none are lost."""
        net = self.make(reorder=0.3)
        self.send_many(100)
        received = [int(p) for p in self.proto_b.payloads()]
        self.assertEqual(sorted(received), list(range(100)))
        self.assertNotEqual(received, list(range(100)))
        self.assertGreater(net.reordered, 0)

    def test_no_reorder_by_default(self):
        """Without jitter or reorder, datagrams arrive in the order sent."""
        self.make()
        self.send_many(100)
        self.assertEqual([int(p) for p in self.proto_b.payloads()], list(range(100)))

    def test_link_override(self):
        """set_link changes loss and latency for one pair, both ways, only."""
        net = self.make(latency=0.010)
        c = net.host("192.0.2.3")
        proto_c = Recorder(net.clock)
        c.reactor.listenUDP(3000, proto_c)
        net.set_link("192.0.2.1", "192.0.2.2", latency=0.100)
        net.set_link("192.0.2.1", "192.0.2.3", loss=1.0)
        self.port_a.write(b"x", ("192.0.2.2", 2000))
        self.port_b.write(b"y", ("192.0.2.1", 1000))
        self.port_a.write(b"z", ("192.0.2.3", 3000))
        net.run(1)
        self.assertEqual(self.proto_b.received, [(b"x", ("192.0.2.1", 1000), 0.100)])
        self.assertEqual(self.proto_a.received, [(b"y", ("192.0.2.2", 2000), 0.100)])
        self.assertEqual((proto_c.received, net.dropped["loss"]), ([], 1))
        net.clear_link("192.0.2.1", "192.0.2.3")
        self.port_a.write(b"z", ("192.0.2.3", 3000))
        net.run(1)
        self.assertEqual(proto_c.payloads(), [b"z"])

    def test_partition_and_heal(self):
        """A partition drops traffic between the groups, both ways, until heal."""
        net = self.make()
        c = net.host("192.0.2.3")
        proto_c = Recorder(net.clock)
        c.reactor.listenUDP(3000, proto_c)
        net.partition(["192.0.2.1"], ["192.0.2.2"])
        self.port_a.write(b"x", ("192.0.2.2", 2000))
        self.port_b.write(b"y", ("192.0.2.1", 1000))
        self.port_a.write(b"z", ("192.0.2.3", 3000))
        net.run(1)
        self.assertEqual((self.proto_a.received, self.proto_b.received), ([], []))
        self.assertEqual(proto_c.payloads(), [b"z"])
        self.assertEqual(net.dropped["partition"], 2)
        net.heal()
        self.port_a.write(b"x", ("192.0.2.2", 2000))
        net.run(1)
        self.assertEqual(self.proto_b.payloads(), [b"x"])

    def test_partition_drops_in_flight(self):
        """A datagram in flight when a partition starts is dropped on arrival."""
        net = self.make()
        self.port_a.write(b"x", ("192.0.2.2", 2000))
        net.partition(["192.0.2.1"], ["192.0.2.2"])
        net.run(1)
        self.assertEqual((net.dropped["partition"], net.delivered), (1, 0))

    def test_multiple_addresses(self):
        """A host binds on its extra addresses; a wildcard binds the primary one."""
        net = SimNetwork()
        server = net.host("198.51.100.1")
        server.add_address("198.51.100.2")
        self.assertIs(net.host("198.51.100.2"), server)
        first = server.reactor.listenUDP(3478, Recorder())
        second = server.reactor.listenUDP(3478, Recorder(), interface="198.51.100.2")
        self.assertEqual(first.getHost(), IPv4Address("UDP", "198.51.100.1", 3478))
        self.assertEqual(second.getHost(), IPv4Address("UDP", "198.51.100.2", 3478))
        client = net.host("192.0.2.9").reactor.listenUDP(0, Recorder())
        client.write(b"x", ("198.51.100.2", 3478))
        net.run(1)
        self.assertEqual(second.protocol.payloads(), [b"x"])
        self.assertEqual(first.protocol.payloads(), [])

    def test_bind_errors(self):
        """Binding a taken port or a foreign address raises CannotListenError."""
        net = SimNetwork()
        host = net.host("192.0.2.1")
        host.reactor.listenUDP(5000, Recorder())
        self.assertRaises(
            error.CannotListenError, host.reactor.listenUDP, 5000, Recorder()
        )
        self.assertRaises(
            error.CannotListenError,
            host.reactor.listenUDP,
            5000,
            Recorder(),
            interface="192.0.2.2",
        )
        ports = [host.reactor.listenUDP(0, Recorder()) for _ in range(2)]
        self.assertEqual([p.getHost().port for p in ports], [40000, 40001])

    def test_receiver_exception_logged(self):
        """An exception in datagramReceived is logged and counted; later datagrams still arrive."""
        net = self.make()

        def explode(data, addr):
            if data == b"bad":
                raise ZeroDivisionError("bug")
            self.proto_b.received.append((data, addr, None))

        self.proto_b.datagramReceived = explode
        self.port_a.write(b"bad", ("192.0.2.2", 2000))
        self.port_a.write(b"good", ("192.0.2.2", 2000))
        net.run(1)
        self.assertEqual(self.proto_b.payloads(), [b"good"])
        self.assertEqual(net.errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_record(self):
        """With record=True simnet ports keep what they wrote."""
        net = self.make(record=True)
        self.port_a.write(b"x", ("192.0.2.2", 2000))
        self.assertEqual(self.port_a.written, [(b"x", ("192.0.2.2", 2000))])

    def test_run_until(self):
        """run_until stops when the predicate holds, or returns False at the timeout."""
        net = self.make(latency=0.030)
        self.port_a.write(b"x", ("192.0.2.2", 2000))
        self.assertTrue(net.run_until(lambda: self.proto_b.received, timeout=1))
        self.assertEqual(net.clock.seconds(), 0.030)
        self.assertFalse(net.run_until(lambda: self.proto_a.received, timeout=2))
        self.assertAlmostEqual(net.clock.seconds(), 2.030)

    def test_plain_clock(self):
        """The network also runs on a plain twisted Clock."""
        clock = Clock()
        self.make(clock=clock, latency=0.025)
        self.port_a.write(b"x", ("192.0.2.2", 2000))
        self.net.run(1)
        self.assertEqual(self.proto_b.received, [(b"x", ("192.0.2.1", 1000), 0.025)])
        self.assertEqual(clock.seconds(), 1)


PUBLIC = "203.0.113.1"
INSIDE = "10.0.0.2"
SERVER = "198.51.100.1"
OTHER = "198.51.100.2"


class NatTests(unittest.TestCase):
    def setUp(self):
        self.net = SimNetwork(latency=0.010)
        self.nat = self.net.add_nat(
            PUBLIC, PortRestrictedConeNat(PUBLIC, self.net.clock), [INSIDE]
        )
        self.inside = Recorder(self.net.clock)
        self.inside_port = self.net.host(INSIDE).reactor.listenUDP(5000, self.inside)
        self.server = Recorder(self.net.clock)
        self.server_port = self.net.host(SERVER).reactor.listenUDP(3478, self.server)
        self.server_port_2 = self.net.host(SERVER).reactor.listenUDP(3479, Recorder())
        self.other = Recorder(self.net.clock)
        self.other_port = self.net.host(OTHER).reactor.listenUDP(3478, self.other)

    def mapped(self):
        """Send to the server and return the source address it saw."""
        self.inside_port.write(b"probe", (SERVER, 3478))
        self.net.run(1)
        return self.server.received[-1][1]

    def test_interfaces(self):
        """NAT models provide INatModel."""
        verifyObject(INatModel, NoNat())
        verifyObject(INatModel, self.nat)

    def test_outbound_translated(self):
        """An inside host's datagram leaves with the NAT's public address."""
        ip, port = self.mapped()
        self.assertEqual(ip, PUBLIC)
        self.assertNotEqual((ip, port), (INSIDE, 5000))

    def test_mapping_reused_per_endpoint(self):
        """One inside endpoint keeps one mapping for every destination; another endpoint gets its own."""
        first = self.mapped()
        self.inside_port.write(b"x", (OTHER, 3478))
        self.net.run(1)
        self.assertEqual(self.other.received[0][1], first)
        second_port = self.net.host(INSIDE).reactor.listenUDP(5001, Recorder())
        second_port.write(b"x", (SERVER, 3478))
        self.net.run(1)
        self.assertNotEqual(self.server.received[-1][1], first)
        self.assertEqual(self.server.received[-1][1][0], PUBLIC)

    def test_reply_accepted(self):
        """A reply from the contacted ip:port reaches the inside endpoint."""
        mapped = self.mapped()
        self.server_port.write(b"reply", mapped)
        self.net.run(1)
        self.assertEqual(self.inside.received, [(b"reply", (SERVER, 3478), 1.010)])

    def test_filtering(self):
        """Unsolicited datagrams, and replies from the same ip on another port, are dropped."""
        mapped = self.mapped()
        self.server_port_2.write(b"other port", mapped)
        self.other_port.write(b"other ip", mapped)
        self.server_port.write(b"to unmapped", (PUBLIC, mapped[1] + 1))
        self.net.run(1)
        self.assertEqual(self.inside.received, [])
        self.assertEqual(self.net.dropped["nat"], 3)

    def test_one_hop_datagram_keeps_a_mapping_and_dies_at_the_nat(self):
        """
        A datagram sent with IP_TTL 1 dies at the NAT, as on a real router:
        it refreshes the mapping (and permission) it would use, creates none,
        and is counted as dropped for its TTL.
        """
        import socket

        timeout = self.nat.timeout
        mapped = self.mapped()
        self.inside_port.socket.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        self.net.run(timeout - 2)
        self.inside_port.write(b"keep", (SERVER, 3478))   # refreshes
        self.inside_port.write(b"new", (OTHER, 3478))     # no permission made
        self.net.run(3)
        self.assertEqual(self.net.dropped["ttl"], 2)
        self.assertEqual(len(self.server.received), 1)
        self.server_port.write(b"reply", mapped)          # past the first timeout
        self.other_port.write(b"unasked", mapped)
        self.net.run(1)
        self.assertEqual([data for data, *_ in self.inside.received], [b"reply"])

    def test_private_address_unreachable(self):
        """An inside address cannot be reached from outside the NAT."""
        self.mapped()
        self.server_port.write(b"x", (INSIDE, 5000))
        self.net.run(1)
        self.assertEqual((self.inside.received, self.net.dropped["nat"]), ([], 1))

    def test_same_nat_direct(self):
        """Hosts behind the same NAT reach each other by inside address, untranslated."""
        net = SimNetwork()
        nat = PortRestrictedConeNat(PUBLIC, net.clock)
        net.add_nat(PUBLIC, nat, [INSIDE, "10.0.0.3"])
        peer = Recorder(net.clock)
        net.host("10.0.0.3").reactor.listenUDP(6000, peer)
        port = net.host(INSIDE).reactor.listenUDP(5000, Recorder())
        port.write(b"x", ("10.0.0.3", 6000))
        net.run(1)
        self.assertEqual(peer.received[0][1], (INSIDE, 5000))

    def test_mapping_expiry(self):
        """An idle mapping expires after 120 s; until then replies pass."""
        mapped = self.mapped()
        self.net.run(118.9)
        self.server_port.write(b"in time", mapped)
        self.net.run(1)
        self.server_port.write(b"too late", mapped)
        self.net.run(1)
        self.assertEqual([d for d, _, _ in self.inside.received], [b"in time"])
        self.assertEqual(self.net.dropped["nat"], 1)
        self.assertEqual(self.nat.active_mappings(), {})

    def test_keepalive_refreshes(self):
        """Outbound traffic keeps a mapping alive and its port unchanged."""
        mapped = self.mapped()
        for _ in range(5):
            self.net.run(60)
            self.assertEqual(self.mapped(), mapped)
        self.server_port.write(b"still open", mapped)
        self.net.run(1)
        self.assertEqual([d for d, _, _ in self.inside.received], [b"still open"])

    def test_hole_punch(self):
        """Two port-restricted cone hosts connect once both have sent to each other."""
        net = self.net
        nat = PortRestrictedConeNat("203.0.113.2", net.clock)
        net.add_nat("203.0.113.2", nat, ["10.0.1.2"])
        peer = Recorder(net.clock)
        peer_port = net.host("10.0.1.2").reactor.listenUDP(5000, peer)
        peer_port.write(b"probe", (SERVER, 3478))
        net.run(1)
        peer_mapped = self.server.received[-1][1]
        mapped = self.mapped()

        peer_port.write(b"early", mapped)
        net.run(1)
        self.assertEqual(self.inside.received, [])

        self.inside_port.write(b"punch", peer_mapped)
        peer_port.write(b"through", mapped)
        net.run(1)
        self.assertEqual(peer.payloads(), [b"punch"])
        self.assertEqual(self.inside.payloads(), [b"through"])
        self.assertEqual(self.inside.received[0][1], peer_mapped)

    def test_no_nat_transparent(self):
        """Behind NoNat a host keeps its own address and is reachable from outside."""
        net = SimNetwork()
        net.add_nat("203.0.113.9", NoNat(), ["192.0.2.5"])
        host = Recorder(net.clock)
        port = net.host("192.0.2.5").reactor.listenUDP(5000, host)
        server = Recorder(net.clock)
        server_port = net.host(SERVER).reactor.listenUDP(3478, server)
        port.write(b"x", (SERVER, 3478))
        server_port.write(b"y", ("192.0.2.5", 5000))
        net.run(1)
        self.assertEqual(server.received[0][1], ("192.0.2.5", 5000))
        self.assertEqual(host.payloads(), [b"y"])

    def test_add_nat_checks(self):
        """add_nat refuses a model for another address, a host's address, and double NATing."""
        net = SimNetwork()
        net.host("192.0.2.1")
        self.assertRaises(
            ValueError,
            net.add_nat,
            PUBLIC,
            PortRestrictedConeNat("203.0.113.99", net.clock),
            [INSIDE],
        )
        self.assertRaises(
            ValueError,
            net.add_nat,
            "192.0.2.1",
            PortRestrictedConeNat("192.0.2.1", net.clock),
            [INSIDE],
        )
        net.add_nat(PUBLIC, PortRestrictedConeNat(PUBLIC, net.clock), [INSIDE])
        self.assertRaises(
            ValueError,
            net.add_nat,
            "203.0.113.2",
            PortRestrictedConeNat("203.0.113.2", net.clock),
            [INSIDE],
        )
        self.assertRaises(ValueError, net.host, PUBLIC)

    def test_carrier_grade_nat(self):
        """A NAT behind another NAT translates twice out and twice back in."""
        net = SimNetwork()
        home = PortRestrictedConeNat("100.64.0.2", net.clock)
        net.add_nat("100.64.0.2", home, [INSIDE])
        net.add_nat(PUBLIC, PortRestrictedConeNat(PUBLIC, net.clock), ["100.64.0.2"])
        inside = Recorder(net.clock)
        port = net.host(INSIDE).reactor.listenUDP(5000, inside)
        server = Recorder(net.clock, reply=b"pong")
        net.host(SERVER).reactor.listenUDP(3478, server)
        port.write(b"ping", (SERVER, 3478))
        net.run(1)
        self.assertEqual(server.received[0][1][0], PUBLIC)
        self.assertEqual(inside.received, [(b"pong", (SERVER, 3478), 0.020)])


class CpuLoadTests(unittest.TestCase):
    """
    The busy machine of the lab tests: real busy-loop processes.
    """

    def test_runs_and_stops(self):
        """
        Entered, the requested number of hogs run; left, none is left.
        """
        load = CpuLoad(2)
        with load:
            self.assertEqual(load.running, 2)
            pids = [p.pid for p in load._procs]
        self.assertEqual(load.running, 0)
        for pid in pids:
            self.assertFalse(os.path.exists(f"/proc/{pid}"), f"hog {pid} left behind")

    def test_one_per_core_by_default(self):
        self.assertEqual(CpuLoad().processes, os.cpu_count() or 1)

    def test_refuses_none(self):
        self.assertRaises(ValueError, CpuLoad, 0)
