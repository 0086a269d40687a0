"""
The peer registry of one network: the announcement validation matrix,
look-ups, resource matching, reputation, expiry and the state file.
"""

import base64
import json
import os
import re
import stat
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.logger import Logger
from twisted.trial import unittest

from omerta.crypto.announce import sign_announcement
from omerta.crypto.identity import Identity
from omerta.metrics import Metrics
from omerta.mesh.registry import (
    AmbiguousPeer,
    Outcome,
    PeerNotFound,
    PeerRegistry,
    PeerState,
    Requirements,
    Resources,
)
from omerta.storage import StateFileError
from omerta.wire.messages import (
    Capability,
    MessageType,
    NatType,
    PathKind,
    build_body,
    parse_body,
)

NET = bytes.fromhex("0123456789abcdef")
OTHER_NET = bytes.fromhex("fedcba9876543210")
NOW = 1_700_000_000.0


def identity(seed: int) -> Identity:
    """
    A deterministic identity: the same seed gives the same peer id.
    """
    return Identity(Ed25519PrivateKey.from_private_bytes(seed.to_bytes(32, "big")))


def announce(
    ident,
    *,
    sequence=1,
    name="",
    at=NOW,
    ttl=3600,
    timestamp_ms=None,
    nat_type=NatType.UNKNOWN,
    capabilities=0,
    paths=(),
    cpu=0,
    memory=0,
    disk=0,
    gpus=0,
    network_id=NET,
):
    """
    A real signed announcement (the value ANNOUNCE frames carry).
    """
    return sign_announcement(
        ident,
        network_id,
        {
            "name": name,
            "sequence": sequence,
            "timestamp_ms": int(at * 1000) if timestamp_ms is None else timestamp_ms,
            "ttl_s": ttl,
            "nat_type": int(nat_type),
            "capabilities": int(capabilities),
            "paths": list(paths),
            "resources": {"cpu_cores": cpu, "memory_mb": memory, "disk_gb": disk, "gpus": gpus},
        },
    )


OWN = identity(1)


def registry(**kwargs) -> PeerRegistry:
    return PeerRegistry(NET, OWN.peer_id, **kwargs)


class AcceptTests(unittest.TestCase):
    def setUp(self):
        self.reg = registry()
        self.alice = identity(2)
        self.bob = identity(3)

    def check(self, expected, signed, msg=None, now=NOW):
        self.assertEqual(self.reg.accept(signed, now), expected, msg)

    def test_new(self):
        """A valid announcement from an unknown peer is NEW and stored, state unknown."""
        self.check(Outcome.NEW, announce(self.alice, name="alice"))
        self.assertEqual(len(self.reg), 1)
        peer = self.reg.get(self.alice.peer_id)
        self.assertEqual(peer.name, "alice")
        self.assertEqual(peer.public_key, self.alice.public_key)
        self.assertEqual(peer.state, PeerState.UNKNOWN)
        self.assertIsNone(peer.last_heard)
        self.assertIsNone(peer.endpoint)
        self.assertEqual(peer.reputation, 0.5)
        self.assertEqual(peer.first_seen, NOW)

    def test_record_fields(self):
        """Every announced field is parsed: NAT type, flags, paths (zero via is None), resources."""
        signed = announce(
            self.alice,
            sequence=7,
            nat_type=NatType.SYMMETRIC,
            capabilities=Capability.RELAY | Capability.STUN,
            paths=[
                {"kind": PathKind.DIRECT, "endpoint": ("192.0.2.1", 7400), "via": bytes(16)},
                {"kind": PathKind.RELAYED, "endpoint": ("2001:db8::1", 7401), "via": self.bob.peer_id},
            ],
            cpu=8,
            memory=16384,
            disk=500,
            gpus=2,
        )
        self.reg.accept(signed, NOW)
        peer = self.reg.get(self.alice.peer_id)
        self.assertEqual(peer.sequence, 7)
        self.assertEqual(peer.ttl_s, 3600)
        self.assertEqual(peer.timestamp_ms, int(NOW * 1000))
        self.assertIs(peer.nat_type, NatType.SYMMETRIC)
        self.assertEqual(peer.capabilities, Capability.RELAY | Capability.STUN)
        self.assertEqual(
            peer.paths,
            [
                (PathKind.DIRECT, ("192.0.2.1", 7400), None),
                (PathKind.RELAYED, ("2001:db8::1", 7401), self.bob.peer_id),
            ],
        )
        self.assertEqual(peer.resources, Resources(8, 16384, 500, 2))
        self.assertEqual(peer.signed, signed)

    def test_expires_at(self):
        """expires_at is receipt time + TTL, capped by the announcement's timestamp + TTL."""
        self.reg.accept(announce(self.alice, at=NOW - 600, ttl=3600), NOW)
        self.assertEqual(self.reg.get(self.alice.peer_id).expires_at, NOW - 600 + 3600)
        self.reg.accept(announce(self.bob, at=NOW + 60, ttl=3600), NOW)
        self.assertEqual(self.reg.get(self.bob.peer_id).expires_at, NOW + 3600)

    def test_update_higher_sequence(self):
        """A higher sequence is UPDATED: new content; state, endpoint, RTT and reputation kept."""
        self.reg.accept(announce(self.alice, sequence=1, cpu=2), NOW)
        self.reg.heard_from(self.alice.peer_id, ("192.0.2.1", 7400), NOW + 1)
        self.reg.set_rtt(self.alice.peer_id, 0.05)
        self.reg.record_outcome(self.alice.peer_id, True)
        reputation = self.reg.get(self.alice.peer_id).reputation
        self.check(Outcome.UPDATED, announce(self.alice, sequence=5, cpu=4), now=NOW + 2)
        peer = self.reg.get(self.alice.peer_id)
        self.assertEqual((peer.sequence, peer.resources.cpu_cores), (5, 4))
        self.assertEqual(peer.state, PeerState.ONLINE)
        self.assertEqual(peer.endpoint, ("192.0.2.1", 7400))
        self.assertEqual(peer.last_heard, NOW + 1)
        self.assertEqual(peer.rtt, 0.05)
        self.assertEqual(peer.reputation, reputation)
        self.assertEqual(peer.first_seen, NOW)
        self.assertEqual(len(self.reg), 1)

    def test_duplicate(self):
        """The same sequence again is DUPLICATE (gossip suppression) and changes nothing."""
        signed = announce(self.alice, sequence=3)
        self.reg.accept(signed, NOW)
        held = self.reg.get(self.alice.peer_id)
        self.check(Outcome.DUPLICATE, signed, now=NOW + 1)
        self.assertIs(self.reg.get(self.alice.peer_id), held)

    def test_stale(self):
        """A lower sequence than the one held is STALE and changes nothing."""
        self.reg.accept(announce(self.alice, sequence=3, cpu=3), NOW)
        self.check(Outcome.STALE, announce(self.alice, sequence=2, cpu=9))
        self.assertEqual(self.reg.get(self.alice.peer_id).resources.cpu_cores, 3)

    def test_expired_by_ttl(self):
        """An announcement whose timestamp + TTL has passed is EXPIRED; one second before, it is NEW."""
        self.check(Outcome.EXPIRED, announce(self.alice, at=NOW - 3600, ttl=3600))
        self.check(Outcome.EXPIRED, announce(self.alice, at=NOW, ttl=0))
        self.assertEqual(len(self.reg), 0)
        self.check(Outcome.NEW, announce(self.alice, at=NOW - 3599, ttl=3600))

    def test_ttl_capped(self):
        """A record claiming a TTL of years is kept for max_ttl_s after it arrives, no longer."""
        reg = registry(max_ttl_s=7200)
        self.assertEqual(reg.accept(announce(self.alice, at=NOW, ttl=2**32 - 1), NOW), Outcome.NEW)
        self.assertEqual(reg.get(self.alice.peer_id).expires_at, NOW + 7200)
        self.assertTrue(reg.get(self.alice.peer_id).expired(NOW + 7200))

    def test_future_timestamp(self):
        """A timestamp further ahead than clock_skew_s is EXPIRED; within the skew it is accepted."""
        reg = registry(clock_skew_s=300)
        self.assertEqual(
            reg.accept(announce(self.alice, timestamp_ms=int((NOW + 301) * 1000)), NOW), Outcome.EXPIRED
        )
        self.assertEqual(
            reg.accept(announce(self.alice, timestamp_ms=int((NOW + 300) * 1000)), NOW), Outcome.NEW
        )

    def test_bad_signature_tampered_record(self):
        """Record bytes changed after signing (still parseable) are BAD_SIGNATURE."""
        signed = announce(self.alice, gpus=0)
        tampered = dict(signed, record=signed["record"][:-1] + b"\x08")
        self.check(Outcome.BAD_SIGNATURE, tampered)
        self.assertEqual(len(self.reg), 0)

    def test_bad_signature_tampered_signature(self):
        """A changed signature byte is BAD_SIGNATURE."""
        signed = announce(self.alice)
        sig = bytearray(signed["signature"])
        sig[10] ^= 1
        self.check(Outcome.BAD_SIGNATURE, dict(signed, signature=bytes(sig)))

    def test_bad_signature_other_key(self):
        """A record carrying one key but signed by another is BAD_SIGNATURE."""
        signed = announce(self.alice)
        forged = announce(self.bob)
        self.assertEqual(
            self.reg.accept({"record": signed["record"], "signature": forged["signature"]}, NOW),
            Outcome.BAD_SIGNATURE,
        )

    def test_bad_signature_other_network(self):
        """An announcement signed for another network is BAD_SIGNATURE here."""
        self.check(Outcome.BAD_SIGNATURE, announce(self.alice, network_id=OTHER_NET))

    def test_malformed_record(self):
        """Record bytes that do not parse (truncated, trailing, garbage) are MALFORMED."""
        signed = announce(self.alice)
        for record in (signed["record"][:-1], signed["record"] + b"\x00", b"", b"\xff" * 40):
            self.check(Outcome.MALFORMED, dict(signed, record=record), repr(record))

    def test_malformed_shape(self):
        """Values the wire cannot carry (missing, non-bytes, oversized, short signature) are MALFORMED."""
        signed = announce(self.alice)
        for value in (
            {},
            {"record": signed["record"]},
            {"record": "text", "signature": signed["signature"]},
            {"record": signed["record"], "signature": signed["signature"][:63]},
            {"record": b"\x00" * 65536, "signature": signed["signature"]},
            None,
            42,
        ):
            self.check(Outcome.MALFORMED, value, repr(value))

    def test_malformed_name(self):
        """A signed name that is not a valid node name (or looks like a peer id) is MALFORMED."""
        for name in ("bad name", "-dash", self.bob.peer_id_text):
            self.check(Outcome.MALFORMED, announce(self.alice, name=name), name)

    def test_name_taken(self):
        """A name held by another key's unexpired record is NAME_TAKEN; the first key keeps it."""
        self.reg.accept(announce(self.alice, name="provider-1"), NOW)
        self.check(Outcome.NAME_TAKEN, announce(self.bob, name="provider-1"), now=NOW + 1)
        self.check(Outcome.NAME_TAKEN, announce(self.bob, name="Provider-1"), now=NOW + 1)
        self.assertNotIn(self.bob.peer_id, self.reg)
        self.assertEqual(self.reg.lookup("provider-1").peer_id, self.alice.peer_id)

    def test_name_taken_blocks_rename(self):
        """A peer renaming itself to a name another key holds is rejected and keeps its record."""
        self.reg.accept(announce(self.alice, name="alice"), NOW)
        self.reg.accept(announce(self.bob, name="bob", sequence=1), NOW)
        self.check(Outcome.NAME_TAKEN, announce(self.bob, name="alice", sequence=2))
        self.assertEqual(self.reg.get(self.bob.peer_id).sequence, 1)
        self.assertEqual(self.reg.lookup("bob").peer_id, self.bob.peer_id)

    def test_name_freed_after_expiry(self):
        """Once the holder's record expires another key's record is stored, but the name is not its: the first key is remembered and takes the name back."""
        self.reg.accept(announce(self.alice, name="provider-1", ttl=60), NOW)
        self.check(Outcome.NAME_TAKEN, announce(self.bob, name="provider-1"), now=NOW + 59)
        self.check(Outcome.NEW, announce(self.bob, name="provider-1", at=NOW + 60), now=NOW + 60)
        self.assertNotIn(self.alice.peer_id, self.reg)
        with self.assertRaises(AmbiguousPeer) as caught:
            self.reg.lookup("provider-1")
        self.assertIn(self.alice.peer_id_text, str(caught.exception))
        self.assertIn(self.bob.peer_id_text, str(caught.exception))
        self.assertEqual(
            self.reg.accept(announce(self.alice, name="provider-1", sequence=2, at=NOW + 61), NOW + 61),
            Outcome.NEW,
        )
        self.assertEqual(self.reg.lookup("provider-1").peer_id, self.alice.peer_id)

    def test_name_memory_lapses(self):
        """A first key away for longer than name_memory_s no longer holds its name."""
        reg = registry(name_memory_s=600)
        reg.accept(announce(self.alice, name="provider-1", ttl=60), NOW)
        reg.expire(NOW + 60)
        reg.accept(announce(self.bob, name="provider-1", at=NOW + 700), NOW + 700)
        self.assertEqual(reg.lookup("provider-1").peer_id, self.bob.peer_id)

    def test_rename_frees_old_name(self):
        """A peer that changes its name releases the old one to other keys."""
        self.reg.accept(announce(self.alice, name="old", sequence=1), NOW)
        self.reg.accept(announce(self.alice, name="new", sequence=2), NOW)
        self.assertRaises(PeerNotFound, self.reg.lookup, "old")
        self.check(Outcome.NEW, announce(self.bob, name="old"))

    def test_own(self):
        """Our own announcement coming back is OWN and never stored."""
        self.check(Outcome.OWN, announce(OWN, name="me"))
        self.assertEqual(len(self.reg), 0)

    def test_full(self):
        """With max_peers records a new peer is FULL, while held peers still update."""
        reg = registry(max_peers=2)
        self.assertEqual(reg.accept(announce(self.alice), NOW), Outcome.NEW)
        self.assertEqual(reg.accept(announce(self.bob), NOW), Outcome.NEW)
        self.assertEqual(reg.accept(announce(identity(4)), NOW), Outcome.FULL)
        self.assertEqual(reg.accept(announce(self.alice, sequence=2), NOW), Outcome.UPDATED)
        self.assertEqual(len(reg), 2)
        reg.remove(self.bob.peer_id)
        self.assertEqual(reg.accept(announce(identity(4)), NOW), Outcome.NEW)

    def test_outcomes_are_metric_labels(self):
        """Every outcome is a lowercase token that works as a metrics label and in JSON."""
        metrics = Metrics()
        for outcome in Outcome:
            self.assertRegex(outcome, r"\A[a-z_]+\Z")
            metrics.inc("announcements", outcome=outcome)
        self.assertEqual(metrics.get("announcements", outcome="name_taken"), 1)
        snapshot = json.loads(json.dumps(metrics.snapshot()))
        self.assertEqual(snapshot["announcements"][0]["labels"]["outcome"], "bad_signature")

    def test_wire_value_and_regossip(self):
        """A value parsed from an ANNOUNCE body is accepted; the kept value rebuilds the same body."""
        signed = announce(self.alice, name="alice")
        body = build_body(MessageType.ANNOUNCE, hops=1, announcement=signed)
        msg = parse_body(MessageType.ANNOUNCE, body)
        self.assertEqual(self.reg.accept(msg.announcement, NOW, via=self.bob.peer_id), Outcome.NEW)
        peer = self.reg.get(self.alice.peer_id)
        self.assertEqual(peer.learned_via, self.bob.peer_id)
        self.assertEqual(peer.state, PeerState.UNKNOWN)
        self.assertEqual(build_body(MessageType.ANNOUNCE, hops=1, announcement=peer.signed), body)
        self.check(Outcome.DUPLICATE, peer.signed)

    def test_unknown_enum_values_kept(self):
        """NAT types and path kinds from a newer peer are kept as plain ints, not rejected."""
        path = {"kind": 9, "endpoint": ("192.0.2.1", 1), "via": bytes(16)}
        signed = announce(self.alice, nat_type=42, paths=[path])
        self.check(Outcome.NEW, signed)
        peer = self.reg.get(self.alice.peer_id)
        self.assertEqual((peer.nat_type, peer.paths[0][0]), (42, 9))
        self.assertEqual(peer.as_dict(NOW)["nat_type"], 42)


class ObservationTests(unittest.TestCase):
    def setUp(self):
        self.reg = registry()
        self.alice = identity(2)
        self.reg.accept(announce(self.alice, name="alice"), NOW)

    def test_heard_from(self):
        """A direct frame makes a known peer online with its endpoint and time."""
        self.assertTrue(self.reg.heard_from(self.alice.peer_id, ("192.0.2.7", 7400), NOW + 5))
        peer = self.reg.get(self.alice.peer_id)
        self.assertEqual(peer.state, PeerState.ONLINE)
        self.assertEqual(peer.endpoint, ("192.0.2.7", 7400))
        self.assertEqual(peer.last_heard, NOW + 5)
        self.assertEqual([p.peer_id for p in self.reg.online()], [self.alice.peer_id])

    def test_heard_from_unknown(self):
        """A frame from a peer without a verified announcement adds nothing and returns False."""
        self.assertFalse(self.reg.heard_from(identity(9).peer_id, ("192.0.2.9", 1), NOW))
        self.assertEqual(len(self.reg), 1)

    def test_set_state(self):
        """set_state takes the four states, rejects others, and is False for unknown peers."""
        for state in ("suspect", PeerState.OFFLINE, "online", "unknown"):
            self.assertTrue(self.reg.set_state(self.alice.peer_id, state, NOW))
            self.assertEqual(self.reg.get(self.alice.peer_id).state, state)
        self.assertRaises(ValueError, self.reg.set_state, self.alice.peer_id, "stale", NOW)
        self.assertFalse(self.reg.set_state(identity(9).peer_id, "online", NOW))

    def test_set_rtt(self):
        """set_rtt stores seconds, rejects negative or NaN values, and is False for unknown peers."""
        self.assertTrue(self.reg.set_rtt(self.alice.peer_id, 0.25))
        self.assertEqual(self.reg.get(self.alice.peer_id).rtt, 0.25)
        self.assertRaises(ValueError, self.reg.set_rtt, self.alice.peer_id, -1.0)
        self.assertRaises(ValueError, self.reg.set_rtt, self.alice.peer_id, float("nan"))
        self.assertFalse(self.reg.set_rtt(identity(9).peer_id, 0.1))

    def test_remove(self):
        """remove forgets the peer and its name; removing again is False."""
        self.assertTrue(self.reg.remove(self.alice.peer_id))
        self.assertFalse(self.reg.remove(self.alice.peer_id))
        self.assertRaises(PeerNotFound, self.reg.lookup, "alice")

    def test_as_dict(self):
        """as_dict is JSON-ready with hex ids, names for enums and flags, and times relative to now."""
        reg = registry()
        bob = identity(3)
        reg.accept(
            announce(
                bob,
                name="bob",
                nat_type=NatType.FULL_CONE,
                capabilities=Capability.PROVIDER,
                paths=[
                    {"kind": PathKind.RELAYED, "endpoint": ("2001:db8::2", 9), "via": self.alice.peer_id}
                ],
                cpu=4,
            ),
            NOW,
            via=self.alice.peer_id,
        )
        reg.heard_from(bob.peer_id, ("192.0.2.3", 7400), NOW + 10)
        reg.set_rtt(bob.peer_id, 0.0125)
        view = json.loads(json.dumps(reg.get(bob.peer_id).as_dict(NOW + 20)))
        self.assertEqual(view["peer_id"], bob.peer_id_text)
        self.assertEqual(view["public_key"], bob.public_key.hex())
        self.assertEqual(view["name"], "bob")
        self.assertEqual(view["nat_type"], "full_cone")
        self.assertEqual(view["capabilities"], ["provider"])
        self.assertEqual(
            view["paths"],
            [{"kind": "relayed", "endpoint": "[2001:db8::2]:9", "via": self.alice.peer_id_text}],
        )
        self.assertEqual(view["resources"], {"cpu_cores": 4, "memory_mb": 0, "disk_gb": 0, "gpus": 0})
        self.assertEqual(view["state"], "online")
        self.assertEqual(view["endpoint"], "192.0.2.3:7400")
        self.assertEqual(view["last_heard_ago_s"], 10)
        self.assertEqual(view["rtt_ms"], 12.5)
        self.assertEqual(view["reputation"], 0.5)
        self.assertEqual(view["expires_in_s"], 3580)
        self.assertEqual(view["first_seen_ago_s"], 20)
        self.assertEqual(view["learned_via"], self.alice.peer_id_text)


def colliding_identities():
    """
    Two deterministic identities whose peer ids share their first 4 hex digits.
    """
    seen = {}
    for seed in range(100, 5000):
        ident = identity(seed)
        prefix = ident.peer_id_text[:4]
        if prefix in seen:
            return seen[prefix], ident
        seen[prefix] = ident
    raise AssertionError("no prefix collision found")


class LookupTests(unittest.TestCase):
    def setUp(self):
        self.reg = registry()
        self.alice = identity(2)
        self.bob = identity(3)
        self.reg.accept(announce(self.alice, name="alice"), NOW)
        self.reg.accept(announce(self.bob, name="bob"), NOW)

    def test_by_id(self):
        """A full hex id finds its peer, in any case and with surrounding spaces."""
        self.assertEqual(self.reg.lookup(self.alice.peer_id_text).peer_id, self.alice.peer_id)
        shouted = f" {self.alice.peer_id_text.upper()} "
        self.assertEqual(self.reg.lookup(shouted).peer_id, self.alice.peer_id)

    def test_by_prefix(self):
        """A unique prefix of at least 4 hex digits finds its peer."""
        self.assertEqual(self.reg.lookup(self.bob.peer_id_text[:6]).peer_id, self.bob.peer_id)

    def test_by_name(self):
        """A name finds its peer, case-insensitively."""
        self.assertEqual(self.reg.lookup("alice").peer_id, self.alice.peer_id)
        self.assertEqual(self.reg.lookup("ALICE").peer_id, self.alice.peer_id)

    def test_ambiguous_prefix(self):
        """A prefix shared by two peers raises AmbiguousPeer listing both."""
        first, second = colliding_identities()
        self.reg.accept(announce(first, name="first"), NOW)
        self.reg.accept(announce(second), NOW)
        prefix = first.peer_id_text[:4]
        e = self.assertRaises(AmbiguousPeer, self.reg.lookup, prefix)
        self.assertIsInstance(e, LookupError)
        self.assertEqual(
            e.candidates, sorted([(first.peer_id_text, "first"), (second.peer_id_text, "")])
        )
        self.assertIn(first.peer_id_text, str(e))
        self.assertEqual(self.reg.lookup(first.peer_id_text[:12]).peer_id, first.peer_id)

    def test_name_that_is_a_prefix_of_another(self):
        """A hex-looking name that is also another peer's id prefix is ambiguous, not resolved."""
        carol = identity(4)
        self.reg.accept(announce(carol, name=self.alice.peer_id_text[:8]), NOW)
        e = self.assertRaises(AmbiguousPeer, self.reg.lookup, self.alice.peer_id_text[:8])
        self.assertEqual(
            {pid for pid, _ in e.candidates}, {self.alice.peer_id_text, carol.peer_id_text}
        )

    def test_unknown(self):
        """Unknown ids, prefixes and names raise PeerNotFound (a LookupError)."""
        self.assertRaises(PeerNotFound, self.reg.lookup, identity(9).peer_id_text)
        self.assertRaises(PeerNotFound, self.reg.lookup, "carol")
        e = self.assertRaises(PeerNotFound, self.reg.lookup, self.alice.peer_id_text[:3])
        self.assertIn("at least 4 hex digits", str(e))
        self.assertTrue(issubclass(PeerNotFound, LookupError))

    def test_collections(self):
        """get, all, online, len and membership agree."""
        self.assertEqual(len(self.reg), 2)
        self.assertEqual({p.name for p in self.reg.all()}, {"alice", "bob"})
        self.assertEqual(self.reg.online(), [])
        self.assertIsNone(self.reg.get(identity(9).peer_id))
        self.assertIn(self.alice.peer_id, self.reg)


class FindPeersTests(unittest.TestCase):
    def setUp(self):
        self.reg = registry()
        self.ids = {}

    def add(self, seed, online=True, **kwargs):
        ident = identity(seed)
        self.assertEqual(self.reg.accept(announce(ident, **kwargs), NOW), Outcome.NEW)
        if online:
            self.reg.heard_from(ident.peer_id, ("192.0.2.1", 7000 + seed), NOW)
        return ident.peer_id

    def found(self, requirements=Requirements(), **kwargs):
        return [p.peer_id for p in self.reg.find_peers(requirements, **kwargs)]

    def test_each_resource(self):
        """Each resource minimum excludes peers announcing less and keeps those at or above it."""
        small = self.add(10, cpu=2, memory=2048, disk=20, gpus=0)
        big = self.add(11, cpu=16, memory=65536, disk=1000, gpus=4)
        for field, value in (("cpu_cores", 4), ("memory_mb", 4096), ("disk_gb", 100), ("gpus", 1)):
            self.assertEqual(self.found(Requirements(**{field: value})), [big], field)
        self.assertEqual(
            sorted(self.found(Requirements(cpu_cores=2, memory_mb=2048, disk_gb=20))),
            sorted([small, big]),
        )
        self.assertEqual(self.found(Requirements(gpus=5)), [])

    def test_capabilities(self):
        """A peer must have every required capability bit."""
        relay = self.add(10, capabilities=Capability.RELAY)
        both = self.add(11, capabilities=Capability.RELAY | Capability.PROVIDER)
        self.add(12, capabilities=Capability.PROVIDER)
        relaying = Requirements(capabilities=Capability.RELAY)
        self.assertEqual(sorted(self.found(relaying)), sorted([relay, both]))
        both_bits = Requirements(capabilities=Capability.RELAY | Capability.PROVIDER)
        self.assertEqual(self.found(both_bits), [both])

    def test_online_only(self):
        """
        By default only online peers match; online_only=False also offers
        unknown ones, never one known to be gone.
        """
        online = self.add(10)
        unknown = self.add(11, online=False)
        offline = self.add(12)
        self.reg.set_state(offline, "offline", NOW)
        self.assertEqual(self.found(), [online])
        everyone = self.found(Requirements(online_only=False))
        self.assertEqual(sorted(everyone), sorted([online, unknown]))

    def test_ordering(self):
        """Results sort by reputation (highest first), then RTT (lowest, None last), then peer id."""
        a, b, c, d, e = (self.add(seed) for seed in (10, 11, 12, 13, 14))
        self.reg.record_outcome(a, True)
        self.reg.set_rtt(b, 0.2)
        self.reg.set_rtt(c, 0.1)
        self.reg.record_outcome(e, False)
        self.assertEqual(self.found(), [a, c, b, d, e])
        self.reg.set_rtt(d, None)
        f = self.add(15)
        self.assertEqual(self.found()[3:5], sorted([d, f]))

    def test_max_results(self):
        """At most max_results peers come back, the best ones."""
        peers = [self.add(seed) for seed in range(10, 20)]
        self.reg.record_outcome(peers[7], True)
        self.assertEqual(len(self.found()), 10)
        self.assertEqual(self.found(max_results=1), [peers[7]])
        self.assertEqual(len(self.found(max_results=3)), 3)
        self.assertEqual(self.found(max_results=0), [])

    def test_expired_excluded_with_now(self):
        """Given now, peers whose announcement has expired are not offered."""
        fresh = self.add(10, ttl=7200)
        self.add(11, ttl=60)
        self.assertEqual(len(self.found()), 2)
        self.assertEqual(self.found(now=NOW + 61), [fresh])

    def test_never_self(self):
        """The registry's own id is never offered, even if it were in the table."""
        me = identity(10)
        self.add(10, online=False)
        self.reg.own_peer_id = me.peer_id
        self.assertEqual(self.found(Requirements(online_only=False)), [])


class ReputationTests(unittest.TestCase):
    def setUp(self):
        self.reg = registry()
        self.alice = identity(2)
        self.reg.accept(announce(self.alice), NOW)
        self.pid = self.alice.peer_id

    def test_formula(self):
        """r <- 0.9 r + 0.1 s with s = 1 (success), 0 (failure), 1 - 0.5 min(latency / 10 s, 1)."""
        self.assertAlmostEqual(self.reg.record_outcome(self.pid, True), 0.55)
        self.assertAlmostEqual(self.reg.record_outcome(self.pid, False), 0.495)
        third = 0.9 * 0.495 + 0.1 * 0.75
        self.assertAlmostEqual(self.reg.record_outcome(self.pid, True, latency=5.0), third)
        self.assertAlmostEqual(self.reg.record_outcome(self.pid, True, latency=60.0), 0.9 * third + 0.05)

    def test_moves_and_bounds(self):
        """Successes raise the score, failures lower it, and it stays within [0, 1]."""
        before = self.reg.get(self.pid).reputation
        self.assertGreater(self.reg.record_outcome(self.pid, True), before)
        for _ in range(500):
            score = self.reg.record_outcome(self.pid, True, latency=0.0)
            self.assertLessEqual(score, 1.0)
        self.assertGreater(score, 0.99)
        for _ in range(500):
            score = self.reg.record_outcome(self.pid, False)
            self.assertGreaterEqual(score, 0.0)
        self.assertLess(score, 0.01)

    def test_slow_success_counts_less(self):
        """A slow success raises the score less than a fast one, but more than a failure."""
        other = identity(3)
        self.reg.accept(announce(other), NOW)
        fast = self.reg.record_outcome(self.pid, True, latency=0.05)
        slow = self.reg.record_outcome(other.peer_id, True, latency=8.0)
        self.assertGreater(fast, slow)
        self.assertGreater(slow, 0.5)

    def test_invalid(self):
        """An unknown peer gives None; a negative or infinite latency is a ValueError."""
        self.assertIsNone(self.reg.record_outcome(identity(9).peer_id, True))
        self.assertRaises(ValueError, self.reg.record_outcome, self.pid, True, -0.1)
        self.assertRaises(ValueError, self.reg.record_outcome, self.pid, True, float("inf"))


class ExpiryTests(unittest.TestCase):
    def setUp(self):
        self.reg = registry()

    def test_expire(self):
        """expire drops exactly the records whose announcement expired and frees their names."""
        short, long = identity(2), identity(3)
        self.reg.accept(announce(short, name="short", ttl=60), NOW)
        self.reg.accept(announce(long, ttl=600), NOW)
        self.assertEqual(self.reg.expire(NOW + 59), [])
        self.assertEqual(self.reg.expire(NOW + 60), [short.peer_id])
        self.assertEqual([p.peer_id for p in self.reg.all()], [long.peer_id])
        self.assertRaises(PeerNotFound, self.reg.lookup, "short")
        self.assertEqual(self.reg.expire(NOW + 600), [long.peer_id])
        self.assertEqual(len(self.reg), 0)

    def test_cleanup_offline(self):
        """cleanup_offline drops peers offline for longer than `after`, counted from going offline."""
        gone, recent, online = identity(2), identity(3), identity(4)
        for ident in (gone, recent, online):
            self.reg.accept(announce(ident), NOW)
            self.reg.heard_from(ident.peer_id, ("192.0.2.1", 1), NOW)
        self.reg.set_state(gone.peer_id, "offline", NOW + 10)
        self.reg.set_state(recent.peer_id, "offline", NOW + 100)
        self.reg.set_state(recent.peer_id, "offline", NOW + 200)
        self.assertEqual(self.reg.cleanup_offline(NOW + 110, after=100), [])
        self.assertEqual(self.reg.cleanup_offline(NOW + 111, after=100), [gone.peer_id])
        self.assertEqual(self.reg.cleanup_offline(NOW + 201, after=100), [recent.peer_id])
        self.assertEqual([p.peer_id for p in self.reg.all()], [online.peer_id])


class StatisticsTests(unittest.TestCase):
    def test_statistics(self):
        """statistics counts peers in total, by every state and by every capability."""
        reg = registry()
        self.assertEqual(
            reg.statistics(),
            {
                "total": 0,
                "by_state": {"online": 0, "suspect": 0, "offline": 0, "unknown": 0},
                "by_capability": {"relay": 0, "provider": 0, "stun": 0, "coordinator": 0},
            },
        )
        a, b, c = identity(2), identity(3), identity(4)
        reg.accept(announce(a, capabilities=Capability.RELAY | Capability.STUN), NOW)
        reg.accept(announce(b, capabilities=Capability.RELAY), NOW)
        reg.accept(announce(c, capabilities=Capability.PROVIDER), NOW)
        reg.heard_from(a.peer_id, ("192.0.2.1", 1), NOW)
        reg.set_state(b.peer_id, "suspect", NOW)
        self.assertEqual(
            reg.statistics(),
            {
                "total": 3,
                "by_state": {"online": 1, "suspect": 1, "offline": 0, "unknown": 1},
                "by_capability": {"relay": 2, "provider": 1, "stun": 1, "coordinator": 0},
            },
        )


class PersistenceTests(unittest.TestCase):
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "peers.json")
        self.reg = registry()
        self.alice, self.bob = identity(2), identity(3)
        self.reg.accept(announce(self.alice, name="alice", sequence=4, cpu=8), NOW)
        self.reg.accept(announce(self.bob, name="bob", ttl=120), NOW)
        self.reg.heard_from(self.alice.peer_id, ("192.0.2.1", 7400), NOW + 5)
        self.reg.set_rtt(self.alice.peer_id, 0.02)
        self.reg.record_outcome(self.alice.peer_id, True)

    def test_round_trip(self):
        """Load restores announcements, reputation, endpoint and last_heard; state starts unknown."""
        self.reg.save(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        loaded = registry()
        self.assertEqual(loaded.load(self.path, NOW + 10), {"new": 2})
        peer = loaded.get(self.alice.peer_id)
        original = self.reg.get(self.alice.peer_id)
        self.assertEqual(peer.signed, original.signed)
        self.assertEqual((peer.name, peer.sequence, peer.resources), ("alice", 4, original.resources))
        self.assertEqual(peer.reputation, original.reputation)
        self.assertEqual(peer.endpoint, ("192.0.2.1", 7400))
        self.assertEqual(peer.last_heard, NOW + 5)
        self.assertEqual(peer.first_seen, NOW)
        self.assertEqual(peer.expires_at, original.expires_at)
        self.assertEqual(peer.state, PeerState.UNKNOWN)
        self.assertIsNone(peer.rtt)
        self.assertEqual(loaded.lookup("bob").peer_id, self.bob.peer_id)

    def test_file_format(self):
        """The file is JSON version 1 with the network id and base64 announcements."""
        self.reg.save(self.path)
        with open(self.path) as f:
            document = json.load(f)
        self.assertEqual(document["version"], 1)
        self.assertEqual(document["network_id"], NET.hex())
        entry = next(e for e in document["peers"] if e["peer_id"] == self.alice.peer_id_text)
        self.assertEqual(
            set(entry),
            {"peer_id", "record", "signature", "reputation", "endpoint", "last_heard", "first_seen",
             "expires_at", "source"},
        )
        self.assertEqual(entry["endpoint"], ["192.0.2.1", 7400])

    def test_expired_skipped(self):
        """Announcements that expired while the node was down are not loaded."""
        self.reg.save(self.path)
        loaded = registry()
        self.assertEqual(loaded.load(self.path, NOW + 120), {"new": 1, "expired": 1})
        self.assertEqual([p.peer_id for p in loaded.all()], [self.alice.peer_id])

    def test_tampered_entry_skipped(self):
        """An entry whose record was edited in the file fails re-verification, is skipped and logged."""
        self.reg.save(self.path)
        with open(self.path) as f:
            document = json.load(f)
        entry = next(e for e in document["peers"] if e["peer_id"] == self.bob.peer_id_text)
        record = bytearray(self.reg.get(self.bob.peer_id).signed["record"])
        record[-1] = 8  # the GPU count, the record's last byte
        entry["record"] = base64.b64encode(bytes(record)).decode()
        document["peers"].append({"record": "not base64!", "signature": ""})
        document["peers"].append("junk")
        with open(self.path, "w") as f:
            json.dump(document, f)
        loaded = registry()
        events = []
        loaded.log = Logger(observer=events.append)
        counts = loaded.load(self.path, NOW + 10)
        self.assertEqual(counts, {"new": 1, "bad_signature": 1, "malformed": 2})
        self.assertEqual([p.peer_id for p in loaded.all()], [self.alice.peer_id])
        self.assertEqual([e["outcome"] for e in events], ["bad_signature", "malformed", "malformed"])

    def test_bad_extras_ignored(self):
        """Out-of-range reputation and unusable endpoints in the file fall back to defaults."""
        self.reg.save(self.path)
        with open(self.path) as f:
            document = json.load(f)
        for entry in document["peers"]:
            entry.update(reputation=7, endpoint=["not an ip", 1], last_heard="yesterday")
        with open(self.path, "w") as f:
            json.dump(document, f)
        loaded = registry()
        loaded.load(self.path, NOW + 10)
        peer = loaded.get(self.alice.peer_id)
        self.assertEqual((peer.reputation, peer.endpoint, peer.last_heard), (0.5, None, None))

    def test_load_keeps_live_state(self):
        """Loading into a registry that already holds a peer does not overwrite what it observed."""
        self.reg.save(self.path)
        self.reg.record_outcome(self.alice.peer_id, False)
        live = self.reg.get(self.alice.peer_id).reputation
        self.assertEqual(self.reg.load(self.path, NOW + 10), {"duplicate": 2})
        self.assertEqual(self.reg.get(self.alice.peer_id).reputation, live)
        self.assertEqual(self.reg.get(self.alice.peer_id).state, PeerState.ONLINE)

    def test_missing_file(self):
        """A missing file loads nothing."""
        self.assertEqual(registry().load(self.path, NOW), {})

    def test_corrupt_file(self):
        """Corrupt JSON raises StateFileError and the file is moved aside byte-for-byte unchanged."""
        garbage = b'{"version": 1, "peers": [tru'
        with open(self.path, "wb") as f:
            f.write(garbage)
        loaded = registry()
        e = self.assertRaises(StateFileError, loaded.load, self.path, NOW)
        self.assertEqual(len(loaded), 0)
        aside = f"{self.path}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(NOW))}"
        self.assertIn(f"moved aside to {aside}", str(e))
        self.assertFalse(os.path.exists(self.path))
        with open(aside, "rb") as f:
            self.assertEqual(f.read(), garbage)

    def test_damaged_file_not_overwritten_by_save(self):
        """A save after a damaged load keeps the damaged content (aside), a second one too."""
        garbage = b"{damaged"
        for _ in range(2):  # the same second twice: the second copy gets its own name
            with open(self.path, "wb") as f:
                f.write(garbage)
            loaded = registry()
            self.assertRaises(StateFileError, loaded.load, self.path, NOW)
            loaded.save(self.path)
        directory = os.path.dirname(self.path)
        asides = sorted(n for n in os.listdir(directory) if ".damaged-" in n)
        self.assertEqual(len(asides), 2)
        for name in asides:
            with open(os.path.join(directory, name), "rb") as f:
                self.assertEqual(f.read(), garbage)
        self.assertEqual(registry().load(self.path, NOW), {})

    def test_damaged_file_that_cannot_be_moved_is_kept(self):
        """When the damaged file cannot be moved aside, save refuses to replace it until it is gone."""
        garbage = b"{damaged"
        with open(self.path, "wb") as f:
            f.write(garbage)

        def refuse(source, target):
            raise PermissionError(13, "Permission denied")

        loaded = registry()
        self.patch(os, "rename", refuse)
        e = self.assertRaises(StateFileError, loaded.load, self.path, NOW)
        self.assertIn("untouched", str(e))
        e = self.assertRaises(StateFileError, loaded.save, self.path)
        self.assertIn(self.path, str(e))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), garbage)
        os.unlink(self.path)  # the operator moved it
        loaded.save(self.path)
        self.assertEqual(registry().load(self.path, NOW), {})

    def test_wrong_version_or_network(self):
        """Another version, another network's file or a missing peer list raises StateFileError."""
        for document in (
            {"version": 2, "network_id": NET.hex(), "peers": []},
            [],
            {"version": 1, "network_id": OTHER_NET.hex(), "peers": []},
            {"version": 1, "network_id": NET.hex(), "peers": {}},
        ):
            with open(self.path, "w") as f:
                json.dump(document, f)
            e = self.assertRaises(StateFileError, registry().load, self.path, NOW)
            self.assertTrue(re.search("moved aside", str(e)), str(e))
