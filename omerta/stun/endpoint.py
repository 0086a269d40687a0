"""
The STUN side of one socket: parse, then hand requests to the server (or, for
our own request coming back through a hairpinning NAT, to the client) and
responses to the client.  Malformed STUN is dropped and counted.
"""

from __future__ import annotations

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from omerta.metrics import Metrics
from omerta.stun.client import StunClient
from omerta.stun.server import StunServer
from omerta.wire import ParseError
from omerta.wire.demux import Kind, classify
from omerta.wire.stun import MessageClass, parse

Address = tuple[str, int]


class StunEndpoint:
    def __init__(
        self,
        local: Address,
        metrics: Metrics,
        client: StunClient | None = None,
        server: StunServer | None = None,
    ):
        self.local = local
        self.metrics = metrics
        self.client = client
        self.server = server

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            message = parse(data)
        except ParseError:
            self.metrics.inc("drops", reason="stun_malformed")
            return
        if message.cls == MessageClass.REQUEST:
            if self.client is not None and self.client.owns(message.transaction_id):
                self.client.request_looped_back(message, addr)
            elif self.server is not None:
                self.server.handle(message, len(data), addr, self.local)
            else:
                self.metrics.inc("drops", reason="stun_not_served")
        elif message.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            if self.client is None or not self.client.response_received(message, addr):
                self.metrics.inc("drops", reason="stun_unmatched_response")
        else:
            self.metrics.inc("drops", reason="stun_indication")


class StunSocketProtocol(DatagramProtocol):
    """
    A socket that carries only STUN (RFC 5780 companion sockets, lifetime
    probes, the C{omerta nat check} socket).  Never raises.
    """

    log = Logger()
    noisy = False

    def __init__(self, endpoint: StunEndpoint):
        self.endpoint = endpoint

    def datagramReceived(self, data: bytes, addr) -> None:
        try:
            if classify(data) is Kind.STUN:
                self.endpoint.datagram_received(data, (addr[0], addr[1]))
            else:
                self.endpoint.metrics.inc("drops", reason="not_stun")
        except Exception:
            self.endpoint.metrics.inc("drops", reason="internal_error")
            self.log.failure("Error handling a STUN datagram from {addr}", addr=addr)
