"""
The NAT traversal matrix in the NAT lab: real relay and provider daemons and
short-lived CLI nodes behind nftables NATs of every type, every
(initiator, target) pair connected several times, with and without loss,
plus two failover cases (a relay killed, a router's conntrack flushed),
all on a busy machine: a busy-loop process per core runs through every
measurement.

Needs root (skipped with the reason otherwise).  The lab and its daemons
are built once for the class (trial has no setUpClass: the first test
builds it, the last one in name order tears it down, and an atexit hook
catches runs of single tests).  See omerta/testing/matrix.py and
docs/natlab.md; scripts/natlab/matrix runs the same measurements with more
trials and writes docs/natlab-results.md.
"""

from __future__ import annotations

import atexit
import sys
import time

from twisted.trial import unittest

from omerta.testing.load import CpuLoad
from omerta.testing.matrix import MatrixLab
from omerta.testing.matrix_results import EXPECTED, render_failover, render_markdown
from tests.integration import require_lab

TRIALS = 5
LOSS_TRIALS = 2
LOSS_PCT = 10
RECOVERY_BOUND_S = 30.0
#: mesh connect --wait-direct in the tests: the slowest punch seen took
#: 7.5 s (a CLI node's own NAT discovery comes first); every relayed trial
#: waits this long, so it sets the test's duration.
WAIT_DIRECT_S = 8.0




def _say(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


class _Shared:
    """
    The one matrix lab of this module, built on first use.
    """

    matrix: MatrixLab | None = None
    failure: BaseException | None = None

    @classmethod
    def get(cls) -> MatrixLab:
        if cls.failure is not None:
            raise AssertionError(f"the matrix lab could not be built: {cls.failure}")
        if cls.matrix is None:
            matrix = MatrixLab(prefix="ommxt", log=lambda line: _say(f"[matrix] {line}"))
            try:
                matrix.up(timeout=90)
            except BaseException as e:
                matrix.down()
                cls.failure = e
                raise
            cls.matrix = matrix
            atexit.register(cls.down)
        return cls.matrix

    @classmethod
    def down(cls) -> None:
        if cls.matrix is not None:
            matrix, cls.matrix = cls.matrix, None
            matrix.down()


class NatMatrixTests(unittest.TestCase):
    """
    Every pair of NAT types connects, on the path physically possible, and
    paths come back after a relay dies or a NAT forgets its mappings.
    """

    timeout = 900

    def setUp(self):
        require_lab()
        self.matrix = _Shared.get()
        names = sorted(n for n in dir(type(self)) if n.startswith("test"))
        if self._testMethodName == names[-1]:
            self.addCleanup(_Shared.down)
        # the product must cope with a busy machine, not only with an idle one
        self.load = CpuLoad().start()
        self.addCleanup(self.load.stop)

    def _progress(self, trial):
        if not trial.ok:
            _say(f"  {trial.initiator} -> {trial.target}: FAILED {trial.error}")

    def test_matrix(self):
        """
        5 trials per (initiator, target) pair without loss: every trial
        connects; pairs where a direct path is possible end direct on every
        trial, symmetric/symmetric ends relayed, symmetric/port-restricted
        may end either way.
        """
        started = time.monotonic()
        pairs = self.matrix.run_matrix(trials=TRIALS, wait_direct=WAIT_DIRECT_S,
                                       progress=self._progress)
        took = time.monotonic() - started
        _say(render_markdown(pairs, f"{TRIALS} trials per pair, no loss ({took:.0f} s)"))
        self.assertEqual({(p.initiator, p.target) for p in pairs}, set(EXPECTED))
        problems = [message for p in pairs for message in p.problems()]
        self.assertEqual(problems, [], "\n".join(problems))

    def test_matrix_with_loss(self):
        """
        With 10% random loss on every router, every pair still connects
        (on whatever path) in every trial.
        """
        started = time.monotonic()
        pairs = self.matrix.run_matrix(trials=LOSS_TRIALS, loss=LOSS_PCT,
                                       wait_direct=WAIT_DIRECT_S, progress=self._progress)
        took = time.monotonic() - started
        _say(render_markdown(pairs, f"{LOSS_TRIALS} trials per pair, {LOSS_PCT}% loss"
                                    f" ({took:.0f} s)", require_path=False))
        for router in self.matrix.lab.routers:
            self.assertEqual(router.loss, 0, "loss left on after the run")
        problems = [message for p in pairs for message in p.problems(require_path=False)]
        self.assertEqual(problems, [], "\n".join(problems))

    def test_relay_failover(self):
        """
        A target behind a symmetric NAT holds reservations on both relays;
        pinging it from behind a symmetric NAT (a relayed path), kill -9
        the relay in use: the pings come back through the other relay
        within 30 s.
        """
        result = self.matrix.failover_relay("symmetric", "symmetric")
        _say(render_failover([result]))
        _say(result.summary())
        self.assertEqual(result.relays_held, 2, result.summary())
        self.assertTrue(result.ok, result.summary())
        self.assertLess(result.recovery_s, RECOVERY_BOUND_S, result.summary())
        self.assertEqual(result.before.kind, "relayed", result.summary())
        self.assertEqual(result.after.kind, "relayed", result.summary())
        self.assertNotEqual(result.after.endpoint, result.before.endpoint,
                            f"still the killed relay's endpoint: {result.summary()}")

    def test_remap_failover(self):
        """
        As the conntrack case, but the target's router also gives its hosts
        new outside ports (a reboot that does not keep ports): the pings
        come back (through a relay that followed the target to its new
        address), then over a direct path again, within 30 s.
        """
        result = self.matrix.failover_conntrack("port-restricted", "restricted-cone",
                                                flush="target", remap=True)
        _say(render_failover([result]))
        _say(result.summary())
        self.assertTrue(result.ok, result.summary())
        self.assertLess(result.recovery_s, RECOVERY_BOUND_S, result.summary())
        self.assertLess(result.direct_again_s, RECOVERY_BOUND_S, result.summary())

    def test_conntrack_failover(self):
        """
        A direct path between a port-restricted initiator and a
        restricted-cone target; flush the target router's conntrack (and
        cone map and set) while pinging: the pings come back over a direct
        path (possibly relayed in between) within 30 s.
        """
        result = self.matrix.failover_conntrack("port-restricted", "restricted-cone",
                                                flush="target")
        _say(render_failover([result]))
        _say(result.summary())
        self.assertTrue(result.ok, result.summary())
        self.assertLess(result.direct_again_s, RECOVERY_BOUND_S, result.summary())
