"""
The tunnel plane on the simulated network: WireGuard datagrams between two
members over direct, punched and relayed paths, through path changes, and
nothing accepted from anyone else.  A recording UDP socket on each host
stands in for the WireGuard interface (tests/test_tunnel_e2e.py uses real
ones).
"""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from omerta.mesh.peer import PUNCHED, RELAYED, is_relayed
from omerta.mesh.tunnel import TunnelPlane
from omerta.wire import tunnel as wire
from omerta.wire.tunnel import TO_CONSUMER, TO_PROVIDER
from tests.test_traversal_sim import connection_kind, setup_pair


class FakeWireGuard(DatagramProtocol):
    """A UDP socket where a WireGuard interface would listen."""

    def __init__(self):
        self.received: list[tuple[bytes, tuple]] = []

    def datagramReceived(self, datagram, addr):
        self.received.append((datagram, addr))


def carry(sim, sim_node, loopback: str) -> tuple[TunnelPlane, FakeWireGuard, int]:
    """Give a simulated node a tunnel plane on C{loopback} and a fake WireGuard."""
    sim_node.host.add_address(loopback)
    plane = TunnelPlane(sim_node.node, sim_node.host.reactor.listenUDP, host=loopback)
    sim_node.node.tunnels = plane
    wg = FakeWireGuard()
    port = sim_node.host.reactor.listenUDP(0, wg, interface=loopback)
    return plane, wg, port


class TunnelPair:
    """A consumer (a) and a provider (b) with a tunnel endpoint each."""

    def __init__(self, test, nat_a: str, nat_b: str, **options):
        self.sim, self.relays, self.a, self.b = setup_pair(test, nat_a, nat_b, **options)
        network = self.a.overlay.network_id
        self.plane_a, self.wg_a, self.port_a = carry(self.sim, self.a, "127.1.0.1")
        self.plane_b, self.wg_b, self.port_b = carry(self.sim, self.b, "127.2.0.1")
        self.end_a = self.plane_a.open(network, self.b.peer_id, TO_CONSUMER,
                                       self.port_a.getHost().port)
        self.end_b = self.plane_b.open(network, self.a.peer_id, TO_PROVIDER,
                                       self.port_b.getHost().port)

    def a_to_b(self, payload: bytes, timeout: float = 10.0) -> bool:
        return self._send(self.port_a, self.end_a, self.wg_b, payload, timeout)

    def b_to_a(self, payload: bytes, timeout: float = 10.0) -> bool:
        return self._send(self.port_b, self.end_b, self.wg_a, payload, timeout)

    def _send(self, port, endpoint, receiver, payload: bytes, timeout: float) -> bool:
        """Send until it arrives (WireGuard retransmits its handshake too)."""
        before = len(receiver.received)
        clock = self.sim.clock
        next_send = [clock.seconds()]

        def arrived() -> bool:
            if any(d == payload for d, _ in receiver.received[before:]):
                return True
            if clock.seconds() >= next_send[0]:
                port.write(payload, endpoint.address)
                next_send[0] = clock.seconds() + 1.0
            return False

        return self.sim.run_until(arrived, timeout, 0.01)


class CarryTests(unittest.TestCase):
    def test_both_ways_from_the_stable_endpoint(self):
        pair = TunnelPair(self, "none", "none")
        self.assertTrue(pair.a_to_b(b"handshake initiation"))
        self.assertTrue(pair.b_to_a(b"handshake response"))
        # WireGuard on each side hears its peer from the endpoint it was given
        self.assertEqual(pair.wg_b.received[-1][1], pair.end_b.address)
        self.assertEqual(pair.wg_a.received[-1][1], pair.end_a.address)
        self.assertEqual(pair.end_a.frames_out, 1)
        self.assertEqual(pair.end_b.frames_in, 1)

    def test_relayed_and_unreadable_by_the_relay(self):
        pair = TunnelPair(self, "symmetric", "symmetric", record=True)
        secret = b"wireguard datagram " * 20
        self.assertTrue(pair.a_to_b(secret, timeout=30))
        self.assertEqual(connection_kind(pair.a, pair.b), RELAYED)
        self.assertTrue(pair.b_to_a(b"back", timeout=30))
        relay = pair.relays[0].node.relay
        self.assertGreater(sum(s.packets for s in relay.sessions.values()), 0)
        # what a's node put on the wire never holds the datagram in clear
        written = [d for d, _ in pair.a.port.written]
        self.assertTrue(written)
        self.assertFalse(any(secret[:40] in d for d in written))

    def test_endpoint_survives_upgrade_to_a_punched_path(self):
        pair = TunnelPair(self, "port-restricted", "restricted-cone")
        address = pair.end_a.address
        self.assertTrue(pair.a_to_b(b"first", timeout=30))
        pair.a.overlay.paths.establish(pair.b.peer_id)
        self.assertTrue(pair.sim.run_until(lambda: connection_kind(pair.a, pair.b) == PUNCHED,
                                           30))
        self.assertTrue(pair.a_to_b(b"after upgrade"))
        self.assertTrue(pair.b_to_a(b"reply after upgrade"))
        self.assertEqual(pair.end_a.address, address)

    def test_relay_failover_keeps_the_tunnel(self):
        pair = TunnelPair(self, "symmetric", "symmetric", relays=2)
        self.assertTrue(pair.a_to_b(b"1", timeout=30))
        link = pair.a.overlay.liveness.links[pair.b.peer_id]
        used = pair.a.overlay.relays.relay_of(link.address)
        pair.sim.kill(next(r for r in pair.relays if r.peer_id == used))
        killed = pair.sim.clock.seconds()

        def through_the_other():
            pair.port_a.write(b"2", pair.end_a.address)
            return any(d == b"2" for d, _ in pair.wg_b.received)

        self.assertTrue(pair.sim.run_until(through_the_other, 30, 0.5))
        self.assertLess(pair.sim.clock.seconds() - killed, 25)
        link = pair.a.overlay.liveness.links[pair.b.peer_id]
        self.assertTrue(is_relayed(link.address))
        self.assertNotEqual(pair.a.overlay.relays.relay_of(link.address), used)

    def test_traffic_brings_a_dead_relay_path_back_within_seconds(self):
        """
        While datagrams flow both ways (a TCP transfer's data and acks), the
        tunnel's own probes notice a dead relay and the path moves to the
        other one within about five seconds, not at the next keepalive.
        """
        pair = TunnelPair(self, "symmetric", "symmetric", relays=2)
        self.assertTrue(pair.a_to_b(b"warm", timeout=30))
        self.assertTrue(pair.b_to_a(b"warm", timeout=30))
        clock = pair.sim.clock
        arrived = []

        def pump():
            n = len(arrived)
            pair.port_a.write(b"data %d" % n, pair.end_a.address)
            pair.port_b.write(b"ack %d" % n, pair.end_b.address)
            arrived.append((clock.seconds(), len(pair.wg_b.received), len(pair.wg_a.received)))

        loop = task.LoopingCall(pump)
        loop.clock = clock
        loop.start(0.1)
        self.addCleanup(lambda: loop.running and loop.stop())
        pair.sim.run(3)
        link = pair.a.overlay.liveness.links[pair.b.peer_id]
        used = pair.a.overlay.relays.relay_of(link.address)
        pair.sim.kill(next(r for r in pair.relays if r.peer_id == used))
        killed = clock.seconds()
        at_kill = (len(pair.wg_b.received), len(pair.wg_a.received))

        def flowing_again() -> bool:
            return (len(pair.wg_b.received) > at_kill[0] + 5
                    and len(pair.wg_a.received) > at_kill[1] + 5)

        self.assertTrue(pair.sim.run_until(flowing_again, 30, 0.05))
        recovered = clock.seconds() - killed
        self.assertLess(recovered, 6.0, f"traffic flowed again only after {recovered:.1f} s")

    def test_a_backing_off_sender_still_gets_its_path_moved(self):
        """
        A TCP sender whose segments are lost backs off (0.2, 0.4, 0.8 s, ...),
        sending too seldom to carry probes: the tunnel keeps probing on its
        own, and the path leaves the dead relay within about five seconds.
        """
        pair = TunnelPair(self, "symmetric", "symmetric", relays=2)
        self.assertTrue(pair.a_to_b(b"warm", timeout=30))
        self.assertTrue(pair.b_to_a(b"warm", timeout=30))
        overlay = pair.a.overlay
        used = overlay.relays.relay_of(overlay.liveness.links[pair.b.peer_id].address)
        pair.sim.kill(next(r for r in pair.relays if r.peer_id == used))
        clock = pair.sim.clock
        killed = clock.seconds()
        for delay in (0.2, 0.6, 1.4, 3.0, 6.2, 12.6):
            clock.callLater(delay, pair.port_a.write, b"retransmission", pair.end_a.address)

        def moved() -> bool:
            link = overlay.liveness.links.get(pair.b.peer_id)
            return (link is not None and is_relayed(link.address)
                    and overlay.relays.relay_of(link.address) not in (None, used))

        self.assertTrue(pair.sim.run_until(moved, 30, 0.05))
        self.assertLess(clock.seconds() - killed, 6.0, clock.seconds() - killed)

    def test_datagrams_lost_with_the_old_path_go_again_on_the_new_one(self):
        """
        What was sent since the peer was last heard is sent again once the
        path moves, so the receiver gets it without waiting for the sender
        to retransmit.
        """
        pair = TunnelPair(self, "symmetric", "symmetric", relays=2)
        self.assertTrue(pair.a_to_b(b"warm", timeout=30))
        self.assertTrue(pair.b_to_a(b"warm", timeout=30))
        overlay = pair.a.overlay
        used = overlay.relays.relay_of(overlay.liveness.links[pair.b.peer_id].address)
        pair.sim.kill(next(r for r in pair.relays if r.peer_id == used))
        before = pair.end_a.frames_out
        for n in range(3):
            pair.port_a.write(b"lost %d" % n, pair.end_a.address)
        self.assertTrue(pair.sim.run_until(
            lambda: {b"lost 0", b"lost 1", b"lost 2"} <= {d for d, _ in pair.wg_b.received},
            30, 0.05), "the datagrams lost with the dead relay never arrived")
        replayed = pair.a.node.metrics.get("tunnel_replayed")
        self.assertGreaterEqual(replayed, 3)
        self.assertEqual(pair.end_a.frames_out - before, 3 + replayed)  # sent once by a's WireGuard

    def test_datagrams_wait_for_the_session(self):
        pair = TunnelPair(self, "none", "none")
        messaging = pair.a.overlay.messaging
        self.assertIsNone(messaging.sessions.get(pair.b.peer_id, pair.sim.clock.seconds()))
        for i in range(3):
            pair.port_a.write(b"queued %d" % i, pair.end_a.address)
        self.assertTrue(pair.sim.run_until(lambda: len(pair.wg_b.received) == 3, 10, 0.01))
        self.assertEqual([d for d, _ in pair.wg_b.received],
                         [b"queued 0", b"queued 1", b"queued 2"])


class RefusalTests(unittest.TestCase):
    def test_no_endpoint_for_a_member_without_a_tunnel(self):
        pair = TunnelPair(self, "none", "none")
        self.assertTrue(pair.a_to_b(b"hello"))
        # the provider closes its endpoint (VM released): a's frames are dropped
        pair.plane_b.close(pair.a.overlay.network_id, pair.a.peer_id, TO_PROVIDER)
        pair.port_a.write(b"after release", pair.end_a.address)
        pair.sim.run(2)
        self.assertEqual(pair.b.node.metrics.get("drops", reason="tunnel_no_endpoint"), 1)
        self.assertNotIn(b"after release", [d for d, _ in pair.wg_b.received])

    def test_only_the_local_wireguard_port_may_send(self):
        pair = TunnelPair(self, "none", "none")
        other = pair.a.host.reactor.listenUDP(0, FakeWireGuard(), interface="127.1.0.1")
        other.write(b"injected", pair.end_a.address)
        pair.sim.run(2)
        self.assertEqual(pair.a.node.metrics.get("drops", reason="tunnel_foreign_source"), 1)
        self.assertEqual(pair.end_a.frames_out, 0)

    def test_another_member_cannot_inject_or_replay(self):
        pair = TunnelPair(self, "none", "none")
        self.assertTrue(pair.a_to_b(b"genuine"))
        mallory = pair.sim.add_node("198.51.100.66", [pair.relays[0]], name="mallory")
        self.assertTrue(pair.sim.run_until(
            lambda: pair.b.peer_id in mallory.knows(), 30))
        network = pair.a.overlay.network_id
        plane_m, wg_m, port_m = carry(pair.sim, mallory, "127.3.0.1")
        # mallory opens a tunnel towards b as if it were a's peer: b has no
        # endpoint for mallory, whatever kind it names
        for kind in (TO_CONSUMER, TO_PROVIDER):
            end = plane_m.open(network, pair.b.peer_id, kind, port_m.getHost().port)
            for _ in range(3):
                port_m.write(b"forged", end.address)
        pair.sim.run(5)
        self.assertNotIn(b"forged", [d for d, _ in pair.wg_b.received])
        self.assertGreaterEqual(pair.b.node.metrics.get("drops", reason="tunnel_no_endpoint"), 2)
        # a frame of a's session replayed to b is refused by the replay window
        sessions = pair.a.overlay.messaging.sessions
        session = sessions.get(pair.b.peer_id, pair.sim.clock.seconds())
        sealed = session.seal(wire.INNER_TYPE, bytes((TO_PROVIDER,)) + b"once")
        frame = wire.header(sealed["session_id"], sealed["counter"]) + sealed["sealed"]
        pair.b.node.tunnel_received(frame)
        pair.b.node.tunnel_received(frame)
        pair.sim.run(1)
        self.assertEqual([d for d, _ in pair.wg_b.received].count(b"once"), 1)
        self.assertEqual(pair.b.node.metrics.get("drops", reason="tunnel_replay"), 1)

    def test_malformed_frames_are_counted(self):
        pair = TunnelPair(self, "none", "none")
        node = pair.b.node
        node.tunnel_received(wire.PREFIX + b"short")
        node.tunnel_received(wire.header(12345, 1) + bytes(40))
        self.assertEqual(node.metrics.get("drops", reason="tunnel_malformed"), 1)
        self.assertEqual(node.metrics.get("drops", reason="tunnel_unknown_session"), 1)


class WireTests(unittest.TestCase):
    def test_header_matches_the_construct_definition(self):
        frame = wire.header(0x0102030405060708, 9) + b"x" * 20
        parsed = wire.TunnelDataStruct.parse(frame)
        self.assertEqual((parsed.session_id, parsed.counter, parsed.sealed),
                         (0x0102030405060708, 9, b"x" * 20))
        self.assertEqual(wire.TunnelDataStruct.build(parsed), frame)
        self.assertEqual(wire.parse(frame), (0x0102030405060708, 9, b"x" * 20))
        self.assertEqual(wire.OVERHEAD, 38)
