"""
An in-memory simulated IP network driven by one clock.

Many nodes run their real protocol code in one process: each node gets a
L{SimHost}, passes C{host.reactor} wherever it takes a reactor, and binds its
UDP socket with C{host.reactor.listenUDP}.  Datagrams written to a port
arrive at the protocol bound to the destination address after the link's
latency, unless the network drops them.  Time only moves when the test moves
it (L{SimNetwork.run}, L{SimNetwork.run_until}, or the clock directly).
With C{Node} standing for any node class that takes a reactor::

    net = SimNetwork(seed=1, latency=0.020, loss=0.01)
    relay = net.host("198.51.100.1")
    alice = net.host("10.0.0.2")
    net.add_nat(
        "203.0.113.5",
        PortRestrictedConeNat("203.0.113.5", net.clock),
        ["10.0.0.2"],
    )
    relay_node = Node(reactor=relay.reactor, port=4000)
    alice_node = Node(reactor=alice.reactor, bootstrap=("198.51.100.1", 4000))
    net.run_until(lambda: alice_node.connected, timeout=10)

Randomness (loss, jitter, duplication, reordering) comes from one
C{random.Random(seed)}, so a run is reproducible.  Every address is a
string IP literal and must be unique in the whole simulation, including the
private addresses behind different NATs.

Per-packet cost is kept small for simulations with thousands of nodes:
routing is a few dict look-ups, a delivery is one C{callLater}, and the
default clock, L{SimClock}, schedules in O(log n) where
L{twisted.internet.task.Clock} sorts all pending calls on every call.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from twisted.internet import error
from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReactorUDP
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from omerta.testing.udp import Address, FakeDatagramPort, is_wildcard

FIRST_EPHEMERAL_PORT = 40000
DROP_REASONS = ("loss", "partition", "unbound", "nat", "ttl")


class SimClock(Clock):
    """
    A L{Clock} that keeps its pending calls in a heap.

    L{Clock.callLater} and L{Clock.advance} sort every pending call each
    time, which costs O(n) per packet once thousands of nodes have timers
    and packets in flight.  This clock behaves the same (calls due at the
    same time run in the order they were scheduled; C{advance} moves time
    first and then runs what is due) in O(log n).  Cancelled and
    rescheduled calls leave stale heap entries behind that are skipped, and
    purged when they outnumber the live ones.
    """

    def __init__(self) -> None:
        self.rightNow = 0.0
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._sequence = itertools.count()
        self._stale = 0

    @property
    def calls(self) -> list[DelayedCall]:  # type: ignore[override]
        """
        The pending calls in the order they will run (built on each access).
        """
        return self.getDelayedCalls()

    def _sortCalls(self) -> None:
        """
        Nothing to sort: the heap keeps its order.
        """

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        """
        See L{twisted.internet.interfaces.IReactorTime.callLater}.
        """
        call = DelayedCall(
            self.seconds() + delay,
            callable,
            args,
            kw,
            self._cancelled,
            self._rescheduled,
            self.seconds,
        )
        heapq.heappush(self._heap, (call.time, next(self._sequence), call))
        return call

    def getDelayedCalls(self) -> list[DelayedCall]:  # type: ignore[override]
        """
        See L{twisted.internet.interfaces.IReactorTime.getDelayedCalls}.

        @return: the pending calls, earliest first.
        """
        live = [entry for entry in self._heap if self._is_current(entry)]
        live.sort(key=lambda entry: (entry[2].getTime(), entry[1]))
        return [entry[2] for entry in live]

    def next_call_time(self) -> float | None:
        """
        @return: when the earliest pending call is due, or L{None} when
            nothing is pending.
        """
        heap = self._heap
        while heap:
            when, _, call = heap[0]
            if call.cancelled or call.called or when != call.time:
                heapq.heappop(heap)
                self._stale -= 1
            elif call.delayed_time:
                heapq.heappop(heap)
                call.activate_delay()
                heapq.heappush(heap, (call.time, next(self._sequence), call))
            else:
                return when
        return None

    def advance(self, amount: float) -> None:
        """
        Move time forward by C{amount}, then run every call that is due, in
        order, including calls those calls schedule for no later than now.
        """
        self.rightNow += amount
        heap = self._heap
        while True:
            when = self.next_call_time()
            if when is None or when > self.rightNow:
                return
            call = heapq.heappop(heap)[2]
            call.called = 1
            call.func(*call.args, **call.kw)

    @staticmethod
    def _is_current(entry: tuple[float, int, DelayedCall]) -> bool:
        when, _, call = entry
        return not (call.cancelled or call.called) and when == call.time

    def _cancelled(self, call: DelayedCall) -> None:
        self._note_stale()

    def _rescheduled(self, call: DelayedCall) -> None:
        # Called when a call moved earlier: its old entry is now stale.
        heapq.heappush(self._heap, (call.time, next(self._sequence), call))
        self._note_stale()

    def _note_stale(self) -> None:
        self._stale += 1
        if self._stale > 64 and self._stale * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if self._is_current(entry)]
            heapq.heapify(self._heap)
            self._stale = 0


class INatModel(Interface):
    """
    The translation and filtering policy of one NAT router.

    Addresses are C{(ip, port)} tuples.  A model keeps its own state (the
    mapping table) and reads time from the clock it was built with.
    """

    transparent = Attribute(
        "True when addresses inside this router are reachable from outside "
        "as they are (no translation); False for a real NAT, whose inside "
        "addresses are private."
    )

    def outbound(src: Address, dst: Address) -> Address | None:
        """
        A packet from the inside endpoint C{src} leaves for C{dst}.

        @return: the source address it carries outside, or L{None} to drop
            it (no mapping can be made).
        """

    def inbound(src: Address, dst: Address) -> Address | None:
        """
        A packet from C{src} arrives at the public endpoint C{dst}.

        @return: the inside endpoint to deliver it to, or L{None} to drop it
            (no mapping, or the filter refuses C{src}).
        """


@implementer(INatModel)
class NoNat:
    """
    No translation: inside hosts use their own addresses in public.

    Lets a test matrix treat "no NAT" like any other model; a host with no
    NAT may equally be left out of every L{SimNetwork.add_nat}.
    """

    transparent = True

    def outbound(self, src: Address, dst: Address) -> Address:
        """
        @return: C{src}, unchanged.
        """
        return src

    def inbound(self, src: Address, dst: Address) -> Address:
        """
        @return: C{dst}, unchanged.
        """
        return dst


class _Mapping:
    """
    One entry of a L{MappingNat} table.

    @ivar permits: filter key -> time the inside endpoint last sent to a
        remote with that key.
    """

    __slots__ = ("key", "internal", "external_port", "last_used", "permits")

    def __init__(self, key: Hashable, internal: Address, external_port: int) -> None:
        self.key = key
        self.internal = internal
        self.external_port = external_port
        self.last_used = 0.0
        self.permits: dict[Hashable, float] = {}


@implementer(INatModel)
class MappingNat:
    """
    A NAT built from a mapping table and two policies (RFC 4787 terms).

    Subclasses choose the behaviour with two functions:
      - C{mapping_key(src, dst)}: which outbound packets share one external
        port.  C{src} is endpoint-independent mapping, C{(src, dst[0])}
        address-dependent, C{(src, dst)} address-and-port-dependent
        (symmetric).
      - C{filter_key(remote)}: which remotes may send in through a mapping
        once the inside endpoint sent to them.  A constant is
        endpoint-independent filtering (full cone), C{remote[0]}
        address-dependent (restricted cone), C{remote}
        address-and-port-dependent (port-restricted cone).

    A mapping and each permission live for C{timeout} seconds after the last
    outbound packet that used them (inbound packets do not refresh them
    unless C{inbound_refresh}).  Expired entries are removed lazily and by a
    sweep at most once per C{timeout}.

    @ivar public_ip: the router's public address.
    """

    transparent = False

    def __init__(
        self,
        public_ip: str,
        clock: IReactorTime,
        timeout: float = 120.0,
        first_port: int = 20000,
        preserve_ports: bool = False,
        inbound_refresh: bool = False,
    ) -> None:
        """
        @param public_ip: the address mapped packets carry outside.
        @param clock: the clock of the simulation (C{net.clock}).
        @param timeout: idle seconds after which a mapping expires.
        @param first_port: external ports are handed out from here upward,
            wrapping around to 1024 after 65535.
        @param preserve_ports: try the inside port as the external port
            first, as many home routers do.
        @param inbound_refresh: let inbound packets keep a mapping alive.
        """
        self.public_ip = public_ip
        self.clock = clock
        self.timeout = timeout
        self.first_port = first_port
        self.preserve_ports = preserve_ports
        self.inbound_refresh = inbound_refresh
        self._by_key: dict[Hashable, _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}
        self._next_port = first_port
        self._next_sweep = 0.0

    @staticmethod
    def mapping_key(src: Address, dst: Address) -> Hashable:
        """
        @return: the key that decides which outbound packets share a mapping.
        """
        raise NotImplementedError("a NAT model chooses its mapping behaviour")

    @staticmethod
    def filter_key(remote: Address) -> Hashable:
        """
        @return: the key that decides which remotes may send in.
        """
        raise NotImplementedError("a NAT model chooses its filtering behaviour")

    def outbound(self, src: Address, dst: Address) -> Address | None:
        """
        Map C{src}, creating or refreshing its mapping, and permit replies
        from C{dst} under this model's filter.

        @return: C{(public_ip, external port)}, or L{None} when every
            external port is taken.
        """
        now = self.clock.seconds()
        if now >= self._next_sweep:
            self._sweep(now)
        key = self.mapping_key(src, dst)
        mapping = self._by_key.get(key)
        if mapping is not None and now - mapping.last_used >= self.timeout:
            self._remove(mapping)
            mapping = None
        if mapping is None:
            port = self._allocate_port(src, now)
            if port is None:
                return None
            mapping = _Mapping(key, src, port)
            self._by_key[key] = mapping
            self._by_port[port] = mapping
        mapping.last_used = now
        mapping.permits[self.filter_key(dst)] = now
        return (self.public_ip, mapping.external_port)

    def refresh(self, src: Address, dst: Address) -> None:
        """
        An outbound packet that dies here (its TTL ran out): the mapping it
        would use, if it has one, and its permission for C{dst} live on
        from now; nothing is created.
        """
        now = self.clock.seconds()
        mapping = self._by_key.get(self.mapping_key(src, dst))
        if mapping is None or now - mapping.last_used >= self.timeout:
            return
        mapping.last_used = now
        key = self.filter_key(dst)
        if key in mapping.permits:
            mapping.permits[key] = now

    def inbound(self, src: Address, dst: Address) -> Address | None:
        """
        @return: the inside endpoint mapped to C{dst}'s port, if the mapping
            is alive and C{src} passes the filter; otherwise L{None}.
        """
        mapping = self._by_port.get(dst[1])
        if mapping is None:
            return None
        now = self.clock.seconds()
        if now - mapping.last_used >= self.timeout:
            self._remove(mapping)
            return None
        filter_key = self.filter_key(src)
        permitted = mapping.permits.get(filter_key)
        if permitted is None or now - permitted >= self.timeout:
            return None
        if self.inbound_refresh:
            mapping.last_used = now
            mapping.permits[filter_key] = now
        return mapping.internal

    def active_mappings(self) -> dict[Hashable, Address]:
        """
        @return: mapping key -> C{(public_ip, external port)} for every
            mapping alive now.
        """
        now = self.clock.seconds()
        return {
            key: (self.public_ip, mapping.external_port)
            for key, mapping in self._by_key.items()
            if now - mapping.last_used < self.timeout
        }

    def _allocate_port(self, internal: Address, now: float) -> int | None:
        if self.preserve_ports and self._port_free(internal[1], now):
            return internal[1]
        port = self._next_port
        for _ in range(65536 - 1024):
            if port > 65535:
                port = 1024
            if self._port_free(port, now):
                self._next_port = port + 1
                return port
            port += 1
        return None

    def _port_free(self, port: int, now: float) -> bool:
        mapping = self._by_port.get(port)
        if mapping is None:
            return True
        if now - mapping.last_used >= self.timeout:
            self._remove(mapping)
            return True
        return False

    def flush(self) -> None:
        """
        Forget every mapping, as a conntrack flush or a router reboot does:
        the next outbound datagram of an inside endpoint gets a new port.
        """
        for mapping in list(self._by_key.values()):
            self._remove(mapping)

    def _remove(self, mapping: _Mapping) -> None:
        del self._by_key[mapping.key]
        del self._by_port[mapping.external_port]

    def _sweep(self, now: float) -> None:
        for mapping in list(self._by_key.values()):
            if now - mapping.last_used >= self.timeout:
                self._remove(mapping)
            else:
                for filter_key, when in list(mapping.permits.items()):
                    if now - when >= self.timeout:
                        del mapping.permits[filter_key]
        self._next_sweep = now + self.timeout


class PortRestrictedConeNat(MappingNat):
    """
    Endpoint-independent mapping, address-and-port-dependent filtering.

    One inside endpoint keeps one external port for every destination; a
    remote may send in only from an ip:port the inside endpoint has sent to.
    """

    @staticmethod
    def mapping_key(src: Address, dst: Address) -> Hashable:
        """
        @return: C{src}: the mapping depends on the inside endpoint only.
        """
        return src

    @staticmethod
    def filter_key(remote: Address) -> Hashable:
        """
        @return: C{remote}: replies must come from the exact ip:port.
        """
        return remote


class FullConeNat(MappingNat):
    """
    Endpoint-independent mapping and filtering: once mapped, anyone may send
    in.
    """

    @staticmethod
    def mapping_key(src: Address, dst: Address) -> Hashable:
        return src

    @staticmethod
    def filter_key(remote: Address) -> Hashable:
        return None


class RestrictedConeNat(MappingNat):
    """
    Endpoint-independent mapping, address-dependent filtering: a remote IP
    the inside endpoint sent to may send in from any port.
    """

    @staticmethod
    def mapping_key(src: Address, dst: Address) -> Hashable:
        return src

    @staticmethod
    def filter_key(remote: Address) -> Hashable:
        return remote[0]


class SymmetricNat(MappingNat):
    """
    Address-and-port-dependent mapping and filtering: a new external port per
    destination ip:port, replies only from that destination.
    """

    @staticmethod
    def mapping_key(src: Address, dst: Address) -> Hashable:
        return (src, dst)

    @staticmethod
    def filter_key(remote: Address) -> Hashable:
        return remote


NAT_MODELS = {
    "full-cone": FullConeNat,
    "restricted-cone": RestrictedConeNat,
    "port-restricted": PortRestrictedConeNat,
    "symmetric": SymmetricNat,
}
"""
NAT models by the names the NAT lab uses for the same behaviours.
"""


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """
    Per-link overrides; L{None} means "use the network's value".
    """

    latency: float | None = None
    jitter: float | None = None
    loss: float | None = None
    duplicate: float | None = None
    reorder: float | None = None


class _NatRouter:
    __slots__ = ("public_ip", "model", "inside")

    def __init__(self, public_ip: str, model: INatModel, inside: set[str]) -> None:
        self.public_ip = public_ip
        self.model = model
        self.inside = inside


@implementer(IReactorUDP, IReactorTime)
class SimReactor:
    """
    The reactor a node on a L{SimHost} uses: UDP on the host's addresses,
    time from the network's shared clock.

    C{getDelayedCalls} returns the calls of every node, since they share
    one clock.
    """

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self._clock = host.network.clock

    def listenUDP(
        self,
        port: int,
        protocol: AbstractDatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> FakeDatagramPort:
        """
        See L{SimHost.listenUDP}.
        """
        return self.host.listenUDP(port, protocol, interface, maxPacketSize)

    def seconds(self) -> float:
        """
        @return: the simulated time.
        """
        return self._clock.seconds()

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        """
        Schedule C{callable} on the shared clock.
        """
        return self._clock.callLater(delay, callable, *args, **kw)

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        """
        @return: every pending call on the shared clock.
        """
        return self._clock.getDelayedCalls()


class SimHost:
    """
    A machine on a L{SimNetwork} with one or more addresses.

    @ivar network: the network it is attached to.
    @ivar addresses: its addresses; the first is the primary one.
    @ivar reactor: a L{SimReactor} to hand to node code.
    @ivar ports: its open ports by C{(ip, port)}.
    @ivar packets_sent: datagrams its ports wrote.
    @ivar bytes_sent: payload bytes its ports wrote.
    @ivar packets_received: datagrams delivered to its ports.
    @ivar bytes_received: payload bytes delivered to its ports.
    """

    def __init__(self, network: SimNetwork, ip: str) -> None:
        self.network = network
        self.addresses = [ip]
        self.ports: dict[Address, FakeDatagramPort] = {}
        self.packets_sent = 0
        self.bytes_sent = 0
        self.packets_received = 0
        self.bytes_received = 0
        self._next_ephemeral = FIRST_EPHEMERAL_PORT
        self.reactor = SimReactor(self)

    def __repr__(self) -> str:
        return f"<SimHost {' '.join(self.addresses)}>"

    @property
    def ip(self) -> str:
        """
        The primary address.
        """
        return self.addresses[0]

    def add_address(self, ip: str) -> None:
        """
        Give this host another address (e.g. the second IP of a STUN server).

        @raise ValueError: C{ip} already belongs to a host or a NAT.
        """
        self.network._register(ip, self)
        self.addresses.append(ip)

    def listenUDP(
        self,
        port: int,
        protocol: AbstractDatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> FakeDatagramPort:
        """
        Bind C{protocol} to a port on one of this host's addresses.

        @param port: the port number, or 0 for the next free one from 40000.
        @param interface: one of the host's addresses; C{""}, C{"0.0.0.0"}
            or C{"::"} mean the primary address.
        @raise twisted.internet.error.CannotListenError: the address is not
            this host's, or the port is taken.
        """
        ip = self.ip if is_wildcard(interface) else interface
        if ip not in self.addresses:
            raise error.CannotListenError(
                interface,
                port,
                OSError(errno.EADDRNOTAVAIL, f"{ip} is not an address of {self!r}"),
            )
        bindings = self.network._bindings
        if port == 0:
            port = self._next_ephemeral
            while (ip, port) in bindings:
                port += 1
            self._next_ephemeral = port + 1
        elif (ip, port) in bindings:
            raise error.CannotListenError(
                interface, port, OSError(errno.EADDRINUSE, "Address already in use")
            )
        fake = FakeDatagramPort(
            protocol,
            ip,
            port,
            send=self._send,
            maxPacketSize=maxPacketSize,
            record=self.network.record,
            on_stop=self._unbind,
        )
        bindings[(ip, port)] = (fake, self)
        self.ports[(ip, port)] = fake
        fake.startListening()
        return fake

    def _send(self, data: bytes, addr: Address, port: FakeDatagramPort) -> None:
        self.packets_sent += 1
        self.bytes_sent += len(data)
        self.network._route(port.address, data, addr, port.ttl)

    def _unbind(self, port: FakeDatagramPort) -> None:
        address = port.address
        if self.network._bindings.get(address, (None,))[0] is port:
            del self.network._bindings[address]
        self.ports.pop(address, None)


class SimNetwork:
    """
    The simulated network: hosts, links, partitions, NAT routers, counters.

    Loss, duplication and reordering are probabilities per datagram.  A
    reordered datagram is held back by one extra latency (at least 1 ms) so
    that datagrams sent after it overtake it; jitter alone can reorder too.
    Outbound NAT translation happens when a datagram is sent, inbound
    translation and filtering when it arrives at the public address, so
    hole punching sees realistic timing.

    @ivar clock: the clock driving everything.
    @ivar rng: the only source of randomness.
    @ivar latency: default one-way delay in seconds.
    @ivar jitter: default maximum deviation from C{latency}, uniform.
    @ivar loss: default drop probability.
    @ivar duplicate: default probability a datagram arrives twice.
    @ivar reorder: default probability a datagram is held back.
    @ivar record: new ports keep what they write in C{port.written}.
    @ivar hosts: every host, by each of its addresses.
    @ivar sent: datagrams written by any port.
    @ivar delivered: datagrams handed to a protocol (duplicates included).
    @ivar dropped: dropped datagrams by reason: C{"loss"}, C{"partition"},
        C{"unbound"} (nothing bound at the destination) and C{"nat"} (no
        mapping, filtered, or addressed to a private address from outside).
    @ivar duplicated: extra copies scheduled.
    @ivar reordered: datagrams held back.
    @ivar errors: datagrams whose C{datagramReceived} raised (each is logged).
    @ivar classify: when set, C{classify(data)} names the kind of each
        datagram sent (a message type, say), and L{sent_by_kind} and
        L{bytes_by_kind} count them.
    @ivar sent_by_kind: datagrams sent, by C{classify}'s answer.
    @ivar bytes_by_kind: bytes sent, by C{classify}'s answer.
    """

    log = Logger()

    def __init__(
        self,
        clock: Clock | None = None,
        seed: int = 0,
        latency: float = 0.010,
        jitter: float = 0.0,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        record: bool = False,
        classify: Callable[[bytes], Hashable] | None = None,
    ) -> None:
        """
        @param clock: the clock to drive; a new L{SimClock} by default.
        @param seed: seed of L{rng}.
        @param record: see the C{record} instance variable; off by default
            because a long simulation would keep every datagram.
        """
        self.clock = SimClock() if clock is None else clock
        self.rng = random.Random(seed)
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.record = record
        self.hosts: dict[str, SimHost] = {}
        self.sent = 0
        self.delivered = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.duplicated = 0
        self.reordered = 0
        self.errors = 0
        self.classify = classify
        self.sent_by_kind: Counter = Counter()
        self.bytes_by_kind: Counter = Counter()
        self._bindings: dict[Address, tuple[FakeDatagramPort, SimHost]] = {}
        self._links: dict[tuple[str, str], LinkSettings] = {}
        self._partitions: list[tuple[frozenset[str], frozenset[str]]] = []
        self._nat_by_public: dict[str, _NatRouter] = {}
        self._nat_by_inside: dict[str, _NatRouter] = {}

    # topology

    def host(self, ip: str) -> SimHost:
        """
        @return: the host that has address C{ip}, created on first use.
        @raise ValueError: C{ip} is the public address of a NAT router.
        """
        host = self.hosts.get(ip)
        if host is None:
            host = SimHost(self, ip)
            self._register(ip, host)
        return host

    def set_link(
        self,
        ip_a: str,
        ip_b: str,
        *,
        latency: float | None = None,
        jitter: float | None = None,
        loss: float | None = None,
        duplicate: float | None = None,
        reorder: float | None = None,
    ) -> None:
        """
        Override the network's settings between two addresses, both ways.
        Replaces any earlier override of the same pair.

        A datagram matches when its sending host's address or its source
        address on the wire (after NAT) is one end and the address it was
        sent to is the other; to shape traffic to a host behind a NAT, name
        the NAT's public address.
        """
        settings = LinkSettings(latency, jitter, loss, duplicate, reorder)
        self._links[(ip_a, ip_b)] = settings
        self._links[(ip_b, ip_a)] = settings

    def clear_link(self, ip_a: str, ip_b: str) -> None:
        """
        Remove the override between C{ip_a} and C{ip_b}, if any.
        """
        self._links.pop((ip_a, ip_b), None)
        self._links.pop((ip_b, ip_a), None)

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """
        Drop all traffic between the addresses of C{group_a} and those of
        C{group_b} until L{heal}.  Datagrams already in flight across the
        partition are dropped when they arrive.

        Addresses may be host addresses (inside ones for hosts behind a NAT)
        or NAT public addresses.
        """
        side_a, side_b = frozenset(group_a), frozenset(group_b)
        if side_a & side_b:
            raise ValueError(f"{sorted(side_a & side_b)} are on both sides")
        self._partitions.append((side_a, side_b))
        self.log.info(
            "partitioned {side_a} from {side_b}",
            side_a=sorted(side_a),
            side_b=sorted(side_b),
        )

    def heal(self) -> None:
        """
        Remove every partition.
        """
        self._partitions.clear()
        self.log.info("partitions healed")

    def add_nat(
        self, public_ip: str, model: INatModel, inside_ips: Iterable[str]
    ) -> INatModel:
        """
        Put the hosts with C{inside_ips} behind a NAT router.

        Their datagrams to any address outside the router go through
        C{model.outbound}; datagrams to C{public_ip} go through
        C{model.inbound}.  Inside addresses cannot be reached from outside
        (unless the model is transparent), but hosts inside one router
        reach each other directly.  A router's public address may itself be
        inside another router (carrier-grade NAT).

        @return: C{model}.
        @raise ValueError: C{public_ip} is in use, an inside address is
            behind another router already, or C{model.public_ip} differs.
        """
        model_ip = getattr(model, "public_ip", public_ip)
        if model_ip != public_ip:
            raise ValueError(f"the model translates to {model_ip}, not {public_ip}")
        if public_ip in self.hosts or public_ip in self._nat_by_public:
            raise ValueError(f"{public_ip} is already in use")
        inside = set(inside_ips)
        for ip in inside:
            if ip in self._nat_by_inside:
                raise ValueError(f"{ip} is already behind a NAT")
        router = _NatRouter(public_ip, model, inside)
        self._nat_by_public[public_ip] = router
        for ip in inside:
            self._nat_by_inside[ip] = router
        return model

    def nat_of(self, inside_ip: str) -> INatModel:
        """The model of the NAT router C{inside_ip} is behind."""
        return self._nat_by_inside[inside_ip].model

    # running

    def run(self, seconds: float) -> None:
        """
        Let C{seconds} of simulated time pass.

        The clock jumps from one pending call to the next, so every call runs
        with C{seconds()} equal to the time it was due, then stops exactly
        C{seconds} later.
        """
        self._run(self.clock.seconds() + seconds, None)

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """
        Run until C{predicate()} is true, checking after each step; at most
        C{timeout} seconds of simulated time.

        @return: whether C{predicate()} became true.  On success the clock
            stops at the step that made it true.
        """
        return self._run(self.clock.seconds() + timeout, predicate)

    def _run(self, deadline: float, predicate: Callable[[], bool] | None) -> bool:
        if predicate is not None and predicate():
            return True
        while True:
            when = self._next_call_time()
            if when is None or when > deadline:
                break
            self._jump(when)
            if predicate is not None and predicate():
                return True
        self._jump(deadline)
        return predicate is not None and bool(predicate())

    def _next_call_time(self) -> float | None:
        clock = self.clock
        if isinstance(clock, SimClock):
            return clock.next_call_time()
        times = [call.getTime() for call in clock.getDelayedCalls()]
        return min(times) if times else None

    def _jump(self, when: float) -> None:
        # Assigning avoids "now + (when - now) != when" float drift.
        if when > self.clock.rightNow:
            self.clock.rightNow = when
        self.clock.advance(0)

    # the data path

    def _register(self, ip: str, host: SimHost) -> None:
        if ip in self.hosts:
            raise ValueError(f"{ip} already belongs to {self.hosts[ip]!r}")
        if ip in self._nat_by_public:
            raise ValueError(f"{ip} is the public address of a NAT router")
        self.hosts[ip] = host

    def _separated(self, src_a: str, src_b: str, dst: str) -> bool:
        for side_a, side_b in self._partitions:
            if (src_a in side_a or src_b in side_a) and dst in side_b:
                return True
            if (src_a in side_b or src_b in side_b) and dst in side_a:
                return True
        return False

    def _route(self, src: Address, data: bytes, addr: Address, ttl: int = 64) -> None:
        """
        Send one datagram from the bound address C{src} to C{addr}.  With a
        C{ttl} of 1 it dies at the first router: the sender's NAT, which
        refreshes the mapping it already has for it (as conntrack does
        before the forwarding path drops it) and creates none, or the
        internet's first router for a host without NAT.  Each NAT it
        crosses takes one more: with a TTL one above the number of NATs in
        front of the sender it opens their mappings and dies at the
        internet's first router, before any other NAT.
        """
        self.sent += 1
        if self.classify is not None:
            kind = self.classify(data)
            self.sent_by_kind[kind] += 1
            self.bytes_by_kind[kind] += len(data)
        dst = (addr[0], addr[1])
        dst_ip = dst[0]
        src_ip = src[0]

        wire_src = src
        router = self._nat_by_inside.get(src_ip)
        if ttl <= 1 and (router is None or dst_ip not in router.inside):
            if router is not None:
                refresh = getattr(router.model, "refresh", None)
                if refresh is not None:
                    refresh(wire_src, dst)
            self.dropped["ttl"] += 1
            return
        crossed = 0
        while router is not None and dst_ip not in router.inside:
            if ttl - crossed <= 1:
                # dies at this NAT (an outer one): it creates no mapping
                self.dropped["ttl"] += 1
                return
            translated = router.model.outbound(wire_src, dst)
            if translated is None:
                self.dropped["nat"] += 1
                return
            wire_src = translated
            crossed += 1
            outer = self._nat_by_inside.get(wire_src[0])
            if outer is router:
                break
            router = outer
        if crossed and ttl - crossed <= 1:
            # through the sender's NATs (their mappings made), dead at the
            # internet's first router: it never reaches the other side
            self.dropped["ttl"] += 1
            return
        dst_router = self._nat_by_inside.get(dst_ip)
        if (
            dst_router is not None
            and not dst_router.model.transparent
            and wire_src[0] not in dst_router.inside
        ):
            self.dropped["nat"] += 1
            return
        if self._partitions and self._separated(src_ip, wire_src[0], dst_ip):
            self.dropped["partition"] += 1
            return

        latency, jitter, loss = self.latency, self.jitter, self.loss
        duplicate, reorder = self.duplicate, self.reorder
        if self._links:
            link = self._links.get((src_ip, dst_ip)) or self._links.get(
                (wire_src[0], dst_ip)
            )
            if link is not None:
                if link.latency is not None:
                    latency = link.latency
                if link.jitter is not None:
                    jitter = link.jitter
                if link.loss is not None:
                    loss = link.loss
                if link.duplicate is not None:
                    duplicate = link.duplicate
                if link.reorder is not None:
                    reorder = link.reorder

        rng = self.rng
        if loss and rng.random() < loss:
            self.dropped["loss"] += 1
            return
        delay = latency
        if jitter:
            delay = max(0.0, delay + jitter * (2.0 * rng.random() - 1.0))
        if reorder and rng.random() < reorder:
            self.reordered += 1
            delay += max(latency, 0.001)
        self.clock.callLater(delay, self._arrive, data, wire_src, dst, src_ip)
        if duplicate and rng.random() < duplicate:
            self.duplicated += 1
            delay = latency
            if jitter:
                delay = max(0.0, delay + jitter * (2.0 * rng.random() - 1.0))
            self.clock.callLater(delay, self._arrive, data, wire_src, dst, src_ip)

    def _arrive(self, data: bytes, src: Address, dst: Address, sender_ip: str) -> None:
        """
        A datagram reaches C{dst}: translate it in, find the bound port and
        hand it to the protocol.
        """
        if self._partitions and self._separated(sender_ip, src[0], dst[0]):
            self.dropped["partition"] += 1
            return
        router = self._nat_by_public.get(dst[0])
        if router is not None:
            while router is not None:
                inside = router.model.inbound(src, dst)
                if inside is None:
                    self.dropped["nat"] += 1
                    return
                dst = inside
                inner = self._nat_by_public.get(dst[0])
                if inner is router:
                    break
                router = inner
            if self._partitions and self._separated(sender_ip, src[0], dst[0]):
                self.dropped["partition"] += 1
                return
        binding = self._bindings.get(dst)
        if binding is None:
            self.dropped["unbound"] += 1
            return
        port, host = binding
        self.delivered += 1
        host.packets_received += 1
        host.bytes_received += len(data)
        try:
            port.protocol.datagramReceived(data, src)
        except Exception:
            self.errors += 1
            self.log.failure(
                "datagramReceived raised on {host}:{port}",
                host=dst[0],
                port=dst[1],
            )
