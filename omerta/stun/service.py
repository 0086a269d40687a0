"""
STUN for one node: the client and server on the node's socket, the RFC 5780
companion sockets when the node has an alternate address, and NAT discovery
run at start and then periodically.

The node's socket stays the node's: this object is handed its transport and
is fed the STUN datagrams the node's demultiplexer finds.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import CancelledError, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from omerta.metrics import Metrics
from omerta.stun.client import StunClient
from omerta.stun.discovery import Discovery, NatReport
from omerta.stun.endpoint import StunEndpoint, StunSocketProtocol
from omerta.stun.hops import nat_depth
from omerta.stun.server import StunServer
from omerta.wire.messages import NatType

Address = tuple[str, int]


class StunService:
    """
    @param servers: callable returning the STUN servers to discover with
        (resolved addresses), evaluated at each run so late-resolved
        bootstrap peers count.
    @param on_report: called with each new L{NatReport} and the previous one.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        metrics: Metrics,
        *,
        serve: bool,
        alternate: Address | None = None,
        servers: Callable[[], list[Address]] = lambda: [],
        interval: float = 300.0,
        on_report: Callable[[NatReport, NatReport | None], None] = lambda new, old: None,
        measure_hops: bool = False,
    ):
        self.reactor = reactor
        self.measure_hops = measure_hops
        self.metrics = metrics
        self.serve = serve
        self.alternate = alternate
        self.servers = servers
        self.interval = interval
        self.on_report = on_report
        self.report: NatReport | None = None
        self.client: StunClient | None = None
        self.server: StunServer | None = None
        self.endpoint: StunEndpoint | None = None
        self._companions: list = []
        self._loop: LoopingCall | None = None
        self._running = None

    def start(self, transport) -> None:
        host = transport.getHost()
        local = (host.host, host.port)
        self.client = StunClient(transport.write, self.reactor, self.metrics)
        if self.serve:
            self.server = StunServer(local, self.metrics, alternate=self.alternate)
            self.server.attach(local, transport)
            if self.alternate is not None:
                self._bind_companions(local)
        self.endpoint = StunEndpoint(local, self.metrics, self.client, self.server)
        if self.interval > 0:
            self._loop = LoopingCall(self.discover)
            self._loop.clock = self.reactor
            self._loop.start(self.interval, now=False)

    def _bind_companions(self, primary: Address) -> None:
        p_ip, p_port = primary
        a_ip, a_port = self.alternate
        for local in ((a_ip, p_port), (p_ip, a_port), (a_ip, a_port)):
            endpoint = StunEndpoint(local, self.metrics, server=self.server)
            port = self.reactor.listenUDP(local[1], StunSocketProtocol(endpoint), interface=local[0])
            self.server.attach(local, port)
            self._companions.append(port)
        self.log.info(
            "STUN with RFC 5780 alternate {ip}:{port}", ip=a_ip, port=a_port
        )

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.endpoint.datagram_received(data, addr)

    def discover(self):
        """
        Run discovery now (unless a run is under way); returns its Deferred.
        """
        servers = self.servers()
        if self._running is not None or not servers or self.client is None:
            return None
        local = self.endpoint.local if self.endpoint.local[0] not in ("0.0.0.0", "::", "") else None
        discovery = Discovery(self.client, self.reactor, local=local,
                              open_probe_socket=self._open_probe_socket)
        self._running = ensureDeferred(discovery.run(servers, hairpin=True))
        if self.measure_hops:
            self._running.addCallback(self._with_hops)

        def done(report: NatReport) -> None:
            old, self.report = self.report, report
            self.metrics.inc("nat_discoveries", nat_type=report.nat_type.name.lower())
            self.on_report(report, old)

        def failed(failure) -> None:
            if not failure.check(CancelledError):
                self.log.failure("NAT discovery failed", failure)

        def finished(result):
            self._running = None
            return result

        self._running.addCallbacks(done, failed).addBoth(finished)
        return self._running

    def measure_depth(self):
        """
        Measure the NAT depth (L{omerta.stun.hops}) towards the first
        server now, apart from discovery, which takes seconds: a hole punch
        needs it from the start.  A Deferred firing with the depth (None:
        unknown, or not measured: no server, or hops not measured here).
        """
        servers = self.servers()
        if not self.measure_hops or not servers or self.endpoint is None:
            return succeed(None)
        return nat_depth(self.reactor, servers[0], self.endpoint.local[0])

    def _with_hops(self, report: NatReport):
        """Add the NAT depth (L{omerta.stun.hops}) to a report of a NAT."""
        if report.mapped is None or report.nat_type in (NatType.PUBLIC, NatType.BLOCKED):
            return report
        server = report.servers[0] if report.servers else None
        if server is None:
            return report

        def measured(hops):
            report.nat_hops = hops
            return report

        return nat_depth(self.reactor, server, self.endpoint.local[0]).addCallback(measured)

    def _open_probe_socket(self, main: StunClient):
        """
        A fresh UDP socket on the node's interface for discovery's filtering
        tests: a sibling client of the main one and a function closing it.
        """
        interface = self.endpoint.local[0]
        probe = StunSocketProtocol(StunEndpoint((interface, 0), self.metrics))
        port = self.reactor.listenUDP(0, probe, interface=interface)
        sibling = main.sibling(port.write)
        probe.endpoint = StunEndpoint((interface, port.getHost().port), self.metrics, sibling)
        return sibling, port.stopListening

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.client is not None:
            self.client.stop()
        ports, self._companions = self._companions, []
        for port in ports:
            port.stopListening()
