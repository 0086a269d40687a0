"""
Everything one node does in one network: the registry of its members,
gossip, liveness, freshness, messaging, and the path seam.  A node in several
networks has one L{Overlay} per network on its single socket.
"""

from __future__ import annotations

import random
from pathlib import Path

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from omerta import storage
from omerta.crypto.network import NetworkKey
from omerta.crypto.proof import Prover
from omerta.crypto.sealing import FrameSealer, OpenedFrame
from omerta.mesh.antientropy import AntiEntropy
from omerta.mesh.context import Basics
from omerta.mesh.freshness import Freshness
from omerta.mesh.gossip import Gossip
from omerta.mesh.liveness import Liveness
from omerta.mesh.membership import Membership
from omerta.mesh.messaging import Messaging
from omerta.mesh.paths import PathManager
from omerta.mesh.peer import Connections, is_relayed
from omerta.mesh.punch import Puncher
from omerta.mesh.relayclient import RelayClient
from omerta.mesh.registry import PeerRegistry
from omerta.wire import ParseError
from omerta.wire.envelope import MIN_FRAME_SIZE
from omerta.wire.messages import MessageType, RelayDenyReason, build_body, parse_body
from omerta.wire.relay import session_header




class Overlay:
    log = Logger()

    def __init__(self, node, key: NetworkKey, rng: random.Random | None = None):
        self.node = node
        self.key = key
        self.network_id = key.network_id
        self.config = node.config
        self.clock = node.clock
        self.metrics = node.metrics
        self.events = node.events
        rng = rng or random.Random()
        self.sealer = FrameSealer(key, node.peer_id)
        self.basics = Basics(self.network_id, node.peer_id, self.config, self.clock,
                             self.metrics, self.send, self.send_to, self._emit,
                             Prover(node.identity, self.network_id, self.sealer.boot))
        self.registry = PeerRegistry(self.network_id, node.peer_id,
                                     max_peers=self.config.max_peers, events=node.events,
                                     max_ttl_s=max(7200, 2 * self.config.announce_ttl))
        self.connections = Connections(self._emit, self._transmit,
                                       limit=min(self.config.max_peers, 4096))
        # The one place the components are wired.  Each takes Basics and
        # the collaborators it names; a lambda stands for one built later
        # (the graph has cycles: liveness reports dead paths to the path
        # manager, which moves liveness links).
        self.freshness = Freshness(
            self.basics, rng=rng,
            targets=lambda n, r: self.liveness.gossip_targets(n, r),
            ping=lambda peer_id, address: self.liveness.ping(peer_id, address),
            candidate=lambda peer_id, address, heard: self.paths.candidate(peer_id, address, heard))
        self.relays = RelayClient(
            self.basics, self.registry, node.relay_routes,
            needs_relays=node.needs_relays,
            direct_address=lambda peer_id: self.paths.direct_address(peer_id),
            reannounce=lambda: self.gossip.reannounce(),
            session_opened=lambda peer, route, requested: self.paths.relay_session_opened(
                peer, route, requested),
            session_closed=lambda peer, route: self.paths.relay_session_closed(peer, route),
            ping_relay=lambda relay_id, address: self.liveness.ping(relay_id, address,
                                                                    contacts=False))
        self.liveness = Liveness(
            self.basics, self.connections, self.registry, self.freshness, rng=rng,
            path_failed=lambda link: self.paths.path_failed(link),
            known_addresses=lambda peer_id: self.paths.known_addresses(peer_id),
            address_of=lambda peer_id: self.paths.link_address(peer_id),
            relay_of=self.relays.relay_of,
            announce_to=lambda address: self.gossip.announce_to(address),
            observed_address=node.observed_address,
            address_proven=self.address_proven,
            run_proven=self.run_proven,
            unreachable=lambda peer_id: self.membership.suspect(peer_id),
            restarted=lambda peer_id: self.relays.peer_restarted(peer_id),
            challenged=lambda peer_id: self.relays.challenged(peer_id))
        self.paths = PathManager(
            self.basics, self.connections, self.registry,
            liveness=self.liveness, relays=self.relays, freshness=self.freshness,
            punch=lambda peer_id, coordinator: self.punch.request(peer_id, coordinator),
            announce_to=lambda address: self.gossip.announce_to(address),
            local_port=lambda: node.local_port,
            path_ready=lambda peer_id: self.messaging.path_ready(peer_id))
        self.punch = Puncher(
            self.basics, self.registry, nat=lambda: self.node.nat,
            nat_hops=lambda: self.node.nat_hops,
            local_port=lambda: self.node.local_port,
            public_endpoints=lambda: self.node.public_endpoints(),
            proven=lambda peer, address, boot: self.liveness.proven(peer, address, boot),
            holds_reservation=lambda relay_id: relay_id in self.relays.held,
            on_punched=lambda peer, address: self.paths.use_punched(peer, address),
            hold=node.hold_address, release=node.release_address)
        self.gossip = Gossip(
            self.basics, self.registry, node, rng=rng,
            targets=lambda n, r: self.liveness.gossip_targets(n, r),
            verified=lambda peer_id, address: self.liveness.verified(peer_id, address),
            active_link=lambda peer_id: self.liveness.links.get(peer_id),
            own_endpoints=self.own_endpoints, own_relayed_paths=self.own_relayed_paths,
            bootstrap_answered=self.bootstrap_answered,
            gone_known=lambda peer_id, address: self.membership.tell(peer_id, address))
        self.membership = Membership(
            self.basics, self.registry, rng=rng,
            own_sequence=lambda: self.gossip.sequence,
            refute=self.gossip.refute,
            targets=lambda n, r: self.liveness.gossip_targets(n, r),
            link_address=self.liveness.address_of,
            drop_link=self.liveness.drop,
            health=self.liveness.health)
        self.antientropy = AntiEntropy(
            self.basics, self.registry, rng=rng,
            own_sequence=lambda: self.gossip.sequence,
            targets=lambda n, r: self.liveness.gossip_targets(n, r),
            verified=self.liveness.verified,
            send_records=lambda address, records: self.gossip.send_peer_list(
                address, request=False, records=records),
            tell_gone=self.membership.tell)
        self.messaging = Messaging(self)
        self._loops: list[LoopingCall] = []
        self._handlers = {
            MessageType.PING: self.liveness.on_ping,
            MessageType.PONG: self.liveness.on_pong,
            MessageType.INDIRECT_PING: self.liveness.on_indirect_ping,
            MessageType.INDIRECT_ACK: self.liveness.on_indirect_ack,
            MessageType.ANNOUNCE: self.gossip.on_announce,
            MessageType.PEER_LIST: self.gossip.on_peer_list,
            MessageType.MEMBERSHIP: self.membership.on_membership,
            MessageType.SYNC_DIGEST: self.antientropy.on_digest,
            MessageType.SYNC_SUMMARY: self.antientropy.on_summary,
            MessageType.FRESHNESS_QUERY: self.freshness.on_query,
            MessageType.FRESHNESS_ANSWER: self.freshness.on_answer,
            MessageType.PATH_FAILED: self.freshness.on_path_failed,
            MessageType.HANDSHAKE_INIT: self.messaging.on_handshake_init,
            MessageType.HANDSHAKE_RESP: self.messaging.on_handshake_resp,
            MessageType.SESSION_DATA: self.messaging.on_session_data,
            MessageType.RELAY_RESERVE: self._relay_role("on_reserve"),
            MessageType.RELAY_CONNECT: self._relay_role("on_connect"),
            MessageType.RELAY_ACCEPT: self.relays.on_accept,
            MessageType.RELAY_DENY: self.relays.on_deny,
            MessageType.RELAY_SESSION: self.relays.on_session,
            MessageType.RELAY_END: self._relay_end,
            MessageType.PUNCH_REQUEST: self._coordinator("on_request"),
            MessageType.PUNCH_RESULT: self._coordinator("on_result"),
            MessageType.PUNCH_READY: self._coordinator("on_ready"),
            MessageType.PUNCH_EXECUTE: self.punch.on_execute,
            MessageType.PUNCH_PROBE: self.punch.on_probe,
            MessageType.PUNCH_ACK: self.punch.on_ack,
        }

    def _relay_role(self, method: str):
        def handle(frame, addr, message):
            relay = self.node.relay
            if relay is None:
                if method == "on_reserve" and message.lifetime_s == 0:
                    return
                self.metrics.inc("relay_denied", reason="not_a_relay")
                if not self.liveness.verified(frame.sender, addr):
                    return  # a refusal is larger than the request: none to unproven addresses
                self.send(addr, MessageType.RELAY_DENY, request=int(frame.type),
                          target=getattr(message, "target", bytes(16)),
                          reason=int(RelayDenyReason.NOT_A_RELAY), detail="not a relay")
                return
            getattr(relay, method)(self, frame, addr, message)
        return handle

    def _coordinator(self, method: str):
        def handle(frame, addr, message):
            coordinator = self.node.coordinator
            if coordinator is None:
                self.metrics.inc("drops", reason="not_a_coordinator")
                return
            getattr(coordinator, method)(self, frame, addr, message)
        return handle

    def _relay_end(self, frame, addr, message) -> None:
        relay = self.node.relay
        if relay is not None and not is_relayed(addr):
            if session_header(message.session) in relay.sessions:
                relay.on_end(self, frame, addr, message)
                return
        self.relays.on_end(frame, addr, message)

    # sending

    def send(self, address: tuple, msg_type: MessageType, **fields) -> float | None:
        """Returns when the frame was handed to the socket (L{MeshNode.send_frame})."""
        frame = self.sealer.seal(msg_type, build_body(msg_type, fields),
                                 self.liveness.destination(address))
        return self.node.send_frame(frame, address, msg_type)

    def send_to(self, peer_id: bytes, address, msg_type: MessageType, **fields) -> float | None:
        """L{send} for a message meant for C{peer_id} (whoever else an address was proven for)."""
        frame = self.sealer.seal(msg_type, build_body(msg_type, fields),
                                 self.liveness.destination(address, peer_id))
        return self.node.send_frame(frame, address, msg_type)

    def _transmit(self, frame: bytes, address) -> None:
        self.node.send_frame(frame, address, None)

    def _emit(self, kind: str, **data) -> None:
        self.events.emit(kind, network=self.network_id, **data)

    # receiving

    def frame_received(self, frame: OpenedFrame, addr: tuple) -> None:
        handler = self._handlers.get(frame.type)
        if handler is None:
            self.metrics.inc("drops", reason="unhandled_type")
            return
        try:
            message = parse_body(frame.type, frame.body)
        except ParseError:
            self.metrics.inc("drops", reason="malformed_body")
            return
        answer_first = frame.type == MessageType.PING
        if answer_first:
            # the pong leaves before the bookkeeping (a round trip measures
            # the path and the answer, not what we note about the sender)
            handler(frame, addr, message)
        now = self.clock.seconds()
        sender = frame.sender
        size = MIN_FRAME_SIZE + len(frame.body)
        link = self.liveness.heard(sender, addr, now, size, frame.boot)
        if link is not None and link.verified:
            if is_relayed(addr):
                self.registry.heard_from(sender, None, now)
            else:
                # Only a proven address becomes what others are told.
                self.freshness.heard(sender, addr, now)
                self.registry.heard_from(sender, addr, now)
            record = self.registry.get(sender)
            if record is not None and record.state == "offline":
                # declared gone, yet here it is: it should refute
                self.membership.tell(sender, addr)
        if not answer_first:
            handler(frame, addr, message)

    def run_proven(self, peer_id: bytes, boot: bytes) -> None:
        """
        An identity proof showed C{boot} is the peer's current run: frames
        of its earlier runs are refused from now on.
        """
        self.node.run_proven(self.network_id, peer_id, boot)

    def address_proven(self, peer_id: bytes, addr: tuple) -> None:
        """
        A pong proved C{addr} leads to C{peer_id} (for the first time): record
        it and send our announcement.  A node that still knows few peers (it
        just started) also asks for the peer's whole list; an established one
        relies on rumours and the periodic sync, so contacts cost O(1), not
        O(mesh size).
        """
        now = self.clock.seconds()
        if is_relayed(addr):
            self.registry.heard_from(peer_id, None, now)
        else:
            self.freshness.heard(peer_id, addr, now)
            self.registry.heard_from(peer_id, addr, now)
            if self.node.relay is not None:
                # a member proven somewhere new: its reservation here follows
                self.node.relay.holder_proven(self.network_id, peer_id, addr)
        self.gossip.announce_to(addr)
        if len(self.registry) < self.config.degree:
            self.gossip.send_peer_list(addr, request=True, peer_id=peer_id)

    # what the node tells us

    def own_endpoints(self) -> list[tuple]:
        return self.node.public_endpoints()

    def own_relayed_paths(self) -> list[dict]:
        return self.relays.own_paths()

    def observed_address(self, address: tuple) -> None:
        self.node.observed_address(address)

    def bootstrap_answered(self, addr: tuple, peer_id: bytes) -> None:
        self.node.bootstrap_answered(addr, peer_id)

    # lifecycle

    def start(self) -> None:
        config = self.config
        for function, interval in (
            (self.gossip.round, config.gossip_interval),
            (self.membership.round, config.gossip_interval),
            (self.liveness.tick, config.liveness_tick),
            (self.tick, 1.0),
            (self.gossip.reannounce, config.reannounce),
            (self.antientropy.sync, config.sync_interval),
            (self.liveness.reconnect, config.reconnect_interval),
        ):
            loop = LoopingCall(function)
            loop.clock = self.clock
            loop.start(interval, now=False).addErrback(
                lambda f, name=function.__name__: self.log.failure(
                    "Periodic {name} failed", f, name=name)
            )
            self._loops.append(loop)

    def tick(self) -> None:
        now = self.clock.seconds()
        self.relays.tick()
        self.paths.tick()
        self.registry.expire(now)
        self.registry.cleanup_offline(now, self.config.offline_cleanup)
        self.messaging.sessions.expire(now)

    def stop(self) -> None:
        if self._loops:
            self.membership.leave()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        self.liveness.stop()
        self.freshness.stop()
        self.messaging.stop()
        self.punch.stop()
        self.relays.stop()

    # persistence

    def peers_file(self, data_dir: Path) -> Path:
        return Path(data_dir) / f"peers-{self.network_id.hex()}.json"

    def load_peers(self, data_dir: Path) -> None:
        path = self.peers_file(data_dir)
        if path.exists():
            try:
                self.registry.load(path, self.clock.seconds())
            except storage.StateFileError as e:
                self.log.warn("Known peers not loaded: {error}", error=str(e))

    def save_peers(self, data_dir: Path) -> None:
        self.registry.save(self.peers_file(data_dir))
