"""
The datagram protocol on a node's single UDP socket.

It is a thin adapter: classify the datagram, open omerta frames, hand what is
valid to a controller and count everything else.  C{datagramReceived} never
raises.

Every frame handed on carries when its datagram arrived
(L{OpenedFrame.arrived}): the kernel's receive timestamp, as ping(8) takes
it, else the clock read before the frame is opened.  A round trip measured
to there is the path's and the peer's, not this process waking up, the
reactor finding the socket, nor this node opening and decoding the answer.
The per-datagram counters are updated after the frame was handled, so an
answer (a pong) is on its way first: after an idle spell every line on the
path runs from cold caches, and the counters are a fifth of the receive
path's time then.
"""

from __future__ import annotations

import fcntl
import struct
from typing import Callable, Protocol as TypingProtocol

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from omerta.crypto.sealing import FrameOpener, FrameRejected, OpenedFrame
from omerta.metrics import Metrics
from omerta.wire.demux import Kind, classify
from omerta.wire.envelope import MAGIC
from omerta.wire.relay import HEADER_SIZE as RELAY_HEADER_SIZE
from omerta.wire.relay import PREFIX as RELAY_PREFIX
from omerta.wire.tunnel import PREFIX as TUNNEL_PREFIX

Address = tuple[str, int]

SIOCGSTAMPNS = 0x8907
"""
Linux ioctl: the kernel's receive time (a timespec, wall clock) of the last
datagram read from a socket.  The first call on a socket switches the
stamping on (and fails: nothing stamped yet).
"""
_TIMESPEC = struct.Struct("@qq")
_NO_TIMESPEC = bytes(_TIMESPEC.size)


class FrameHandler(TypingProtocol):
    clock: object  # IReactorTime: arrival times, unless the protocol is given a clock

    def frame_received(self, frame: OpenedFrame, addr: Address) -> None: ...

    def relay_route(self, header: bytes, addr: Address): ...

    def tunnel_received(self, frame: bytes, relay_session=None) -> None: ...


class NodeProtocol(DatagramProtocol):
    """
    Demultiplexes STUN, omerta frames and junk arriving on one socket.

    @param stun_handler: called with C{(datagram, addr)} for STUN messages, or
        None when the node does not speak STUN yet (they are then counted as
        dropped with reason C{stun_unhandled}).
    @param clock: an C{IReactorTime}, what frames' arrival times are read
        on (L{arrival_clock}); the handler's C{clock} when None (none there
        either: frames carry no arrival time).
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        opener: FrameOpener,
        handler: FrameHandler,
        metrics: Metrics,
        stun_handler: Callable[[bytes, Address], None] | None = None,
        clock=None,
    ):
        self.opener = opener
        self.handler = handler
        self.metrics = metrics
        self.stun_handler = stun_handler
        self.relay = None  # a RelayServer: relayed data it forwards never goes further
        self.clock = clock if clock is not None else getattr(handler, "clock", None)
        self._arrived = self._clock_time

    def startProtocol(self) -> None:
        self._arrived = arrival_clock(self.transport, self._clock_time)

    def stopProtocol(self) -> None:
        self._arrived = self._clock_time

    def _clock_time(self) -> float | None:
        return None if self.clock is None else self.clock.seconds()

    def datagramReceived(self, datagram: bytes, addr) -> None:
        try:
            if datagram.startswith(RELAY_PREFIX):
                # The relayed-data fast path: a dict lookup and a send.
                relay = self.relay
                if relay is None or not relay.forward(datagram, addr):
                    self._relayed(datagram, (addr[0], addr[1]))
                return
            if datagram.startswith(TUNNEL_PREFIX):
                # Tunnel data: opened with the pair's session, not the network key.
                self.handler.tunnel_received(datagram)
                return
            self._dispatch(datagram, (addr[0], addr[1]))
        except Exception:
            self.metrics.inc("drops", reason="internal_error")
            self.log.failure("Error handling a datagram from {addr}", addr=addr)

    def _relayed(self, datagram: bytes, addr: Address) -> None:
        """
        Relayed data for this node: open the payload and hand it on as a
        frame from the session's peer, arrived over the session's route.
        """
        metrics = self.metrics
        opened = handed = False
        try:
            session = self.handler.relay_route(datagram[:RELAY_HEADER_SIZE], addr)
            if session is None:
                metrics.inc("drops", reason="relay_unknown_session")
                return
            if datagram.startswith(TUNNEL_PREFIX, RELAY_HEADER_SIZE):
                self.handler.tunnel_received(datagram[RELAY_HEADER_SIZE:], session)
                return
            frame = self._open(datagram[RELAY_HEADER_SIZE:], session.route, self._arrived())
            if frame is None:
                return
            opened = True
            if frame.sender != session.peer_id or frame.network_id != session.network_id:
                metrics.inc("drops", reason="relay_sender_mismatch")
                return
            handed = True
            self.handler.frame_received(frame, session.route)
        finally:
            self._count(len(datagram), opened)
            if handed:
                metrics.inc("frames_in_relayed")

    def _open(self, datagram: bytes, addr, arrived: float | None) -> OpenedFrame | None:
        """
        Open a sealed frame, or count why not and return None.
        """
        try:
            return self.opener.open(datagram, arrived, addr)
        except FrameRejected as e:
            self.metrics.inc("drops", reason=e.reason)
            if e.reason == "misaddressed":
                self.handler.misaddressed(e.header.network_id, e.header.sender, addr,
                                          len(datagram))
            return None

    def _dispatch(self, datagram: bytes, addr: Address) -> None:
        opened = False
        try:
            if datagram.startswith(MAGIC):
                frame = self._open(datagram, addr, self._arrived())
                if frame is not None:
                    opened = True
                    self.handler.frame_received(frame, addr)
            else:
                self._not_a_frame(datagram, addr)
        finally:
            self._count(len(datagram), opened)

    def _not_a_frame(self, datagram: bytes, addr: Address) -> None:
        metrics = self.metrics
        if classify(datagram) is Kind.STUN:
            if self.stun_handler is None:
                metrics.inc("drops", reason="stun_unhandled")
            else:
                metrics.inc("stun_in")
                self.stun_handler(datagram, addr)
        else:
            metrics.inc("drops", reason="junk")

    def _count(self, size: int, opened: bool) -> None:
        """One datagram of C{size} bytes taken up; C{opened}: a frame that opened."""
        metrics = self.metrics
        metrics.inc("packets_in")
        metrics.inc("bytes_in", size)
        if opened:
            metrics.inc("frames_in")


def arrival_clock(transport, now: Callable[[], float | None],
                  ioctl=None) -> Callable[[], float | None]:
    """
    How to read when the datagram being handled arrived: the kernel's
    receive timestamp (L{SIOCGSTAMPNS}) when C{transport} has a socket,
    else C{now()}.  The kernel's stamp is wall-clock time, so it is taken
    only while it agrees with C{now()} (a real reactor's clock) to within a
    second; otherwise, or when the socket has none, C{now()} is.
    """
    fileno = getattr(getattr(transport, "socket", None), "fileno", None)
    if fileno is None:  # no socket (a test's or the simulator's transport)
        return now
    ioctl = ioctl if ioctl is not None else fcntl.ioctl
    fd = fileno()
    try:
        ioctl(fd, SIOCGSTAMPNS, _NO_TIMESPEC)  # switches the stamping on
    except OSError:
        pass

    def arrived() -> float | None:
        current = now()
        try:
            seconds, nanoseconds = _TIMESPEC.unpack(ioctl(fd, SIOCGSTAMPNS, _NO_TIMESPEC))
        except OSError:
            return current
        stamp = seconds + nanoseconds * 1e-9
        if current is None or not 0.0 <= current - stamp < 1.0:
            return current
        return stamp

    return arrived
