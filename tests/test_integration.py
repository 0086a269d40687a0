"""
Real twistd processes on loopback: a relay and a provider find each other
with sealed, signed frames, and a restarted node keeps its identity.
"""

import json
import os
import signal
import time

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from omerta.crypto.identity import load_or_create_identity
from omerta.networks import NetworkStore
import subprocess

from tests.integration import TWISTD, Daemon, environment, free_udp_port, run_cli, wait_for


def _peer_names(daemon):
    return {p["name"] for p in daemon.status().get("peers", []) if p["state"] == "online"}


class TwoDaemonsTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.relay_dir = f"{base}/relay"
        self.provider_dir = f"{base}/provider"
        self.port = free_udp_port()
        identity = load_or_create_identity(self.relay_dir)
        self.network = NetworkStore(self.relay_dir).create(
            identity, "it", f"127.0.0.1:{self.port}", now=time.time()
        )

    def start(self):
        self.relay = Daemon(
            self, "omerta-relay", self.relay_dir,
            "--name", "relay", "--interface", "127.0.0.1", "--port", str(self.port),
        )
        self.provider = Daemon(
            self, "omerta-provider", self.provider_dir,
            "--name", "provider-1", "--interface", "127.0.0.1", "--port", "0",
            "--invite", self.network.invite,
        )

    def describe(self):
        return f"relay log:\n{self.relay.output()}\nprovider log:\n{self.provider.output()}"

    def test_sealed_frames_accepted(self):
        """Both nodes see each other online, by name, with verified announcements and no drops."""
        self.start()

        async def check():
            await wait_for(lambda: "provider-1" in _peer_names(self.relay), 30,
                           "the relay to see the provider", describe=self.describe)
            await wait_for(lambda: "relay" in _peer_names(self.provider), 30,
                           "the provider to see the relay", describe=self.describe)
            for daemon in (self.relay, self.provider):
                status = daemon.status()
                [peer] = status["peers"]
                self.assertEqual(peer["state"], "online")
                self.assertGreater(status["metrics"]["frames_in"], 0)
                self.assertNotIn("drops", status["metrics"])
            result = run_cli("--data-dir", self.provider_dir, "--output", "json", "node", "status")
            self.assertEqual(result.returncode, 0, result.stderr)
            document = json.loads(result.stdout)
            self.assertEqual(document["peers"][0]["peer_id"], self.relay.status()["peer_id"])

        return ensureDeferred(check())

    def test_restart_keeps_identity(self):
        """A provider restarted on the same data dir comes back with the same peer id."""
        self.start()

        async def check():
            await wait_for(lambda: "relay" in _peer_names(self.provider), 30,
                           "the provider to see the relay", describe=self.describe)
            first_id = self.provider.status()["peer_id"]
            # twistd ends a clean SIGTERM shutdown by re-raising the signal.
            self.assertEqual(self.provider.stop(), -signal.SIGTERM)
            self.provider.start()
            await wait_for(
                lambda: self.provider.status().get("pid") == self.provider.process.pid
                and "relay" in _peer_names(self.provider),
                30, "the restarted provider to see the relay", describe=self.describe,
            )
            self.assertEqual(self.provider.status()["peer_id"], first_id)
            listen = self.provider.status()["listen"]
            await wait_for(
                lambda: any(p["peer_id"] == first_id and p["endpoint"] == listen
                            and p["state"] == "online"
                            for p in self.relay.status().get("peers", [])),
                30, "the relay to hear from the restarted provider", describe=self.describe,
            )
            drops = self.relay.status()["metrics"].get("drops", [])
            self.assertEqual([d for d in drops if d["labels"]["reason"] == "bad_tag"], [])

        return ensureDeferred(check())

    def test_refuses_world_readable_key(self):
        """twistd exits with a usage error when the identity key is readable by others."""
        os.chmod(f"{self.relay_dir}/identity.key", 0o644)
        result = subprocess.run(
            [str(TWISTD), "-n", "--pidfile=", "omerta-relay", "--data-dir", self.relay_dir],
            capture_output=True, text=True, env=environment(), timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("chmod 600", result.stdout + result.stderr)
