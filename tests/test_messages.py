"""
Message bodies: golden bytes built independently of construct, round trips,
and fuzzing that only ParseError ever escapes.
"""

import socket
import struct

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from omerta.wire.codec import as_plain
from omerta.wire import ParseError
from omerta.wire.messages import (
    BODIES,
    MessageType as T,
    build_body,
    build_record,
    parse_body,
    parse_record,
)

P1 = bytes(range(16))
P2 = bytes(range(16, 32))


def ep4(ip, port):
    return b"\x04" + socket.inet_aton(ip) + struct.pack("!H", port)


def ep6(ip, port):
    return b"\x06" + socket.inet_pton(socket.AF_INET6, ip) + struct.pack("!H", port)


def text(s):
    raw = s.encode()
    return bytes([len(raw)]) + raw


def path(kind, endpoint, via):
    return bytes([kind]) + endpoint + via


SIGNED = {"record": b"REC", "signature": b"S" * 64}
SIGNED_BYTES = b"\x00\x03REC" + b"S" * 64
PATH = {"kind": 2, "endpoint": ("10.0.0.1", 7), "via": P2}
PATH_BYTES = path(2, ep4("10.0.0.1", 7), P2)

# (type, value, golden bytes written out from the documented layout)
CASES = [
    (
        T.PING,
        {"nonce": 1, "sent_ms": 2, "flags": 1,
         "contacts": [{"peer_id": P1, "endpoint": ("::1", 9), "age_ms": 3}],
         "padding": b"\x00\x00"},
        struct.pack("!QQBB", 1, 2, 1, 1) + P1 + ep6("::1", 9) + struct.pack("!IH", 3, 2)
        + b"\x00\x00",
    ),
    (
        T.PONG,
        {"nonce": 1, "echo_ms": 2, "observed": ("192.0.2.1", 7400), "contacts": [],
         "proof": b"K" * 32 + b"S" * 64},
        struct.pack("!QQ", 1, 2) + ep4("192.0.2.1", 7400) + b"\x00\x60" + b"K" * 32 + b"S" * 64,
    ),
    (T.ANNOUNCE, {"hops": 2, "announcement": SIGNED}, b"\x02" + SIGNED_BYTES),
    (
        T.PEER_LIST,
        {"request": True, "announcements": [{"hops": 1, "announcement": SIGNED},
                                            {"hops": 2, "announcement": SIGNED}]},
        b"\x01\x02" + b"\x01" + SIGNED_BYTES + b"\x02" + SIGNED_BYTES,
    ),
    (T.FIND_PEER, {"query_id": 5, "target": P1, "hops": 3}, struct.pack("!Q", 5) + P1 + b"\x03"),
    (T.PEER_INFO, {"query_id": 5, "announcement": SIGNED}, struct.pack("!Q", 5) + SIGNED_BYTES),
    (T.PEER_NOT_FOUND, {"query_id": 5, "target": P1}, struct.pack("!Q", 5) + P1),
    (
        T.FRESHNESS_QUERY,
        {"query_id": 6, "origin": P1, "target": P2, "max_age_s": 300, "hops": 5},
        struct.pack("!Q", 6) + P1 + P2 + struct.pack("!IB", 300, 5),
    ),
    (
        T.FRESHNESS_ANSWER,
        {"query_id": 6, "target": P2, "heard_ago_ms": 1500, "path": PATH},
        struct.pack("!Q", 6) + P2 + struct.pack("!I", 1500) + PATH_BYTES,
    ),
    (T.PATH_FAILED, {"target": P2, "path": PATH}, P2 + PATH_BYTES),
    (
        T.INDIRECT_PING,
        {"nonce": 4, "target": P2, "endpoint": ("10.0.0.9", 7400)},
        struct.pack("!Q", 4) + P2 + ep4("10.0.0.9", 7400),
    ),
    (
        T.INDIRECT_ACK,
        {"nonce": 4, "target": P2, "alive": True, "rtt_us": 1500},
        struct.pack("!Q", 4) + P2 + b"\x01" + struct.pack("!I", 1500),
    ),
    (
        T.MEMBERSHIP,
        {"notices": [{"kind": 1, "peer": P1, "sequence": 9, "by": P2, "signature": b""},
                     {"kind": 3, "peer": P2, "sequence": 10, "by": bytes(16),
                      "signature": b"S" * 64}]},
        b"\x02" + b"\x01" + P1 + struct.pack("!Q", 9) + P2 + b"\x00"
        + b"\x03" + P2 + struct.pack("!Q", 10) + bytes(16) + b"\x40" + b"S" * 64,
    ),
    (
        T.SYNC_DIGEST,
        {"buckets": 2, "hashes": [1, 0xFFFFFFFF]},
        struct.pack("!HHII", 2, 2, 1, 0xFFFFFFFF),
    ),
    (
        T.SYNC_SUMMARY,
        {"buckets": 4, "indices": [1, 3], "entries": [{"peer": P1, "sequence": 7}],
         "want": [P2]},
        struct.pack("!HBHHB", 4, 2, 1, 3, 1) + P1 + struct.pack("!Q", 7) + b"\x01" + P2,
    ),
    (T.RELAY_RESERVE, {"lifetime_s": 600}, struct.pack("!I", 600)),
    (
        T.RELAY_ACCEPT,
        {"lifetime_s": 600, "session_limit": 50, "free_sessions": 49},
        struct.pack("!IHH", 600, 50, 49),
    ),
    (
        T.RELAY_DENY,
        {"request": 0x14, "target": P2, "reason": 1, "detail": "full"},
        b"\x14" + P2 + b"\x01" + text("full"),
    ),
    (T.RELAY_END, {"session": b"S" * 8, "reason": 2}, b"S" * 8 + b"\x02"),
    (T.RELAY_CONNECT, {"target": P1}, P1),
    (
        T.RELAY_SESSION,
        {"session": b"S" * 8, "peer": P2, "lifetime_s": 3600, "max_bytes": 2**30},
        b"S" * 8 + P2 + struct.pack("!IQ", 3600, 2**30),
    ),
    (
        T.PUNCH_REQUEST,
        {"attempt_id": 7, "target": P2, "nat_type": 5,
         "candidates": [{"kind": 1, "endpoint": ("10.0.0.2", 1)}]},
        struct.pack("!Q", 7) + P2 + b"\x05\x01" + b"\x01" + ep4("10.0.0.2", 1),
    ),
    (
        T.PUNCH_EXECUTE,
        {"attempt_id": 7, "peer": P1, "strategy": 1, "start_in_ms": 250, "spray": 64,
         "candidates": []},
        struct.pack("!Q", 7) + P1 + struct.pack("!BIHB", 1, 250, 64, 0),
    ),
    (
        T.PUNCH_PROBE,
        {"attempt_id": 7, "seq": 3, "sent_ms": 5, "padding": b""},
        struct.pack("!QHQH", 7, 3, 5, 0),
    ),
    (
        T.PUNCH_ACK,
        {"attempt_id": 7, "seq": 3, "observed": ("198.51.100.1", 40000), "proof": b""},
        struct.pack("!QH", 7, 3) + ep4("198.51.100.1", 40000) + b"\x00",
    ),
    (
        T.PUNCH_RESULT,
        {"attempt_id": 7, "peer": P1, "success": True, "endpoint": ("10.0.0.3", 4), "elapsed_ms": 120},
        struct.pack("!Q", 7) + P1 + b"\x01" + ep4("10.0.0.3", 4) + struct.pack("!I", 120),
    ),
    (T.PUNCH_READY, {"attempt_id": 7}, struct.pack("!Q", 7)),
    (T.APP_DATA, {"channel": "vm", "payload": b"\x00\xff"}, text("vm") + b"\x00\xff"),
    (
        T.REQUEST,
        {"request_id": 8, "trace_id": b"T" * 8, "channel": "vm", "timeout_ms": 10000, "payload": b"q"},
        struct.pack("!Q", 8) + b"T" * 8 + text("vm") + struct.pack("!I", 10000) + b"q",
    ),
    (
        T.HANDSHAKE_INIT,
        {"handshake_id": 1, "initiator_key": b"I" * 32, "ephemeral": b"E" * 32,
         "responder": P2, "timestamp_ms": 9, "signature": b"S" * 64},
        struct.pack("!Q", 1) + b"I" * 32 + b"E" * 32 + P2 + struct.pack("!Q", 9) + b"S" * 64,
    ),
    (
        T.HANDSHAKE_RESP,
        {"handshake_id": 1, "responder_key": b"R" * 32, "ephemeral": b"F" * 32,
         "signature": b"S" * 64},
        struct.pack("!Q", 1) + b"R" * 32 + b"F" * 32 + b"S" * 64,
    ),
    (
        T.SESSION_DATA,
        {"session_id": 2, "counter": 3, "sealed": b"ciphertext"},
        struct.pack("!QQ", 2, 3) + b"ciphertext",
    ),
    (
        T.RESPONSE,
        {"request_id": 8, "trace_id": b"T" * 8, "status": 0, "payload": b"a"},
        struct.pack("!Q", 8) + b"T" * 8 + b"\x00a",
    ),
]



class BodyTests(unittest.TestCase):
    def test_every_type_has_a_golden_case(self):
        """The golden table covers the whole message catalogue."""
        self.assertEqual({case[0] for case in CASES}, set(BODIES))

    def test_golden_bytes(self):
        """Each body builds to exactly its documented bytes."""
        for msg_type, value, golden in CASES:
            self.assertEqual(build_body(msg_type, value), golden, msg_type.name)

    def test_round_trip(self):
        """Parsing the golden bytes gives back the value."""
        for msg_type, value, golden in CASES:
            self.assertEqual(as_plain(parse_body(msg_type, golden)), value, msg_type.name)

    def test_trailing_bytes_rejected(self):
        """A fixed-size body followed by extra bytes is malformed."""
        for msg_type, value, golden in CASES:
            if msg_type in (T.APP_DATA, T.REQUEST, T.RESPONSE, T.SESSION_DATA):
                continue
            self.assertRaises(ParseError, parse_body, msg_type, golden + b"x")

    def test_truncated_rejected(self):
        """Every prefix that stops before the free-form payload is malformed."""
        for msg_type, value, golden in CASES:
            fixed = len(golden) - len(value.get("payload", value.get("sealed", b"")))
            for cut in range(fixed):
                self.assertRaises(ParseError, parse_body, msg_type, golden[:cut])

    def test_unknown_type(self):
        """A type outside the catalogue is a ParseError naming it."""
        error = self.assertRaises(ParseError, parse_body, 0x7F, b"")
        self.assertIn("0x7f", str(error))

    def test_bad_endpoint_family(self):
        """An endpoint family other than 4 or 6 is malformed."""
        bad = struct.pack("!QQ", 1, 2) + b"\x05" + bytes(6) + b"\x00\x00"
        self.assertRaises(ParseError, parse_body, T.PONG, bad)

    def test_bad_utf8(self):
        """A channel name that is not UTF-8 is malformed."""
        self.assertRaises(ParseError, parse_body, T.APP_DATA, b"\x02\xff\xfe")

    @settings(max_examples=300)
    @given(st.sampled_from(sorted(BODIES)), st.binary(max_size=200))
    def test_fuzz_only_parse_error(self, msg_type, data):
        """Random bytes for any type either parse or raise ParseError, nothing else."""
        try:
            parse_body(msg_type, data)
        except ParseError:
            pass

    @given(st.integers(0, 255), st.binary(max_size=64))
    def test_fuzz_any_type_byte(self, msg_type, data):
        """Any type byte with random bytes raises at most ParseError."""
        try:
            parse_body(msg_type, data)
        except ParseError:
            pass


class RecordTests(unittest.TestCase):
    RECORD = {
        "public_key": b"K" * 32,
        "name": "relay-1",
        "sequence": 3,
        "timestamp_ms": 4,
        "ttl_s": 3600,
        "nat_type": 1,
        "capabilities": 1,
        "paths": [PATH],
        "resources": {"cpu_cores": 8, "memory_mb": 16384, "disk_gb": 500, "gpus": 1},
    }

    def test_golden(self):
        """An announcement record has its documented layout."""
        golden = (
            b"K" * 32 + text("relay-1") + struct.pack("!QQIBH", 3, 4, 3600, 1, 1)
            + b"\x01" + PATH_BYTES + struct.pack("!HIIB", 8, 16384, 500, 1)
        )
        self.assertEqual(build_record(self.RECORD), golden)
        self.assertEqual(as_plain(parse_record(golden)), self.RECORD)

    @given(st.binary(max_size=200))
    def test_fuzz(self, data):
        """Random record bytes raise at most ParseError."""
        try:
            parse_record(data)
        except ParseError:
            pass


_endpoints = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)))
_contacts = st.lists(st.fixed_dictionaries({
    "peer_id": st.binary(min_size=16, max_size=16), "endpoint": _endpoints,
    "age_ms": st.integers(0, 2**32 - 1)}), max_size=5)
_pings = st.fixed_dictionaries({
    "nonce": st.integers(0, 2**64 - 1), "sent_ms": st.integers(0, 2**64 - 1),
    "flags": st.integers(0, 255), "contacts": _contacts, "padding": st.binary(max_size=300)})
_pongs = st.fixed_dictionaries({
    "nonce": st.integers(0, 2**64 - 1), "echo_ms": st.integers(0, 2**64 - 1),
    "observed": _endpoints, "contacts": _contacts, "proof": st.binary(max_size=255)})


class FastPathTests(unittest.TestCase):
    """PING and PONG go through struct, every byte as the construct definitions say."""

    def same(self, msg_type, value):
        fast = build_body(msg_type, value)
        self.assertEqual(fast, BODIES[msg_type].build(value))
        self.assertEqual(as_plain(parse_body(msg_type, fast)),
                         as_plain(BODIES[msg_type].parse(fast)))

    @given(_pings)
    def test_ping(self, value):
        """A PING's bytes and parsed value are the construct definition's."""
        self.same(T.PING, value)

    @given(_pongs)
    def test_pong(self, value):
        """A PONG's bytes and parsed value are the construct definition's."""
        self.same(T.PONG, value)

    @given(st.sampled_from([T.PING, T.PONG]), st.binary(max_size=200))
    @settings(max_examples=2000)
    def test_same_verdict_on_any_bytes(self, msg_type, data):
        """Any bytes parse to the construct definition's value, or fail with ParseError as it does."""
        from omerta.wire.codec import parse_exact
        try:
            expected = as_plain(parse_exact(BODIES[msg_type], data, msg_type.name))
        except ParseError:
            self.assertRaises(ParseError, parse_body, msg_type, data)
        else:
            self.assertEqual(as_plain(parse_body(msg_type, data)), expected)
