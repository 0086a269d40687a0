"""
The simulation tools themselves: simulated signatures (and the count of the
real ones they stand for), the simulated network's per-kind counters, a
clean leave in MeshSim, the membership model, and the benchmark that runs
the real nodes and the model side by side.
"""

import contextlib
import io
import random
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from twisted.trial import unittest

from omerta.crypto import announce, identity, proof, session
from omerta.crypto.identity import Identity, verify_signature
from omerta.testing import fastsig
from omerta.testing.fastsig import simulated_signatures
from omerta.testing.membership_model import FrameSizes, MembershipModel
from omerta.testing.meshsim import MeshSim
from omerta.testing.simnet import SimNetwork
from omerta.wire.envelope import MIN_FRAME_SIZE

REPO = Path(__file__).resolve().parents[1]
LABEL = b"omerta announce v1\x00"


class SimulatedSignatureTests(unittest.TestCase):
    def test_signatures_are_a_keyed_hash_only_inside(self):
        """Inside the block a signature is the keyed hash; outside it is Ed25519 again."""
        me = Identity.generate()
        with simulated_signatures():
            fake = me.sign(LABEL + b"record")
            self.assertEqual(fake, fastsig.simulated_signature(me.public_key, LABEL + b"record"))
        real = me.sign(LABEL + b"record")
        self.assertNotEqual(real, fake)
        Ed25519PublicKey.from_public_bytes(me.public_key).verify(real, LABEL + b"record")
        self.assertFalse(verify_signature(me.public_key, fake, LABEL + b"record"))

    def test_checks_reject_tampering_and_other_keys(self):
        """A simulated check still fails on changed bytes, another key, or a weak key."""
        me, other = Identity.generate(), Identity.generate()
        with simulated_signatures() as counts:
            signature = me.sign(LABEL + b"record")
            self.assertTrue(announce.verify_signature(me.public_key, signature, LABEL + b"record"))
            self.assertFalse(proof.verify_signature(me.public_key, signature, LABEL + b"recorD"))
            self.assertFalse(session.verify_signature(other.public_key, signature,
                                                      LABEL + b"record"))
            self.assertFalse(identity.verify_signature(bytes(32), signature, LABEL + b"record"))
        self.assertEqual(counts.rejected, 3)

    def test_every_module_gets_the_real_check_back(self):
        """After the block no omerta module holds the simulated check."""
        with simulated_signatures() as counts:
            self.assertIs(announce.verify_signature.__self__, counts)
        for name, module in list(sys.modules.items()):
            if name.startswith("omerta.") and hasattr(module, "verify_signature"):
                self.assertIs(module.verify_signature, fastsig._REAL_VERIFY, name)
        self.assertIs(Identity.sign, fastsig._REAL_SIGN)
        self.assertIsNone(fastsig.active())

    def test_counts_by_label(self):
        """Signatures made and checked are counted by the label the signed bytes start with."""
        me = Identity.generate()
        with simulated_signatures() as counts:
            signature = me.sign(LABEL + b"x")
            me.sign(b"omerta pong proof v1\x00y")
            identity.verify_signature(me.public_key, signature, LABEL + b"x")
            identity.verify_signature(me.public_key, signature, b"no label here")
        self.assertEqual(counts.signed, {"omerta announce v1": 1, "omerta pong proof v1": 1})
        self.assertEqual(counts.verified, {"omerta announce v1": 1, "unlabelled": 1})

    def test_not_reentrant(self):
        """A second block inside the first is refused."""
        with simulated_signatures():
            with self.assertRaises(RuntimeError):
                with simulated_signatures():
                    pass

    def test_real_cost(self):
        """The real cost is the counted operations times the measured microseconds."""
        timing = fastsig.Ed25519Timing(sign_us=40.0, verify_us=100.0, rounds=1)
        cost = fastsig.real_cost(timing, fastsig.Counter({"a": 20}), fastsig.Counter({"a": 50}),
                                 node_seconds=10.0)
        self.assertEqual(cost["signs_per_node_s"], 2.0)
        self.assertEqual(cost["verifies_per_node_s"], 5.0)
        self.assertEqual(cost["cpu_us_per_node_s"], 580.0)

    def test_measure_ed25519(self):
        """Timing the real operations works inside the block too."""
        with simulated_signatures():
            timing = fastsig.measure_ed25519(rounds=20)
        self.assertGreater(timing.sign_us, 1.0)
        self.assertGreater(timing.verify_us, 1.0)

    def test_memoized_parsing_changes_nothing_the_nodes_do(self):
        """A mesh sends the same frames, byte for byte counted, with parsing memoized or not."""
        def run(memo):
            rng = random.Random(9)
            identities = [Identity(Ed25519PrivateKey.from_private_bytes(
                bytes(rng.getrandbits(8) for _ in range(32)))) for _ in range(12)]
            with fastsig.memoized_record_parsing() if memo else contextlib.nullcontext():
                sim = MeshSim(seed=4, latency=0.02, classify=lambda data: data[3] & 0x3F)
                seed = sim.add_node("198.51.100.1", name="n0", identity=identities[0])
                for k in range(1, 12):
                    sim.clock.callLater(k * 0.2, sim.add_node, f"10.1.0.{k}", [seed], f"n{k}",
                                        identities[k])
                sim.run(20)
                sim.kill(sim.nodes[5])
                sim.run(10)
                sim.stop()
                return dict(sim.net.sent_by_kind), dict(sim.net.bytes_by_kind)

        plain = run(False)
        self.assertEqual(run(True), plain)
        from omerta.mesh import registry
        self.assertIs(registry.parse_record, fastsig._REAL_PARSE_RECORD)

    def test_the_product_never_imports_simulation_tools(self):
        """Nothing under omerta/ outside omerta/testing imports fastsig or the model."""
        offenders = []
        for path in (REPO / "omerta").rglob("*.py"):
            if "testing" in path.relative_to(REPO / "omerta").parts:
                continue
            text = path.read_text()
            if re.search(r"fastsig|membership_model|simulated_signatures", text):
                offenders.append(str(path))
        self.assertEqual(offenders, [])


class SimNetworkCountingTests(unittest.TestCase):
    def test_classify_counts_frames_and_bytes_by_kind(self):
        """With classify set, every datagram sent is counted under its kind, lost or not."""
        net = SimNetwork(seed=1, loss=0.5, classify=lambda data: data[:1])

        class Sink:
            def datagramReceived(self, data, addr):
                pass

            def makeConnection(self, transport):
                pass

            def doStart(self):
                pass

        a = net.host("10.0.0.1").reactor.listenUDP(1000, Sink(), interface="10.0.0.1")
        net.host("10.0.0.2").reactor.listenUDP(1000, Sink(), interface="10.0.0.2")
        for _ in range(10):
            a.write(b"xyz", ("10.0.0.2", 1000))
        a.write(b"ab", ("10.0.0.2", 1000))
        self.assertEqual(net.sent_by_kind, {b"x": 10, b"a": 1})
        self.assertEqual(net.bytes_by_kind, {b"x": 30, b"a": 2})


class MeshSimLeaveTests(unittest.TestCase):
    def test_leave_is_known_by_the_peers(self):
        """A node that leaves cleanly is known gone, as having left, by its peers."""
        sim = MeshSim(seed=11)
        self.addCleanup(sim.stop)
        seed = sim.add_node("198.51.100.1", name="seed")
        nodes = [sim.add_node(f"10.1.0.{i + 1}", bootstrap=[seed], name=f"n{i}")
                 for i in range(6)]
        self.assertTrue(sim.run_until(sim.converged, timeout=30))
        gone = []
        for node in [seed] + nodes[1:]:
            node.node.events.subscribe("peer_gone", lambda **kw: gone.append(kw))
        sim.leave(nodes[0])
        sim.run(2)
        self.assertEqual(len(gone), 6)
        self.assertTrue(all(g["peer_id"] == nodes[0].peer_id for g in gone))
        self.assertIn("left", {g["reason"] for g in gone})
        self.assertNotIn(nodes[0], sim.live())


def small_model(n=30, seed=3, **options):
    model = MembershipModel(capacity=n + 1, seed=seed, **options)
    model.add_node()
    for k in range(1, n):
        model.call_later(k * 0.05, model.add_node, [0])
    return model


class MembershipModelTests(unittest.TestCase):
    def test_frame_sizes_follow_the_codec(self):
        """The model's frame sizes come from the product's codec and envelope."""
        sizes = FrameSizes.measure(name="n50")
        from omerta.crypto.proof import PROOF_SIZE
        from omerta.mesh import liveness
        self.assertEqual(sizes.ping[0], liveness.CHALLENGE_SIZE)
        self.assertEqual(sizes.proof, PROOF_SIZE)
        # (an IPv4 observed address: 12 bytes less than the IPv6 bound)
        self.assertEqual(sizes.pong[0], liveness.PONG_SIZE - 12)
        self.assertGreater(sizes.list_entry, sizes.record + 64)
        self.assertGreater(sizes.indirect_ping, MIN_FRAME_SIZE)

    def test_cold_start_converges(self):
        """Thirty model nodes bootstrapping from one seed all learn each other."""
        model = small_model()
        learnt = []
        model.on("discovered", lambda i, j, now: learnt.append((i, j)))
        model.run(30)
        self.assertEqual(len(set(learnt)), 30 * 29)
        for node in model.nodes:
            self.assertLessEqual(len(node.links), model.config.max_active)

    def test_dead_node_declared_gone_by_all(self):
        """A killed model node is declared gone (failed) by every live node, once each."""
        model = small_model()
        model.run(30)
        gone = []
        model.on("gone", lambda i, j, now, reason: gone.append((i, j, reason)))
        model.kill(7)
        model.run(20)
        self.assertEqual(sorted(i for i, j, _ in gone if j == 7),
                         [i for i in range(30) if i != 7])
        self.assertEqual({reason for _, _, reason in gone}, {"failed"})
        self.assertTrue(all(model.state_of(i, 7) == "offline" for i in model.live()))

    def test_leave_known_at_once(self):
        """A model node that leaves is known gone by everyone within a second."""
        model = small_model()
        model.run(30)
        gone = {}
        model.on("gone", lambda i, j, now, reason: gone.setdefault(i, now))
        start = model.now
        model.leave(4)
        model.run(1.0)
        self.assertEqual(len(gone), 29)
        self.assertLess(max(gone.values()) - start, 1.0)

    def test_suspected_live_node_refutes(self):
        """A suspicion of a live model node is refuted: nobody declares it gone."""
        model = small_model()
        model.run(30)
        gone, refuted = [], []
        model.on("gone", lambda i, j, now, reason: gone.append(j))
        model.on("refuted", lambda i, j, now: refuted.append(i))
        accuser = model.nodes[2]
        model._suspect_member(accuser, 9, accuser.i)
        model.run(30)
        self.assertEqual(refuted, [9])
        self.assertEqual(gone, [])
        self.assertEqual({model.state_of(i, 9) for i in model.live() if i != 9}, {"online"})

    def test_deterministic(self):
        """Two models with one seed make the same run."""
        runs = []
        for _ in range(2):
            model = small_model(loss=0.05)
            model.run(20)
            runs.append((dict(model.frames), dict(model.bytes), model.counters["told"]))
        self.assertEqual(runs[0], runs[1])

    def test_model_traffic_matches_real_nodes(self):
        """At 20 nodes the model's keepalive and sync traffic is within 15% of the real nodes'."""
        n = 20
        with simulated_signatures():
            sim = MeshSim(seed=5, latency=0.02, classify=lambda data: data[3] & 0x3F)
            self.addCleanup(sim.stop)
            seed = sim.add_node("198.51.100.1", name="n0")
            for k in range(1, n):
                sim.add_node(f"10.1.0.{k}", bootstrap=[seed], name=f"n{k}")
            sim.run(40)
            before = sum(sim.net.sent_by_kind.values())
            sim.run(30)
            real = (sum(sim.net.sent_by_kind.values()) - before) / n / 30
        model = small_model(n=n, seed=5)
        model.run(40)
        before = sum(model.frames.values())
        model.run(30)
        modelled = (sum(model.frames.values()) - before) / n / 30
        self.assertLess(abs(modelled / real - 1.0), 0.15, (modelled, real))


class BenchmarkTests(unittest.TestCase):
    def test_bench_runs_real_and_model_side_by_side(self):
        """The benchmark prints real and model rows for a small mesh, with the crypto cost."""
        sys.path.insert(0, str(REPO / "scripts" / "bench"))
        self.addCleanup(sys.path.remove, str(REPO / "scripts" / "bench"))
        import gossip
        saved = self.mktemp()
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            gossip.main(["--sizes", "12", "--fast-signatures", "--memo-records",
                         "--settle", "5", "--steady", "5",
                         "--joins", "1", "--dead-cap", "20", "--leave-cap", "5",
                         "--loss-window", "10", "--json-file", saved])
        text = out.getvalue()
        self.assertRegex(text, r"\n12 +\| real ")
        self.assertRegex(text, r"\n12 +\| model ")
        self.assertIn("SIMULATED", text)
        self.assertIn("real Ed25519 cost", text)
        self.assertIsNone(fastsig.active())
        again = io.StringIO()
        with redirect_stdout(again):
            gossip.main(["--report-from", saved])
        self.assertEqual(again.getvalue().split("\n## ")[0].split("\n", 3)[3],
                         text.split("\n## ")[0].split("\n", 3)[3])

    def test_sizes_that_do_not_fit_are_not_run_real(self):
        """A size whose registries would not fit the memory budget runs as the model only."""
        sys.path.insert(0, str(REPO / "scripts" / "bench"))
        self.addCleanup(sys.path.remove, str(REPO / "scripts" / "bench"))
        import gossip
        memory = {"bytes_per_record": 1700.0, "bytes_per_node": 65000.0}
        self.assertGreater(gossip.projected_bytes(memory, 10000), 24 * 1024 ** 3)
        self.assertLess(gossip.projected_bytes(memory, 1000), 24 * 1024 ** 3)
