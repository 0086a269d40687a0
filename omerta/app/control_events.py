"""
The control API's event stream: node events as server-sent events
(C{text/event-stream}), one C{EventStream} per client, bounded (a client
that stops reading is disconnected), with keepalive comments.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

KEEPALIVE_INTERVAL = 15.0
"""Seconds between C{: keepalive} comments on an event stream."""

STREAM_BACKLOG = 256
STREAM_BACKLOG_BYTES = 256 * 1024
"""
Events kept for a client whose socket is full (the transport paused the
stream); beyond either bound the client is disconnected.
"""


def encode(document: Any) -> bytes:
    """A document as C{omerta --output json} prints it."""
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("ascii")





def jsonable(value: Any) -> Any:
    """
    An event's value as JSON: ids (bytes) in hex, addresses as "host:port"
    (a relayed path as the relay's, without its session header), reports as
    their C{as_dict()}.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if hasattr(value, "relay_address"):  # RelayRoute: never the session header
        value = value.relay_address
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], int):
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if hasattr(value, "as_dict"):
        return jsonable(value.as_dict())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "value") and hasattr(value, "name"):  # an enum
        return jsonable(value.value)
    return str(value)


def sse_event(kind: str, data: dict) -> bytes:
    """One server-sent event: C{event: KIND}, one C{data:} line of compact JSON."""
    payload = json.dumps(jsonable(data), sort_keys=True, separators=(",", ":"))
    return f"event: {kind}\ndata: {payload}\n\n".encode("ascii")


@implementer(IPushProducer)
class EventStream:
    """
    One client's C{/v1/events}: subscribed to the node's events of C{kinds}
    for as long as the connection lasts, a C{: keepalive} comment every
    L{KEEPALIVE_INTERVAL} seconds.  A push producer for the connection:
    while its socket is full (paused) events wait, at most
    L{STREAM_BACKLOG} of them (L{STREAM_BACKLOG_BYTES}); past that the
    client is disconnected.  C{closed} fires once it is unsubscribed.
    """

    log = Logger()

    def __init__(self, request, events, kinds: tuple[str, ...], clock, *,
                 keepalive: float = KEEPALIVE_INTERVAL, backlog: int = STREAM_BACKLOG,
                 backlog_bytes: int = STREAM_BACKLOG_BYTES):
        self.request = request
        self.events = events
        self.kinds = kinds
        self.clock = clock
        self.keepalive_interval = keepalive
        self.backlog = backlog
        self.backlog_bytes = backlog_bytes
        self.paused = False
        self.queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self.sent = 0
        self.finished = False
        self.closed = Deferred()
        self._unsubscribe: list[Callable[[], None]] = []
        self._keepalive: LoopingCall | None = None

    def start(self) -> None:
        request = self.request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._ended)
        for kind in self.kinds:
            self._unsubscribe.append(self.events.subscribe(kind, self._handler(kind)))
        self._send(f": subscribed to {','.join(self.kinds)}\n\n".encode("ascii"))
        self._keepalive = LoopingCall(self._send_keepalive)
        self._keepalive.clock = self.clock
        self._keepalive.start(self.keepalive_interval, now=False)

    def _handler(self, kind: str):
        def deliver(**data) -> None:
            try:
                chunk = sse_event(kind, data)
            except Exception:
                self.log.failure("Cannot encode a {kind} event for the control API", kind=kind)
                return
            self._send(chunk)

        return deliver

    def _send_keepalive(self) -> None:
        self._send(b": keepalive\n\n")
        channel = getattr(self.request, "channel", None)
        if channel is not None and hasattr(channel, "resetTimeout"):
            channel.resetTimeout()  # a stream is not idle

    def _send(self, chunk: bytes) -> None:
        if self.finished:
            return
        if not self.paused:
            self.sent += 1
            self.request.write(chunk)
            return
        self.queue.append(chunk)
        self.queued_bytes += len(chunk)
        if len(self.queue) > self.backlog or self.queued_bytes > self.backlog_bytes:
            self.log.warn("Control API: an event client does not read; {count} events"
                          " waiting, disconnecting it", count=len(self.queue))
            self.queue.clear()
            self.queued_bytes = 0
            self._cleanup()
            transport = self.request.channel.transport
            abort = getattr(transport, "abortConnection", transport.loseConnection)
            abort()

    # IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.queue and not self.paused and not self.finished:
            chunk = self.queue.popleft()
            self.queued_bytes -= len(chunk)
            self.sent += 1
            self.request.write(chunk)

    def stopProducing(self) -> None:
        self._cleanup()

    # ending

    def close(self) -> None:
        """End the stream (the service stops): finish the response, close the connection."""
        if self.finished:
            return
        self._cleanup()
        request = self.request
        channel = getattr(request, "channel", None)
        if channel is None:  # the connection is gone already
            return
        request.unregisterProducer()
        request.finish()
        channel.loseConnection()

    def _ended(self, _result) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.finished:
            return
        self.finished = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self.closed.callback(None)
