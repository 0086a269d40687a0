"""
The NAT matrix on routers that are not home routers (see docs/natlab.md,
"Router variants"): without an input filter (behind an ISP router each),
and two hosts on one LAN behind a router that does not hairpin.  Each test builds its own lab
(relay and provider daemons, short-lived CLI nodes), runs one trial per
pair and asserts every pair connects on the path physics allows.

Hosts behind a carrier-grade NAT (double-nat) punch through both layers.
Routers without an input filter side by side on one segment
(open-input-no-hop), where two port-restricted cones wait the other
router out (35 s), are measured by scripts/natlab/matrix --variants, not
here.  Needs root (skipped with the reason otherwise).
"""

from __future__ import annotations

import sys
import time

from twisted.trial import unittest

from omerta.testing.matrix import MatrixLab
from omerta.testing.matrix_results import render_markdown
from tests.integration import require_lab


def _say(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


class NatVariantTests(unittest.TestCase):
    timeout = 600

    def setUp(self):
        require_lab()

    def run_variant(self, variant: str, nat_types, runs, wait_direct: float) -> None:
        """
        One lab of C{variant} routers for C{nat_types}; each of C{runs}
        (initiator types, target types) is one matrix run of 1 trial per pair.
        """
        matrix = MatrixLab(nat_types, prefix="ommxv", variant=variant,
                           log=lambda line: _say(f"[{variant}] {line}"))
        pairs = []
        with matrix:
            started = time.monotonic()
            for initiators, targets in runs:
                pairs += matrix.run_matrix(trials=1, initiators=initiators, targets=targets,
                                           wait_direct=wait_direct)
            took = time.monotonic() - started
        _say(render_markdown(pairs, f"{variant} routers, 1 trial per pair ({took:.0f} s)"))
        problems = [message for p in pairs for message in p.problems()]
        self.assertEqual(problems, [], "\n".join(problems))

    def test_open_input(self):
        """
        Routers without an input filter, an ISP router in front of each: a
        restricted cone goes first and punches with every type that can be
        punched, and two port-restricted cones punch at once too (the
        leader's first probes open its NAT and die at its ISP router).
        """
        self.run_variant(
            "open-input", ("restricted-cone", "port-restricted", "symmetric"),
            runs=[(("restricted-cone", "port-restricted", "symmetric"), ("restricted-cone",)),
                  (("restricted-cone", "port-restricted"), ("port-restricted",))],
            wait_direct=8.0)

    def test_double_nat(self):
        """
        Each host behind a home router behind a carrier-grade NAT (port-
        restricted, no input filter): two such hosts punch through both
        layers, and a public host reaches them.
        """
        self.run_variant(
            "double-nat", ("none", "restricted-cone", "port-restricted"),
            runs=[(("restricted-cone", "port-restricted"), ("restricted-cone", "port-restricted")),
                  (("none",), ("port-restricted",))],
            wait_direct=8.0)

    def test_same_lan(self):
        """Two hosts on one LAN behind a router that does not hairpin: direct, every NAT type."""
        types = ("full-cone", "restricted-cone", "port-restricted", "symmetric")
        self.run_variant("same-lan", types, runs=[(None, None)], wait_direct=8.0)
