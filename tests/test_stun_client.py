"""
STUN client transactions: the RFC 8489 retransmission schedule on a Clock,
matching by transaction id and source address, errors and cancellation.
"""

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.stun.client import (
    RFC8489,
    Retransmission,
    StunClient,
    StunErrorResponse,
    StunTimeout,
)
from omerta.wire.stun import Attr, MessageClass, Method, StunMessage, build, parse

SERVER = ("198.51.100.10", 3478)
OTHER = ("198.51.100.11", 3479)


class ClientTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.sent = []
        self.client = StunClient(lambda data, addr: self.sent.append((self.clock.seconds(), data, addr)), self.clock)

    def answer(self, request_bytes, source=SERVER, cls=MessageClass.SUCCESS, attributes=None):
        request = parse(request_bytes)
        if attributes is None:
            attributes = [(Attr.XOR_MAPPED_ADDRESS, ("203.0.113.5", 40000)),
                          (Attr.OTHER_ADDRESS, OTHER)]
        response = parse(build(StunMessage(Method.BINDING, cls, request.transaction_id, attributes)))
        return self.client.response_received(response, source)

    def test_schedule(self):
        """Requests leave at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s and the transaction fails at 39.5 s."""
        self.assertEqual(RFC8489.schedule(), [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5, 39.5])
        d = self.client.binding(SERVER)
        failures = []
        d.addErrback(failures.append)
        while self.clock.getDelayedCalls():
            self.clock.advance(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds())
        self.assertEqual([t for t, _, _ in self.sent], [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
        self.assertEqual(self.clock.seconds(), 39.5)
        [failure] = failures
        failure.trap(StunTimeout)
        self.assertEqual(self.client.pending, 0)

    def test_not_failed_before_39_5(self):
        """The transaction is still pending just before 39.5 s."""
        d = self.client.binding(SERVER)
        self.clock.advance(39.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, StunTimeout)

    def test_retransmissions_are_identical(self):
        """A retransmission repeats the same bytes (same transaction id)."""
        self.client.binding(SERVER)
        self.clock.advance(2)
        self.assertEqual(len({data for _, data, _ in self.sent}), 1)

    def test_response(self):
        """A matching response gives the mapped and other addresses and the RTT."""
        d = self.client.binding(SERVER)
        self.clock.advance(0.03)
        self.assertTrue(self.answer(self.sent[0][1]))
        result = self.successResultOf(d)
        self.assertEqual(result.mapped, ("203.0.113.5", 40000))
        self.assertEqual(result.other, OTHER)
        self.assertAlmostEqual(result.rtt, 0.03)
        self.clock.advance(100)
        self.assertEqual(len(self.sent), 1)

    def test_wrong_source_ignored(self):
        """A response with the right id from another address does not complete the transaction."""
        d = self.client.binding(SERVER)
        self.assertFalse(self.answer(self.sent[0][1], source=("192.0.2.66", 3478)))
        self.assertNoResult(d)
        self.assertEqual(self.client.metrics.get("stun_client_ignored", reason="wrong_source"), 1)
        self.assertTrue(self.answer(self.sent[0][1]))
        self.successResultOf(d)

    def test_unknown_transaction_ignored(self):
        """A response to no request of ours is ignored."""
        fake = build(StunMessage(Method.BINDING, MessageClass.REQUEST, b"x" * 12))
        self.assertFalse(self.answer(fake))

    def test_change_request_expects_alternate(self):
        """With CHANGE-REQUEST the answer must come from the address asked for."""
        d = self.client.binding(SERVER, change_ip=True, change_port=True, accept_from=OTHER)
        request = parse(self.sent[0][1])
        self.assertEqual(request.get(Attr.CHANGE_REQUEST), (True, True))
        self.assertFalse(self.answer(self.sent[0][1], source=SERVER))
        self.assertTrue(self.answer(self.sent[0][1], source=OTHER))
        self.successResultOf(d)

    def test_error_response(self):
        """An error response fails the Deferred with its code."""
        d = self.client.binding(SERVER)
        self.answer(self.sent[0][1], cls=MessageClass.ERROR,
                    attributes=[(Attr.ERROR_CODE, (420, "Unknown Attribute"))])
        failure = self.failureResultOf(d, StunErrorResponse)
        self.assertEqual(failure.value.code, 420)

    def test_custom_policy(self):
        """A shorter policy for negative tests gives up at 3.5 s after three requests."""
        d = self.client.binding(SERVER, policy=Retransmission(rto=0.5, rc=3, rm=4))
        self.clock.advance(3.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, StunTimeout)
        self.assertEqual(len(self.sent), 3)

    def test_stop_cancels(self):
        """stop() cancels pending transactions and their timers."""
        d = self.client.binding(SERVER)
        self.client.stop()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sibling_shares_transactions(self):
        """A response on a sibling socket completes a request sent from the main one."""
        sibling = self.client.sibling(lambda data, addr: None)
        d = self.client.binding(SERVER)
        request = parse(self.sent[0][1])
        response = parse(build(StunMessage(Method.BINDING, MessageClass.SUCCESS,
                                           request.transaction_id,
                                           [(Attr.XOR_MAPPED_ADDRESS, ("203.0.113.5", 1))])))
        self.assertTrue(sibling.response_received(response, SERVER))
        self.successResultOf(d)

    def test_hairpin_loopback(self):
        """Our own request arriving back from our mapped address completes the hairpin test."""
        mapped = ("203.0.113.5", 40000)
        d = self.client.binding(mapped)
        request = parse(self.sent[0][1])
        self.assertTrue(self.client.request_looped_back(request, mapped))
        self.assertEqual(self.successResultOf(d).mapped, mapped)
