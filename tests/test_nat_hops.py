"""
The NAT depth (L{omerta.stun.hops}): reading ICMP time-exceeded answers
from a socket's error queue, and counting the inside hops.  A real
double NAT is measured in tests/test_natlab.py.
"""

from __future__ import annotations

import socket
import struct

from twisted.trial import unittest

from omerta.stun.hops import (ICMP_TIME_EXCEEDED, IP_RECVERR, SO_EE_ORIGIN_ICMP, _MARK, depth,
                              inside, parse_error, settled, unanswered)


def queued(ttl: int, offender: str, origin=SO_EE_ORIGIN_ICMP, icmp_type=ICMP_TIME_EXCEEDED,
           family=socket.AF_INET):
    """An error-queue message as recvmsg returns it: our datagram and the IP_RECVERR cmsg."""
    err = struct.pack("=IBBBBII", 113, origin, icmp_type, 0, 0, 0, 0)
    sockaddr = struct.pack("=HH4s8x", family, 0, socket.inet_aton(offender))
    return _MARK + bytes([ttl]), [(socket.IPPROTO_IP, IP_RECVERR, err + sockaddr)]


class HopsTests(unittest.TestCase):
    def test_inside_addresses(self):
        """Private, shared (carrier-grade NAT) and link-local addresses are inside; global ones not."""
        for address in ("10.99.1.1", "192.168.1.1", "100.64.0.1", "169.254.1.1"):
            self.assertTrue(inside(address), address)
        for address in ("198.51.100.1", "8.8.8.8", "not an address"):
            self.assertFalse(inside(address), address)

    def test_parse_time_exceeded(self):
        self.assertEqual(parse_error(*queued(2, "10.99.1.1")), (2, "10.99.1.1"))

    def test_other_errors_and_datagrams_ignored(self):
        """Port unreachable, errors not from ICMP, other data, short cmsgs: not an answer."""
        self.assertIsNone(parse_error(*queued(1, "10.0.0.1", icmp_type=3)))
        self.assertIsNone(parse_error(*queued(1, "10.0.0.1", origin=1)))
        data, ancillary = queued(1, "10.0.0.1")
        self.assertIsNone(parse_error(b"someone else's", ancillary))
        level, kind, payload = ancillary[0]
        self.assertIsNone(parse_error(data, [(level, kind, payload[:10])]))
        self.assertIsNone(parse_error(data, []))

    def test_depth(self):
        """The run of inside hops from TTL 1: home router 1, behind a carrier NAT 2."""
        self.assertEqual(depth({1: "192.168.1.1", 2: "198.51.100.1", 3: "203.0.113.1"}), 1)
        self.assertEqual(depth({1: "10.99.2.1", 2: "100.64.0.1", 3: "198.51.100.1"}), 2)
        self.assertEqual(depth({1: "10.99.2.1", 2: "10.99.1.1"}), 2)
        self.assertEqual(depth({1: "198.51.100.1"}), 0)
        self.assertIsNone(depth({}))
        self.assertIsNone(depth({2: "10.0.0.1"}))

    def test_settled_once_an_outside_router_answered_after_the_inside_run(self):
        """The measurement stops early only when later answers cannot change the depth."""
        self.assertTrue(settled({1: "10.99.2.1", 2: "198.51.100.200"}, 4))
        self.assertTrue(settled({1: "10.99.2.1", 2: "100.64.0.1", 3: "198.51.100.1"}, 4))
        self.assertTrue(settled({1: "10.0.0.1", 2: "10.0.1.1"}, 2))
        self.assertFalse(settled({1: "10.99.2.1"}, 4))       # TTL 2 may still answer
        self.assertFalse(settled({2: "198.51.100.200"}, 4))  # TTL 1 may still answer
        self.assertFalse(settled({}, 4))

    def test_unanswered_probes_are_those_the_depth_still_waits_for(self):
        """
        A lost probe or answer below the first router outside is asked
        again: missing, it would end the run of inside routers early.
        """
        self.assertEqual(unanswered({}, 4), [1, 2, 3, 4])
        self.assertEqual(unanswered({1: "10.99.2.1", 3: "198.51.100.1"}, 4), [2])
        self.assertEqual(unanswered({2: "198.51.100.200"}, 4), [1])
        self.assertEqual(unanswered({1: "10.99.2.1", 2: "100.64.0.1", 4: "10.0.0.9"}, 4), [3])
        self.assertEqual(unanswered({1: "10.99.2.1", 2: "198.51.100.200"}, 4), [])
        self.assertEqual(depth({1: "10.99.2.1", 3: "198.51.100.1"}), 1)  # what a loss would read


MEASURE = """
import sys
from twisted.internet import reactor
from omerta.stun.hops import nat_depth
d = nat_depth(reactor, ("198.51.100.10", 3478))
d.addCallback(lambda n: print(n)).addBoth(lambda _: reactor.stop())
reactor.run()
"""


class NatDepthInLabTests(unittest.TestCase):
    """Real routers in the NAT lab answer with ICMP; the depth counts them."""

    def test_home_router_and_double_nat(self):
        import os
        import sys

        from omerta.testing.natlab import Lab
        from tests.integration import require_lab

        require_lab()
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=repo)
        with Lab("omhop") as lab:
            lab.add_server("server")
            # (the carrier NAT behind an ISP router, which answers from a
            # public address: the depth is settled at once; the single NAT
            # is on the public segment: the server itself is next)
            carrier = lab.add_nat("carrier", "port-restricted", input_filter=False, isp=True)
            home = lab.add_nat("home", "full-cone", behind=carrier)
            behind_two = lab.add_host("alice", behind=home)
            behind_one = lab.add_host("bob", behind=lab.add_nat("single", "symmetric"))
            lab.up()
            for host, expected in ((behind_two, "2"), (behind_one, "1")):
                result = lab.run(host, [sys.executable, "-c", MEASURE], env=env, timeout=30)
                self.assertEqual(result.stdout.strip(), expected, result.stderr[-500:])
            # A lost probe or answer is asked again: with 20 % of what the
            # routers forward dropped, the depth behind two NATs still
            # reads 2 (one probe each would read 1 in about a third of
            # the measurements).
            for router in ("home", "carrier"):
                lab.set_loss(router, 20)
            for _ in range(3):
                result = lab.run(behind_two, [sys.executable, "-c", MEASURE], env=env, timeout=30)
                self.assertEqual(result.stdout.strip(), "2", result.stderr[-500:])
