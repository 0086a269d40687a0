"""
Strings from the network reach a terminal or a text log only through
L{omerta.safe_text.printable}: the text forms of the C{omerta} command
(peers, node status, VMs), what the consumer keeps in C{consumer.json}
from a provider's reply, and the messaging log's channel names.  JSON
output stays exact JSON.
"""

from __future__ import annotations

import io
import json
import os
import re
from argparse import Namespace
from types import SimpleNamespace

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from omerta.app.cli import Invocation
from omerta.app.cli_node import format_status as node_status_text
from omerta.app.cli_vm import format_vm
from omerta.app.formats import format_peers, format_vm_list
from omerta.roles.consumer_client import ConsumerClient, Refused, VmRequest
from omerta.safe_text import printable
from omerta.storage import read_json
from omerta.testing.meshsim import MeshSim
from omerta.wire.vm import VmStatus, build_reply, vm_id_bytes

EVIL = "\x1b[2J\n"
RAW = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""A control character or bidi control a terminal would act on."""


def assert_no_raw(testcase, text: str) -> None:
    testcase.assertIsNone(RAW.search(text.replace("\n", "")), repr(text))


class PrintableTests(unittest.TestCase):
    def test_controls_escaped(self):
        """C0, DEL, C1 (NEL, CSI), bidi overrides and line separators become visible escapes."""
        self.assertEqual(printable("a\x1b[2J\r\n\tb\x7f"), "a\\x1b[2J\\x0d\\x0a\\x09b\\x7f")
        self.assertEqual(printable("x\x85\x9by"), "x\\x85\\x9by")
        self.assertEqual(printable("\u202egnp.exe\u2066\u2069\u2028"),
                         "\\u202egnp.exe\\u2066\\u2069\\u2028")

    def test_ordinary_text_unchanged(self):
        """Names in any script, emoji with zero-width joiners and backslashes pass unchanged."""
        for text in ("provider-1", "Ünïcödé 名前", "👩\u200d💻 box", "C:\\vm", ""):
            self.assertEqual(printable(text), text)

    def test_idempotent(self):
        """What printable returns passes through it again unchanged (stored text may be shown)."""
        once = printable(EVIL + "\u202e")
        self.assertEqual(printable(once), once)

    def test_limit(self):
        """A limit cuts the text, never inside an escape, and marks the cut."""
        self.assertEqual(printable("abcdefghij", 6), "abc...")
        self.assertEqual(printable("ab\x1bcdef", 8), "ab...")
        self.assertEqual(printable("short", 6), "short")

    def test_not_a_string(self):
        """Anything else is shown by its str()."""
        self.assertEqual(printable(42), "42")


def vm_document(**changes) -> dict:
    document = {
        "vm_id": "0123456789abcdef", "provider": "ab" * 16, "provider_name": "provider-1",
        "state": "running", "vcpus": 1, "memory_mb": 256, "disk_gb": 1,
        "image": "alpine", "name": "web", "address": "192.168.122.10",
        "tunnel": {"state": "down"},
    }
    document.update(changes)
    return document


class TextOutputTests(unittest.TestCase):
    def test_vm_escaped(self):
        """A provider's VM name, state, image and tunnel state with escapes print escaped by format_vm."""
        text = format_vm(vm_document(name="web" + EVIL, state="running" + EVIL,
                                     image="img\u202e", provider_name="p\x9b1m",
                                     tunnel={"state": "why" + EVIL}))
        assert_no_raw(self, text)
        self.assertEqual(len(text.splitlines()), 4)
        self.assertIn("name web\\x1b[2J\\x0a", text)
        self.assertIn(": running\\x1b[2J\\x0a", text)
        self.assertIn("image img\\u202e", text)
        self.assertIn("from p\\x9b1m", text)

    def test_vm_list_escaped(self):
        """VM records with escapes print escaped, one row each, by format_vm_list."""
        text = format_vm_list({"vms": [vm_document(state="up" + EVIL, address="10.0.0.1\r"),
                                       vm_document(provider_name="evil" + EVIL)]})
        assert_no_raw(self, text)
        self.assertEqual(len(text.splitlines()), 3)
        self.assertIn("up\\x1b[2J\\x0a", text)
        self.assertIn("evil\\x1b[2J\\x0a", text)

    def peer(self, **changes) -> dict:
        peer = {"peer_id": "cd" * 16, "name": "n1", "state": "online", "rtt_ms": 1.5,
                "nat_type": "none", "capabilities": ["provider"],
                "paths": [{"endpoint": "10.0.0.2:7000"}], "last_heard_ago_s": 0.5,
                "endpoint": "10.0.0.2:7000",
                "resources": {"cpu_cores": 1, "memory_mb": 1, "disk_gb": 1, "gpus": 0}}
        peer.update(changes)
        return peer

    def test_peers_table_escaped(self):
        """A peer name with escapes prints escaped in the 'mesh peers' table."""
        text = format_peers([self.peer(name="evil" + EVIL + "\u202e")])
        assert_no_raw(self, text)
        self.assertEqual(len(text.splitlines()), 2)
        self.assertIn("evil\\x1b[2J\\x0a\\u202e", text)

    def test_node_status_escaped(self):
        """A peer name with escapes prints escaped in 'node status'."""
        document = {"peer_id": "ef" * 16, "alive": False, "name": "me",
                    "peers": [self.peer(name="evil" + EVIL)]}
        invocation = SimpleNamespace(data_dir=self.mktemp())
        text = node_status_text(document, invocation)
        assert_no_raw(self, text)
        self.assertIn("evil\\x1b[2J\\x0a", text)

    def test_json_output_exact(self):
        """With --output json the document is exact JSON: the name round-trips and no raw control goes out."""
        document = vm_document(name="web" + EVIL)
        out = io.StringIO()
        Invocation(Namespace(output="json"), out).emit(format_vm(document), document)
        assert_no_raw(self, out.getvalue())
        self.assertEqual(json.loads(out.getvalue())["name"], "web" + EVIL)


# -- consumer.json ------------------------------------------------------------------

VM_ID = "0123456789abcdef"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBm3CT2dQ9t1Wl3Zr8x4nA6l0lq3hX3Yk1c9Z6b7a8c9"


def vm_record(**changes) -> dict:
    record = {
        "vm_id": vm_id_bytes(VM_ID), "name": "web", "state": "running", "vcpus": 1,
        "memory_mb": 256, "disk_gb": 1, "image": "alpine", "created_ms": 1_000,
        "address": "192.168.122.10", "wg_public_key": b"\x01" * 32, "path_kind": "direct",
        "tunnel_address": "10.99.0.2", "provider_tunnel_address": "10.99.0.1",
        "tunnel_prefix": 24, "tunnel_state": "ready", "host_key": HOST_KEY,
    }
    record.update(changes)
    return record


class FakeMesh:
    """What the consumer client asks of a mesh, answering every request with C{reply}."""

    def __init__(self, reply: bytes):
        self.clock = Clock()
        self.reply = reply

    def request(self, peer_id, channel, payload, timeout, network=None):
        return succeed(self.reply)

    def network_id(self, network=None) -> str:
        return "aa" * 16

    def record_outcome(self, peer_id, success, latency, network=None) -> float:
        return 0.5

    def find_peer(self, ref, timeout, network=None):
        return succeed(PROVIDER)

    def connect(self, peer_id, timeout, network=None):
        return succeed(SimpleNamespace(kind="direct"))


PROVIDER = SimpleNamespace(peer_id=b"\xbb" * 16, peer_id_text="bb" * 16,
                           name="prov" + EVIL, state="online")

HOSTILE = vm_record(
    name="web" + EVIL, state="running\r\x1b]0;owned\x07", image="alpine\u202e",
    path_kind="direct\n", address="192.168.122.10\nevil.example ssh-rsa AAAA",
    tunnel_address="10.99.0.2\x1b", provider_tunnel_address="not an address",
    host_key=HOST_KEY + "\nattacker ssh-ed25519 AAAAB3")


class ConsumerStateTests(unittest.TestCase):
    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir)

    def client(self, reply: bytes) -> ConsumerClient:
        return ConsumerClient(FakeMesh(reply), self.data_dir, now=lambda: 1.0)

    def kept(self) -> str:
        with open(f"{self.data_dir}/consumer.json", encoding="utf-8") as f:
            return f.read()

    def assert_clean(self) -> None:
        text = self.kept()
        assert_no_raw(self, json.dumps(read_json(f"{self.data_dir}/consumer.json", dict),
                                       ensure_ascii=False))
        self.assertNotIn("\\u001b", text)
        self.assertNotIn("\\n", text)

    def create(self, reply: bytes):
        spec = VmRequest(ssh_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", ssh_identity="/dev/null")
        return self.successResultOf(self.client(reply).create(PROVIDER, spec, 5))

    def test_granted_strings_kept_clean(self):
        """A grant whose strings carry controls never puts a raw control char into consumer.json."""
        held = self.create(build_reply(VmStatus.OK, vms=[HOSTILE]))
        self.assert_clean()
        self.assertEqual(held.name, "web\\x1b[2J\\x0a")
        self.assertEqual(held.provider_name, "prov\\x1b[2J\\x0a")
        self.assertEqual(held.image, "alpine\\u202e")
        self.assertEqual(held.path_kind, "direct\\x0a")

    def test_addresses_and_host_key_checked(self):
        """Addresses that are not IP addresses and a host key that is not one key line are dropped."""
        held = self.create(build_reply(VmStatus.OK, vms=[HOSTILE]))
        self.assertIsNone(held.address)
        self.assertIsNone(held.tunnel_address)
        self.assertIsNone(held.provider_tunnel_address)
        self.assertIsNone(held.host_key)

    def test_good_values_kept(self):
        """A well-formed grant is kept as the provider sent it."""
        held = self.create(build_reply(VmStatus.OK, vms=[vm_record()]))
        self.assertEqual((held.name, held.state, held.address, held.tunnel_address,
                          held.provider_tunnel_address, held.host_key),
                         ("web", "running", "192.168.122.10", "10.99.0.2", "10.99.0.1",
                          HOST_KEY))

    def test_show_keeps_clean(self):
        """A status reply with controls in state, address and host key updates consumer.json cleanly."""
        held = self.create(build_reply(VmStatus.OK, vms=[vm_record()]))
        client = self.client(build_reply(VmStatus.OK, vms=[HOSTILE]))
        shown, _ = self.successResultOf(client.show(held, 5))
        self.assert_clean()
        self.assertEqual(shown.state, "running\\x0d\\x1b]0;owned\\x07")
        self.assertIsNone(shown.address)
        self.assertEqual(shown.host_key, HOST_KEY)  # the bad one did not replace it

    def test_refusal_detail_escaped(self):
        """A provider's refusal detail is quoted escaped in the error message."""
        client = self.client(build_reply(VmStatus.FAILED, detail="no" + EVIL + "\u202e"))
        spec = VmRequest(ssh_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", ssh_identity="/dev/null")
        error = self.failureResultOf(client.create(PROVIDER, spec, 5), Refused).value
        assert_no_raw(self, str(error))
        self.assertIn("no\\x1b[2J\\x0a\\u202e", str(error))
        self.assertIn("prov\\x1b[2J\\x0a", str(error))
        self.assertEqual(error.detail, "no" + EVIL + "\u202e")


# -- logs ----------------------------------------------------------------------------


class ChannelLogTests(unittest.TestCase):
    def test_channel_name_logged_escaped(self):
        """A member's channel name with ESC and a newline is logged escaped by the node it asks."""
        sim = MeshSim(seed=6)
        self.addCleanup(sim.stop)
        seed = sim.add_node("198.51.100.1", name="seed")
        a = sim.add_node("10.1.0.1", bootstrap=[seed], name="a")
        b = sim.add_node("10.1.0.2", bootstrap=[seed], name="b")
        self.assertTrue(sim.run_until(sim.converged, timeout=60))
        with capturedLogs() as events:
            d = a.overlay.messaging.request(b.peer_id, "x" + EVIL + "y", b"")
            sim.run_until(lambda: d.called, timeout=30)
        self.failureResultOf(d)
        lines = [formatEvent(e) for e in events if "on {channel}" in e.get("log_format", "")]
        self.assertEqual(len(lines), 2, lines)  # a's "to", b's "from"
        for line in lines:
            self.assertNotIn("\x1b", line)
            self.assertNotIn("\n", line)
            self.assertIn("x\\x1b[2J\\x0ay", line)
