"""
The STUN server: RFC 8489 answers, RFC 5780 CHANGE-REQUEST / RESPONSE-PORT /
PADDING / OTHER-ADDRESS, classic RFC 3489, errors, and no amplification.
"""

from twisted.trial import unittest

from omerta.stun.server import StunServer
from omerta.testing.udp import FakeDatagramPort
from omerta.wire.stun import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    build,
    new_transaction_id,
    parse,
    verify_fingerprint,
)

P = ("198.51.100.10", 3478)
A = ("198.51.100.11", 3479)
CLIENT = ("203.0.113.5", 40000)


class Sockets:
    def __init__(self, server, locals_):
        self.ports = {}
        for local in locals_:
            port = FakeDatagramPort(None, host=local[0], port=local[1])
            server.attach(local, port)
            self.ports[local] = port

    def sent(self):
        return [(local, data, addr) for local, port in self.ports.items()
                for data, addr in port.written]


def request(*attributes, tid=None, method=Method.BINDING, fingerprint=False):
    message = StunMessage(method, MessageClass.REQUEST, tid or new_transaction_id(), list(attributes))
    return build(message, fingerprint=fingerprint)


class ServerTests(unittest.TestCase):
    def setUp(self):
        self.server = StunServer(P, alternate=A)
        self.sockets = Sockets(self.server, [P, (A[0], P[1]), (P[0], A[1]), A])

    def ask(self, data, local=P, source=CLIENT):
        self.server.handle(parse(data), len(data), source, local)
        out = self.sockets.sent()
        for port in self.sockets.ports.values():
            port.written.clear()
        return [(local, parse(raw), addr, raw) for local, raw, addr in out]

    def test_binding(self):
        """A Binding request gets XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN and OTHER-ADDRESS."""
        [(local, response, addr, _)] = self.ask(request())
        self.assertEqual((local, addr), (P, CLIENT))
        self.assertEqual(response.cls, MessageClass.SUCCESS)
        self.assertEqual(response.get(Attr.XOR_MAPPED_ADDRESS), CLIENT)
        self.assertEqual(response.get(Attr.RESPONSE_ORIGIN), P)
        self.assertEqual(response.get(Attr.OTHER_ADDRESS), A)
        self.assertIsNone(response.get(Attr.SOFTWARE))

    def test_fingerprint_echoed(self):
        """A request with FINGERPRINT gets a response with a valid FINGERPRINT."""
        [(_, response, _, raw)] = self.ask(request(fingerprint=True))
        self.assertTrue(verify_fingerprint(raw))

    def test_change_requests(self):
        """CHANGE-REQUEST picks the socket that differs as asked; OTHER-ADDRESS stays relative to the receiving socket."""
        cases = {
            (True, True): A,
            (False, True): (P[0], A[1]),
            (True, False): (A[0], P[1]),
            (False, False): P,
        }
        for flags, expected in cases.items():
            [(local, response, addr, _)] = self.ask(request((Attr.CHANGE_REQUEST, flags)))
            self.assertEqual(local, expected, flags)
            self.assertEqual(response.get(Attr.RESPONSE_ORIGIN), expected)
            self.assertEqual(response.get(Attr.OTHER_ADDRESS), A)

    def test_change_request_arriving_on_alternate(self):
        """A request on the alternate socket asking to change both answers from the primary."""
        [(local, _, _, _)] = self.ask(request((Attr.CHANGE_REQUEST, (True, True))), local=A)
        self.assertEqual(local, P)

    def test_change_request_without_alternate(self):
        """Without an alternate address CHANGE-REQUEST gets 420 naming it."""
        server = StunServer(P)
        sockets = Sockets(server, [P])
        data = request((Attr.CHANGE_REQUEST, (True, False)))
        server.handle(parse(data), len(data), CLIENT, P)
        [(_, raw, _)] = sockets.sent()
        response = parse(raw)
        self.assertEqual(response.cls, MessageClass.ERROR)
        self.assertEqual(response.get(Attr.ERROR_CODE)[0], 420)
        self.assertEqual(response.get(Attr.UNKNOWN_ATTRIBUTES), [Attr.CHANGE_REQUEST])

    def test_unknown_comprehension_required(self):
        """An unknown attribute below 0x8000 gets 420 with UNKNOWN-ATTRIBUTES."""
        [(_, response, _, _)] = self.ask(request((0x7777, b"abcd")))
        self.assertEqual(response.get(Attr.ERROR_CODE)[0], 420)
        self.assertEqual(response.get(Attr.UNKNOWN_ATTRIBUTES), [0x7777])

    def test_unknown_optional_ignored(self):
        """An unknown attribute at or above 0x8000 is ignored."""
        [(_, response, _, _)] = self.ask(request((0x8777, b"abcd")))
        self.assertEqual(response.cls, MessageClass.SUCCESS)

    def test_other_method(self):
        """A request of another method gets 400."""
        [(_, response, _, _)] = self.ask(request(method=0x003))
        self.assertEqual(response.get(Attr.ERROR_CODE)[0], 400)

    def test_indication_ignored(self):
        """Indications and responses get no answer."""
        data = build(StunMessage(Method.BINDING, MessageClass.INDICATION, new_transaction_id()))
        self.assertEqual(self.ask(data), [])
        self.assertEqual(self.server.metrics.get("stun_dropped", reason="not_a_request"), 1)

    def test_response_port(self):
        """RESPONSE-PORT sends the answer to that port of the requester's own IP."""
        [(_, response, addr, _)] = self.ask(request((Attr.RESPONSE_PORT, 5555)))
        self.assertEqual(addr, (CLIENT[0], 5555))
        self.assertEqual(response.get(Attr.XOR_MAPPED_ADDRESS), CLIENT)

    def test_padding_never_amplifies(self):
        """PADDING is echoed only as far as the answer stays no larger than the request."""
        [(_, _, _, plain)] = self.ask(request())
        for size in (4, 8, 64, 400):
            data = request((Attr.PADDING, bytes(size)))
            [(_, response, _, raw)] = self.ask(data)
            self.assertLessEqual(len(raw), max(len(data), len(plain)))
            if len(data) > len(plain) + 8:
                self.assertIsNotNone(response.get(Attr.PADDING))

    def test_minimal_request_bounded(self):
        """A 20-byte request gets at most a 64-byte IPv4 answer."""
        data = request()
        self.assertEqual(len(data), 20)
        [(_, _, _, raw)] = self.ask(data)
        self.assertLessEqual(len(raw), 64)

    def test_classic_request(self):
        """An RFC 3489 request gets MAPPED-ADDRESS, SOURCE-ADDRESS and CHANGED-ADDRESS."""
        tid = bytes(range(16))
        data = build(StunMessage(Method.BINDING, MessageClass.REQUEST, tid, []))
        [(local, response, addr, _)] = self.ask(data)
        self.assertTrue(response.classic)
        self.assertEqual(response.transaction_id, tid)
        self.assertEqual(response.get(Attr.MAPPED_ADDRESS), CLIENT)
        self.assertEqual(response.get(Attr.SOURCE_ADDRESS), P)
        self.assertEqual(response.get(Attr.CHANGED_ADDRESS), A)
        self.assertIsNone(response.get(Attr.XOR_MAPPED_ADDRESS))

    def test_classic_response_address_not_honoured(self):
        """RESPONSE-ADDRESS in a classic request never redirects the answer."""
        tid = bytes(range(16))
        data = build(StunMessage(Method.BINDING, MessageClass.REQUEST, tid,
                                 [(Attr.RESPONSE_ADDRESS, ("192.0.2.99", 53))]))
        [(_, _, addr, _)] = self.ask(data)
        self.assertEqual(addr, CLIENT)

    def test_ipv6_client(self):
        """IPv6 sources are mapped with XOR-MAPPED-ADDRESS too."""
        server = StunServer(("::1", 3478))
        sockets = Sockets(server, [("::1", 3478)])
        data = request()
        server.handle(parse(data), len(data), ("2001:db8::5", 4000), ("::1", 3478))
        [(_, raw, _)] = sockets.sent()
        self.assertEqual(parse(raw).get(Attr.XOR_MAPPED_ADDRESS), ("2001:db8::5", 4000))
