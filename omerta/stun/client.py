"""
STUN client transactions (RFC 8489 §6.2.1) over a socket the caller owns.

A request is sent at once and retransmitted after RTO, 2·RTO, 4·RTO, ...
until C{rc} requests have gone out; after the last one the client waits
C{rm}·RTO more before giving up.  With the defaults (RTO 500 ms, Rc 7, Rm 16)
requests leave at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s and the transaction
times out at 39.5 s.

A response completes a transaction only if its transaction id matches AND it
comes from the address the request expects (the server itself, or the
alternate address a CHANGE-REQUEST asks for), so an off-path sender cannot
complete it even if it guessed the id.

Everything runs on an injected clock; the client never reads the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from omerta.metrics import Metrics
from omerta.wire import ParseError
from omerta.wire.stun import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    build,
    new_transaction_id,
    parse,
)

Address = tuple[str, int]


class StunTimeout(Exception):
    """
    No matching response arrived within the retransmission schedule.
    """

    def __init__(self, server: Address, attempts: int, elapsed: float):
        super().__init__(
            f"no STUN response from {server[0]}:{server[1]} after {attempts}"
            f" requests over {elapsed:.1f} s"
        )
        self.server = server


class StunErrorResponse(Exception):
    """
    The server answered with an error response.
    """

    def __init__(self, code: int, reason: str):
        super().__init__(f"STUN error {code} {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Retransmission:
    """
    RFC 8489 §6.2.1 timers.
    """

    rto: float = 0.5
    rc: int = 7
    rm: int = 16

    def schedule(self) -> list[float]:
        """
        Send times of every request, relative to the first, then the time
        the transaction fails.
        """
        times, at, rto = [], 0.0, self.rto
        for _ in range(self.rc):
            times.append(at)
            at += rto
            rto *= 2
        return times + [times[-1] + self.rm * self.rto]


RFC8489 = Retransmission()


@dataclass
class BindingResult:
    """
    A successful binding response.

    @ivar mapped: XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS from an old server).
    @ivar source: where the response came from.
    @ivar other: OTHER-ADDRESS (or classic CHANGED-ADDRESS), if the server
        has an alternate address.
    @ivar rtt: time from the last request sent to the response.
    """

    mapped: Address
    source: Address
    response_origin: Address | None
    other: Address | None
    rtt: float
    attempts: int
    message: StunMessage = field(repr=False)


@dataclass
class _Transaction:
    request: bytes
    server: Address
    accept_from: Address
    deferred: Deferred
    started: float
    policy: Retransmission
    sent: int = 0
    last_sent: float = 0.0
    call: object = None


class StunClient:
    """
    Binding transactions over a send function.

    @param send: C{send(datagram, address)}, usually the node socket's
        C{write}.
    @param clock: C{IReactorTime}.
    """

    log = Logger()

    def __init__(
        self,
        send: Callable[[bytes, Address], None],
        clock,
        metrics: Metrics | None = None,
        software: str | None = None,
    ):
        self._send = send
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.software = software
        self._pending: dict[bytes, _Transaction] = {}

    def binding(
        self,
        server: Address,
        *,
        change_ip: bool = False,
        change_port: bool = False,
        accept_from: Address | None = None,
        response_port: int | None = None,
        policy: Retransmission = RFC8489,
    ) -> Deferred:
        """
        Send a Binding request; the Deferred fires with a L{BindingResult} or
        fails with L{StunTimeout} / L{StunErrorResponse}.

        @param accept_from: the address the response must come from
            (default C{server}); a CHANGE-REQUEST test passes the address it
            asked the server to answer from.
        @param response_port: RFC 5780 RESPONSE-PORT: ask the server to send
            the response to this port of our public address.
        """
        attributes: list = []
        if change_ip or change_port:
            attributes.append((Attr.CHANGE_REQUEST, (change_ip, change_port)))
        if response_port is not None:
            attributes.append((Attr.RESPONSE_PORT, response_port))
        if self.software:
            attributes.append((Attr.SOFTWARE, self.software))
        tid = new_transaction_id()
        request = build(
            StunMessage(Method.BINDING, MessageClass.REQUEST, tid, attributes), fingerprint=True
        )
        d = Deferred(lambda _: self._cancel(tid))
        txn = _Transaction(
            request, server, accept_from or server, d, self.clock.seconds(), policy
        )
        self._pending[tid] = txn
        self._transmit(tid)
        return d

    def sibling(self, send: Callable[[bytes, Address], None]) -> StunClient:
        """
        A client for another socket that shares this client's transactions,
        so a response may complete a request sent from either socket (RFC
        5780 RESPONSE-PORT tests send from one socket and listen on another).
        """
        twin = StunClient(send, self.clock, self.metrics, self.software)
        twin._pending = self._pending
        return twin

    def _transmit(self, tid: bytes) -> None:
        txn = self._pending.get(tid)
        if txn is None:
            return
        schedule = txn.policy.schedule()
        if txn.sent == txn.policy.rc:
            del self._pending[tid]
            elapsed = self.clock.seconds() - txn.started
            self.metrics.inc("stun_client_timeouts")
            txn.deferred.errback(StunTimeout(txn.server, txn.sent, elapsed))
            return
        self._send(txn.request, txn.server)
        self.metrics.inc("stun_client_requests")
        txn.sent += 1
        txn.last_sent = self.clock.seconds()
        # Relative to the first request, so a late timer does not push the
        # rest of the schedule back.
        delay = txn.started + schedule[txn.sent] - self.clock.seconds()
        txn.call = self.clock.callLater(max(0.0, delay), self._transmit, tid)

    def _cancel(self, tid: bytes) -> None:
        txn = self._pending.pop(tid, None)
        if txn is not None and txn.call.active():
            txn.call.cancel()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def owns(self, transaction_id: bytes) -> bool:
        return transaction_id in self._pending

    def response_received(self, message: StunMessage, addr: Address) -> bool:
        """
        Offer a parsed response; returns whether it completed a transaction.
        Responses for unknown ids or from the wrong address are ignored (and
        counted), and the transaction keeps waiting.
        """
        txn = self._pending.get(message.transaction_id)
        if txn is None:
            self.metrics.inc("stun_client_ignored", reason="unknown_transaction")
            return False
        if addr != txn.accept_from:
            self.metrics.inc("stun_client_ignored", reason="wrong_source")
            self.log.debug(
                "STUN response from {addr} for a request to {server}: ignored",
                addr=addr,
                server=txn.server,
            )
            return False
        del self._pending[message.transaction_id]
        if txn.call.active():
            txn.call.cancel()
        if message.cls == MessageClass.ERROR:
            code, reason = message.get(Attr.ERROR_CODE) or (0, "no ERROR-CODE")
            txn.deferred.errback(StunErrorResponse(code, reason))
            return True
        mapped = message.get(Attr.XOR_MAPPED_ADDRESS) or message.get(Attr.MAPPED_ADDRESS)
        if mapped is None:
            txn.deferred.errback(StunErrorResponse(0, "success response without a mapped address"))
            return True
        result = BindingResult(
            mapped=mapped,
            source=addr,
            response_origin=message.get(Attr.RESPONSE_ORIGIN) or message.get(Attr.SOURCE_ADDRESS),
            other=message.get(Attr.OTHER_ADDRESS) or message.get(Attr.CHANGED_ADDRESS),
            rtt=self.clock.seconds() - txn.last_sent,
            attempts=txn.sent,
            message=message,
        )
        txn.deferred.callback(result)
        return True

    def request_looped_back(self, message: StunMessage, addr: Address) -> bool:
        """
        Our own request arrived at our socket: the hairpin test (a request
        sent to our own mapped address) succeeded.
        """
        txn = self._pending.get(message.transaction_id)
        if txn is None or addr != txn.accept_from:
            return False
        del self._pending[message.transaction_id]
        if txn.call.active():
            txn.call.cancel()
        txn.deferred.callback(
            BindingResult(addr, addr, None, None, self.clock.seconds() - txn.last_sent,
                          txn.sent, message)
        )
        return True

    def datagram_received(self, data: bytes, addr: Address) -> bool:
        """
        Parse and offer a datagram (for sockets that carry only STUN).
        """
        try:
            message = parse(data)
        except ParseError:
            self.metrics.inc("stun_client_ignored", reason="malformed")
            return False
        if message.cls not in (MessageClass.SUCCESS, MessageClass.ERROR):
            return False
        return self.response_received(message, addr)

    def stop(self) -> None:
        """
        Cancel every pending transaction (their Deferreds fail with
        CancelledError).
        """
        for txn in list(self._pending.values()):
            txn.deferred.cancel()
