"""
Who is alive, in one network: an active set of direct neighbours kept with
keepalives, and SWIM-style indirect confirmation before anyone is declared
offline.

- The active set holds up to C{degree} peers this node exchanges keepalives
  with (bootstrap peers first, then peers that contact us, then random known
  peers), at most C{max_active}.  Gossip rounds and queries go to it, so the
  overlay is a bounded-degree random graph whatever the mesh size.
- An active peer not heard from for C{keepalive} seconds is pinged (the
  pong gives the RTT), again every C{ping_retry} seconds up to
  C{ping_retries} times; any frame from it ends the round.  Of two peers
  the one with the lower id pings first, the other only after
  C{ping_retries * ping_retry} more seconds of quiet: so an idle link costs
  one ping and one pong per C{keepalive}, a busy one none.  A busy link
  that falls silent for L{BUSY_SILENCE} times its usual gap between frames
  (at least C{ping_retry}) is pinged at once, and again after
  L{BUSY_RETRY_RTTS} round trips (0.2 s to C{ping_retry}), so a path that
  died under traffic is given up in about 1.5 s.  A round
  with no answer is missed; after C{suspect_after_missed} in a row the path
  manager may take another path, else the peer is *suspected*, and one or two
  other active peers are asked to ping it (INDIRECT_PING).  Any positive INDIRECT_ACK, or
  any frame from the peer, clears the suspicion; silence for
  C{indirect_timeout} (times 1 + the local health score) drops it from the
  active set, its endpoint is reported failed, a replacement is found, and
  the membership layer is told it is unreachable
  (L{omerta.mesh.membership}: a suspicion the whole network checks; only
  that declares a peer gone).  So one lossy link does not evict a live peer.
- Local health (Lifeguard): a score from 0 to L{MAX_HEALTH}, raised when a
  peer of ours stops answering or this node has to refute a suspicion of
  itself, lowered by each answered keepalive.  A node whose own link is bad
  sees many peers stop answering at once; its score stretches the time it
  gives a suspected peer, so it does not accuse healthy ones.

Only the peer itself can prove anything about itself.  Frames are sealed
with the network key, which every member holds, so a frame's sender id says
only that *a* member sent it.  An address leads to a peer, and a run (boot
id) of the peer is its current one, when a PONG answering a PING that asked
for it carries an identity proof (L{omerta.crypto.proof}) by the peer's key
over this node's nonce.  Until then frames under that sender id and run
count for nothing here: they keep no one alive, move no path, and retire
no run; they draw a challenge (a proof-asking ping) at most once per
C{challenge_retry} seconds.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from omerta.crypto import proof
from omerta.crypto.identity import format_peer_id
from omerta.mesh.context import Basics
from omerta.mesh.peer import Connections, PeerConnection, State, is_relayed
from omerta.wire.envelope import MIN_FRAME_SIZE
from omerta.wire.messages import PING_PROVE, SERVING, MessageType, build_body

UNKNOWN_ENDPOINT = ("0.0.0.0", 0)
MAX_HEALTH = 8
DEAD_PATH_PINGS = 3
"""Unanswered pings over C{path_dead_after} seconds that make a path dead."""
BUSY_SILENCE = 4
"""A link silent for this many times its usual gap between frames is pinged."""
BUSY_RETRY_RTTS = 4
"""The ping of a busy link that fell silent is repeated after this many round trips..."""
BUSY_RETRY_MIN = 0.2
"""...but not sooner than this (seconds), nor later than C{ping_retry}."""

_BARE_PING = len(build_body(MessageType.PING, nonce=0, sent_ms=0, flags=0, contacts=[],
                            padding=b""))
PONG_SIZE = MIN_FRAME_SIZE + len(build_body(
    MessageType.PONG, nonce=0, echo_ms=0, observed=("::", 0), contacts=[], proof=b""))
"""Bytes of the largest contact-free PONG frame without a proof."""

PROVEN_PONG_SIZE = PONG_SIZE + proof.PROOF_SIZE
"""Bytes of the largest contact-free PONG frame with an identity proof."""

CHALLENGE_SIZE = PROVEN_PONG_SIZE
"""
Bytes of a challenge (a contact-free PING asking for a proof, padded to the
size of its answer).  A frame smaller than this from an address not proven
yet draws no challenge, and a PING smaller than its answer draws no PONG:
nothing larger than a request goes to an unproven address.
"""


def nonce_bytes(nonce: int) -> bytes:
    return nonce.to_bytes(8, "big")


@dataclass
class Link:
    """
    Liveness bookkeeping of one peer in the active set (keepalive counters,
    challenges, the indirect probe).  The path and what is believed of the
    peer (proven, suspect, ...) belong to its L{PeerConnection}; the
    read-only properties below are that connection's.
    """

    peer_id: bytes
    conn: PeerConnection
    since: float
    last_heard: float
    round_started: float | None = None  # a keepalive round waiting for an answer
    retry_step: float | None = None  # that round's ping spacing (None: ping_retry)
    measure_asked: float = float("-inf")  # last ping sent only to measure the RTT
    gap: float = float("inf")  # smoothed time between frames from the peer
    missed: int = 0
    indirect_nonce: int | None = None
    established: bool = False
    retries: int = 0
    second_round: bool = False
    initiated: bool = False
    pending_address: tuple | None = None
    unanswered: int = 0
    first_unanswered: float | None = None
    challenged_at: float = float("-inf")

    @property
    def address(self):
        return self.conn.path.address

    @property
    def verified(self) -> bool:
        return self.conn.proven

    @property
    def suspected_at(self) -> float | None:
        return self.conn.suspected_at

    @property
    def rtt(self) -> float | None:
        return self.conn.rtt


@dataclass
class _IndirectProbe:
    requester: tuple
    nonce: int
    target: bytes
    sent: float
    call: object


class Liveness:
    log = Logger()

    SAMPLE_ABOVE = 256
    """Registries larger than this are sampled, not listed, to refill the active set."""

    def __init__(self, basics: Basics, connections: Connections, registry, freshness, *,
                 rng: random.Random | None = None,
                 path_failed: Callable[[Link], bool],
                 known_addresses: Callable[[bytes], set],
                 address_of: Callable[[bytes], object],
                 relay_of: Callable[[object], bytes | None],
                 announce_to: Callable[[object], None],
                 observed_address: Callable[[tuple], None],
                 address_proven: Callable[[bytes, object], None],
                 run_proven: Callable[[bytes, bytes], None] = lambda peer_id, boot: None,
                 unreachable: Callable[[bytes], None] = lambda peer_id: None,
                 restarted: Callable[[bytes], None] = lambda peer_id: None,
                 challenged: Callable[[bytes], None] = lambda peer_id: None):
        """
        @param freshness: the overlay's L{omerta.mesh.freshness.Freshness}
            (contacts piggybacked on pings and pongs, stale paths reported).
        @param path_failed: the path manager's verdict on a link whose path
            stopped answering: True when it moved the link (or is opening
            another path), False when there is none (the peer is suspected).
        @param known_addresses: every direct address this node itself has for
            a peer (an indirect ping goes only to one of those).
        @param address_of: where datagrams for a peer go now.
        @param relay_of: the relay of a relay route, or None.
        @param announce_to: send our announcement to an address.
        @param observed_address: a pong says where our datagram came from.
        @param address_proven: a pong (or ack) proved an address leads to a
            peer, for the first time.
        @param run_proven: C{run_proven(peer_id, boot)}: an identity proof
            showed C{boot} is the peer's current run (its earlier runs can be
            refused from now on).
        @param unreachable: C{unreachable(peer_id)}: neither this node nor
            its helpers reached the peer (its link was dropped).
        @param restarted: C{restarted(peer_id)}: an identity proof showed a
            new run of a peer whose earlier run was proven (it restarted and
            lost whatever state it held for us).
        @param challenged: C{challenged(peer_id)}: the peer asked us to
            prove our address (it saw us somewhere new: our NAT moved us),
            and the proof is on its way.
        """
        self.basics = basics
        self.clock = basics.clock
        self.metrics = basics.metrics
        self.send = basics.send
        self.emit = basics.emit
        self._challenged = challenged
        self.connections = connections
        self.registry = registry
        self.freshness = freshness
        self.config = basics.config
        self._path_failed = path_failed
        self._known_addresses = known_addresses
        self._address_of = address_of
        self._relay_of = relay_of
        self._announce_to = announce_to
        self._observed_address = observed_address
        self._address_proven = address_proven
        self._run_proven = run_proven
        self._unreachable = unreachable
        self._restarted = restarted
        self.local_health = 0
        self.prover = basics.prover
        self.rng = rng or random.Random()
        self.links: dict[bytes, Link] = {}
        self._pings: dict[int, tuple[bytes, float, tuple]] = {}
        self._probes: dict[int, _IndirectProbe] = {}
        self._waiters: dict[int, Deferred] = {}
        # (peer, address) pairs whose address a pong proved, active or not:
        # bootstrap service and peer lists do not depend on a free slot in
        # the active set.
        self._proven: OrderedDict[tuple, float] = OrderedDict()
        # peer -> the boot id of its run an identity proof showed current;
        # peers whose frames came under another run since (restarted, or a
        # replay or forgery): their next pings ask for a proof.
        self.boots: OrderedDict[bytes, bytes] = OrderedDict()
        self._doubted: set[bytes] = set()
        # address -> the peer a proof showed it leads to (what frames sent
        # there are addressed to); addresses hinted at, when
        self._proven_at: dict[object, bytes] = {}
        self._hinted: OrderedDict[object, float] = OrderedDict()

    # contact

    def heard(self, peer_id: bytes, address: tuple, now: float, size: int,
              boot: bytes | None = None) -> Link | None:
        """
        A frame of C{size} bytes from C{peer_id}'s run C{boot} arrived from
        C{address}.

        The sender id is only proven to be *a* member, and the source address
        not at all, so a frame from a new address does not move an existing
        link: it starts a challenge (a contact-free ping asking for a proof,
        sent only if the frame was at least as large), and the link moves
        when the proven pong comes back from there (L{on_pong}).  A frame of
        a run other than the proven one is challenged the same way and
        counts for nothing until the proof comes.  Returns the link when
        C{address} is the link's address and the run is the current one.
        """
        current = self.boots.get(peer_id)
        if boot is not None and current is not None and boot != current:
            self._doubted.add(peer_id)
            link = self.links.get(peer_id)
            if link is not None:
                self._challenge(link, address, now, size)
            else:
                self._challenge_stranger(peer_id, address, now, size)
            self.metrics.inc("liveness_unproven_run")
            return None
        link = self.links.get(peer_id)
        if link is None:
            if len(self.links) >= self.config.max_active:
                # No room to keep it, but let it prove its address so it can
                # be served (peer lists) all the same.
                if (peer_id, address) not in self._proven:
                    self._challenge_stranger(peer_id, address, now, size)
                return None
            link = self._link(peer_id, address, now)
            self._challenge(link, address, now, size)
        elif link.address != address:
            if (is_relayed(address) and not link.conn.path.relayed and link.verified
                    and link.suspected_at is None):
                # The peer still sends through a relay while our direct path
                # works: take the frame, keep the path.
                return None
            if link.pending_address != address:
                link.pending_address = address
                link.challenged_at = float("-inf")
            self._challenge(link, address, now, size)
            return None
        elif not link.verified:
            self._challenge(link, address, now, size)
        gap = now - link.last_heard
        link.gap = gap if link.gap == float("inf") else 0.8 * link.gap + 0.2 * gap
        link.last_heard = now
        link.round_started = None
        link.retries = 0
        link.missed = 0
        link.unanswered = 0
        link.first_unanswered = None
        if not link.established:
            link.established = True
            self.emit("peer_connected", peer_id=peer_id, address=address)
        if link.suspected_at is not None:
            self._clear_suspicion(link, now)
        return link

    def _link(self, peer_id: bytes, address, now: float, initiated: bool = False) -> Link:
        """
        A new link in the active set, its peer's connection moved to
        C{address} (proven already if a pong proved it before).
        """
        conn = self.connections.open(peer_id)
        proven = (peer_id, address) in self._proven
        if conn.path is None or conn.path.address != address or conn.state is State.OFFLINE:
            conn.move(conn.path_to(address, self._relay_of(address)), now,
                      proven=proven)
        elif proven and not conn.proven:
            conn.prove()
        link = self.links[peer_id] = Link(peer_id, conn, now, now, initiated=initiated)
        return link

    def _challenge(self, link: Link, address: tuple, now: float, size: int) -> None:
        """
        Ping an address the peer sends from that no pong has proven yet: at
        most once per C{challenge_retry} seconds per link, and only for a
        frame at least as large as the ping (no amplification).  A lost
        challenge or pong is thus retried as long as the peer keeps sending
        (a relay denying it as unproven, for one, until it is proven).
        """
        if (size >= CHALLENGE_SIZE
                and now - link.challenged_at >= self.config.challenge_retry
                and ((link.peer_id, address) not in self._proven
                     or link.peer_id in self._doubted)):
            self.ping(link.peer_id, address, contacts=False)

    def connect(self, peer_id: bytes, address: tuple) -> None:
        """
        Start keeping C{peer_id} alive at C{address} (it becomes active at
        once; the caller's ping opens its first keepalive round, so the
        usual rules decide whether it answers).
        """
        now = self.clock.seconds()
        if peer_id in self.links or len(self.links) >= self.config.max_active:
            return
        self._link(peer_id, address, now, initiated=True).round_started = now

    # pings

    def wants_proof(self, peer_id: bytes, address) -> bool:
        """
        Whether a ping to C{peer_id} at C{address} should ask for an
        identity proof: the address or the peer's run is not proven yet.
        """
        return ((peer_id, address) not in self._proven or peer_id not in self.boots
                or peer_id in self._doubted)

    def ping(self, peer_id: bytes, address: tuple, contacts: bool = True) -> int:
        """
        Send a ping; C{contacts=False} for a challenge to an address not
        proven yet (no piggybacked contacts: smaller, and nothing leaked).
        The ping asks for a proof when it has something to prove, and is
        padded to the size of a challenge (no smaller than any answer).
        """
        if len(self._pings) >= self.config.max_outstanding_pings:
            self._pings.pop(next(iter(self._pings)))
        nonce = int.from_bytes(os.urandom(8), "big")
        now = self.clock.seconds()
        self._pings[nonce] = (peer_id, now, address)
        link = self.links.get(peer_id)
        if link is not None and not contacts:
            link.challenged_at = now
        if link is not None and link.address == address:
            link.unanswered += 1
            if link.first_unanswered is None:
                link.first_unanswered = now
        prove = self.wants_proof(peer_id, address)
        listed = self.freshness.contacts_for(peer_id) if contacts else []
        size = MIN_FRAME_SIZE + _BARE_PING + sum(
            len(build_body(MessageType.PING, nonce=0, sent_ms=0, flags=0, contacts=[c],
                           padding=b"")) - _BARE_PING for c in listed)
        # Every ping is as large as a challenge, whether it asks for a proof
        # or not: a keepalive that arrives from an address its receiver has
        # not proven (our NAT moved us) must be able to draw the challenge
        # that proves it.
        sent = self.basics.send_to(peer_id, address, MessageType.PING, nonce=nonce,
                            sent_ms=int(now * 1000), flags=PING_PROVE if prove else 0,
                            contacts=listed, padding=bytes(max(0, CHALLENGE_SIZE - size)))
        if sent is not None and nonce in self._pings:
            # the round trip starts when the datagram leaves, not before it is built
            self._pings[nonce] = (peer_id, sent, address)
        return nonce

    def _move(self, link: Link, address: tuple, now: float, proven: bool = False) -> None:
        """
        A pong proved C{link}'s peer answers at C{address}: the path moves.
        """
        self.log.info("Peer {peer} moved to {address}", peer=format_peer_id(link.peer_id),
                      address=f"{address[0]}:{address[1]}")
        was_suspect = link.conn.suspected
        link.conn.move(link.conn.path_to(address, self._relay_of(address)), now,
                       proven=proven)
        link.pending_address = None
        link.last_heard = now
        link.round_started = None
        link.unanswered = 0
        link.first_unanswered = None
        link.missed = 0
        if was_suspect:
            link.indirect_nonce = None

    def switch(self, link: Link, address, proven: bool) -> None:
        """
        The path manager moves C{link} to another path (a relay session, a
        punched address); C{proven} when a probe/ack exchange already proved
        it.  Keepalives go on, on the new path.
        """
        self._move(link, address, self.clock.seconds(), proven)
        link.initiated = True

    def proven(self, peer_id: bytes, address, boot: bytes) -> None:
        """
        Something other than a pong (a hole-punch ack with its proof) proved
        C{address} leads to C{peer_id}'s run C{boot}.
        """
        self._identified(peer_id, boot)
        if (peer_id, address) not in self._proven:
            self._prove(peer_id, address, self.links.get(peer_id))

    def _identified(self, peer_id: bytes, boot: bytes) -> None:
        """
        An identity proof showed C{boot} is C{peer_id}'s current run.  A
        new run is a restart: every address must be proven again (the one
        the proof came from is, at once, by the caller).
        """
        self._doubted.discard(peer_id)
        old = self.boots.get(peer_id)
        self.boots[peer_id] = boot
        self.boots.move_to_end(peer_id)
        if old != boot:
            if old is not None:
                self.forget_proof(peer_id)
                link = self.links.get(peer_id)
                if link is not None:
                    link.conn.unprove()
            self._run_proven(peer_id, boot)
            if old is not None:
                self._restarted(peer_id)
            while len(self.boots) > self.config.proven_memory:
                gone, _ = self.boots.popitem(last=False)
                self.forget_proof(gone)

    def ping_and_wait(self, peer_id: bytes, address: tuple, timeout: float) -> Deferred:
        """
        Ping once; the Deferred fires with the RTT, or with None after
        C{timeout} seconds without a pong.
        """
        nonce = self.ping(peer_id, address)
        d = Deferred()
        self._waiters[nonce] = d
        call = self.clock.callLater(timeout, self._give_up, nonce)
        d.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
        return d

    def _give_up(self, nonce: int) -> None:
        d = self._waiters.pop(nonce, None)
        if d is not None:
            d.callback(None)

    def on_ping(self, frame, addr, ping) -> None:
        """
        Answer with a pong: with the contacts only to an address proven to
        be the sender's, with a proof when asked, and to an unproven address
        only if the ping is at least as large as the pong.
        """
        self.freshness.learn_contacts(ping.contacts)
        prove = bool(ping.flags & PING_PROVE)
        if (frame.sender, addr) in self._proven:
            contacts = self.freshness.contacts_for(frame.sender)
        else:
            contacts = []
            if MIN_FRAME_SIZE + len(frame.body) < (PROVEN_PONG_SIZE if prove else PONG_SIZE):
                self.metrics.inc("drops", reason="ping_smaller_than_pong")
                return
        answer = (self.prover.prove(proof.PONG, frame.sender, nonce_bytes(ping.nonce))
                  if prove else b"")
        self.basics.send_to(frame.sender, addr, MessageType.PONG, nonce=ping.nonce,
                            echo_ms=ping.sent_ms,
                            observed=UNKNOWN_ENDPOINT if is_relayed(addr) else addr,
                            contacts=contacts, proof=answer)
        if prove:
            self._challenged(frame.sender)

    def on_pong(self, frame, addr, pong) -> None:
        """
        A pong to one of our pings.  With a valid proof it proves the
        address and the sender's run; without one it only measures a path
        and a run proven before.
        """
        sent = self._pings.get(pong.nonce)
        if sent is None or sent[0] not in (frame.sender, b""):
            self.metrics.inc("drops", reason="unexpected_pong")
            return
        if pong.proof and not self.prover.check(proof.PONG, pong.proof, frame.sender,
                                                frame.boot, nonce_bytes(pong.nonce)):
            # (the ping stays outstanding: the real answer may still come)
            self.metrics.inc("drops", reason="bad_proof")
            return
        del self._pings[pong.nonce]
        if pong.proof:
            self._identified(frame.sender, frame.boot)
        elif (self.boots.get(frame.sender) != frame.boot
              or (frame.sender, addr) not in self._proven or sent[2] != addr):
            # Nothing here is proven: ask again, for a proof this time.
            self.metrics.inc("drops", reason="unproven_pong")
            self._doubted.add(frame.sender)
            link = self.links.get(frame.sender)
            if link is not None:
                self._challenge(link, addr, self.clock.seconds(), CHALLENGE_SIZE)
            return
        # ...and ends when the pong reached the socket, before it was opened
        arrived = getattr(frame, "arrived", None)
        rtt = (self.clock.seconds() if arrived is None else arrived) - sent[1]
        self.registry.set_rtt(frame.sender, rtt)
        link = self.links.get(frame.sender)
        if sent[2] == addr and (frame.sender, addr) not in self._proven:
            self._prove(frame.sender, addr, link)
        if link is not None and sent[2] == addr and link.pending_address == addr:
            self._move(link, addr, now=self.clock.seconds())
        if link is not None and link.address == addr:
            link.conn.measured(rtt)
            link.round_started, link.missed = None, 0
            link.unanswered, link.first_unanswered = 0, None
            self.health(-1)
            if not link.verified and sent[2] == addr:
                # A pong to a nonce we sent to this address: the address
                # really leads to this peer (return routability).
                link.conn.prove()
        if not is_relayed(addr) and tuple(pong.observed) != UNKNOWN_ENDPOINT:
            self._observed_address(tuple(pong.observed))
        self.freshness.learn_contacts(pong.contacts)
        for probe in [p for p in self._probes.values() if p.target == frame.sender]:
            self._finish_probe(probe, True, rtt)
        waiter = self._waiters.pop(pong.nonce, None)
        if waiter is not None:
            waiter.callback(rtt)

    # SWIM indirect probes

    def on_indirect_ping(self, frame, addr, message) -> None:
        """
        Another peer asks us to ping C{target} for it.
        """
        if len(self._probes) >= self.config.max_indirect_probes:
            self.metrics.inc("drops", reason="indirect_busy")
            return
        endpoint = tuple(message.endpoint)
        if endpoint not in self._known_addresses(message.target):
            # Never ping an address on a member's word alone: that would make
            # this node a reflector towards third parties.
            self.metrics.inc("drops", reason="indirect_unknown_endpoint")
            return
        call = self.clock.callLater(self.config.indirect_timeout * 0.8,
                                       self._probe_timeout, message.nonce)
        probe = _IndirectProbe(addr, message.nonce, message.target,
                               self.clock.seconds(), call)
        self._probes[message.nonce] = probe
        self.ping(message.target, endpoint)

    def _probe_timeout(self, nonce: int) -> None:
        probe = self._probes.get(nonce)
        if probe is not None:
            self._finish_probe(probe, False, 0.0)

    def _finish_probe(self, probe: _IndirectProbe, alive: bool, rtt: float) -> None:
        self._probes.pop(probe.nonce, None)
        if probe.call.active():
            probe.call.cancel()
        self.send(probe.requester, MessageType.INDIRECT_ACK, nonce=probe.nonce,
                          target=probe.target, alive=alive, rtt_us=int(rtt * 1e6))

    def on_indirect_ack(self, frame, addr, message) -> None:
        link = self.links.get(message.target)
        if link is None or link.indirect_nonce != message.nonce:
            return
        if message.alive:
            self.metrics.inc("liveness_indirect", result="alive")
            self._clear_suspicion(link, self.clock.seconds())

    def health(self, change: int) -> None:
        """
        Raise (+1) or lower (-1) the local health score, within 0 and
        L{MAX_HEALTH}.
        """
        self.local_health = min(MAX_HEALTH, max(0, self.local_health + change))

    def _suspect(self, link: Link, now: float) -> None:
        link.conn.suspect(now)
        self.metrics.inc("liveness_suspected")
        link.indirect_nonce = int.from_bytes(os.urandom(8), "big")
        link.second_round = False
        self._ask_helpers(link)
        if not link.conn.path.relayed:
            self.freshness.peer_stale(link.peer_id, link.address)

    def _ask_helpers(self, link: Link) -> None:
        if link.conn.path.relayed:
            return  # the session is ours: no helper can ping through it
        helpers = [l for l in self.links.values()
                   if l.peer_id != link.peer_id and l.suspected_at is None and l.verified]
        for helper in self.rng.sample(helpers, min(self.config.indirect_helpers, len(helpers))):
            self.send(helper.address, MessageType.INDIRECT_PING,
                              nonce=link.indirect_nonce, target=link.peer_id,
                              endpoint=link.address)

    def _clear_suspicion(self, link: Link, now: float) -> None:
        link.conn.heard()
        link.indirect_nonce = None
        link.missed = 0

    def _declare_offline(self, link: Link, now: float) -> None:
        self.metrics.inc("liveness_offline")
        self.health(+1)
        self.drop(link.peer_id)
        if not link.conn.path.relayed:
            self.freshness.path_failed(link.peer_id, link.address)
        self._unreachable(link.peer_id)

    def drop(self, peer_id: bytes) -> None:
        """
        Take a peer out of the active set (unreachable from here, or known
        gone); a replacement is found on the next tick.
        """
        link = self.links.pop(peer_id, None)
        if link is None:
            return
        link.conn.offline()
        self.emit("peer_disconnected", peer_id=peer_id)

    # periodic

    def tick(self) -> None:
        """
        Called every C{liveness_tick} seconds: keepalive rounds, suspicion
        timeouts, refilling the active set.
        """
        now = self.clock.seconds()
        config = self.config
        for link in list(self.links.values()):
            if not link.verified and not link.initiated:
                # Opened by a frame from an unproven address: its challenge
                # ping went out once; no keepalives until it is answered.
                if now - link.since >= config.keepalive:
                    del self.links[link.peer_id]
                    link.conn.offline()
                    self.metrics.inc("liveness_unverified_dropped")
                continue
            if (link.suspected_at is None and link.unanswered >= DEAD_PATH_PINGS
                    and now - link.first_unanswered >= config.path_dead_after
                    and self._path_failed(link)):
                # Pings (keepalives, or a tunnel's probes) stopped being
                # answered, and the path manager took another path.
                link.unanswered = 0
                link.first_unanswered = None
                link.missed = 0
                link.round_started = None
                continue
            if link.suspected_at is not None:
                patience = config.indirect_timeout * (1 + self.local_health)
                if now - link.suspected_at >= patience:
                    self._declare_offline(link, now)
                elif not link.second_round and now - link.suspected_at >= patience / 2:
                    link.second_round = True
                    self._ask_helpers(link)
                    self.ping(link.peer_id, link.address)
                continue
            self._keepalive(link, now)
        self._refill(now)

    def _keepalive(self, link: Link, now: float) -> None:
        """
        A link quiet for C{keepalive} seconds opens a round: a ping, retried
        every C{ping_retry} seconds up to C{ping_retries} times.  Any frame
        from the peer ends the round.  A round with no answer is missed;
        C{suspect_after_missed} missed in a row make the path manager try
        another path, or, when there is none, the peer suspected.
        """
        config = self.config
        if link.round_started is None:
            if (link.rtt is None and link.verified and link.gap < config.keepalive
                    and now - link.measure_asked >= config.keepalive):
                # A busy path we never pinged (we answer the peer's pings,
                # or it moved): one ping to know its round trip, so that
                # its silence can be judged quickly (L{_busy_step}).
                link.measure_asked = now
                self.ping(link.peer_id, link.address)
            wait = config.keepalive
            if link.peer_id < self.basics.peer_id:
                # The peer with the lower id pings first; its ping is our
                # news.  We ping only when it has been quiet a little longer.
                wait += config.ping_retries * config.ping_retry
            # A link that was busy and fell silent is asked at once: the
            # path may have died (a NAT that lost its mapping drops what
            # comes in until we send out).
            busy = max(config.ping_retry, BUSY_SILENCE * link.gap)
            if now - link.last_heard >= min(wait, busy):
                link.round_started, link.retries = now, 0
                link.retry_step = self._busy_step(link) if busy < wait else None
                self.ping(link.peer_id, link.address)
            return
        elapsed = now - link.round_started
        step = link.retry_step or config.ping_retry
        if link.retries < config.ping_retries:
            if elapsed >= (link.retries + 1) * step:
                link.retries += 1
                self.ping(link.peer_id, link.address)
            return
        if elapsed < (config.ping_retries + 1) * step:
            return
        link.missed += 1
        link.round_started = None
        self.metrics.inc("liveness_missed")
        if link.missed < config.suspect_after_missed:
            link.round_started, link.retries = now, 0
            self.ping(link.peer_id, link.address)
        elif self._path_failed(link):
            link.missed = 0
            link.unanswered = 0
            link.first_unanswered = None
        else:
            self._suspect(link, now)

    def _busy_step(self, link: Link) -> float:
        """
        The ping spacing of a round opened because a busy link fell silent:
        from the path's round trip, or while the path has none measured yet
        (it moved lately) the last one the peer's pongs showed on any path,
        or for a peer only ever answered through a relay, twice the relay's.
        """
        rtt = link.rtt
        if rtt is None:
            record = self.registry.get(link.peer_id)
            rtt = None if record is None else record.rtt
        if rtt is None and is_relayed(link.address):
            # a peer we only answer through a relay: the relay's legs
            relay = self._link_at((link.address.host, link.address.port))
            if relay is not None and relay.rtt is not None:
                rtt = 2 * relay.rtt
        if rtt is None:
            return self.config.ping_retry
        return min(self.config.ping_retry, max(BUSY_RETRY_MIN, BUSY_RETRY_RTTS * rtt))

    def _link_at(self, address) -> Link | None:
        """The link whose path is C{address}, if any."""
        for link in self.links.values():
            if link.address == address:
                return link
        return None

    def _refill(self, now: float) -> None:
        missing = self.config.degree - len(self.links)
        if missing <= 0:
            return
        def wanted(record) -> bool:
            return (record.peer_id not in self.links and record.state != "offline"
                    and self._address_of(record.peer_id) is not None)

        if len(self.registry) > self.SAMPLE_ABOVE:
            # O(missing) draws, not a pass over every record each second
            records = self.registry.sample(missing, self.rng, wanted)
        else:
            records = [r for r in self.registry.all() if wanted(r)]
            records = self.rng.sample(records, min(missing, len(records)))
        for peer_id, address in [(r.peer_id, self._address_of(r.peer_id)) for r in records]:
            self.connect(peer_id, address)
            self._announce_to(address)
            self.ping(peer_id, address)

    def reconnect(self) -> None:
        """
        Periodic (every C{reconnect_interval}): ping one random peer
        declared dead (not one that left), so a partition that healed, or a
        peer that was only cut off, is found again: its answer makes the
        membership tell it, and it refutes.  A dead relay or STUN server
        is pinged too, whatever other peers died: a restarted relay waits
        for its members to come back (it pings no NATed member), and among
        many dead peers a random pick would reach it only after minutes.
        """
        def wanted(record) -> bool:
            return (record.state == "offline" and record.gone == "failed"
                    and record.peer_id not in self.links
                    and self._address_of(record.peer_id) is not None)

        records = self.registry.sample(1, self.rng, lambda r: wanted(r) and r.capabilities & SERVING)
        records += [r for r in self.registry.sample(1, self.rng, wanted) if r not in records]
        for record in records:
            self.metrics.inc("liveness_reconnects")
            self.ping(record.peer_id, self._address_of(record.peer_id), contacts=False)

    def gossip_targets(self, count: int, rng: random.Random) -> list[tuple[bytes, tuple]]:
        healthy = [(l.peer_id, l.address) for l in self.links.values()
                   if l.suspected_at is None and l.verified]
        # (relayed links included: gossip reaches NAT-bound peers through them)
        return rng.sample(healthy, min(count, len(healthy)))

    def address_of(self, peer_id: bytes):
        link = self.links.get(peer_id)
        return None if link is None else link.address

    def verified(self, peer_id: bytes, address: tuple) -> bool:
        """
        Whether a pong has proven that C{address} leads to C{peer_id}.
        """
        return (peer_id, address) in self._proven

    def forget_proof(self, peer_id: bytes) -> None:
        """
        The peer restarted: its addresses must be proven again.
        """
        for key in [k for k in self._proven if k[0] == peer_id]:
            self._unprove(key)

    def _unprove(self, key: tuple) -> None:
        del self._proven[key]
        if self._proven_at.get(key[1]) == key[0]:
            del self._proven_at[key[1]]

    def _prove(self, peer_id: bytes, address: tuple, link) -> None:
        self._proven[(peer_id, address)] = self.clock.seconds()
        self._proven_at[address] = peer_id
        while len(self._proven) > self.config.proven_memory:
            self._unprove(next(iter(self._proven)))
        self._address_proven(peer_id, address)

    def destination(self, address, peer_id: bytes | None = None) -> bytes | None:
        """
        Whom a frame sent to C{address} (meant for C{peer_id}, or for
        whoever is there) is addressed to, peer id and boot id: the peer a
        proof showed the address leads to, if its current run is proven and
        not in doubt; None (unaddressed) otherwise.
        """
        proven = self._proven_at.get(address)
        if peer_id is None:
            peer_id = proven
        if peer_id is None or peer_id != proven or peer_id in self._doubted:
            return None
        boot = self.boots.get(peer_id)
        return None if boot is None else peer_id + boot

    def misaddressed(self, peer_id: bytes, address, size: int) -> None:
        """
        A frame from C{peer_id}, addressed to a run of this node that is not
        this one (we restarted), failed to open: ping the sender so it
        learns this run (at most once per C{challenge_retry} per address,
        and only for a frame at least as large as the ping).
        """
        if self._challenge_stranger(peer_id, address, self.clock.seconds(), size):
            self.metrics.inc("liveness_misaddressed_hints")

    def _challenge_stranger(self, peer_id: bytes, address, now: float, size: int) -> bool:
        """
        A contact-free ping asking C{peer_id} at C{address} (no link of
        ours, or not its proven run) for a proof: only for a frame at least
        as large, and at most once per C{challenge_retry} per address.
        Without the second rule a node that many peers contact at once (a
        bootstrap node when a whole mesh restarts) pinged back every frame;
        beyond C{max_outstanding_pings} the answers found no ping waiting,
        proved nothing, and each drew another ping.
        """
        if size < CHALLENGE_SIZE or now - self._hinted.get(address, float("-inf")) < \
                self.config.challenge_retry:
            return False
        self._hinted[address] = now
        self._hinted.move_to_end(address)
        while len(self._hinted) > self.config.proven_memory:
            self._hinted.popitem(last=False)
        self.ping(peer_id, address, contacts=False)
        return True

    def stop(self) -> None:
        for probe in list(self._probes.values()):
            if probe.call.active():
                probe.call.cancel()
        self._probes.clear()
        for nonce in list(self._waiters):
            self._give_up(nonce)
