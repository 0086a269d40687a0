"""
Per-pair sessions: the signed X25519 handshake, SESSION_DATA sealing, what a
third member of the same network can and cannot do, rekeying, simultaneous
initiation and the bounds on every table.  Time is always passed explicitly.
"""

import hashlib
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from omerta.crypto.identity import Identity, peer_id_for, verify_signature
from omerta.crypto.network import NetworkKey
from omerta.crypto.session import (
    HANDSHAKE_REASONS,
    MAX_COUNTER,
    SESSION_REASONS,
    HandshakeError,
    Role,
    Session,
    SessionError,
    SessionTable,
    weak_identity_key,
)
from omerta.crypto import identity as identity_module
from omerta.wire.messages import MessageType, build_body, parse_body

T = MessageType
NET = NetworkKey(bytes(range(32))).network_id
OTHER_NET = NetworkKey(bytes(range(1, 33))).network_id


def fixed_identity(n: int) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32))


def counting_rng(seed: bytes):
    """Deterministic stand-in for os.urandom: SHA-256 of seed and a counter."""
    calls = [0]

    def rng(n: int) -> bytes:
        calls[0] += 1
        return hashlib.sha256(seed + calls[0].to_bytes(4, "big")).digest()[:n]

    return rng


def fresh_x25519() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


def on_wire(msg_type, fields):
    """Build and parse a body, as a real send and receive would."""
    raw = build_body(msg_type, fields)
    return parse_body(msg_type, raw), raw


def sign_init(identity, network_id, f):
    """The INIT signature as docs/identity.md specifies it, written out independently."""
    return identity.sign(
        b"omerta hs init v1\x00" + network_id + struct.pack(">Q", f["handshake_id"])
        + f["initiator_key"] + f["ephemeral"] + f["responder"]
        + struct.pack(">Q", f["timestamp_ms"])
    )


def sign_resp(identity, network_id, init_body, f):
    """The RESP signature as docs/identity.md specifies it."""
    return identity.sign(
        b"omerta hs resp v1\x00" + network_id + hashlib.sha256(init_body).digest()
        + f["responder_key"] + f["ephemeral"]
    )


# Fixed identities 1 and 2 (Ed25519 seeds of 32 equal bytes), counting_rng
# b"a" and b"b", time 5 s: SHA-256 prefixes of the INIT and RESP bodies, the
# session id and the first message A seals.  Ed25519 signatures are
# deterministic, so any change here is a change of the protocol.
GOLDEN = {
    "init": "fc60696fc572b540",
    "resp": "d598ef9cd1fbc1f5",
    "session_id": "bbfddc6e8227f5ba",
    "sealed": "080c5a85e11604b6901a501973a15896a11c626527ed",
}


class Node:
    def __init__(self, identity=None, network_id=NET, **options):
        self.identity = identity or Identity.generate()
        self.id = self.identity.peer_id
        self.table = SessionTable(self.identity, network_id, **options)


def ordered_pair(**options):
    """Two nodes, the first with the lower peer id."""
    a, b = Node(**options), Node(**options)
    return (a, b) if a.id < b.id else (b, a)


def send_init(a, b, now):
    """A starts a handshake with B; returns the parsed INIT and its bytes."""
    fields, _ = a.table.initiate(b.id, now)
    return on_wire(T.HANDSHAKE_INIT, fields)


def answer(b, a, init, now):
    """B answers A's INIT; returns the parsed RESP and B's session."""
    message, raw = init
    response, session = b.table.on_init(a.id, message, raw, now)
    return on_wire(T.HANDSHAKE_RESP, response)[0], session


def handshake(a, b, now=0.0):
    """A complete handshake, A initiating; returns (A's session, B's session)."""
    resp, sb = answer(b, a, send_init(a, b, now), now)
    sa = a.table.on_resp(b.id, resp, now)
    return sa, sb


def data(session, body=b"hello", inner=T.APP_DATA):
    """Seal and pass through the SESSION_DATA codec."""
    return on_wire(T.SESSION_DATA, session.seal(inner, body))[0]


def receive(table, message, now):
    """What a receiver does: find the session by id and open the message."""
    session = table.by_id(message["session_id"], now)
    if session is None:
        raise SessionError("unknown_session")
    return session.open(message)


class Checks:
    def assertHandshake(self, reason, f, *args):
        error = self.assertRaises(HandshakeError, f, *args)
        self.assertEqual(error.reason, reason)
        self.assertIn(reason, HANDSHAKE_REASONS)
        return error

    def assertSession(self, reason, f, *args):
        error = self.assertRaises(SessionError, f, *args)
        self.assertEqual(error.reason, reason)
        self.assertIn(reason, SESSION_REASONS | {"unknown_session"})
        return error


class HandshakeTests(Checks, unittest.TestCase):
    def test_keys_match_both_ways(self):
        """After one round trip both ends share a session id and data flows both ways."""
        a, b = Node(), Node()
        sa, sb = handshake(a, b)
        self.assertEqual(sa.session_id, sb.session_id)
        self.assertEqual((sa.peer_id, sb.peer_id), (b.id, a.id))
        self.assertEqual((sa.role, sb.role), (Role.INITIATOR, Role.RESPONDER))
        self.assertEqual(receive(b.table, data(sa, b"ping"), 1), (T.APP_DATA, b"ping"))
        self.assertEqual(receive(a.table, data(sb, b"pong", T.RESPONSE), 1), (T.RESPONSE, b"pong"))

    def test_reflection_fails(self):
        """A message sent back to its own sender does not open (keys and direction differ)."""
        a, b = Node(), Node()
        sa, _ = handshake(a, b)
        self.assertSession("bad_tag", sa.open, data(sa))

    def test_body_is_encrypted(self):
        """The inner message is not visible and costs one type byte and a 16-byte tag."""
        sa, _ = handshake(Node(), Node())
        message = data(sa, b"secret payload")
        self.assertNotIn(b"secret payload", message["sealed"])
        self.assertEqual(len(message["sealed"]), 1 + len(b"secret payload") + 16)

    def test_new_handshake_new_keys(self):
        """Two handshakes between the same pair give unrelated sessions."""
        a, b = Node(), Node()
        first, _ = handshake(a, b, 0)
        a2, b2 = Node(a.identity), Node(b.identity)
        second, second_b = handshake(a2, b2, 0)
        self.assertNotEqual(first.session_id, second.session_id)
        moved = dict(data(first), session_id=second.session_id)
        self.assertSession("bad_tag", second_b.open, moved)

    def test_follows_specification(self):
        """Keys, session id and nonce are exactly the HKDF and AEAD layout documented."""
        ia, ib = fixed_identity(1), fixed_identity(2)
        a = Node(ia, rng=counting_rng(b"a"))
        b = Node(ib, rng=counting_rng(b"b"))
        init_msg, init_raw = send_init(a, b, 5.0)
        resp, sb = answer(b, a, (init_msg, init_raw), 5.0)
        sa = a.table.on_resp(b.id, resp, 5.0)
        resp_raw = build_body(T.HANDSHAKE_RESP, resp)
        # A's rng gave the handshake id then its ephemeral; B's rng its ephemeral.
        rng_a, rng_b = counting_rng(b"a"), counting_rng(b"b")
        self.assertEqual(init_msg["handshake_id"], int.from_bytes(rng_a(8), "big"))
        ea = X25519PrivateKey.from_private_bytes(rng_a(32))
        eb = X25519PrivateKey.from_private_bytes(rng_b(32))
        self.assertEqual(ea.exchange(X25519PublicKey.from_public_bytes(resp["ephemeral"])),
                         eb.exchange(X25519PublicKey.from_public_bytes(init_msg["ephemeral"])))
        okm = HKDF(
            algorithm=hashes.SHA256(), length=72,
            salt=hashlib.sha256(init_raw + resp_raw).digest(),
            info=b"omerta session v1\x00" + NET + a.id + b.id,
        ).derive(ea.exchange(X25519PublicKey.from_public_bytes(resp["ephemeral"])))
        self.assertEqual(sa.session_id, int.from_bytes(okm[64:], "big"))
        sealed = sa.seal(T.APP_DATA, b"hi")["sealed"]
        aad = struct.pack(">QQB", sa.session_id, 1, 0)
        self.assertEqual(sealed, ChaCha20Poly1305(okm[:32]).encrypt(bytes(4) + struct.pack(">Q", 1),
                                                                   b"\x30hi", aad))
        back = sb.seal(T.APP_DATA, b"yo")["sealed"]
        aad = struct.pack(">QQB", sa.session_id, 1, 1)
        self.assertEqual(ChaCha20Poly1305(okm[32:64]).decrypt(bytes(4) + struct.pack(">Q", 1),
                                                              back, aad), b"\x30yo")
        self.assertEqual(init_msg["signature"], sign_init(ia, NET, init_msg))
        self.assertEqual(resp["signature"], sign_resp(ib, NET, init_raw, resp))

    def test_golden_transcript(self):
        """With fixed keys and randomness the handshake and first message are byte-stable."""
        a = Node(fixed_identity(1), rng=counting_rng(b"a"))
        b = Node(fixed_identity(2), rng=counting_rng(b"b"))
        init = send_init(a, b, 5.0)
        resp, _ = answer(b, a, init, 5.0)
        sa = a.table.on_resp(b.id, resp, 5.0)
        self.assertEqual(hashlib.sha256(init[1]).hexdigest()[:16], GOLDEN["init"])
        self.assertEqual(hashlib.sha256(build_body(T.HANDSHAKE_RESP, resp)).hexdigest()[:16],
                         GOLDEN["resp"])
        self.assertEqual(f"{sa.session_id:016x}", GOLDEN["session_id"])
        self.assertEqual(sa.seal(T.APP_DATA, b"hello")["sealed"].hex(), GOLDEN["sealed"])

    def test_ephemeral_discarded(self):
        """A completed handshake leaves nothing pending; the same RESP again is unknown."""
        a, b = Node(), Node()
        resp, _ = answer(b, a, send_init(a, b, 0), 0)
        a.table.on_resp(b.id, resp, 0)
        self.assertEqual(a.table.pending_count, 0)
        self.assertHandshake("unknown_handshake", a.table.on_resp, b.id, resp, 0)

    def test_initiate_once_per_peer(self):
        """A second initiate while one is in flight gives None; after retry_after a fresh one."""
        a, b = Node(), Node()
        first = send_init(a, b, 0)
        self.assertIsNone(a.table.initiate(b.id, 4.9))
        second = send_init(a, b, 5.0)
        self.assertNotEqual(first[0]["handshake_id"], second[0]["handshake_id"])
        self.assertEqual(a.table.pending_count, 1)
        stale, _ = answer(b, a, first, 5.0)
        self.assertHandshake("unknown_handshake", a.table.on_resp, b.id, stale, 5.0)
        resp, sb = answer(b, a, second, 5.0)
        self.assertEqual(a.table.on_resp(b.id, resp, 5.0).session_id, sb.session_id)

    def test_initiate_self_refused(self):
        """A node cannot start a handshake with itself."""
        a = Node()
        self.assertRaises(ValueError, a.table.initiate, a.id, 0)

    def test_unknown_handshake_id(self):
        """A RESP whose handshake id we never sent is refused."""
        a, b = Node(), Node()
        resp, _ = answer(b, a, send_init(a, b, 0), 0)
        self.assertHandshake("unknown_handshake", a.table.on_resp, b.id,
                             dict(resp, handshake_id=resp["handshake_id"] ^ 1), 0)

    def test_late_resp(self):
        """A RESP arriving after max_skew finds no pending handshake."""
        a, b = Node(), Node()
        resp, _ = answer(b, a, send_init(a, b, 0), 0)
        self.assertHandshake("unknown_handshake", a.table.on_resp, b.id, resp, 120.5)

    def test_stale_and_future_timestamps(self):
        """An INIT more than 120 s old or ahead is stale; exactly 120 s is accepted."""
        a, b = Node(), Node()
        init = send_init(a, b, 200.0)
        self.assertHandshake("stale_timestamp", b.table.on_init, a.id, *init, 320.5)
        self.assertHandshake("stale_timestamp", b.table.on_init, a.id, *init, 79.5)
        b.table.on_init(a.id, *init, 320.0)

    def test_configurable_skew(self):
        """max_skew is a parameter."""
        a, b = Node(), Node(max_skew=10.0)
        init = send_init(a, b, 0)
        self.assertHandshake("stale_timestamp", b.table.on_init, a.id, *init, 10.5)

    def test_malformed_fields(self):
        """Missing fields, wrong sizes, or bytes that differ from the fields are malformed."""
        a, b = Node(), Node()
        message, raw = send_init(a, b, 0)
        fields = dict(message)
        del fields["signature"]
        self.assertHandshake("malformed", b.table.on_init, a.id, fields, None, 0)
        self.assertHandshake("malformed", b.table.on_init, a.id,
                             dict(message, ephemeral=b"short"), None, 0)
        self.assertHandshake("malformed", b.table.on_init, a.id, message, raw[:-1] + b"x", 0)
        self.assertHandshake("malformed", a.table.on_resp, b.id, {"handshake_id": 1}, 0)

    def test_raw_body_optional(self):
        """Without the raw bytes the INIT is rebuilt from its fields."""
        a, b = Node(), Node()
        message, _ = send_init(a, b, 0)
        response, _ = b.table.on_init(a.id, message, None, 0)
        a.table.on_resp(b.id, on_wire(T.HANDSHAKE_RESP, response)[0], 0)

    def test_low_order_ephemeral(self):
        """A signed all-zero X25519 key is refused instead of giving a known secret."""
        a, b = Node(), Node()
        message, _ = send_init(a, b, 0)
        bad = dict(message, ephemeral=bytes(32))
        bad["signature"] = sign_init(a.identity, NET, bad)
        self.assertHandshake("bad_ephemeral", b.table.on_init, a.id, bad, None, 0)

        message, raw = send_init(a, b, 10)
        resp, _ = answer(b, a, (message, raw), 10)
        bad = dict(resp, ephemeral=bytes(32))
        bad["signature"] = sign_resp(b.identity, NET, raw, bad)
        self.assertHandshake("bad_ephemeral", a.table.on_resp, b.id, bad, 10)

    def test_own_identity_init(self):
        """An INIT from our own identity is refused."""
        a = Node()
        fields = {"handshake_id": 1, "initiator_key": a.identity.public_key,
                  "ephemeral": fresh_x25519(),
                  "responder": a.id, "timestamp_ms": 0}
        fields["signature"] = sign_init(a.identity, NET, fields)
        self.assertHandshake("from_self", a.table.on_init, a.id, fields, None, 0)

    def test_network_bound(self):
        """An INIT signed for one network is refused in another, same identities or not."""
        a = Node()
        b = Node(network_id=OTHER_NET)
        init = send_init(a, b, 0)
        self.assertHandshake("bad_signature", b.table.on_init, a.id, *init, 0)

    def test_network_id_size(self):
        """A table needs an 8-byte network id."""
        self.assertRaises(ValueError, SessionTable, Identity.generate(), b"short")


class ThirdMemberTests(Checks, unittest.TestCase):
    """
    Mallory is a member of the same network (she can put any sender on an
    envelope and see every frame she relays) but holds neither A's nor B's
    identity key.
    """

    def setUp(self):
        self.a, self.b, self.m = Node(), Node(), Node()

    def test_init_as_someone_else(self):
        """Mallory's own INIT sent under A's id is a sender mismatch."""
        init = send_init(self.m, self.b, 0)
        self.assertHandshake("sender_mismatch", self.b.table.on_init, self.a.id, *init, 0)

    def test_init_with_victims_key(self):
        """An INIT carrying A's key but Mallory's signature is refused."""
        message, _ = send_init(self.m, self.b, 0)
        forged = dict(message, initiator_key=self.a.identity.public_key)
        forged["signature"] = sign_init(self.m.identity, NET, forged)
        self.assertHandshake("bad_signature", self.b.table.on_init, self.a.id, forged, None, 0)

    def test_relay_swaps_init_ephemeral(self):
        """A relay replacing A's ephemeral with its own breaks A's signature."""
        message, _ = send_init(self.a, self.b, 0)
        swapped = dict(message, ephemeral=fresh_x25519())
        self.assertHandshake("bad_signature", self.b.table.on_init, self.a.id, swapped, None, 0)

    def test_relay_swaps_resp_ephemeral(self):
        """A relay swapping B's ephemeral breaks B's signature; the genuine RESP still completes."""
        resp, sb = answer(self.b, self.a, send_init(self.a, self.b, 0), 0)
        swapped = dict(resp, ephemeral=fresh_x25519())
        self.assertHandshake("bad_signature", self.a.table.on_resp, self.b.id, swapped, 0)
        self.assertEqual(self.a.table.on_resp(self.b.id, resp, 0).session_id, sb.session_id)

    def test_resp_from_someone_else(self):
        """Mallory answering A's INIT to B is refused however she labels it."""
        a, b, m = self.a, self.b, self.m
        message, raw = send_init(a, b, 0)
        hid = message["handshake_id"]
        own = {"handshake_id": hid, "responder_key": m.identity.public_key,
               "ephemeral": fresh_x25519()}
        own["signature"] = sign_resp(m.identity, NET, raw, own)
        self.assertHandshake("wrong_peer", a.table.on_resp, m.id, own, 0)
        self.assertHandshake("sender_mismatch", a.table.on_resp, b.id, own, 0)
        as_b = dict(own, responder_key=b.identity.public_key)
        as_b["signature"] = sign_resp(m.identity, NET, raw, as_b)
        self.assertHandshake("bad_signature", a.table.on_resp, b.id, as_b, 0)
        resp, sb = answer(b, a, (message, raw), 0)
        self.assertEqual(a.table.on_resp(b.id, resp, 0).session_id, sb.session_id)

    def test_init_to_someone_else(self):
        """A's INIT for B, passed by a relay to Mallory or C, is for the wrong responder."""
        init = send_init(self.a, self.b, 0)
        self.assertHandshake("wrong_responder", self.m.table.on_init, self.a.id, *init, 0)

    def test_replayed_init(self):
        """An INIT seen before is refused while its timestamp is still acceptable."""
        init = send_init(self.a, self.b, 0)
        self.b.table.on_init(self.a.id, *init, 0)
        self.assertHandshake("replayed", self.b.table.on_init, self.a.id, *init, 60)
        self.assertHandshake("stale_timestamp", self.b.table.on_init, self.a.id, *init, 121)

    def test_replay_after_restart_does_not_divert(self):
        """A replayed INIT accepted by a restarted responder gives a session it never sends on."""
        a, b = self.a, self.b
        init = send_init(a, b, 0)
        b.table.on_init(a.id, *init, 0)
        restarted = Node(b.identity)
        restarted.table.on_init(a.id, *init, 30)
        self.assertIsNone(restarted.table.get(a.id, 30))

    def test_cannot_read(self):
        """Mallory's own sessions with A and with B open nothing A sends B."""
        a, b, m = self.a, self.b, self.m
        sa, _ = handshake(a, b)
        mb, _ = handshake(m, b)
        ma, _ = handshake(m, a)
        message = data(sa, b"for B only")
        self.assertNotIn(b"for B only", message["sealed"])
        for mine in (mb, ma):
            self.assertSession("bad_tag", mine.open, dict(message, session_id=mine.session_id))

    def test_cannot_forge(self):
        """Mallory sealing with her own keys under the A-B session id fails at B."""
        a, b, m = self.a, self.b, self.m
        sa, sb = handshake(a, b)
        mb, _ = handshake(m, b)
        forged = mb.seal(T.REQUEST, b"do something")
        forged["session_id"] = sa.session_id
        self.assertSession("bad_tag", receive, b.table, forged, 1)
        self.assertIs(b.table.by_id(sa.session_id, 1), sb)
        self.assertEqual(sb.received, 0)

    def test_cannot_reuse_captured_data(self):
        """A captured A-B message replayed by a relay is refused."""
        sa, _ = handshake(self.a, self.b)
        message = data(sa)
        receive(self.b.table, message, 1)
        self.assertSession("replay", receive, self.b.table, message, 2)


class SessionDataTests(Checks, unittest.TestCase):
    def setUp(self):
        self.sa, self.sb = handshake(Node(), Node())

    def test_replay(self):
        """The same message twice: the second is a replay."""
        message = data(self.sa)
        self.sb.open(message)
        self.assertSession("replay", self.sb.open, message)

    def test_reordering_and_too_old(self):
        """Messages may arrive out of order within the window; older ones are too old."""
        messages = [data(self.sa, bytes([i % 256])) for i in range(1100)]
        self.sb.open(messages[1050])
        self.sb.open(messages[100])
        self.assertSession("too_old", self.sb.open, messages[10])
        self.assertSession("replay", self.sb.open, messages[100])

    def test_counters_from_one(self):
        """Counters start at 1 and grow by one per message."""
        self.assertEqual([self.sa.seal(1, b"")["counter"] for _ in range(3)], [1, 2, 3])
        self.assertEqual(self.sa.sent, 3)

    def test_tampered_sealed(self):
        """Any flipped bit in the sealed bytes fails the tag."""
        message = data(self.sa, b"abc")
        for i in range(len(message["sealed"])):
            damaged = bytearray(message["sealed"])
            damaged[i] ^= 0x01
            self.assertSession("bad_tag", self.sb.open, dict(message, sealed=bytes(damaged)))
        self.assertEqual(self.sb.open(message), (T.APP_DATA, b"abc"))

    def test_truncated_sealed(self):
        """Sealed bytes cut short fail the tag."""
        message = data(self.sa, b"abc")
        for cut in range(len(message["sealed"])):
            cut_short = dict(message, sealed=message["sealed"][:cut])
            self.assertSession("bad_tag", self.sb.open, cut_short)

    def test_tampered_counter(self):
        """A changed counter fails the tag; counter 0 is never valid."""
        message = data(self.sa)
        self.assertSession("bad_tag", self.sb.open, dict(message, counter=2))
        self.assertSession("malformed", self.sb.open, dict(message, counter=0))
        self.assertEqual(self.sb.received, 0)

    def test_tampered_session_id(self):
        """A changed session id names no session of ours."""
        message = data(self.sa)
        moved = dict(message, session_id=message["session_id"] ^ 1)
        self.assertSession("wrong_session", self.sb.open, moved)

    def test_not_fields(self):
        """Something that is not SESSION_DATA fields is malformed."""
        self.assertSession("malformed", self.sb.open, {"session_id": self.sb.session_id})
        self.assertSession("malformed", self.sb.open, None)
        message = data(self.sa)
        self.assertSession("malformed", self.sb.open, dict(message, sealed="text"))

    @given(st.integers(1, MAX_COUNTER), st.binary(max_size=2000))
    @settings(max_examples=300)
    def test_random_sealed(self, counter, sealed):
        """Random bytes as sealed data only ever raise SessionError and leave the window alone."""
        message = {"session_id": self.sb.session_id, "counter": counter, "sealed": sealed}
        self.assertRaises(SessionError, self.sb.open, message)
        self.assertEqual(self.sb.received, 0)

    def test_needs_rekey(self):
        """needs_rekey turns on once either direction reaches its message budget."""
        send = Session(b"p" * 16, 1, Role.INITIATOR, 0, b"k" * 32, b"K" * 32, rekey_after=3)
        recv = Session(b"q" * 16, 1, Role.RESPONDER, 0, b"K" * 32, b"k" * 32, rekey_after=3)
        default = Session(b"p" * 16, 1, Role.INITIATOR, 0, b"k" * 32, b"K" * 32)
        self.assertEqual(default._rekey_after, 2**32)
        for _ in range(2):
            recv.open(send.seal(1, b""))
        self.assertFalse(send.needs_rekey or recv.needs_rekey)
        recv.open(send.seal(1, b""))
        self.assertTrue(send.needs_rekey)
        self.assertTrue(recv.needs_rekey)

    def test_counter_never_wraps(self):
        """At the last counter value sealing is refused, not wrapped."""
        session = Session(b"p" * 16, 1, Role.INITIATOR, 0, b"k" * 32, b"K" * 32)
        session._sent = MAX_COUNTER - 1
        self.assertEqual(session.seal(1, b"")["counter"], MAX_COUNTER)
        self.assertSession("exhausted", session.seal, 1, b"")
        small = Session(b"p" * 16, 1, Role.INITIATOR, 0, b"k" * 32, b"K" * 32, reject_after=2)
        small.seal(1, b"")
        small.seal(1, b"")
        self.assertSession("exhausted", small.seal, 1, b"")
        self.assertEqual(small.sent, 2)

    def test_expiry(self):
        """A session expires max_age after it was made (default one hour)."""
        self.assertFalse(self.sa.expired(3599.9))
        self.assertTrue(self.sa.expired(3600))
        self.assertEqual(self.sa.expires_at, 3600)


class TableTests(Checks, unittest.TestCase):
    def test_responder_waits_for_confirmation(self):
        """The responder sends only once a message has proved the initiator has the keys."""
        a, b = Node(), Node()
        sa, sb = handshake(a, b)
        self.assertIs(a.table.get(b.id, 0), sa)
        self.assertIsNone(b.table.get(a.id, 0))
        self.assertIs(b.table.by_id(sb.session_id, 0), sb)
        receive(b.table, data(sa), 1)
        self.assertIs(b.table.get(a.id, 1), sb)

    def test_simultaneous_initiation(self):
        """Both ends initiating at once converge on the handshake of the lower peer id."""
        for order in ("low_first", "high_first", "late_high_init"):
            low, high = ordered_pair()
            init_low = send_init(low, high, 0)
            init_high = send_init(high, low, 0)
            if order == "high_first":
                self.assertHandshake("collision", low.table.on_init, high.id, *init_high, 0)
            resp, s_high = answer(high, low, init_low, 0)
            self.assertEqual(high.table.pending_count, 0)
            if order == "low_first":
                self.assertHandshake("collision", low.table.on_init, high.id, *init_high, 0)
            s_low = low.table.on_resp(high.id, resp, 0)
            if order == "late_high_init":
                late_resp, _ = answer(low, high, init_high, 0.5)
                self.assertHandshake("unknown_handshake", high.table.on_resp, low.id,
                                     late_resp, 0.5)
            receive(high.table, data(low.table.get(high.id, 1)), 1)
            receive(low.table, data(high.table.get(low.id, 1)), 1)
            self.assertEqual(low.table.get(high.id, 1).session_id, s_low.session_id, order)
            self.assertEqual(high.table.get(low.id, 1).session_id, s_low.session_id, order)
            self.assertEqual(s_high.session_id, s_low.session_id)
            self.assertEqual((low.table.pending_count, high.table.pending_count), (0, 0))

    def test_rekey_grace(self):
        """After a rekey the old session opens in-flight messages for the grace period, then not."""
        a, b = Node(), Node()
        s1a, s1b = handshake(a, b, 0)
        receive(b.table, data(s1a), 1)
        in_flight_ab = data(s1a, b"old a->b")
        in_flight_ba = [data(s1b, b"old b->a %d" % i) for i in range(3)]

        resp, s2b = answer(b, a, send_init(a, b, 100), 100)
        self.assertIs(b.table.get(a.id, 100), s1b)
        s2a = a.table.on_resp(b.id, resp, 100)
        self.assertIs(a.table.get(b.id, 100), s2a)
        # A still opens B's old-session traffic: B has not switched yet.
        self.assertEqual(receive(a.table, in_flight_ba[0], 101), (T.APP_DATA, b"old b->a 0"))

        # A's first message on the new session makes B switch; B's grace starts then.
        receive(b.table, data(a.table.get(b.id, 102), b"new"), 102)
        self.assertIs(b.table.get(a.id, 102), s2b)
        self.assertEqual(receive(b.table, in_flight_ab, 131), (T.APP_DATA, b"old a->b"))
        self.assertIsNone(b.table.by_id(s1b.session_id, 132))

        # A's grace counts from its first table call after it sent on the new session.
        self.assertEqual(receive(a.table, in_flight_ba[1], 103), (T.APP_DATA, b"old b->a 1"))
        self.assertEqual(receive(a.table, in_flight_ba[2], 132), (T.APP_DATA, b"old b->a 2"))
        self.assertIsNone(a.table.by_id(s1a.session_id, 133))
        self.assertEqual(receive(a.table, data(s2b, b"b on new"), 133), (T.APP_DATA, b"b on new"))

    def test_old_session_kept_until_peer_switches(self):
        """An initiator keeps the old session for as long as it has not sent on the new one."""
        a, b = Node(), Node()
        s1a, s1b = handshake(a, b, 0)
        receive(b.table, data(s1a), 1)
        resp, _ = answer(b, a, send_init(a, b, 10), 10)
        a.table.on_resp(b.id, resp, 10)
        self.assertIs(b.table.get(a.id, 500), s1b)
        self.assertEqual(receive(a.table, data(s1b, b"still old"), 500), (T.APP_DATA, b"still old"))

    def test_old_sessions_bounded(self):
        """Rekeying again and again keeps at most three replaced sessions per peer."""
        a, b = Node(), Node()
        sessions = [handshake(a, b, float(i * 10))[0] for i in range(6)]
        live = [s for s in sessions if a.table.by_id(s.session_id, 60) is not None]
        self.assertEqual(live, sessions[-4:])

    def test_get_skips_expired(self):
        """get and by_id stop returning a session once it is past max_age."""
        a, b = Node(max_age=60.0), Node(max_age=60.0)
        sa, sb = handshake(a, b, 0)
        receive(b.table, data(sa), 1)
        self.assertIs(a.table.get(b.id, 59), sa)
        self.assertIsNone(a.table.get(b.id, 60))
        self.assertIsNone(b.table.by_id(sb.session_id, 60))
        self.assertEqual(len(a.table), 0)

    def test_expire(self):
        """expire drops expired sessions, stale pending handshakes and old replay entries."""
        a, b, c = Node(max_age=60.0), Node(max_age=60.0), Node()
        sa, _ = handshake(a, b, 0)
        send_init(a, c, 0)
        self.assertEqual(a.table.expire(59), 0)
        self.assertEqual((len(a.table), a.table.pending_count), (1, 1))
        self.assertEqual(a.table.expire(121), 1)
        self.assertEqual((len(a.table), a.table.pending_count), (0, 0))
        self.assertIsNone(a.table.by_id(sa.session_id))
        b.table.expire(121)
        self.assertEqual(b.table._seen, {})

    def test_drop(self):
        """drop forgets every session and the pending handshake with a peer."""
        a, b = Node(), Node()
        sa, _ = handshake(a, b)
        send_init(a, b, 10)
        a.table.drop(b.id)
        self.assertIsNone(a.table.get(b.id, 10))
        self.assertIsNone(a.table.by_id(sa.session_id))
        self.assertEqual((len(a.table), a.table.pending_count), (0, 0))

    def test_peers_bounded(self):
        """Beyond max_peers the least recently used peer's sessions are forgotten."""
        a = Node(max_peers=2)
        peers = [Node() for _ in range(3)]
        first, _ = handshake(a, peers[0], 0)
        second, _ = handshake(a, peers[1], 0)
        a.table.get(peers[0].id, 1)
        handshake(a, peers[2], 2)
        self.assertEqual(len(a.table), 2)
        self.assertIs(a.table.by_id(first.session_id), first)
        self.assertIsNone(a.table.by_id(second.session_id))

    def test_pending_bounded(self):
        """Beyond max_pending the oldest handshake in flight is abandoned."""
        a = Node(max_pending=2)
        peers = [Node() for _ in range(3)]
        inits = [send_init(a, p, float(i)) for i, p in enumerate(peers)]
        self.assertEqual(a.table.pending_count, 2)
        resp, _ = answer(peers[0], a, inits[0], 3)
        self.assertHandshake("unknown_handshake", a.table.on_resp, peers[0].id, resp, 3)
        resp, _ = answer(peers[2], a, inits[2], 3)
        a.table.on_resp(peers[2].id, resp, 3)

    def test_replay_cache_bounded(self):
        """A full replay cache refuses new INITs (busy) until its entries age out."""
        b = Node(max_replay=2)
        others = [Node() for _ in range(3)]
        inits = [send_init(o, b, 0) for o in others]
        b.table.on_init(others[0].id, *inits[0], 0)
        b.table.on_init(others[1].id, *inits[1], 0)
        self.assertHandshake("busy", b.table.on_init, others[2].id, *inits[2], 1)
        fresh = send_init(others[2], b, 120.5)
        b.table.on_init(others[2].id, *fresh, 120.5)
        self.assertEqual(len(b.table._seen), 1)

    def test_reasons_are_tokens(self):
        """Reasons are short lower-case tokens usable as metric labels."""
        for reason in HANDSHAKE_REASONS | SESSION_REASONS:
            self.assertRegex(reason, r"^[a-z_]+$")


# Ed25519 point arithmetic after RFC 8032, only to check the small-order key
# list independently of where it was copied from.
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_ORIGIN = (0, 1)


def _add(a, b):
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, _P - 2, _P) % _P,
            (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P)


def _points(encoding):
    """Both points (x and -x) with the y of an encoding, reduced mod p."""
    y = int.from_bytes(encoding, "little") & ((1 << 255) - 1)
    y %= _P
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    assert (x * x - x2) % _P == 0, "not on the curve"
    return {(x, y), (-x % _P, y)}


class WeakKeyTests(Checks, unittest.TestCase):
    def test_list_is_the_small_order_subgroup(self):
        """The refused keys are exactly the eight points of order dividing 8."""
        points = set()
        for key in identity_module._SMALL_ORDER_KEYS:
            for point in _points(key):
                multiple = point
                for _ in range(3):
                    multiple = _add(multiple, multiple)
                self.assertEqual(multiple, _ORIGIN, key.hex())
                points.add(point)
        self.assertEqual(len(points), 8)

    def test_anyone_can_sign_for_a_small_order_key(self):
        """Why the check exists: OpenSSL alone takes a zero signature by the zero key; verify_signature does not."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        accepted_by_openssl = False
        for i in range(64):
            message = b"message %d" % i
            self.assertFalse(verify_signature(bytes(32), bytes(64), message))
            try:
                Ed25519PublicKey.from_public_bytes(bytes(32)).verify(bytes(64), message)
                accepted_by_openssl = True
            except (InvalidSignature, ValueError):
                pass
        if not accepted_by_openssl:
            raise unittest.SkipTest("this OpenSSL refuses small-order keys by itself")

    def test_weak_keys_refused(self):
        """An INIT or RESP from a small-order identity key is refused, whatever the sign bit."""
        a, b = Node(), Node()
        message, raw = send_init(a, b, 0)
        resp, _ = answer(b, a, (message, raw), 0)
        for key in identity_module._SMALL_ORDER_KEYS:
            for variant in (key, key[:31] + bytes((key[31] | 0x80,))):
                self.assertTrue(weak_identity_key(variant))
                init = dict(message, initiator_key=variant)
                self.assertHandshake("weak_key", b.table.on_init, peer_id_for(variant),
                                     init, None, 0)
                forged = dict(resp, responder_key=variant)
                self.assertHandshake("wrong_peer", a.table.on_resp, peer_id_for(variant),
                                     forged, 0)
        self.assertFalse(weak_identity_key(a.identity.public_key))

    def test_weak_responder_key(self):
        """A RESP whose key is small-order is refused even from the peer it names."""
        weak = bytes(32)
        w = peer_id_for(weak)
        a = Node()
        fields, _ = a.table.initiate(w, 0)
        resp = {"handshake_id": fields["handshake_id"], "responder_key": weak,
                "ephemeral": fresh_x25519(), "signature": bytes(64)}
        self.assertHandshake("weak_key", a.table.on_resp, w, resp, 0)


class FuzzTests(unittest.TestCase):
    """
    Random handshake fields, with the sender and addressing often right so
    that the signature and key checks are reached, never raise anything but
    HandshakeError and never leave a session behind.
    """

    def setUp(self):
        self.node, self.peer = Node(), Node()
        self.table = self.node.table
        self.init, _ = send_init(self.node, self.peer, 0)

    @given(
        st.fixed_dictionaries({
            "handshake_id": st.integers(0, MAX_COUNTER),
            "initiator_key": st.binary(min_size=32, max_size=32),
            "ephemeral": st.binary(min_size=32, max_size=32),
            "timestamp_ms": st.integers(0, MAX_COUNTER),
            "signature": st.binary(min_size=64, max_size=64),
        }),
        st.booleans(),
        st.booleans(),
    )
    @settings(max_examples=200)
    def test_random_init(self, fields, right_sender, right_time):
        """Random INIT fields only ever raise HandshakeError."""
        fields = dict(fields, responder=self.node.id)
        if right_time:
            fields["timestamp_ms"] = 1000
        sender = peer_id_for(fields["initiator_key"]) if right_sender else b"x" * 16
        self.assertRaises(HandshakeError, self.table.on_init, sender, fields, None, 1)
        self.assertEqual(len(self.table), 0)

    @given(st.integers(0, MAX_COUNTER), st.binary(min_size=32, max_size=32),
           st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64),
           st.booleans(), st.booleans())
    @settings(max_examples=200)
    def test_random_resp(self, hid, key, ephemeral, signature, right_id, right_key):
        """Random RESP fields only ever raise HandshakeError; the pending handshake survives."""
        fields = {
            "handshake_id": self.init["handshake_id"] if right_id else hid,
            "responder_key": self.peer.identity.public_key if right_key else key,
            "ephemeral": ephemeral,
            "signature": signature,
        }
        self.assertRaises(HandshakeError, self.table.on_resp, self.peer.id, fields, 0)
        self.assertEqual((len(self.table), self.table.pending_count), (0, 1))


class OpenArgumentTests(unittest.TestCase):
    def test_fields_of_the_wrong_type_are_malformed(self):
        """An integer 'sealed' (bytes(n) would allocate n bytes) or a float session id is refused."""
        from omerta.crypto.session import Role, Session, SessionError

        session = Session(b"p" * 16, 7, Role.RESPONDER, 0.0, bytes(32), bytes(32))
        for fields in ({"session_id": 7, "counter": 1, "sealed": 2**32},
                       {"session_id": 7.0, "counter": 1, "sealed": b"x" * 20}):
            error = self.assertRaises(SessionError, session.open, fields)
            self.assertEqual(error.reason, "malformed")
