"""
How many NATs stand between this host and the internet: the hops whose
ICMP "time exceeded" answers come from addresses that are not global.

A fresh UDP socket with C{IP_RECVERR} sends one small datagram towards the
STUN server's host (traceroute's port 33434, which nothing serves) with
each IP TTL from 1 to C{max_hops}, again every 50 ms while its answer could
still change the result.  A datagram whose TTL
runs out at a router comes back as an ICMP time-exceeded message on the
socket's error queue, with the router's address (the offender) and the
datagram itself, which says which TTL it had.  Routers a host's own
traffic leaves through before the internet answer from their inside
addresses: private (RFC 1918), shared (RFC 6598, carrier-grade NAT) or
link-local.  The depth is the number of such hops from the first one on:
behind a home router 1, behind a home router behind a carrier-grade NAT 2,
a public host 0.  The hole puncher sends its "hold the mapping open"
keepalives with that TTL (L{omerta.mesh.punch}): they refresh every NAT of
the host's own and die before the internet.

Linux only (C{IP_RECVERR}, C{MSG_ERRQUEUE}); elsewhere, or when no router
answers (ICMP filtered or rate-limited), the depth is unknown (None).  A
router may also answer from a private address deeper in an ISP's network;
the depth then counts it too, which only makes the keepalives go one router
further.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import sys

from twisted.internet.defer import Deferred

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_ICMP = 2
ICMP_TIME_EXCEEDED = 11
_EXTENDED_ERR = struct.Struct("=IBBBBII")   # struct sock_extended_err
_MARK = b"omerta-hops:"
#: Where the probes go on the server's host: traceroute's first port, which
#: nothing serves (the STUN server would count them as junk).
PROBE_PORT = 33434
#: Private (RFC 1918), shared (RFC 6598) and link-local networks: where a
#: router on this side of the internet answers from.  (Not
#: C{ipaddress}'s C{is_private}, which also holds the documentation ranges.)
INSIDE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"))


def inside(address: str) -> bool:
    """Whether a router answering from C{address} is on this side of the internet."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.version == 4 and any(ip in network for network in INSIDE_NETWORKS)


def is_global(address: str) -> bool:
    """
    Whether C{address} lies beyond the NATs: not inside (L{inside}), not
    loopback and not unspecified.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (inside(address) or ip.is_loopback or ip.is_unspecified)


def parse_error(data: bytes, ancillary: list) -> tuple[int, str] | None:
    """
    The (TTL, offender address) of one error-queue message that is an ICMP
    time exceeded for one of our datagrams, or None.
    """
    if not data.startswith(_MARK) or len(data) < len(_MARK) + 1:
        return None
    ttl = data[len(_MARK)]
    for level, kind, payload in ancillary:
        if level != socket.IPPROTO_IP or kind != IP_RECVERR:
            continue
        if len(payload) < _EXTENDED_ERR.size + 8:
            return None
        _errno, origin, icmp_type, _code, _pad, _info, _data = _EXTENDED_ERR.unpack_from(payload)
        if origin != SO_EE_ORIGIN_ICMP or icmp_type != ICMP_TIME_EXCEEDED:
            return None
        offender = payload[_EXTENDED_ERR.size:]
        family = struct.unpack_from("=H", offender)[0]
        if family != socket.AF_INET:
            return None
        return ttl, socket.inet_ntoa(offender[4:8])
    return None


def depth(answers: dict[int, str]) -> int | None:
    """
    The NAT depth from the offenders by TTL: the run of inside addresses
    from TTL 1 on; None when the first router did not answer.
    """
    if 1 not in answers:
        return None
    count = 0
    while count + 1 in answers and inside(answers[count + 1]):
        count += 1
    return count


def unanswered(answers: dict[int, str], max_hops: int) -> list[int]:
    """
    The TTLs whose answers could still change L{depth}: those missing below
    the first router outside (or up to C{max_hops}).
    """
    missing = []
    for ttl in range(1, max_hops + 1):
        if ttl not in answers:
            missing.append(ttl)
        elif not inside(answers[ttl]):
            break
    return missing


def settled(answers: dict[int, str], max_hops: int) -> bool:
    """
    Whether more answers cannot change L{depth}: a router answered for every
    TTL from 1 up to the first one outside (or up to C{max_hops}).
    """
    return not unanswered(answers, max_hops)


def nat_depth(clock, server: tuple, interface: str = "", max_hops: int = 4,
              wait: float = 0.5, poll: float = 0.01, resend: float = 0.05) -> Deferred:
    """
    Measure the NAT depth towards C{server} (an IPv4 address and port):
    fires with an int, or None when unknown.  One fresh socket per TTL: a
    socket with C{IP_RECVERR} reports a queued error on its next send
    instead of sending.  The error queues are read every C{poll} seconds;
    it fires as soon as the answers settle it (L{settled}: a few
    milliseconds where routers answer), else after C{wait} seconds.  Every
    C{resend} seconds the probes still unanswered (L{unanswered}) go again:
    one lost probe or answer would otherwise read as a shallower depth (the
    run of inside routers seems to end where it is missing).
    """
    d = Deferred()
    if not sys.platform.startswith("linux") or ":" in server[0]:
        d.callback(None)
        return d
    sockets = []
    try:
        for ttl in range(1, max_hops + 1):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            sock.bind((interface if interface not in ("", "::") else "0.0.0.0", 0))
            sock.sendto(_MARK + bytes([ttl]), (server[0], PROBE_PORT))
    except OSError:
        for sock in sockets:
            sock.close()
        d.callback(None)
        return d
    answers: dict[int, str] = {}
    deadline = clock.seconds() + wait
    next_send = clock.seconds() + resend

    def collect() -> None:
        for sock in sockets:
            while True:
                try:
                    data, ancillary, _flags, _addr = sock.recvmsg(64, 512, MSG_ERRQUEUE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        break
                    continue  # the error the read reports; the next one is queued
                found = parse_error(data, ancillary)
                if found is not None:
                    answers.setdefault(*found)
        nonlocal next_send
        now = clock.seconds()
        missing = unanswered(answers, max_hops)
        if not missing or now >= deadline:
            for sock in sockets:
                sock.close()
            d.callback(depth(answers))
            return
        if now >= next_send:
            next_send = now + resend
            for ttl in missing:
                try:
                    sockets[ttl - 1].sendto(_MARK + bytes([ttl]), (server[0], PROBE_PORT))
                except OSError:
                    pass  # a queued error reported instead: read at the next poll
        clock.callLater(poll, collect)

    clock.callLater(poll, collect)
    return d
