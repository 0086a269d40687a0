"""
`omerta nat check` inside the NAT lab: hosts behind real nftables NATs of
each type (and one with no NAT) classify their NAT correctly against our relay
serving RFC 5780 STUN on two addresses, on every run.
"""

import json
import os
import subprocess
import sys
import time

from twisted.trial import unittest

from omerta.crypto.identity import load_or_create_identity
from omerta.networks import NetworkStore
from omerta.testing import natlab
from tests.integration import REPO, TWISTD, environment, require_lab

SERVER_IP, ALTERNATE_IP = natlab.DEFAULT_SERVER_ADDRESSES
PORT = 3478

EXPECTED = {
    "none": ("no-nat", "endpoint-independent", "public"),
    "full-cone": ("endpoint-independent", "endpoint-independent", "full_cone"),
    "restricted-cone": ("endpoint-independent", "address-dependent", "restricted_cone"),
    "port-restricted": ("endpoint-independent", "address-and-port-dependent", "port_restricted_cone"),
    "symmetric": ("address-and-port-dependent", "address-and-port-dependent", "symmetric"),
}




class LabFixture:
    def __init__(self, testcase, nat_types):
        require_lab()
        self.lab = natlab.Lab("omnc")
        testcase.addCleanup(self.lab.down)
        self.server = self.lab.add_server("server")
        self.hosts = {}
        for nat_type in nat_types:
            if nat_type == "none":
                self.hosts[nat_type] = self.lab.add_host("pub")
            else:
                router = self.lab.add_nat(nat_type.replace("-", "")[:8], nat_type)
                self.hosts[nat_type] = self.lab.add_host(f"h{len(self.hosts)}", behind=router)
        self.lab.up()
        data_dir = os.path.abspath(testcase.mktemp())
        NetworkStore(data_dir).create(load_or_create_identity(data_dir), "lab", now=time.time())
        self.log = open(f"{data_dir}.log", "w")
        testcase.addCleanup(self.log.close)
        self.relay = self.lab.popen(
            self.server,
            [str(TWISTD), "-n", "--pidfile=", "omerta-relay", "--data-dir", data_dir,
             "--interface", SERVER_IP, "--port", str(PORT),
             "--stun-alternate", f"{ALTERNATE_IP}:{PORT + 1}", "--nat-interval", "0"],
            env=environment(), stdout=self.log, stderr=subprocess.STDOUT,
        )
        testcase.addCleanup(self.stop_relay)

    def stop_relay(self):
        if self.relay.poll() is None:
            self.relay.terminate()
            self.relay.wait(timeout=10)

    def nat_check(self, host, *extra, timeout=120):
        result = self.lab.run(
            host,
            [sys.executable, "-m", "omerta.app.cli", "--output", "json", "nat", "check",
             "--stun", f"{SERVER_IP}:{PORT}", *extra],
            env=environment(), cwd=REPO, timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(f"nat check failed: {result.stderr}")
        return json.loads(result.stdout)

    def wait_serving(self, host, deadline=30.0):
        end = time.monotonic() + deadline
        while True:
            report = self.nat_check(host)
            if report["nat_type"] != "blocked":
                return report
            if time.monotonic() > end or self.relay.poll() is not None:
                raise AssertionError("the relay never answered STUN in the lab")


class NatCheckInLabTests(unittest.TestCase):
    timeout = 600

    def test_every_nat_type_classified(self):
        """Each NAT type is classified right by omerta nat check, on two runs with conntrack flushed between."""
        fixture = LabFixture(self, list(EXPECTED))
        fixture.wait_serving(fixture.hosts["none"])
        for round_ in range(2):
            for nat_type, host in fixture.hosts.items():
                report = fixture.nat_check(host)
                got = (report["mapping"], report["filtering"], report["nat_type"])
                self.assertEqual(got, EXPECTED[nat_type], f"{nat_type}, run {round_ + 1}: {report}")
                self.assertTrue(report["rfc5780"])
                self.assertEqual(report["mapped"].split(":")[0], host.public_address)
                if nat_type != "none":
                    # None of the lab's NATs hairpin (NATLAB.md).
                    self.assertIs(report["hairpin"], False, nat_type)
            for router in fixture.lab.routers:
                fixture.lab.flush_conntrack(router)

    def test_mapping_lifetime(self):
        """The lifetime search brackets the router's conntrack UDP timeout (set to 6 s)."""
        fixture = LabFixture(self, ["port-restricted"])
        host = fixture.hosts["port-restricted"]
        router = host.router
        for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
            fixture.lab.run(router, ["sysctl", "-qw", f"net.netfilter.{key}=6"], check=True)
        fixture.wait_serving(host)
        report = fixture.nat_check(host, "--no-hairpin", "--lifetime", "90")
        lifetime = report["lifetime"]
        self.assertIsNotNone(lifetime["dead"], report)
        self.assertLessEqual(lifetime["alive"], 6.0)
        self.assertGreaterEqual(lifetime["dead"], 5.0)
        self.assertLessEqual(lifetime["dead"] - lifetime["alive"], 1.0)
