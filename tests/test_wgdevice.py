"""
Local WireGuard devices (omerta.tunnel.wgdevice, omerta.tunnel.uapi): the
UAPI codec against golden bytes, the socket exchange against a fake
wireguard-go, interface names, secrecy of the private key, and (as root,
with wireguard-go installed) real devices in network namespaces created
here: a ping through a tunnel between two namespaces, a device dying with
its owner, and reap_stale after a crash.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from twisted.trial import unittest

from omerta.crypto.wireguard import WireGuardKey, encode_key
from omerta.testing import natlab
from omerta.tunnel import uapi, wgdevice
from omerta.tunnel.uapi import DeviceStatus, ParseError, PeerConfig, PeerStats, UAPIError
from omerta.tunnel.wgdevice import (
    DeviceError,
    NotPermitted,
    WireGuardDevice,
    WireGuardUnavailable,
    check_name,
    interface_name,
    reap_stale,
)

REPO = Path(__file__).resolve().parent.parent

# RFC 7748 section 6.1 keys, as in test_wireguard.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")


# -- helpers shared with test_tunnel_firewall ---------------------------------

def wait_until(predicate, timeout: float, what: str, describe=None):
    """L{natlab.poll_until} every 0.05 s, failing with an AssertionError."""
    return natlab.poll_until(predicate, timeout, what, describe, 0.05, AssertionError)


def require_root(*programs: tuple[str, str]) -> None:
    """
    Skip (with the reason) unless root and every (program, package) is
    installed.
    """
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root: creates network namespaces and interfaces")
    for program, package in programs:
        if shutil.which(program) is None:
            raise unittest.SkipTest(f"needs {program}: apt install {package}")


class Namespaces:
    """
    Network namespaces made for one test, all deleted (their processes
    killed first) at its cleanup.  Names are unique per process and test.
    """

    def __init__(self, testcase: unittest.TestCase):
        self.tag = f"omt{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.names: list[str] = []
        testcase.addCleanup(self.delete)

    def add(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        self.names.append(name)
        self.ip(name, "link", "set", "lo", "up")
        return name

    @staticmethod
    def ip(ns: str, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"ip -n {ns} {' '.join(args)}: {result.stderr.strip()}")
        return result

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """
        A veth pair made inside C{ns_a}, its other end in C{ns_b}, both up.
        """
        self.ip(ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        self.ip(ns_a, "link", "set", if_a, "up")
        self.ip(ns_b, "link", "set", if_b, "up")

    def address(self, ns: str, ifname: str, *addresses: str) -> None:
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            self.ip(ns, "addr", "add", address, "dev", ifname, *extra)

    @staticmethod
    def run(ns: str, argv, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)

    @staticmethod
    def popen(ns: str, argv, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)

    @staticmethod
    def has_link(ns: str, ifname: str) -> bool:
        return subprocess.run(["ip", "-n", ns, "link", "show", ifname],
                              capture_output=True).returncode == 0

    @staticmethod
    def pids(ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split() if not process_gone(int(pid))]

    def delete(self) -> None:
        """
        SIGTERM what still runs in the namespaces (wireguard-go then removes
        its interface and socket), SIGKILL what is left after a deadline,
        delete the namespaces.
        """
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for ns in self.names:
                for pid in self.pids(ns):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            try:
                wait_until(lambda: not any(self.pids(ns) for ns in self.names), 5,
                           "processes in the test namespaces to end")
                break
            except AssertionError:
                continue
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.names.clear()


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# A node-like owner of WireGuardDevices, run inside a namespace: one JSON
# command per line on stdin, one JSON reply per line on stdout.
OWNER = r"""
import dataclasses, json, sys
from pathlib import Path
from omerta.tunnel.wgdevice import WireGuardDevice, reap_stale

devices = {}

def handle(op, name=None, **kw):
    if op == "up":
        device = WireGuardDevice(name, bytes.fromhex(kw["key"]),
                                 state_dir=Path(kw["state_dir"]))
        device.up(kw["addresses"])
        devices[name] = device
        return {"port": device.listen_port, "pid": device.pid}
    if op == "set_peer":
        devices[name].set_peer(bytes.fromhex(kw["public"]), tuple(kw["endpoint"]),
                               kw["allowed"], kw.get("keepalive"))
        return {}
    if op == "peers":
        return {"peers": {key.hex(): dataclasses.asdict(stats)
                          for key, stats in devices[name].peers().items()}}
    if op == "down":
        devices[name].down()
        devices[name].down()
        return {"running": devices[name].running}
    if op == "reap":
        return {"removed": reap_stale(kw["prefix"], Path(kw["state_dir"]), set(kw["keep"]),
                                      own=set(kw.get("own", ())))}
    raise ValueError(op)

for line in sys.stdin:
    command = json.loads(line)
    try:
        reply = {"ok": True, **handle(**command)}
    except Exception as e:
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
"""


class Owner:
    """
    The OWNER script running in a namespace.
    """

    def __init__(self, testcase: unittest.TestCase, ns: str):
        self.stderr = tempfile.TemporaryFile()
        self.process = Namespaces.popen(
            ns, [sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, env=python_env(), cwd=REPO, text=True)
        testcase.addCleanup(self.stop)

    def call(self, op: str, timeout: float = 20.0, **kw) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.process.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.process.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"owner gave no answer to {op} in {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            self.stderr.seek(0)
            raise AssertionError(f"owner exited during {op}: {self.stderr.read().decode()}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise AssertionError(f"owner {op} failed: {reply['error']}")
        return reply

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.stderr.close()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


def process_gone(pid: int) -> bool:
    """
    Whether C{pid} is gone (or only a zombie).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


# -- the UAPI codec ----------------------------------------------------------------

GOLDEN_SET = (
    b"set=1\n"
    b"private_key=77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a\n"
    b"listen_port=0\n"
    b"replace_peers=true\n"
    b"public_key=de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f\n"
    b"endpoint=127.0.0.1:51820\n"
    b"persistent_keepalive_interval=25\n"
    b"replace_allowed_ips=true\n"
    b"allowed_ip=100.64.0.2/32\n"
    b"allowed_ip=10.1.0.0/16\n"
    b"public_key=8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a\n"
    b"remove=true\n"
    b"\n"
)

# A get reply as wireguard-go writes it: device lines, then per peer.
GOLDEN_GET = (
    b"private_key=77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a\n"
    b"listen_port=41414\n"
    b"public_key=de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f\n"
    b"preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    b"protocol_version=1\n"
    b"endpoint=127.0.0.1:51820\n"
    b"last_handshake_time_sec=1700000000\n"
    b"last_handshake_time_nsec=500000000\n"
    b"tx_bytes=1184\n"
    b"rx_bytes=924\n"
    b"persistent_keepalive_interval=25\n"
    b"allowed_ip=100.64.0.2/32\n"
    b"allowed_ip=10.1.0.0/16\n"
    b"public_key=8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a\n"
    b"preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    b"protocol_version=1\n"
    b"endpoint=[::1]:7\n"
    b"last_handshake_time_sec=0\n"
    b"last_handshake_time_nsec=0\n"
    b"tx_bytes=0\n"
    b"rx_bytes=0\n"
    b"persistent_keepalive_interval=0\n"
    b"errno=0\n"
    b"\n"
)


class EncodeTests(unittest.TestCase):
    def test_golden_set(self):
        """A set request with device settings, one peer configured and one removed is the golden bytes."""
        request = uapi.build_set(
            private_key=ALICE_PRIVATE, listen_port=0, replace_peers=True,
            peers=[PeerConfig(BOB_PUBLIC, endpoint=("127.0.0.1", 51820),
                              persistent_keepalive=25, replace_allowed_ips=True,
                              allowed_ips=("100.64.0.2/32", "10.1.0.0/16")),
                   PeerConfig(ALICE_PUBLIC, remove=True, endpoint=("127.0.0.1", 1))])
        self.assertEqual(request, GOLDEN_SET)

    def test_get(self):
        """A get request is get=1 and the empty line."""
        self.assertEqual(uapi.build_get(), b"get=1\n\n")

    def test_empty_set(self):
        """A set request with nothing to set is set=1 and the empty line."""
        self.assertEqual(uapi.build_set(), b"set=1\n\n")

    def test_ipv6_endpoint(self):
        """IPv6 endpoints are bracketed, and parse back."""
        self.assertEqual(uapi.format_endpoint(("2001:db8::1", 7)), "[2001:db8::1]:7")
        self.assertEqual(uapi.parse_endpoint("[2001:db8::1]:7"), ("2001:db8::1", 7))
        self.assertEqual(uapi.parse_endpoint("192.0.2.1:65535"), ("192.0.2.1", 65535))

    def test_allowed_ip_normalised(self):
        """Host bits in an allowed prefix are cleared, as wireguard-go would."""
        request = uapi.build_set(peers=[PeerConfig(BOB_PUBLIC, allowed_ips=("10.1.2.3/16",))])
        self.assertIn(b"allowed_ip=10.1.0.0/16\n", request)

    def test_rejects(self):
        """Short keys, bad ports, endpoints and prefixes are refused before anything is sent."""
        bad = [
            dict(private_key=b"x" * 31),
            dict(listen_port=65536),
            dict(peers=[PeerConfig(b"short")]),
            dict(peers=[PeerConfig(BOB_PUBLIC, endpoint=("example.com", 1))]),
            dict(peers=[PeerConfig(BOB_PUBLIC, allowed_ips=("10.0.0.0/33",))]),
            dict(peers=[PeerConfig(BOB_PUBLIC, persistent_keepalive=-1)]),
        ]
        for kw in bad:
            self.assertRaises(ValueError, uapi.build_set, **kw)

    def test_bad_private_key_not_quoted(self):
        """The error for a private key of the wrong length does not show it."""
        key = bytes(range(33))
        e = self.assertRaises(ValueError, uapi.build_set, private_key=key)
        self.assertNotIn(key.hex()[:16], str(e))


class ParseTests(unittest.TestCase):
    def test_golden_get(self):
        """The golden get reply gives the port, each peer's stats, and no private key."""
        status = uapi.parse_get(GOLDEN_GET)
        self.assertEqual(status.listen_port, 41414)
        self.assertTrue(status.has_private_key)
        self.assertEqual(status.peers, {
            BOB_PUBLIC: PeerStats(endpoint=("127.0.0.1", 51820),
                                  allowed_ips=("100.64.0.2/32", "10.1.0.0/16"),
                                  last_handshake=1700000000.5, rx_bytes=924, tx_bytes=1184,
                                  persistent_keepalive=25),
            ALICE_PUBLIC: PeerStats(endpoint=("::1", 7), allowed_ips=(), last_handshake=None,
                                    rx_bytes=0, tx_bytes=0),
        })
        self.assertNotIn(ALICE_PRIVATE.hex(), repr(status))
        self.assertNotIn(encode_key(ALICE_PRIVATE), repr(status))

    def test_empty_device(self):
        """A fresh device answers errno alone: no key, port 0, no peers."""
        self.assertEqual(uapi.parse_get(b"errno=0\n\n"),
                         DeviceStatus(listen_port=0, fwmark=0, has_private_key=False))

    def test_errno(self):
        """A refused request carries a negated errno, named in the error."""
        self.assertEqual(uapi.parse_errno(b"errno=0\n\n"), 0)
        self.assertEqual(uapi.parse_errno(b"errno=-22\n\n"), -22)
        e = self.assertRaises(UAPIError, uapi.parse_get, b"errno=-98\n\n")
        self.assertEqual(e.errno, -98)
        self.assertIn("Address already in use", str(e))

    def test_malformed(self):
        """Replies off the protocol raise ParseError, never quoting the line."""
        secret_line = b"private_key" + ALICE_PRIVATE.hex().encode()
        for data in [b"errno=0\n", b"", b"listen_port=1\n\n", secret_line + b"\nerrno=0\n\n",
                     b"errno=x\n\n", b"public_key=zz\nerrno=0\n\n",
                     b"listen_port=-1\nerrno=0\n\n", b"\xff=1\nerrno=0\n\n",
                     b"public_key=" + BOB_PUBLIC.hex().encode() + b"\nendpoint=nope\nerrno=0\n\n"]:
            e = self.assertRaises(ParseError, uapi.parse_get, data)
            self.assertNotIn(ALICE_PRIVATE.hex(), str(e))
        self.assertRaises(ParseError, uapi.parse_errno, b"listen_port=1\nerrno=0\n\n")

    def test_unknown_keys_ignored(self):
        """Keys this client does not know (newer wireguard-go) are skipped."""
        status = uapi.parse_get(b"jc=3\npublic_key=" + BOB_PUBLIC.hex().encode()
                                + b"\nnew_thing=1\nerrno=0\n\n")
        self.assertEqual(list(status.peers), [BOB_PUBLIC])


class FakeUAPI:
    """
    A unix socket answering each connection with C{reply} (in pieces) after
    reading a request, or never answering, or hanging up.
    """

    def __init__(self, testcase, reply: bytes | None, hang_up: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix="omt-uapi-"))
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.path = self.dir / "wgx.sock"
        self.requests: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen()
        self.reply, self.hang_up = reply, hang_up
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()
        testcase.addCleanup(self.server.close)

    def serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\n\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                if self.hang_up:
                    conn.sendall(b"listen_port=1\n")
                    continue
                if self.reply is None:
                    conn.recv(1)  # until the client gives up
                    continue
                for i in range(0, len(self.reply), 7):
                    conn.sendall(self.reply[i:i + 7])


class TransactTests(unittest.TestCase):
    def test_get_status(self):
        """get_status sends get=1 and parses a reply arriving in pieces."""
        fake = FakeUAPI(self, GOLDEN_GET)
        status = uapi.get_status(fake.path, timeout=5)
        self.assertEqual(status.listen_port, 41414)
        self.assertEqual(fake.requests, [b"get=1\n\n"])

    def test_configure(self):
        """configure sends the request as is and accepts errno=0."""
        fake = FakeUAPI(self, b"errno=0\n\n")
        uapi.configure(fake.path, GOLDEN_SET, timeout=5)
        self.assertEqual(fake.requests, [GOLDEN_SET])

    def test_configure_refused(self):
        """A non-zero errno is a UAPIError naming the errno."""
        fake = FakeUAPI(self, b"errno=-22\n\n")
        e = self.assertRaises(UAPIError, uapi.configure, fake.path, GOLDEN_SET, timeout=5)
        self.assertEqual(e.errno, -22)
        self.assertIn("Invalid argument", str(e))
        self.assertNotIn(ALICE_PRIVATE.hex(), str(e))

    def test_timeout(self):
        """No reply within the timeout is UAPITimeout."""
        fake = FakeUAPI(self, None)
        started = time.monotonic()
        self.assertRaises(uapi.UAPITimeout, uapi.get_status, fake.path, timeout=0.3)
        self.assertLess(time.monotonic() - started, 3)

    def test_hang_up(self):
        """A connection closed mid-reply is a UAPIError."""
        fake = FakeUAPI(self, b"", hang_up=True)
        e = self.assertRaises(UAPIError, uapi.get_status, fake.path, timeout=5)
        self.assertIn("closed the connection", str(e))

    def test_no_socket(self):
        """A missing socket says wireguard-go may not be running."""
        e = self.assertRaises(UAPIError, uapi.get_status, "/nonexistent/wgx.sock", timeout=1)
        self.assertIn("is wireguard-go running", str(e))

    def test_not_a_set_request(self):
        """configure refuses anything but a set request."""
        self.assertRaises(ValueError, uapi.configure, "/nonexistent", b"get=1\n\n")


# -- names, keys, availability ------------------------------------------------

class NameTests(unittest.TestCase):
    def test_deterministic(self):
        """The same parts give the same 15-character name; prefix + 12 hex of SHA-256."""
        import hashlib

        name = interface_name("omp", b"provider", b"consumer")
        self.assertEqual(name, interface_name("omp", b"provider", b"consumer"))
        self.assertEqual(len(name), 15)
        digest = hashlib.sha256(b"\0\0\0\x08provider\0\0\0\x08consumer").hexdigest()
        self.assertEqual(name, "omp" + digest[:12])

    def test_parts_are_delimited(self):
        """Moving bytes between parts changes the name."""
        self.assertNotEqual(interface_name("omc", b"ab", b"c"), interface_name("omc", b"a", b"bc"))

    def test_bad_prefix(self):
        """Prefixes that would make a bad or over-long name are refused."""
        for prefix in ["", "omer", "OMP", "-om", "o p", "1om"]:
            self.assertRaises(ValueError, interface_name, prefix, b"x")

    def test_check_name(self):
        """Names are 1-15 of [a-z0-9-], not starting with '-'."""
        for good in ["wg0", "a", "omp0123456789ab", "x-1"]:
            self.assertEqual(check_name(good), good)
        for bad in ["", "Wg0", "omp0123456789abc", "-f", "wg/0", "wg 0", "wg.0", None]:
            self.assertRaises(ValueError, check_name, bad)


class DeviceObjectTests(unittest.TestCase):
    def test_repr_hides_private_key(self):
        """The repr shows the name and public key, never the private key."""
        device = WireGuardDevice("wgx", ALICE_PRIVATE)
        self.assertEqual(device.public_key, ALICE_PUBLIC)
        text = repr(device)
        self.assertIn(encode_key(ALICE_PUBLIC), text)
        for secret in (ALICE_PRIVATE.hex(), encode_key(ALICE_PRIVATE), repr(ALICE_PRIVATE)):
            self.assertNotIn(secret, text)

    def test_validation(self):
        """Bad names, keys and MTUs are refused at construction."""
        self.assertRaises(ValueError, WireGuardDevice, "Bad", ALICE_PRIVATE)
        self.assertRaises(ValueError, WireGuardDevice, "wgx", ALICE_PRIVATE[:31])
        self.assertRaises(ValueError, WireGuardDevice, "wgx", ALICE_PRIVATE, mtu=100)

    def test_not_up(self):
        """Configuring a device that is not up is a DeviceError; down() is a no-op."""
        device = WireGuardDevice("wgx", ALICE_PRIVATE)
        self.assertFalse(device.running)
        e = self.assertRaises(DeviceError, device.set_peer, BOB_PUBLIC, ("127.0.0.1", 1), [])
        self.assertIn("not up", str(e))
        self.assertRaises(DeviceError, device.peers)
        device.down()
        device.down()

    def test_unavailable(self):
        """Without wireguard-go the error names the Debian packages."""
        self.patch(wgdevice.shutil, "which", lambda name: None)
        e = self.assertRaises(WireGuardUnavailable, wgdevice.check_available)
        self.assertIn("apt install wireguard-go wireguard-tools", str(e))

    def test_not_permitted(self):
        """Without CAP_NET_ADMIN the error says tunnels need root."""
        self.patch(wgdevice.shutil, "which", lambda name: "/usr/bin/wireguard-go")
        self.patch(wgdevice, "_has_net_admin", lambda: False)
        e = self.assertRaises(NotPermitted, wgdevice.check_available)
        self.assertIn("tunnels need root (CAP_NET_ADMIN)", str(e))
        self.assertIsInstance(e, WireGuardUnavailable)

    def test_reap_ignores_other_processes(self):
        """reap_stale removes a pidfile naming a process that is not that wireguard-go, and spares the process."""
        state = Path(self.mktemp())
        state.mkdir()
        (state / "omzdecoy.pid").write_text(f"{os.getpid()}\n")
        (state / "omzkept.pid").write_text(f"{os.getpid()}\n")
        (state / "other.pid").write_text(f"{os.getpid()}\n")
        removed = reap_stale("omz", state, keep={"omzkept"}, runtime_dir=state)
        self.assertEqual(removed, ["omzdecoy"])
        self.assertEqual(sorted(p.name for p in state.iterdir()), ["omzkept.pid", "other.pid"])


class FakeProgramTests(unittest.TestCase):
    """
    up() with a stand-in for wireguard-go (needs root for check_available).
    """

    def setUp(self):
        require_root(("ip", "iproute2"))
        self.dir = Path(tempfile.mkdtemp(prefix="omt-fake-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def program(self, body: str) -> str:
        path = self.dir / "fake-wireguard-go"
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return str(path)

    def test_early_exit_quotes_log(self):
        """When wireguard-go exits at once, the error gives its status and log tail, and nothing is left."""
        program = self.program('echo "Failed to create TUN device: no such device" >&2\nexit 1\n')
        device = WireGuardDevice("omzfake0", ALICE_PRIVATE, runtime_dir=self.dir,
                                 state_dir=self.dir / "state", program=program)
        e = self.assertRaises(DeviceError, device.up, ["100.64.0.1/24"])
        self.assertIn("exited with status 1", str(e))
        self.assertIn("Failed to create TUN device", str(e))
        self.assertNotIn(ALICE_PRIVATE.hex(), str(e))
        self.assertFalse(device.running)
        self.assertFalse((self.dir / "state" / "omzfake0.pid").exists())

    def test_no_socket_times_out(self):
        """A wireguard-go that never opens its socket is stopped after the deadline."""
        program = self.program("echo started\nexec sleep 60\n")
        device = WireGuardDevice("omzfake1", ALICE_PRIVATE, runtime_dir=self.dir,
                                 program=program, timeout=0.5)
        e = self.assertRaises(DeviceError, device.up, ["100.64.0.1/24"])
        self.assertIn("no UAPI socket", str(e))
        self.assertIn("started", str(e))
        self.assertFalse(device.running)


# -- real devices in namespaces ------------------------------------------------------

def require_wireguard() -> None:
    require_root(("ip", "iproute2"), ("ping", "iputils-ping"))
    try:
        wgdevice.check_available()
    except WireGuardUnavailable as e:
        raise unittest.SkipTest(str(e))


class TunnelTests(unittest.TestCase):
    """
    Two devices in two namespaces joined only by a veth pair.
    """

    def setUp(self):
        require_wireguard()
        self.ns = Namespaces(self)
        self.state = Path(tempfile.mkdtemp(prefix="omt-state-"))
        self.addCleanup(shutil.rmtree, self.state, True)

    def test_ping_through_tunnel(self):
        """A ping crosses the tunnel, peers() shows the handshake and bytes, down() leaves nothing."""
        a, b = self.ns.add("a"), self.ns.add("b")
        self.ns.veth(a, "ua", b, "ub")
        self.ns.address(a, "ua", "192.0.2.1/24")
        self.ns.address(b, "ub", "192.0.2.2/24")
        key_a, key_b = WireGuardKey.generate(), WireGuardKey.generate()
        name_a = interface_name("ott", os.urandom(8))
        name_b = interface_name("ott", os.urandom(8))
        owner_a, owner_b = Owner(self, a), Owner(self, b)
        up_a = owner_a.call("up", name=name_a, key=key_a.private.hex(),
                            addresses=["100.64.20.1/24"], state_dir=str(self.state / "a"))
        up_b = owner_b.call("up", name=name_b, key=key_b.private.hex(),
                            addresses=["100.64.20.2/24"], state_dir=str(self.state / "b"))
        self.assertTrue(self.ns.has_link(a, name_a))
        self.assertEqual((self.state / "a" / f"{name_a}.pid").read_text().strip(),
                         str(up_a["pid"]))
        owner_a.call("set_peer", name=name_a, public=key_b.public.hex(),
                     endpoint=["192.0.2.2", up_b["port"]], allowed=["100.64.20.2/32"])
        owner_b.call("set_peer", name=name_b, public=key_a.public.hex(),
                     endpoint=["192.0.2.1", up_a["port"]], allowed=["100.64.20.1/32"])

        wait_until(lambda: self.ns.run(a, ["ping", "-c1", "-W1", "100.64.20.2"]).returncode == 0,
                   15, "a ping from a to b through the tunnel")

        stats = owner_a.call("peers", name=name_a)["peers"][key_b.public.hex()]
        self.assertEqual(stats["endpoint"], ["192.0.2.2", up_b["port"]])
        self.assertEqual(stats["allowed_ips"], ["100.64.20.2/32"])
        self.assertIsNotNone(stats["last_handshake"])
        self.assertLess(abs(stats["last_handshake"] - time.time()), 60)
        self.assertGreater(stats["rx_bytes"], 0)
        self.assertGreater(stats["tx_bytes"], 0)

        self.assertEqual(owner_a.call("down", name=name_a), {"running": False})
        self.assertFalse(self.ns.has_link(a, name_a))
        self.assertTrue(process_gone(up_a["pid"]))
        self.assertFalse((wgdevice.RUNTIME_DIR / f"{name_a}.sock").exists())
        self.assertFalse((self.state / "a" / f"{name_a}.pid").exists())
        owner_b.call("down", name=name_b)
        self.assertFalse((wgdevice.RUNTIME_DIR / f"{name_b}.sock").exists())


class CrashTests(unittest.TestCase):
    """
    What is left when a node dies, and reap_stale.
    """

    def setUp(self):
        require_wireguard()
        self.ns = Namespaces(self)
        self.node = self.ns.add("n")
        self.state = Path(tempfile.mkdtemp(prefix="omt-state-"))
        self.addCleanup(shutil.rmtree, self.state, True)
        # "ot" + a letter: never the node's own prefixes, and differs between runs
        self.prefix = "ot" + secrets.choice("abcdefghijklmnopqrstuvwxyz")

    def name(self) -> str:
        return interface_name(self.prefix, os.urandom(8))

    def test_dies_with_owner(self):
        """wireguard-go dies when its owner is SIGKILLed; reap_stale then removes the pidfile."""
        name = self.name()
        owner = Owner(self, self.node)
        pid = owner.call("up", name=name, key=WireGuardKey.generate().private.hex(),
                         addresses=["100.64.30.1/24"], state_dir=str(self.state))["pid"]
        owner.process.kill()
        wait_until(lambda: process_gone(pid), 10, "wireguard-go to die with its owner")
        wait_until(lambda: not self.ns.has_link(self.node, name), 10, "the interface to go")
        self.assertTrue((self.state / f"{name}.pid").exists())

        removed = Owner(self, self.node).call("reap", prefix=self.prefix,
                                              state_dir=str(self.state), keep=[])["removed"]
        self.assertEqual(removed, [name])
        self.assertFalse((self.state / f"{name}.pid").exists())
        self.assertFalse((wgdevice.RUNTIME_DIR / f"{name}.sock").exists())

    def start_orphan(self, name: str, pidfile: bool = True) -> subprocess.Popen:
        """A wireguard-go nobody owns (as after a crash that PDEATHSIG missed)."""
        process = Namespaces.popen(self.node, ["wireguard-go", "-f", name],
                                   env=dict(os.environ, WG_PROCESS_FOREGROUND="1"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(self.stop_orphan, process)
        if pidfile:
            (self.state / f"{name}.pid").write_text(f"{process.pid}\n")
        wait_until(lambda: self.ns.has_link(self.node, name), 10, f"interface {name}")
        return process

    @staticmethod
    def stop_orphan(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.terminate()  # wireguard-go removes its interface and socket
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def test_reap_stale(self):
        """
        reap_stale stops a stale wireguard-go and deletes a stray interface of
        its own name, sparing kept names, another node's interface with the
        same prefix, and other processes.
        """
        stale, stray, kept, foreign = self.name(), self.name(), self.name(), self.name()
        stale_process = self.start_orphan(stale)
        stray_process = self.start_orphan(stray, pidfile=False)
        kept_process = self.start_orphan(kept)
        foreign_process = self.start_orphan(foreign, pidfile=False)
        bystander = subprocess.Popen(["sleep", "60"])
        self.addCleanup(lambda: bystander.poll() is None and bystander.kill())
        decoy = f"{self.prefix}decoy"
        (self.state / f"{decoy}.pid").write_text(f"{bystander.pid}\n")

        removed = Owner(self, self.node).call("reap", prefix=self.prefix,
                                              state_dir=str(self.state), keep=[kept],
                                              own=[stray])["removed"]

        self.assertEqual(removed, sorted([stale, stray, decoy]))
        self.assertIsNotNone(stale_process.wait(10))
        self.assertIsNotNone(stray_process.wait(10))
        for name in (stale, stray):
            self.assertFalse(self.ns.has_link(self.node, name))
            self.assertFalse((wgdevice.RUNTIME_DIR / f"{name}.sock").exists())
        self.assertFalse((self.state / f"{stale}.pid").exists())
        self.assertFalse((self.state / f"{decoy}.pid").exists())
        self.assertIsNone(bystander.poll())
        self.assertIsNone(kept_process.poll())
        self.assertTrue(self.ns.has_link(self.node, kept))
        self.assertIsNone(foreign_process.poll())
        self.assertTrue(self.ns.has_link(self.node, foreign))
        self.assertTrue((self.state / f"{kept}.pid").exists())
