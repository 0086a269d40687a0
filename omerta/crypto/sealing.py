"""
Sealing and opening mesh frames.

Key schedule: every (network, sender, boot) has its own ChaCha20-Poly1305 key,
C{HKDF(network key, "frame", sender id || boot id)}.  A sender draws a random
8-byte boot id each time it starts and numbers its frames 1, 2, 3, ... under
that key; the 64-bit counter, zero-padded to 12 bytes, is the nonce.  So a
nonce never repeats under one key: not across senders (different keys), not
across restarts (a fresh boot id gives a fresh key, with no state to persist),
and not within a run (the counter only grows).

A frame addressed to a receiver (L{omerta.wire.envelope.ADDRESSED}) has the
receiver's peer id and boot id in its associated data: a copy replayed to
another node, or to the same node after it restarted, fails its tag there
(C{misaddressed}).

The receiver keeps, per (network, sender, boot), a sliding replay window of
L{ReplayWindow.SIZE} counters.  Which run of a sender is its current one is
not for the network key to say (every member holds it, so any member can
seal frames under any sender id and boot id): the mesh learns it from an
identity proof (L{omerta.crypto.proof}) and tells the opener
(L{FrameOpener.confirm}); from then on frames of the sender's earlier runs
are refused as C{stale_boot}.  Runs not confirmed yet are accepted (a
restarted peer must be able to introduce itself), at most
L{FrameOpener.UNCONFIRMED_BOOTS} per sender.  Every table is bounded (least
recently used entries go first), so a flood of senders or boot ids cannot
grow memory without limit.  Nothing is remembered about a frame until its
tag has been verified.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from typing import Callable, Mapping, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from omerta.crypto.network import NetworkKey
from omerta.wire import ParseError
from omerta.wire.envelope import (
    ADDRESSED,
    BOOT_ID_SIZE,
    HEADER_SIZE,
    build_header,
    parse_header,
)

_NONCE_PAD = bytes(4)
_FRAME_LABEL = b"frame"
MAX_COUNTER = 2**64 - 1
_TYPE_BITS = ADDRESSED - 1


class FrameRejected(Exception):
    """
    A frame that was not accepted.  C{reason} is a short stable token used as
    a drop-counter label: malformed, unknown_network, bad_tag, misaddressed
    (an addressed frame whose tag fails here: addressed to another node or
    to an earlier run of this one, or tampered with), replay, stale_boot.
    C{header} is the frame's clear header when it parsed.
    """

    def __init__(self, reason: str, detail: str = "", header=None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.header = header


class OpenedFrame(NamedTuple):
    """
    A frame that opened.  C{arrived} is when its datagram reached the
    node's socket (the receiver's clock, before it was opened), None when
    the opener was not told: a round trip ends there, not after this
    node's own decoding.
    """

    type: int
    network_id: bytes
    sender: bytes
    boot: bytes
    counter: int
    body: bytes
    addressed: bool = False
    arrived: float | None = None


def _frame_key(key: NetworkKey, sender: bytes, boot: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(key.derive(_FRAME_LABEL, sender + boot))


def _nonce(counter: int) -> bytes:
    return _NONCE_PAD + counter.to_bytes(8, "big")


class FrameSealer:
    """
    Seals the frames one node sends in one network during one run.
    """

    def __init__(self, key: NetworkKey, sender: bytes, boot: bytes | None = None):
        self.network_id = key.network_id
        self.sender = sender
        self.boot = boot if boot is not None else os.urandom(BOOT_ID_SIZE)
        self._aead = _frame_key(key, sender, self.boot)
        self._counter = 0

    @property
    def counter(self) -> int:
        """
        The counter of the last frame sealed (0 before the first).
        """
        return self._counter

    def seal(self, msg_type: int, body: bytes, to: bytes | None = None) -> bytes:
        """
        Seal a frame; C{to} (the receiver's peer id and boot id, 24 bytes)
        addresses it to that run of that node only.
        """
        if msg_type & ~_TYPE_BITS:
            raise ValueError(f"frame type 0x{msg_type:02x} is outside 0x00-0x3f")
        if self._counter >= MAX_COUNTER:
            raise OverflowError("frame counter exhausted; restart the node for a new boot id")
        self._counter += 1
        if to is None:
            header = build_header(msg_type, self.network_id, self.sender, self.boot,
                                  self._counter)
            return header + self._aead.encrypt(_nonce(self._counter), body, header)
        header = build_header(msg_type | ADDRESSED, self.network_id, self.sender, self.boot,
                              self._counter)
        return header + self._aead.encrypt(_nonce(self._counter), body, header + to)


class ReplayWindow:
    """
    Sliding window over frame counters (RFC 6479 style, as a Python int
    bitmap).  Counter 0 is never valid.
    """

    SIZE = 1024
    __slots__ = ("top", "bits")

    def __init__(self) -> None:
        self.top = 0
        self.bits = 1

    def fresh(self, counter: int) -> bool:
        """
        Whether C{counter} has not been seen and is not too old.
        """
        if counter > self.top:
            return True
        offset = self.top - counter
        return offset < self.SIZE and not (self.bits >> offset) & 1

    @classmethod
    def starting_at(cls, counter: int) -> "ReplayWindow":
        """
        A window to which every counter below C{counter} is already seen.
        """
        window = cls()
        window.top = max(0, counter - 1)
        window.bits = (1 << cls.SIZE) - 1
        return window

    def mark(self, counter: int) -> None:
        if counter > self.top:
            shift = counter - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << self.SIZE) - 1) if shift < self.SIZE else 1
            self.top = counter
        else:
            self.bits |= 1 << (self.top - counter)


class _Context:
    """
    One sender's run: its key, and two replay windows: one for frames from
    an address proven to be the sender's, one for frames from anywhere
    else.  Any member can seal frames under another's id (the network key
    is shared); with one window, frames with counters far ahead sent from
    its own address would make the real sender's frames look like replays.
    When frames came from elsewhere first, the proven lane starts at the
    first frame that arrives in it, every earlier counter counting as seen
    (so those frames cannot be replayed into it).
    """

    __slots__ = ("aead", "windows")

    def __init__(self, aead: ChaCha20Poly1305):
        self.aead = aead
        self.windows: list[ReplayWindow | None] = [None, None]

    def window(self, proven: bool, counter: int) -> ReplayWindow:
        lane = 0 if proven else 1
        window = self.windows[lane]
        if window is None:
            window = self.windows[lane] = (
                ReplayWindow.starting_at(counter) if proven and self.windows[1] is not None
                else ReplayWindow())
        return window


class FrameOpener:
    """
    Opens frames for every network a node belongs to.

    @param keys: network id -> key; the mapping may be replaced with
        L{set_keys} when the node joins or leaves a network.
    """

    RETIRED_BOOTS = 4
    UNCONFIRMED_BOOTS = 4

    def __init__(
        self,
        keys: Mapping[bytes, NetworkKey],
        max_contexts: int = 16384,
    ):
        self._keys = dict(keys)
        self._local: dict[bytes, bytes] = {}
        self._max = max_contexts
        self._contexts: OrderedDict[tuple, _Context] = OrderedDict()
        # (network, sender) -> [confirmed boot or None, retired boots,
        #                       unconfirmed boots]
        self._boots: OrderedDict[tuple, list] = OrderedDict()
        self.proven: Callable[[bytes, bytes, object], bool] = lambda network, sender, source: True
        """
        C{proven(network_id, sender, source)}: whether C{source} is proven
        to be C{sender}'s address (which replay window its frames use).
        """

    def set_keys(self, keys: Mapping[bytes, NetworkKey]) -> None:
        self._keys = dict(keys)
        for key in [k for k in self._contexts if k[0] not in self._keys]:
            del self._contexts[key]
        for key in [k for k in self._boots if k[0] not in self._keys]:
            del self._boots[key]

    def set_local(self, network_id: bytes, peer_id: bytes, boot: bytes) -> None:
        """
        This node's peer id and boot id in a network: frames addressed to
        anything else do not open.
        """
        self._local[network_id] = peer_id + boot

    def open(self, frame: bytes, arrived: float | None = None, source=None) -> OpenedFrame:
        """
        Authenticate and decrypt C{frame}; C{arrived} (when its datagram
        reached the socket) is carried on the opened frame; C{source} is the
        address it came from (see L{proven}; None: the proven lane).

        @raise FrameRejected: with the reason it was refused.
        """
        try:
            header = parse_header(frame)
        except ParseError as e:
            raise FrameRejected("malformed", str(e)) from None
        key = self._keys.get(header.network_id)
        if key is None:
            raise FrameRejected("unknown_network")
        peer = (header.network_id, header.sender)
        boots = self._boots.get(peer)
        if boots is not None and header.boot in boots[1]:
            raise FrameRejected("stale_boot")
        ident = (header.network_id, header.sender, header.boot)
        context = self._contexts.get(ident)
        if context is None:
            context = _Context(_frame_key(key, header.sender, header.boot))
        window = context.window(
            source is None or self.proven(header.network_id, header.sender, source),
            header.counter)
        if not window.fresh(header.counter):
            raise FrameRejected("replay")
        head = frame[:HEADER_SIZE]
        addressed = bool(header.type & ADDRESSED)
        if addressed:
            local = self._local.get(header.network_id)
            if local is None:
                raise FrameRejected("misaddressed", header=header)
            associated = head + local
        else:
            associated = head
        try:
            body = context.aead.decrypt(_nonce(header.counter), frame[HEADER_SIZE:], associated)
        except InvalidTag:
            raise FrameRejected("misaddressed" if addressed else "bad_tag",
                                header=header) from None
        window.mark(header.counter)
        self._remember(ident, context)
        self._note_boot(peer, header.boot)
        return OpenedFrame(
            header.type & ~ADDRESSED, header.network_id, header.sender, header.boot,
            header.counter, body, addressed, arrived,
        )

    def _remember(self, ident: tuple, context: _Context) -> None:
        contexts = self._contexts
        if ident in contexts:
            contexts.move_to_end(ident)
            return
        contexts[ident] = context
        if len(contexts) > self._max:
            contexts.popitem(last=False)

    def _entry(self, peer: tuple) -> list:
        table = self._boots
        entry = table.get(peer)
        if entry is None:
            entry = table[peer] = [None, deque(maxlen=self.RETIRED_BOOTS), deque()]
            if len(table) > self._max:
                table.popitem(last=False)
        else:
            table.move_to_end(peer)
        return entry

    def _note_boot(self, peer: tuple, boot: bytes) -> None:
        entry = self._entry(peer)
        unconfirmed = entry[2]
        if boot == entry[0] or boot in unconfirmed:
            return
        unconfirmed.append(boot)
        if len(unconfirmed) > self.UNCONFIRMED_BOOTS:
            self._contexts.pop(peer + (unconfirmed.popleft(),), None)

    def confirm(self, network_id: bytes, sender: bytes, boot: bytes) -> None:
        """
        An identity proof showed C{boot} is C{sender}'s current run: its
        other runs are retired (their frames refused as C{stale_boot}).
        """
        peer = (network_id, sender)
        entry = self._entry(peer)
        retired = entry[1]
        for old in [entry[0], *entry[2]]:
            if old is not None and old != boot:
                retired.append(old)
                self._contexts.pop(peer + (old,), None)
        if boot in retired:
            retired.remove(boot)
        entry[0] = boot
        entry[2].clear()
