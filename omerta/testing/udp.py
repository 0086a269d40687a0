"""
A fake UDP port and a memory reactor that can C{listenUDP}.

Protocol tests connect a L{twisted.internet.protocol.DatagramProtocol} to a
L{FakeDatagramPort}, call C{datagramReceived} themselves (or through
L{MemoryUDPReactor.deliver}), drive timers with the reactor's clock, and read
what the protocol sent from L{FakeDatagramPort.written}::

    reactor = MemoryUDPReactor()
    port = reactor.listenUDP(0, protocol)
    reactor.deliver(port, request, ("192.0.2.7", 3478))
    reactor.advance(0.5)
    [(reply, addr)] = port.written
"""

from __future__ import annotations

import errno
import functools
import socket
from collections.abc import Callable, Iterable

from twisted.internet import abstract, defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReactorUDP, IUDPTransport
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

Address = tuple[str, int]
SendFunction = Callable[[bytes, Address, "FakeDatagramPort"], object]

# The largest payload one IPv4 / IPv6 UDP datagram can carry; a real socket
# fails with EMSGSIZE above these.
MAX_UDP_PAYLOAD_V4 = 65507
MAX_UDP_PAYLOAD_V6 = 65527

_WILDCARDS = frozenset(["", "0.0.0.0", "::"])


@functools.lru_cache(maxsize=65536)
def _family(host: str) -> int:
    """
    @return: 4 or 6 for an IPv4 or IPv6 literal, 0 for anything else.
    """
    if abstract.isIPAddress(host):
        return 4
    if abstract.isIPv6Address(host):
        return 6
    return 0


def is_wildcard(interface: str) -> bool:
    """
    @return: whether C{interface} means "every address" to C{listenUDP}.
    """
    return interface in _WILDCARDS


class _FakeSocket:
    """
    The C{socket} attribute of a L{FakeDatagramPort}: C{sendto} behaves like
    C{port.write} without the address checks, as the raw socket of a real
    port does.
    """

    __slots__ = ("_port",)

    family = socket.AF_INET

    def __init__(self, port: FakeDatagramPort) -> None:
        self._port = port

    def getsockopt(self, level: int, name: int) -> int:
        """Only C{IP_TTL}: the port's hop limit (64 unless set)."""
        if (level, name) != (socket.IPPROTO_IP, socket.IP_TTL):
            raise OSError(f"fake socket: no option {level}/{name}")
        return self._port.ttl

    def setsockopt(self, level: int, name: int, value: int) -> None:
        """Only C{IP_TTL}: what later datagrams leave with (L{FakeDatagramPort.ttl})."""
        if (level, name) != (socket.IPPROTO_IP, socket.IP_TTL):
            raise OSError(f"fake socket: no option {level}/{name}")
        self._port.ttl = value

    def sendto(self, data: bytes, addr: Address) -> int:
        """
        Send C{data} to C{addr}.

        @return: the number of bytes sent, as C{socket.sendto} does.
        """
        self._port._transmit(data, addr)
        return len(data)

    def getsockname(self) -> Address:
        """
        @return: the (host, port) the fake socket is bound to.
        """
        return self._port.address


@implementer(IUDPTransport, IListeningPort)
class FakeDatagramPort:
    """
    An unconnected UDP port that records what is written to it.

    @ivar protocol: the connected datagram protocol.
    @ivar interface: the interface as passed to C{listenUDP} (may be C{""}).
    @ivar address: the concrete (host, port) this port reports as its own;
        a wildcard interface shows as C{"0.0.0.0"} (or C{"::"}).
    @ivar written: C{(packet, addr)} for every write while open, in order,
        when the port records (the default).
    @ivar written_after_close: C{(packet, addr)} for every write after
        C{stopListening}; those are never sent.
    @ivar writes_after_close: how many writes came after C{stopListening}.
    @ivar send: L{None} or a callable C{send(packet, addr, port)} that is
        called for every write while open; a simulated network hooks in here.
    @ivar socket: an object with C{sendto(data, addr)}, the path that skips
        the address checks of L{write}.
    @ivar connected: true between C{startListening} and C{stopListening}.
    @ivar closed: true once C{stopListening} was called.
    @ivar ttl: the IP TTL written datagrams leave with (C{IP_TTL} on
        L{socket}); a simulated network drops those it runs out on.
    """

    ttl = 64

    def __init__(
        self,
        protocol: AbstractDatagramProtocol,
        host: str = "127.0.0.1",
        port: int = 0,
        send: SendFunction | None = None,
        maxPacketSize: int = 8192,
        record: bool = True,
        on_stop: Callable[[FakeDatagramPort], object] | None = None,
    ) -> None:
        """
        @param protocol: the protocol to connect in L{startListening}.
        @param host: the interface the port pretends to be bound to.
        @param port: the port number it pretends to be bound to.
        @param send: see the C{send} instance variable.
        @param maxPacketSize: kept for compatibility; the fake does not
            truncate incoming datagrams.
        @param record: keep every written packet in L{written}.  A simulated
            network with thousands of nodes turns this off.
        @param on_stop: called once with this port by L{stopListening}, after
            the protocol was stopped (the owner unbinds the port there).
        """
        self.protocol = protocol
        self.interface = host
        if is_wildcard(host):
            host = "::" if host == "::" else "0.0.0.0"
        self.address: Address = (host, port)
        self._ipv6 = ":" in host
        self._max_payload = MAX_UDP_PAYLOAD_V6 if self._ipv6 else MAX_UDP_PAYLOAD_V4
        self.send = send
        self.maxPacketSize = maxPacketSize
        self.record = record
        self._on_stop = on_stop
        self.written: list[tuple[bytes, Address]] = []
        self.written_after_close: list[tuple[bytes, Address]] = []
        self.writes_after_close = 0
        self.socket = _FakeSocket(self)
        self.connected = False
        self.closed = False
        self._broadcast = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<FakeDatagramPort {self.address[0]}:{self.address[1]} {state}>"

    # IListeningPort

    def startListening(self) -> None:
        """
        Connect the protocol to this port (C{protocol.makeConnection}).
        """
        if self.connected or self.closed:
            return
        self.connected = True
        self.protocol.makeConnection(self)

    def stopListening(self) -> defer.Deferred[None]:
        """
        Stop the protocol (C{protocol.doStop}, once) and close the port.

        @return: a L{Deferred} that has already fired.
        """
        if not self.closed:
            self.closed = True
            if self.connected:
                self.connected = False
                self.protocol.doStop()
            if self._on_stop is not None:
                self._on_stop(self)
        return defer.succeed(None)

    def getHost(self) -> IPv4Address | IPv6Address:
        """
        @return: the address this port pretends to be bound to.
        """
        if self._ipv6:
            return IPv6Address("UDP", *self.address)
        return IPv4Address("UDP", *self.address)

    def logPrefix(self) -> str:
        """
        @return: the protocol's log prefix, as a real UDP port shows it.
        """
        return f"{type(self.protocol).__name__} (UDP)"

    # IUDPTransport

    def write(self, packet: bytes, addr: Address | None = None) -> None:
        """
        Send C{packet} to C{addr}, checking the address as a real unconnected
        port does.

        @param packet: the datagram.
        @param addr: C{(ip, port)}; an IP literal of this port's family.
        @raise twisted.internet.error.InvalidAddressError: C{addr} is a
            host name or an address of the other family.
        @raise twisted.internet.error.MessageLengthError: C{packet} does not
            fit in one UDP datagram.
        @raise ValueError: no address was given (this port is unconnected).
        """
        if addr is None:
            raise ValueError("write() on an unconnected UDP port needs an address")
        family = _family(addr[0])
        if family == 0:
            raise error.InvalidAddressError(
                addr[0], "write() only accepts IP addresses, not hostnames"
            )
        if (family == 6) != self._ipv6:
            raise error.InvalidAddressError(
                addr[0], f"IPv{family} address written to an IPv{10 - family} port"
            )
        if len(packet) > self._max_payload:
            raise error.MessageLengthError("message too long")
        self._transmit(packet, addr)

    def writeSequence(self, seq: Iterable[bytes], addr: Address) -> None:
        """
        Send the concatenation of C{seq} as one datagram to C{addr}.
        """
        self.write(b"".join(seq), addr)

    def connect(self, host: str, port: int) -> None:
        """
        Not supported: omerta keeps one unconnected socket per node.

        @raise NotImplementedError: always.
        """
        raise NotImplementedError(
            "FakeDatagramPort does not support connected UDP; "
            "omerta nodes write to explicit addresses"
        )

    def setBroadcastAllowed(self, enabled: bool) -> None:
        """
        Remember whether broadcast is allowed (nothing else changes).
        """
        self._broadcast = bool(enabled)

    def getBroadcastAllowed(self) -> bool:
        """
        @return: the value last given to L{setBroadcastAllowed}.
        """
        return self._broadcast

    # shared by write() and socket.sendto()

    def _transmit(self, packet: bytes, addr: Address) -> None:
        if self.closed:
            self.writes_after_close += 1
            self.written_after_close.append((packet, addr))
            return
        if self.record:
            self.written.append((packet, addr))
        if self.send is not None:
            self.send(packet, addr, self)


def _binding_conflicts(a: str, b: str) -> bool:
    """
    @return: whether binding interfaces C{a} and C{b} on the same port
        number collide (the same address, or a wildcard of the same family).
    """
    if a == b:
        return True
    if is_wildcard(a) or is_wildcard(b):
        return (":" in a) == (":" in b)
    return False


@implementer(IReactorUDP)
class MemoryUDPReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} that also binds fake UDP ports.

    @ivar udpPorts: open ports by C{(interface, port number)}, with the
        interface as given to L{listenUDP}.  A port leaves this dict when it
        stops listening, so its address can be bound again.
    """

    first_ephemeral_port = 40000

    def __init__(self) -> None:
        super().__init__()
        self.udpPorts: dict[Address, FakeDatagramPort] = {}
        self._next_ephemeral = self.first_ephemeral_port

    def listenUDP(
        self,
        port: int,
        protocol: AbstractDatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> FakeDatagramPort:
        """
        Bind a L{FakeDatagramPort} and connect C{protocol} to it.

        @param port: the port number, or 0 for the next free ephemeral port
            (40000, 40001, ... unique for this reactor).
        @param protocol: the datagram protocol.
        @param interface: the address to bind; C{""} binds every address.
        @param maxPacketSize: passed on to the port.
        @raise twisted.internet.error.CannotListenError: the address is
            already bound.
        """
        if port == 0:
            port = self._allocate_ephemeral()
        for bound_interface, bound_port in self.udpPorts:
            if bound_port == port and _binding_conflicts(bound_interface, interface):
                raise error.CannotListenError(
                    interface,
                    port,
                    OSError(errno.EADDRINUSE, "Address already in use"),
                )
        key = (interface, port)
        fake = FakeDatagramPort(
            protocol,
            interface,
            port,
            maxPacketSize=maxPacketSize,
            on_stop=lambda stopped: self._unbind(key, stopped),
        )
        self.udpPorts[key] = fake
        fake.startListening()
        return fake

    def deliver(
        self,
        port_key_or_port: FakeDatagramPort | Address | int,
        data: bytes,
        addr: Address,
    ) -> None:
        """
        Hand C{data} from C{addr} to the protocol of a bound port.

        @param port_key_or_port: the port, its C{(interface, port)} key in
            L{udpPorts}, or just its port number when that is unambiguous.
        @raise KeyError: no such open port.
        @raise ValueError: the port is closed.
        """
        port = self._find(port_key_or_port)
        if port.closed:
            raise ValueError(f"{port!r} is closed; nothing can arrive on it")
        port.protocol.datagramReceived(data, addr)

    def _find(self, key: FakeDatagramPort | Address | int) -> FakeDatagramPort:
        if isinstance(key, FakeDatagramPort):
            return key
        if isinstance(key, int):
            matches = [p for (_, n), p in self.udpPorts.items() if n == key]
            if len(matches) != 1:
                raise KeyError(f"{len(matches)} open ports have number {key}")
            return matches[0]
        return self.udpPorts[key]

    def _allocate_ephemeral(self) -> int:
        in_use = {number for _, number in self.udpPorts}
        port = self._next_ephemeral
        while port in in_use:
            port += 1
        if port > 65535:
            raise error.CannotListenError(
                "", 0, OSError(errno.EADDRINUSE, "no ephemeral ports left")
            )
        self._next_ephemeral = port + 1
        return port

    def _unbind(self, key: Address, port: FakeDatagramPort) -> None:
        if self.udpPorts.get(key) is port:
            del self.udpPorts[key]
