"""
C{--metrics ENDPOINT}: the node's metrics in Prometheus text format over HTTP
(twisted.web), for example C{--metrics tcp:9400:interface=127.0.0.1}, then
C{curl http://127.0.0.1:9400/metrics}.

Every series comes from the node's one L{omerta.metrics.Metrics} object (the
same one C{omerta node status}, the status file and the manhole show):
counters as C{omerta_<name>_total}, gauges as C{omerta_<name>}, histograms
as C{omerta_<name>_seconds}; plus gauges read from the live node at scrape
time (through the L{MeshNetwork} API): peers by network and state, live
paths by kind (direct, punched, relayed), sessions, the NAT type.
"""

from __future__ import annotations

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.twisted import MetricsResource
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from omerta.mesh.network import MeshNetwork
from omerta.metrics import Metrics

PREFIX = "omerta_"
HELP = {
    "packets_in": "Datagrams received on the node socket.",
    "bytes_in": "Bytes received on the node socket.",
    "frames_in": "Omerta frames that opened (authenticated) on the node socket.",
    "frames_out": "Omerta frames sent, by message type.",
    "bytes_out": "Bytes of omerta frames sent.",
    "drops": "Datagrams or messages dropped, by reason.",
    "stun_requests": "STUN requests answered, by kind.",
    "stun_responses": "STUN responses sent, by code.",
    "gossip_announcements": "Announcements received, by registry outcome.",
    "requests": "Application requests, by direction.",
    "request_latency": "Time from sending a request to its response.",
}


class NodeCollector:
    """
    A prometheus_client collector over a L{NodeService}'s metrics and state.
    """

    def __init__(self, node_service):
        self.node_service = node_service
        self.mesh = MeshNetwork(service=node_service)

    def collect(self):
        metrics: Metrics = self.mesh.metrics
        families: dict[tuple, object] = {}
        for kind, name, labels, value in metrics.series():
            key = (kind, name, tuple(sorted(labels)))
            family = families.get(key)
            if family is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = cls(PREFIX + name, HELP.get(name, name.replace("_", " ")),
                             labels=sorted(labels))
                families[key] = family
            family.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()
        for name, labels, buckets, count, total in metrics.histograms():
            family = HistogramMetricFamily(PREFIX + name + "_seconds",
                                           HELP.get(name, name), labels=sorted(labels))
            cumulative = [(str(b), c) for b, c in zip(Metrics.BUCKETS, buckets)]
            family.add_metric([labels[k] for k in sorted(labels)],
                              cumulative + [("+Inf", count)], total)
            yield family
        yield from self._live()

    def _live(self):
        mesh = self.mesh
        if not mesh.started:
            return
        peers = GaugeMetricFamily(PREFIX + "peers", "Known peers, by network and state.",
                                  labels=["network", "state"])
        links = GaugeMetricFamily(PREFIX + "active_links",
                                  "Peers in the active set with a live path, by path kind.",
                                  labels=["network", "kind"])
        sessions = GaugeMetricFamily(PREFIX + "sessions", "Per-peer sessions.",
                                     labels=["network"])
        for network in mesh.networks():
            statistics = mesh.statistics(network)
            for state, count in statistics["peers"]["by_state"].items():
                peers.add_metric([network, state], count)
            for kind, count in statistics["paths"].items():
                links.add_metric([network, kind], count)
            sessions.add_metric([network], statistics["sessions"])
        yield peers
        yield links
        yield sessions
        nat = mesh.nat
        info = GaugeMetricFamily(PREFIX + "nat_type", "The NAT type last discovered (1).",
                                 labels=["type"])
        info.add_metric(["unknown" if nat is None else nat.nat_type.name.lower()], 1)
        yield info


def check_metrics_endpoint(description: str) -> None:
    """
    Refuse endpoint strings Twisted cannot parse, before anything starts.
    """
    from twisted.internet import endpoints

    if not description.startswith(("tcp:", "unix:", "tcp6:")):
        raise usage.UsageError(
            f"--metrics {description!r}: give a server endpoint such as"
            f" tcp:9400:interface=127.0.0.1"
        )
    try:
        endpoints._parseServer(description, None)
    except (ValueError, TypeError) as e:
        raise usage.UsageError(f"--metrics {description!r}: {e}") from None


class MetricsService(MultiService):
    """
    Serves C{/metrics} on C{endpoint} once started.
    """

    def __init__(self, endpoint: str, node_service, reactor=None):
        super().__init__()
        self.setName("metrics")
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(node_service))
        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        strports.service(endpoint, Site(root), reactor=reactor).setServiceParent(self)
