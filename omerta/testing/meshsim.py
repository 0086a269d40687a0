"""
Many real mesh nodes on the simulated network, for tests and the gossip
benchmark.  Each node is the product's L{MeshNode} with its own identity,
L{NodeProtocol} and socket on a L{SimHost}; only the network is simulated.

    sim = MeshSim(seed=1)
    seed = sim.add_node("198.51.100.1")
    for i in range(50):
        sim.add_node(f"10.1.{i // 250}.{i % 250 + 1}", bootstrap=[seed])
    sim.run_until(sim.converged, timeout=60)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

from omerta.addressing import BootstrapSpec, Endpoint
from omerta.crypto.identity import Identity
from omerta.crypto.network import NetworkKey
from omerta.mesh.builder import BuiltNode, build_node
from omerta.mesh.node import MeshConfig, MeshNode
from omerta.metrics import Metrics
from omerta.testing.simnet import NAT_MODELS, SimNetwork
from omerta.wire.messages import NatType

NAT_TYPES = {
    "none": NatType.PUBLIC,
    "full-cone": NatType.FULL_CONE,
    "restricted-cone": NatType.RESTRICTED_CONE,
    "port-restricted": NatType.PORT_RESTRICTED_CONE,
    "symmetric": NatType.SYMMETRIC,
}
"""The NAT lab's names for the NAT types, and what discovery reports for them."""

PORT = 7400


@dataclass
class SimNode:
    node: MeshNode
    host: object
    port: object
    identity: Identity
    address: tuple
    built: BuiltNode
    # how it was added (L{MeshSim.restart} adds it again with these)
    options: dict = field(default_factory=dict)

    @property
    def overlay(self):
        return self.node.overlay()

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id

    def knows(self) -> set[bytes]:
        return {r.peer_id for r in self.overlay.registry.all()}


class MeshSim:
    def __init__(self, seed: int = 0, config: MeshConfig | None = None,
                 network_key: NetworkKey | None = None, **net_options):
        self.net = SimNetwork(seed=seed, **net_options)
        self.clock = self.net.clock
        self.rng = random.Random(seed)
        self.key = network_key or NetworkKey(bytes(self.rng.getrandbits(8) for _ in range(32)))
        self.config = config or MeshConfig()
        self.nodes: list[SimNode] = []
        self.dead: set[int] = set()

    def add_node(self, ip: str, bootstrap: list[SimNode] = (), name: str = "",
                 identity: Identity | None = None, port: int = PORT, relay=False,
                 nat_type: NatType | None = None) -> SimNode:
        """
        A node at C{ip}.  C{relay}: play the relay role (True, or a
        L{omerta.mesh.relay.RelayConfig}).  C{nat_type}: what the node's NAT
        discovery would have reported (the simulation skips running it).
        """
        identity = identity or Identity.generate()
        host = self.net.host(ip)
        specs = [BootstrapSpec(Endpoint(*b.address), peer_id=b.identity.peer_id_text)
                 for b in bootstrap]
        built = build_node(identity, [self.key], reactor=host.reactor, port=port, interface=ip,
                           metrics=Metrics(), name=name, bootstrap=specs, config=self.config,
                           relay=relay or None, rng=random.Random(self.rng.random()))
        if nat_type is not None:
            built.node.nat = SimpleNamespace(nat_type=nat_type, mapped=None)
            # and what its NAT depth measurement would have found
            built.node.nat_hops = 0 if nat_type == NatType.PUBLIC else 1
        built.start()
        sim_node = SimNode(built.node, host, built.port, identity, (ip, port), built,
                           dict(ip=ip, bootstrap=list(bootstrap), name=name, identity=identity,
                                port=port, relay=relay, nat_type=nat_type))
        self.nodes.append(sim_node)
        return sim_node

    def add_behind_nat(self, nat: str, inside_ip: str, public_ip: str,
                       bootstrap: list[SimNode] = (), name: str = "", **options) -> SimNode:
        """
        A node at C{inside_ip} behind a NAT of type C{nat} (a L{NAT_MODELS}
        name, or "none" for a public node at C{public_ip}) at C{public_ip}.
        """
        if nat == "none":
            return self.add_node(public_ip, bootstrap, name, nat_type=NatType.PUBLIC, **options)
        self.net.add_nat(public_ip, NAT_MODELS[nat](public_ip, self.clock), [inside_ip])
        return self.add_node(inside_ip, bootstrap, name, nat_type=NAT_TYPES[nat], **options)

    def kill(self, sim_node: SimNode) -> None:
        """
        Stop a node abruptly (no goodbye): its socket closes, timers stop.
        """
        self.dead.add(id(sim_node))
        sim_node.port.stopListening()  # first: the node's goodbyes go nowhere
        sim_node.built.stop()

    def restart(self, sim_node: SimNode) -> SimNode:
        """
        Kill a node (if it runs) and start it again as a new run: the same
        identity, address and options, none of its state.
        """
        if id(sim_node) not in self.dead:
            self.kill(sim_node)
        return self.add_node(**sim_node.options)

    def leave(self, sim_node: SimNode) -> None:
        """
        Stop a node cleanly: it stops (its goodbyes go out on the socket),
        then its socket closes.
        """
        self.dead.add(id(sim_node))
        sim_node.built.stop()
        sim_node.port.stopListening()

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes if id(n) not in self.dead]

    def converged(self) -> bool:
        """
        Every live node knows every other live node.
        """
        live = self.live()
        everyone = {n.peer_id for n in live}
        return all(everyone - {n.peer_id} <= n.knows() for n in live)

    def knowledge(self) -> float:
        """
        The fraction of (live node, live peer) pairs known.
        """
        live = self.live()
        everyone = {n.peer_id for n in live}
        total = len(live) * (len(live) - 1)
        if total == 0:
            return 1.0
        known = sum(len((everyone - {n.peer_id}) & n.knows()) for n in live)
        return known / total

    def run(self, seconds: float) -> None:
        self.net.run(seconds)

    def run_until(self, predicate, timeout: float, check_every: float = 0.5) -> bool:
        deadline = self.clock.seconds() + timeout
        while self.clock.seconds() < deadline:
            self.net.run(check_every)
            if predicate():
                return True
        return predicate()

    def stop(self) -> None:
        for sim_node in self.live():
            self.kill(sim_node)
