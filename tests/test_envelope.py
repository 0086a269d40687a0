"""
The envelope header: golden bytes, and the struct fast path against the
construct specification.
"""

from hypothesis import given, strategies as st
from twisted.trial import unittest

from omerta.wire import ParseError
from omerta.wire.envelope import (
    HEADER_SIZE,
    MAGIC,
    MIN_FRAME_SIZE,
    HeaderStruct,
    build_header,
    is_frame,
    parse_header,
)

headers = st.fixed_dictionaries(
    {
        "version": st.just(1),
        "type": st.integers(0, 255),
        "network_id": st.binary(min_size=8, max_size=8),
        "sender": st.binary(min_size=16, max_size=16),
        "boot": st.binary(min_size=8, max_size=8),
        "counter": st.integers(0, 2**64 - 1),
    }
)


def _args(h):
    return h["type"], h["network_id"], h["sender"], h["boot"], h["counter"]


class HeaderTests(unittest.TestCase):
    def test_golden(self):
        """The header layout is magic, version, type, network, sender, boot, counter."""
        header = build_header(0x03, bytes(range(8)), bytes(range(16)), b"BOOTBOOT", 0x0102)
        expected = (
            "f04d" "01" "03" "0001020304050607" "000102030405060708090a0b0c0d0e0f"
            "424f4f54424f4f54" "0000000000000102"
        )
        self.assertEqual(header.hex(), expected)
        self.assertEqual(HEADER_SIZE, 44)

    @given(headers)
    def test_fast_path_builds_same_bytes_as_construct(self, h):
        """The precompiled struct and the construct definition build identical bytes."""
        self.assertEqual(build_header(*_args(h)), HeaderStruct.build(h))

    @given(headers, st.binary(min_size=16, max_size=64))
    def test_fast_path_parses_like_construct(self, h, rest):
        """The fast parser reads every field exactly as construct does."""
        frame = HeaderStruct.build(h) + rest
        fast = parse_header(frame)
        slow = HeaderStruct.parse(frame)
        for name in ("version", "type", "network_id", "sender", "boot", "counter"):
            self.assertEqual(getattr(fast, name), slow[name])

    def test_too_short(self):
        """A frame without room for a header and a tag is a ParseError."""
        frame = build_header(1, bytes(8), bytes(16), bytes(8), 1) + bytes(15)
        self.assertEqual(len(frame), MIN_FRAME_SIZE - 1)
        self.assertRaises(ParseError, parse_header, frame)

    def test_bad_version(self):
        """An unknown version is refused rather than misread."""
        frame = bytearray(build_header(1, bytes(8), bytes(16), bytes(8), 1) + bytes(16))
        frame[2] = 2
        error = self.assertRaises(ParseError, parse_header, bytes(frame))
        self.assertIn("version 2", str(error))

    def test_magic_never_looks_like_stun(self):
        """The magic's first byte has its top bits set, so STUN demux cannot confuse it."""
        self.assertEqual(MAGIC[0] & 0xC0, 0xC0)
        self.assertTrue(is_frame(MAGIC + bytes(60)))
        self.assertFalse(is_frame(b"\x00\x01" + bytes(60)))
