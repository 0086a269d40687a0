"""
The path manager built alone (with a real Liveness, itself built alone):
establishing, failover to a relay session, giving up, upgrades by hole
punching, punched paths, statistics; on a Clock with fakes for the relay
client, freshness and the registry.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from omerta.mesh.liveness import Liveness
from omerta.mesh.paths import PathManager
from omerta.mesh.peer import DIRECT, PUNCHED, RELAYED, Connections, RelayRoute, State
from omerta.testing.fakes import fake_basics, fixed_identity, proven_pong
from omerta.wire.messages import Capability, MessageType, NatType, PathKind

IDENTITIES = {i.peer_id: i for i in (fixed_identity(0x0A), fixed_identity(0x0C))}
PEER, RELAY = IDENTITIES
AT = ("203.0.113.9", 40000)
PUNCHED_AT = ("203.0.113.9", 40123)
ROUTE = RelayRoute("198.51.100.1", 7400, b"\xf0\x4d\x01\x80" + bytes(8))


class FakeRegistry:
    def __init__(self):
        self.records = {}

    def add(self, peer_id, nat_type=NatType.PORT_RESTRICTED_CONE, paths=()):
        self.records[peer_id] = SimpleNamespace(
            peer_id=peer_id, nat_type=nat_type, paths=list(paths), endpoint=None, capabilities=0,
            last_heard=None, timestamp_ms=0, state="online", rtt=None)

    def get(self, peer_id):
        return self.records.get(peer_id)

    def all(self):
        return list(self.records.values())

    def set_state(self, peer_id, state, now):
        pass

    def set_rtt(self, peer_id, rtt):
        pass


class FakeRelays:
    def __init__(self):
        self.route = None
        self.openable = True
        self.opened, self.failed, self.pinged = [], [], []
        self.pending = set()

    def ping_relay_of(self, route):
        self.pinged.append(route)

    def route_to(self, peer_id):
        return self.route

    def relay_of(self, route):
        return RELAY if isinstance(route, RelayRoute) else None

    def can_open(self, peer_id, exclude_relay=None):
        return self.openable

    def open_session(self, peer_id, exclude_relay=None):
        self.opened.append((peer_id, exclude_relay))
        return self.openable

    def session_failed(self, route):
        self.failed.append(route)

    def coordinator_for(self, peer_id):
        return (RELAY, ROUTE.relay_address)


class FakeFreshness:
    def __init__(self):
        self.contacts, self.failed = {}, []

    def contacts_for(self, peer_id):
        return []

    def learn_contacts(self, contacts):
        pass

    def peer_stale(self, peer_id, address):
        pass

    def path_failed(self, peer_id, address):
        self.failed.append((peer_id, address))


class PathManagerTests(unittest.TestCase):
    def setUp(self):
        self.basics, self.sent, self.events = fake_basics()
        self.clock = self.basics.clock
        self.config = self.basics.config
        self.registry = FakeRegistry()
        self.registry.add(PEER, paths=[(PathKind.DIRECT, AT, bytes(16)),
                                       (PathKind.RELAYED, ROUTE.relay_address, RELAY)])
        self.relays = FakeRelays()
        self.freshness = FakeFreshness()
        self.punches = []
        connections = Connections(self.basics.emit, lambda frame, address: None)
        self.liveness = Liveness(
            self.basics, connections, self.registry, self.freshness, rng=random.Random(1),
            path_failed=lambda link: self.paths.path_failed(link),
            known_addresses=lambda peer_id: self.paths.known_addresses(peer_id),
            address_of=lambda peer_id: self.paths.address_of(peer_id),
            relay_of=self.relays.relay_of, announce_to=lambda address: None,
            observed_address=lambda address: None,
            address_proven=lambda peer_id, address: None)
        self.paths = PathManager(
            self.basics, connections, self.registry, liveness=self.liveness,
            relays=self.relays, freshness=self.freshness, punch=self.punch,
            announce_to=lambda address: None, local_port=lambda: 7400)

    def punch(self, peer_id, coordinator):
        d = Deferred()
        self.punches.append((peer_id, coordinator, d))
        return d

    def prove(self, peer_id, address):
        nonce = self.liveness.ping(peer_id, address)
        self.clock.advance(0.01)
        frame, pong = proven_pong(IDENTITIES[peer_id], self.basics.peer_id, nonce)
        self.liveness.on_pong(frame, address, pong)

    def test_establish_tries_every_way(self):
        """Behind a full cone: a ping to its address, a relay session and a punch."""
        self.registry.records[PEER].nat_type = NatType.FULL_CONE
        self.paths.establish(PEER)
        self.assertEqual([s.address for s in self.sent.of(MessageType.PING)], [AT])
        self.assertEqual(self.relays.opened, [(PEER, None)])
        self.assertEqual([(p, c) for p, c, _ in self.punches], [(PEER, (RELAY, ROUTE.relay_address))])
        self.assertEqual(self.paths.punch_attempts(PEER), 1)

    def test_links_leave_a_filtering_nat_alone(self):
        """
        The liveness links do not ping the global address of a peer behind
        a filtering NAT, or one whose NAT type is unknown yet, unless it
        reached us from there; they may at a full cone's address, at a LAN
        address, or through a relay session.
        """
        for nat in (NatType.UNKNOWN, NatType.PORT_RESTRICTED_CONE, NatType.SYMMETRIC):
            self.registry.records[PEER].nat_type = nat
            self.assertIsNone(self.paths.link_address(PEER), nat)
        self.freshness.contacts[PEER] = SimpleNamespace(address=AT, heard=self.clock.seconds())
        self.assertEqual(self.paths.link_address(PEER), AT)
        del self.freshness.contacts[PEER]
        self.registry.records[PEER].nat_type = NatType.FULL_CONE
        self.assertEqual(self.paths.link_address(PEER), AT)
        lan = ("10.1.2.3", 7400)
        self.registry.records[PEER].nat_type = NatType.SYMMETRIC
        self.freshness.contacts[PEER] = SimpleNamespace(address=lan, heard=self.clock.seconds())
        self.assertEqual(self.paths.link_address(PEER), lan)
        del self.freshness.contacts[PEER]
        self.registry.records[PEER].capabilities = Capability.RELAY | Capability.STUN
        self.registry.records[PEER].nat_type = NatType.UNKNOWN
        self.assertEqual(self.paths.link_address(PEER), AT, "a relay answers strangers")
        self.registry.records[PEER].capabilities = Capability.PROVIDER
        self.assertIsNone(self.paths.link_address(PEER))
        self.relays.route = ROUTE
        self.assertEqual(self.paths.link_address(PEER), ROUTE)

    def test_a_message_to_a_filtering_nat_opens_a_path_first(self):
        """
        A message for a peer behind a filtering NAT that we have no path to
        sends nothing to its public address: it starts a relay session and
        a punch, and waits (C{opening}) until a path is ready, which the
        path manager reports.
        """
        ready = []
        self.paths._path_ready = ready.append
        self.assertIsNone(self.paths.message_address(PEER))
        self.assertEqual(self.sent.of(MessageType.PING), [])
        self.assertEqual(self.relays.opened, [(PEER, None)])
        self.assertEqual(len(self.punches), 1)
        self.relays.pending = {PEER}
        self.assertTrue(self.paths.opening(PEER))
        self.relays.pending = set()
        self.assertTrue(self.paths.opening(PEER), "the punch is still running")

        self.paths.relay_session_opened(PEER, ROUTE, requested=True)
        self.relays.route = ROUTE
        self.assertEqual(ready, [PEER])
        self.assertEqual(self.paths.message_address(PEER), ROUTE)
        self.punches[0][2].callback(PUNCHED_AT)
        self.assertEqual(ready, [PEER, PEER])
        self.assertEqual(self.paths.message_address(PEER), PUNCHED_AT)
        self.assertFalse(self.paths.opening(PEER))

    def test_a_message_to_an_open_nat_goes_at_once(self):
        self.registry.records[PEER].nat_type = NatType.FULL_CONE
        self.assertEqual(self.paths.message_address(PEER), AT)
        self.assertEqual(self.relays.opened, [])

    def test_establish_leaves_a_filtering_nat_to_the_punch(self):
        """
        Behind a filtering NAT (here port-restricted) nothing goes to the
        peer's public address before the punch: it could not get through,
        and on a router without an input filter it would move the peer's
        mapping.  Its LAN address, or one it reached us from lately, is
        pinged.
        """
        self.paths.establish(PEER)
        self.assertEqual(self.sent.of(MessageType.PING), [])
        self.assertNotIn(PEER, self.liveness.links)
        self.assertEqual(self.relays.opened, [(PEER, None)])
        self.assertEqual(len(self.punches), 1)

        self.freshness.contacts[PEER] = SimpleNamespace(address=AT, heard=self.clock.seconds())
        self.paths.establish(PEER)
        self.assertEqual([s.address for s in self.sent.of(MessageType.PING)], [AT])

        lan = ("10.1.2.3", 7400)
        self.freshness.contacts[PEER] = SimpleNamespace(address=lan, heard=self.clock.seconds())
        self.paths.establish(PEER)
        self.assertEqual([s.address for s in self.sent.of(MessageType.PING)][1:], [lan])

    def test_failover_to_an_open_session_and_upgrade_scheduled(self):
        self.liveness.connect(PEER, AT)
        self.prove(PEER, AT)
        link = self.liveness.links[PEER]
        self.relays.route = ROUTE
        self.assertTrue(self.paths.path_failed(link))
        conn = link.conn
        self.assertEqual((conn.path.kind, conn.path.address, conn.path.relay_id),
                         (RELAYED, ROUTE, RELAY))
        self.assertIs(conn.state, State.UNPROVEN)
        self.assertEqual(self.basics.metrics.get("path_failovers", to="relayed"), 1)
        self.assertEqual(conn.next_upgrade, self.clock.seconds() + self.config.upgrade_first)
        self.assertEqual([(d["old"], d["new"]) for d in self.events.of("path_changed")],
                         [(AT, ROUTE)])
        self.assertEqual(self.freshness.failed, [(PEER, AT)])
        # the relay too, at its own address: it has to prove ours if our
        # NAT moved us
        self.assertEqual(self.relays.pinged, [ROUTE])

    def test_failover_asks_for_a_session_then_gives_up(self):
        self.liveness.connect(PEER, AT)
        self.prove(PEER, AT)
        link = self.liveness.links[PEER]
        self.assertTrue(self.paths.path_failed(link))
        self.assertIs(link.conn.state, State.FAILING_OVER)
        self.assertEqual(self.relays.opened, [(PEER, None)])
        self.assertTrue(self.paths.path_failed(link), "still within failover_timeout")
        self.clock.advance(self.config.failover_timeout)
        self.assertFalse(self.paths.path_failed(link))
        self.assertIs(link.conn.state, State.ACTIVE)

    def test_no_other_path_leaves_it_to_liveness(self):
        self.relays.openable = False
        self.liveness.connect(PEER, AT)
        link = self.liveness.links[PEER]
        self.assertFalse(self.paths.path_failed(link))
        self.assertEqual(link.address, AT)

    def test_session_opened_taken_only_without_a_good_path(self):
        self.liveness.connect(PEER, AT)
        self.prove(PEER, AT)
        self.paths.relay_session_opened(PEER, ROUTE, requested=True)
        self.assertEqual(self.liveness.links[PEER].address, AT, "a working path was replaced")
        link = self.liveness.links[PEER]
        self.paths.path_failed(link)  # failing over now
        self.paths.relay_session_opened(PEER, ROUTE, requested=True)
        self.assertEqual(link.conn.path.kind, RELAYED)

    def test_punched_path_replaces_a_relayed_one(self):
        self.paths.relay_session_opened(PEER, ROUTE, requested=True)
        conn = self.liveness.links[PEER].conn
        self.assertEqual(conn.path.kind, RELAYED)
        self.paths.use_punched(PEER, PUNCHED_AT)
        self.assertEqual((conn.path.kind, conn.path.address), (PUNCHED, PUNCHED_AT))
        self.assertTrue(conn.proven)
        self.assertEqual(self.paths.statistics(), {DIRECT: 0, PUNCHED: 1, RELAYED: 0})
        connection = self.paths.connection(PEER)
        self.assertEqual((connection.kind, connection.endpoint, connection.local_port),
                         (PUNCHED, PUNCHED_AT, 7400))

    def test_relayed_link_upgrades_on_schedule_with_backoff(self):
        self.paths.relay_session_opened(PEER, ROUTE, requested=True)
        self.clock.advance(1)
        self.paths.tick()  # schedules the first upgrade
        conn = self.liveness.links[PEER].conn
        first = conn.next_upgrade
        self.clock.advance(first - self.clock.seconds())
        self.paths.tick()
        self.assertEqual(len(self.punches), 1)
        self.assertEqual(self.basics.metrics.get("path_upgrade_attempts"), 1)
        self.assertEqual(first, 1 + self.config.upgrade_initial)
        # the first failures are tried again soon (a lost datagram, a
        # coordinator that had not proven us yet), then the backoff doubles
        for n in range(self.config.punch_retries_soon):
            self.punches[-1][2].callback(None)  # the punch failed
            self.assertFalse(conn.punching)
            self.assertEqual(conn.next_upgrade,
                             self.clock.seconds() + self.config.punch_retry_soon)
            self.clock.advance(self.config.punch_retry_soon)
            self.paths.tick()
            self.assertEqual(len(self.punches), n + 2)
        self.punches[-1][2].callback(None)
        self.assertEqual(conn.upgrade_backoff, 2 * self.config.upgrade_initial)
        self.assertEqual(conn.next_upgrade, self.clock.seconds() + 2 * self.config.upgrade_initial)
        self.paths._punched(PUNCHED_AT, PEER)  # a success resets the quick retries
        self.assertEqual(conn.quick_punches, 0)

    def test_statistics_by_kind(self):
        self.liveness.connect(PEER, AT)
        self.assertEqual(self.paths.statistics(), {DIRECT: 1, PUNCHED: 0, RELAYED: 0})
