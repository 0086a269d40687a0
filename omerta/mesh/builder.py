"""
One place that assembles a node: the mesh controller, its socket protocol
and the bound socket, and the bootstrap retries.  The twistd service
(L{omerta.mesh.service.NodeService}) and the simulator
(L{omerta.testing.meshsim.MeshSim}) both build their nodes here, so what runs
in tests is what runs in production.

    built = build_node(identity, keys, reactor=reactor, port=7400)
    built.bootstrapper.start()
    ...
    built.stop()
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from omerta.addressing import BootstrapSpec
from omerta.crypto.identity import Identity
from omerta.crypto.network import NetworkKey
from omerta.crypto.sealing import FrameOpener
from omerta.mesh.events import Events
from omerta.mesh.node import MeshConfig, MeshNode
from omerta.mesh.protocol import NodeProtocol
from omerta.metrics import Metrics
from omerta.wire.messages import Capability


class Bootstrapper:
    """
    Contacts the node's bootstrap peers until each has answered: at once,
    then after C{bootstrap_retry_initial} seconds, doubling up to
    C{bootstrap_retry_max}.  A bootstrap peer whose host name is not resolved
    yet (C{address} None) is skipped until it is.
    """

    def __init__(self, node: MeshNode, clock, config: MeshConfig):
        self.node = node
        self.clock = clock
        self.config = config
        self._call = None
        self._delay = config.bootstrap_retry_initial
        self._running = False

    def start(self) -> None:
        self._running = True
        self._tick()

    def _tick(self) -> None:
        self._call = None
        if not self._running or not self.node.contact_bootstraps():
            return
        self._call = self.clock.callLater(self._delay, self._tick)
        self._delay = min(self._delay * 2, self.config.bootstrap_retry_max)

    @property
    def pending(self) -> bool:
        """Whether a retry is scheduled (some bootstrap peer has not answered)."""
        return self._call is not None

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


@dataclass
class BuiltNode:
    """
    A node as L{build_node} assembled it.  C{port} is the bound UDP socket.
    """

    node: MeshNode
    protocol: NodeProtocol
    port: object
    bootstrapper: Bootstrapper
    keys: dict[bytes, NetworkKey] = field(default_factory=dict)

    def start(self) -> None:
        """Start the mesh timers and contact the bootstrap peers."""
        self.node.start()
        self.bootstrapper.start()

    def stop(self) -> None:
        """Stop retrying bootstraps and the mesh (goodbyes go out on the socket)."""
        self.bootstrapper.stop()
        self.node.stop()


def build_node(
    identity: Identity,
    keys: list[NetworkKey],
    *,
    reactor,
    port: int = 0,
    interface: str = "",
    metrics: Metrics | None = None,
    events: Events | None = None,
    name: str = "",
    capabilities: Capability = Capability.NONE,
    resources: dict | None = None,
    bootstrap: list[BootstrapSpec] = (),
    network_bootstrap: dict[bytes, list[BootstrapSpec]] | None = None,
    config: MeshConfig | None = None,
    relay=None,
    rng: random.Random | None = None,
) -> BuiltNode:
    """
    Build a node in the networks of C{keys} and bind its socket on
    C{reactor} (an C{IReactorUDP} and C{IReactorTime}).  C{relay}: play the
    relay role (a L{omerta.mesh.relay.RelayConfig}, or True for the
    defaults).  Bootstrap peers given by IP address are ready to contact;
    ones given by host name get their address from the caller.  Nothing is
    sent until L{BuiltNode.start}.
    """
    metrics = metrics or Metrics()
    config = config or MeshConfig()
    node = MeshNode(
        identity,
        list(keys),
        clock=reactor,
        metrics=metrics,
        events=events,
        name=name,
        capabilities=capabilities,
        resources=resources,
        bootstrap=bootstrap,
        network_bootstrap=network_bootstrap,
        config=config,
        rng=rng,
    )
    if relay is not None and relay is not False:
        node.enable_relay(None if relay is True else relay)
    by_id = {key.network_id: key for key in keys}
    protocol = NodeProtocol(FrameOpener(by_id), node, metrics)
    node.use_opener(protocol.opener)
    protocol.relay = node.relay
    listening = reactor.listenUDP(port, protocol, interface=interface)
    node.attach(listening, listen_udp=reactor.listenUDP)
    for boot in node.bootstraps:
        endpoint = boot.spec.endpoint
        if endpoint.is_ip:
            boot.address = (endpoint.host, endpoint.port)
    return BuiltNode(node, protocol, listening, Bootstrapper(node, reactor, config), by_id)
