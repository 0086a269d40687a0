"""
Tests for the NAT lab (L{omerta.testing.natlab}): namespaces come and go
without leftovers, each NAT type maps and filters as its name says (checked
with the UDP probes of tests/natlab_probe.py and cross-checked with coturn
and Debian's C{stun} client), loss drops about what it is set to, and the
C{natlab} CLI brings a lab up and down.

Every test that touches the system skips, saying why, when not root or when
C{ip}, C{nft} or C{conntrack} is missing; the STUN cross-checks also need
C{turnserver} (coturn) and C{stun} (stun-client).  Waits read process
output or poll with a deadline; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

from omerta.testing import natlab
from tests.integration import require_lab

REPO = Path(__file__).resolve().parent.parent
PROBE = str(Path(__file__).with_name("natlab_probe.py"))
CLI = str(REPO / "scripts" / "natlab" / "natlab")
PREFIX = "omtest"

SERVER_A, SERVER_B = natlab.DEFAULT_SERVER_ADDRESSES
PORT, OTHER_PORT = 3000, 3001
CONTACTED = f"{SERVER_A}:{PORT}"
SAME_IP_OTHER_PORT = f"{SERVER_A}:{OTHER_PORT}"
OTHER_IP = f"{SERVER_B}:{PORT}"
OTHER_IP_OTHER_PORT = f"{SERVER_B}:{OTHER_PORT}"
EVERY_SOURCE = [CONTACTED, SAME_IP_OTHER_PORT, OTHER_IP, OTHER_IP_OTHER_PORT]

# What a host behind each NAT type receives when the server answers from
# each of its sockets after the host contacted only CONTACTED.
ACCEPTED = {
    "none": set(EVERY_SOURCE),
    "full-cone": set(EVERY_SOURCE),
    "restricted-cone": {CONTACTED, SAME_IP_OTHER_PORT},
    "port-restricted": {CONTACTED},
    "symmetric": {CONTACTED},
}

# Debian's stun client (stund 0.97): the "Primary:" line and the NAT type
# bits (0x0E) of its exit status; 0x10 means "no hairpin", 0x01 "preserves
# ports".
STUN_VERDICT = {
    "none": ("Open", 0x00),
    "full-cone": ("Independent Mapping, Independent Filter", 0x02),
    "restricted-cone": ("Independent Mapping, Address Dependent Filter", 0x04),
    "port-restricted": ("Independent Mapping, Port Dependent Filter", 0x06),
    "symmetric": ("Dependent Mapping", 0x08),
}




def require_stun_tools() -> None:
    missing = [
        f"needs '{tool}': install the Debian package {package}"
        for tool, package in (("turnserver", "coturn"), ("stun", "stun-client"))
        if shutil.which(tool) is None
    ]
    if missing:
        raise SkipTest("; ".join(missing))


def root_links() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def lab_namespaces(tag_or_prefix: str) -> list[str]:
    return [ns for ns in natlab.list_namespaces() if ns.startswith(tag_or_prefix + "-")]


class LabCase(SynchronousTestCase):
    """
    Helpers for tests that build labs; skips when a lab cannot be built.
    """

    def setUp(self):
        require_lab()

    def make_lab(self) -> natlab.Lab:
        lab = natlab.Lab(name_prefix=PREFIX)
        self.addCleanup(lab.down)
        return lab

    def nat_lab(self, nat_type: str, loss: int = 0):
        """
        A server with two addresses and one host, behind a router of
        C{nat_type} (or on the public segment for "none"); up.
        """
        lab = self.make_lab()
        server = lab.add_server("server")
        router = None if nat_type == "none" else lab.add_nat("nat", nat_type, loss=loss)
        host = lab.add_host("host", behind=router)
        lab.up()
        return lab, server, router, host

    def start_probe_server(self, lab: natlab.Lab, server: natlab.Node) -> None:
        argv = [sys.executable, PROBE, "server"]
        for source in EVERY_SOURCE:
            argv += ["--listen", source]
        proc = lab.popen(server, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        natlab.wait_for_line(proc, lambda line: line.startswith('{"ready"'), 10, "probe server")

    def probe(self, lab: natlab.Lab, host: natlab.Node, *args: str) -> dict:
        result = lab.run(host, [sys.executable, PROBE, *args, "--timeout", "10"], timeout=30)
        if result.returncode != 0:
            self.fail(f"probe {args} in {host.name} failed ({result.returncode}): {result.stderr}")
        return json.loads(result.stdout)


class LifecycleTests(LabCase):
    def test_up_down_leaves_nothing(self):
        """A two-router lab works; down() leaves no namespace and no host link; a second down() is harmless."""
        links_before = root_links()
        lab = self.make_lab()
        server = lab.add_server("server")
        nat1 = lab.add_nat("nat1", "port-restricted")
        nat2 = lab.add_nat("nat2", "symmetric")
        hosts = [lab.add_host("a1", behind=nat1), lab.add_host("a2", behind=nat1),
                 lab.add_host("b1", behind=nat2), lab.add_host("pub")]
        lab.up()
        self.assertEqual(len(lab_namespaces(lab.tag)), 1 + 1 + 2 + 4)
        self.assertEqual([h.address for h in hosts],
                         ["10.99.1.2", "10.99.1.3", "10.99.2.2", "198.51.100.100"])
        self.start_probe_server(lab, server)
        for host in hosts:
            seen = self.probe(lab, host, "mapping", "--server", CONTACTED)["seen"][CONTACTED]
            self.assertEqual(seen.split(":")[0], host.public_address)
        # Nothing of the lab is in the host's own namespace.
        self.assertEqual(root_links(), links_before)
        lab.down()
        self.assertEqual(lab_namespaces(lab.tag), [])
        self.assertEqual(root_links(), links_before)
        lab.down()
        self.assertFalse(lab.is_up)

    def test_context_manager_and_late_add(self):
        """Inside 'with Lab()' a host added late is built at once; leaving the block removes everything."""
        with natlab.Lab(name_prefix=PREFIX) as lab:
            self.addCleanup(lab.down)
            router = lab.add_nat("nat", "full-cone")
            host = lab.add_host("late", behind=router)
            self.assertIn(host.ns, natlab.list_namespaces())
            out = lab.run(host, ["ip", "-4", "-o", "addr", "show", "eth0"], check=True).stdout
            self.assertIn("10.99.1.2/24", out)
        self.assertEqual(lab_namespaces(lab.tag), [])

    def test_no_route_out_of_the_lab(self):
        """Only NATed hosts have a default route (via their router); routers, server, public hosts have none."""
        from pyroute2 import IPRoute

        lab = self.make_lab()
        lab.add_server("server")
        router = lab.add_nat("nat", "symmetric")
        lab.add_host("inside", behind=router)
        lab.add_host("pub")
        lab.up()
        for node in lab.nodes.values():
            with IPRoute(netns=node.ns) as ipr:
                defaults = [r.get_attr("RTA_GATEWAY") for r in ipr.get_routes(family=2)
                            if r["dst_len"] == 0 and r.get_attr("RTA_TABLE") == 254]
            expected = [router.lan_address] if node.name == "inside" else []
            self.assertEqual(defaults, expected, node.name)

    def test_cleanup_stale_removes_only_dead_labs(self):
        """cleanup_stale removes a dead process's namespace, killing what runs in it, and keeps a live lab's."""
        from pyroute2 import netns

        live = self.make_lab()  # up() first: it cleans up stale namespaces itself
        live.add_host("pub")
        live.up()
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = f"{PREFIX}-{dead.pid}-beef-left"
        netns.create(stale)
        self.addCleanup(lambda: stale in natlab.list_namespaces() and netns.remove(stale))
        leftover = subprocess.Popen(["ip", "netns", "exec", stale, "sh", "-c", "echo in; exec cat"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(leftover.stdin.close)
        self.addCleanup(leftover.stdout.close)
        self.addCleanup(lambda: leftover.poll() is None and leftover.kill())
        natlab.wait_for_line(leftover, lambda line: line == "in", 10, "the leftover process")
        removed = natlab.cleanup_stale(PREFIX)
        self.assertEqual(removed, [stale])
        self.assertNotIn(stale, natlab.list_namespaces())
        self.assertEqual(leftover.wait(timeout=10), -15)
        self.assertEqual(len(lab_namespaces(live.tag)), 2)

    def test_flush_conntrack(self):
        """flush_conntrack forgets the host's connections and the learnt full-cone map."""
        lab, server, router, host = self.nat_lab("full-cone")
        self.start_probe_server(lab, server)
        self.probe(lab, host, "filtering", "--server", CONTACTED, "--from", OTHER_IP)

        def state():
            # Only the host's own flows: a late duplicate from the server
            # may still make a new entry after the flush.
            tracked = lab.run(router, ["conntrack", "-L", "--orig-src", host.address],
                              check=True).stdout.splitlines()
            fc = lab.run(router, ["nft", "-j", "list", "map", "ip", natlab.NFT_TABLE, "fc"],
                         check=True).stdout
            maps = [m["map"] for m in json.loads(fc)["nftables"] if "map" in m]
            return len(tracked), sum(len(m.get("elem", [])) for m in maps)

        tracked, mapped = state()
        self.assertGreater(tracked, 0)
        self.assertGreater(mapped, 0)
        lab.flush_conntrack(router)
        self.assertEqual(state(), (0, 0))

    def test_remap(self):
        """
        remap gives the host a new outside port, from the next range, for
        every destination.
        """
        lab, server, router, host = self.nat_lab("port-restricted")
        self.start_probe_server(lab, server)

        def ports():
            result = self.probe(lab, host, "mapping", "--server", CONTACTED,
                                "--server", OTHER_IP)
            return {int(seen.split(":")[1]) for seen in result["seen"].values()}

        before = ports()
        self.assertEqual(len(before), 1, "a port-restricted cone maps independently")
        self.assertEqual(lab.remap(router), natlab.REMAP_PORTS[0])
        after = ports()
        self.assertEqual(len(after), 1)
        low, high = map(int, natlab.REMAP_PORTS[0].split("-"))
        self.assertTrue(low <= after.pop() <= high, "not from the new range")
        self.assertEqual(lab.remap(router), natlab.REMAP_PORTS[1])
        self.assertIn(natlab.REMAP_PORTS[1], lab.ruleset(router))
        lab.restore_ports(router)
        self.assertNotIn(natlab.REMAP_PORTS[1], lab.ruleset(router))


class NatBehaviourTests(LabCase):
    """
    Mapping and filtering of each NAT type, seen by the UDP probes.
    """

    def check_mapping(self, nat_type: str, independent: bool):
        lab, server, router, host = self.nat_lab(nat_type)
        self.start_probe_server(lab, server)
        result = self.probe(lab, host, "mapping", "--server", CONTACTED, "--server", OTHER_IP)
        seen = [result["seen"][CONTACTED], result["seen"][OTHER_IP]]
        self.assertEqual({s.split(":")[0] for s in seen}, {host.public_address})
        ports = [s.split(":")[1] for s in seen]
        if independent:
            self.assertEqual(ports[0], ports[1], result)
        else:
            self.assertNotEqual(ports[0], ports[1], result)
        return result

    def check_filtering(self, nat_type: str):
        lab, server, router, host = self.nat_lab(nat_type)
        self.start_probe_server(lab, server)
        args = ["filtering", "--server", CONTACTED]
        for source in EVERY_SOURCE:
            args += ["--from", source]
        result = self.probe(lab, host, *args)
        self.assertEqual(set(result["received"]), ACCEPTED[nat_type], result)

    def test_mapping_none(self):
        """A public host (NAT type "none") is seen at its own address and local port."""
        result = self.check_mapping("none", independent=True)
        port = result["local"].split(":")[1]
        self.assertEqual(result["seen"][CONTACTED], f"198.51.100.100:{port}")

    def test_mapping_full_cone(self):
        """Full cone: one external address and port towards both server addresses."""
        self.check_mapping("full-cone", independent=True)

    def test_mapping_restricted_cone(self):
        """Restricted cone: one external address and port towards both server addresses."""
        self.check_mapping("restricted-cone", independent=True)

    def test_mapping_port_restricted(self):
        """Port-restricted cone: one external address and port towards both server addresses."""
        self.check_mapping("port-restricted", independent=True)

    def test_mapping_symmetric(self):
        """Symmetric: a different external port towards each server address."""
        self.check_mapping("symmetric", independent=False)

    def test_filtering_none(self):
        """A public host receives from every server address and port."""
        self.check_filtering("none")

    def test_filtering_full_cone(self):
        """Full cone: after contacting one ip:port, never-contacted addresses and ports get in."""
        self.check_filtering("full-cone")

    def test_filtering_restricted_cone(self):
        """Restricted cone: only the contacted IP gets in, from any port."""
        self.check_filtering("restricted-cone")

    def test_filtering_port_restricted(self):
        """Port-restricted cone: only the contacted ip:port gets in."""
        self.check_filtering("port-restricted")

    def test_filtering_symmetric(self):
        """Symmetric: only the contacted ip:port gets in."""
        self.check_filtering("symmetric")

    def test_loss(self):
        """With 50% loss a burst of 200 datagrams loses roughly half; set_loss(0) lets all 200 through."""
        lab, server, router, host = self.nat_lab("port-restricted", loss=50)
        self.start_probe_server(lab, server)
        self.assertEqual(self.probe(lab, host, "burst", "--server", CONTACTED,
                                    "--count", "200", "--run", "lossy"), {"sent": 200})
        lab.set_loss(router, 0)
        lossy = self.probe(lab, host, "count", "--server", CONTACTED, "--run", "lossy")["count"]
        # Binomial(200, 0.5): mean 100, standard deviation about 7.
        self.assertTrue(60 <= lossy <= 140, f"{lossy} of 200 arrived with 50% loss")
        self.probe(lab, host, "burst", "--server", CONTACTED, "--count", "200", "--run", "clean")
        clean = self.probe(lab, host, "count", "--server", CONTACTED, "--run", "clean")["count"]
        self.assertEqual(clean, 200)


class StunCrossCheckTests(LabCase):
    """
    coturn on the server's two addresses and Debian's stun client in the
    host classify each NAT type as the probes do.
    """

    def setUp(self):
        super().setUp()
        require_stun_tools()

    def check_stun(self, nat_type: str):
        lab, server, router, host = self.nat_lab(nat_type)
        lab.start_coturn(server)
        result = lab.run(host, ["stun", SERVER_A, "-v"], timeout=30)
        primary = [line for line in result.stdout.splitlines() if line.startswith("Primary: ")]
        text, bits = STUN_VERDICT[nat_type]
        self.assertEqual(len(primary), 1, result.stdout)
        self.assertTrue(primary[0].startswith(f"Primary: {text}"), primary[0])
        self.assertEqual(result.returncode & 0x0E, bits, primary[0])

    def test_stun_none(self):
        """stun classifies a public host as "Open"."""
        self.check_stun("none")

    def test_stun_full_cone(self):
        """stun classifies the full-cone router as independent mapping, independent filter."""
        self.check_stun("full-cone")

    def test_stun_restricted_cone(self):
        """stun classifies the restricted-cone router as independent mapping, address-dependent filter."""
        self.check_stun("restricted-cone")

    def test_stun_port_restricted(self):
        """stun classifies the port-restricted router as independent mapping, port-dependent filter."""
        self.check_stun("port-restricted")

    def test_stun_symmetric(self):
        """stun classifies the symmetric router as dependent mapping."""
        self.check_stun("symmetric")


class CliTests(LabCase):
    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True,
                              timeout=60)

    def test_up_run_status_down(self):
        """natlab up leaves a detached lab; run reaches its hosts, status lists it, down removes it."""
        prefix = f"omcli{os.getpid()}"
        self.addCleanup(natlab.cleanup_stale, prefix, include_detached=True)
        up = self.cli("up", "--nat", "restricted-cone", "--hosts", "2", "--loss", "5",
                      "--prefix", prefix)
        self.assertEqual(up.returncode, 0, up.stderr)
        self.assertIn("h2", up.stdout)
        [state] = natlab.detached_labs(prefix)
        self.assertEqual(state["nodes"]["nat"]["nat_type"], "restricted-cone")
        self.assertEqual(state["nodes"]["nat"]["loss"], 5)
        # A lab of a dead process, but detached: cleanup_stale keeps it.
        natlab.cleanup_stale(prefix)
        self.assertEqual(len(lab_namespaces(state["tag"])), 5)
        run = self.cli("run", "--prefix", prefix, "h2", "--", "ip", "-4", "-o", "addr", "show",
                       "eth0")
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("10.99.1.3/24", run.stdout)
        status = self.cli("status", "--prefix", prefix)
        self.assertIn(state["tag"], status.stdout)
        down = self.cli("down", "--prefix", prefix)
        self.assertEqual(down.returncode, 0, down.stderr)
        self.assertEqual(lab_namespaces(prefix), [])
        self.assertEqual(natlab.detached_labs(prefix), [])


class ApiTests(SynchronousTestCase):
    """
    Argument checks and rule sets; these touch nothing, so they need no root.
    """

    def test_nat_type_none_has_no_router(self):
        """add_nat rejects "none" (a public host is add_host without behind) and unknown types."""
        lab = natlab.Lab(name_prefix=PREFIX)
        self.assertRaises(ValueError, lab.add_nat, "nat", "none")
        self.assertRaises(ValueError, lab.add_nat, "nat", "cone")
        self.assertEqual(lab.nodes, {})

    def test_names_and_addresses_checked(self):
        """Bad node names, reused names and addresses outside the public net are refused."""
        lab = natlab.Lab(name_prefix=PREFIX)
        lab.add_host("pub")
        self.assertRaises(ValueError, lab.add_host, "pub")
        self.assertRaises(ValueError, lab.add_host, "Bad-Name")
        self.assertRaises(ValueError, lab.add_server, "srv", ["192.0.2.1"])
        self.assertRaises(ValueError, lab.add_nat, "nat", "symmetric", loss=101)
        self.assertRaises(ValueError, natlab.Lab, name_prefix="bad-prefix")

    def test_rulesets(self):
        """Each NAT type's rule set has the rules that make it that type."""
        rules = {t: natlab.nft_ruleset(t, "198.51.100.1") for t in natlab.NAT_TYPES[1:]}
        self.assertIn("masquerade random", rules["symmetric"])
        self.assertNotIn("masquerade random", rules["port-restricted"])
        self.assertNotIn("@fc", rules["port-restricted"])
        self.assertIn("dnat ip to udp dport map @fc", rules["full-cone"])
        self.assertNotIn("@contacted", rules["full-cone"])
        self.assertIn("!= @contacted drop", rules["restricted-cone"])
        self.assertIn("numgen random mod 100 < 7", natlab.nft_ruleset("symmetric", "x", loss=7))
