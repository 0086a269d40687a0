"""
Operating a node: the Prometheus endpoint and trace ids in JSON logs, with
real twistd daemons on loopback.
"""

import json
import os
import time
import urllib.request

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from omerta.app.metrics_web import NodeCollector
from omerta.crypto.identity import load_or_create_identity
from omerta.mesh.network import MeshNetwork
from omerta.mesh.service import INFO_CHANNEL
from omerta.metrics import Metrics
from omerta.networks import NetworkStore
from tests.integration import Daemon, free_udp_port, wait_for


def free_tcp_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeService:
    def __init__(self, metrics):
        self.metrics = metrics
        self.node = None


class CollectorTests(unittest.TestCase):
    def test_exposition(self):
        """Counters, gauges and histograms of the metrics object come out in Prometheus text."""
        metrics = Metrics()
        metrics.inc("frames_out", 3, type="ping")
        metrics.inc("drops", reason="bad_tag")
        metrics.set("peers", 2, state="online")
        metrics.observe("request_latency", 0.02)
        metrics.observe("request_latency", 3.0)
        registry = CollectorRegistry()
        registry.register(NodeCollector(FakeService(metrics)))
        text = generate_latest(registry).decode()
        self.assertIn('omerta_frames_out_total{type="ping"} 3.0', text)
        self.assertIn('omerta_drops_total{reason="bad_tag"} 1.0', text)
        self.assertIn('omerta_peers{state="online"} 2.0', text)
        self.assertIn('omerta_request_latency_seconds_bucket{le="0.025"} 1.0', text)
        self.assertIn('omerta_request_latency_seconds_count 2.0', text)


    def test_live_gauges(self):
        """Peers by state, live paths by kind and sessions come from the live node, per network."""
        from tests.test_node import MeshFixture

        fixture = MeshFixture(self)
        relay = fixture.start_relay()
        alice = fixture.node("10.0.0.2", "alice")
        self.assertTrue(fixture.net.run_until(
            lambda: len(alice.node.overlay().registry.online()) == 1, 10))
        registry = CollectorRegistry()
        registry.register(NodeCollector(relay))
        text = generate_latest(registry).decode()
        network = fixture.membership.network_id
        self.assertIn(f'omerta_peers{{network="{network}",state="online"}} 1.0', text)
        self.assertIn(f'omerta_active_links{{kind="direct",network="{network}"}} 1.0', text)
        self.assertIn(f'omerta_active_links{{kind="relayed",network="{network}"}} 0.0', text)
        self.assertIn(f'omerta_active_links{{kind="punched",network="{network}"}} 0.0', text)
        self.assertIn(f'omerta_sessions{{network="{network}"}} 0.0', text)
        self.assertIn('omerta_nat_type{type="unknown"} 1.0', text)


class DaemonTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.relay_dir = f"{base}/relay"
        self.port = free_udp_port()
        identity = load_or_create_identity(self.relay_dir)
        self.invite = NetworkStore(self.relay_dir).create(
            identity, "ops", f"127.0.0.1:{self.port}", now=time.time()).invite
        self.base = base

    def relay(self, *extra):
        return Daemon(self, "omerta-relay", self.relay_dir, "--name", "relay",
                      "--interface", "127.0.0.1", "--port", str(self.port),
                      "--nat-interval", "0", *extra)

    def test_metrics_move_with_traffic(self):
        """The scrape endpoint serves omerta counters, and they grow when a peer joins."""
        http_port = free_tcp_port()
        relay = self.relay("--metrics", f"tcp:{http_port}:interface=127.0.0.1")
        url = f"http://127.0.0.1:{http_port}/metrics"

        def scrape():
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.read().decode()
            except OSError:
                return None

        def value(text, series):
            for line in text.splitlines():
                if line.startswith(series + " "):
                    return float(line.split()[-1])
            return 0.0

        async def check():
            first = await wait_for(lambda: scrape(), 30, "the metrics endpoint",
                                   describe=relay.output)
            self.assertIn("omerta_peers", first)
            before = value(first, "omerta_frames_in_total")
            Daemon(self, "omerta-provider", f"{self.base}/provider", "--name", "p1",
                   "--interface", "127.0.0.1", "--port", "0", "--nat-interval", "0",
                   "--invite", self.invite)
            text = await wait_for(
                lambda: (lambda t: t if t and value(t, "omerta_frames_in_total") > before
                         and 'omerta_peers{network=' in t and 'state="online"} 1.0' in t
                         else None)(scrape()),
                30, "counters to move", describe=relay.output)
            self.assertGreater(value(text, 'omerta_frames_out_total{type="pong"}'), 0)

        return ensureDeferred(check())

    def test_trace_id_follows_a_request(self):
        """A request's trace id appears in the requester's log and in the responder's JSON log lines."""
        relay = self.relay("--log-format", "json")
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        async def check():
            mesh = MeshNetwork(f"{self.base}/client", invites=[self.invite], interface="127.0.0.1",
                               nat_interval=0, reactor=reactor)
            await mesh.start()
            self.addCleanup(mesh.stop)
            ready = await mesh.wait_for_peers(1, timeout=20)
            self.assertTrue(ready, relay.output())
            trace = os.urandom(8)
            answer = json.loads(await mesh.request("relay", INFO_CHANNEL, b"", timeout=10,
                                                   trace_id=trace))
            self.assertEqual(answer["name"], "relay")
            mine = [e for e in events if e.get("trace_id") == trace.hex()]
            self.assertEqual(len(mine), 2)  # request sent, response received

            def relay_lines():
                lines = []
                for line in relay.output().splitlines():
                    if line.startswith("{"):
                        record = json.loads(line)
                        if record.get("trace_id") == trace.hex():
                            lines.append(record)
                return lines if len(lines) >= 2 else None

            theirs = await wait_for(relay_lines, 10, "the relay to log the trace id")
            self.assertEqual({r["namespace"] for r in theirs}, {"omerta.mesh.messaging.Messaging"})
            for record in theirs:
                self.assertTrue({"time", "level", "namespace", "message"} <= set(record))

        return ensureDeferred(check())
