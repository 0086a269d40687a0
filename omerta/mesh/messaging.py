"""
Application messages between two members of a network: named channels,
fire-and-forget C{send}, and C{request} with a response, a timeout and
retransmission.

Everything travels inside the per-pair session (L{omerta.crypto.session}):
the first message to a peer starts a signed X25519 handshake, queued messages
leave once it completes, and neither a relay nor another member can read or
forge them.  The address is asked of the path seam (C{overlay.paths}) each
time a datagram leaves, so a retransmitted request takes whatever path is best
by then.

Requests are retransmitted every C{request_retry} seconds until answered or
C{timeout}; the responder keeps each answer for C{response_cache_ttl} seconds
and answers a retransmission from that cache, so a handler runs once per
request however often the request arrives.
"""

from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.crypto.session import HandshakeError, SessionError, SessionTable
from omerta.wire import ParseError
from omerta.safe_text import printable
from omerta.wire.messages import MessageType, ResponseStatus, build_body, parse_body

Handler = Callable[[bytes, bytes], object]


class MessagingError(Exception):
    pass


class RequestTimeout(MessagingError):
    def __init__(self, peer_id: bytes, channel: str, timeout: float):
        super().__init__(
            f"no response from {format_peer_id(peer_id)} on channel {channel!r}"
            f" within {timeout:g} s"
        )


class RemoteError(MessagingError):
    def __init__(self, status: int, message: str):
        super().__init__(f"{ResponseStatus(status).name.lower()}: {message}")
        self.status = status
        self.message = message


class NoRoute(MessagingError):
    def __init__(self, peer_id: bytes):
        super().__init__(f"no known path to {format_peer_id(peer_id)}")


@dataclass
class _Request:
    peer_id: bytes
    channel: str
    body: bytes
    deferred: Deferred
    deadline: float
    timeout: float
    trace_id: bytes = b""
    started: float = 0.0
    retry: object = None
    sent: int = 0


class Messaging:
    log = Logger()

    def __init__(self, overlay):
        self.overlay = overlay
        self.config = overlay.config
        self.sessions = SessionTable(overlay.node.identity, overlay.network_id,
                                     retry_after=self.config.request_retry)
        self.handlers: dict[str, Handler] = {}
        self._queued: defaultdict[bytes, list[tuple[int, bytes]]] = defaultdict(list)
        self._requests: dict[int, _Request] = {}
        self._answers: OrderedDict[tuple, tuple[bytes, float] | None] = OrderedDict()

    def on_channel(self, channel: str, handler: Handler | None) -> None:
        """
        Route messages and requests on C{channel} to C{handler(peer_id,
        payload)}; for a request its result (bytes, or a Deferred of bytes)
        is the response.  None removes the handler.
        """
        if handler is None:
            self.handlers.pop(channel, None)
        else:
            self.handlers[channel] = handler

    # sending

    def send(self, peer_id: bytes, channel: str, payload: bytes) -> None:
        body = build_body(MessageType.APP_DATA, channel=channel, payload=payload)
        self._deliver(peer_id, MessageType.APP_DATA, body)

    def request(
        self,
        peer_id: bytes,
        channel: str,
        payload: bytes,
        timeout: float | None = None,
        trace_id: bytes | None = None,
    ) -> Deferred:
        """
        Send a request; the Deferred fires with the response payload or fails
        with L{RequestTimeout}, L{RemoteError} or L{NoRoute}.
        """
        overlay = self.overlay
        timeout = self.config.request_timeout if timeout is None else timeout
        request_id = int.from_bytes(os.urandom(8), "big")
        trace_id = trace_id or os.urandom(8)
        body = build_body(
            MessageType.REQUEST,
            request_id=request_id,
            trace_id=trace_id,
            channel=channel,
            timeout_ms=int(timeout * 1000),
            payload=payload,
        )
        d = Deferred(lambda _: self._forget(request_id))
        now = overlay.clock.seconds()
        request = _Request(peer_id, channel, body, d, now + timeout, timeout, trace_id, now)
        self._requests[request_id] = request
        overlay.metrics.inc("requests", direction="out")
        self.log.info(
            "Request {request_id:016x} to {peer} on {channel}",
            request_id=request_id, peer=format_peer_id(peer_id), channel=printable(channel),
            trace_id=trace_id.hex(),
        )
        self._transmit(request_id)
        return d

    def _transmit(self, request_id: int) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        now = self.overlay.clock.seconds()
        if now >= request.deadline:
            self._forget(request_id)
            self.overlay.metrics.inc("request_timeouts")
            request.deferred.errback(RequestTimeout(request.peer_id, request.channel,
                                                    request.timeout))
            return
        request.sent += 1
        if request.sent > 1:
            self.overlay.metrics.inc("request_retransmissions")
        self._deliver(request.peer_id, MessageType.REQUEST, request.body)
        wait = min(self.config.request_retry, request.deadline - now)
        request.retry = self.overlay.clock.callLater(wait, self._transmit, request_id)

    def _forget(self, request_id: int) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None and request.retry is not None and request.retry.active():
            request.retry.cancel()

    def _deliver(self, peer_id: bytes, inner_type: int, body: bytes) -> None:
        overlay = self.overlay
        now = overlay.clock.seconds()
        session = self.sessions.get(peer_id, now)
        address = overlay.paths.message_address(peer_id)
        if session is not None and address is not None:
            overlay.send(address, MessageType.SESSION_DATA, **session.seal(inner_type, body))
            return
        queue = self._queued[peer_id]
        if len(queue) >= self.config.max_queued_per_peer:
            overlay.metrics.inc("drops", reason="send_queue_full")
            return
        if inner_type != MessageType.REQUEST or not any(b == body for _, b in queue):
            queue.append((inner_type, body))
        if address is None:
            if not overlay.paths.opening(peer_id):
                overlay.metrics.inc("drops", reason="no_route")
            return
        self._handshake(peer_id, address, now)

    def _handshake(self, peer_id: bytes, address, now: float, restart: bool = False) -> None:
        started = self.sessions.initiate(peer_id, now, restart)
        if started is not None:
            self.overlay.send(address, MessageType.HANDSHAKE_INIT, **started[0])

    def path_ready(self, peer_id: bytes) -> None:
        """
        A path to C{peer_id} opened (a relay session, a punch): if messages
        wait for it, or the tunnel plane asked for a session, start the
        handshake now on that path, rather than at the next retransmission
        (an earlier one went where it may not arrive).
        """
        overlay = self.overlay
        now = overlay.clock.seconds()
        if peer_id not in self._queued or self.sessions.get(peer_id, now) is not None:
            return
        address = overlay.paths.message_address(peer_id)
        if address is not None:
            self._handshake(peer_id, address, now, restart=True)

    def _flush(self, peer_id: bytes) -> None:
        for inner_type, body in self._queued.pop(peer_id, []):
            self._deliver(peer_id, inner_type, body)
        tunnels = self.overlay.node.tunnels
        if tunnels is not None:
            tunnels.session_ready(self.overlay.network_id, peer_id)

    def ensure_session(self, peer_id: bytes) -> None:
        """
        Start a handshake with C{peer_id} unless a session or a handshake
        exists (the tunnel plane asks, its datagrams wait meanwhile).
        """
        overlay = self.overlay
        now = overlay.clock.seconds()
        if self.sessions.get(peer_id, now) is not None:
            return
        address = overlay.paths.message_address(peer_id)
        if address is None:
            if overlay.paths.opening(peer_id):
                self._queued[peer_id]  # (an empty queue: L{path_ready} handshakes)
            else:
                overlay.metrics.inc("drops", reason="no_route")
            return
        self._handshake(peer_id, address, now)

    def confirmed(self, peer_id: bytes) -> None:
        """
        A session we answered was confirmed by a frame that did not pass
        through L{on_session_data} (tunnel data): what waited can go.
        """
        self._flush(peer_id)

    # handshakes

    def on_handshake_init(self, frame, addr, message) -> None:
        overlay = self.overlay
        try:
            response, _ = self.sessions.on_init(frame.sender, message, frame.body,
                                                overlay.clock.seconds())
        except HandshakeError as e:
            overlay.metrics.inc("drops", reason=f"handshake_{e.reason}")
            return
        overlay.send(addr, MessageType.HANDSHAKE_RESP, **response)
        overlay.metrics.inc("sessions", event="accepted")
        self._flush(frame.sender)

    def on_handshake_resp(self, frame, addr, message) -> None:
        overlay = self.overlay
        try:
            self.sessions.on_resp(frame.sender, message, overlay.clock.seconds())
        except HandshakeError as e:
            overlay.metrics.inc("drops", reason=f"handshake_{e.reason}")
            return
        overlay.metrics.inc("sessions", event="established")
        self._flush(frame.sender)

    # receiving

    def on_session_data(self, frame, addr, message) -> None:
        overlay = self.overlay
        session = self.sessions.by_id(message.session_id)
        if session is None or session.peer_id != frame.sender:
            overlay.metrics.inc("drops", reason="unknown_session")
            return
        was_confirmed = session.confirmed
        try:
            inner_type, body = session.open(message)
            inner = parse_body(inner_type, body)
        except SessionError as e:
            overlay.metrics.inc("drops", reason=f"session_{e.reason}")
            return
        except ParseError:
            overlay.metrics.inc("drops", reason="malformed_inner")
            return
        overlay.metrics.inc("bytes_app_in", len(body))
        if not was_confirmed and session.confirmed:
            # The initiator's first message confirms the session we answered:
            # what we queued for that peer can go now, on this session.
            self._flush(frame.sender)
        if inner_type == MessageType.APP_DATA:
            self._app_data(frame.sender, inner)
        elif inner_type == MessageType.REQUEST:
            self._request(frame.sender, inner)
        elif inner_type == MessageType.RESPONSE:
            self._response(frame.sender, inner)
        else:
            overlay.metrics.inc("drops", reason="unexpected_inner")

    def _app_data(self, peer_id: bytes, message) -> None:
        handler = self.handlers.get(message.channel)
        if handler is None:
            self.overlay.metrics.inc("drops", reason="no_such_channel")
            return
        maybeDeferred(handler, peer_id, message.payload).addErrback(
            lambda f: self.log.failure("Handler for {channel} failed", f,
                                       channel=printable(message.channel))
        )

    def _request(self, peer_id: bytes, message) -> None:
        overlay = self.overlay
        key = (peer_id, message.request_id)
        now = overlay.clock.seconds()
        if key in self._answers:
            cached = self._answers[key]
            overlay.metrics.inc("request_duplicates")
            if cached is not None:
                self._deliver(peer_id, MessageType.RESPONSE, cached[0])
            return
        self._answers[key] = None
        self._trim_answers(now)
        overlay.metrics.inc("requests", direction="in")
        self.log.info(
            "Request {request_id:016x} from {peer} on {channel}",
            request_id=message.request_id, peer=format_peer_id(peer_id),
            channel=printable(message.channel), trace_id=message.trace_id.hex(),
        )
        handler = self.handlers.get(message.channel)
        if handler is None:
            self._respond(key, message, ResponseStatus.NO_SUCH_CHANNEL,
                          f"no handler for channel {message.channel!r}".encode())
            return

        def done(result):
            payload = b"" if result is None else bytes(result)
            self._respond(key, message, ResponseStatus.OK, payload)

        def failed(failure):
            self.log.failure("Request handler for {channel} failed", failure,
                             channel=printable(message.channel),
                             trace_id=message.trace_id.hex())
            self._respond(key, message, ResponseStatus.ERROR,
                          failure.getErrorMessage().encode()[:1000])

        maybeDeferred(handler, peer_id, message.payload).addCallbacks(done, failed)

    def _respond(self, key: tuple, request, status: int, payload: bytes) -> None:
        body = build_body(MessageType.RESPONSE, request_id=request.request_id,
                          trace_id=request.trace_id, status=status, payload=payload)
        self.log.info(
            "Answered {request_id:016x} from {peer}: {status}",
            request_id=request.request_id, peer=format_peer_id(key[0]),
            status=ResponseStatus(status).name.lower(), trace_id=request.trace_id.hex(),
        )
        self._answers[key] = (body, self.overlay.clock.seconds())
        self._deliver(key[0], MessageType.RESPONSE, body)

    def _trim_answers(self, now: float) -> None:
        answers = self._answers
        while answers:
            key, value = next(iter(answers.items()))
            too_many = len(answers) > self.config.response_cache_size
            if too_many or (value is not None and now - value[1] > self.config.response_cache_ttl):
                answers.popitem(last=False)
            else:
                break

    def _response(self, peer_id: bytes, message) -> None:
        request = self._requests.get(message.request_id)
        if request is None or request.peer_id != peer_id:
            self.overlay.metrics.inc("drops", reason="unexpected_response")
            return
        self._forget(message.request_id)
        latency = self.overlay.clock.seconds() - request.started
        self.overlay.metrics.observe("request_latency", latency)
        self.log.info(
            "Response to {request_id:016x} from {peer}: {status} after {latency_ms:.1f} ms",
            request_id=message.request_id, peer=format_peer_id(peer_id),
            status=ResponseStatus(message.status).name.lower(), latency_ms=latency * 1000,
            trace_id=message.trace_id.hex(),
        )
        if message.status == ResponseStatus.OK:
            request.deferred.callback(message.payload)
        else:
            request.deferred.errback(RemoteError(message.status,
                                                 message.payload.decode(errors="replace")))

    def stop(self) -> None:
        for request_id in list(self._requests):
            self._requests[request_id].deferred.cancel()
