"""
The NAT matrix on routers that are not home routers (see docs/natlab.md,
"Router variants"): without an input filter, behind a carrier-grade NAT,
and two hosts on one LAN behind a router that does not hairpin.  Each test
builds its own lab (relay and provider daemons, short-lived CLI nodes),
runs one trial per pair and asserts every pair connects on the path
physics allows.

Between two port-restricted cones on routers without an input filter the
first probe to cross leaves a conntrack entry that moves the other host's
mapping; the punch waits that entry out (33 s), so those trials are given
C{HOLD_WAIT_S} to end direct.  Needs root (skipped with the reason
otherwise).
"""

from __future__ import annotations

import sys
import time

from twisted.trial import unittest

from omerta.testing.matrix import MatrixLab
from omerta.testing.matrix_results import render_markdown
from tests.integration import require_lab

#: mesh connect --wait-direct where a hold may be needed: the follower
#: probes again 32.5 s after the start, plus margin for a busy machine.
HOLD_WAIT_S = 45.0


def _say(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


class NatVariantTests(unittest.TestCase):
    timeout = 600

    def setUp(self):
        require_lab()

    def run_variant(self, variant: str, nat_types, initiators, targets,
                    wait_direct: float) -> None:
        matrix = MatrixLab(nat_types, prefix="ommxv", variant=variant,
                           log=lambda line: _say(f"[{variant}] {line}"))
        with matrix:
            started = time.monotonic()
            pairs = matrix.run_matrix(trials=1, initiators=initiators, targets=targets,
                                      wait_direct=wait_direct)
            took = time.monotonic() - started
        _say(render_markdown(pairs, f"{variant} routers, 1 trial per pair ({took:.0f} s)"))
        problems = [message for p in pairs for message in p.problems()]
        self.assertEqual(problems, [], "\n".join(problems))

    def test_open_input(self):
        """
        Routers without an input filter: restricted cones punch at once,
        two port-restricted cones punch after the hold, symmetric towards a
        restricted cone punches.
        """
        types = ("restricted-cone", "port-restricted", "symmetric")
        self.run_variant("open-input", types, initiators=types,
                         targets=("restricted-cone", "port-restricted"),
                         wait_direct=HOLD_WAIT_S)

    def test_double_nat(self):
        """
        Hosts behind a home router behind a carrier-grade NAT (port-restricted,
        no input filter) of their own: cones end direct, symmetric towards
        port-restricted either way.
        """
        types = ("full-cone", "port-restricted", "symmetric")
        self.run_variant("double-nat", types, initiators=types,
                         targets=("full-cone", "port-restricted"), wait_direct=HOLD_WAIT_S)

    def test_same_lan(self):
        """Two hosts on one LAN behind a router that does not hairpin: direct, every NAT type."""
        types = ("full-cone", "restricted-cone", "port-restricted", "symmetric")
        self.run_variant("same-lan", types, initiators=None, targets=None, wait_direct=8.0)
