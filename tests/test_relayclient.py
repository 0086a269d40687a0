"""
The relay client built alone: reservations, session requests, refusals and
their backoff, sessions opening and closing, on a Clock with fakes.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.trial import unittest

from omerta.mesh.relayclient import RelayClient
from omerta.testing.fakes import fake_basics
from omerta.wire.messages import Capability, MessageType, PathKind, RelayDenyReason
from omerta.wire.relay import session_header

R1, R2, PEER = b"\x01" * 16, b"\x02" * 16, b"\x0b" * 16
R1_AT, R2_AT = ("198.51.100.1", 7400), ("198.51.100.2", 7400)
SESSION = bytes(range(8))


class FakeRegistry:
    def __init__(self):
        self.records = {}

    def add(self, peer_id, capabilities=Capability.NONE, rtt=None, paths=(), sequence=1):
        self.records[peer_id] = SimpleNamespace(
            peer_id=peer_id, capabilities=capabilities, rtt=rtt, state="online",
            paths=list(paths), sequence=sequence)

    def get(self, peer_id):
        return self.records.get(peer_id)

    def all(self):
        return list(self.records.values())


def frame(sender):
    return SimpleNamespace(sender=sender)


class RelayClientTests(unittest.TestCase):
    def setUp(self):
        self.basics, self.sent, _ = fake_basics()
        self.clock = self.basics.clock
        self.registry = FakeRegistry()
        self.registry.add(R1, Capability.RELAY, rtt=0.02)
        self.registry.add(R2, Capability.RELAY, rtt=0.01)
        self.registry.add(PEER, paths=[(PathKind.RELAYED, R1_AT, R1)])
        self.addresses = {R1: R1_AT, R2: R2_AT}
        self.routes = {}
        self.opened, self.closed, self.reannounced, self.pinged = [], [], [], []
        self.needs = True
        self.client = RelayClient(
            self.basics, self.registry, self.routes,
            needs_relays=lambda: self.needs,
            direct_address=self.addresses.get,
            reannounce=lambda: self.reannounced.append(self.clock.seconds()),
            session_opened=lambda *a: self.opened.append(a),
            session_closed=lambda *a: self.closed.append(a),
            ping_relay=lambda relay_id, address: self.pinged.append((relay_id, address)))

    def connects(self):
        return [(s.address, s.fields["target"]) for s in self.sent.of(MessageType.RELAY_CONNECT)]

    # reservations

    def test_reserves_on_relays_by_rtt_and_announces_them(self):
        self.client.tick()  # relay_count 3: both relays, the nearer first
        reserves = self.sent.of(MessageType.RELAY_RESERVE)
        self.assertEqual([s.address for s in reserves], [R2_AT, R1_AT])
        self.assertEqual(self.client.own_paths(), [])
        self.client.on_accept(frame(R1), R1_AT, SimpleNamespace(lifetime_s=120, free_sessions=5))
        self.assertEqual(self.client.own_paths(),
                         [{"kind": PathKind.RELAYED, "endpoint": R1_AT, "via": R1}])
        self.assertEqual(self.reannounced, [0])

    def test_accept_from_elsewhere_dropped(self):
        self.client.tick()
        self.client.on_accept(frame(R1), ("203.0.113.5", 1), SimpleNamespace(
            lifetime_s=120, free_sessions=5))
        self.assertEqual(self.client.own_paths(), [])
        self.assertEqual(self.basics.metrics.get("drops", reason="unexpected_relay_accept"), 1)

    def test_unanswered_reservation_replaced(self):
        """
        A relay that never answers is dropped and avoided; with no other
        relay left, it is asked again afresh rather than holding none.
        """
        self.client.tick()
        for _ in range(int(self.client.config.reserve_retry * self.client.config.reserve_tries) + 2):
            self.clock.advance(1)
            self.client.tick()
        self.assertIn(R1, self.client.avoid)
        self.assertIn(R2, self.client.avoid)
        self.assertEqual(set(self.client.held), {R1, R2})
        # at the reservation's retry pace, not faster
        sent = [s for s in self.sent.of(MessageType.RELAY_RESERVE) if s.address == R1_AT]
        self.assertLessEqual(len(sent), self.clock.seconds() + 1)

    def test_a_failed_relay_comes_after_the_others(self):
        """
        A relay that went offline is avoided for relay_avoid seconds: every
        other relay is taken before it, nearer or not; alone, it is taken
        again once online; announcing anew (it restarted) ends the
        avoidance at once.
        """
        r3, r3_at = b"\x03" * 16, ("198.51.100.3", 7400)
        self.registry.add(r3, Capability.RELAY, rtt=0.03)
        self.addresses[r3] = r3_at
        self.client.config.relay_count = 1
        self.client.tick()
        self.assertEqual(list(self.client.held), [R2])  # the nearest
        self.registry.records[R2].state = "offline"
        self.clock.advance(1)
        self.client.tick()
        self.assertEqual(list(self.client.held), [R1])
        self.registry.records[R2].state = "online"  # (its old announcement)
        self.registry.records[R1].state = "offline"
        self.clock.advance(1)
        self.client.tick()
        self.assertEqual(list(self.client.held), [r3], "the avoided R2 came before R3")
        self.registry.records[r3].state = "offline"
        self.clock.advance(1)
        self.client.tick()
        self.assertEqual(list(self.client.held), [R2], "none left but the avoided R2")
        self.assertTrue(self.client._avoided(R2, self.clock.seconds()))
        self.registry.records[R2].sequence += 1
        self.assertFalse(self.client._avoided(R2, self.clock.seconds()))

    def test_public_node_releases(self):
        self.client.tick()
        self.client.on_accept(frame(R1), R1_AT, SimpleNamespace(lifetime_s=120, free_sessions=5))
        self.needs = False
        self.client.tick()
        self.assertEqual(self.client.held, {})
        released = [s for s in self.sent.of(MessageType.RELAY_RESERVE)
                    if s.fields["lifetime_s"] == 0]
        self.assertEqual({s.address for s in released}, {R1_AT, R2_AT})

    def test_relay_gone_closes_every_session_through_it(self):
        """
        A relay going offline closes the sessions of every peer it carried
        to us (the path manager is told of each), in one tick.
        """
        other = b"\x0c" * 16
        self.client.tick()
        self.client.on_accept(frame(R1), R1_AT, SimpleNamespace(lifetime_s=120, free_sessions=5))
        for peer, session in ((PEER, SESSION), (other, bytes(range(8, 16)))):
            self.client.on_session(frame(R1), R1_AT, SimpleNamespace(peer=peer, session=session))
        self.assertEqual(len(self.routes), 2)
        self.registry.records[R1].state = "offline"
        self.client.tick()
        self.assertNotIn(R1, self.client.held)
        self.assertEqual({peer for peer, _ in self.closed}, {PEER, other})
        self.assertEqual(self.routes, {})
        self.assertEqual(self.client.sessions, {})

    def test_relay_restart_renews_at_once_and_closes_its_sessions(self):
        """
        A relay that restarted forgot our reservation and the sessions it
        carried: the reservation is renewed at once, not at the next
        refresh, and those sessions are closed.
        """
        self.client.tick()
        self.client.on_accept(frame(R1), R1_AT, SimpleNamespace(lifetime_s=120, free_sessions=5))
        self.client.on_session(frame(R1), R1_AT, SimpleNamespace(peer=PEER, session=SESSION))
        self.clock.advance(3)
        self.sent.clear()
        self.client.peer_restarted(R1)
        self.assertEqual([s.address for s in self.sent.of(MessageType.RELAY_RESERVE)], [R1_AT])
        self.assertEqual([peer for peer, _ in self.closed], [PEER])
        self.assertEqual(self.routes, {})
        self.assertTrue(self.client.held[R1].live)  # still announced while it is renewed
        self.sent.clear()
        self.client.peer_restarted(PEER)  # no relay of ours: nothing to do
        self.assertEqual(self.sent.of(MessageType.RELAY_RESERVE), [])

    # sessions

    def test_session_requested_opened_and_closed(self):
        self.assertTrue(self.client.open_session(PEER))
        self.assertEqual(self.connects(), [(R1_AT, PEER)])
        self.client.on_session(frame(R1), R1_AT, SimpleNamespace(peer=PEER, session=SESSION))
        route = self.client.route_to(PEER)
        self.assertEqual(route.relay_address, R1_AT)
        self.assertEqual(route.header, session_header(SESSION))
        self.assertIs(self.routes[route.header].peer_id, PEER)
        self.assertEqual(self.opened, [(PEER, route, True)])
        self.assertEqual(self.client.relay_of(route), R1)
        self.client.on_end(frame(R1), R1_AT, SimpleNamespace(session=SESSION))
        self.assertEqual(self.closed, [(PEER, route)])
        self.assertEqual(self.routes, {})
        self.assertIsNone(self.client.route_to(PEER))

    def test_session_request_pings_the_relay(self):
        """
        With the request goes a ping to the relay, which draws its challenge
        if our NAT moved us since the relay proved our address (a request
        from an unproven address is ignored).
        """
        self.client.open_session(PEER)
        self.assertEqual(self.pinged, [(R1, R1_AT)])
        self.client.on_session(frame(R1), R1_AT, SimpleNamespace(peer=PEER, session=SESSION))
        route = self.client.route_to(PEER)
        self.client.ping_relay_of(route)
        self.assertEqual(self.pinged[-1], (R1, R1_AT))

    def test_challenge_from_a_relay_sends_its_requests_again(self):
        """
        The relay challenged us (it saw us at an address it had not
        proven): the session request and the unconfirmed reservation it
        ignored go again right behind our proof, not at the next retry.
        """
        self.client.tick()  # reservations requested on both relays
        self.client.open_session(PEER)
        self.sent.clear()
        self.client.challenged(R1)
        self.assertEqual(self.connects(), [(R1_AT, PEER)])
        self.assertEqual([s.address for s in self.sent.of(MessageType.RELAY_RESERVE)], [R1_AT])
        self.client.challenged(PEER)  # not a relay we ask anything of
        self.assertEqual(len(self.sent), 2)
        self.assertEqual(self.basics.metrics.get("relay_requests_after_challenge"), 2)

    def test_unsolicited_session_dropped(self):
        self.client.on_session(frame(R1), R1_AT, SimpleNamespace(peer=PEER, session=SESSION))
        self.assertEqual(self.opened, [])
        self.assertEqual(self.basics.metrics.get("drops", reason="relay_session_unsolicited"), 1)

    def test_lost_request_resent_then_given_up(self):
        self.client.open_session(PEER)
        for _ in range(int(self.client.config.relay_connect_timeout) + 1):
            self.clock.advance(1)
            self.client.tick()
        self.assertNotIn(PEER, self.client.pending)
        self.assertEqual(len(self.connects()), int(self.client.config.relay_connect_timeout))

    def deny(self, reason):
        self.client.on_deny(frame(R1), R1_AT, SimpleNamespace(
            request=MessageType.RELAY_CONNECT, target=PEER, reason=reason, detail="no"))

    def test_denial_backs_off(self):
        """No RELAY_CONNECT storm: a denied request is not repeated at once."""
        self.client.open_session(PEER)
        self.deny(RelayDenyReason.FULL)
        self.assertEqual(len(self.connects()), 1)
        self.assertFalse(self.client.open_session(PEER))
        self.assertTrue(self.client.can_open(PEER), "a full relay may have room later")
        self.clock.advance(1.01)
        self.assertTrue(self.client.open_session(PEER))
        self.deny(RelayDenyReason.FULL)
        self.clock.advance(1.5)
        self.assertFalse(self.client.open_session(PEER), "the backoff doubles")
        self.clock.advance(0.6)
        self.assertTrue(self.client.open_session(PEER))
        self.assertEqual(len(self.connects()), 3)

    def test_no_reservation_means_path_gone_until_announced_anew(self):
        self.client.open_session(PEER)
        self.deny(RelayDenyReason.NO_RESERVATION)
        self.assertFalse(self.client.can_open(PEER))
        self.registry.records[PEER].sequence += 1  # the peer announced again
        self.assertTrue(self.client.can_open(PEER))

    def test_denied_relay_skipped_for_another(self):
        self.registry.records[PEER].paths.append((PathKind.RELAYED, R2_AT, R2))
        self.client.open_session(PEER)
        first = self.connects()[0][0]
        self.client.on_deny(frame(R2 if first == R2_AT else R1), first, SimpleNamespace(
            request=MessageType.RELAY_CONNECT, target=PEER,
            reason=RelayDenyReason.TOO_MANY_SESSIONS, detail="busy"))
        self.assertEqual(len(self.connects()), 2)
        self.assertNotEqual(self.connects()[1][0], first)

    def test_stop_ends_sessions_and_releases(self):
        self.client.tick()
        self.client.on_accept(frame(R1), R1_AT, SimpleNamespace(lifetime_s=120, free_sessions=5))
        self.client.open_session(PEER)
        self.client.on_session(frame(R1), R1_AT, SimpleNamespace(peer=PEER, session=SESSION))
        self.client.stop()
        self.assertEqual([s.address for s in self.sent.of(MessageType.RELAY_END)], [R1_AT])
        self.assertEqual(self.routes, {})
        self.assertEqual(self.client.held, {})
