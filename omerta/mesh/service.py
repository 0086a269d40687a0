"""
L{NodeService}: the Twisted service that owns a node's single UDP socket.

Constructing it does nothing; C{startService} loads the identity and the
memberships, binds the socket, starts the timers and contacts the bootstrap
peers; C{stopService} undoes all of it.  The live state is mirrored into
C{status.json} in the data directory (atomically), which C{omerta node
status} reads.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from omerta import storage
from omerta.addressing import BootstrapSpec
from omerta.crypto.identity import load_or_create_identity
from omerta.mesh.events import Events
from omerta.mesh.builder import Bootstrapper, build_node
from omerta.mesh.node import MeshConfig, MeshNode, capability_names
from omerta.metrics import Metrics
from omerta.networks import NetworkStore
from omerta.stun.discovery import NatReport
from omerta.stun.service import StunService
from omerta.wire.messages import Capability

STATUS_FILE = "status.json"
INFO_CHANNEL = "omerta.info"


class NodeService(Service):
    """
    One node: identity, memberships, socket, mesh controller.

    @param invites: invite links (or keys) to join at start if this node is
        not a member yet.
    @param reactor: provides C{IReactorUDP}, C{IReactorTime} (and
        C{IReactorPluggableNameResolver} for host names); the global reactor
        when None.
    """

    log = Logger()

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        interface: str = "",
        name: str = "",
        bootstrap: list[BootstrapSpec] = (),
        invites: list[str] = (),
        capabilities: Capability = Capability.NONE,
        config: MeshConfig | None = None,
        status_interval: float = 2.0,
        resources: dict | None = None,
        peers_interval: float = 60.0,
        serve_stun: bool = False,
        stun_alternate: tuple[str, int] | None = None,
        stun_servers: list[tuple[str, int]] = (),
        nat_interval: float = 300.0,
        relay=None,
        reactor=None,
    ):
        self.data_dir = Path(data_dir)
        self.port_number = port
        self.interface = interface
        self.node_name = name
        self.bootstrap_specs = list(bootstrap)
        self.invites = list(invites)
        self.capabilities = capabilities
        self.config = config or MeshConfig()
        self.status_interval = status_interval
        self._reactor = reactor
        self.serve_stun = serve_stun
        self.resources = resources
        self.peers_interval = peers_interval
        self.stun_alternate = stun_alternate
        self.stun_servers = list(stun_servers)
        self.nat_interval = nat_interval
        self.relay_config = relay
        self.metrics = Metrics()
        self.events = Events()
        self.stun: StunService | None = None
        self.node: MeshNode | None = None
        self.port = None
        self._loops: list[LoopingCall] = []
        self.bootstrapper: Bootstrapper | None = None
        self._last_status: dict | None = None
        self._write_failures: dict[Path, str] = {}  # state file -> why it is not written

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self) -> None:
        reactor = self.reactor
        identity = load_or_create_identity(self.data_dir)
        store = NetworkStore(self.data_dir)
        for invite in self.invites:
            result = store.join(invite, reactor.seconds(), exist_ok=True)
            self.log.info(
                "Joined network {network}", network=result.membership.network_id
            )
        memberships = store.list()
        built = build_node(
            identity,
            [m.key for m in memberships],
            reactor=reactor,
            port=self.port_number,
            interface=self.interface,
            metrics=self.metrics,
            events=self.events,
            name=self.node_name,
            capabilities=self.capabilities,
            resources=self.resources,
            bootstrap=self.bootstrap_specs,
            network_bootstrap={m.key.network_id: list(m.bootstrap) for m in memberships},
            config=self.config,
            relay=self.relay_config,
        )
        self.node, self.port, self.bootstrapper = built.node, built.port, built.bootstrapper
        protocol = built.protocol
        for overlay in self.node.overlays.values():
            overlay.load_peers(self.data_dir)
            overlay.messaging.on_channel(INFO_CHANNEL, self._info)
        self.stun = StunService(
            reactor,
            self.metrics,
            serve=self.serve_stun,
            alternate=self.stun_alternate,
            servers=self._discovery_servers,
            interval=self.nat_interval,
            on_report=self._nat_report,
            # (real sockets: only with the real reactor, never a test's)
            measure_hops=self._reactor is _global_reactor(),
        )
        self.stun.start(self.port)
        protocol.stun_handler = self.stun.datagram_received
        host = self.port.getHost()
        self.log.info(
            "Node {peer_id} ({name}) listening on UDP {host}:{port} in {count} network(s)",
            peer_id=identity.peer_id_text,
            name=self.node_name or "unnamed",
            host=host.host,
            port=host.port,
            count=len(memberships),
        )
        Service.startService(self)
        self._started_at = reactor.seconds()
        self.node.start()
        self._start_loop(self.write_status, self.status_interval, now=True)
        self._start_loop(self.save_peers, self.peers_interval, now=False)
        self._resolve_bootstraps().addCallback(lambda _: self._bootstrapped())

    def _bootstrapped(self) -> None:
        if self.running:
            self.bootstrapper.start()
        if self.nat_interval > 0:
            self.stun.measure_depth().addCallback(self._nat_depth)
            self.stun.discover()

    def _nat_depth(self, hops: int | None) -> None:
        if hops is not None and hops != self.node.nat_hops:
            self.log.debug("{hops} NAT layer(s) between this host and the internet", hops=hops)
            self.node.nat_hops = hops

    def _discovery_servers(self) -> list[tuple[str, int]]:
        """
        Explicit --stun servers, else the bootstrap peers (relays serve STUN
        on their mesh port).
        """
        if self.stun_servers:
            return list(self.stun_servers)
        return [b.address for b in self.node.bootstraps if b.address is not None]

    def _nat_report(self, report: NatReport, previous: NatReport | None) -> None:
        self.node.nat = report
        self._nat_depth(report.nat_hops)
        changed = previous is None or (report.nat_type, report.mapped) != (
            previous.nat_type, previous.mapped
        )
        if changed:
            # peers pick punch strategies from the type in our announcement:
            # re-signed now and spread, not at the next periodic refresh
            for overlay in self.node.overlays.values():
                overlay.gossip.own_announcement()
            self.log.info(
                "NAT: {classic} (mapping {mapping}, filtering {filtering}), mapped {mapped},"
                " {depth} NAT layer(s) deep",
                classic=report.classic,
                mapping=report.mapping.value,
                filtering=report.filtering.value,
                mapped=report.as_dict()["mapped"],
                depth="unknown" if report.nat_hops is None else report.nat_hops,
            )
            self.events.emit("nat_changed", report=report, previous=previous)

    def _start_loop(self, function, interval: float, now: bool) -> None:
        loop = LoopingCall(function)
        loop.clock = self.reactor
        loop.start(interval, now=now).addErrback(
            lambda f: self.log.failure("Periodic task {name} failed", f, name=function.__name__)
        )
        self._loops.append(loop)

    def _resolve_bootstraps(self) -> Deferred:
        waits = []
        for boot in self.node.bootstraps:
            endpoint = boot.spec.endpoint
            if boot.address is not None:
                continue
            d = self.reactor.resolve(endpoint.host)

            def resolved(ip, boot=boot):
                boot.address = (ip, boot.spec.endpoint.port)

            def failed(failure, boot=boot):
                self.log.warn(
                    "Cannot resolve bootstrap {spec}: {error}",
                    spec=str(boot.spec),
                    error=failure.getErrorMessage(),
                )

            waits.append(d.addCallbacks(resolved, failed))
        if not waits:
            return succeed(None)
        from twisted.internet.defer import gatherResults

        return gatherResults(waits)

    def _info(self, peer_id: bytes, payload: bytes) -> bytes:
        """
        The built-in C{omerta.info} channel: who this node is, as JSON.
        """
        import json

        from omerta import __version__

        return json.dumps({
            "peer_id": self.node.identity.peer_id_text,
            "name": self.node_name,
            "capabilities": capability_names(self.capabilities),
            "version": __version__,
            "uptime_s": round(self.reactor.seconds() - self._started_at, 3),
            "nat_type": None if self.node.nat is None else self.node.nat.nat_type.name.lower(),
        }).encode()

    def save_peers(self, *, at_stop: bool = False) -> bool:
        """
        Persist each network's known peers (re-verified when loaded).

        A network whose file cannot be written (a full disk, a damaged file
        kept in place) is retried at the next round; see L{_persist}.

        @return: whether every network's peers were saved.
        """
        saved = True
        for overlay in self.node.overlays.values():
            count = len(overlay.registry)
            saved &= self._persist(
                overlay.peers_file(self.data_dir),
                lambda overlay=overlay: overlay.save_peers(self.data_dir),
                f"the {count} known peer(s) of network {overlay.network_id.hex()}",
                self.peers_interval,
                at_stop=at_stop,
            )
        return saved

    def _persist(self, path: Path, write, what: str, interval: float, *,
                 at_stop: bool = False) -> bool:
        """
        Call C{write} (which writes C{path}) without letting a failure to
        write stop the periodic task: the first failure of a streak is
        logged as a warning, the recovery as news, and a failure at stop as
        an error saying C{what} was not saved.

        @return: whether C{write} succeeded.
        """
        try:
            write()
        except (OSError, storage.StateFileError) as e:
            error = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if at_stop:
                self.log.error(
                    "Not saved at stop: {what}, to {path}: {error}",
                    what=what, path=str(path), error=error,
                )
            elif path not in self._write_failures:
                self.log.warn(
                    "Cannot write {path} ({error}): {what} not saved; retrying every"
                    " {interval:g} s (logged again once it works)",
                    path=str(path), error=error, what=what, interval=interval,
                )
            self._write_failures[path] = error
            return False
        if self._write_failures.pop(path, None) is not None:
            self.log.info("Writing {path} works again", path=str(path))
        return True

    def status(self) -> dict:
        host = self.port.getHost() if self.port is not None else None
        document = {
            "pid": os.getpid(),
            "running": self.running,
            "listen": None if host is None else f"{host.host}:{host.port}",
            "metrics": self.metrics.snapshot(),
        }
        if self.node is not None:
            document.update(self.node.status())
        if self.stun is not None:
            document["stun_server"] = self.stun.server is not None
            report = self.stun.report
            document["nat"] = None if report is None else report.as_dict()
        return document

    def write_status(self) -> None:
        """
        Mirror the live state into C{status.json} when it changed.
        """
        self._write_status()

    def _write_status(self, *, at_stop: bool = False) -> bool:
        document = self.status()
        if document == self._last_status:
            return True
        path = self.data_dir / STATUS_FILE
        written = self._persist(
            path,
            lambda: storage.write_json(
                path, dict(document, updated_at=self.reactor.seconds())),
            "the node's status" + (" (omerta node status shows an older one)" if at_stop
                                   else ""),
            self.status_interval,
            at_stop=at_stop,
        )
        if written:
            self._last_status = document
        return written

    def stopService(self):
        Service.stopService(self)
        if self.stun is not None:
            self.stun.stop()
        if self.bootstrapper is not None:
            self.bootstrapper.stop()
        if self.node is not None:
            self.node.stop()
            self.save_peers(at_stop=True)
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        if self.port is None:
            return None
        self._write_status(at_stop=True)
        port, self.port = self.port, None
        return port.stopListening()


def _global_reactor():
    from twisted.internet import reactor

    return reactor
