"""
Where a round trip starts and ends: a frame leaves the socket at a time
L{MeshNode.send_frame} returns and arrives at a time the socket protocol
stamps on it (L{OpenedFrame.arrived}: the kernel's receive timestamp, else
the clock, before it is opened); the counters of both are updated after the
frame was sent or handled, off the answer's path.  (Time comes from a Clock
and a fake ioctl; how fast it is is measured by scripts/bench/mesh_ping.py
only.)
"""

import errno
import fcntl
import struct
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.crypto.identity import Identity
from omerta.crypto.network import NetworkKey
from omerta.crypto.sealing import FrameOpener, FrameSealer
from omerta.mesh.node import MeshNode
from omerta.mesh.peer import RelayRoute
from omerta.mesh.protocol import SIOCGSTAMPNS, NodeProtocol, arrival_clock
from omerta.metrics import Metrics
from omerta.wire.messages import MessageType
from omerta.wire.relay import session_header

KEY = NetworkKey(bytes(32))
SENDER = b"S" * 16
ADDR = ("127.0.0.1", 5000)
RELAY = ("127.0.0.1", 7400)


class Handler:
    """A controller that records each frame, and what the counters said then."""

    def __init__(self, metrics: Metrics, clock=None, fail: bool = False):
        if clock is not None:
            self.clock = clock
        self.metrics = metrics
        self.fail = fail
        self.frames = []
        self.counted_then = []
        self.routes = {}

    def frame_received(self, frame, addr):
        self.frames.append((frame, addr))
        self.counted_then.append(
            {k: self.metrics.get(k) for k in ("packets_in", "bytes_in", "frames_in")})
        if self.fail:
            raise RuntimeError("controller bug")

    def relay_route(self, header, addr):
        return self.routes.get(header)

    def misaddressed(self, network_id, sender, addr, size):
        pass


def frame(body: bytes = b"pong") -> bytes:
    return FrameSealer(KEY, SENDER).seal(int(MessageType.PONG), body)


class ArrivalTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics()
        self.handler = Handler(self.metrics, clock=self.clock)
        self.protocol = NodeProtocol(FrameOpener({KEY.network_id: KEY}), self.handler,
                                     self.metrics)

    def test_a_frame_carries_when_it_arrived(self):
        """A frame handed on carries the clock's time when its datagram was taken up."""
        self.clock.advance(12.5)
        self.protocol.datagramReceived(frame(), ADDR)
        self.clock.advance(1)
        self.protocol.datagramReceived(frame(), ADDR)
        self.assertEqual([f.arrived for f, _ in self.handler.frames], [12.5, 13.5])

    def test_the_handlers_clock_unless_one_is_given(self):
        """The protocol reads the handler's clock by default; a clock given to it wins."""
        own = Clock()
        own.advance(99)
        protocol = NodeProtocol(FrameOpener({KEY.network_id: KEY}), self.handler,
                                self.metrics, clock=own)
        protocol.datagramReceived(frame(), ADDR)
        self.assertEqual(self.handler.frames[0][0].arrived, 99)

    def test_no_clock_no_arrival(self):
        """Without a clock anywhere, frames carry no arrival time (None)."""
        handler = Handler(self.metrics)
        NodeProtocol(FrameOpener({KEY.network_id: KEY}), handler, self.metrics) \
            .datagramReceived(frame(), ADDR)
        self.assertIsNone(handler.frames[0][0].arrived)

    def test_a_relayed_frame_carries_when_it_arrived(self):
        """A frame that came through a relay session is stamped the same way."""
        header = session_header(bytes(range(8)))
        route = RelayRoute(RELAY[0], RELAY[1], header)
        self.handler.routes[header] = SimpleNamespace(
            route=route, peer_id=SENDER, network_id=KEY.network_id)
        self.clock.advance(3.25)
        self.protocol.datagramReceived(header + frame(), RELAY)
        [(opened, addr)] = self.handler.frames
        self.assertEqual((opened.arrived, addr), (3.25, route))
        self.assertEqual(self.metrics.get("frames_in_relayed"), 1)

    def test_the_opener_carries_the_arrival(self):
        """FrameOpener.open puts the arrival time it is given on the opened frame."""
        opener = FrameOpener({KEY.network_id: KEY})
        self.assertEqual(opener.open(frame(), 7.0).arrived, 7.0)
        self.assertIsNone(opener.open(frame()).arrived)


class KernelStamps:
    """
    A fake C{fcntl.ioctl} for SIOCGSTAMPNS: the first call on a socket fails
    (nothing stamped yet), later ones answer C{stamp} (None: fail too).
    """

    def __init__(self, stamp):
        self.stamp = stamp
        self.calls = []

    def __call__(self, fd, request, argument):
        assert request == SIOCGSTAMPNS and len(argument) == 16
        self.calls.append(fd)
        if len(self.calls) == 1 or self.stamp is None:
            raise OSError(errno.ENOENT, "No such file or directory")
        seconds = int(self.stamp)
        return struct.pack("@qq", seconds, round((self.stamp - seconds) * 1e9))


def with_socket(fd: int = 7):
    return SimpleNamespace(socket=SimpleNamespace(fileno=lambda: fd),
                           write=lambda datagram, address: None)


class KernelStampTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000.0)

    def test_the_kernels_stamp(self):
        """With a socket, the arrival is the kernel's receive time of the datagram."""
        ioctl = KernelStamps(999.75)
        arrived = arrival_clock(with_socket(7), self.clock.seconds, ioctl)
        self.assertEqual((arrived(), ioctl.calls), (999.75, [7, 7]))

    def test_the_clock_when_the_stamp_disagrees(self):
        """A stamp ahead of the clock or more than a second behind it is not the clock's time."""
        for stamp in (1000.5, 998.5, 5.0):
            arrived = arrival_clock(with_socket(), self.clock.seconds, KernelStamps(stamp))
            self.assertEqual(arrived(), 1000.0, stamp)

    def test_the_clock_without_a_stamp(self):
        """A socket that has no stamp, or no socket at all, leaves the clock's time."""
        self.assertEqual(arrival_clock(with_socket(), self.clock.seconds, KernelStamps(None))(),
                         1000.0)
        now = self.clock.seconds
        self.assertIs(arrival_clock(SimpleNamespace(), now), now)

    def test_the_protocol_reads_the_kernel_while_listening(self):
        """Started on a socket, the protocol stamps frames with the kernel's time; stopped, the clock's."""
        self.patch(fcntl, "ioctl", KernelStamps(999.5))
        metrics = Metrics()
        handler = Handler(metrics, clock=self.clock)
        protocol = NodeProtocol(FrameOpener({KEY.network_id: KEY}), handler, metrics)
        protocol.makeConnection(with_socket())
        protocol.datagramReceived(frame(), ADDR)
        protocol.doStop()
        protocol.datagramReceived(frame(), ADDR)
        self.assertEqual([f.arrived for f, _ in handler.frames], [999.5, 1000.0])


class CountedAfterTests(unittest.TestCase):
    def setUp(self):
        self.metrics = Metrics()
        self.handler = Handler(self.metrics, clock=Clock())
        self.protocol = NodeProtocol(FrameOpener({KEY.network_id: KEY}), self.handler,
                                     self.metrics)

    def test_counted_after_the_frame_was_handled(self):
        """The datagram counters move once the controller is done with the frame."""
        datagram = frame()
        self.protocol.datagramReceived(datagram, ADDR)
        self.assertEqual(self.handler.counted_then,
                         [{"packets_in": 0, "bytes_in": 0, "frames_in": 0}])
        self.assertEqual(
            {k: self.metrics.get(k) for k in ("packets_in", "bytes_in", "frames_in")},
            {"packets_in": 1, "bytes_in": len(datagram), "frames_in": 1})

    def test_counted_when_the_controller_fails(self):
        """A controller error still leaves the datagram counted (and the error counted)."""
        self.handler.fail = True
        self.protocol.datagramReceived(frame(), ADDR)
        self.assertEqual(
            (self.metrics.get("packets_in"), self.metrics.get("frames_in"),
             self.metrics.get("drops", reason="internal_error")), (1, 1, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_rejected_and_junk_counted_as_before(self):
        """A frame that does not open and junk are counted as datagrams, not frames."""
        self.protocol.datagramReceived(frame()[:-1] + b"\x00", ADDR)
        self.protocol.datagramReceived(b"hello", ADDR)
        self.assertEqual(
            (self.metrics.get("packets_in"), self.metrics.get("frames_in"),
             self.metrics.by_label("drops", "reason")),
            (2, 0, {"bad_tag": 1, "junk": 1}))


class Transport:
    """A datagram transport that records what is written, or fails."""

    def __init__(self, clock: Clock, fail: bool = False):
        self.clock = clock
        self.fail = fail
        self.written = []

    def write(self, datagram, address):
        if self.fail:
            raise OSError(101, "Network is unreachable")
        self.written.append((datagram, address, self.clock.seconds()))

    def getHost(self):
        return SimpleNamespace(host="127.0.0.1", port=7401)


class SentTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.node = MeshNode(Identity.generate(), [KEY], clock=self.clock)
        self.transport = Transport(self.clock)
        self.node.attach(self.transport)

    def test_send_frame_says_when_the_frame_left(self):
        """send_frame returns the clock's time the datagram was handed to the socket."""
        self.clock.advance(42.0)
        self.assertEqual(self.node.send_frame(b"frame", ADDR, MessageType.PING), 42.0)
        self.assertEqual(self.transport.written, [(b"frame", ADDR, 42.0)])
        self.assertEqual(self.node.metrics.get("frames_out", type="ping"), 1)

    def test_through_a_relay(self):
        """A frame on a relay route leaves with its session header, counted as relayed."""
        header = session_header(bytes(range(8)))
        self.clock.advance(5.0)
        sent = self.node.send_frame(b"frame", RelayRoute(RELAY[0], RELAY[1], header), None)
        self.assertEqual((sent, self.transport.written), (5.0, [(header + b"frame", RELAY, 5.0)]))
        self.assertEqual(self.node.metrics.get("frames_out_relayed"), 1)

    def test_not_sent(self):
        """A frame the socket refuses is not counted out, and the result is None."""
        self.transport.fail = True
        header = session_header(bytes(range(8)))
        self.assertIsNone(self.node.send_frame(b"frame", RelayRoute(RELAY[0], RELAY[1], header),
                                               MessageType.PING))
        self.assertEqual(
            (self.node.metrics.get("frames_out_relayed"), self.node.metrics.total("frames_out"),
             self.node.metrics.get("drops", reason="send_failed")), (0, 0, 1))
