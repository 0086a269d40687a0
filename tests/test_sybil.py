"""
Sybil resistance of membership: a hostile member floods 2,000 validly signed
identities from one address (gossip built alone on a C{Clock}, a real
registry, real signatures).  The bounds per source hold and are counted,
nothing refused is passed on, established peers are not evicted, names are
not hijacked, and periodic work does not grow with idle records.
"""

import random
from dataclasses import dataclass

from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.crypto.announce import sign_announcement
from omerta.crypto.identity import Identity
from omerta.mesh.antientropy import AntiEntropy
from omerta.mesh.gossip import Gossip
from omerta.mesh.node import MeshConfig
from omerta.mesh.registry import (
    AmbiguousPeer,
    Outcome,
    PeerRegistry,
    SourceLimits,
)
from omerta.testing.fakes import NETWORK, fake_basics
from omerta.wire.messages import MessageType, NatType, build_body, parse_body
from tests.test_gossip import OWN, Me, identity

NOW = 1_700_000_000.0
FLOOD = 2000
ATTACKER = ("203.0.113.66", 7400)
HONEST = ("198.51.100.7", 7400)


_SYBILS: list[Identity] = []


def sybils(count: int = FLOOD) -> list[Identity]:
    """The attacker's identities (made once: key generation is not free)."""
    while len(_SYBILS) < count:
        _SYBILS.append(identity(1_000_000 + len(_SYBILS)))
    return _SYBILS[:count]


def announce(ident, sequence=1, name="", at=NOW, ttl=0xFFFFFFFF):
    """A real signed announcement; the attacker asks for the longest TTL."""
    return sign_announcement(ident, NETWORK, {
        "name": name, "sequence": sequence, "timestamp_ms": int(at * 1000),
        "ttl_s": ttl, "nat_type": int(NatType.UNKNOWN), "capabilities": 0,
        "paths": [], "resources": {"cpu_cores": 0, "memory_mb": 0, "disk_gb": 0, "gpus": 0},
    })


def wire(msg_type, **fields):
    return parse_body(msg_type, build_body(msg_type, fields))


@dataclass
class Frame:
    sender: bytes


class SybilTestCase(unittest.TestCase):
    max_peers = 10000

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.basics, self.sent, _ = fake_basics(clock=self.clock, identity=OWN,
                                                config=MeshConfig())
        self.registry = PeerRegistry(NETWORK, OWN.peer_id, max_peers=self.max_peers)
        self.active = [(identity(7).peer_id, HONEST)]
        self.gossip = Gossip(
            self.basics, self.registry, Me(), rng=random.Random(0),
            targets=lambda count, rng: self.active[:count],
            verified=lambda peer_id, address: True,
            active_link=lambda peer_id: None,
            own_endpoints=lambda: [], own_relayed_paths=lambda: [],
            bootstrap_answered=lambda addr, peer_id: None)

    def flood(self, count=FLOOD, address=ATTACKER, hops=0, as_list=False):
        """The attacker sends each identity's announcement from C{address}."""
        for ident in sybils(count):
            signed = announce(ident)
            if as_list:
                self.gossip.on_peer_list(Frame(ident.peer_id), address, wire(
                    MessageType.PEER_LIST, request=False,
                    announcements=[{"hops": hops, "announcement": signed}]))
            else:
                self.gossip.on_announce(Frame(ident.peer_id), address, wire(
                    MessageType.ANNOUNCE, hops=hops, announcement=signed))

    def outcomes(self) -> dict:
        return self.basics.metrics.by_label("gossip_announcements", "outcome")

    def held_sybils(self) -> int:
        ids = {s.peer_id for s in sybils()}
        return sum(1 for record in self.registry.all() if record.peer_id in ids)


class SourceBoundTests(SybilTestCase):
    def test_flood_from_one_address_is_bounded_and_counted(self):
        """2,000 identities from one address: only the burst is taken, the rest are refused and counted."""
        self.flood()
        limits = self.registry.limits
        held = self.held_sybils()
        self.assertEqual(held, min(limits.address_burst, limits.ip_burst))
        self.assertEqual(self.outcomes().get("source_rate"), FLOOD - held)
        self.assertEqual(self.outcomes().get("new"), held)
        # another source's budget is untouched
        honest = identity(9)
        self.gossip.on_announce(Frame(honest.peer_id), HONEST, wire(
            MessageType.ANNOUNCE, hops=0, announcement=announce(honest, ttl=3600)))
        self.assertIn(honest.peer_id, self.registry)

    def test_refused_identities_are_not_gossiped(self):
        """Nothing refused becomes a rumour, so a round passes on only what was taken."""
        self.flood()
        ids = {s.peer_id for s in sybils()}
        rumoured = {origin for origin in self.gossip.rumours if origin in ids}
        self.assertEqual(rumoured, {r.peer_id for r in self.registry.all() if r.peer_id in ids})
        self.assertLessEqual(len(rumoured), self.registry.limits.address_burst)

    def test_claimed_hops_do_not_escape_the_bound(self):
        """Claiming to relay (hops > 0, in a peer list) is charged to the sending address just the same; only the list a joining node asked for is taken whole."""
        self.flood(hops=3, as_list=True)
        self.assertEqual(self.held_sybils(), self.registry.limits.address_burst)
        self.assertEqual(self.outcomes().get("source_rate"),
                         FLOOD - self.registry.limits.address_burst)
        joining = PeerRegistry(NETWORK, OWN.peer_id)
        self.registry = self.gossip.registry = joining
        self.gossip.send_peer_list(ATTACKER, request=True, peer_id=identity(7).peer_id)
        entries = [{"hops": 1, "announcement": announce(s)} for s in sybils(200)]
        for start in range(0, len(entries), 4):
            self.gossip.on_peer_list(Frame(identity(7).peer_id), ATTACKER, wire(
                MessageType.PEER_LIST, request=False, announcements=entries[start:start + 4]))
        self.assertEqual(self.held_sybils(), 200)


    def test_rate_refills_and_total_is_capped(self):
        """The budget refills at the configured rate, and the records one IP introduced are capped."""
        self.registry = PeerRegistry(NETWORK, OWN.peer_id, limits=SourceLimits(
            address_burst=10, address_per_minute=600, ip_burst=10, ip_per_minute=600,
            max_per_ip=25))
        self.gossip.registry = self.registry
        for minute in range(10):
            for index in range(2000 // 10 * minute, 2000 // 10 * (minute + 1)):
                self.registry.accept(announce(sybils()[index]), self.clock.seconds(),
                                     source=("203.0.113.66", 7400 + index % 3))
            self.clock.advance(60)
        self.assertEqual(self.held_sybils(), 25)

    def test_updates_of_held_peers_cost_nothing(self):
        """A peer already held re-announces as often as it likes (no new identity)."""
        self.flood()
        first = sybils(1)[0]
        for sequence in range(2, 50):
            self.assertEqual(self.registry.accept(announce(first, sequence=sequence), NOW,
                                                  source=ATTACKER), Outcome.UPDATED)

class EvictionTests(SybilTestCase):
    max_peers = 100

    def test_flood_into_a_full_registry_evicts_no_established_peer(self):
        """A flood at max_peers evicts nothing this node heard from or loaded, and never itself."""
        established = [identity(50 + i) for i in range(60)]
        for index, ident in enumerate(established):
            self.registry.accept(announce(ident, ttl=3600), NOW)
            if index % 2:
                self.registry.heard_from(ident.peer_id, ("192.0.2.1", 1000 + index), NOW)
        honest = [identity(500 + i) for i in range(20)]
        for ident in honest:
            self.registry.accept(announce(ident, ttl=3600), NOW, source=HONEST)
        for hour in range(20):  # the attacker keeps going, budget after budget
            for ident in sybils()[hour * 100:(hour + 1) * 100]:
                self.registry.accept(announce(ident, at=self.clock.seconds()),
                                     self.clock.seconds(), source=ATTACKER)
            self.clock.advance(600)
        self.assertLessEqual(len(self.registry), self.max_peers)
        for ident in established + honest:
            self.assertIn(ident.peer_id, self.registry)
        # a newcomer from another source still gets in, at the flood's expense
        newcomer = identity(999)
        self.assertEqual(self.registry.accept(announce(newcomer, at=self.clock.seconds()),
                                              self.clock.seconds(), source=("192.0.2.99", 1)),
                         Outcome.NEW)
        self.assertGreater(self.registry.evicted, 0)


class NameTests(SybilTestCase):
    def test_name_not_hijacked_while_its_owner_is_away(self):
        """A squatter cannot take a held name; while the provider's record has expired, its claim makes the name ambiguous (listing both ids), and the provider takes it back when it returns."""
        provider, squatter = identity(42), sybils(1)[0]
        self.registry.accept(announce(provider, name="provider-1", ttl=600), NOW, source=HONEST)
        self.assertEqual(self.registry.accept(announce(squatter, name="Provider-1"), NOW + 1,
                                              source=ATTACKER), Outcome.NAME_TAKEN)
        self.assertEqual(self.registry.lookup("provider-1").peer_id, provider.peer_id)
        self.clock.advance(3600)
        self.registry.expire(self.clock.seconds())
        now = self.clock.seconds()
        self.assertEqual(self.registry.accept(announce(squatter, name="provider-1", at=now), now,
                                              source=ATTACKER), Outcome.NEW)
        with self.assertRaises(AmbiguousPeer) as caught:
            self.registry.lookup("provider-1")
        self.assertIn(provider.peer_id_text, str(caught.exception))
        self.assertIn(squatter.peer_id_text, str(caught.exception))
        self.clock.advance(60)
        now = self.clock.seconds()
        self.assertEqual(self.registry.accept(announce(provider, 2, "provider-1", now, 3600), now,
                                              source=HONEST), Outcome.NEW)
        self.assertEqual(self.registry.lookup("provider-1").peer_id, provider.peer_id)

    def test_name_owner_survives_a_restart(self):
        """The first key of a name is saved: after a restart a squatter still cannot take it."""
        provider, squatter = identity(42), sybils(1)[0]
        self.registry.accept(announce(provider, name="provider-1", ttl=600), NOW, source=HONEST)
        path = self.mktemp()
        self.registry.save(path)
        later = NOW + 3600
        loaded = PeerRegistry(NETWORK, OWN.peer_id)
        loaded.load(path, later)
        loaded.accept(announce(squatter, name="provider-1", at=later), later, source=ATTACKER)
        self.assertRaises(AmbiguousPeer, loaded.lookup, "provider-1")


class IdleCostTests(SybilTestCase):
    def tick(self):
        """What the overlay does every second with the registry, and a gossip round."""
        now = self.clock.seconds()
        self.registry.expire(now)
        self.registry.cleanup_offline(now, 3600)
        self.registry.sample(8, random.Random(0), lambda record: record.state != "offline")
        self.gossip.round()

    def fill(self, count):
        for ident in sybils(count):
            self.registry.accept(announce(ident), self.clock.seconds())

    def work_per_tick(self, ticks=30):
        self.registry.work = 0
        for _ in range(ticks):
            self.clock.advance(1)
            self.tick()
        return self.registry.work

    def test_tick_cost_does_not_grow_with_idle_records(self):
        """The per-second work on 2,000 idle records is that on 20."""
        self.fill(20)
        self.gossip.rumours.clear()
        small = self.work_per_tick()
        self.fill(FLOOD)
        self.gossip.rumours.clear()
        for record in self.registry.all()[:10]:
            self.registry.set_state(record.peer_id, "offline", self.clock.seconds())
        large = self.work_per_tick()
        self.assertLessEqual(large, small + 30)

    def test_sync_sends_a_digest_not_the_registry(self):
        """Anti-entropy sends a digest of at most 256 buckets, touching no record to build it."""
        self.fill(FLOOD)
        sync = AntiEntropy(self.basics, self.registry, own_sequence=lambda: 1,
                           targets=lambda count, rng: self.active[:count],
                           verified=lambda peer_id, address: True,
                           send_records=lambda address, records: None,
                           tell_gone=lambda peer_id, address: None)
        del self.sent[:]
        self.registry.work = 0
        sync.sync()
        [digest] = self.sent
        self.assertEqual(digest.type, MessageType.SYNC_DIGEST)
        self.assertLessEqual(len(digest.fields["hashes"]), 256)
        self.assertEqual(self.registry.work, 0)

    def test_save_rebuilds_only_when_changed(self):
        """An idle registry's file is not rebuilt (the same bytes are written again); a change rebuilds it."""
        self.fill(50)
        path = self.mktemp()
        self.assertTrue(self.registry.save(path))
        self.registry.heard_from(sybils(1)[0].peer_id, ("192.0.2.1", 1), NOW)
        self.assertTrue(self.registry.save(path))
        self.registry.heard_from(sybils(1)[0].peer_id, ("192.0.2.1", 1), NOW + 10)
        self.registry.set_rtt(sybils(1)[0].peer_id, 0.01)
        self.registry.work = 0
        with open(path, "rb") as f:
            before = f.read()
        self.assertFalse(self.registry.save(path))
        self.assertEqual(self.registry.work, 0)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.registry.remove(sybils(2)[1].peer_id)
        self.assertTrue(self.registry.save(path))

    def test_expiry_cap_survives_restart(self):
        """A record's 2 h cap counts from its first arrival, not from each restart."""
        self.fill(10)
        path = self.mktemp()
        self.registry.save(path)
        loaded = PeerRegistry(NETWORK, OWN.peer_id)
        loaded.load(path, NOW + 7000)
        self.assertEqual(len(loaded), 10)
        self.assertEqual(len(loaded.expire(NOW + 7200)), 10)
