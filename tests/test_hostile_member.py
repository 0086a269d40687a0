"""
A hostile member against real nodes on the simulated network.

The attacker holds the network key (it is a member), so it can seal any
frame under any sender id and boot id, from its own address or, where the
test says so, from an address it spoofs.  Each test plays one attack and
checks it is refused and counted; each fails against a node that trusts the
network key for what only the peer's identity key can prove.
"""

from __future__ import annotations

import os

from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from omerta.crypto import proof
from omerta.crypto.announce import sign_announcement
from omerta.crypto.identity import Identity
from omerta.crypto.sealing import FrameOpener, FrameRejected, FrameSealer
from omerta.mesh.liveness import CHALLENGE_SIZE
from omerta.testing.meshsim import MeshSim
from omerta.wire.messages import (PING_PROVE, CandidateKind, MessageType, NatType,
                                  build_body, parse_body)

SEED_IP, VICTIM_IP, IMPOSTOR_IP = "198.51.100.1", "198.51.100.2", "198.51.100.66"
OUTSIDE = ("100.64.7.7", 9)   # an address nobody in the mesh owns


class Impostor(DatagramProtocol):
    """
    A member at its own address that speaks in other members' names: it
    seals frames as any sender and boot, and answers the pings it gets in
    the name it was told to (with a proof signed by its own key, since it
    has no other).
    """

    def __init__(self, sim: MeshSim):
        self.key = sim.key
        self.opener = FrameOpener({sim.key.network_id: sim.key})
        self.identity = Identity.generate()
        self.sealers: dict[tuple, FrameSealer] = {}
        self.received: list = []
        self.pose_as: tuple | None = None   # (peer id, boot[, identity]) to answer pings as

    def seal(self, sender: bytes, boot: bytes, msg_type: MessageType, **fields) -> bytes:
        sealer = self.sealers.get((sender, boot))
        if sealer is None:
            sealer = self.sealers[(sender, boot)] = FrameSealer(self.key, sender, boot)
            if sender != self.identity.peer_id:
                # counters far ahead of the real sender's, or its replay
                # window would refuse them
                sealer._counter = 1 << 40
        return sealer.seal(msg_type, build_body(msg_type, fields))

    def send(self, address, sender, boot, msg_type, **fields) -> None:
        self.transport.write(self.seal(sender, boot, msg_type, **fields), address)

    def datagramReceived(self, data: bytes, addr) -> None:
        try:
            frame = self.opener.open(data)
        except FrameRejected:
            return
        self.received.append(frame)
        if frame.type == MessageType.PING and self.pose_as is not None:
            ping = parse_body(frame.type, frame.body)
            sender, boot, *signer = self.pose_as
            signer = signer[0] if signer else self.identity
            signed = proof.Prover(signer, self.key.network_id, boot).prove(
                proof.PONG, frame.sender, ping.nonce.to_bytes(8, "big"))
            self.send(addr, sender, boot, MessageType.PONG, nonce=ping.nonce,
                      echo_ms=ping.sent_ms, observed=addr, contacts=[], proof=signed)


class HostileMemberTests(unittest.TestCase):
    def setUp(self):
        self.sim = MeshSim(seed=5)
        self.addCleanup(self.sim.stop)
        self.seed = self.sim.add_node(SEED_IP, name="seed", relay=True, nat_type=NatType.PUBLIC)
        self.victim = self.sim.add_node(VICTIM_IP, [self.seed], name="victim")
        self.impostor = Impostor(self.sim)
        self.sim.net.host(IMPOSTOR_IP).reactor.listenUDP(7400, self.impostor)
        self.assertTrue(self.sim.run_until(self.linked, 30))

    def linked(self) -> bool:
        """The seed has a proven link to the victim at the victim's own address."""
        link = self.seed.overlay.liveness.links.get(self.victim.peer_id)
        return link is not None and link.verified and link.address == self.victim.address

    def victim_online(self) -> bool:
        record = self.seed.overlay.registry.get(self.victim.peer_id)
        return record is not None and record.state == "online"

    def drops(self, node) -> dict:
        return node.node.metrics.by_label("drops", "reason")

    def test_a_forged_ping_in_another_run_cuts_no_one_off(self):
        """
        PINGs under the victim's id and an invented boot id neither make the
        seed refuse the victim's real frames (stale_boot) nor declare it
        offline: a run is the victim's current one only on its own proof.
        """
        boot = os.urandom(8)
        for _ in range(12):
            self.impostor.send(self.seed.address, self.victim.peer_id, boot, MessageType.PING,
                               nonce=1, sent_ms=0, flags=PING_PROVE, contacts=[],
                               padding=bytes(CHALLENGE_SIZE))
            self.sim.run(5)
        self.assertEqual(self.drops(self.seed).get("stale_boot", 0), 0)
        self.assertTrue(self.linked())
        self.assertTrue(self.victim_online())
        self.assertGreater(self.seed.node.metrics.get("liveness_unproven_run"), 0)

    def test_a_forged_pong_does_not_take_a_members_path(self):
        """
        The impostor sends the victim's own announcement under the victim's
        id and current boot from its own address, and answers the seed's
        challenge in the victim's name: the path stays with the victim, and
        the impostor gets neither the seed's announcement nor its peer list.
        """
        self.impostor.pose_as = (self.victim.peer_id, self.victim.overlay.sealer.boot)
        announcement = self.victim.overlay.gossip.own_announcement()
        for _ in range(6):
            self.impostor.send(self.seed.address, self.victim.peer_id,
                               self.victim.overlay.sealer.boot, MessageType.ANNOUNCE,
                               hops=0, announcement=announcement)
            self.sim.run(5)
        challenges = [f for f in self.impostor.received if f.type == MessageType.PING]
        self.assertTrue(challenges, "the seed never challenged the impostor's address")
        self.assertTrue(self.linked())
        self.assertFalse(self.seed.overlay.liveness.verified(
            self.victim.peer_id, (IMPOSTOR_IP, 7400)))
        self.assertGreater(self.drops(self.seed).get("bad_proof", 0), 0)
        told = {f.type for f in self.impostor.received}
        self.assertNotIn(MessageType.ANNOUNCE, told)
        self.assertNotIn(MessageType.PEER_LIST, told)

    def test_a_member_cannot_take_another_members_reservation(self):
        """
        Reserving at the relay in the victim's name from the impostor's
        address, challenge answered in the victim's name, gets nothing: the
        relay forwards for proven identities only.
        """
        self.impostor.pose_as = (self.victim.peer_id, self.victim.overlay.sealer.boot)
        boot = self.victim.overlay.sealer.boot
        announcement = self.victim.overlay.gossip.own_announcement()
        for _ in range(6):
            self.impostor.send(self.seed.address, self.victim.peer_id, boot,
                               MessageType.ANNOUNCE, hops=0, announcement=announcement)
            self.sim.run(1)
            self.impostor.send(self.seed.address, self.victim.peer_id, boot,
                               MessageType.RELAY_RESERVE, lifetime_s=60)
            self.sim.run(4)
        held = self.seed.node.relay.reservations.get(
            (self.sim.key.network_id, self.victim.peer_id))
        self.assertTrue(held is None or held.address == self.victim.address)
        self.assertNotIn(MessageType.RELAY_ACCEPT, {f.type for f in self.impostor.received})

    def test_a_replayed_frame_of_an_earlier_run_after_restarts(self):
        """
        A frame captured from the victim's earlier run, replayed by an
        outsider after the victim and then the seed restarted, leaves the
        seed with the victim's real run.
        """
        captured = self.capture(self.seed, self.victim.address)
        self.sim.run(10)
        earlier_run = list(captured)
        self.assertTrue(earlier_run)
        self.sim.kill(self.victim)
        self.victim = self.sim.add_node(VICTIM_IP, [self.seed], name="victim",
                                        identity=self.victim.identity)
        self.assertTrue(self.sim.run_until(self.linked, 60))
        self.sim.kill(self.seed)
        self.seed = self.sim.add_node(SEED_IP, [self.victim], name="seed", relay=True,
                                      nat_type=NatType.PUBLIC, identity=self.seed.identity)
        self.assertTrue(self.sim.run_until(self.linked, 60))
        for data in earlier_run[-3:]:
            self.impostor.transport.write(data, self.seed.address)
            self.sim.run(1)
        self.sim.run(60)
        self.assertEqual(self.drops(self.seed).get("stale_boot", 0), 0)
        self.assertTrue(self.linked())
        self.assertTrue(self.victim_online())

    def capture(self, node, source) -> list[bytes]:
        """Record the datagrams C{node} receives from C{source} from now on."""
        captured = []
        protocol = node.port.protocol
        original = protocol.datagramReceived
        protocol.datagramReceived = lambda data, addr: (
            captured.append(data) if addr == source else None, original(data, addr))[1]
        return captured

    def delivered_from(self, node, source) -> list:
        """Record the frames C{node} hands its overlays from C{source} from now on."""
        frames = []
        original = node.node.frame_received
        node.node.frame_received = lambda frame, addr: (
            frames.append(frame) if addr == source else None, original(frame, addr))[1]
        return frames

    def test_frames_between_two_members_open_at_no_third(self):
        """
        Frames the victim sent the seed, replayed by an outsider to another
        member, do not open there: they are addressed to the seed's run.
        """
        third = self.sim.add_node("198.51.100.4", [self.seed], name="third")
        self.assertTrue(self.sim.run_until(self.sim.converged, 30))
        captured = self.capture(self.seed, self.victim.address)
        self.sim.run(10)
        replayed = list(captured)
        self.assertTrue(replayed)
        delivered = self.delivered_from(third, (IMPOSTOR_IP, 7400))
        for data in replayed:
            self.impostor.transport.write(data, third.address)
        self.sim.run(1)
        self.assertEqual(delivered, [])
        self.assertEqual(self.drops(third).get("misaddressed", 0), len(replayed))

    def test_a_restarted_node_opens_nothing_captured_before(self):
        """
        Frames captured on their way to the seed, replayed after the seed
        restarted (its replay windows gone), do not open: they are
        addressed to its earlier run.  The victim's own frames, addressed
        to the old run too until it learns the new one, draw a ping that
        tells it, and the pair is linked again.
        """
        captured = self.capture(self.seed, self.victim.address)
        self.sim.run(10)
        replayed = list(captured)
        self.assertTrue(replayed)
        self.sim.kill(self.seed)
        self.seed = self.sim.add_node(SEED_IP, [self.victim], name="seed", relay=True,
                                      nat_type=NatType.PUBLIC, identity=self.seed.identity)
        delivered = self.delivered_from(self.seed, (IMPOSTOR_IP, 7400))
        for data in replayed:
            self.impostor.transport.write(data, self.seed.address)
        self.sim.run(1)
        self.assertEqual(delivered, [])
        self.assertGreaterEqual(self.drops(self.seed).get("misaddressed", 0), len(replayed))
        self.assertTrue(self.sim.run_until(self.linked, 30))

    def spoofed(self, node, frames: list[bytes], victim=OUTSIDE, seconds: float = 10) -> int:
        """
        Deliver C{frames} to C{node} as if from C{victim}; the bytes the
        node sends C{victim} over the next C{seconds}.
        """
        sent = []
        original = node.node._sendto
        node.node._sendto = lambda data, addr: (
            sent.append(len(data)) if addr == victim else None, original(data, addr))[1]
        for frame in frames:
            node.port.protocol.datagramReceived(frame, victim)
        self.sim.run(seconds)
        return sum(sent)

    def test_no_answer_to_an_unproven_address_is_larger_than_its_request(self):
        """
        A flood of requests from a spoofed address, sealed by a member (pings
        with and without a proof asked, unpadded; relay requests) draws fewer
        bytes towards that address than the flood itself.
        """
        me, boot = self.impostor.identity.peer_id, os.urandom(8)
        frames = []
        for n in range(200):
            frames.append(self.impostor.seal(me, boot, MessageType.PING, nonce=n, sent_ms=0,
                                             flags=PING_PROVE if n % 2 else 0,
                                             contacts=[], padding=b""))
            frames.append(self.impostor.seal(me, boot, MessageType.RELAY_RESERVE,
                                             lifetime_s=60))
            frames.append(self.impostor.seal(me, boot, MessageType.RELAY_CONNECT,
                                             target=self.victim.peer_id))
        answered = self.spoofed(self.seed, frames)
        self.assertLessEqual(answered, sum(map(len, frames)))
        self.assertEqual(answered, 0, "small requests from an unproven address got answers")

    def test_a_member_cannot_aim_punch_probes_at_third_parties(self):
        """
        A member asks the relay to coordinate a punch with a NAT-bound
        member, naming addresses it does not own as its candidates: the
        target probes only addresses the relay vouches for.
        """
        nated = self.sim.add_behind_nat("port-restricted", "10.5.0.2", "203.0.113.5",
                                        [self.seed], name="nated")
        attacker = self.sim.add_node("198.51.100.3", [self.seed], name="attacker")

        def ready():
            return (self.seed.peer_id in nated.overlay.relays.held
                    and self.seed.overlay.liveness.verified(attacker.peer_id,
                                                            attacker.address))
        self.assertTrue(self.sim.run_until(ready, 60))
        probed = []
        original = nated.node._sendto
        nated.node._sendto = lambda data, addr: (probed.append(addr), original(data, addr))[1]
        named = ([{"kind": int(CandidateKind.HOST), "endpoint": OUTSIDE},
                  {"kind": int(CandidateKind.SERVER_REFLEXIVE), "endpoint": ("100.64.7.8", 9)}]
                 + [{"kind": int(CandidateKind.HOST), "endpoint": (f"10.99.0.{i}", 9)}
                    for i in range(1, 6)])
        attacker.overlay.send(self.seed.address, MessageType.PUNCH_REQUEST,
                              attempt_id=7, target=nated.peer_id,
                              nat_type=int(NatType.PUBLIC), candidates=named)
        self.sim.run(20)
        self.assertNotIn(OUTSIDE, probed)
        self.assertNotIn(("100.64.7.8", 9), probed)
        self.assertLessEqual(len({a for a in probed if a[0].startswith("10.99.")}), 2)
        self.assertGreater(self.seed.node.metrics.get("punch_candidates_refused"), 0)

    def test_many_identities_from_one_socket_take_a_bounded_share_of_a_relay(self):
        """
        The impostor makes identities of its own (real keys, so it proves
        each at its one address) and reserves at the relay with every one:
        the relay grants one socket a few reservations, not all of them.
        """
        relay = self.seed.node.relay
        boot = os.urandom(8)
        granted = 0
        for _ in range(12):
            identity = Identity.generate()
            self.impostor.pose_as = (identity.peer_id, boot, identity)
            self.impostor.send(self.seed.address, identity.peer_id, boot, MessageType.PING,
                               nonce=1, sent_ms=0, flags=PING_PROVE, contacts=[],
                               padding=bytes(CHALLENGE_SIZE))
            self.sim.run(1)
            self.impostor.send(self.seed.address, identity.peer_id, boot,
                               MessageType.RELAY_RESERVE, lifetime_s=60)
            self.sim.run(1)
        granted = sum(1 for r in relay.reservations.values() if r.address == (IMPOSTOR_IP, 7400))
        self.assertGreater(granted, 0, "the impostor's identities were never proven")
        self.assertLessEqual(granted, relay.config.reservations_per_address)
        self.assertGreater(self.seed.node.metrics.get(
            "relay_denied", reason="too_many_reservations"), 0)

    def test_a_flood_of_identities_takes_a_bounded_share_of_the_registry(self):
        """
        Hundreds of validly signed announcements of fresh identities from
        one socket: the seed takes a bounded number, counts the rest, and
        still takes a real newcomer.
        """
        before = len(self.seed.overlay.registry)
        for n in range(200):
            identity = Identity.generate()
            signed = sign_announcement(identity, self.sim.key.network_id, {
                "public_key": identity.public_key, "name": f"sybil-{n}", "sequence": 1,
                "timestamp_ms": int(self.sim.clock.seconds() * 1000), "ttl_s": 2**31,
                "nat_type": 0, "capabilities": 0, "paths": [],
                "resources": {"cpu_cores": 0, "memory_mb": 0, "disk_gb": 0, "gpus": 0}})
            self.impostor.send(self.seed.address, identity.peer_id, os.urandom(8),
                               MessageType.ANNOUNCE, hops=0, announcement=signed)
        self.sim.run(5)
        taken = len(self.seed.overlay.registry) - before
        outcomes = self.seed.node.metrics.by_label("gossip_announcements", "outcome")
        self.assertLessEqual(taken, 64)
        self.assertGreaterEqual(outcomes.get("source_rate", 0) + outcomes.get("source_full", 0),
                                200 - taken)
        newcomer = self.sim.add_node("198.51.100.5", [self.seed], name="newcomer")
        self.assertTrue(self.sim.run_until(
            lambda: self.seed.overlay.registry.get(newcomer.peer_id) is not None, 30))
