"""
The provider protocol codec (omerta.wire.vm): golden bytes typed out from
the layout in the module docstring for one request of each op and for
replies, round trips, every malformed case refused with ParseError, fuzzing
that only ParseError ever escapes, and VM ids in their printed form.
"""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from omerta.wire.codec import as_plain
from omerta.wire import ParseError
from omerta.wire.vm import (
    MAX_VMS_PER_REPLY,
    NO_KEY,
    VERSION,
    VmOp,
    VmStatus,
    build_reply,
    build_request,
    parse_reply,
    parse_request,
    vm_id_bytes,
)


def unhex(text):
    return bytes.fromhex("".join(text.split()))


KEY = bytes(range(32))
PROVIDER_KEY = bytes(range(0x20, 0x40))
VM_ID = unhex("01 23 45 67 89 ab cd ef")

CREATE = {
    "vcpus": 2,
    "memory_mb": 2048,
    "disk_gb": 10,
    "image": "debian",
    "name": "web",
    "wg_public_key": KEY,
    "ssh_key": "ssh-ed25519 AAAA",
}
CREATE_BYTES = (
    unhex("02 01")  # version 2, op CREATE
    + unhex("00 02")  # vcpus 2
    + unhex("00 00 08 00")  # memory 2048 MiB
    + unhex("00 00 00 0a")  # disk 10 GiB
    + b"\x06" + b"debian"
    + b"\x03" + b"web"
    + KEY
    + unhex("00 10") + b"ssh-ed25519 AAAA"
)

RELEASE_BYTES = unhex("02 02") + VM_ID
LIST_BYTES = unhex("02 03")
STATUS_BYTES = unhex("02 04") + VM_ID

RECORD = {
    "vm_id": VM_ID,
    "name": "web",
    "state": "running",
    "vcpus": 2,
    "memory_mb": 2048,
    "disk_gb": 10,
    "image": "debian",
    "created_ms": 1_700_000_000_000,
    "address": "10.99.0.2",
    "wg_public_key": PROVIDER_KEY,
    "path_kind": "direct",
    "tunnel_address": "100.64.7.2",
    "provider_tunnel_address": "100.64.7.1",
    "tunnel_prefix": 24,
    "tunnel_state": "ready",
    "host_key": "ssh-ed25519 AAAAC3",
}
RECORD_BYTES = (
    VM_ID
    + b"\x03" + b"web"
    + b"\x07" + b"running"
    + unhex("00 02")
    + unhex("00 00 08 00")
    + unhex("00 00 00 0a")
    + b"\x06" + b"debian"
    + unhex("00 00 01 8b cf e5 68 00")  # 1 700 000 000 000 ms
    + b"\x09" + b"10.99.0.2"
    + PROVIDER_KEY
    + b"\x06" + b"direct"
    + b"\x0a" + b"100.64.7.2"
    + b"\x0a" + b"100.64.7.1"
    + b"\x18"
    + b"\x05" + b"ready"
    + unhex("00 12") + b"ssh-ed25519 AAAAC3"
)
REPLY_BYTES = unhex("02 00 00 02") + b"ok" + b"\x01" + RECORD_BYTES
REFUSAL_BYTES = unhex("02 01 00 0b") + b"no capacity" + b"\x00"



class GoldenTests(unittest.TestCase):
    def test_created_ms_constant(self):
        """The hand-written created_ms bytes are the documented 8-byte big-endian integer."""
        self.assertEqual(int.from_bytes(unhex("00 00 01 8b cf e5 68 00"), "big"),
                         RECORD["created_ms"])

    def test_create(self):
        """CREATE is version, op, vcpus (2), memory (4), disk (4), image, name, key (32), ssh key."""
        self.assertEqual(len(CREATE_BYTES), 2 + 2 + 4 + 4 + 7 + 4 + 32 + 2 + 16)
        self.assertEqual(build_request(VmOp.CREATE, **CREATE), CREATE_BYTES)
        parsed = parse_request(CREATE_BYTES)
        self.assertEqual(parsed.version, VERSION)
        self.assertEqual(parsed.op, VmOp.CREATE)
        self.assertEqual(as_plain(parsed.body), CREATE)

    def test_release(self):
        """RELEASE is version, op, the 8-byte VM id."""
        self.assertEqual(build_request(VmOp.RELEASE, vm_id=VM_ID), RELEASE_BYTES)
        parsed = parse_request(RELEASE_BYTES)
        self.assertEqual((parsed.op, parsed.body.vm_id), (VmOp.RELEASE, VM_ID))

    def test_list(self):
        """LIST is version and op alone."""
        self.assertEqual(build_request(VmOp.LIST), LIST_BYTES)
        parsed = parse_request(LIST_BYTES)
        self.assertEqual((parsed.op, as_plain(parsed.body)), (VmOp.LIST, {}))

    def test_status(self):
        """STATUS is version, op, the 8-byte VM id."""
        self.assertEqual(build_request(VmOp.STATUS, vm_id=VM_ID), STATUS_BYTES)
        parsed = parse_request(STATUS_BYTES)
        self.assertEqual((parsed.op, parsed.body.vm_id), (VmOp.STATUS, VM_ID))

    def test_reply(self):
        """A reply is version, status, detail (2-byte length), count (1), VmRecords."""
        self.assertEqual(build_reply(VmStatus.OK, "ok", [RECORD]), REPLY_BYTES)
        parsed = parse_reply(REPLY_BYTES)
        self.assertEqual(
            (parsed.version, parsed.status, parsed.detail), (VERSION, VmStatus.OK, "ok"))
        self.assertEqual(as_plain(parsed.vms), [RECORD])

    def test_refusal(self):
        """An error reply carries its status and detail and no VMs."""
        self.assertEqual(build_reply(VmStatus.NO_CAPACITY, "no capacity"), REFUSAL_BYTES)
        parsed = parse_reply(REFUSAL_BYTES)
        self.assertEqual((parsed.status, parsed.detail, list(parsed.vms)),
                         (VmStatus.NO_CAPACITY, "no capacity", []))

    def test_status_values(self):
        """The status codes on the wire are fixed."""
        self.assertEqual([(s.name, s.value) for s in VmStatus], [
            ("OK", 0), ("NO_CAPACITY", 1), ("BAD_REQUEST", 2), ("UNKNOWN_VM", 3),
            ("NOT_YOURS", 4), ("FAILED", 5), ("UNAVAILABLE", 6)])

    def test_op_values(self):
        """The op codes on the wire are fixed."""
        self.assertEqual([(o.name, o.value) for o in VmOp],
                         [("CREATE", 1), ("RELEASE", 2), ("LIST", 3), ("STATUS", 4)])


class RoundTripTests(unittest.TestCase):
    def test_unicode_texts(self):
        """Non-ASCII names, images and details survive a round trip."""
        body = dict(CREATE, name="vm-é✓", image="débian")
        self.assertEqual(as_plain(parse_request(build_request(VmOp.CREATE, **body)).body), body)
        self.assertEqual(parse_reply(build_reply(VmStatus.FAILED, "échec ✗")).detail, "échec ✗")

    def test_long_detail(self):
        """A detail longer than 255 bytes fits (its length takes two bytes)."""
        detail = "x" * 1000
        self.assertEqual(parse_reply(build_reply(VmStatus.FAILED, detail)).detail, detail)

    def test_empty_address_and_no_key(self):
        """A VM without an address and a provider without a key round-trip as empty/zero."""
        record = dict(RECORD, address="", wg_public_key=NO_KEY, path_kind="", tunnel_address="",
                      provider_tunnel_address="", tunnel_prefix=0, host_key="")
        self.assertEqual(as_plain(parse_reply(build_reply(VmStatus.OK, "", [record])).vms),
                         [record])

    def test_most_vms(self):
        """A reply holds up to MAX_VMS_PER_REPLY records; one more cannot be built."""
        records = [RECORD] * MAX_VMS_PER_REPLY
        self.assertEqual(len(parse_reply(build_reply(VmStatus.OK, "", records)).vms),
                         MAX_VMS_PER_REPLY)
        self.assertRaises(ValueError, build_reply, VmStatus.OK, "", records + [RECORD])

    def test_unknown_status_parses(self):
        """The codec passes through a status it does not know (the caller decides)."""
        self.assertEqual(parse_reply(unhex("02 63 00 00 00")).status, 0x63)

    @given(
        st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
        st.text(max_size=60), st.text(max_size=60), st.binary(min_size=32, max_size=32),
        st.text(max_size=600),
    )
    def test_create_round_trip(self, vcpus, memory_mb, disk_gb, image, name, key, ssh_key):
        """Any CREATE whose fields fit parses back to itself."""
        body = dict(vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb, image=image,
                    name=name, wg_public_key=key, ssh_key=ssh_key)
        self.assertEqual(as_plain(parse_request(build_request(VmOp.CREATE, **body)).body), body)


class BuildErrorTests(unittest.TestCase):
    def test_key_size(self):
        """A key that is not 32 bytes cannot be built."""
        self.assertRaises(ValueError, build_request, VmOp.CREATE,
                          **dict(CREATE, wg_public_key=b"short"))

    def test_text_too_long(self):
        """A name over 255 UTF-8 bytes cannot be built."""
        self.assertRaises(ValueError, build_request, VmOp.CREATE, **dict(CREATE, name="é" * 128))

    def test_out_of_range(self):
        """vcpus beyond two bytes cannot be built."""
        self.assertRaises(ValueError, build_request, VmOp.CREATE, **dict(CREATE, vcpus=0x10000))

    def test_unknown_op(self):
        """An op outside VmOp cannot be built."""
        self.assertRaises(ValueError, build_request, 9)


class RejectionTests(unittest.TestCase):
    def test_wrong_version(self):
        """A request or reply of another version is malformed."""
        self.assertRaises(ParseError, parse_request, b"\x01" + LIST_BYTES[1:])
        self.assertRaises(ParseError, parse_reply, b"\x01" + REFUSAL_BYTES[1:])

    def test_unknown_op(self):
        """An op outside VmOp is malformed."""
        for op in (0, 5, 0xFF):
            self.assertRaises(ParseError, parse_request, bytes([VERSION, op]))

    def test_empty(self):
        """No bytes are no message."""
        self.assertRaises(ParseError, parse_request, b"")
        self.assertRaises(ParseError, parse_reply, b"")

    def test_truncated_requests(self):
        """Every strict prefix of a request is malformed."""
        for golden in (CREATE_BYTES, RELEASE_BYTES, LIST_BYTES, STATUS_BYTES):
            for cut in range(len(golden)):
                self.assertRaises(ParseError, parse_request, golden[:cut])

    def test_truncated_reply(self):
        """Every strict prefix of a reply is malformed."""
        for cut in range(len(REPLY_BYTES)):
            self.assertRaises(ParseError, parse_reply, REPLY_BYTES[:cut])

    def test_trailing_bytes(self):
        """Bytes after a complete message are malformed, and the error says so."""
        for golden in (CREATE_BYTES, RELEASE_BYTES, LIST_BYTES, STATUS_BYTES):
            error = self.assertRaises(ParseError, parse_request, golden + b"\x00")
            self.assertIn("trailing", str(error))
        self.assertRaises(ParseError, parse_reply, REPLY_BYTES + b"\x00")

    def test_bad_utf8(self):
        """A text field that is not UTF-8 is malformed."""
        bad_image = CREATE_BYTES.replace(b"\x06debian", b"\x06debi\xff\xfe")
        self.assertNotEqual(bad_image, CREATE_BYTES)
        self.assertRaises(ParseError, parse_request, bad_image)
        self.assertRaises(ParseError, parse_reply, unhex("01 05 00 02 ff fe 00"))
        bad_state = REPLY_BYTES.replace(b"\x07running", b"\x07runn\xc3\x28g")
        self.assertNotEqual(bad_state, REPLY_BYTES)
        self.assertRaises(ParseError, parse_reply, bad_state)

    def test_count_beyond_records(self):
        """A VM count larger than the records present is malformed."""
        self.assertRaises(ParseError, parse_reply, REPLY_BYTES[:4] + b"ok\x02" + RECORD_BYTES)


class FuzzTests(unittest.TestCase):
    @settings(max_examples=500)
    @given(st.binary(max_size=120))
    def test_random_request(self, data):
        """Random bytes parse as a request or raise ParseError, nothing else."""
        try:
            parse_request(data)
        except ParseError:
            pass

    @settings(max_examples=500)
    @given(st.sampled_from([1, 2, 3, 4, 5]), st.binary(max_size=80))
    def test_random_request_body(self, op, data):
        """A valid header with random body bytes raises at most ParseError."""
        try:
            parse_request(bytes([VERSION, op]) + data)
        except ParseError:
            pass

    @settings(max_examples=500)
    @given(st.binary(max_size=200))
    def test_random_reply(self, data):
        """Random bytes parse as a reply or raise ParseError, nothing else."""
        try:
            parse_reply(b"\x01" + data)
        except ParseError:
            pass

    @settings(max_examples=500)
    @given(st.integers(0, len(REPLY_BYTES) - 1), st.integers(0, 255))
    def test_mutated_reply(self, index, value):
        """A golden reply with any one byte changed raises at most ParseError."""
        data = bytearray(REPLY_BYTES)
        data[index] = value
        try:
            parse_reply(bytes(data))
        except ParseError:
            pass


class VmIdTests(unittest.TestCase):
    def test_printed_form(self):
        """16 hex digits, either case, are the 8 bytes on the wire."""
        self.assertEqual(vm_id_bytes("0123456789abcdef"), VM_ID)
        self.assertEqual(vm_id_bytes("0123456789ABCDEF"), VM_ID)

    def test_wrong_length(self):
        """Fewer or more than 16 hex digits is a ValueError saying what an id is."""
        for bad in ("", "0123", "0123456789abcdef00"):
            error = self.assertRaises(ValueError, vm_id_bytes, bad)
            self.assertIn("16 hex digits", str(error))

    def test_not_hex(self):
        """Non-hex characters are a ValueError saying what an id is."""
        for bad in ("0123456789abcdeg", "01234567 89abcdef", "0123456789abcdéf"):
            error = self.assertRaises(ValueError, vm_id_bytes, bad)
            self.assertIn("16 hex digits", str(error))
