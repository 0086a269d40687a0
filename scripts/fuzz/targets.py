"""
The fuzz targets: one function per wire decoder, taking arbitrary bytes.

Each target feeds its bytes to one decoder and lets through exactly the
exceptions that decoder documents (L{Target.allowed}); anything else leaves
the target and is an escape.  The targets are plain functions of their bytes
(no randomness, no clock), so an escape reproduces from the saved input
alone, under atheris (scripts/fuzz/worker.py) or the built-in mutator
(scripts/fuzz/engine.py, used by tests/test_fuzz.py).

Targets whose decoder takes more than bytes (a frame opener with its replay
state, a session, the node's protocol) read a short program from the input
with L{Reader}: a sequence of steps, each a mode byte and a length-prefixed
chunk, so the fuzzer can make valid sealed frames (the fixed network key
below), replay them, tamper with them or send raw bytes.

Decoders are called through their modules (C{relay.parse}, not a bound
name) so a test can patch one and see the campaign catch it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from twisted.logger import Logger

from omerta.crypto import invite as crypto_invite
from omerta.crypto import sealing
from omerta.crypto import session as crypto_session
from omerta.crypto.identity import Identity
from omerta.crypto.network import NetworkKey, b64url_encode
from omerta.mesh import protocol as mesh_protocol
from omerta.metrics import Metrics
from omerta.wire import ParseError, demux, envelope, job, messages, relay, stun, tunnel, vm
from omerta.wire import invite as wire_invite


class SwallowedError(Exception):
    """
    NodeProtocol.datagramReceived caught an exception from its own code and
    counted it as C{drops{reason=internal_error}}: with handlers that never
    raise, that is an escape the protocol hid.
    """

    def __init__(self, failure):
        super().__init__(f"swallowed {failure.type.__name__}: {failure.getErrorMessage()}")
        self.failure = failure


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    what: str
    """The entry points, for the report."""


class Reader:
    """
    Consumes fuzz bytes; past the end every read gives zeros or nothing.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos < len(self.data):
            self.pos += 1
            return self.data[self.pos - 1]
        return 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def int(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\x00"), "big")

    def chunk(self) -> bytes:
        """A length-prefixed (2 bytes) chunk."""
        return self.take(self.int(2))


def step(mode: int, payload: bytes) -> bytes:
    """One step of a program for the sequence targets (for seed corpora)."""
    return bytes((mode,)) + struct.pack("!H", len(payload)) + payload


# -- fixed keys -----------------------------------------------------------

KEY = NetworkKey(bytes(range(32)))
OTHER_KEY = NetworkKey(bytes(range(1, 33)))
SENDERS = tuple(bytes((i,)) * 16 for i in range(1, 5))
BOOTS = tuple(bytes((0xB0 + i,)) * 8 for i in range(4))
LOCAL = b"\x77" * 16 + b"\xb7" * 8
"""The fuzzed opener's own peer id and boot id (what addressed frames are bound to)."""
NOW = 1_700_000_100
INVITE_IDENTITY = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132))))
MAX_STEPS = 8


def sealed_frame(spec: bytes) -> bytes:
    """
    A frame sealed under L{KEY} (or, with bit 4 of the first byte,
    L{OTHER_KEY}) as docs/identity.md#sealing specifies, described by
    C{spec}: selector (1: sender bits 0-1, boot bits 2-3; bit 5 addresses
    a type with the ADDRESSED bit to another receiver than L{LOCAL}),
    counter (8), type (1), body (rest).
    """
    r = Reader(spec)
    sel = r.byte()
    key = OTHER_KEY if sel & 0x10 else KEY
    sender, boot = SENDERS[sel & 3], BOOTS[(sel >> 2) & 3]
    counter = r.int(8)
    msg_type = r.byte()
    body = r.take(len(spec))
    header = envelope.build_header(msg_type, key.network_id, sender, boot, counter)
    associated = header
    if msg_type & envelope.ADDRESSED:
        associated += bytes(24) if sel & 0x20 else LOCAL
    aead = ChaCha20Poly1305(key.derive(b"frame", sender + boot))
    return header + aead.encrypt(bytes(4) + counter.to_bytes(8, "big"), body, associated)


def frame_spec(sender: int = 0, boot: int = 0, counter: int = 1, msg_type: int = 1,
               body: bytes = b"") -> bytes:
    """The C{spec} of L{sealed_frame} (for seed corpora)."""
    return bytes((sender | boot << 2,)) + counter.to_bytes(8, "big") + bytes((msg_type,)) + body


def _flip(data: bytes, where: int) -> bytes:
    if not data:
        return data
    i = where % len(data)
    return data[:i] + bytes((data[i] ^ 0x01,)) + data[i + 1 :]


# -- byte decoders ----------------------------------------------------------


def fuzz_demux(data: bytes) -> None:
    kind = demux.classify(data)
    assert kind in demux.Kind


def fuzz_stun(data: bytes) -> None:
    # verify_* document False for anything malformed: they may not raise.
    stun.verify_fingerprint(data)
    stun.verify_integrity(data, b"fuzz key")
    stun.parse(data)


_STUN_CODECS = tuple(stun.ATTRIBUTES[t] for t in sorted(stun.ATTRIBUTES))
_STUN_TXIDS = (bytes(range(1, 13)), bytes(range(0xA0, 0xB0)))


def fuzz_stun_attributes(data: bytes) -> None:
    """
    Byte 0 picks the attribute, bit 0 of byte 1 a modern (12-byte) or
    classic (16-byte) transaction id; the rest is the value.  Both the fast
    path and the construct specification must raise only ParseError.
    """
    if len(data) < 2:
        return
    codec = _STUN_CODECS[data[0] % len(_STUN_CODECS)]
    txid = _STUN_TXIDS[data[1] & 1]
    raw = data[2:]
    try:
        codec.unpack(raw, txid)
    except ParseError:
        pass
    stun.spec_unpack(codec.spec, raw, txid, codec.name)


def fuzz_envelope(data: bytes) -> None:
    envelope.is_frame(data)
    envelope.parse_header(data)


MESSAGE_TYPE_COUNTS: dict[int, int] = {}


def fuzz_messages(data: bytes) -> None:
    """Byte 0 is the envelope's type byte, the rest the body."""
    if not data:
        return
    MESSAGE_TYPE_COUNTS[data[0]] = MESSAGE_TYPE_COUNTS.get(data[0], 0) + 1
    messages.parse_body(data[0], data[1:])


def fuzz_record(data: bytes) -> None:
    messages.parse_record(data)


def fuzz_relay(data: bytes) -> None:
    relay.is_relay_data(data)
    relay.parse(data)


def fuzz_tunnel(data: bytes) -> None:
    tunnel.parse(data)


def fuzz_invite_payload(data: bytes) -> None:
    wire_invite.parse_invite_payload(data)


def fuzz_invite_link(data: bytes) -> None:
    """
    Byte 0 mod 3: 0, the rest is the link text (UTF-8, undecodable bytes as
    surrogates, as a command line gives them); 1, the rest is a payload,
    linked unsigned; 2, the rest is a payload body, signed by a fixed
    identity and linked, so the checks after the signature run too.
    """
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        text = rest.decode("utf-8", "surrogateescape")
    elif mode == 1:
        text = crypto_invite.INVITE_PREFIX + b64url_encode(rest)
    else:
        text = crypto_invite.INVITE_PREFIX + b64url_encode(rest + INVITE_IDENTITY.sign(rest))
    crypto_invite.parse_invite(text, NOW)


def fuzz_vm_request(data: bytes) -> None:
    vm.parse_request(data)


def fuzz_vm_reply(data: bytes) -> None:
    vm.parse_reply(data)


def fuzz_job_request(data: bytes) -> None:
    job.parse_request(data)


def fuzz_job_reply(data: bytes) -> None:
    job.parse_reply(data)


# -- stateful decoders ------------------------------------------------------


def fuzz_frame_opener(data: bytes) -> None:
    """
    A fresh opener (room for 4 contexts, so eviction runs) fed up to 8
    frames.  Step modes (mod 4): 0 raw bytes; 1 a sealed frame
    (L{sealed_frame}); 2 a sealed frame with one bit flipped (position from
    the chunk's first byte); 3 a frame sent before, again.
    """
    opener = sealing.FrameOpener({KEY.network_id: KEY}, max_contexts=4)
    opener.set_local(KEY.network_id, LOCAL[:16], LOCAL[16:])
    sent: list[bytes] = []
    r = Reader(data)
    for _ in range(MAX_STEPS):
        if not r.left():
            break
        mode = r.byte() % 4
        chunk = r.chunk()
        if mode == 0:
            frame = chunk
        elif mode == 1:
            frame = sealed_frame(chunk)
        elif mode == 2:
            frame = _flip(sealed_frame(chunk[1:]), chunk[:1][0] if chunk else 0)
        else:
            frame = sent[len(chunk) % len(sent)] if sent else chunk
        sent.append(frame)
        try:
            opener.open(frame)
        except sealing.FrameRejected:
            pass


SESSION_ID = 0x0123456789ABCDEF
_I2R = bytes(range(32))
_R2I = bytes(range(32, 64))
_AAD = struct.Struct(">QQB")


def _odd_value(r: Reader):
    """A session id or counter of any shape: right, wrong, or not an int."""
    pick = r.byte() % 11
    if pick == 0:
        return r.int(8)
    if pick == 1:
        return SESSION_ID
    if pick == 2:
        return 0
    if pick == 3:
        return crypto_session.MAX_COUNTER
    if pick == 4:
        return crypto_session.MAX_COUNTER + 1 + r.int(2)
    if pick == 5:
        return -r.int(2)
    if pick == 6:
        return bool(r.byte() & 1)
    if pick == 7:
        return float(r.int(2)) / 7
    if pick == 8:
        return None
    if pick == 9:
        return r.chunk().decode("latin-1")
    return r.chunk()


def _odd_sealed(r: Reader):
    """
    A sealed value of any shape.  Integers stay small or beyond 2**64:
    C{bytes(n)} of a large C{n} allocates C{n} bytes, so C{open} would try
    to allocate gigabytes (noted in docs/security.md; no wire input gives
    an int here).
    """
    pick = r.byte() % 9
    if pick < 3:
        return (bytes, bytearray, memoryview)[pick](r.chunk())
    if pick == 3:
        return r.chunk().decode("latin-1")
    if pick == 4:
        return r.int(2)
    if pick == 5:
        return -1 - r.int(2)
    if pick == 6:
        return 2**64 + r.int(2)
    if pick == 7:
        return None
    return [r.byte()]


def fuzz_session_open(data: bytes) -> None:
    """
    A responder's fresh session opening up to 8 SESSION_DATA messages.  Step
    modes (mod 7): 0 sealed by the initiator's session (inner type and
    body from the chunk); 1 a message opened before, again; 2 sealed, then
    one bit of the sealed bytes flipped; 3 the chunk parsed as a SESSION_DATA
    body (the node's path); 4 a dict of odd field values; 5 not a mapping,
    or keys missing; 6 sealed directly with the session's key, counter and
    plaintext from the chunk (empty plaintext included).
    """
    receiver = crypto_session.Session(
        SENDERS[0], SESSION_ID, crypto_session.Role.RESPONDER, 0.0, _R2I, _I2R
    )
    sender = crypto_session.Session(
        SENDERS[1], SESSION_ID, crypto_session.Role.INITIATOR, 0.0, _I2R, _R2I
    )
    aead = ChaCha20Poly1305(_I2R)
    sent: list = []
    r = Reader(data)
    for _ in range(MAX_STEPS):
        if not r.left():
            break
        mode = r.byte() % 7
        if mode == 0:
            inner = r.byte()
            fields = sender.seal(inner, r.chunk())
        elif mode == 1:
            fields = sent[r.byte() % len(sent)] if sent else {}
        elif mode == 2:
            where = r.int(2)
            fields = dict(sender.seal(r.byte(), r.chunk()))
            fields["sealed"] = _flip(fields["sealed"], where)
        elif mode == 3:
            try:
                fields = messages.parse_body(messages.MessageType.SESSION_DATA, r.chunk())
            except ParseError:
                continue
        elif mode == 4:
            fields = {
                "session_id": _odd_value(r),
                "counter": _odd_value(r),
                "sealed": _odd_sealed(r),
            }
        elif mode == 5:
            shapes = (
                None, "session", b"session", [], {}, {"session_id": SESSION_ID},
                {"session_id": SESSION_ID, "counter": 1}, {"counter": 1, "sealed": b""},
                (SESSION_ID, 1, b""), 42,
            )
            fields = shapes[r.byte() % len(shapes)]
        else:
            counter = r.int(8)
            plain = r.chunk()
            sealed = aead.encrypt(
                bytes(4) + counter.to_bytes(8, "big"), plain, _AAD.pack(SESSION_ID, counter, 0)
            )
            fields = {"session_id": SESSION_ID, "counter": counter, "sealed": sealed}
        sent.append(fields)
        try:
            receiver.open(fields)
        except crypto_session.SessionError:
            pass


class _Route:
    def __init__(self, peer_id: bytes, network_id: bytes, route):
        self.peer_id = peer_id
        self.network_id = network_id
        self.route = route


class _Handler:
    """A controller that accepts everything and never raises."""

    def __init__(self, session):
        self.session = session
        self.frames = 0

    def frame_received(self, frame, addr) -> None:
        self.frames += 1

    def relay_route(self, header: bytes, addr):
        return self.session

    def tunnel_received(self, frame: bytes, relay_session=None) -> None:
        self.frames += 1

    def misaddressed(self, network_id: bytes, sender: bytes, addr, size: int) -> None:
        self.frames += 1


class _Relay:
    def __init__(self, forwards: bool):
        self.forwards = forwards

    def forward(self, datagram: bytes, addr) -> bool:
        return self.forwards


class _Capture:
    def __init__(self):
        self.failures = []

    def __call__(self, event) -> None:
        if "log_failure" in event:
            self.failures.append(event["log_failure"])


ADDR = ("192.0.2.1", 7400)


def _stun_shaped(chunk: bytes) -> bytes:
    """A datagram that classify() calls STUN: top bits clear, length right."""
    head = chunk[:20].ljust(20, b"\x00")
    body = chunk[20:]
    body += bytes(-len(body) % 4)
    return bytes((head[0] & 0x3F, head[1])) + struct.pack("!H", len(body)) + head[4:] + body


def fuzz_protocol(data: bytes) -> None:
    """
    NodeProtocol.datagramReceived with fake collaborators, up to 8
    datagrams.  Byte 0 configures: bit 0 a STUN handler, bit 1 a relay
    server, bit 2 whether it forwards, bits 3-4 what relay_route gives
    (none, a session with sender 1, with sender 2, in another network).
    Step modes (mod 6): 0 raw; 1 a sealed frame (L{sealed_frame}); 2 relayed
    data around a sealed frame; 3 relayed data around raw bytes; 4 tunnel
    data; 5 a STUN-shaped datagram.

    datagramReceived must not raise, and with these handlers it must not
    count an internal error either (that is an exception it swallowed).
    """
    r = Reader(data)
    config = r.byte()
    routes = (
        None,
        _Route(SENDERS[0], KEY.network_id, ADDR),
        _Route(SENDERS[1], KEY.network_id, ADDR),
        _Route(SENDERS[0], OTHER_KEY.network_id, ADDR),
    )
    metrics = Metrics()
    proto = mesh_protocol.NodeProtocol(
        sealing.FrameOpener({KEY.network_id: KEY}, max_contexts=4),
        _Handler(routes[(config >> 3) & 3]),
        metrics,
        stun_handler=(lambda datagram, addr: None) if config & 1 else None,
    )
    capture = _Capture()
    proto.log = Logger(observer=capture)
    if config & 2:
        proto.relay = _Relay(bool(config & 4))
    for _ in range(MAX_STEPS):
        if not r.left():
            break
        mode = r.byte() % 6
        chunk = r.chunk()
        if mode == 0:
            datagram = chunk
        elif mode == 1:
            datagram = sealed_frame(chunk)
        elif mode == 2:
            datagram = relay.session_header(chunk[:8].ljust(8, b"\x00")) + sealed_frame(chunk[8:])
        elif mode == 3:
            datagram = relay.PREFIX + chunk
        elif mode == 4:
            datagram = tunnel.PREFIX + chunk
        else:
            datagram = _stun_shaped(chunk)
        proto.datagramReceived(datagram, ADDR)
        if capture.failures:
            raise SwallowedError(capture.failures[0])


# -- the table ----------------------------------------------------------------

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("demux", fuzz_demux, (), "omerta.wire.demux.classify"),
        Target(
            "stun", fuzz_stun, (ParseError,),
            "omerta.wire.stun.parse, verify_fingerprint, verify_integrity",
        ),
        Target(
            "stun_attributes", fuzz_stun_attributes, (ParseError,),
            "each omerta.wire.stun.ATTRIBUTES codec: unpack and spec_unpack(spec)",
        ),
        Target("envelope", fuzz_envelope, (ParseError,), "omerta.wire.envelope.parse_header, is_frame"),
        Target(
            "frame_opener", fuzz_frame_opener, (sealing.FrameRejected,),
            "omerta.crypto.sealing.FrameOpener.open (fixed network key)",
        ),
        Target(
            "messages", fuzz_messages, (ParseError,),
            "omerta.wire.messages.parse_body (every MessageType)",
        ),
        Target("record", fuzz_record, (ParseError,), "omerta.wire.messages.parse_record"),
        Target("relay", fuzz_relay, (ParseError,), "omerta.wire.relay.parse, is_relay_data"),
        Target("tunnel", fuzz_tunnel, (ParseError,), "omerta.wire.tunnel.parse"),
        Target(
            "invite_payload", fuzz_invite_payload, (ParseError,),
            "omerta.wire.invite.parse_invite_payload",
        ),
        Target(
            "invite_link", fuzz_invite_link, (crypto_invite.InviteError,),
            "omerta.crypto.invite.parse_invite (omerta://join/ links)",
        ),
        Target("vm_request", fuzz_vm_request, (ParseError,), "omerta.wire.vm.parse_request"),
        Target("vm_reply", fuzz_vm_reply, (ParseError,), "omerta.wire.vm.parse_reply"),
        Target("job_request", fuzz_job_request, (ParseError,), "omerta.wire.job.parse_request"),
        Target("job_reply", fuzz_job_reply, (ParseError,), "omerta.wire.job.parse_reply"),
        Target(
            "session_open", fuzz_session_open, (crypto_session.SessionError,),
            "omerta.crypto.session.Session.open",
        ),
        Target(
            "protocol", fuzz_protocol, (),
            "omerta.mesh.protocol.NodeProtocol.datagramReceived (fake handler and relay)",
        ),
    )
}
