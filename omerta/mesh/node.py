"""
The mesh controller behind a node's socket: one L{Overlay} per network the
node belongs to, the bootstrap peers, and what the node knows of its own
public address.  Frames are dispatched to the overlay of their network.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import socket
from contextlib import contextmanager
from dataclasses import dataclass

from twisted.logger import Logger

from omerta.addressing import BootstrapSpec
from omerta.crypto.identity import Identity, format_peer_id
from omerta.crypto.network import NetworkKey
from omerta.crypto.sealing import OpenedFrame
from omerta.mesh.events import Events
from omerta.mesh.overlay import Overlay
from omerta.mesh.paths import RelayRoute
from omerta.metrics import Metrics
from omerta.wire.messages import Capability, MessageType, NatType

Address = tuple[str, int]


@dataclass
class MeshConfig:
    """
    Timing and size knobs.  Defaults from DESIGN.md §6 where it gives them;
    docs/mesh.md explains the others.
    """

    # liveness
    keepalive: float = 2.0
    suspect_after_missed: int = 1
    indirect_timeout: float = 1.5
    indirect_helpers: int = 2
    max_indirect_probes: int = 64
    degree: int = 8
    max_active: int = 16
    offline_cleanup: float = 3600.0
    max_outstanding_pings: int = 1024
    ping_retries: int = 2
    ping_retry: float = 0.5
    # how often keepalive rounds and link suspicions are looked at
    liveness_tick: float = 0.25
    # an address a peer sends from, not proven yet, is challenged again at
    # most this often while frames keep coming from it
    challenge_retry: float = 1.0
    proven_memory: int = 4096
    # gossip: an announcement is re-signed at once when what it says changes
    # (looked at every sync_interval) and refreshed every `reannounce` only to
    # outlive its TTL, so refreshes cost each node n / reannounce records a
    # second: liveness is the membership's business, not the TTL's
    announce_ttl: int = 86400
    reannounce: float = 43200.0
    gossip_interval: float = 0.2
    fanout: int = 3
    retransmit_mult: int = 4
    gossip_hop_limit: int = 16
    sync_interval: float = 5.0
    # membership (SWIM suspicion with Lifeguard's timeouts): a suspicion
    # lasts suspicion_mult * log10(n) seconds with suspicion_confirmations
    # independent suspecters, up to suspicion_max_mult times that with one
    suspicion_mult: float = 1.0
    suspicion_max_mult: float = 4.0
    suspicion_confirmations: int = 3
    # a peer declared dead is pinged again, one at a time, this often
    reconnect_interval: float = 10.0
    # a full peer list is sent to one member at most this often on request
    # (a newcomer whose first list lost a datagram asks again)
    peer_list_interval: float = 2.0
    max_peers: int = 10000
    # freshness
    contacts_kept: int = 100
    contact_max_age: float = 300.0
    piggyback_contacts: int = 3
    query_fanout: int = 3
    forward_fanout: int = 2
    query_hop_limit: int = 5
    query_rate: float = 10.0
    query_timeout: float = 2.0
    query_memory: int = 1024
    # messaging
    request_timeout: float = 10.0
    request_retry: float = 1.0
    response_cache_ttl: float = 60.0
    response_cache_size: int = 4096
    max_queued_per_peer: int = 64
    # bootstrap
    bootstrap_retry_initial: float = 1.0
    bootstrap_retry_max: float = 30.0
    # relays (member side)
    relay_count: int = 3
    reserve_lifetime: int = 120
    reserve_refresh: float = 10.0
    reserve_retry: float = 2.0
    reserve_tries: int = 3
    relay_avoid: float = 60.0
    relay_connect_timeout: float = 5.0
    # a relay that refused a session to a peer is asked for it again after
    # this backoff, doubling while it keeps refusing
    relay_retry_initial: float = 1.0
    relay_retry_max: float = 60.0
    # paths
    path_dead_after: float = 3.0
    failover_timeout: float = 10.0
    upgrade_first: float = 5.0
    upgrade_initial: float = 30.0
    upgrade_max: float = 600.0
    # hole punching
    punch_timeout: float = 10.0
    # a punch request is asked again this often, this many times, while
    # nothing of the peer has arrived (a lost request or execute)
    punch_request_retry: float = 1.0
    punch_request_retries: int = 3
    # a punch that failed is tried again this soon, this many times, before
    # the upgrade backoff (upgrade_initial, doubling) takes over
    punch_retry_soon: float = 1.0
    punch_retries_soon: int = 2
    punch_margin: float = 0.05
    # the side that goes second (THEY_FIRST, FOLLOW_RETRY) starts
    # punch_hold_margin after the first; between restricted cones
    # (LEAD_HOLD / FOLLOW_RETRY) the opening rounds last
    # punch_hold_after; then the leader keeps its mapping with
    # hop-limited probes this often, the follower waits until routers forgot
    # unanswered UDP (Linux: 30 s) and probes again; the attempt ends after
    # punch_hold_timeout
    punch_hold_margin: float = 0.25
    punch_hold_after: float = 1.5
    punch_hold_keepalive: float = 5.0
    punch_hold_forget: float = 33.0
    punch_hold_timeout: float = 42.0
    punch_linger: float = 3.0
    max_punch_attempts: int = 64


@dataclass
class _Bootstrap:
    """
    A peer to bootstrap from, in the networks named (every network of this
    node when C{networks} is None: a spec given on the command line).
    """

    spec: BootstrapSpec
    networks: set[bytes] | None = None
    address: Address | None = None
    reached: bool = False
    answered_by: bytes | None = None


def capability_names(flags: int) -> list[str]:
    return [c.name.lower() for c in Capability if c and flags & c]


class MeshNode:
    """
    @param networks: the networks this node belongs to.
    @param clock: an C{IReactorTime} provider.
    @param bootstrap: peers to start from in every network.
    @param network_bootstrap: peers to start from in one network only (from
        that network's invite), by network id; never contacted in the other
        networks, whose ids they need not learn.
    @param resources: what the node offers (cpu_cores, memory_mb, disk_gb,
        gpus), announced.
    """

    log = Logger()

    def __init__(
        self,
        identity: Identity,
        networks: list[NetworkKey],
        *,
        clock,
        metrics: Metrics | None = None,
        events: Events | None = None,
        name: str = "",
        capabilities: Capability = Capability.NONE,
        resources: dict | None = None,
        bootstrap: list[BootstrapSpec] = (),
        network_bootstrap: dict[bytes, list[BootstrapSpec]] | None = None,
        config: MeshConfig | None = None,
        rng: random.Random | None = None,
    ):
        self.identity = identity
        self.peer_id = identity.peer_id
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.events = events or Events()
        self.name = name
        self.capabilities = capabilities
        self.resources = dict(
            resources or {"cpu_cores": 0, "memory_mb": 0, "disk_gb": 0, "gpus": 0}
        )
        self.config = config or MeshConfig()
        self.rng = rng or random.Random()
        self.nat = None
        #: How many NATs stand between this host and the internet
        #: (L{omerta.stun.hops}), measured at start and with each NAT
        #: discovery; None while unknown.
        self.nat_hops: int | None = None
        self.relay = None          # RelayServer when this node relays
        self.coordinator = None    # punch Coordinator when this node relays
        self.relay_routes: dict[bytes, object] = {}  # session header -> ClientSession
        self.tunnels = None        # TunnelPlane once the socket is attached
        self.transport = None
        self.opener = None         # the socket's FrameOpener, once built
        self.local_port = 0
        self._held: dict[Address, int] = {}  # hold_address
        self._bound: Address | None = None
        self._observed: Address | None = None
        self.overlays: dict[bytes, Overlay] = {
            key.network_id: Overlay(self, key, random.Random(self.rng.random()))
            for key in networks
        }
        self.bootstraps: list[_Bootstrap] = []
        for spec in bootstrap:
            self._add_bootstrap(spec, None)
        for network_id, specs in (network_bootstrap or {}).items():
            for spec in specs:
                self._add_bootstrap(spec, network_id)

    # bootstrap peers

    def _add_bootstrap(self, spec: BootstrapSpec, network_id: bytes | None) -> None:
        if self._is_self(spec):
            return
        for boot in self.bootstraps:
            if boot.spec == spec:
                if boot.networks is not None:
                    if network_id is None:
                        boot.networks = None
                    else:
                        boot.networks.add(network_id)
                return
        self.bootstraps.append(_Bootstrap(spec, None if network_id is None else {network_id}))

    def _is_self(self, spec: BootstrapSpec) -> bool:
        if spec.peer_id is not None:
            return spec.peer_id == self.identity.peer_id_text
        return bool(self.name) and spec.name == self.name

    def contact_bootstraps(self) -> bool:
        """
        Announce to and ping every bootstrap peer not reached yet, in its
        networks.  Returns whether any remain unreached.
        """
        contacted = set()  # an invite and --bootstrap may name one peer twice
        for boot in self.bootstraps:
            if boot.reached or boot.address is None:
                continue
            for network_id, overlay in self.overlays.items():
                if boot.networks is None or network_id in boot.networks:
                    if (network_id, boot.address) in contacted:
                        continue
                    contacted.add((network_id, boot.address))
                    overlay.gossip.announce_to(boot.address)
                    overlay.liveness.ping(b"", boot.address)
        return any(not b.reached for b in self.bootstraps)

    def bootstrap_answered(self, addr: Address, peer_id: bytes) -> None:
        """
        A peer at C{addr} proved (by a signed announcement) to be C{peer_id}.
        Bootstrap specs at that address naming another id are not reached.
        """
        text = format_peer_id(peer_id)
        expected = [b for b in self.bootstraps if b.address == addr]
        matched = [b for b in expected if b.spec.peer_id in (None, text)]
        for boot in matched:
            boot.answered_by = peer_id
            if not boot.reached:
                boot.reached = True
                self.log.info("Reached bootstrap {spec}", spec=str(boot.spec))
                self.events.emit("bootstrap_reached", spec=str(boot.spec), peer_id=peer_id)
        if expected and not matched:
            self.metrics.inc("drops", reason="bootstrap_mismatch")
            self.log.warn(
                "Bootstrap {specs} answered as peer {peer_id}; not counted as reached",
                specs=", ".join(str(b.spec) for b in expected),
                peer_id=text,
            )

    # the socket

    def attach(self, transport, listen_udp=None) -> None:
        """
        Use C{transport} (the node's socket); with C{listen_udp}
        (C{reactor.listenUDP}) the node also carries tunnels
        (L{omerta.mesh.tunnel}).
        """
        self.transport = transport
        if listen_udp is not None and self.tunnels is None:
            from omerta.mesh.tunnel import TunnelPlane, grow_receive_buffer

            self.tunnels = TunnelPlane(self, listen_udp)
            grow_receive_buffer(transport)
        from omerta.mesh.tunnel import raw_sender

        self._sendto = raw_sender(transport)
        host = transport.getHost()
        self.local_port = host.port
        if not ipaddress.ip_address(host.host).is_unspecified:
            self._bound = (host.host, host.port)
        if self.relay is not None:
            self.relay.attach(transport)

    def use_opener(self, opener) -> None:
        """
        The socket's L{FrameOpener}: it learns this node's run in each
        network (frames addressed to anything else do not open) and, later,
        which runs of peers are proven (L{run_proven}).
        """
        self.opener = opener
        opener.proven = self._proven_source
        for overlay in self.overlays.values():
            opener.set_local(overlay.network_id, self.peer_id, overlay.sealer.boot)

    def _proven_source(self, network_id: bytes, sender: bytes, source) -> bool:
        """Whether a pong proved C{source} is C{sender}'s address in a network."""
        overlay = self.overlays.get(network_id)
        return overlay is not None and overlay.liveness.verified(sender, source)

    def misaddressed(self, network_id: bytes, sender: bytes, addr: Address, size: int) -> None:
        """
        A frame addressed to a run of this node that is not this one (we
        restarted) or tampered with: the sender may not know our run yet.
        """
        overlay = self.overlays.get(network_id)
        if overlay is not None:
            overlay.liveness.misaddressed(sender, addr, size)

    def run_proven(self, network_id: bytes, peer_id: bytes, boot: bytes) -> None:
        """
        An identity proof showed C{boot} is the peer's current run in a
        network: the socket refuses its earlier runs' frames from now on.
        """
        if self.opener is not None:
            self.opener.confirm(network_id, peer_id, boot)

    @contextmanager
    def hop_limit(self, hops: int):
        """
        Datagrams sent inside the block leave with an IP TTL (and IPv6 hop
        limit) of C{hops}; the socket's own value comes back after.  Without
        a real socket (a test transport) nothing changes.
        """
        sock = getattr(self.transport, "socket", None)
        options = [(socket.IPPROTO_IP, socket.IP_TTL)]
        if sock is not None and sock.family == socket.AF_INET6:
            options.append((socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS))
        saved = []
        for level, name in options if sock is not None else ():
            try:
                saved.append((level, name, sock.getsockopt(level, name)))
                sock.setsockopt(level, name, hops)
            except OSError:
                pass
        try:
            yield
        finally:
            for level, name, value in saved:
                sock.setsockopt(level, name, value)

    def hold_address(self, address: Address, hops: int) -> None:
        """
        Until L{release_address}, frames to C{address} leave with an IP TTL
        of C{hops}, or (0) are not sent (a hole punch waiting out the
        peer's router; L{omerta.mesh.punch}).
        """
        self._held[address] = hops

    def release_address(self, address: Address) -> None:
        self._held.pop(address, None)

    def send_frame(self, frame: bytes, address, msg_type: MessageType | None) -> float | None:
        """
        Put a sealed frame on the socket (through the relay of a relay
        route).  Returns when it was handed to the socket, the clock read
        just before: where a round trip starts (a ping's is measured from
        there to its pong's L{OpenedFrame.arrived}, so neither end's own
        building, sealing, opening nor decoding is counted in it).  None
        when it could not be sent.  Counted after it left.
        """
        relayed = type(address) is RelayRoute
        if relayed:
            frame = address.header + frame
            address = (address.host, address.port)
        elif self._held and address in self._held:
            hops = self._held[address]
            if not hops:
                self.metrics.inc("drops", reason="punch_quiet")
                return None
            with self.hop_limit(hops):
                return self._send_now(frame, address, msg_type, relayed)
        return self._send_now(frame, address, msg_type, relayed)

    def _send_now(self, frame: bytes, address, msg_type, relayed: bool) -> float | None:
        sent = self.clock.seconds()
        try:
            self._sendto(frame, address)
        except OSError as e:
            # e.g. no route to a candidate address during a hole punch
            self.metrics.inc("drops", reason="send_failed")
            self.log.debug("Send to {address} failed: {error}", address=address, error=e)
            return None
        if relayed:
            self.metrics.inc("frames_out_relayed")
        self.metrics.inc("frames_out", type="data" if msg_type is None else msg_type.name.lower())
        self.metrics.inc("bytes_out", len(frame))
        return sent

    def relay_route(self, header: bytes, addr: Address):
        """
        The session a relayed datagram with C{header} from C{addr} belongs
        to (a L{omerta.mesh.relayclient.ClientSession}), or None.
        """
        session = self.relay_routes.get(header)
        if session is None or session.route.relay_address != addr:
            return None
        return session

    # the relay role

    @property
    def relay_role(self) -> bool:
        return self.relay is not None

    def needs_relays(self) -> bool:
        """
        Whether this node should hold relay reservations: it is not on a
        public address (or its NAT is not discovered yet and it is no relay).
        """
        if self.nat is None:
            return not self.relay_role
        return self.nat.nat_type != NatType.PUBLIC

    def enable_relay(self, config=None) -> None:
        """
        Play the relay role (reservations, forwarding, punch coordination)
        on this node's socket.
        """
        from omerta.mesh.coordinator import Coordinator
        from omerta.mesh.relay import RelayServer

        self.relay = RelayServer(self, config)
        self.coordinator = Coordinator(self)
        self.capabilities |= Capability.RELAY | Capability.COORDINATOR
        if self.transport is not None:
            self.relay.attach(self.transport)

    def tunnel_received(self, frame: bytes, relay_session=None) -> None:
        """A TUNNEL_DATA frame (from C{relay_session} when relayed)."""
        if self.tunnels is None:
            self.metrics.inc("drops", reason="tunnel_not_carried")
            return
        self.tunnels.received(frame, relay_session)

    def frame_received(self, frame: OpenedFrame, addr: Address) -> None:
        overlay = self.overlays.get(frame.network_id)
        if overlay is None:
            self.metrics.inc("drops", reason="unknown_network")
            return
        overlay.frame_received(frame, addr)

    # our own address

    def observed_address(self, address: Address) -> None:
        """
        A peer told us (in a pong) the address our datagram came from.
        """
        if address != self._observed:
            self._observed = address

    def public_endpoints(self) -> list[Address]:
        """
        Addresses at which this node may be reachable directly, best first:
        the STUN-mapped one, the one peers observe, the bound one.
        """
        out: list[Address] = []
        mapped = None if self.nat is None else self.nat.mapped
        for address in (mapped, self._observed, self._bound):
            if address is not None and tuple(address) not in out:
                out.append(tuple(address))
        return out[:2]

    # lifecycle

    def start(self) -> None:
        if self.relay is not None:
            self.relay.start()
        for overlay in self.overlays.values():
            overlay.start()

    def stop(self) -> None:
        if self.tunnels is not None:
            self.tunnels.stop()
        if self.relay is not None:
            self.relay.stop()
        for overlay in self.overlays.values():
            overlay.stop()

    def overlay(self, network: bytes | str | None = None) -> Overlay:
        """
        The overlay of a network (by id bytes or hex); the only or first one
        when None.
        """
        if network is None:
            return next(iter(self.overlays.values()))
        if isinstance(network, str):
            network = bytes.fromhex(network)
        return self.overlays[network]

    # status

    STATUS_PEERS = 256
    """At most this many peers per network are listed in a status."""

    def status(self) -> dict:
        now = self.clock.seconds()
        networks = []
        peers = []
        for network_id, overlay in self.overlays.items():
            networks.append({
                "id": network_id.hex(),
                "peers": overlay.registry.statistics(),
                "active": len(overlay.liveness.links),
                "paths": overlay.paths.statistics(),
                "relays": overlay.relays.status(),
            })
            records = overlay.registry.all()
            if len(records) > self.STATUS_PEERS:
                # the active peers, then the most recently heard: the cost
                # of a status does not grow with idle records
                links = overlay.liveness.links
                records = heapq.nlargest(
                    self.STATUS_PEERS, records,
                    key=lambda r: (r.peer_id in links, r.last_heard or 0.0))
                networks[-1]["peers_omitted"] = len(overlay.registry) - len(records)
            for record in records:
                entry = record.as_dict(now)
                entry["network"] = network_id.hex()
                link = overlay.liveness.links.get(record.peer_id)
                entry["active"] = link is not None
                connection = overlay.paths.connection(record.peer_id)
                entry["path"] = None if connection is None else connection.as_dict()
                peers.append(entry)
        return {
            "peer_id": self.identity.peer_id_text,
            "name": self.name,
            "capabilities": capability_names(self.capabilities),
            "resources": dict(self.resources),
            "networks": [n["id"] for n in networks],
            "network_status": networks,
            "public_endpoints": [f"{h}:{p}" for h, p in self.public_endpoints()],
            "bootstrap": [{"spec": str(b.spec), "reached": b.reached} for b in self.bootstraps],
            "relay": None if self.relay is None else self.relay.status(),
            "tunnels": [] if self.tunnels is None else self.tunnels.status(),
            "peers": peers,
        }
