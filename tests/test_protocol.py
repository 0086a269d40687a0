"""
The socket demultiplexer: STUN, frames and junk, and that nothing escapes
datagramReceived.
"""

from twisted.trial import unittest

from omerta.crypto.network import NetworkKey
from omerta.crypto.sealing import FrameOpener, FrameSealer
from omerta.mesh.protocol import NodeProtocol
from omerta.metrics import Metrics
from omerta.wire.demux import Kind, classify

KEY = NetworkKey(bytes(32))
ADDR = ("127.0.0.1", 5000)
STUN_BINDING = bytes.fromhex("0001 0000 2112a442") + bytes(12)
CLASSIC_STUN = bytes.fromhex("0001 0000") + bytes(range(16))


class Recorder:
    def __init__(self, fail=False):
        self.frames = []
        self.fail = fail

    def frame_received(self, frame, addr):
        if self.fail:
            raise RuntimeError("controller bug")
        self.frames.append((frame, addr))

    def misaddressed(self, network_id, sender, addr, size):
        self.misaddressed_from = (network_id, sender, addr, size)


class ClassifyTests(unittest.TestCase):
    def test_kinds(self):
        """First bytes tell STUN (with or without cookie), frames and junk apart."""
        self.assertEqual(classify(STUN_BINDING), Kind.STUN)
        self.assertEqual(classify(CLASSIC_STUN), Kind.STUN)
        self.assertEqual(classify(FrameSealer(KEY, bytes(16)).seal(1, b"")), Kind.FRAME)
        for junk in (b"", b"\x00", b"GET / HTTP/1.1\r\n\r\n", STUN_BINDING[:19],
                     STUN_BINDING + b"\x00\x00\x00\x00", b"\x80" + STUN_BINDING[1:]):
            self.assertEqual(classify(junk), Kind.JUNK, junk)


class ProtocolTests(unittest.TestCase):
    def setUp(self):
        self.metrics = Metrics()
        self.handler = Recorder()
        self.protocol = NodeProtocol(FrameOpener({KEY.network_id: KEY}), self.handler, self.metrics)

    def test_frame_delivered(self):
        """A valid frame reaches the controller with its sender address."""
        self.protocol.datagramReceived(FrameSealer(KEY, b"S" * 16).seal(1, b"hi"), ADDR)
        [(frame, addr)] = self.handler.frames
        self.assertEqual((frame.body, addr), (b"hi", ADDR))
        self.assertEqual(self.metrics.get("frames_in"), 1)

    def test_rejections_counted(self):
        """Frames that fail to open are dropped and counted by reason."""
        sealer = FrameSealer(KEY, b"S" * 16)
        frame = sealer.seal(1, b"hi")
        self.protocol.datagramReceived(frame, ADDR)
        self.protocol.datagramReceived(frame, ADDR)
        tampered = bytearray(sealer.seal(1, b"hi"))
        tampered[-1] ^= 1
        self.protocol.datagramReceived(bytes(tampered), ADDR)
        self.protocol.datagramReceived(frame[:30], ADDR)
        self.protocol.datagramReceived(FrameSealer(NetworkKey(b"k" * 32), b"S" * 16).seal(1, b""), ADDR)
        self.assertEqual(
            self.metrics.by_label("drops", "reason"),
            {"replay": 1, "bad_tag": 1, "malformed": 1, "unknown_network": 1},
        )
        self.assertEqual(len(self.handler.frames), 1)

    def test_stun_without_handler(self):
        """STUN is counted as unhandled when the node has no STUN service."""
        self.protocol.datagramReceived(STUN_BINDING, ADDR)
        self.assertEqual(self.metrics.get("drops", reason="stun_unhandled"), 1)

    def test_stun_handler(self):
        """With a STUN service, STUN datagrams go to it."""
        seen = []
        self.protocol.stun_handler = lambda data, addr: seen.append((data, addr))
        self.protocol.datagramReceived(STUN_BINDING, ADDR)
        self.assertEqual(seen, [(STUN_BINDING, ADDR)])

    def test_junk(self):
        """Anything else is junk, counted."""
        self.protocol.datagramReceived(b"hello", ADDR)
        self.assertEqual(self.metrics.get("drops", reason="junk"), 1)

    def test_ipv6_address_normalised(self):
        """IPv6 sockets give 4-tuples; the controller always sees (host, port)."""
        self.protocol.datagramReceived(
            FrameSealer(KEY, b"S" * 16).seal(1, b""), ("::1", 5000, 0, 0)
        )
        self.assertEqual(self.handler.frames[0][1], ("::1", 5000))

    def test_never_raises(self):
        """A controller error is logged and counted, not raised into the reactor."""
        self.protocol.handler = Recorder(fail=True)
        self.protocol.datagramReceived(FrameSealer(KEY, b"S" * 16).seal(1, b""), ADDR)
        self.assertEqual(self.metrics.get("drops", reason="internal_error"), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
