"""
Membership between real processes: a relay and five member nodes
(C{twistd -n omerta-node}) on loopback.  A member killed with SIGKILL is
known gone ("failed") by every live node within 15 s; one stopped cleanly
is known gone ("left") at once.  What each node believes is read from its
C{status.json}, as C{omerta node status} shows it.
"""

import os
import signal
import time

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from tests.integration import Daemon, free_udp_port, start_relay, wait_for

MEMBERS = ("m1", "m2", "m3", "m4", "m5")
KNOWN_GONE_WITHIN = 15.0
"""Seconds after a kill by which every live node must know the member is gone."""


def peer_states(daemon: Daemon) -> dict[str, tuple[str, str | None]]:
    """name -> (state, why gone) of every peer a daemon's status lists."""
    return {p["name"]: (p.get("state"), p.get("gone"))
            for p in daemon.status().get("peers", [])}


class MembershipBetweenProcessesTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.network, self.relay = start_relay(self, base)
        self.nodes = {"relay": self.relay}
        for name in MEMBERS:
            self.nodes[name] = Daemon(
                self, "omerta-node", f"{base}/{name}", "--name", name,
                "--interface", "127.0.0.1", "--port", str(free_udp_port()),
                "--nat-interval", "0", "--invite", self.network.invite)
        return ensureDeferred(wait_for(self.everyone_online, 90, "all six nodes online",
                                       describe=self.describe))

    def everyone_online(self) -> bool:
        for name, daemon in self.nodes.items():
            states = peer_states(daemon)
            if any(states.get(other, (None,))[0] != "online"
                   for other in self.nodes if other != name):
                return False
        return True

    def describe(self) -> str:
        return "\n".join(f"{name}: {peer_states(d)}" for name, d in self.nodes.items())

    def known_gone(self, victim: str, why: str):
        live = [d for name, d in self.nodes.items() if name != victim]
        return lambda: all(peer_states(d).get(victim) == ("offline", why) for d in live)

    async def _killed(self):
        killed_at = time.monotonic()
        self.nodes["m3"].stop(signal.SIGKILL)
        await wait_for(self.known_gone("m3", "failed"), 30, "every node to know m3 failed",
                       interval=0.05, describe=self.describe)
        took = time.monotonic() - killed_at
        self.assertLess(took, KNOWN_GONE_WITHIN, f"known gone by all after {took:.1f} s")
        # and nobody else was declared gone meanwhile
        for name, daemon in self.nodes.items():
            if name != "m3":
                gone = {p for p, (state, _) in peer_states(daemon).items() if state == "offline"}
                self.assertEqual(gone, {"m3"}, f"{name} believes {gone} gone")

    def test_a_killed_member_is_known_gone_by_all_within_15_s(self):
        return ensureDeferred(self._killed())

    async def _left(self):
        stopped_at = time.monotonic()
        self.nodes["m4"].stop(signal.SIGTERM)
        await wait_for(self.known_gone("m4", "left"), 10, "every node to know m4 left",
                       interval=0.05, describe=self.describe)
        # status files are rewritten every 2 s: "at once" is within that
        self.assertLess(time.monotonic() - stopped_at, 4.0)

    def test_a_member_that_stops_cleanly_is_known_gone_at_once(self):
        return ensureDeferred(self._left())
