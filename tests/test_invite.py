"""
Tests for L{omerta.wire.invite} and L{omerta.crypto.invite}.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from omerta.addressing import parse_bootstrap
from omerta.crypto.identity import Identity, verify_signature
from omerta.crypto.invite import (
    INVITE_PREFIX,
    Invite,
    InviteError,
    make_invite,
    parse_invite,
)
from omerta.crypto.network import NetworkKey, b64url_decode, b64url_encode
from omerta.wire import ParseError
from omerta.wire.invite import (
    build_invite_body,
    build_invite_payload,
    parse_invite_payload,
)

IDENTITY = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132))))
KEY = NetworkKey(bytes(range(32)))
CREATED = 1_700_000_000
EXPIRES = CREATED + 86_400

GOLDEN_LINK = (
    "omerta://join/AQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4fA2xhYgEAFnJlbGF5"
    "LTFAMTkyLjAuMi43Ojc0MDAAAAAAZVPxAAAAAABlVUKAC7w0aldmfDgBIL2cf9flHSxf3-o3zS9b"
    "9AWyxr9vLXjm0lKLbjXf0wM9-b_i9EdrfuboHodiQOEeDL0JumEDKLPtaeC-44O0LnlPDG09b2jt"
    "99k4puKeCa76zsFef9sP"
)

GOLDEN_PAYLOAD = bytes.fromhex(
    "01"  # version
    + bytes(range(32)).hex()  # network key
    + "03" + b"lab".hex()  # name
    + "01"  # one bootstrap peer
    + "0016" + b"relay-1@192.0.2.7:7400".hex()
    + "000000006553f100"  # created_at 1700000000
    + "0000000000000000"  # expires_at: never
    + "aa" * 32  # creator public key
    + "bb" * 64  # signature
)

SLOW = settings(derandomize=True, database=None, max_examples=300, deadline=None)


def sample_link(**overrides: object) -> str:
    arguments: dict = dict(
        identity=IDENTITY,
        key=KEY,
        name="lab",
        bootstrap=["relay-1@192.0.2.7:7400"],
        created_at=CREATED,
        expires_at=EXPIRES,
    )
    arguments.update(overrides)
    return make_invite(**arguments)


def payload_of(link: str) -> bytes:
    return b64url_decode(link[len(INVITE_PREFIX) :])


def link_of(payload: bytes) -> str:
    return INVITE_PREFIX + b64url_encode(payload)


def signed_link(identity: Identity = IDENTITY, **fields: object) -> str:
    """
    A correctly signed link built straight from payload fields, bypassing
    make_invite's checks.
    """
    values: dict = dict(
        network_key=KEY.secret,
        name="lab",
        bootstrap=["relay-1@192.0.2.7:7400"],
        created_at=CREATED,
        expires_at=0,
        creator_public_key=identity.public_key,
    )
    values.update(fields)
    body = build_invite_body(**values)
    return link_of(body + identity.sign(body))


class InvitePayloadTests(SynchronousTestCase):
    """
    The pure payload codec.
    """

    def test_goldenLayout(self) -> None:
        """
        The payload is version, key, name, bootstrap list, times, creator key
        and signature, in that order and with those widths.
        """
        built = build_invite_payload(
            bytes(range(32)),
            "lab",
            ["relay-1@192.0.2.7:7400"],
            1_700_000_000,
            0,
            b"\xaa" * 32,
            b"\xbb" * 64,
        )
        self.assertEqual(built, GOLDEN_PAYLOAD)

    def test_goldenParse(self) -> None:
        """
        Parsing the golden payload gives back every field.
        """
        parsed = parse_invite_payload(GOLDEN_PAYLOAD)
        self.assertEqual(parsed.network_key, bytes(range(32)))
        self.assertEqual(parsed.name, "lab")
        self.assertEqual(parsed.bootstrap, ("relay-1@192.0.2.7:7400",))
        self.assertEqual(parsed.created_at, 1_700_000_000)
        self.assertEqual(parsed.expires_at, 0)
        self.assertEqual(parsed.creator_public_key, b"\xaa" * 32)
        self.assertEqual(parsed.signature, b"\xbb" * 64)
        self.assertEqual(parsed.signed_data, GOLDEN_PAYLOAD[:-64])

    def test_roundTripManyPeers(self) -> None:
        """
        Sixteen bootstrap peers and a UTF-8 name survive build and parse.
        """
        peers = [f"relay-{i}@host{i}.example:{7400 + i}" for i in range(16)]
        built = build_invite_payload(
            KEY.secret, "réseau", peers, 5, 2**64 - 1, b"\x01" * 32, b"\x02" * 64
        )
        parsed = parse_invite_payload(built)
        self.assertEqual(parsed.bootstrap, tuple(peers))
        self.assertEqual(parsed.name, "réseau")
        self.assertEqual(parsed.expires_at, 2**64 - 1)

    def test_reprHidesKey(self) -> None:
        """
        The decoded payload's repr does not show the network key.
        """
        parsed = parse_invite_payload(GOLDEN_PAYLOAD)
        self.assertNotIn(repr(bytes(range(32))), repr(parsed))

    def test_trailingBytes(self) -> None:
        """
        A byte after the signature is refused.
        """
        self.assertRaises(ParseError, parse_invite_payload, GOLDEN_PAYLOAD + b"\x00")

    def test_truncated(self) -> None:
        """
        Every strict prefix of a payload is refused with ParseError.
        """
        for length in range(len(GOLDEN_PAYLOAD)):
            self.assertRaises(ParseError, parse_invite_payload, GOLDEN_PAYLOAD[:length])

    def test_unknownVersion(self) -> None:
        """
        A payload of another format version is refused, naming the version.
        """
        error = self.assertRaises(
            ParseError, parse_invite_payload, b"\x02" + GOLDEN_PAYLOAD[1:]
        )
        self.assertIn("version 2", str(error))

    def test_nameTooLongParse(self) -> None:
        """
        A name longer than 63 bytes is refused when parsing.
        """
        data = (
            GOLDEN_PAYLOAD[:33]
            + bytes([64])
            + b"n" * 64
            + GOLDEN_PAYLOAD[33 + 4 :]
        )
        error = self.assertRaises(ParseError, parse_invite_payload, data)
        self.assertIn("63", str(error))

    def test_emptyNameParse(self) -> None:
        """
        An empty name is refused when parsing.
        """
        data = GOLDEN_PAYLOAD[:33] + b"\x00" + GOLDEN_PAYLOAD[33 + 4 :]
        self.assertRaises(ParseError, parse_invite_payload, data)

    def test_tooManyPeersParse(self) -> None:
        """
        Seventeen bootstrap peers are refused when parsing.
        """
        head = GOLDEN_PAYLOAD[:37]
        peer = b"\x00\x03a@b"
        tail = GOLDEN_PAYLOAD[37 + 1 + 24 :]
        data = head + bytes([17]) + peer * 17 + tail
        error = self.assertRaises(ParseError, parse_invite_payload, data)
        self.assertIn("16", str(error))

    def test_badUtf8(self) -> None:
        """
        A name that is not UTF-8 is refused with ParseError.
        """
        data = GOLDEN_PAYLOAD[:34] + b"\xff\xfe\xfd" + GOLDEN_PAYLOAD[37:]
        self.assertRaises(ParseError, parse_invite_payload, data)

    def test_buildRefusesOversizedFields(self) -> None:
        """
        Building refuses a long name, too many peers and wrong-sized keys.
        """
        good = dict(
            network_key=KEY.secret,
            name="lab",
            bootstrap=[],
            created_at=1,
            expires_at=0,
            creator_public_key=b"\x00" * 32,
        )
        for change in [
            dict(name="n" * 64),
            dict(name=""),
            dict(bootstrap=["a@b:1"] * 17),
            dict(bootstrap=["x" * 385]),
            dict(network_key=b"\x00" * 31),
            dict(creator_public_key=b"\x00" * 33),
            dict(created_at=-1),
        ]:
            self.assertRaises(ValueError, build_invite_body, **{**good, **change})

    @SLOW
    @given(st.binary(max_size=600))
    def test_randomBytesOnlyParseError(self, data: bytes) -> None:
        """
        Arbitrary bytes either parse or raise ParseError, nothing else.
        """
        try:
            parse_invite_payload(data)
        except ParseError:
            pass

    @SLOW
    @given(
        st.lists(
            st.tuples(st.integers(0, len(GOLDEN_PAYLOAD) - 1), st.integers(0, 255)),
            min_size=1,
            max_size=4,
        ),
        st.integers(0, len(GOLDEN_PAYLOAD)),
    )
    def test_mutatedPayloadOnlyParseError(
        self, changes: list[tuple[int, int]], cut: int
    ) -> None:
        """
        A valid payload with bytes changed and a tail cut off either parses or
        raises ParseError, nothing else.
        """
        data = bytearray(GOLDEN_PAYLOAD)
        for index, value in changes:
            data[index] = value
        try:
            parse_invite_payload(bytes(data[:cut]))
        except ParseError:
            pass


class InviteTests(SynchronousTestCase):
    """
    Signing, verifying and interpreting invite links.
    """

    def test_roundTrip(self) -> None:
        """
        A made invite parses back to the same network, name, peers and times.
        """
        invite = parse_invite(sample_link(), now=CREATED)
        self.assertIsInstance(invite, Invite)
        self.assertEqual(invite.network_key, KEY)
        self.assertEqual(invite.name, "lab")
        self.assertEqual(invite.bootstrap, (parse_bootstrap("relay-1@192.0.2.7:7400"),))
        self.assertEqual(invite.created_at, CREATED)
        self.assertEqual(invite.expires_at, EXPIRES)
        self.assertEqual(invite.creator_public_key, IDENTITY.public_key)
        self.assertEqual(invite.creator_peer_id_text, IDENTITY.peer_id_text)
        self.assertEqual(invite.network_id_text, KEY.network_id_text)
        self.assertEqual(invite.link, sample_link())

    def test_neverExpires(self) -> None:
        """
        Without an expiry the invite is accepted at any time and reports None.
        """
        link = sample_link(expires_at=None, bootstrap=[])
        invite = parse_invite(link, now=2.0**40)
        self.assertIsNone(invite.expires_at)
        self.assertEqual(invite.bootstrap, ())

    def test_goldenLink(self) -> None:
        """
        Ed25519 is deterministic, so a fixed identity and fields give a fixed
        link.
        """
        self.assertEqual(sample_link(), GOLDEN_LINK)

    def test_signatureCoversEveryByteBefore(self) -> None:
        """
        The signature verifies over exactly the bytes that precede it.
        """
        payload = payload_of(sample_link())
        self.assertTrue(verify_signature(IDENTITY.public_key, payload[-64:], payload[:-64]))
        self.assertEqual(payload[-96:-64], IDENTITY.public_key)

    def test_tamperAnyByte(self) -> None:
        """
        Changing any single byte of the payload makes the invite unusable.
        """
        payload = payload_of(sample_link())
        for index in range(len(payload)):
            tampered = bytearray(payload)
            tampered[index] ^= 0x01
            self.assertRaises(InviteError, parse_invite, link_of(bytes(tampered)), CREATED)

    def test_badSignatureMessage(self) -> None:
        """
        A changed name says the invite was altered (bad signature).
        """
        payload = payload_of(sample_link()).replace(b"lab", b"lac")
        error = self.assertRaises(InviteError, parse_invite, link_of(payload), CREATED)
        self.assertIn("altered or damaged (bad signature)", str(error))

    def test_otherSignerRefused(self) -> None:
        """
        A signature by a key other than the one in the invite is refused.
        """
        other = Identity(Ed25519PrivateKey.from_private_bytes(b"\x07" * 32))
        payload = payload_of(sample_link())
        forged = payload[:-64] + other.sign(payload[:-64])
        self.assertRaises(InviteError, parse_invite, link_of(forged), CREATED)

    def test_trailingByteInLink(self) -> None:
        """
        An extra byte after the signature makes the link unusable.
        """
        error = self.assertRaises(
            InviteError, parse_invite, link_of(payload_of(sample_link()) + b"\x00"), CREATED
        )
        self.assertIn("damaged or incomplete", str(error))

    def test_truncatedLink(self) -> None:
        """
        A link cut short says to copy the whole link.
        """
        error = self.assertRaises(InviteError, parse_invite, sample_link()[:-10], CREATED)
        self.assertIn("whole link", str(error))

    def test_expired(self) -> None:
        """
        At or after its expiry an invite is refused with the date and advice.
        """
        error = self.assertRaises(InviteError, parse_invite, sample_link(), EXPIRES)
        self.assertEqual(
            str(error),
            "this invite expired on 2023-11-15 22:13:20 UTC; ask the network's"
            " creator for a new one",
        )

    def test_notYetExpired(self) -> None:
        """
        One second before its expiry an invite is accepted.
        """
        parse_invite(sample_link(), EXPIRES - 1)

    def test_bareBase64Accepted(self) -> None:
        """
        The base64url text after C{omerta://join/} works on its own.
        """
        bare = sample_link()[len(INVITE_PREFIX) :]
        invite = parse_invite(f"  {bare}\n", CREATED)
        self.assertEqual(invite.network_key, KEY)
        self.assertEqual(invite.link, sample_link())

    def test_paddedBase64Accepted(self) -> None:
        """
        Base64url with '=' padding is accepted.
        """
        payload = payload_of(sample_link())
        padded = base64.urlsafe_b64encode(payload).decode()
        self.assertEqual(parse_invite(padded, CREATED).network_key, KEY)

    def test_wrongPrefix(self) -> None:
        """
        Links that are not C{omerta://join/...} are refused as such.
        """
        bare = sample_link()[len(INVITE_PREFIX) :]
        for text in [
            "https://example.com/join/" + bare,
            "omerta://leave/" + bare,
            "omerta:/join/" + bare,
            "",
        ]:
            error = self.assertRaises(InviteError, parse_invite, text, CREATED)
            self.assertIn("not an omerta invite link: expected omerta://join/", str(error))

    def test_notBase64(self) -> None:
        """
        Text after the prefix that is not base64url is refused.
        """
        error = self.assertRaises(InviteError, parse_invite, "omerta://join/a+b*c", CREATED)
        self.assertIn("not an omerta invite link", str(error))

    def test_unusableBootstrapSigned(self) -> None:
        """
        A correctly signed invite with a malformed bootstrap peer is refused.
        """
        link = signed_link(bootstrap=["no-at-sign"])
        error = self.assertRaises(InviteError, parse_invite, link, CREATED)
        self.assertIn("unusable", str(error))

    def test_unusableNameSigned(self) -> None:
        """
        A correctly signed invite whose name is not a valid name is refused.
        """
        link = signed_link(name="has space")
        self.assertRaises(InviteError, parse_invite, link, CREATED)

    def test_reprHidesKey(self) -> None:
        """
        Neither repr nor str of an Invite shows the key or the link.
        """
        invite = parse_invite(sample_link(), CREATED)
        for text in (repr(invite), str(invite)):
            self.assertIn(KEY.network_id_text, text)
            self.assertNotIn(KEY.to_text(), text)
            self.assertNotIn(KEY.secret.hex(), text)
            self.assertNotIn(repr(KEY.secret), text)
            self.assertNotIn(sample_link()[len(INVITE_PREFIX) :][:20], text)

    def test_makeInviteRefusesBadInput(self) -> None:
        """
        make_invite refuses a bad name, a bad peer, too many peers and an
        expiry before creation.
        """
        for overrides in [
            dict(name="bad name"),
            dict(bootstrap=["relay-1@nowhere"]),
            dict(bootstrap=[f"r{i}@192.0.2.1:{i + 1}" for i in range(17)]),
            dict(expires_at=CREATED),
        ]:
            self.assertRaises(InviteError, sample_link, **overrides)

    def test_makeInviteAcceptsSpecs(self) -> None:
        """
        Bootstrap peers may be given as BootstrapSpec values.
        """
        spec = parse_bootstrap(f"{IDENTITY.peer_id_text}@[2001:db8::1]:7400")
        invite = parse_invite(sample_link(bootstrap=[spec]), CREATED)
        self.assertEqual(invite.bootstrap, (spec,))
