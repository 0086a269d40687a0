"""
omerta mesh status|peers|ping|connect: the command joins the mesh as a node
of its own.  The integration tests run a relay and two providers as real
twistd processes on loopback and the command as a separate process.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from omerta.app.cli import CommandError, Invocation, build_parser
from omerta.app.cli_mesh import CLI_DIR, prepare, summarise
from omerta.crypto.identity import load_or_create_identity
from omerta.networks import NetworkStore

from tests.integration import REPO, Daemon, environment, free_udp_port, wait_for

NOW = 1_800_000_000.0

_MAIN = "import sys; from omerta.app.cli import main; sys.exit(main(sys.argv[1:]))"


def run_omerta(*args: str) -> subprocess.CompletedProcess:
    """
    Run C{omerta ARGS} in a separate process through C{omerta.app.cli:main},
    as the console script does.  (C{python -m omerta.app.cli}, which
    L{tests.integration.run_cli} uses, loads cli.py a second time as
    C{__main__}, whose C{CommandError} is not the one command modules raise,
    so an error would end in a traceback instead of exit status 2.)
    """
    return subprocess.run(
        [sys.executable, "-c", _MAIN, *args],
        capture_output=True,
        text=True,
        env=environment(),
        cwd=REPO,
        timeout=60,
    )


def _online_names(daemon) -> set:
    return {p["name"] for p in daemon.status().get("peers", []) if p["state"] == "online"}


def _invocation(data_dir, *args, now=NOW) -> Invocation:
    parsed = build_parser().parse_args(["--data-dir", str(data_dir), "mesh", "peers", *args])
    return Invocation(parsed, io.StringIO(), clock=lambda: now)


class PrepareTests(unittest.TestCase):
    """
    What the command puts in C{<data-dir>/cli} before it starts its node.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.identity = load_or_create_identity(self.dir)

    def create(self, name="lab", endpoint="127.0.0.1:7400", **kwargs):
        return NetworkStore(self.dir).create(self.identity, name, endpoint, now=NOW, **kwargs)

    def test_own_identity_and_copied_network(self):
        """The cli node gets its own identity in <data-dir>/cli and a copy of the network."""
        network = self.create()
        plan = prepare(_invocation(self.dir))
        self.assertEqual(str(plan.cli_dir), os.path.join(self.dir, CLI_DIR))
        self.assertNotEqual(plan.identity.peer_id_text, self.identity.peer_id_text)
        self.assertEqual(load_or_create_identity(plan.cli_dir).peer_id_text,
                         plan.identity.peer_id_text)
        [copied] = NetworkStore(plan.cli_dir).list()
        self.assertEqual((copied.network_id, copied.name), (network.network_id, "lab"))
        self.assertEqual(plan.bootstrap, network.bootstrap)

    def test_network_by_name_and_only_that_one(self):
        """--network picks a membership by name; the cli store keeps that network alone."""
        self.create("lab")
        other = self.create("prod", "127.0.0.1:7500")
        prepare(_invocation(self.dir))
        plan = prepare(_invocation(self.dir, "--network", "prod"))
        self.assertEqual([m.network_id for m in NetworkStore(plan.cli_dir).list()],
                         [other.network_id])
        self.assertEqual([str(s.endpoint) for s in plan.bootstrap], ["127.0.0.1:7500"])

    def test_extra_bootstrap_first(self):
        """--bootstrap peers come before the network's own."""
        self.create()
        plan = prepare(_invocation(self.dir, "--bootstrap", "relay-2@127.0.0.1:7600"))
        self.assertEqual([str(s) for s in plan.bootstrap][0], "relay-2@127.0.0.1:7600")
        self.assertEqual(len(plan.bootstrap), 2)

    def test_expired_invite_copied_by_key(self):
        """A membership whose invite expired is copied by its key, its bootstrap list kept."""
        network = self.create(expires_at=NOW + 60)
        plan = prepare(_invocation(self.dir, now=NOW + 3600))
        [copied] = NetworkStore(plan.cli_dir).list()
        self.assertEqual(copied.network_id, network.network_id)
        self.assertIsNone(copied.invite)
        self.assertEqual(plan.bootstrap, network.bootstrap)

    def test_no_bootstrap(self):
        """A network with no bootstrap peer and no --bootstrap is refused, naming the option."""
        self.create(endpoint=None)
        error = self.assertRaises(CommandError, prepare, _invocation(self.dir))
        self.assertIn("--bootstrap", str(error))

    def test_no_network(self):
        """A data dir in no network is refused, pointing at --invite, before creating anything."""
        empty = os.path.abspath(self.mktemp())
        error = self.assertRaises(CommandError, prepare, _invocation(empty))
        self.assertIn("--invite", str(error))
        self.assertFalse(os.path.exists(os.path.join(empty, CLI_DIR)))

    def test_summary(self):
        """The ping summary gives counts, loss and min/avg/max, or None without replies."""
        self.assertEqual(summarise(4, [1.0, 2.0, 4.5]), {
            "sent": 4, "received": 3, "loss_pct": 25.0,
            "rtt_min_ms": 1.0, "rtt_avg_ms": 2.5, "rtt_max_ms": 4.5,
        })
        self.assertIsNone(summarise(2, [])["rtt_avg_ms"])


class NoRelayTests(unittest.TestCase):
    def test_no_bootstrap_answer(self):
        """With nothing at the bootstrap address the command fails after --timeout, saying so."""
        base = os.path.abspath(self.mktemp())
        port = free_udp_port()
        identity = load_or_create_identity(f"{base}/creator")
        network = NetworkStore(f"{base}/creator").create(
            identity, "it", f"127.0.0.1:{port}", now=time.time()
        )
        started = time.monotonic()
        result = run_omerta("--data-dir", f"{base}/cli-user", "--output", "json", "mesh", "peers",
                            "--invite", network.invite, "--timeout", "3")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertIn("no bootstrap peer answered within 3 s", result.stderr)
        self.assertIn(f"127.0.0.1:{port}", result.stderr)
        self.assertGreaterEqual(time.monotonic() - started, 3)


class MeshOfThreeTests(unittest.TestCase):
    """
    A relay and two providers, each seeing the other two online.
    """

    timeout = 120

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.base = base
        relay_dir = f"{base}/relay"
        port = free_udp_port()
        identity = load_or_create_identity(relay_dir)
        self.network = NetworkStore(relay_dir).create(
            identity, "it", f"127.0.0.1:{port}", now=time.time()
        )
        self.relay = Daemon(
            self, "omerta-relay", relay_dir,
            "--name", "relay", "--interface", "127.0.0.1", "--port", str(port),
            "--nat-interval", "0",
        )
        self.providers = [
            Daemon(
                self, "omerta-provider", f"{base}/provider-{i}",
                "--name", f"provider-{i}", "--interface", "127.0.0.1", "--port", "0",
                "--nat-interval", "0", "--invite", self.network.invite,
            )
            for i in (1, 2)
        ]
        self.daemons = {"relay": self.relay, "provider-1": self.providers[0],
                        "provider-2": self.providers[1]}
        return ensureDeferred(self.wait_for_mesh())

    async def wait_for_mesh(self):
        for name, daemon in self.daemons.items():
            others = set(self.daemons) - {name}
            await wait_for(lambda: others <= _online_names(daemon), 30,
                           f"{name} to see {sorted(others)} online", describe=self.describe)

    def describe(self) -> str:
        return "\n".join(f"{name} log:\n{d.output()}" for name, d in self.daemons.items())

    def mesh(self, *args: str) -> subprocess.CompletedProcess:
        return run_omerta("--data-dir", f"{self.base}/user", "--output", "json", "mesh", *args,
                          "--invite", self.network.invite, "--timeout", "20")

    def ids(self) -> dict:
        return {name: d.status()["peer_id"] for name, d in self.daemons.items()}

    def relay_endpoint(self) -> str:
        return str(self.network.bootstrap[0].endpoint)

    def test_peers(self):
        """peers lists the relay and both providers with their ids, names and capabilities."""
        result = self.mesh("peers")
        self.assertEqual(result.returncode, 0, result.stderr)
        peers = {p["name"]: p for p in json.loads(result.stdout)}
        self.assertEqual(set(peers), {"relay", "provider-1", "provider-2"})
        self.assertEqual({name: p["peer_id"] for name, p in peers.items()}, self.ids())
        self.assertEqual(peers["relay"]["capabilities"], ["relay", "stun", "coordinator"])
        self.assertEqual(peers["provider-1"]["capabilities"], ["provider"])
        self.assertEqual(peers["provider-2"]["capabilities"], ["provider"])
        self.assertEqual(peers["relay"]["state"], "online")
        cli_id = load_or_create_identity(f"{self.base}/user/{CLI_DIR}").peer_id_text
        self.assertNotIn(cli_id, self.ids().values())

    def test_ping(self):
        """ping sends --count pings and gets as many direct replies with a round trip."""
        result = self.mesh("ping", "provider-1", "--count", "3", "--interval", "0.2")
        self.assertEqual(result.returncode, 0, result.stderr)
        document = json.loads(result.stdout)
        self.assertEqual(document["peer_id"], self.ids()["provider-1"])
        replies = document["replies"]
        self.assertEqual([r["seq"] for r in replies], [1, 2, 3])
        listen = self.providers[0].status()["listen"]
        for reply in replies:
            self.assertEqual(reply["kind"], "direct")
            self.assertGreater(reply["rtt_ms"], 0)
            self.assertEqual(reply["endpoint"], listen)
            self.assertGreater(reply["local_port"], 0)
        summary = document["summary"]
        self.assertEqual((summary["sent"], summary["received"], summary["loss_pct"]), (3, 3, 0))

    def test_connect(self):
        """connect gives the direct path to the peer's listen address."""
        result = self.mesh("connect", "provider-2")
        self.assertEqual(result.returncode, 0, result.stderr)
        connection = json.loads(result.stdout)
        self.assertEqual(connection["peer_id"], self.ids()["provider-2"])
        self.assertEqual(connection["endpoint"], self.providers[1].status()["listen"])
        self.assertEqual(connection["kind"], "direct")
        self.assertIsNotNone(connection["rtt_ms"])

    def test_unknown_peer(self):
        """An unknown peer name exits 2 with a message naming it."""
        result = self.mesh("ping", "provider-9")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("'provider-9'", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_status_on_daemon_data_dir(self):
        """On a daemon's own data dir, status joins its network as another peer and reaches it."""
        relay_dir = str(self.relay.data_dir)
        result = run_omerta("--data-dir", relay_dir, "mesh", "status", "--timeout", "20")
        self.assertEqual(result.returncode, 0, result.stderr)
        cli_id = load_or_create_identity(f"{relay_dir}/{CLI_DIR}").peer_id_text
        self.assertNotEqual(cli_id, self.ids()["relay"])
        self.assertIn(f"cli node   {cli_id}", result.stdout)
        self.assertIn(f"network    {self.network.network_id} (it)", result.stdout)
        self.assertIn(f"{self.ids()['relay']}@{self.relay_endpoint()}: answered", result.stdout)
        self.assertRegex(result.stdout, r"peers +[34] known")

    def test_restart_from_saved_peers(self):
        """A restarted provider keeps its peer id and is back online with the relay and provider-2."""
        provider = self.providers[0]
        ids = self.ids()

        async def check():
            self.assertEqual(provider.stop(), -signal.SIGTERM)
            peers_file = provider.data_dir / f"peers-{self.network.network_id}.json"
            self.assertTrue(peers_file.exists())
            saved = {p["peer_id"] for p in json.loads(peers_file.read_text())["peers"]}
            self.assertLessEqual({ids["relay"], ids["provider-2"]}, saved)
            provider.start()
            await wait_for(
                lambda: provider.status().get("pid") == provider.process.pid
                and {"relay", "provider-2"} <= _online_names(provider),
                30, "the restarted provider to see the relay and provider-2",
                describe=self.describe,
            )
            self.assertEqual(provider.status()["peer_id"], ids["provider-1"])
            listen = provider.status()["listen"]
            for name in ("relay", "provider-2"):
                await wait_for(
                    lambda: any(p["peer_id"] == ids["provider-1"] and p["endpoint"] == listen
                                and p["state"] == "online"
                                for p in self.daemons[name].status().get("peers", [])),
                    30, f"{name} to hear from the restarted provider", describe=self.describe,
                )

        return ensureDeferred(check())
