"""
The VM tunnel end to end in the NAT lab (docs/tunnel.md): real relays, real
providers with QEMU guests (each with a libvirtd of its own in its lab
namespace), consumers in namespaces of their own running 'omerta up', ssh
through WireGuard carried by the mesh.  One flow per test, the same flows
as scripts/e2e/ (omerta/testing/e2e.py, omerta/testing/e2e_flows.py):

 - vm-provision: all public; request, ssh hostname, release leaves nothing;
 - vm-nat: port-restricted consumer, restricted-cone provider: punched or
   direct path, ssh;
 - vm-relay: both symmetric: relayed path, ssh;
 - failover: both symmetric, 20 MB through the tunnel while the relay in use
   is killed: intact, the interface never goes down, stall vs recovery;
 - job-relay: both symmetric, a provider running jobs in its sandbox (no
   guests): 'omerta job submit --wait' prints 42 over a relayed path;
 - isolation: a second consumer reaches only its own VM; a member without a
   VM there has its tunnel frames dropped (tunnel_no_endpoint).

One lab for the module (trial has no setUpClass: the first test builds it,
the last in name order takes it down, an atexit hook covers single tests).
Needs root: skipped with the reason otherwise; as root a lab that cannot be
built is a failure.  Figures go to stdout (the failover's stall and path
recovery among them).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys

from twisted.trial import unittest

from omerta.jobs.sandbox import sandbox_problem
from omerta.testing import e2e, e2e_flows
from tests.integration import REPO

SCRIPTS = REPO / "scripts" / "e2e"


def _say(text: str) -> None:
    sys.stdout.write(f"[e2e] {text}\n")
    sys.stdout.flush()


def require_root() -> None:
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root: network namespaces, libvirtd, WireGuard and"
                                " nftables in the lab")
    problems = e2e.check_environment()
    if problems:
        raise AssertionError("the end-to-end lab cannot run as root here: "
                             + "; ".join(problems) + "; run scripts/setup-env")


class _Shared:
    """The one lab of this module, built on first use."""

    lab: e2e.E2ELab | None = None
    failure: BaseException | None = None

    @classmethod
    def get(cls) -> e2e.E2ELab:
        if cls.failure is not None:
            raise AssertionError(f"the end-to-end lab could not be built: {cls.failure}")
        if cls.lab is None:
            lab = e2e.E2ELab(prefix="ome2et", log=_say)
            try:
                lab.up()
            except BaseException as err:
                lab.down()
                cls.failure = err
                raise
            cls.lab = lab
            atexit.register(cls.down)
        return cls.lab

    @classmethod
    def down(cls) -> None:
        if cls.lab is not None:
            lab, cls.lab = cls.lab, None
            lab.down()


class TunnelEndToEndTests(unittest.TestCase):
    """
    A consumer reaches its VM by ssh over the mesh through every kind of
    path, the tunnel survives a relay's death, and consumers are isolated.
    """

    timeout = 400

    def run_flow(self, name: str, **kw) -> e2e.FlowResult:
        require_root()
        lab = _Shared.get()
        try:
            result = e2e_flows.FLOWS[name](lab, **kw)
        except e2e.E2EError as err:
            self.fail(str(err))
        self.assertTrue(result.ok)
        return result

    def test_1_vm_provision(self):
        """All public: vm request returns a reachable guest, ssh prints its hostname, and release leaves no domain, disk, ledger address, WireGuard peer, firewall pair or consumer interface."""
        self.run_flow("vm-provision")

    def test_2_vm_nat(self):
        """Consumer behind a port-restricted NAT, provider behind a restricted cone: the tunnel's path is punched or direct and ssh works."""
        result = self.run_flow("vm-nat")
        self.assertIn(result.figures["path"], e2e.DIRECT_KINDS)

    def test_3_vm_relay(self):
        """Both behind symmetric NATs: the tunnel's path is relayed and ssh works."""
        result = self.run_flow("vm-relay")
        self.assertTrue(result.figures["path"].startswith("relayed"))

    def test_4_failover(self):
        """Killing the relay in use during a 20 MB copy into the guest: the copy completes intact and the consumer's WireGuard interface (index, wireguard-go) never goes away."""
        result = self.run_flow("failover")
        _say(f"failover figures: {result.figures}")

    def test_5_job_relay(self):
        """Both behind symmetric NATs, the provider running jobs in its sandbox: omerta job submit --wait -- python3 -c 'print(6*7)' prints 42, exits 0, over a relayed path."""
        require_root()
        problem = sandbox_problem()
        if problem is not None:
            raise unittest.SkipTest(f"jobs run in the sandbox, which cannot work here: {problem}")
        result = self.run_flow("job-relay")
        self.assertTrue(result.figures["path"].startswith("relayed"))

    def test_6_isolation(self):
        """A second consumer reaches its own VM but not the first's VM nor the provider's bridge or lab address through the tunnel; a non-consumer's tunnel frames are dropped as tunnel_no_endpoint."""
        try:
            self.run_flow("isolation")
        finally:
            _Shared.down()

    def test_scripts(self):
        """Each scripts/e2e flow script exists, is executable and describes its flow (--help), without root."""
        for name in e2e_flows.FLOWS:
            script = SCRIPTS / name
            self.assertTrue(os.access(script, os.X_OK), f"{script} is not executable")
            # with this Python: a fresh clone has no .venv for the script to find
            result = subprocess.run([sys.executable, str(script), "--help"],
                                    capture_output=True, text=True, timeout=60, cwd=REPO)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(name, result.stdout)
