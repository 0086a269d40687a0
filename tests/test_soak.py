"""
A short soak (scripts/soak/run) of a real five-node mesh on loopback: one
member leaves and returns; CPU, memory and frame rates stay within the
script's limits.  The ten-minute version is C{scripts/soak/run}.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from tests.integration import REPO, environment

SCRIPT = REPO / "scripts" / "soak" / "run"
# 1.5 minutes measured (a quiet 30 s, then two leave/return cycles of 2 x 15 s,
# one SIGTERM and one SIGKILL) plus the join and the stops: about 100 s
ARGS = ["--minutes", "1.5", "--period", "15", "--nodes", "5", "--json"]
DEADLINE = 200


def _missing() -> str | None:
    """What the soak needs and this machine lacks, or None."""
    if not Path("/proc/self/stat").exists():
        return "needs Linux /proc (CPU time and RSS per process)"
    python = REPO / ".venv" / "bin" / "python"
    python = python if python.exists() else Path(sys.executable)
    if not python.with_name("twistd").exists():
        return f"needs twistd next to {python}: run scripts/setup-env"
    probe = subprocess.run([str(python), "-c", "import libvirt"], capture_output=True,
                           env=environment(), timeout=60)
    if probe.returncode != 0:
        return "the provider needs libvirt-python (libvirt's test:///default driver):" \
               " run scripts/setup-env"
    return None


class ShortSoakTests(unittest.TestCase):
    timeout = DEADLINE + 30

    def test_churn_keeps_cpu_memory_and_frames_flat(self):
        """Five real nodes, one member leaving (SIGTERM, then SIGKILL) and returning: all checks pass."""
        missing = _missing()
        if missing:
            raise unittest.SkipTest(missing)
        keep = os.path.abspath(self.mktemp())
        result = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--keep", keep],
                                capture_output=True, text=True, env=environment(),
                                timeout=DEADLINE)
        self.assertNotEqual(result.returncode, 2,
                            f"the mesh could not be set up:\n{result.stderr[-6000:]}")
        document = json.loads(result.stdout)
        failed = [{k: r[k] for k in ("node", "checks", "cpu_run_pct", "rss", "sent_run",
                                     "received_run")}
                  for r in document["nodes"] if not r["pass"]]
        self.assertEqual((result.returncode, failed, document["failure"]), (0, [], None),
                         f"soak failed (logs in {keep}):\n{result.stderr[-4000:]}")
        self.assertTrue(document["passed"])
        # it measured what it says: every node sampled, the member left twice
        # (once killed) and came back each time
        self.assertEqual(len(document["nodes"]), 5)
        for row in document["nodes"]:
            self.assertIsNotNone(row["cpu_run_pct"], row["node"])
            self.assertIsNotNone(row["sent_run"]["avg"], row["node"])
            self.assertTrue(row["rss"], row["node"])
        signals = [e["signal"] for e in document["events"] if e["event"] == "stopped"]
        self.assertEqual(signals, ["SIGTERM", "SIGKILL"])
        returns = [e for e in document["events"] if e["event"] == "started"]
        self.assertEqual(len(returns), 2)
        self.assertIsNotNone(document["whole_at_end_after_s"])
