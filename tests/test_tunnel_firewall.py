"""
The provider's tunnel firewall (omerta.tunnel.firewall): the generated
nftables scripts, reading the allowed pairs back, per-interface forwarding,
and (as root, with nft) the isolation itself in namespaces created here: a
provider with a stand-in tunnel interface to a consumer namespace (two
consumer addresses) and a second interface to a VM namespace (two VM
addresses).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from twisted.trial import unittest

from omerta.tunnel import firewall
from omerta.tunnel.firewall import (
    FirewallError,
    FirewallUnavailable,
    TunnelFirewall,
    enable_forwarding,
    parse_pairs,
    ruleset,
)
from tests.test_wgdevice import REPO, Namespaces, python_env, require_root

EXPECTED_RULESET = """\
table inet omerta_p1 {}
delete table inet omerta_p1
table inet omerta_p1 {
\tset pairs {
\t\ttype ipv4_addr . ipv4_addr
\t\telements = { 100.64.0.2 . 100.64.1.2, 100.64.0.3 . 100.64.1.3 }
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "wgp0" jump tunnel_to_host
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "wgp0" jump from_tunnel
\t\toifname "wgp0" jump to_tunnel
\t}
\tchain tunnel_to_host {
\t\tmeta nfproto ipv6 drop
\t\tip daddr 100.64.0.1 ct state established,related accept
\t\tip daddr 100.64.0.1 icmp type echo-request accept
\t\tdrop
\t}
\tchain from_tunnel {
\t\tmeta nfproto ipv6 drop
\t\tip saddr . ip daddr @pairs accept
\t\tdrop
\t}
\tchain to_tunnel {
\t\tmeta nfproto ipv6 drop
\t\tct state established,related accept
\t\tdrop
\t}
}
"""


class ScriptTests(unittest.TestCase):
    def test_ruleset(self):
        """The table script creates-deletes-declares the whole table, pairs sorted into the set."""
        script = ruleset("omerta_p1", "wgp0", "100.64.0.1",
                         {("100.64.0.3", "100.64.1.3"), ("100.64.0.2", "100.64.1.2")})
        self.assertEqual(script, EXPECTED_RULESET)

    def test_ruleset_without_pairs(self):
        """An empty set has no elements line (nft rejects an empty one)."""
        script = ruleset("omerta_p1", "wgp0", "100.64.0.1")
        self.assertNotIn("elements", script)
        self.assertIn("\t\ttype ipv4_addr . ipv4_addr\n\t}\n", script)

    def test_element_scripts(self):
        """allow adds, revoke adds then deletes (idempotent), sync flushes then adds, remove creates then deletes."""
        self.assertEqual(firewall.allow_script("t", "100.64.0.2", "100.64.1.2"),
                         "add element inet t pairs { 100.64.0.2 . 100.64.1.2 }\n")
        self.assertEqual(firewall.revoke_script("t", "100.64.0.2", "100.64.1.2"),
                         "add element inet t pairs { 100.64.0.2 . 100.64.1.2 }\n"
                         "delete element inet t pairs { 100.64.0.2 . 100.64.1.2 }\n")
        self.assertEqual(firewall.sync_script("t", {("100.64.0.2", "100.64.1.2")}),
                         "flush set inet t pairs\n"
                         "add element inet t pairs { 100.64.0.2 . 100.64.1.2 }\n")
        self.assertEqual(firewall.sync_script("t", set()), "flush set inet t pairs\n")
        self.assertEqual(firewall.remove_script("t"), "table inet t {}\ndelete table inet t\n")

    def test_injection_refused(self):
        """Table names, interfaces and addresses that could smuggle nft syntax are refused."""
        self.assertRaises(ValueError, TunnelFirewall, "t; flush ruleset", "wgp0", "100.64.0.1")
        self.assertRaises(ValueError, TunnelFirewall, "t", 'wg"0', "100.64.0.1")
        self.assertRaises(ValueError, TunnelFirewall, "t", "wgp0", "100.64.0.1 }")
        self.assertRaises(ValueError, TunnelFirewall, "t", "wgp0", "2001:db8::1")
        self.assertRaises(ValueError, firewall.allow_script, "t", "100.64.0.2", "10.0.0.0/8")
        self.assertRaises(ValueError, firewall.sync_script, "t", {("x", "100.64.1.2")})

    def test_parse_pairs(self):
        """Pairs are read from nft -j output, plain or with element details."""
        output = json.dumps({"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"set": {"family": "inet", "name": "pairs", "table": "t",
                     "type": ["ipv4_addr", "ipv4_addr"], "handle": 1,
                     "elem": [{"concat": ["100.64.0.2", "100.64.1.2"]},
                              {"elem": {"val": {"concat": ["100.64.0.3", "100.64.1.3"]},
                                        "comment": "x"}}]}}]})
        self.assertEqual(parse_pairs(output), {("100.64.0.2", "100.64.1.2"),
                                               ("100.64.0.3", "100.64.1.3")})
        empty = json.dumps({"nftables": [{"set": {"name": "pairs", "type": ["ipv4_addr"]}}]})
        self.assertEqual(parse_pairs(empty), set())
        self.assertRaises(ValueError, parse_pairs, "not json")
        self.assertRaises(ValueError, parse_pairs, json.dumps({"nftables": [
            {"set": {"elem": ["100.64.0.2"]}}]}))

    def test_nft_missing(self):
        """A missing nft is FirewallUnavailable naming the Debian package."""
        e = self.assertRaises(FirewallUnavailable, firewall.check_nftables,
                              ("/nonexistent/nft",))
        self.assertIn("apt install nftables", str(e))
        fw = TunnelFirewall("t", "wgp0", "100.64.0.1", command=("/nonexistent/nft",))
        e = self.assertRaises(FirewallUnavailable, fw.install)
        self.assertIn("apt install nftables", str(e))

    def test_nft_failure_is_actionable(self):
        """nft's complaint is in the error, with a hint when the table is missing."""
        fake = Path(self.mktemp())
        fake.write_text("#!/bin/sh\necho 'Error: No such file or directory' >&2\nexit 1\n")
        fake.chmod(0o755)
        fw = TunnelFirewall("t", "wgp0", "100.64.0.1", command=(str(fake),))
        e = self.assertRaises(FirewallError, fw.allow, "100.64.0.2", "100.64.1.2")
        self.assertIn("No such file or directory", str(e))
        self.assertIn("install() first", str(e))


class ForwardingTests(unittest.TestCase):
    def test_writes_per_interface(self):
        """enable_forwarding writes 1 to net/ipv4/conf/IF/forwarding only."""
        root = Path(self.mktemp())
        conf = root / "net" / "ipv4" / "conf" / "wgp0"
        conf.mkdir(parents=True)
        (conf / "forwarding").write_text("0\n")
        enable_forwarding("wgp0", proc_sys=root)
        self.assertEqual((conf / "forwarding").read_text(), "1\n")
        self.assertEqual(sorted(p.name for p in (root / "net" / "ipv4").iterdir()), ["conf"])

    def test_no_interface(self):
        """A missing interface is a FirewallError naming it."""
        e = self.assertRaises(FirewallError, enable_forwarding, "nosuch0",
                              proc_sys=Path(self.mktemp()))
        self.assertIn("nosuch0", str(e))
        self.assertIn("no such interface", str(e))

    def test_bad_name(self):
        """Names that are paths are refused."""
        for name in ["..", "a/b", "all/../x"]:
            self.assertRaises(ValueError, enable_forwarding, name)


# A probe run in a namespace: each probe is [kind, source, destination]
# (kind "ping" or "udp"); all run at once; prints a JSON list of booleans.
PROBE = r"""
import json, socket, subprocess, sys
from concurrent.futures import ThreadPoolExecutor

PORT = int(sys.argv[1])

def probe(kind, src, dst):
    if kind == "ping":
        argv = ["ping", "-c1", "-W1", "-I", src, dst] if src else ["ping", "-c1", "-W1", dst]
        return subprocess.run(argv, capture_output=True).returncode == 0
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.connect((dst, PORT))  # only an answer from dst counts
        s.settimeout(1.0)
        s.send(b"probe")
        try:
            return s.recv(100) == b"probe"
        except OSError:
            return False

probes = json.loads(sys.argv[2])
with ThreadPoolExecutor(len(probes)) as pool:
    print(json.dumps(list(pool.map(lambda p: probe(*p), probes))))
"""

# A UDP echo server with one socket per address, so each answer comes from
# the address that was asked (a wildcard socket would answer from another).
ECHO = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for address in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, int(sys.argv[1])))
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        data, peer = key.fileobj.recvfrom(2048)
        key.fileobj.sendto(data, peer)
"""

PORT = 7007
PROVIDER, PROVIDER_VM_SIDE = "100.64.0.1", "100.64.1.1"
C1, C2 = "100.64.0.2", "100.64.0.3"
VM1, VM2 = "100.64.1.2", "100.64.1.3"
PROVIDER6, CONSUMER6 = "2001:db8::1", "2001:db8::2"


class IsolationTests(unittest.TestCase):
    """
    provider (wgp0 100.64.0.1 | vmbr0 100.64.1.1) between consumer (c1, c2)
    and vm (vm1, vm2), forwarding on per interface.
    """

    def setUp(self):
        require_root(("ip", "iproute2"), ("nft", "nftables"), ("ping", "iputils-ping"))
        ns = self.ns = Namespaces(self)
        self.provider, self.consumer, self.vm = ns.add("p"), ns.add("c"), ns.add("v")
        ns.veth(self.provider, "wgp0", self.consumer, "eth0")
        ns.veth(self.provider, "vmbr0", self.vm, "eth0")
        ns.address(self.provider, "wgp0", f"{PROVIDER}/24", f"{PROVIDER6}/64")
        ns.address(self.provider, "vmbr0", f"{PROVIDER_VM_SIDE}/24")
        ns.address(self.consumer, "eth0", f"{C1}/24", f"{C2}/24", f"{CONSUMER6}/64")
        ns.address(self.vm, "eth0", f"{VM1}/24", f"{VM2}/24")
        ns.ip(self.consumer, "route", "add", "100.64.1.0/24", "via", PROVIDER)
        ns.ip(self.vm, "route", "add", "100.64.0.0/24", "via", PROVIDER_VM_SIDE)
        self.python(self.provider, "from omerta.tunnel.firewall import enable_forwarding as f;"
                    "f('wgp0'); f('vmbr0')")
        self.start_echo(self.vm, VM1, VM2)
        self.start_echo(self.provider, PROVIDER, PROVIDER_VM_SIDE)
        self.start_echo(self.consumer, C1, C2)
        self.fw = TunnelFirewall("omerta_test", "wgp0", PROVIDER,
                                 command=("ip", "netns", "exec", self.provider, "nft"))
        self.addCleanup(self.fw.remove)

    def python(self, ns: str, code: str, *args: str) -> str:
        result = Namespaces.run(ns, [sys.executable, "-c", code, *args], env=python_env(),
                                cwd=REPO, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"python in {ns} failed: {result.stderr}")
        return result.stdout

    def start_echo(self, ns: str, *addresses: str) -> None:
        process = Namespaces.popen(ns, [sys.executable, "-c", ECHO, str(PORT), *addresses],
                                   stdout=-1, text=True)
        self.addCleanup(lambda: (process.kill(), process.wait(), process.stdout.close()))
        self.assertEqual(process.stdout.readline().strip(), "ready")

    def reach(self, ns: str, probes: dict[str, tuple[str, str, str]]) -> dict[str, bool]:
        names = list(probes)
        results = json.loads(self.python(ns, PROBE, str(PORT),
                                         json.dumps([probes[n] for n in names])))
        return dict(zip(names, results))

    def check(self, ns: str, expected: dict[str, tuple[tuple[str, str, str], bool]]) -> None:
        """Run every probe at once; all must give the expected answer."""
        got = self.reach(ns, {name: probe for name, (probe, _) in expected.items()})
        wrong = {name: got[name] for name, (_, want) in expected.items() if got[name] != want}
        self.assertEqual(wrong, {}, f"probes from {ns} that went the wrong way: {got}")

    def table_exists(self) -> bool:
        tables = Namespaces.run(self.provider, ["nft", "list", "tables"]).stdout
        return "omerta_test" in tables

    def test_isolation(self):
        """After allow(c1, vm1) only c1 reaches vm1 (and pings the provider); revoke, sync and remove work."""
        consumer_probes = {
            "c1 ping vm1": (("ping", C1, VM1), True),
            "c1 udp vm1": (("udp", C1, VM1), True),
            "c1 ping vm2": (("ping", C1, VM2), False),
            "c1 udp vm2": (("udp", C1, VM2), False),
            "c1 ping provider vm side": (("ping", C1, PROVIDER_VM_SIDE), False),
            "c1 udp provider vm side": (("udp", C1, PROVIDER_VM_SIDE), False),
            "c1 udp provider": (("udp", C1, PROVIDER), False),
            "c1 ping provider": (("ping", C1, PROVIDER), True),
            "c2 ping vm1": (("ping", C2, VM1), False),
            "c2 udp vm1": (("udp", C2, VM1), False),
            "c2 ping vm2": (("ping", C2, VM2), False),
            "c2 udp vm2": (("udp", C2, VM2), False),
            "c2 udp provider vm side": (("udp", C2, PROVIDER_VM_SIDE), False),
            "c2 udp provider": (("udp", C2, PROVIDER), False),
            "ipv6 ping provider": (("ping", CONSUMER6, PROVIDER6), False),
        }
        # Without the firewall everything gets through: the topology routes.
        self.check(self.consumer, {n: (p, True) for n, (p, _) in consumer_probes.items()})
        self.check(self.vm, {"vm1 ping c1": (("ping", VM1, C1), True),
                             "vm1 udp c1": (("udp", VM1, C1), True)})
        self.assertEqual(
            Namespaces.run(self.provider, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout, "0\n")

        self.fw.install()
        self.fw.install()  # idempotent
        self.assertEqual(self.fw.pairs(), set())
        self.fw.allow(C1, VM1)
        self.assertEqual(self.fw.pairs(), {(C1, VM1)})
        self.check(self.consumer, consumer_probes)
        # a VM answers but cannot open anything towards the tunnel
        self.check(self.vm, {"vm1 ping c1": (("ping", VM1, C1), False),
                             "vm1 udp c1": (("udp", VM1, C1), False)})

        self.fw.revoke(C1, VM1)
        self.fw.revoke(C1, VM1)  # idempotent
        self.assertEqual(self.fw.pairs(), set())
        self.check(self.consumer, {"c1 ping vm1": (("ping", C1, VM1), False),
                                   "c1 udp vm1": (("udp", C1, VM1), False),
                                   "c1 ping provider": (("ping", C1, PROVIDER), True)})

        self.fw.sync({(C2, VM2), (C1, VM2)})
        self.fw.sync({(C2, VM2)})
        self.assertEqual(self.fw.pairs(), {(C2, VM2)})
        self.check(self.consumer, {"c2 udp vm2": (("udp", C2, VM2), True),
                                   "c1 udp vm2": (("udp", C1, VM2), False),
                                   "c2 udp vm1": (("udp", C2, VM1), False)})

        self.fw.remove()
        self.assertFalse(self.table_exists())
        self.fw.remove()  # idempotent
        self.check(self.consumer, {"c2 udp vm1": (("udp", C2, VM1), True)})

    def test_check_nftables(self):
        """check_nftables passes as root with nft installed."""
        firewall.check_nftables(("ip", "netns", "exec", self.provider, "nft"))

    def test_enable_forwarding_in_namespace(self):
        """Forwarding is on for the two interfaces only, and a missing one is a clear error."""
        conf = "/proc/sys/net/ipv4/conf"
        out = Namespaces.run(self.provider, ["cat", f"{conf}/wgp0/forwarding",
                                             f"{conf}/vmbr0/forwarding", f"{conf}/lo/forwarding",
                                             f"{conf}/all/forwarding"]).stdout
        self.assertEqual(out.split(), ["1", "1", "0", "0"])
        result = Namespaces.run(self.provider, [
            sys.executable, "-c",
            "from omerta.tunnel.firewall import enable_forwarding; enable_forwarding('nosuch0')"],
            env=python_env(), cwd=REPO)
        self.assertIn("FirewallError: cannot enable forwarding on nosuch0: no such interface",
                      result.stderr)
