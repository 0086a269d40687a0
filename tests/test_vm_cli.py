"""
omerta vm request|list|show|release against real twistd processes on
loopback: a relay, and a provider on libvirt's embedded test driver
(C{test:///default}); the command runs as a separate process each time, so
the consumer's state is read back from its data directory every time.  And
the error messages the command makes of the consumer client's failures.
"""

from __future__ import annotations

import json
import os
import stat

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from types import SimpleNamespace

from omerta.addressing import Endpoint
from omerta.app.cli_vm import error_text
from omerta.mesh.messaging import RequestTimeout
from omerta.mesh.network import NotJoined
from omerta.roles.consumer_client import (BadReply, NoAnswer, NotAProvider, NothingAnswered,
                                          ProviderNotFound, Refused, Unreachable)
from omerta.wire import ParseError
from omerta.wire.vm import VmStatus
from tests.integration import Daemon, free_udp_port, loopback_relay, wait_for
from tests.test_cli_mesh import run_omerta


class ArgumentTests(unittest.TestCase):
    def test_odd_values_refused_before_anything_runs(self):
        """Sizes beyond the wire format and labels over 255 bytes are argument errors."""
        for args, fragment in [
            (["--cpu", "70000"], "from 1 to 65535"),
            (["--cpu", "²"], "from 1 to 65535"),
            (["--memory", "5000000000"], "from 16 to 4294967295"),
            (["--disk", "1099511627776"], "from 0 to 4294967295"),
            (["--image", "x" * 256], "at most 255"),
            (["--name", "é" * 128], "at most 255"),
        ]:
            result = run_omerta("--data-dir", self.mktemp(), "vm", "request", "--peer", "p",
                                *args)
            self.assertEqual(result.returncode, 2, args)
            self.assertIn(fragment, result.stderr, args)
            self.assertNotIn("Traceback", result.stderr, args)


class ErrorTextTests(unittest.TestCase):
    """
    What C{omerta vm} says for each failure of the consumer client: the
    client's message plus what to try.
    """

    def setUp(self):
        self.view = SimpleNamespace(
            timeout=30.0, started=100.0, plan=SimpleNamespace(network=SimpleNamespace(name="lab")),
            no_answer=lambda: "no bootstrap peer answered within 30 s: ...",
            not_found=lambda ref, at, known: f"not found {ref} {at - 100.0:.1f} {known}")
        self.record = SimpleNamespace(name="provider-1", peer_id_text="ab" * 16, peer_id=b"\xab" * 16,
                                      state="online")
        self.label = f"provider-1 ({'ab' * 16})"

    def text(self, error) -> str:
        return error_text(self.view, error)

    def test_texts(self):
        """Each failure reads as before the client existed."""
        self.assertEqual(self.text(NotJoined("x")), "no bootstrap peer answered within 30 s: ...")
        self.assertEqual(self.text(ProviderNotFound("p9", 3, 102.5)), "not found p9 2.5 3")
        self.assertEqual(self.text(NotAProvider(self.record)),
                         f"{self.label} is not a provider (it does not announce the provider"
                         f" capability); 'omerta mesh peers' shows who is")
        self.assertEqual(self.text(NothingAnswered(Endpoint("127.0.0.1", 7401), 5)),
                         "nothing answered at 127.0.0.1:7401 within 30 s: is a provider of"
                         " network lab running there?")
        self.assertEqual(
            self.text(Unreachable(self.record, "no direct address", "offline")),
            f"no path to {self.label} within 30 s: it did not answer at its known address and"
            f" no peer heard from it recently (its state here: offline; tried: no direct"
            f" address); is it running? try a longer --timeout")
        timeout = RequestTimeout(self.record.peer_id, "vm", 5.0)
        self.assertEqual(self.text(NoAnswer(self.record, timeout)),
                         f"{self.label}: {timeout}; try a longer --timeout")
        self.assertEqual(self.text(BadReply(self.record, ParseError("short"))),
                         f"{self.label} answered something that is not a VM reply (short);"
                         f" is it running an older omerta?")
        self.assertEqual(self.text(Refused(self.record, VmStatus.NO_CAPACITY, "full")),
                         f"{self.label} refused: no capacity: full")
        self.assertEqual(self.text(Refused(self.record, 99, "")),
                         f"{self.label} refused: status 99: no detail given")


class VmCommandTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.base = base
        self.relay, self.relay_port, self.network = loopback_relay(self, base, "vms")
        self.provider_port = free_udp_port()
        self.provider = Daemon(self, "omerta-provider", f"{base}/provider",
                               "--name", "provider", "--interface", "127.0.0.1",
                               "--port", str(self.provider_port), "--nat-interval", "0",
                               "--invite", self.network.invite, "--vm-cpus", "2",
                               "--vm-memory", "1024", "--max-vms", "3")
        self.consumer = f"{base}/consumer"
        joined = run_omerta("--data-dir", self.consumer, "network", "join", "--key",
                             self.network.invite)
        self.assertEqual(joined.returncode, 0, joined.stderr)
        return ensureDeferred(self._ready())

    async def _ready(self):
        await wait_for(lambda: self.free() == {"cpu_cores": 2, "memory_mb": 1024}, 30,
                       "the provider to announce its capacity", describe=self.describe)
        await wait_for(lambda: "provider" in self._online(self.relay), 30,
                       "the relay to see the provider", describe=self.describe)

    def _online(self, daemon) -> set:
        return {p["name"] for p in daemon.status().get("peers", []) if p["state"] == "online"}

    def free(self) -> dict:
        resources = self.provider.status().get("resources") or {}
        return {k: resources.get(k) for k in ("cpu_cores", "memory_mb")}

    def describe(self) -> str:
        return f"relay log:\n{self.relay.output()}\nprovider log:\n{self.provider.output()}"

    def vm(self, *args: str):
        return run_omerta("--data-dir", self.consumer, "--output", "json", "vm", *args)

    def request(self, *args: str):
        return self.vm("request", *args, "--bootstrap", f"relay@127.0.0.1:{self.relay_port}",
                       "--timeout", "30")

    def test_request_list_release(self):
        """
        A VM requested by the provider's name over the mesh comes back with
        its id, the provider's WireGuard key and the path; list shows it;
        release --all frees it and the provider's capacity goes back.
        """
        result = self.request("--peer", "provider", "--cpu", "1", "--memory", "512")
        self.assertEqual(result.returncode, 0, result.stderr + self.describe())
        vm = json.loads(result.stdout)
        self.assertEqual((vm["state"], vm["vcpus"], vm["memory_mb"]), ("running", 1, 512))
        self.assertEqual(vm["provider_name"], "provider")
        self.assertEqual(vm["path"]["kind"], "direct")
        self.assertEqual(vm["path"]["endpoint"], f"127.0.0.1:{self.provider_port}")
        self.assertEqual(len(vm["wireguard"]["provider_public_key"]), 44)
        # a short-lived command holds no tunnel: the running node does
        self.assertIn("omerta up", vm["tunnel"]["state"])
        self.assertEqual(vm["provider_tunnel_address"].split(".")[0], "100")
        self.assertIsNone(vm["ssh_address"])  # the test driver runs no guest
        state_file = f"{self.consumer}/consumer.json"
        self.assertEqual(stat.S_IMODE(os.stat(state_file).st_mode), 0o600)

        listed = json.loads(self.vm("list").stdout)["vms"]
        self.assertEqual([v["vm_id"] for v in listed], [vm["vm_id"]])
        self.assertNotIn("wg_private_key", listed[0])
        shown = self.vm("show", vm["vm_id"][:6], "--timeout", "20")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertEqual(json.loads(shown.stdout)["state"], "running")

        async def capacity(expected, what):
            await wait_for(lambda: self.free() == expected, 20, what, describe=self.describe)

        async def rest():
            await capacity({"cpu_cores": 1, "memory_mb": 512}, "the smaller capacity announced")
            released = self.vm("release", "--all", "--timeout", "20")
            self.assertEqual(released.returncode, 0, released.stderr)
            self.assertEqual(json.loads(released.stdout)["released"], [vm["vm_id"]])
            self.assertEqual(json.loads(self.vm("list").stdout)["vms"], [])
            await capacity({"cpu_cores": 2, "memory_mb": 1024}, "the capacity to come back")

        return ensureDeferred(rest())

    def test_legacy_provider_address_and_find(self):
        by_address = self.vm("request", "--provider", f"127.0.0.1:{self.provider_port}",
                             "--timeout", "30")
        self.assertEqual(by_address.returncode, 0, by_address.stderr + self.describe())
        self.assertEqual(json.loads(by_address.stdout)["provider_name"], "provider")
        found = self.request("--find", "--cpu", "1")
        self.assertEqual(found.returncode, 0, found.stderr + self.describe())
        self.assertEqual(json.loads(found.stdout)["provider_name"], "provider")
        state = json.loads(open(f"{self.consumer}/consumer.json").read())
        scores = list(state["providers"].values())
        self.assertEqual([(s["successes"], s["failures"]) for s in scores], [(2, 0)])
        self.assertGreater(scores[0]["reputation"], 0.5)

    def test_refusals_are_clear(self):
        too_big = self.request("--peer", "provider", "--cpu", "3")
        self.assertEqual(too_big.returncode, 2)
        self.assertIn("refused: no capacity", too_big.stderr)
        not_provider = self.request("--peer", "relay")
        self.assertEqual(not_provider.returncode, 2)
        self.assertIn("is not a provider", not_provider.stderr)
        unknown = self.vm("release", "0123456789abcdef")
        self.assertEqual(unknown.returncode, 2)
        self.assertIn("no VM '0123456789abcdef' held here", unknown.stderr)
        no_room = self.request("--find", "--memory", "4096")
        self.assertEqual(no_room.returncode, 2)
        self.assertIn("no online provider announces room", no_room.stderr)
        self.assertEqual(json.loads(self.vm("list").stdout)["vms"], [])
