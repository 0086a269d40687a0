"""
Frame sealing: AEAD round trips, every rejection path, nonce uniqueness and
bounded receiver state.
"""

from hypothesis import given, strategies as st
from twisted.trial import unittest

from omerta.crypto.network import NetworkKey
from omerta.crypto.sealing import FrameOpener, FrameRejected, FrameSealer, ReplayWindow
from omerta.wire.envelope import HEADER_SIZE, parse_header

KEY = NetworkKey(bytes(range(32)))
OTHER = NetworkKey(bytes(range(1, 33)))
ALICE = b"A" * 16
BOB = b"B" * 16
CAROL = b"C" * 16


def opener(*keys):
    return FrameOpener({k.network_id: k for k in keys or (KEY,)})


class SealTests(unittest.TestCase):
    def assertRejected(self, reason, opener, frame):
        error = self.assertRaises(FrameRejected, opener.open, frame)
        self.assertEqual(error.reason, reason)

    @given(st.integers(0, 0x3F), st.binary(max_size=1500))
    def test_round_trip(self, msg_type, body):
        """Whatever is sealed opens to the same type, sender and body."""
        sealer = FrameSealer(KEY, ALICE)
        opened = opener().open(sealer.seal(msg_type, body))
        self.assertEqual((opened.type, opened.sender, opened.body), (msg_type, ALICE, body))
        self.assertEqual(opened.network_id, KEY.network_id)

    def test_an_addressed_frame_opens_only_at_its_receivers_run(self):
        """
        A frame addressed to Bob's run opens there, and fails its tag at
        another node or at Bob after a restart (a replay goes nowhere).
        """
        bob_boot = bytes(range(8))
        frame = FrameSealer(KEY, ALICE).seal(5, b"for bob", to=BOB + bob_boot)
        bob = opener()
        bob.set_local(KEY.network_id, BOB, bob_boot)
        opened = bob.open(frame)
        self.assertEqual((opened.type, opened.body, opened.addressed), (5, b"for bob", True))
        carol = opener()
        carol.set_local(KEY.network_id, CAROL, bob_boot)
        self.assertRejected("misaddressed", carol, frame)
        restarted = opener()
        restarted.set_local(KEY.network_id, BOB, bytes(8))
        self.assertRejected("misaddressed", restarted, frame)
        self.assertRejected("misaddressed", opener(), frame)

    def test_an_unaddressed_frame_opens_anywhere(self):
        frame = FrameSealer(KEY, ALICE).seal(5, b"hello")
        bob = opener()
        bob.set_local(KEY.network_id, BOB, bytes(8))
        self.assertFalse(bob.open(frame).addressed)

    def test_body_is_encrypted(self):
        """The body does not appear in clear on the wire."""
        frame = FrameSealer(KEY, ALICE).seal(1, b"secret payload")
        self.assertNotIn(b"secret payload", frame)
        self.assertEqual(len(frame), HEADER_SIZE + len(b"secret payload") + 16)

    def test_tampered_tag(self):
        """A flipped bit in the tag is rejected as bad_tag."""
        frame = bytearray(FrameSealer(KEY, ALICE).seal(1, b"x"))
        frame[-1] ^= 1
        self.assertRejected("bad_tag", opener(), bytes(frame))

    def test_every_byte_authenticated(self):
        """Changing any single byte after the magic and version makes the frame fail."""
        frame = FrameSealer(KEY, ALICE).seal(1, b"hello")
        for i in range(3, len(frame)):
            damaged = bytearray(frame)
            damaged[i] ^= 0x80
            self.assertRaises(FrameRejected, opener().open, bytes(damaged))

    def test_wrong_network(self):
        """A frame of a network the node is not in is unknown_network."""
        frame = FrameSealer(OTHER, ALICE).seal(1, b"x")
        self.assertRejected("unknown_network", opener(KEY), frame)

    def test_network_id_forged(self):
        """A frame sealed with another key but claiming our network id fails the tag."""
        frame = bytearray(FrameSealer(OTHER, ALICE).seal(1, b"x"))
        frame[4:12] = KEY.network_id
        self.assertRejected("bad_tag", opener(KEY), bytes(frame))

    def test_replayed_counter(self):
        """The same frame twice: the second is a replay."""
        o = opener()
        frame = FrameSealer(KEY, ALICE).seal(1, b"x")
        o.open(frame)
        self.assertRejected("replay", o, frame)

    def test_truncated(self):
        """Frames cut short anywhere are rejected, never crash."""
        frame = FrameSealer(KEY, ALICE).seal(1, b"hello")
        for cut in range(len(frame)):
            self.assertRaises(FrameRejected, opener().open, frame[:cut])

    def test_reordering_within_window(self):
        """Out-of-order frames inside the window are accepted once each."""
        sealer = FrameSealer(KEY, ALICE)
        frames = [sealer.seal(1, b"%d" % i) for i in range(10)]
        o = opener()
        for frame in reversed(frames):
            o.open(frame)
        for frame in frames:
            self.assertRejected("replay", o, frame)

    def test_frames_from_elsewhere_cannot_block_the_proven_address(self):
        """
        A member sealing frames under Alice's id with counters far ahead,
        from its own address, does not make Alice's frames from her proven
        address look like replays; and frames first seen from elsewhere
        cannot be replayed into the proven lane.
        """
        alice_at, impostor_at = ("198.51.100.1", 7400), ("203.0.113.6", 7400)
        real = FrameSealer(KEY, ALICE)
        forger = FrameSealer(KEY, ALICE, real.boot)
        forger._counter = 1 << 40
        o = opener()
        o.proven = lambda network, sender, source: source == alice_at
        early = real.seal(1, b"first contact")
        o.open(early, source=("198.51.100.1", 9999))   # before her address was proven
        o.open(forger.seal(1, b"far ahead"), source=impostor_at)
        o.open(real.seal(1, b"hello"), source=alice_at)
        o.open(real.seal(1, b"again"), source=alice_at)
        with self.assertRaises(FrameRejected) as caught:
            o.open(early, source=alice_at)
        self.assertEqual(caught.exception.reason, "replay")

    def test_too_old(self):
        """A frame older than the window is refused even if never seen."""
        sealer = FrameSealer(KEY, ALICE)
        old = sealer.seal(1, b"old")
        o = opener()
        for _ in range(ReplayWindow.SIZE + 1):
            o.open(sealer.seal(1, b"new"))
        self.assertRejected("replay", o, old)

    def test_forgery_does_not_advance_window(self):
        """A frame with a bad tag and a huge counter does not push real frames out."""
        sealer = FrameSealer(KEY, ALICE)
        o = opener()
        o.open(sealer.seal(1, b"first"))
        forged = bytearray(sealer.seal(1, b"x"))
        forged[36:44] = (2**63).to_bytes(8, "big")
        self.assertRaises(FrameRejected, o.open, bytes(forged))
        o.open(sealer.seal(1, b"next"))

    def test_restart_gets_new_key_and_old_boot_is_stale(self):
        """After a restart nonces start again under a fresh key; old-boot frames are refused."""
        first = FrameSealer(KEY, ALICE)
        old = [first.seal(1, b"a"), first.seal(1, b"b")]
        second = FrameSealer(KEY, ALICE)
        new = second.seal(1, b"a")
        self.assertNotEqual(first.boot, second.boot)
        self.assertEqual(parse_header(old[0]).counter, parse_header(new).counter)
        self.assertNotEqual(old[0][HEADER_SIZE:], new[HEADER_SIZE:])
        o = opener()
        o.open(old[0])
        o.open(new)
        o.confirm(KEY.network_id, ALICE, second.boot)
        self.assertRejected("stale_boot", o, old[1])

    def test_a_new_boot_retires_nothing_until_confirmed(self):
        """
        Seeing a frame of another run (any member can seal one under any
        sender id and boot id) does not retire the run in use: both are
        accepted until an identity proof confirms one.
        """
        real = FrameSealer(KEY, ALICE)
        o = opener()
        o.open(real.seal(1, b"a"))
        o.confirm(KEY.network_id, ALICE, real.boot)
        forged = FrameSealer(KEY, ALICE)  # a member using Alice's id
        o.open(forged.seal(1, b"forged"))
        self.assertEqual(o.open(real.seal(1, b"still")).body, b"still")
        o.confirm(KEY.network_id, ALICE, real.boot)
        self.assertRejected("stale_boot", o, forged.seal(1, b"again"))

    def test_unconfirmed_boots_are_bounded_per_sender(self):
        """A flood of invented boot ids for one sender keeps few contexts."""
        o = opener()
        for _ in range(100):
            o.open(FrameSealer(KEY, ALICE).seal(1, b"x"))
        self.assertLessEqual(len(o._contexts), FrameOpener.UNCONFIRMED_BOOTS)

    def test_senders_do_not_share_nonces(self):
        """Two senders with the same counter produce unrelated ciphertexts."""
        a = FrameSealer(KEY, ALICE, boot=bytes(8)).seal(1, b"same")
        b = FrameSealer(KEY, BOB, boot=bytes(8)).seal(1, b"same")
        self.assertNotEqual(a[HEADER_SIZE:], b[HEADER_SIZE:])

    def test_counter_increments(self):
        """Each seal uses the next counter."""
        sealer = FrameSealer(KEY, ALICE)
        counters = [parse_header(sealer.seal(1, b"")).counter for _ in range(5)]
        self.assertEqual(counters, [1, 2, 3, 4, 5])

    def test_bounded_state(self):
        """The opener keeps at most max_contexts sender contexts."""
        o = FrameOpener({KEY.network_id: KEY}, max_contexts=8)
        for i in range(50):
            o.open(FrameSealer(KEY, bytes([i]) * 16).seal(1, b""))
        self.assertLessEqual(len(o._contexts), 8)
        self.assertLessEqual(len(o._boots), 8)

    def test_leaving_network(self):
        """After set_keys drops a network its frames are unknown_network."""
        o = opener(KEY, OTHER)
        o.open(FrameSealer(OTHER, ALICE).seal(1, b""))
        o.set_keys({KEY.network_id: KEY})
        self.assertRejected("unknown_network", o, FrameSealer(OTHER, ALICE).seal(1, b""))

    @given(st.binary(max_size=200))
    def test_fuzz(self, data):
        """Random bytes only ever raise FrameRejected."""
        try:
            opener().open(b"\xf0M\x01" + data)
        except FrameRejected:
            pass
