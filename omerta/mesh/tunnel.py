"""
The tunnel plane: WireGuard datagrams carried between members over the mesh.

A local WireGuard interface knows each remote member as a peer whose
endpoint is a loopback address owned by this node, one L{TunnelEndpoint}
per (network, peer, kind), the kind naming the local interface it serves
(L{TO_PROVIDER} on a provider, L{TO_CONSUMER} on a consumer).  What WireGuard sends there leaves as a
TUNNEL_DATA frame (L{omerta.wire.tunnel}) on whatever path the mesh has to
that peer now (direct, punched or relayed); what the peer sends back is
written to the local WireGuard port from that same loopback address.
WireGuard therefore never sees a path change: a failover to a relay or an
upgrade to a punched path moves the frames, not the endpoint.

    plane = node.tunnels
    # on a consumer, for the interface that reaches one provider's VMs
    endpoint = plane.open(network_id, provider_id, TO_CONSUMER, wg_port=device.listen_port)
    device.set_peer(provider_key, endpoint.address, [...])   # WireGuard's side
    ...
    plane.close(network_id, provider_id, TO_CONSUMER)

Frames are sealed with the per-pair session of L{omerta.mesh.messaging}
(one AEAD per datagram), so only that peer can have sent one; a frame for a
(peer, kind) with no endpoint here (a member this node holds no tunnel
with) is dropped and counted, as is a datagram reaching an endpoint from
anything but the local WireGuard port.  Until the session's handshake
completes a few datagrams wait (L{QUEUE_LIMIT}, L{QUEUE_TTL}); WireGuard
retransmits anything lost beyond that.

Per datagram the work is a struct pack or unpack, one AEAD and a dict
lookup; counters are plain integers on the endpoint, read by L{status}.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Callable

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.crypto.session import SessionError
from omerta.wire.tunnel import (HEADER, HEADER_SIZE, INNER_TYPE, KINDS, MAGIC_VERSION_TYPE,
                                TAG_SIZE, TO_CONSUMER, TO_PROVIDER, TUNNEL_DATA)

LOOPBACK = "127.0.0.1"
QUEUE_LIMIT = 16
"""Datagrams kept per endpoint while the pair's session is being set up."""
QUEUE_TTL = 3.0
"""Seconds a waiting datagram is kept before it is dropped."""
RETRY = 0.25
"""While datagrams wait, the session and path are looked at this often."""
PROBE_AFTER = 1.0
"""
Seconds of sending into a tunnel with nothing back from the peer before its
path is checked with a ping, then once per L{PROBE_AFTER} while that lasts: liveness counts the
unanswered ones and fails the path over after three in C{path_dead_after},
instead of waiting for the next keepalive (every 15 s).
"""
PROBE_FOR = 10.0
"""Probing stops when this end has sent nothing into the tunnel for this long."""
REPLAY_LIMIT = 64
"""
Datagrams sent since the peer was last heard, kept to be sent again on the
new path when the path changes (at most this many, the newest).  They were
most likely lost with the old path; WireGuard drops any it already has.  A
TCP sender in the tunnel gets its acknowledgements at once instead of at its
next backed-off retransmission, seconds later.
"""
KIND_NAMES = {TO_PROVIDER: "provider", TO_CONSUMER: "consumer"}
RECEIVE_BUFFER = 4 << 20
"""
Receive buffer of the node's socket and of each endpoint: room for a burst of
WireGuard datagrams (about 1,800 full ones); the system default (212 kB)
overflowed under a single TCP stream in the tunnel benchmark.
"""


def grow_receive_buffer(port, size: int = RECEIVE_BUFFER) -> None:
    """SO_RCVBUFFORCE (a node carrying tunnels runs as root), else SO_RCVBUF (capped)."""
    sock = getattr(port, "socket", None)
    if not hasattr(sock, "setsockopt"):
        return  # a simulated port
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue


def raw_sender(transport) -> Callable[[bytes, tuple], object]:
    """
    The socket's own C{sendto} when there is one: Twisted's C{Port.write}
    checks the address again on every datagram (three parses), which was a
    sixth of a node's time per tunnel datagram.  Addresses given to it are
    always IP literals (paths, loopback, relay routes).  Test transports
    keep their C{write}.
    """
    sock = getattr(transport, "socket", None)
    return sock.sendto if sock is not None else transport.write


class TunnelEndpoint(DatagramProtocol):
    """
    The loopback address the local WireGuard interface knows one remote peer
    by.  C{wg_port} is that interface's listen port: the only source this
    endpoint accepts datagrams from, and where the peer's datagrams go.
    """

    noisy = False

    def __init__(self, plane: TunnelPlane, network_id: bytes, peer_id: bytes, kind: int,
                 wg_port: int):
        self.plane = plane
        self.network_id = network_id
        self.peer_id = peer_id
        self.kind = kind
        self.host = plane.host
        self.wg_port = wg_port
        self.wg_address = (self.host, wg_port)
        self.port = None
        self.retry = None
        self.establish_after = 0.0
        self.waiting: deque[tuple[float, bytes]] = deque()
        self.frames_in = self.frames_out = 0
        self.bytes_in = self.bytes_out = 0
        self.last_in: float | None = None
        self.last_out: float | None = None
        self.probing = None
        self.unheard: deque[bytes] = deque(maxlen=REPLAY_LIMIT)

    @property
    def key(self) -> tuple[bytes, bytes, int]:
        return (self.network_id, self.peer_id, self.kind)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) to give WireGuard as this peer's endpoint."""
        return (self.host, self.port.getHost().port)

    def startProtocol(self) -> None:
        self._sendto = raw_sender(self.transport)

    def datagramReceived(self, datagram: bytes, addr) -> None:
        if addr[1] != self.wg_port or addr[0] != self.host:
            self.plane.metrics.inc("drops", reason="tunnel_foreign_source")
            return
        self.plane.send(self, datagram)

    def deliver(self, datagram: bytes, now: float) -> None:
        self.frames_in += 1
        self.bytes_in += len(datagram)
        self.last_in = now
        if self.unheard:
            self.unheard.clear()
        try:
            self._sendto(datagram, self.wg_address)
        except OSError:
            self.plane.metrics.inc("drops", reason="tunnel_deliver_failed")

    def status(self) -> dict:
        return {
            "network": self.network_id.hex(),
            "peer_id": format_peer_id(self.peer_id),
            "kind": KIND_NAMES[self.kind],
            "endpoint": "%s:%d" % self.address if self.port is not None else None,
            "wireguard_port": self.wg_port,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "last_in": self.last_in,
            "last_out": self.last_out,
            "waiting": len(self.waiting),
        }


class TunnelPlane:
    """
    Every tunnel endpoint of one node, and the frames between them and the
    mesh.

    @param node: the L{omerta.mesh.node.MeshNode} (its overlays hold the
        sessions and paths; its C{send_frame} puts frames on the socket).
    @param listen_udp: C{reactor.listenUDP}.
    @param host: the loopback address endpoints bind (a simulated host's own
        stand-in in tests).
    """

    log = Logger()

    def __init__(self, node, listen_udp: Callable, host: str = LOOPBACK):
        self.node = node
        self.host = host
        self.clock = node.clock
        self.metrics = node.metrics
        self._listen = listen_udp
        self.endpoints: dict[tuple[bytes, bytes, int], TunnelEndpoint] = {}
        node.events.subscribe("path_changed", self._path_changed)

    # the endpoints

    def open(self, network_id: bytes, peer_id: bytes, kind: int, wg_port: int) -> TunnelEndpoint:
        """
        The endpoint for C{peer_id} of C{kind}, bound on loopback if it is
        new; an existing one keeps its address and takes the new C{wg_port}.
        """
        if kind not in KINDS:
            raise ValueError(f"tunnel kind {kind} is not one of {KINDS}")
        if network_id not in self.node.overlays:
            raise KeyError(f"this node is not in network {network_id.hex()}")
        endpoint = self.endpoints.get((network_id, peer_id, kind))
        if endpoint is None:
            endpoint = TunnelEndpoint(self, network_id, peer_id, kind, wg_port)
            endpoint.port = self._listen(0, endpoint, interface=self.host)
            grow_receive_buffer(endpoint.port)
            self.endpoints[endpoint.key] = endpoint
            self.log.info("Tunnel endpoint {address} for {kind} {peer}",
                          address="%s:%d" % endpoint.address, kind=KIND_NAMES[kind],
                          peer=format_peer_id(peer_id))
        else:
            endpoint.wg_port = wg_port
            endpoint.wg_address = (self.host, wg_port)
        return endpoint

    def close(self, network_id: bytes, peer_id: bytes, kind: int) -> None:
        endpoint = self.endpoints.pop((network_id, peer_id, kind), None)
        if endpoint is None:
            return
        for call in (endpoint.retry, endpoint.probing):
            if call is not None and call.active():
                call.cancel()
        if endpoint.port is not None:
            endpoint.port.stopListening()

    def get(self, network_id: bytes, peer_id: bytes, kind: int) -> TunnelEndpoint | None:
        return self.endpoints.get((network_id, peer_id, kind))

    def stop(self) -> None:
        for key in list(self.endpoints):
            self.close(*key)

    # out: WireGuard -> mesh

    def send(self, endpoint: TunnelEndpoint, datagram: bytes) -> None:
        overlay = self.node.overlays.get(endpoint.network_id)
        if overlay is None:
            return
        now = self.clock.seconds()
        peer_id = endpoint.peer_id
        session = overlay.messaging.sessions.get(peer_id, now)
        address = overlay.paths.address_of(peer_id) if session is not None else None
        if address is None:
            self._wait(overlay, endpoint, datagram, now)
            return
        if endpoint.waiting:
            self._flush(endpoint, now)
        self._transmit(endpoint, session, address, datagram, now)
        if endpoint.probing is None and now - (endpoint.last_in or 0.0) > PROBE_AFTER:
            self._probe(endpoint)

    def _probe(self, endpoint: TunnelEndpoint) -> None:
        """
        Ping the peer on the current path each L{PROBE_AFTER} seconds for as
        long as this end sent into the tunnel lately and heard nothing back
        since: a sender backing off (TCP's doubling timeouts) sends too
        seldom to carry the probes itself.
        """
        endpoint.probing = None
        if self.endpoints.get(endpoint.key) is not endpoint:
            return
        now = self.clock.seconds()
        last_in, last_out = endpoint.last_in or 0.0, endpoint.last_out or 0.0
        if now - last_in <= PROBE_AFTER or last_in >= last_out or now - last_out > PROBE_FOR:
            return
        overlay = self.node.overlays.get(endpoint.network_id)
        address = None if overlay is None else overlay.paths.address_of(endpoint.peer_id)
        if address is not None:
            overlay.liveness.ping(endpoint.peer_id, address)
        endpoint.probing = self.clock.callLater(PROBE_AFTER, self._probe, endpoint)

    def _transmit(self, endpoint, session, address, datagram: bytes, now: float,
                  again: bool = False) -> None:
        try:
            sealed = session.seal(INNER_TYPE, bytes((3 - endpoint.kind,)) + datagram)
        except SessionError:
            self.metrics.inc("drops", reason="tunnel_session_exhausted")
            return
        frame = HEADER.pack(*MAGIC_VERSION_TYPE, sealed["session_id"], sealed["counter"])
        self.node.send_frame(frame + sealed["sealed"], address, None)
        endpoint.frames_out += 1
        endpoint.bytes_out += len(datagram)
        endpoint.last_out = now
        if not again:
            endpoint.unheard.append(datagram)

    def _path_changed(self, network: bytes, peer_id: bytes, **_) -> None:
        for kind in KINDS:
            endpoint = self.endpoints.get((network, peer_id, kind))
            if endpoint is not None and endpoint.unheard:
                # the link moves after the event: send on the next turn
                self.clock.callLater(0, self._replay, endpoint)

    def _replay(self, endpoint: TunnelEndpoint) -> None:
        """What was sent since the peer was last heard goes again, on the new path."""
        overlay = self.node.overlays.get(endpoint.network_id)
        if self.endpoints.get(endpoint.key) is not endpoint or overlay is None:
            return
        now = self.clock.seconds()
        session = overlay.messaging.sessions.get(endpoint.peer_id, now)
        address = overlay.paths.address_of(endpoint.peer_id)
        if session is None or address is None:
            return
        for datagram in list(endpoint.unheard):
            self._transmit(endpoint, session, address, datagram, now, again=True)
        self.metrics.inc("tunnel_replayed", len(endpoint.unheard))

    def _wait(self, overlay, endpoint: TunnelEndpoint, datagram: bytes, now: float) -> None:
        """
        Keep C{datagram} until the pair has a session and a path: start
        both (a handshake; the path manager's every way to the peer when
        there is no live link) and look again every L{RETRY} seconds.
        """
        waiting = endpoint.waiting
        while waiting and (len(waiting) >= QUEUE_LIMIT or now - waiting[0][0] > QUEUE_TTL):
            waiting.popleft()
            self.metrics.inc("drops", reason="tunnel_no_session")
        waiting.append((now, datagram))
        self._prepare(overlay, endpoint, now)

    def _prepare(self, overlay, endpoint: TunnelEndpoint, now: float) -> None:
        peer_id = endpoint.peer_id
        if peer_id not in overlay.liveness.links and now >= endpoint.establish_after:
            endpoint.establish_after = now + 1.0
            overlay.paths.establish(peer_id)
        overlay.messaging.ensure_session(peer_id)
        if endpoint.retry is None or not endpoint.retry.active():
            endpoint.retry = self.clock.callLater(RETRY, self._again, endpoint)

    def _again(self, endpoint: TunnelEndpoint) -> None:
        endpoint.retry = None
        if self.endpoints.get(endpoint.key) is not endpoint or not endpoint.waiting:
            return
        now = self.clock.seconds()
        self._flush(endpoint, now)
        while endpoint.waiting and now - endpoint.waiting[0][0] > QUEUE_TTL:
            endpoint.waiting.popleft()
            self.metrics.inc("drops", reason="tunnel_no_session")
        overlay = self.node.overlays.get(endpoint.network_id)
        if endpoint.waiting and overlay is not None:
            self._prepare(overlay, endpoint, now)

    def _flush(self, endpoint: TunnelEndpoint, now: float) -> None:
        overlay = self.node.overlays.get(endpoint.network_id)
        if overlay is None:
            return
        session = overlay.messaging.sessions.get(endpoint.peer_id, now)
        address = overlay.paths.address_of(endpoint.peer_id)
        if session is None or address is None:
            return
        waiting, endpoint.waiting = endpoint.waiting, deque()
        for queued, datagram in waiting:
            if now - queued <= QUEUE_TTL:
                self._transmit(endpoint, session, address, datagram, now)

    def session_ready(self, network_id: bytes, peer_id: bytes) -> None:
        """The pair's session is usable: what waited for it leaves now."""
        now = self.clock.seconds()
        for kind in KINDS:
            endpoint = self.endpoints.get((network_id, peer_id, kind))
            if endpoint is not None and endpoint.waiting:
                self._flush(endpoint, now)

    # in: mesh -> WireGuard

    def received(self, frame: bytes, relay_session=None) -> None:
        """
        A TUNNEL_DATA frame from the socket, or the payload of relayed data
        of C{relay_session} (whose peer must then be the frame's sender).
        """
        metrics = self.metrics
        if len(frame) < HEADER_SIZE + 2 + TAG_SIZE:
            metrics.inc("drops", reason="tunnel_malformed")
            return
        session_id, counter = HEADER.unpack_from(frame)[3:]
        found = None
        for network_id, overlay in self.node.overlays.items():
            session = overlay.messaging.sessions.by_id(session_id)
            if session is not None:
                found = (network_id, overlay, session)
                break
        if found is None:
            metrics.inc("drops", reason="tunnel_unknown_session")
            return
        network_id, overlay, session = found
        if relay_session is not None and (relay_session.peer_id != session.peer_id
                                          or relay_session.network_id != network_id):
            metrics.inc("drops", reason="relay_sender_mismatch")
            return
        was_confirmed = session.confirmed
        try:
            inner, body = session.open({"session_id": session_id, "counter": counter,
                                        "sealed": frame[HEADER_SIZE:]})
        except SessionError as e:
            metrics.inc("drops", reason=f"tunnel_{e.reason}")
            return
        if inner != INNER_TYPE or not body:
            metrics.inc("drops", reason="tunnel_malformed")
            return
        peer_id = session.peer_id
        if not was_confirmed:
            overlay.messaging.confirmed(peer_id)
        endpoint = self.endpoints.get((network_id, peer_id, body[0]))
        if endpoint is None:
            metrics.inc("drops", reason="tunnel_no_endpoint")
            return
        endpoint.deliver(body[1:], self.clock.seconds())

    # status

    def status(self) -> list[dict]:
        return [e.status() for e in self.endpoints.values()]


__all__ = ["LOOPBACK", "TunnelEndpoint", "TunnelPlane", "TO_CONSUMER", "TO_PROVIDER",
           "TUNNEL_DATA"]
