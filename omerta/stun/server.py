"""
The STUN server of a node: Binding requests on the node's own socket and, when
the node has an alternate address (C{--stun-alternate}), on the three RFC 5780
companion sockets (alternate IP / alternate port / both).

What it answers:

- RFC 8489 Binding request: success with XOR-MAPPED-ADDRESS (the request's
  source), RESPONSE-ORIGIN (the address the answer leaves from) and, with an
  alternate address, OTHER-ADDRESS; FINGERPRINT when the request had one.
- CHANGE-REQUEST: answered from the socket that differs as asked; without an
  alternate address it is an attribute this server cannot honour: 420.
- RESPONSE-PORT: the answer goes to that port of the requester's own IP, never
  to another host.
- PADDING: echoed, cut so the answer is never larger than the request.
- Unknown comprehension-required attributes: 420 with UNKNOWN-ATTRIBUTES;
  other methods: 400; indications and responses: ignored.
- Classic RFC 3489 requests (no magic cookie): MAPPED-ADDRESS, SOURCE-ADDRESS
  and CHANGED-ADDRESS as that RFC describes; RESPONSE-ADDRESS (send the answer
  to a third party) is never honoured, it would make the server a reflector.

No amplification: one datagram out per datagram in, to the requester's own IP,
with no SOFTWARE and no attribute whose size the requester controls beyond
PADDING (capped as above).  A minimal 20-byte request gets at most a 64-byte
(IPv4) or 100-byte (IPv6) answer, the size RFC 5780's attributes need.
"""

from __future__ import annotations

from twisted.logger import Logger

from omerta.metrics import Metrics
from omerta.wire.stun import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    build,
)

Address = tuple[str, int]

_ATTR_HEADER = 4


class StunServer:
    """
    Answers Binding requests.

    @param primary: the node socket's address (a specific IP when an
        alternate is configured).
    @param alternate: the alternate (IP, port), or None.
    """

    log = Logger()

    def __init__(
        self,
        primary: Address,
        metrics: Metrics | None = None,
        alternate: Address | None = None,
    ):
        self.primary = primary
        self.alternate = alternate
        self.metrics = metrics or Metrics()
        self._sockets: dict[Address, object] = {}

    def attach(self, local: Address, transport) -> None:
        """
        Register the transport that sends from C{local}.
        """
        self._sockets[local] = transport

    def _flipped(self, local: Address, change_ip: bool, change_port: bool) -> Address:
        p_ip, p_port = self.primary
        a_ip, a_port = self.alternate
        ip, port = local
        if change_ip:
            ip = a_ip if ip == p_ip else p_ip
        if change_port:
            port = a_port if port == p_port else p_port
        return (ip, port)

    def other_address(self, local: Address) -> Address | None:
        if self.alternate is None:
            return None
        return self._flipped(local, True, True)

    def handle(self, request: StunMessage, size: int, addr: Address, local: Address) -> None:
        """
        Answer one parsed message of C{size} bytes that arrived from C{addr}
        on the socket bound to C{local}.
        """
        metrics = self.metrics
        if request.cls != MessageClass.REQUEST:
            metrics.inc("stun_dropped", reason="not_a_request")
            return
        metrics.inc("stun_requests", kind="classic" if request.classic else "rfc8489")
        if request.method != Method.BINDING:
            self._error(request, 400, "Bad Request", addr, local)
            return
        unknown = list(request.unknown_required)
        change = request.get(Attr.CHANGE_REQUEST)
        if change is not None and any(change) and self.alternate is None:
            unknown.append(Attr.CHANGE_REQUEST)
        if unknown:
            self._error(request, 420, "Unknown Attribute", addr, local, unknown=unknown)
            return
        source = local
        if change is not None and any(change):
            source = self._flipped(local, *change)
        destination = addr
        response_port = request.get(Attr.RESPONSE_PORT)
        if response_port is not None and not request.classic:
            if response_port == 0:
                self._error(request, 400, "Bad Request: RESPONSE-PORT 0", addr, local)
                return
            destination = (addr[0], response_port)
        transport = self._sockets.get(source)
        if transport is None:
            metrics.inc("stun_dropped", reason="no_socket")
            return
        response = self._success(request, size, addr, source, self.other_address(local))
        transport.write(response, destination)
        metrics.inc("stun_responses", code="200")

    def _success(
        self, request: StunMessage, size: int, addr: Address, source: Address, other
    ) -> bytes:
        """
        @param other: OTHER-ADDRESS / CHANGED-ADDRESS: where the answer would
            come from had both change flags been set, relative to the socket
            the request arrived on (RFC 5780 §7.4, RFC 3489 §11.2.3).
        """
        if request.classic:
            attributes = [(Attr.MAPPED_ADDRESS, addr), (Attr.SOURCE_ADDRESS, source)]
            if other is not None:
                attributes.append((Attr.CHANGED_ADDRESS, other))
            return build(StunMessage(Method.BINDING, MessageClass.SUCCESS,
                                     request.transaction_id, attributes))
        attributes = [(Attr.XOR_MAPPED_ADDRESS, addr), (Attr.RESPONSE_ORIGIN, source)]
        if other is not None:
            attributes.append((Attr.OTHER_ADDRESS, other))
        fingerprint = request.get(Attr.FINGERPRINT) is not None
        padding = request.get(Attr.PADDING)
        response = StunMessage(Method.BINDING, MessageClass.SUCCESS,
                               request.transaction_id, attributes)
        if padding:
            plain = len(build(response, fingerprint=fingerprint))
            room = size - plain - _ATTR_HEADER
            length = min(len(padding), room - room % 4)
            if length > 0:
                attributes.append((Attr.PADDING, bytes(length)))
        return build(response, fingerprint=fingerprint)

    def _error(self, request, code, reason, addr, local, unknown=()) -> None:
        attributes = [(Attr.ERROR_CODE, (code, reason))]
        if unknown:
            attributes.append((Attr.UNKNOWN_ATTRIBUTES, [int(a) for a in unknown]))
        response = build(StunMessage(request.method, MessageClass.ERROR,
                                     request.transaction_id, attributes))
        transport = self._sockets.get(local)
        if transport is not None:
            transport.write(response, addr)
        self.metrics.inc("stun_responses", code=str(code))
