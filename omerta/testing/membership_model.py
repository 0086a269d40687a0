"""
A discrete-event MODEL of the mesh's membership protocol, for mesh sizes the
real-node simulator (L{omerta.testing.meshsim}) cannot hold.

This is not the product.  It re-states, in compact form, the rules of
L{omerta.mesh.liveness}, L{omerta.mesh.gossip}, L{omerta.mesh.membership}
and L{omerta.mesh.antientropy} (their timers, fanouts, limits and budgets
come from the same L{MeshConfig} and module constants), so that 10,000
nodes fit in memory: the real simulator holds a ~1.8 kB registry record
for every (node, peer) pair, 10^8 of them at N = 10,000, while this model
keeps a sequence number (4 bytes) and a state (1 byte) per pair, and a
pending rumour as two bytes and a queue entry.  C{scripts/bench/gossip.py}
runs it next to the real nodes at 100 and 1,000 nodes to show how close it
comes, and alone at 10,000.

What is modelled, per node:
  - the active set: links opened by bootstrap contact, by frames from
    peers (up to C{max_active}) and by the refill of each 1 s tick (to
    C{degree}); per link the keepalive period, ping retries, missed periods,
    suspicion with indirect probes through C{indirect_helpers} helpers and
    a second round, patience stretched by local health (Lifeguard), the
    challenge (a proof-asking ping) that proves an address, dropping
    unverified links after a period;
  - announcements: a sequence number per node (its incarnation), re-signed
    every C{reannounce} seconds and to refute; acceptance before signature
    checking by (peer, sequence); rumour mongering every C{gossip_interval}
    to C{fanout} random healthy verified links, most-remaining-first,
    C{PEER_LIST_BUDGET} bytes per datagram, C{retransmit_mult *
    ceil(log10(n + 1))} transmissions, hop limit; the full list a newcomer
    asks for while it knows fewer than C{degree} peers (at most every
    C{peer_list_interval} per member), charged to nobody, while every other
    new identity is charged to the neighbour it came from (the registry's
    L{SourceLimits}: token buckets per address and per IP, a cap per IP);
    the registry's size cap C{max_peers}; bootstrap retries with backoff;
  - membership: SUSPECT / DEAD / LEFT notices as rumours (same limits,
    C{NOTICE_BUDGET}), Lifeguard's suspicion timer between
    C{suspicion_mult * log10(n)} and C{suspicion_max_mult} times that,
    shrinking with independent confirmations, refutation by a new sequence,
    telling a peer declared dead that it was (at most every
    C{TELL_INTERVAL}), reconnect pings to dead peers every
    C{reconnect_interval};
  - anti-entropy: a digest of 256 XOR leaves per node kept as records
    change, folded to C{bucket_count(n)} buckets, SYNC_DIGEST to one random
    link every C{sync_interval}, SYNC_SUMMARY of up to C{SUMMARY_BUCKETS}
    differing buckets, records sent and wanted (C{WANT_MAX}), dead peers told;
    the whole live list to a peer far apart (most buckets differ, or a
    digest four times narrower), at most every C{FULL_LIST_INTERVAL};
  - the network: one-way C{latency} and independent C{loss} per datagram;
    frame sizes computed with the product's codec (L{FrameSizes}).

What is left out: NAT, relays, hole punching, path changes (every node is
public at one address, as in the benchmark), the freshness layer (contact
queries and PATH_FAILED reports, which decide no membership), sessions and
messaging, record expiry and offline clean-up (beyond an hour), eviction
from a full registry, restarts (every run of a node is its first), and the
content of contacts piggybacked on pings (only their size).  A full peer
list is delivered in one event after the loss of each of its datagrams is
drawn (the surviving entries, in order).

Events a bench can subscribe to (L{MembershipModel.on}), each called with
C{(node, peer, now)} (C{"gone"} also with C{reason}): C{"discovered"},
C{"suspected"} (member_suspected), C{"gone"} (peer_gone),
C{"disconnected"} (a link dropped), C{"refuted"} (node refuted a notice
about itself; peer is the node).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from array import array
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from omerta.mesh import antientropy, gossip, liveness, membership, rumours
from omerta.mesh.node import MeshConfig
from omerta.mesh.registry import DIGEST_LEAVES, SourceLimits
from omerta.wire.envelope import MIN_FRAME_SIZE
from omerta.wire.messages import MessageType, build_body

# registry state of a (node, peer) pair in the model; 0: not held
ALIVE, SUSPECT, FAILED, LEFT = 1, 2, 3, 4
GONE = (FAILED, LEFT)
STATE_NAMES = {0: "unknown", ALIVE: "online", SUSPECT: "suspect", FAILED: "offline",
               LEFT: "offline"}

# notice kinds (as NoticeKind)
N_SUSPECT, N_DEAD, N_LEFT = 1, 2, 3

ANNOUNCE_LABEL = "omerta announce v1"
PONG_LABEL = "omerta pong proof v1"
LEAVE_LABEL = "omerta leave v1"

_MASK32 = 0xFFFFFFFF
_INF = float("inf")


@dataclass(frozen=True)
class FrameSizes:
    """
    Bytes on the wire of each frame the model sends, computed with the
    product's codec (L{build_body}) and envelope overhead.
    """

    record: int             # a signed record's "record" bytes
    ping: tuple             # by number of piggybacked contacts (0..3)
    pong: tuple             # by contacts, without a proof
    proof: int              # extra bytes of a pong with an identity proof
    announce: int
    list_header: int        # PEER_LIST frame without entries
    list_entry: int         # one PEER_LIST entry
    entry_budget: int       # gossip's budget accounting of one entry
    notice: int             # one MEMBERSHIP notice without a signature
    notice_header: int
    signature: int
    digest_header: int
    summary_header: int
    summary_entry: int
    summary_index: int
    want_entry: int
    indirect_ping: int
    indirect_ack: int

    @classmethod
    def measure(cls, name: str = "n5000") -> FrameSizes:
        """
        Sizes for nodes named like C{name} with one public IPv4 endpoint
        (what the benchmark's nodes announce).
        """
        from omerta.crypto.announce import sign_announcement
        from omerta.crypto.identity import Identity
        from omerta.wire.messages import PathKind

        endpoint = ("10.1.2.3", 7400)
        # (the fields Gossip.own_announcement signs for a public node)
        signed = sign_announcement(Identity.generate(), bytes(8), {
            "name": name, "sequence": 1, "timestamp_ms": 1, "ttl_s": MeshConfig.announce_ttl,
            "nat_type": 0, "capabilities": 0,
            "paths": [{"kind": PathKind.DIRECT, "endpoint": endpoint, "via": bytes(16)}],
            "resources": {"cpu_cores": 0, "memory_mb": 0, "disk_gb": 0, "gpus": 0},
        })
        contact = {"peer_id": bytes(16), "endpoint": endpoint, "age_ms": 0}

        def body(kind, **fields):
            return MIN_FRAME_SIZE + len(build_body(kind, fields))

        def ping(contacts):
            size = body(MessageType.PING, nonce=0, sent_ms=0, flags=0,
                        contacts=[contact] * contacts, padding=b"")
            return max(size, liveness.CHALLENGE_SIZE)

        def pong(contacts):
            return body(MessageType.PONG, nonce=0, echo_ms=0, observed=endpoint,
                        contacts=[contact] * contacts, proof=b"")

        def peer_list(entries):
            return body(MessageType.PEER_LIST, request=False,
                        announcements=[{"hops": 1, "announcement": signed}] * entries)

        def notices(count, signature=b""):
            return body(MessageType.MEMBERSHIP, notices=[
                {"kind": 1, "peer": bytes(16), "sequence": 1, "by": bytes(16),
                 "signature": signature}] * count)

        def summary(indices, entries, want):
            return body(MessageType.SYNC_SUMMARY, buckets=1, indices=[0] * indices,
                        entries=[{"peer": bytes(16), "sequence": 1}] * entries,
                        want=[bytes(16)] * want)

        proven = body(MessageType.PONG, nonce=0, echo_ms=0, observed=endpoint, contacts=[],
                      proof=bytes(96))
        return cls(
            record=len(signed["record"]),
            ping=tuple(ping(k) for k in range(4)),
            pong=tuple(pong(k) for k in range(4)),
            proof=proven - pong(0),
            announce=body(MessageType.ANNOUNCE, hops=0, announcement=signed),
            list_header=peer_list(0),
            list_entry=peer_list(1) - peer_list(0),
            entry_budget=gossip._ENTRY_OVERHEAD + len(signed["record"]),
            notice_header=notices(0),
            notice=notices(1) - notices(0),
            signature=notices(1, bytes(64)) - notices(1),
            digest_header=body(MessageType.SYNC_DIGEST, buckets=1, hashes=[]),
            summary_header=summary(0, 0, 0),
            summary_entry=summary(0, 1, 0) - summary(0, 0, 0),
            summary_index=summary(1, 0, 0) - summary(0, 0, 0),
            want_entry=summary(0, 0, 1) - summary(0, 0, 0),
            indirect_ping=body(MessageType.INDIRECT_PING, nonce=0, target=bytes(16),
                               endpoint=endpoint),
            indirect_ack=body(MessageType.INDIRECT_ACK, nonce=0, target=bytes(16), alive=True,
                              rtt_us=0),
        )


class _Link:
    """One peer of a node's active set (as L{omerta.mesh.liveness.Link})."""

    __slots__ = ("peer", "since", "last_heard", "gap", "round_started", "missed", "indirect",
                 "established", "retries", "second_round", "initiated", "unanswered",
                 "first_unanswered", "challenged_at", "verified", "suspected_at")

    def __init__(self, peer: int, now: float, verified: bool, initiated: bool):
        self.peer = peer
        self.since = now
        self.last_heard = now
        self.gap = _INF
        self.round_started = None
        self.missed = 0
        self.indirect = None
        self.established = False
        self.retries = 0
        self.second_round = False
        self.initiated = initiated
        self.unanswered = 0
        self.first_unanswered = None
        self.challenged_at = float("-inf")
        self.verified = verified
        self.suspected_at = None


class _Node:
    """
    The compact state of one node: per peer index a sequence number and a
    state, its pending rumours (remaining transmissions and hop count per
    origin, queued by remaining transmissions), notices, suspicions, links.
    """

    __slots__ = ("i", "running", "start", "seq", "known", "state", "order", "leaves",
                 "links", "proven", "pings", "probes", "r_left", "r_hops", "levels",
                 "rumours", "holders", "top", "notices", "suspicions", "told", "refuted_for", "health",
                 "full_sent", "boot_pending", "boot_delay", "round_at", "contacts", "sources",
                 "asked", "sync_full_sent", "hinted")

    def __init__(self, i: int, capacity: int, now: float, levels: int):
        self.i = i
        self.running = True
        self.start = now
        self.seq = 1
        self.known = array("I", bytes(4 * capacity))
        self.state = bytearray(capacity)
        self.order = array("I")                 # held peers, in the order learnt
        self.leaves = [0] * DIGEST_LEAVES
        self.links: dict[int, _Link] = {}
        self.proven: set[int] = set()
        self.pings: OrderedDict[int, tuple] = OrderedDict()
        self.probes: dict[int, tuple] = {}
        self.r_left = bytearray(capacity)       # 0: no rumour of that origin
        self.r_hops = bytearray(capacity)
        self.levels = [deque() for _ in range(levels + 1)]
        self.rumours = 0
        self.holders: dict[int, set] = {}       # origin -> peers known to hold its rumour
        self.top = 0
        self.notices: OrderedDict[tuple, list] = OrderedDict()
        self.suspicions: dict[int, list] = {}   # peer -> [sequence, since, [by...]]
        self.told: OrderedDict[tuple, float] = OrderedDict()
        self.refuted_for = -1
        self.health = 0
        self.full_sent: dict[int, float] = {}
        self.boot_pending: set[int] = set()
        self.boot_delay = 0.0
        self.round_at: float | None = None
        self.contacts: deque = deque(maxlen=4)  # recent distinct peers heard (ping size)
        # source -> [address tokens, stamp, IP tokens, stamp, identities introduced]
        self.sources: dict[int, list] = {}
        self.asked: dict[int, float] = {}       # peer -> until when its list is uncharged
        self.sync_full_sent: dict[int, float] = {}  # peer -> our whole list sent (sync)
        self.hinted: OrderedDict[int, float] = OrderedDict()  # stranger -> last challenged


class MembershipModel:
    """
    The model's world: nodes by index, one event queue, one random source.

        model = MembershipModel(capacity=1001, config=MeshConfig(), seed=1)
        model.add_node()                       # node 0, the seed
        for k in range(1, 1000):
            model.call_later(k * 0.01, model.add_node, [0])
        model.run(60)
    """

    def __init__(self, capacity: int, config: MeshConfig | None = None, seed: int = 0,
                 latency: float = 0.020, loss: float = 0.0,
                 sizes: FrameSizes | None = None):
        """
        @param capacity: the most nodes that will ever be added.
        @param latency: one-way delay of every datagram.
        @param loss: probability each datagram is lost (may be changed
            while running).
        """
        self.capacity = capacity
        self.config = config or MeshConfig()
        self.rng = random.Random(seed)
        self.latency = latency
        self.loss = loss
        self.sizes = sizes or FrameSizes.measure(name="n" + str(capacity // 2))
        self.now = 0.0
        self.nodes: list[_Node] = []
        self._heap: list = []
        self._sequence = itertools.count()
        self._nonce = itertools.count(1)
        self._listeners: dict[str, list] = {}
        self._on_discovered = self._listeners.setdefault("discovered", [])
        self.frames: Counter = Counter()
        self.bytes: Counter = Counter()
        self.signed: Counter = Counter()
        self.verified: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.counters: Counter = Counter()
        self.sent = 0
        self.dropped = 0
        # a peer's digest leaf (the first byte of its random peer id)
        leaf_rng = random.Random(seed ^ 0x5EED)
        self.leaf = bytes(leaf_rng.randrange(DIGEST_LEAVES) for _ in range(capacity))
        self.by_leaf: list[list[int]] = [[] for _ in range(DIGEST_LEAVES)]
        for peer, leaf in enumerate(self.leaf):
            self.by_leaf[leaf].append(peer)
        c = self.config
        self.levels = c.retransmit_mult * max(1, math.ceil(math.log10(capacity + 2)))
        # by registry size: (n = size + 1 as Gossip._limit counts it)
        self._limits = [c.retransmit_mult * max(1, math.ceil(math.log10(size + 2)))
                        for size in range(capacity + 1)]
        self.per_list = max(1, gossip.PEER_LIST_BUDGET // self.sizes.entry_budget)
        self._helpers = c.indirect_helpers
        self._hop_limit = c.gossip_hop_limit
        self.max_peers = c.max_peers
        limits = SourceLimits()
        self._address_bucket = (limits.address_burst, limits.address_per_minute / 60.0)
        self._ip_bucket = (limits.ip_burst, limits.ip_per_minute / 60.0)
        self._max_per_ip = limits.max_per_ip
        # the order of peer ids (the lower id pings first on a quiet link)
        self.rank = list(range(capacity))
        random.Random(seed ^ 0x1D).shuffle(self.rank)
        self._every = {name: max(1, round(getattr(c, name + "_interval" if name != "reannounce"
                                                  else name) / c.liveness_tick))
                       for name in ("sync", "reconnect", "reannounce")}

    # the bench's interface

    def on(self, kind: str, callback) -> None:
        """Call C{callback(node, peer, now, **data)} on each C{kind} event."""
        self._listeners.setdefault(kind, []).append(callback)

    def _emit(self, kind: str, node: int, peer: int, **data) -> None:
        for callback in self._listeners.get(kind, ()):
            callback(node, peer, self.now, **data)

    def call_later(self, delay: float, function, *args) -> None:
        heapq.heappush(self._heap, (self.now + delay, next(self._sequence), function, args))

    def _at(self, when: float, function, *args) -> None:
        heapq.heappush(self._heap, (when, next(self._sequence), function, args))

    def run(self, seconds: float) -> None:
        """Process every event due in the next C{seconds}."""
        end = self.now + seconds
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= end:
            when, _, function, args = pop(heap)
            self.now = when
            function(*args)
        self.now = end

    def live(self) -> list[int]:
        return [node.i for node in self.nodes if node.running]

    def state_of(self, node: int, peer: int) -> str:
        """The registry state node holds of peer ("unknown" when not held)."""
        return STATE_NAMES[self.nodes[node].state[peer]]

    def knows(self, node: int, peer: int) -> bool:
        return self.nodes[node].known[peer] != 0

    def links_of(self, node: int) -> list[int]:
        return list(self.nodes[node].links)

    def add_node(self, bootstrap: list[int] = ()) -> int:
        """
        Start a node now (its timers start, it contacts C{bootstrap}).
        @return: its index.
        """
        i = len(self.nodes)
        if i >= self.capacity:
            raise ValueError(f"the model was built for {self.capacity} nodes")
        node = _Node(i, self.capacity, self.now, self.levels)
        self.nodes.append(node)
        self._own_rumour(node)
        self._at(self.now + self.config.liveness_tick, self._tick, node, 1)
        node.boot_pending = set(bootstrap)
        node.boot_delay = self.config.bootstrap_retry_initial
        self._bootstrap(node)
        return i

    def fill_registries(self) -> None:
        """
        Every node holds every other node's current announcement, as after
        a restart with saved peer files (the model's warm start): nothing
        to pass on, no link yet.  Records are checked on load, as
        L{omerta.mesh.registry.PeerRegistry.load} does.
        """
        nodes = self.nodes
        count = len(nodes)
        template = array("I", bytes(4 * self.capacity))
        leaves = [0] * DIGEST_LEAVES
        for node in nodes:
            template[node.i] = node.seq
            leaves[self.leaf[node.i]] ^= hash((node.i, node.seq))
        everyone = array("I", range(count))
        for node in nodes:
            i = node.i
            # (as after a restart: its own announcement is its only rumour,
            # not what it heard before)
            node.r_left = bytearray(self.capacity)
            node.holders = {}
            node.levels = [deque() for _ in node.levels]
            node.rumours = node.top = 0
            self._rumour(node, i, 0)
            node.known = array("I", template)
            node.known[i] = 0
            node.state = bytearray(b"\x01" * count + bytes(self.capacity - count))
            node.state[i] = 0
            node.order = array("I", everyone)
            node.order.pop(i)
            node.leaves = list(leaves)
            node.leaves[self.leaf[i]] ^= hash((i, node.seq))
            self.verified[ANNOUNCE_LABEL] += count - 1
            # (its own announcement is its only rumour, as after a restart;
            # no "discovered" events)

    def kill(self, i: int) -> None:
        """Stop node C{i} abruptly: nothing more goes out, nothing is received."""
        self.nodes[i].running = False

    def leave(self, i: int) -> None:
        """Stop node C{i} cleanly: a signed LEFT notice to each healthy link."""
        node = self.nodes[i]
        self.signed[LEAVE_LABEL] += 1
        entry = (N_LEFT, i, node.seq, -1)
        for peer in self._targets(node, self.config.max_active):
            self._send_notices(node, peer, [entry])
        node.running = False

    # the network

    def _send(self, node: _Node, dst: int, kind: str, size: int, handler, *args) -> None:
        self.frames[kind] += 1
        self.bytes[kind] += size
        self.sent += 1
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        heapq.heappush(self._heap, (self.now + self.latency, next(self._sequence),
                                    self._arrive, (dst, node.i, size, handler, args)))

    def _arrive(self, dst: int, src: int, size: int, handler, args) -> None:
        node = self.nodes[dst]
        if not node.running:
            return
        link = self._heard(node, src, size)
        if link is not None and link.verified:
            state = node.state[src]
            if state == SUSPECT:
                node.state[src] = ALIVE       # heard from: online again
            elif state in GONE:
                self._tell(node, src, src)
        handler(node, src, *args)

    # liveness

    def _heard(self, node: _Node, peer: int, size: int) -> _Link | None:
        now = self.now
        contacts = node.contacts
        if peer not in contacts:
            contacts.append(peer)
        link = node.links.get(peer)
        if link is None:
            if len(node.links) >= self.config.max_active:
                if peer not in node.proven and size >= liveness.CHALLENGE_SIZE:
                    # (as Liveness._challenge_stranger: once per challenge_retry)
                    hinted = node.hinted
                    if now - hinted.get(peer, -_INF) >= self.config.challenge_retry:
                        hinted[peer] = now
                        hinted.move_to_end(peer)
                        if len(hinted) > self.config.proven_memory:
                            hinted.popitem(last=False)
                        self._ping(node, peer, contacts=False)
                return None
            link = node.links[peer] = _Link(peer, now, peer in node.proven, False)
            self._challenge(node, link, size)
        elif not link.verified:
            self._challenge(node, link, size)
        gap = now - link.last_heard
        link.gap = gap if link.gap == _INF else 0.8 * link.gap + 0.2 * gap
        link.last_heard = now
        link.round_started = None
        link.retries = 0
        link.missed = 0
        link.unanswered = 0
        link.first_unanswered = None
        if not link.established:
            link.established = True
        if link.suspected_at is not None:
            link.suspected_at = None
            link.indirect = None
            link.missed = 0
        return link

    def _challenge(self, node: _Node, link: _Link, size: int) -> None:
        if (size >= liveness.CHALLENGE_SIZE
                and self.now - link.challenged_at >= self.config.challenge_retry
                and link.peer not in node.proven):
            self._ping(node, link.peer, contacts=False)

    def _ping(self, node: _Node, peer: int, contacts: bool = True) -> int:
        """A ping (asking for a proof when the address is not proven yet)."""
        pings = node.pings
        if len(pings) >= self.config.max_outstanding_pings:
            pings.popitem(last=False)
        nonce = next(self._nonce)
        pings[nonce] = peer
        link = node.links.get(peer)
        if link is not None:
            if not contacts:
                link.challenged_at = self.now
            link.unanswered += 1
            if link.first_unanswered is None:
                link.first_unanswered = self.now
        count = min(3, max(0, len(node.contacts) - (peer in node.contacts))) if contacts else 0
        prove = peer not in node.proven
        self._send(node, peer, "ping", self.sizes.ping[count], self._on_ping, nonce, prove)
        return nonce

    def _on_ping(self, node: _Node, sender: int, nonce: int, prove: bool) -> None:
        if sender in node.proven:
            count = min(3, max(0, len(node.contacts) - (sender in node.contacts)))
        else:
            count = 0
        size = self.sizes.pong[count]
        if prove:
            self.signed[PONG_LABEL] += 1
            size += self.sizes.proof
        self._send(node, sender, "pong", size, self._on_pong, nonce, prove)

    def _on_pong(self, node: _Node, sender: int, nonce: int, proof: bool) -> None:
        sent = node.pings.get(nonce)
        if sent is None or sent not in (sender, -1):
            self.counters["unexpected_pong"] += 1
            return
        if proof:
            self.verified[PONG_LABEL] += 1
        del node.pings[nonce]
        link = node.links.get(sender)
        if sender not in node.proven:
            node.proven.add(sender)
            self._address_proven(node, sender)
        if link is not None:
            link.round_started = None
            link.missed = 0
            link.unanswered = 0
            link.first_unanswered = None
            node.health = max(0, node.health - 1)
            link.verified = True
        for key, probe in list(node.probes.items()):
            if probe[1] == sender:
                self._finish_probe(node, key, True)

    def _address_proven(self, node: _Node, peer: int) -> None:
        if node.state[peer] == SUSPECT:
            node.state[peer] = ALIVE
        self._announce_to(node, peer)
        if len(node.order) < self.config.degree:
            self._send_list(node, peer, request=True, records=list(node.order))

    def _tick(self, node: _Node, k: int) -> None:
        """
        Every C{liveness_tick} of a node's life: keepalive rounds, link
        suspicions, refill; and the periodic jobs that fall on this tick
        (anti-entropy, reconnect pings, the announcement's refresh).
        """
        if not node.running:
            return
        every = self._every
        if k % every["sync"] == 0:
            self._sync(node)
        if k % every["reconnect"] == 0:
            self._reconnect(node)
        if k % every["reannounce"] == 0:
            self._reannounce(node)
        now = self.now
        config = self.config
        quiet = config.ping_retry  # (no keepalive round opens before this much quiet)
        for link in list(node.links.values()):
            if (link.round_started is None and link.suspected_at is None and link.verified
                    and now - link.last_heard < quiet):
                continue
            if not link.verified and not link.initiated:
                if now - link.since >= config.keepalive:
                    del node.links[link.peer]
                    self.counters["unverified_dropped"] += 1
                continue
            if link.suspected_at is not None:
                patience = config.indirect_timeout * (1 + node.health)
                if now - link.suspected_at >= patience:
                    self._unreachable(node, link)
                elif not link.second_round and now - link.suspected_at >= patience / 2:
                    link.second_round = True
                    self._ask_helpers(node, link)
                    self._ping(node, link.peer)
                continue
            self._keepalive(node, link, now)
        self._refill(node)
        self._at(node.start + (k + 1) * config.liveness_tick, self._tick, node, k + 1)

    def _keepalive(self, node: _Node, link: _Link, now: float) -> None:
        """A keepalive round on a quiet link (as Liveness._keepalive)."""
        config = self.config
        if link.round_started is None:
            wait = config.keepalive
            if self.rank[link.peer] < self.rank[node.i]:
                wait += config.ping_retries * config.ping_retry
            wait = min(wait, max(config.ping_retry, liveness.BUSY_SILENCE * link.gap))
            if now - link.last_heard >= wait:
                link.round_started, link.retries = now, 0
                self._ping(node, link.peer)
            return
        elapsed = now - link.round_started
        if link.retries < config.ping_retries:
            if elapsed >= (link.retries + 1) * config.ping_retry:
                link.retries += 1
                self._ping(node, link.peer)
            return
        if elapsed < (config.ping_retries + 1) * config.ping_retry:
            return
        link.missed += 1
        link.round_started = None
        if link.missed < config.suspect_after_missed:
            link.round_started, link.retries = now, 0
            self._ping(node, link.peer)
        else:
            link.suspected_at = now
            link.indirect = next(self._nonce)
            link.second_round = False
            self.counters["link_suspected"] += 1
            self._ask_helpers(node, link)

    def _ask_helpers(self, node: _Node, link: _Link) -> None:
        helpers = [other for other in node.links.values()
                   if other.peer != link.peer and other.suspected_at is None and other.verified]
        for helper in self.rng.sample(helpers, min(self._helpers, len(helpers))):
            self._send(node, helper.peer, "indirect_ping", self.sizes.indirect_ping,
                       self._on_indirect_ping, link.indirect, link.peer)

    def _on_indirect_ping(self, node: _Node, sender: int, nonce: int, target: int) -> None:
        if len(node.probes) >= self.config.max_indirect_probes:
            self.counters["indirect_busy"] += 1
            return
        if not node.known[target]:
            self.counters["indirect_unknown_endpoint"] += 1
            return
        key = next(self._nonce)
        node.probes[key] = (sender, target, nonce)
        self.call_later(self.config.indirect_timeout * 0.8, self._probe_timeout, node, key)
        self._ping(node, target)

    def _probe_timeout(self, node: _Node, key: int) -> None:
        if node.running and key in node.probes:
            self._finish_probe(node, key, False)

    def _finish_probe(self, node: _Node, key: int, alive: bool) -> None:
        requester, target, nonce = node.probes.pop(key)
        self._send(node, requester, "indirect_ack", self.sizes.indirect_ack,
                   self._on_indirect_ack, nonce, target, alive)

    def _on_indirect_ack(self, node: _Node, sender: int, nonce: int, target: int,
                         alive: bool) -> None:
        link = node.links.get(target)
        if link is None or link.indirect != nonce:
            return
        if alive:
            link.suspected_at = None
            link.indirect = None
            link.missed = 0

    def _unreachable(self, node: _Node, link: _Link) -> None:
        """Neither this node nor its helpers reached the peer."""
        self.counters["link_offline"] += 1
        node.health = min(liveness.MAX_HEALTH, node.health + 1)
        self._drop(node, link.peer)
        self._suspect_member(node, link.peer, node.i)

    def _drop(self, node: _Node, peer: int) -> None:
        if node.links.pop(peer, None) is not None:
            self._emit("disconnected", node.i, peer)

    def _refill(self, node: _Node) -> None:
        missing = self.config.degree - len(node.links)
        if missing <= 0:
            return
        order, state, links = node.order, node.state, node.links
        if len(order) > liveness.Liveness.SAMPLE_ABOVE:
            found: dict[int, None] = {}
            randrange = self.rng.randrange
            for _ in range(4 * missing + 8):
                if len(found) >= missing:
                    break
                peer = order[randrange(len(order))]
                if peer not in found and peer not in links and state[peer] not in GONE:
                    found[peer] = None
            chosen = list(found)
        else:
            wanted = [p for p in order if p not in links and state[p] not in GONE]
            chosen = self.rng.sample(wanted, min(missing, len(wanted)))
        now = self.now
        for peer in chosen:
            if peer in links or len(links) >= self.config.max_active:
                continue
            link = links[peer] = _Link(peer, now, peer in node.proven, True)
            link.round_started = now
            self._announce_to(node, peer)
            self._ping(node, peer)

    def _reconnect(self, node: _Node) -> None:
        order = node.order
        if not order:
            return
        for _ in range(12):
            peer = order[self.rng.randrange(len(order))]
            if node.state[peer] == FAILED and peer not in node.links:
                self.counters["reconnect_pings"] += 1
                self._ping(node, peer, contacts=False)
                return

    def _targets(self, node: _Node, count: int) -> list[int]:
        healthy = [link.peer for link in node.links.values()
                   if link.suspected_at is None and link.verified]
        if len(healthy) <= count:
            self.rng.shuffle(healthy)
            return healthy
        return self.rng.sample(healthy, count)

    # bootstrap

    def _bootstrap(self, node: _Node) -> None:
        if not node.running or not node.boot_pending:
            return
        for peer in node.boot_pending:
            self._announce_to(node, peer)
            self._ping_bootstrap(node, peer)
        self.call_later(node.boot_delay, self._bootstrap, node)
        node.boot_delay = min(node.boot_delay * 2, self.config.bootstrap_retry_max)

    def _ping_bootstrap(self, node: _Node, peer: int) -> None:
        # (a ping to an address, for whoever answers there)
        pings = node.pings
        if len(pings) >= self.config.max_outstanding_pings:
            pings.popitem(last=False)
        nonce = next(self._nonce)
        pings[nonce] = -1
        self._send(node, peer, "ping", self.sizes.ping[0], self._on_ping, nonce, True)

    # announcements and rumours

    def _limit(self, node: _Node) -> int:
        """Transmissions of a new rumour: retransmit_mult * ceil(log10(n + 1))."""
        return self._limits[len(node.order)]

    def _own_rumour(self, node: _Node) -> None:
        self.signed[ANNOUNCE_LABEL] += 1
        self._rumour(node, node.i, 0)

    def _rumour(self, node: _Node, origin: int, hops: int) -> None:
        left = self._limit(node)
        if not node.r_left[origin]:
            node.rumours += 1
        node.holders[origin] = set()
        node.r_left[origin] = left
        node.r_hops[origin] = hops
        node.levels[left].append(origin)
        if left > node.top:
            node.top = left
        self._wake(node)

    def _wake(self, node: _Node) -> None:
        if node.round_at is None and node.running:
            interval = self.config.gossip_interval
            k = math.floor((self.now - node.start) / interval + 1e-9) + 1
            node.round_at = node.start + k * interval
            self._at(node.round_at, self._round, node)

    def _announce_to(self, node: _Node, peer: int) -> None:
        self._send(node, peer, "announce", self.sizes.announce, self._on_announce,
                   node.i, node.seq, 0)

    def _reannounce(self, node: _Node) -> None:
        node.seq += 1
        self._own_rumour(node)

    def _on_announce(self, node: _Node, sender: int, origin: int, seq: int, hops: int) -> None:
        outcome = self._accept(node, origin, seq, hops, sender, sender)
        if outcome != "own" and origin == sender and sender in node.boot_pending:
            node.boot_pending.discard(sender)

    def _accept(self, node: _Node, origin: int, seq: int, hops: int, source: int,
                sender: int) -> str:
        """
        An announcement of C{origin} under C{seq} from C{sender}, charged to
        C{source} (-1: nobody), as gossip.accept.
        """
        i = node.i
        if origin == i:
            self.verified[ANNOUNCE_LABEL] += 1
            self.outcomes["own"] += 1
            return "own"
        known = node.known
        held = known[origin]
        if held and seq <= held:
            self.outcomes["duplicate" if seq == held else "stale"] += 1
            if seq == held and node.r_left[origin]:
                self._holds(node, origin, sender)
            if source >= 0 and node.state[origin] in GONE:
                self._tell(node, origin, source)
            return "duplicate"
        if not held:
            if len(node.order) >= self.max_peers:
                # (a full registry; evicting the newest never-contacted
                # record of the largest source is not modelled)
                self.outcomes["full"] += 1
                return "full"
            if source >= 0 and not self._charge(node, source):
                return "source_rate"
        self.verified[ANNOUNCE_LABEL] += 1
        state = node.state
        leaf = self.leaf[origin]
        if held:
            self.outcomes["updated"] += 1
            if state[origin] not in GONE:
                node.leaves[leaf] ^= hash((origin, held))
        else:
            self.outcomes["new"] += 1
            node.order.append(origin)
        known[origin] = seq
        state[origin] = ALIVE
        node.leaves[leaf] ^= hash((origin, seq))
        if not held:
            now = self.now
            for callback in self._on_discovered:
                callback(i, origin, now)
        if hops + 1 < self._hop_limit:
            # (a rumour, as _rumour)
            left = self._limits[len(node.order)]
            if not node.r_left[origin]:
                node.rumours += 1
            node.holders[origin] = {sender}
            node.r_left[origin] = left
            node.r_hops[origin] = hops + 1
            node.levels[left].append(origin)
            if left > node.top:
                node.top = left
            if node.round_at is None:
                self._wake(node)
        return "updated" if held else "new"

    def _charge(self, node: _Node, source: int) -> bool:
        """
        Whether C{source} may introduce one more identity to C{node} now
        (the registry's SourceLimits: a token bucket per address and per
        IP, a cap per IP); if so it is charged.
        """
        now = self.now
        held = node.sources.get(source)
        (a_burst, a_rate), (i_burst, i_rate) = self._address_bucket, self._ip_bucket
        if held is None:
            held = node.sources[source] = [a_burst, now, i_burst, now, 0]
        if held[4] >= self._max_per_ip:
            self.outcomes["source_full"] += 1
            return False
        a_level = min(a_burst, held[0] + (now - held[1]) * a_rate)
        i_level = min(i_burst, held[2] + (now - held[3]) * i_rate)
        if a_level < 1 or i_level < 1:
            self.outcomes["source_rate"] += 1
            return False
        held[0], held[1], held[2], held[3] = a_level - 1, now, i_level - 1, now
        held[4] += 1
        return True

    def _round(self, node: _Node) -> None:
        """A gossip round of rumours, then one of notices (and suspicion timers)."""
        node.round_at = None
        if not node.running:
            return
        if node.rumours:
            self._gossip_round(node)
        self._membership_round(node)
        if node.rumours or node.notices or node.suspicions:
            interval = self.config.gossip_interval
            k = round((self.now - node.start) / interval) + 1
            node.round_at = node.start + k * interval
            self._at(node.round_at, self._round, node)

    def _take(self, node: _Node, count: int) -> list[int]:
        """The first C{count} pending rumours, most transmissions left first."""
        taken = []
        r_left = node.r_left
        level = node.top
        levels = node.levels
        while level > 0 and len(taken) < count:
            queue = levels[level]
            while queue and len(taken) < count:
                origin = queue.popleft()
                if r_left[origin] == level and origin not in taken:
                    taken.append(origin)
            if not queue:
                level -= 1
        node.top = level
        return taken

    def _holds(self, node: _Node, origin: int, peer: int) -> None:
        """C{peer} holds C{origin}'s pending rumour (as gossip's Rumour.told)."""
        holders = node.holders.get(origin)
        if holders is not None and len(holders) < rumours.TOLD_MAX:
            holders.add(peer)

    def _gossip_round(self, node: _Node) -> None:
        """
        As gossip.round: the active peers in random order, each sent the
        pending rumours it is not known to hold, until C{fanout} were sent
        something.  (The real node scans every pending rumour per peer; the
        model looks at the 3 * per_list with the most transmissions left.)
        """
        healthy = [link.peer for link in node.links.values()
                   if link.suspected_at is None and link.verified]
        if not healthy:
            return
        self.rng.shuffle(healthy)
        per = self.per_list
        candidates = self._take(node, 3 * per)
        sent = dict.fromkeys(candidates, 0)
        known, r_hops, r_left, holders = node.known, node.r_hops, node.r_left, node.holders
        fanout, sends = self.config.fanout, 0
        for target in healthy:
            batch = [origin for origin in candidates
                     if origin != target and target not in holders[origin]
                     and r_left[origin] > sent[origin]][:per]
            if batch:
                entries = [(o, node.seq if o == node.i else known[o], r_hops[o]) for o in batch]
                self._send_entries(node, target, entries, False)
                for origin in batch:
                    sent[origin] += 1
                    holders[origin].add(target)
                sends += 1
                if sends >= fanout:
                    break
        everyone = set(healthy)
        levels = node.levels
        for origin in reversed(candidates):
            left = r_left[origin] - sent[origin]
            if left <= 0 or everyone <= holders[origin] | {origin}:
                r_left[origin] = 0
                node.rumours -= 1
                del holders[origin]
            elif sent[origin] == 0:
                levels[r_left[origin]].appendleft(origin)
                if r_left[origin] > node.top:
                    node.top = r_left[origin]
            else:
                r_left[origin] = left
        for origin in candidates:
            left = r_left[origin]
            if left and sent[origin]:
                levels[left].append(origin)
                if left > node.top:
                    node.top = left

    def _send_entries(self, node: _Node, dst: int, entries: list, request: bool) -> None:
        size = self.sizes.list_header + self.sizes.list_entry * len(entries)
        self._send(node, dst, "peer_list", size, self._on_list, entries, request)

    def _send_list(self, node: _Node, dst: int, request: bool, records: list[int]) -> None:
        """
        Our announcement and C{records} in as many PEER_LIST datagrams as
        it takes; the loss of each is drawn, the entries that got through
        arrive in one event.
        """
        if request and len(node.order) < self.config.degree:
            # the answer to a newcomer's request is charged to nobody
            node.asked[dst] = self.now + gossip.NEWCOMER_WINDOW
        known = node.known
        entries = [(node.i, node.seq, 0)] + [(peer, known[peer], 1) for peer in records]
        per = self.per_list
        sizes = self.sizes
        delivered = []
        first = True
        got_request = False
        for start in range(0, len(entries), per):
            chunk = entries[start:start + per]
            size = sizes.list_header + sizes.list_entry * len(chunk)
            self.frames["peer_list"] += 1
            self.bytes["peer_list"] += size
            self.sent += 1
            if self.loss and self.rng.random() < self.loss:
                self.dropped += 1
            else:
                delivered.extend(chunk)
                if first:
                    got_request = request
            first = False
        if delivered:
            heapq.heappush(self._heap, (
                self.now + self.latency, next(self._sequence), self._arrive,
                (dst, node.i, sizes.list_header + sizes.list_entry * min(per, len(delivered)),
                 self._on_list, (delivered, got_request))))

    def _on_list(self, node: _Node, sender: int, entries: list, request: bool) -> None:
        known, state, i = node.known, node.state, node.i
        duplicates = 0
        until = node.asked.get(sender)
        source = sender if until is None or until < self.now else -1
        for origin, seq, hops in entries:
            held = known[origin]
            if held and seq == held and origin != i and state[origin] < FAILED:
                duplicates += 1  # (the common case, as _accept would settle it)
                if node.r_left[origin]:
                    self._holds(node, origin, sender)
                continue
            self._accept(node, origin, seq, hops, source, sender)
        self.outcomes["duplicate"] += duplicates
        if sender in node.boot_pending and known[sender]:
            node.boot_pending.discard(sender)
        if request:
            if sender in node.proven:
                last = node.full_sent.get(sender)
                if last is None or self.now - last >= self.config.peer_list_interval:
                    node.full_sent[sender] = self.now
                    self._send_list(node, sender, False, list(node.order))
            else:
                self.counters["peer_list_unverified"] += 1

    # membership

    def _registry_n(self, node: _Node) -> int:
        return len(node.order)

    def _suspect_member(self, node: _Node, peer: int, by: int) -> None:
        if node.known[peer] and node.state[peer] not in GONE:
            self._suspect(node, peer, by)

    def _suspect(self, node: _Node, peer: int, by: int, sender: int = -1) -> None:
        seq = node.known[peer]
        held = node.suspicions.get(peer)
        if held is None or held[0] != seq:
            if len(node.suspicions) >= membership.MAX_SUSPICIONS:
                self.counters["suspicions_full"] += 1
                return
            node.suspicions[peer] = [seq, self.now, [by]]
            node.state[peer] = SUSPECT
            self.counters["suspected_self" if by == node.i else "suspected_rumour"] += 1
            self._emit("suspected", node.i, peer)
            entry = (N_SUSPECT, peer, seq, by)
            self._spread(node, entry, sender)
            if peer in node.links:
                self._send_notices(node, peer, [entry])
        elif by not in held[2] and len(held[2]) <= self.config.suspicion_confirmations:
            held[2].append(by)
            self.counters["confirmations"] += 1
            self._spread(node, (N_SUSPECT, peer, seq, by), sender)
        else:
            rumour = node.notices.get((peer, N_SUSPECT, by))
            if rumour is not None and sender >= 0 and len(rumour[2]) < rumours.TOLD_MAX:
                rumour[2].add(sender)

    def timeout(self, node: _Node, suspicion: list) -> float:
        """Seconds a suspicion lasts (as Membership.timeout)."""
        config = self.config
        low = config.suspicion_mult * math.log10(max(len(node.order) + 1, 10))
        high = config.suspicion_max_mult * low
        wanted = config.suspicion_confirmations
        if wanted <= 0:
            return low
        confirmations = min(len(suspicion[2]) - 1, wanted)
        return max(low, high - (high - low) * math.log(confirmations + 1)
                   / math.log(wanted + 1))

    def _suspicion_timers(self, node: _Node) -> None:
        now = self.now
        for peer, suspicion in list(node.suspicions.items()):
            if node.known[peer] != suspicion[0] or node.state[peer] != SUSPECT:
                del node.suspicions[peer]
                continue
            if now - suspicion[1] >= self.timeout(node, suspicion):
                self._gone(node, peer, FAILED)
                self._spread(node, (N_DEAD, peer, node.known[peer], node.i))

    def _gone(self, node: _Node, peer: int, reason: int, seq: int | None = None) -> None:
        node.suspicions.pop(peer, None)
        old = node.known[peer]
        if node.state[peer] not in GONE:
            node.leaves[self.leaf[peer]] ^= hash((peer, old))
        if seq is not None and seq > old:
            node.known[peer] = seq
        node.state[peer] = reason
        self._emit("gone", node.i, peer, reason="left" if reason == LEFT else "failed")
        self._drop(node, peer)

    def _on_notices(self, node: _Node, sender: int, entries: list) -> None:
        for entry in entries:
            self._notice(node, sender, entry)

    def _notice(self, node: _Node, sender: int, entry: tuple) -> None:
        kind, peer, seq, by = entry
        if peer == node.i:
            if kind in (N_SUSPECT, N_DEAD) and seq >= node.seq and node.refuted_for != node.seq:
                node.refuted_for = node.seq
                self.counters["refuted"] += 1
                self._emit("refuted", node.i, node.i)
                node.health = min(liveness.MAX_HEALTH, node.health + 1)
                self._reannounce(node)
                self._announce_to(node, sender)
            return
        held = node.known[peer]
        if not held or seq < held or (seq > held and kind != N_LEFT):
            self.counters["notice_stale"] += 1
            return
        if node.state[peer] in GONE:
            self.counters["notice_duplicate"] += 1
            for key, rumour in node.notices.items():
                if key[0] == peer and key[1] == kind and len(rumour[2]) < rumours.TOLD_MAX:
                    rumour[2].add(sender)
            return
        if kind == N_SUSPECT:
            self._suspect(node, peer, by, sender)
        elif kind == N_DEAD:
            self._gone(node, peer, FAILED)
            self._spread(node, (N_DEAD, peer, seq, by), sender)
        else:
            self.verified[LEAVE_LABEL] += 1
            self._gone(node, peer, LEFT, seq)
            self._spread(node, (N_LEFT, peer, seq, -1), sender)

    def _tell(self, node: _Node, peer: int, dst: int) -> None:
        """Tell C{dst} that C{peer} was declared offline (rate-limited)."""
        if node.state[peer] not in GONE:
            return
        key = (peer, dst)
        told = node.told
        if self.now - told.get(key, float("-inf")) < membership.TELL_INTERVAL:
            return
        told[key] = self.now
        told.move_to_end(key)
        while len(told) > self.config.proven_memory:
            told.popitem(last=False)
        self.counters["told"] += 1
        self._send_notices(node, dst, [(N_DEAD, peer, node.known[peer], node.i)])

    def _notice_size(self, entry: tuple) -> int:
        return self.sizes.notice + (self.sizes.signature if entry[0] == N_LEFT else 0)

    def _send_notices(self, node: _Node, dst: int, entries: list) -> None:
        size = self.sizes.notice_header + sum(self._notice_size(e) for e in entries)
        self._send(node, dst, "membership", size, self._on_notices, entries)

    def _spread(self, node: _Node, entry: tuple, sender: int = -1) -> None:
        kind, peer, seq, by = entry
        key = (peer, kind, by)
        limit = self.config.retransmit_mult * max(
            1, math.ceil(math.log10(len(node.order) + 2)))
        node.notices[key] = [entry, limit, set() if sender < 0 else {sender}]
        node.notices.move_to_end(key)
        while len(node.notices) > membership.MAX_RUMOURS:
            node.notices.popitem(last=False)
            self.counters["notices_full"] += 1
        self._wake(node)

    def _membership_round(self, node: _Node) -> None:
        """As Membership.round (and its tick: the suspicion timers)."""
        if node.suspicions:
            self._suspicion_timers(node)
        if not node.notices:
            return
        healthy = [link.peer for link in node.links.values()
                   if link.suspected_at is None and link.verified]
        if not healthy:
            return
        self.rng.shuffle(healthy)
        pending = sorted(node.notices.values(), key=lambda r: -r[1])
        budget = membership.NOTICE_BUDGET
        notice_bytes = self._notice_size
        fanout, sends = self.config.fanout, 0
        for target in healthy:
            batch, size = [], 0
            for rumour in pending:
                entry = rumour[0]
                if rumour[1] <= 0 or target in rumour[2] or (
                        entry[1] == target and entry[0] == N_LEFT):
                    continue
                entry_size = notice_bytes(entry)
                if size + entry_size > budget:
                    break
                batch.append(rumour)
                size += entry_size
            if batch:
                self._send_notices(node, target, [r[0] for r in batch])
                for rumour in batch:
                    rumour[1] -= 1
                    rumour[2].add(target)
                sends += 1
                if sends >= fanout:
                    break
        everyone = set(healthy)
        for key in [k for k, r in node.notices.items()
                    if r[1] <= 0 or everyone <= r[2] | {k[0]}]:
            del node.notices[key]

    # anti-entropy

    def _digest(self, node: _Node, buckets: int) -> list[int]:
        folded = [0] * buckets
        for leaf, value in enumerate(node.leaves):
            folded[leaf % buckets] ^= value
        folded[self.leaf[node.i] % buckets] ^= hash((node.i, node.seq))
        return [value & _MASK32 for value in folded]

    def _sync(self, node: _Node) -> None:
        buckets = antientropy.bucket_count(len(node.order) + 1)
        for peer in self._targets(node, 1):
            self._send(node, peer, "sync_digest", self.sizes.digest_header + 4 * buckets,
                       self._on_digest, buckets, self._digest(node, buckets))

    def _live_in(self, node: _Node, index: int, buckets: int) -> list[int]:
        state, known = node.state, node.known
        return [peer for leaf in range(index, DIGEST_LEAVES, buckets)
                for peer in self.by_leaf[leaf]
                if known[peer] and state[peer] not in GONE]

    def _on_digest(self, node: _Node, sender: int, buckets: int, hashes: list) -> None:
        if sender not in node.proven:
            self.counters["sync_unverified"] += 1
            return
        ours = self._digest(node, buckets)
        if ours == hashes:
            self.counters["sync_in_step"] += 1
            return
        differ = [i for i in range(buckets) if ours[i] != hashes[i]]
        far_apart = (2 * len(differ) > buckets >= 8
                     or antientropy.bucket_count(len(node.order) + 1) >= 4 * buckets)
        if far_apart and self.now - node.sync_full_sent.get(sender, -_INF) >= \
                antientropy.FULL_LIST_INTERVAL:
            node.sync_full_sent[sender] = self.now
            self.counters["sync_far_apart"] += 1
            state = node.state
            self._send_list(node, sender, False, [p for p in node.order if state[p] not in GONE])
            return
        self.counters["sync_differ"] += 1
        chosen = self.rng.sample(differ, min(antientropy.SUMMARY_BUCKETS, len(differ)))
        complete, entries = [], []
        limit = antientropy.SUMMARY_ENTRIES
        for index in sorted(chosen):
            bucket = [(peer, node.known[peer]) for peer in self._live_in(node, index, buckets)]
            if self.leaf[node.i] % buckets == index:
                bucket.append((node.i, node.seq))
            if entries and len(entries) + len(bucket) > limit:
                self._send_summary(node, sender, buckets, complete, entries, [])
                complete, entries = [], []
            if len(bucket) <= limit:
                complete.append(index)
            entries.extend(bucket[:limit])
        self._send_summary(node, sender, buckets, complete, entries, [])

    def _send_summary(self, node: _Node, dst: int, buckets: int, indices: list, entries: list,
                      want: list) -> None:
        s = self.sizes
        size = (s.summary_header + s.summary_index * len(indices)
                + s.summary_entry * len(entries) + s.want_entry * len(want))
        self._send(node, dst, "sync_summary", size, self._on_summary, buckets, indices,
                   entries, want)

    def _on_summary(self, node: _Node, sender: int, buckets: int, indices: list,
                    entries: list, want: list) -> None:
        if sender not in node.proven:
            self.counters["sync_unverified"] += 1
            return
        cap = antientropy.WANT_MAX
        if want:
            records = []
            for peer in want[:cap]:
                if not node.known[peer]:
                    continue
                if node.state[peer] in GONE:
                    self._tell(node, peer, sender)
                else:
                    records.append(peer)
            if records:
                self._send_list(node, sender, False, records)
        theirs = dict(entries)
        wanted, send = [], {}
        known, state = node.known, node.state
        for peer, seq in theirs.items():
            if peer == node.i:
                continue
            held = known[peer]
            if not held or held < seq:
                wanted.append(peer)
            elif state[peer] in GONE:
                self._tell(node, peer, sender)
            elif held > seq:
                send[peer] = None
        for index in indices:
            if index >= buckets:
                continue
            for peer in self._live_in(node, index, buckets):
                if peer not in theirs:
                    send[peer] = None
        mine = self.leaf[node.i] % buckets
        if send or (mine in indices and node.i not in theirs):
            self.counters["sync_records_sent"] += len(send)
            self._send_list(node, sender, False, list(send)[:cap])
        if wanted:
            self.counters["sync_records_wanted"] += len(wanted)
            self._send_summary(node, sender, buckets, [], [], wanted[:cap])
