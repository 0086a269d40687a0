"""
The relay role's limits against a hostile member: one that holds the network
key, so it can claim any peer id (and answer pings for it), plays each attack
from one socket or one IP against L{RelayServer} on a Clock with fakes; each
is refused, counted, and leaves room for honest members.
"""

from __future__ import annotations

import itertools

from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.mesh.events import Events
from omerta.mesh.relay import RelayConfig, RelayServer, source_ip
from omerta.metrics import Metrics
from omerta.wire.envelope import MIN_FRAME_SIZE
from omerta.mesh.peer import RelayRoute
from omerta.wire.messages import (MessageType, RelayDenyReason, RelayEndReason,
                                  build_body, parse_body)
from omerta.wire.relay import HEADER_SIZE

NETWORK = bytes.fromhex("0123456789abcdef")
HOSTILE_IP = "203.0.113.66"


def frame_size(msg_type: MessageType, fields: dict) -> int:
    """The size on the wire of a sealed frame carrying these fields."""
    return MIN_FRAME_SIZE + len(build_body(msg_type, fields))


class FakeFrame:
    """What the overlay hands the relay role: an opened frame."""

    def __init__(self, msg_type: MessageType, sender: bytes, body: bytes):
        self.type = msg_type
        self.sender = sender
        self.body = body


class FakeLiveness:
    """Which (peer id, address) pairs a pong has proven."""

    def __init__(self):
        self.proven: set[tuple[bytes, tuple]] = set()

    def verified(self, peer_id: bytes, address: tuple) -> bool:
        return (peer_id, address) in self.proven


class FakeOverlay:
    """One network of the relay's node: records what it sends, with sizes."""

    def __init__(self):
        self.network_id = NETWORK
        self.liveness = FakeLiveness()
        self.registry = {}  # peer id -> record (with .state), as the relay reads it
        self.sent: list[tuple[tuple, MessageType, dict, int]] = []

    def send(self, address: tuple, msg_type: MessageType, **fields) -> None:
        self.sent.append((address, msg_type, fields, frame_size(msg_type, fields)))

    def sent_to(self, address: tuple, msg_type: MessageType | None = None) -> list:
        return [s for s in self.sent
                if s[0] == address and (msg_type is None or s[1] == msg_type)]


class FakeNode:
    def __init__(self):
        self.clock = Clock()
        self.metrics = Metrics()
        self.events = Events()
        self.overlays = {NETWORK: FakeOverlay()}


class FakeTransport:
    """A datagram transport without a socket: the relay writes through it."""

    def __init__(self):
        self.written: list[tuple[bytes, tuple]] = []

    def write(self, datagram: bytes, address: tuple) -> None:
        self.written.append((datagram, address))


class Member:
    """
    A member at one source address.  It may claim any peer id: a hostile
    one invents them (and answers the relay's pings for each, so each is
    proven at its address unless told otherwise).
    """

    _ids = itertools.count(1)

    def __init__(self, relay: RelayServer, overlay: FakeOverlay, address: tuple):
        self.relay = relay
        self.overlay = overlay
        self.address = address
        self.peer_id = self.invent()

    @classmethod
    def invent(cls) -> bytes:
        return next(cls._ids).to_bytes(16, "big")

    def _request(self, msg_type, sender, proven, **fields) -> int:
        if proven:
            self.overlay.liveness.proven.add((sender, self.address))
        body = build_body(msg_type, fields)
        handler = {MessageType.RELAY_RESERVE: self.relay.on_reserve,
                   MessageType.RELAY_CONNECT: self.relay.on_connect}[msg_type]
        handler(self.overlay, FakeFrame(msg_type, sender, body), self.address,
                parse_body(msg_type, body))
        return MIN_FRAME_SIZE + len(body)

    def reserve(self, peer_id: bytes | None = None, proven: bool = True) -> int:
        """RELAY_RESERVE as C{peer_id} (ours by default); the frame's size."""
        return self._request(MessageType.RELAY_RESERVE, peer_id or self.peer_id, proven,
                             lifetime_s=120)

    def connect(self, target: bytes, peer_id: bytes | None = None, proven: bool = True) -> int:
        """RELAY_CONNECT(target) as C{peer_id}; the frame's size."""
        return self._request(MessageType.RELAY_CONNECT, peer_id or self.peer_id, proven,
                             target=target)

    def reserved(self) -> bool:
        return (NETWORK, self.peer_id) in self.relay.reservations

    def session_with(self, other: Member):
        for session in self.relay.sessions.values():
            if session.pair() == frozenset((self.peer_id, other.peer_id)):
                return session
        return None


class RelayLimitTestCase(unittest.TestCase):
    config = RelayConfig()

    def setUp(self):
        self.node = FakeNode()
        self.overlay = self.node.overlays[NETWORK]
        self.relay = RelayServer(self.node, self.config)
        self.transport = FakeTransport()
        self.relay.attach(self.transport)
        self.relay.start()
        self.addCleanup(self.relay.stop)
        self.metrics = self.node.metrics
        self.hosts = (f"198.51.100.{i}" for i in range(1, 255))

    def member(self, address: tuple | None = None) -> Member:
        """A member at C{address} (default: one of its own on a fresh IP)."""
        return Member(self.relay, self.overlay, address or (next(self.hosts), 7400))

    def hostile(self, port: int = 40000) -> Member:
        return self.member((HOSTILE_IP, port))

    def denied(self, reason: str) -> int:
        return self.metrics.get("relay_denied", reason=reason)

    def held_from(self, ip: str) -> int:
        return sum(1 for r in self.relay.reservations.values() if r.address[0] == ip)

    def opened_from(self, ip: str) -> int:
        return sum(1 for s in self.relay.sessions.values() if s.a.address[0] == ip)


class ReservationLimitTests(RelayLimitTestCase):
    def test_one_socket_cannot_take_all_reservations(self):
        """One socket inventing peer ids holds at most reservations_per_address."""
        attacker = self.hostile()
        tries = self.config.max_reservations + 10
        for _ in range(tries):
            attacker.reserve(Member.invent())
        held = self.held_from(HOSTILE_IP)
        self.assertEqual(held, self.config.reservations_per_address)
        self.assertEqual(self.denied("too_many_reservations"), tries - held)
        honest = self.member()
        honest.reserve()
        self.assertTrue(honest.reserved())
        self.assertEqual(self.overlay.sent_to(honest.address, MessageType.RELAY_ACCEPT)[0][2]
                         ["lifetime_s"], 120)

    def test_one_ip_cannot_take_all_reservations(self):
        """Many sockets on one IP hold at most reservations_per_ip together."""
        tries = 0
        for port in range(40000, 40300):
            attacker = self.hostile(port)
            for _ in range(5):
                attacker.reserve(Member.invent())
                tries += 1
        held = self.held_from(HOSTILE_IP)
        self.assertEqual(held, self.config.reservations_per_ip)
        self.assertEqual(self.denied("too_many_reservations"), tries - held)
        honest = self.member()
        honest.reserve()
        self.assertTrue(honest.reserved())

    def test_reservation_moving_to_a_full_address_is_refused(self):
        """A reservation cannot move onto an address already at its limit."""
        attacker = self.hostile()
        for _ in range(self.config.reservations_per_address):
            attacker.reserve(Member.invent())
        elsewhere = self.hostile(41000)
        elsewhere.reserve()
        self.assertTrue(elsewhere.reserved())
        # the same peer id, now claiming the full socket's address
        attacker.reserve(elsewhere.peer_id)
        self.assertEqual(self.relay.reservations[(NETWORK, elsewhere.peer_id)].address,
                         elsewhere.address)
        self.assertEqual(self.denied("too_many_reservations"), 1)

    def test_released_reservations_free_their_address(self):
        """A released or expired reservation no longer counts at its address."""
        attacker = self.hostile()
        ids = [Member.invent() for _ in range(self.config.reservations_per_address)]
        for peer_id in ids:
            attacker.reserve(peer_id)
        self.node.clock.advance(self.config.max_lifetime + 1)
        self.assertEqual(self.relay.reservations, {})
        for peer_id in ids:
            attacker.reserve(peer_id)
        self.assertEqual(self.held_from(HOSTILE_IP), len(ids))
        self.assertEqual(self.denied("too_many_reservations"), 0)


class SessionLimitTests(RelayLimitTestCase):
    def targets(self, count: int) -> list[Member]:
        """Honest members, each on its own IP, holding a reservation."""
        members = [self.member() for _ in range(count)]
        for target in members:
            target.reserve()
            self.assertTrue(target.reserved())
        return members

    def test_one_socket_cannot_fill_a_targets_slots(self):
        """One socket inventing requesters gets sessions_per_ip_to_peer of a target's slots."""
        target, = self.targets(1)
        attacker = self.hostile()
        tries = self.config.sessions_per_peer + 5
        for _ in range(tries):
            attacker.connect(target.peer_id, Member.invent())
        opened = self.opened_from(HOSTILE_IP)
        self.assertEqual(opened, self.config.sessions_per_ip_to_peer)
        self.assertEqual(self.denied("too_many_sessions"), tries - opened)
        honest = self.member()
        honest.connect(target.peer_id)
        self.assertIsNotNone(honest.session_with(target))

    def test_many_sockets_on_one_ip_cannot_fill_a_targets_slots(self):
        """Sockets on one IP share the sessions_per_ip_to_peer cap towards a target."""
        target, = self.targets(1)
        for port in range(40000, 40000 + self.config.sessions_per_peer):
            self.hostile(port).connect(target.peer_id, Member.invent())
        self.assertEqual(self.opened_from(HOSTILE_IP), self.config.sessions_per_ip_to_peer)
        honest = self.member()
        honest.connect(target.peer_id)
        self.assertIsNotNone(honest.session_with(target))

    def test_sessions_left_behind_make_room(self):
        """
        Short-lived nodes behind one IP (each run a fresh peer id) that left
        their sessions without a RELAY_END are not locked out: a session
        idle for session_reclaim seconds gives its slot to the next.
        """
        target, = self.targets(1)
        for port in range(40000, 40000 + self.config.sessions_per_ip_to_peer):
            self.hostile(port).connect(target.peer_id, Member.invent())
        late = self.hostile(41000)
        late.connect(target.peer_id, late.peer_id)
        self.assertIsNone(late.session_with(target))
        self.node.clock.advance(self.config.session_reclaim)
        late.connect(target.peer_id, late.peer_id)
        self.assertIsNotNone(late.session_with(target))
        self.assertEqual(self.opened_from(HOSTILE_IP), self.config.sessions_per_ip_to_peer)
        self.assertEqual(self.metrics.get("relay_sessions_reclaimed"), 1)
        self.assertEqual(self.metrics.get("relay_sessions", event="idle"), 1)

    def test_sessions_in_use_are_not_reclaimed(self):
        """Sessions both ends keep using keep their slots however long they last."""
        target, = self.targets(1)
        sessions = []
        for port in range(40000, 40000 + self.config.sessions_per_ip_to_peer):
            requester = self.hostile(port)
            requester.connect(target.peer_id, Member.invent())
            sessions.append((requester.address, self.relay.sessions[list(self.relay.sessions)[-1]]))
        for _ in range(int(self.config.session_reclaim) * 2):
            self.node.clock.advance(1.0)
            for address, session in sessions:
                self.relay.forward(session.header + bytes(40), address)
                self.relay.forward(session.header + bytes(40), target.address)
        late = self.hostile(41000)
        late.connect(target.peer_id, late.peer_id)
        self.assertIsNone(late.session_with(target))
        self.assertEqual(self.metrics.get("relay_sessions_reclaimed"), 0)

    def test_one_socket_cannot_take_all_sessions(self):
        """One socket opening sessions to many targets holds at most sessions_per_address."""
        targets = self.targets(self.config.max_sessions + 5)
        attacker = self.hostile()
        for target in targets[:-1]:
            attacker.connect(target.peer_id, Member.invent())
        opened = self.opened_from(HOSTILE_IP)
        self.assertEqual(opened, self.config.sessions_per_address)
        self.assertEqual(self.denied("too_many_sessions"), len(targets) - 1 - opened)
        honest = self.member()
        honest.connect(targets[-1].peer_id)
        self.assertIsNotNone(honest.session_with(targets[-1]))

    def test_one_ip_cannot_take_all_sessions(self):
        """Sockets on one IP hold at most sessions_per_ip sessions together."""
        targets = self.targets(self.config.max_sessions + 5)
        sockets = (self.hostile(port) for port in itertools.count(40000))
        for target in targets[:-1]:
            attacker = next(sockets)
            attacker.connect(target.peer_id, Member.invent())
        self.assertEqual(self.opened_from(HOSTILE_IP), self.config.sessions_per_ip)
        honest = self.member()
        honest.connect(targets[-1].peer_id)
        self.assertIsNotNone(honest.session_with(targets[-1]))

    def test_asking_again_does_not_open_a_second_session(self):
        """A requester asking again for its pair renews the session, within the limits."""
        target, = self.targets(1)
        requester = self.member()
        for _ in range(5):
            requester.connect(target.peer_id)
        self.assertEqual(len(self.relay.sessions), 1)
        self.assertEqual(self.metrics.total("relay_denied"), 0)


class FollowTests(RelayLimitTestCase):
    """
    A member whose NAT gives it a new mapping: once the relay's liveness has
    proven it at the new address (a path_changed event), its reservation and
    its sessions' legs follow; nothing moves on an unproven claim.
    """

    def moved(self, member: Member, new: tuple, proven: bool = True, old=None) -> None:
        if proven:
            self.overlay.liveness.proven.add((member.peer_id, new))
        self.node.events.emit("path_changed", network=NETWORK, peer_id=member.peer_id,
                              old=member.address if old is None else old, new=new,
                              path_kind="direct")
        self.node.clock.advance(0)

    def test_reservation_and_legs_follow_a_proven_move(self):
        target, requester = self.member(), self.member()
        target.reserve()
        requester.connect(target.peer_id)
        session = requester.session_with(target)
        self.overlay.sent.clear()
        new = (target.address[0], 20001)
        self.moved(target, new)
        self.assertEqual(self.relay.reservations[(NETWORK, target.peer_id)].address, new)
        self.assertEqual(session.b.address, new)
        self.assertEqual(session.a.address, requester.address)
        self.assertEqual(self.metrics.get("relay_reservations", event="moved"), 1)
        # both ends hear of the session again: the moved one may have
        # missed its RELAY_SESSION
        self.assertEqual(len(self.overlay.sent_to(new, MessageType.RELAY_SESSION)), 1)
        self.assertEqual(len(self.overlay.sent_to(requester.address,
                                                  MessageType.RELAY_SESSION)), 1)
        # data from the new address is forwarded, from the old one not
        data = session.header + b"x" * 20
        self.assertTrue(self.relay.forward(data, new))
        self.assertEqual(self.transport.written[-1], (data, requester.address))
        self.relay.forward(data, target.address)
        self.assertEqual(self.metrics.get("relay_drops", reason="not_bound"), 1)

    def test_unproven_move_changes_nothing(self):
        target = self.member()
        target.reserve()
        self.moved(target, (target.address[0], 20001), proven=False)
        self.assertEqual(self.relay.reservations[(NETWORK, target.peer_id)].address,
                         target.address)

    def test_move_from_a_relayed_path_follows_the_reservation(self):
        """Our own path to the holder had failed over to another relay: the old address is a route."""
        target = self.member()
        target.reserve()
        new = (target.address[0], 20001)
        self.moved(target, new, old=RelayRoute("198.51.100.250", 7400, b"h" * 12))
        self.assertEqual(self.relay.reservations[(NETWORK, target.peer_id)].address, new)

    def test_reservation_follows_a_proof_without_a_move(self):
        """
        A proof of a new address moves the reservation even when the
        relay's own link to the member stays where it is.
        """
        target, requester = self.member(), self.member()
        target.reserve()
        requester.connect(target.peer_id)
        session = requester.session_with(target)
        new = (target.address[0], 20001)
        self.relay.holder_proven(NETWORK, target.peer_id, new)
        self.assertEqual(self.relay.reservations[(NETWORK, target.peer_id)].address, target.address,
                         "not proven to the liveness")
        self.overlay.liveness.proven.add((target.peer_id, new))
        self.relay.holder_proven(NETWORK, target.peer_id, new)
        self.assertEqual(self.relay.reservations[(NETWORK, target.peer_id)].address, new)
        self.assertEqual(session.b.address, new)
        self.relay.holder_proven(NETWORK, requester.peer_id, (requester.address[0], 1))
        self.assertEqual(session.a.address, requester.address, "no reservation: nothing moves")

    def test_legs_of_a_member_without_reservation_follow(self):
        target, requester = self.member(), self.member()
        target.reserve()
        requester.connect(target.peer_id)
        session = requester.session_with(target)
        new = (requester.address[0], 20002)
        self.moved(requester, new)
        self.assertEqual(session.a.address, new)
        self.assertEqual(self.metrics.get("relay_legs_moved"), 1)

    def test_move_into_a_crowded_address_is_refused(self):
        """The per-address reservation limit holds for a move too."""
        crowd = (HOSTILE_IP, 40000)
        attacker = self.member(crowd)
        for _ in range(self.config.reservations_per_address):
            attacker.reserve(Member.invent())
        target = self.member()
        target.reserve()
        self.moved(target, crowd)
        self.assertEqual(self.relay.reservations[(NETWORK, target.peer_id)].address,
                         target.address)
        self.assertEqual(self.metrics.get("relay_reservations", event="move_refused"), 1)


class PacketRateTests(RelayLimitTestCase):
    config = RelayConfig(packets_per_second=10)

    def open_sessions(self, requester_address: tuple, count: int) -> list:
        """Sessions from C{count} peer ids at one address to as many targets."""
        sessions = []
        for _ in range(count):
            target = self.member()
            target.reserve()
            requester = self.member(requester_address)
            requester.connect(target.peer_id)
            sessions.append((requester.session_with(target), target))
        return sessions

    def test_legs_from_one_address_share_one_budget(self):
        """All legs from one source address share packets_per_second."""
        sessions = self.open_sessions((HOSTILE_IP, 40000), 4)
        for session, _target in sessions:
            for _ in range(self.config.packets_per_second):
                self.relay.forward(session.header + bytes(40), (HOSTILE_IP, 40000))
        self.assertEqual(len(self.transport.written), self.config.packets_per_second)
        self.assertEqual(self.relay.dropped, 3 * self.config.packets_per_second)
        self.node.clock.advance(1.0)
        session, target = sessions[0]
        self.relay.forward(session.header + bytes(40), (HOSTILE_IP, 40000))
        self.assertEqual(self.transport.written[-1][1], target.address,
                         "the budget did not refill after a second")

    def test_the_other_end_keeps_its_own_budget(self):
        """A flooding source does not spend the budget of the members it talks to."""
        (session, target), = self.open_sessions((HOSTILE_IP, 40000), 1)
        for _ in range(3 * self.config.packets_per_second):
            self.relay.forward(session.header + bytes(40), (HOSTILE_IP, 40000))
        before = len(self.transport.written)
        for _ in range(self.config.packets_per_second):
            self.relay.forward(session.header + bytes(40), target.address)
        self.assertEqual(len(self.transport.written) - before, self.config.packets_per_second)

    def test_rate_limited_packets_are_counted(self):
        """Packets over the budget reach the drop metrics."""
        (session, _target), = self.open_sessions((HOSTILE_IP, 40000), 1)
        for _ in range(self.config.packets_per_second + 7):
            self.relay.forward(session.header + bytes(40), (HOSTILE_IP, 40000))
        self.node.clock.advance(1.0)
        self.assertEqual(self.metrics.get("relay_dropped_packets"), 7)
        self.relay.stop()
        self.assertEqual(self.metrics.get("relay_drops", reason="rate_limited"), 7)

    def test_a_session_one_end_left_still_goes_idle(self):
        """A shared budget does not hide a leg that stopped sending (the idle rule)."""
        (used, used_target), (left, left_target) = self.open_sessions((HOSTILE_IP, 40000), 2)
        for _ in range(int(self.config.session_idle) + 2):
            # the requester keeps using one session, the other target keeps
            # calling into the one the requester left
            self.relay.forward(used.header + bytes(40), (HOSTILE_IP, 40000))
            self.relay.forward(used.header + bytes(40), used_target.address)
            self.relay.forward(left.header + bytes(40), left_target.address)
            self.node.clock.advance(1.0)
        self.assertIn(used.header, self.relay.sessions)
        self.assertNotIn(left.header, self.relay.sessions)
        self.assertEqual(self.metrics.get("relay_sessions", event="idle"), 1)

    def test_budgets_of_addresses_without_legs_are_forgotten(self):
        """The per-address budgets do not outlive the legs at the address."""
        (session, _target), = self.open_sessions((HOSTILE_IP, 40000), 1)
        self.relay._end(session, RelayEndReason.CLOSED)
        self.node.clock.advance(1.0)
        self.assertEqual(self.relay._budgets, {})


class DenialTests(RelayLimitTestCase):
    def test_no_answer_larger_than_the_request_to_an_unproven_address(self):
        """A request from an unproven (maybe spoofed) address gets nothing larger back."""
        target = self.member()
        target.reserve()
        victim = self.member()  # the address a hostile member writes as its source
        self.overlay.sent.clear()
        sizes = [victim.reserve(proven=False),
                 victim.connect(target.peer_id, proven=False),
                 victim.connect(victim.peer_id, proven=False),   # a session to itself
                 victim.connect(Member.invent(), proven=False)]  # nobody's reservation
        answers = self.overlay.sent_to(victim.address)
        self.assertEqual(answers, [], f"sent for requests of {sizes} bytes")
        self.assertEqual(self.denied("unproven"), 4)
        self.assertEqual(self.metrics.get("relay_denials_unsent", why="unproven"), 4)
        self.assertEqual(self.relay.sessions, {})
        self.assertFalse(victim.reserved())

    def test_any_deny_is_larger_than_a_request(self):
        """Why unproven addresses get no RELAY_DENY at all: even without detail it is larger."""
        deny = frame_size(MessageType.RELAY_DENY, {
            "request": int(MessageType.RELAY_RESERVE), "target": bytes(16),
            "reason": int(RelayDenyReason.UNPROVEN), "detail": ""})
        self.assertGreater(deny, frame_size(MessageType.RELAY_RESERVE, {"lifetime_s": 120}))
        self.assertGreater(deny, frame_size(MessageType.RELAY_CONNECT, {"target": bytes(16)}))

    def test_denials_to_one_address_are_rate_limited(self):
        """A flood of refused requests gets denials_per_second RELAY_DENY a second, all counted."""
        attacker = self.hostile()
        for _ in range(100):
            attacker.connect(Member.invent())  # nobody's reservation
        self.assertEqual(self.denied("no_reservation"), 100)
        denies = self.overlay.sent_to(attacker.address, MessageType.RELAY_DENY)
        self.assertEqual(len(denies), self.config.denials_per_second)
        self.assertEqual(self.metrics.get("relay_denials_unsent", why="rate_limited"),
                         100 - self.config.denials_per_second)
        self.node.clock.advance(1.0)
        attacker.connect(Member.invent())
        self.assertEqual(len(self.overlay.sent_to(attacker.address, MessageType.RELAY_DENY)),
                         self.config.denials_per_second + 1)

    def test_proven_requester_told_why(self):
        """A proven requester over a limit gets a RELAY_DENY with the reason and detail."""
        attacker = self.hostile()
        for _ in range(self.config.reservations_per_address + 1):
            attacker.reserve(Member.invent())
        (_address, _type, fields, _size), = self.overlay.sent_to(
            attacker.address, MessageType.RELAY_DENY)
        self.assertEqual(fields["reason"], RelayDenyReason.TOO_MANY_RESERVATIONS)
        self.assertIn("this address", fields["detail"])

    def test_relayed_requests_dropped(self):
        """A control request that came through a relay session is dropped and counted."""
        route = RelayRoute("198.51.100.9", 7400, bytes(HEADER_SIZE))
        member = self.member(route)
        member.reserve()
        self.assertFalse(member.reserved())
        self.assertEqual(self.overlay.sent, [])
        self.assertEqual(self.metrics.get("relay_drops", reason="relayed_request"), 1)


class SourceIpTests(unittest.TestCase):
    def test_grouping(self):
        """Per-IP limits count IPv4 by address, IPv6 by /64, mapped IPv4 as IPv4."""
        self.assertEqual(source_ip("198.51.100.7"), "198.51.100.7")
        self.assertEqual(source_ip("2001:db8:1:2:aaaa::1"), source_ip("2001:db8:1:2::ffff"))
        self.assertNotEqual(source_ip("2001:db8:1:2::1"), source_ip("2001:db8:1:3::1"))
        self.assertEqual(source_ip("::ffff:198.51.100.7"), "198.51.100.7")
        self.assertEqual(source_ip("fe80::1%eth0"), source_ip("fe80::2"))
