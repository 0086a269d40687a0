"""
L{omerta.mesh.waiting}: Deferreds fired by events, with deadlines, that leave
no subscription or timer behind; and the registry's C{peer_changed} events
they wait on.
"""

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.mesh.events import KINDS, Events
from omerta.mesh.registry import PeerRegistry
from omerta.mesh.waiting import next_event, wait_for
from tests.test_registry import NET, NOW, OWN, announce, identity


class WaitForTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = Events()
        self.value = None
        self.checks = 0

    def predicate(self):
        self.checks += 1
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    def wait(self, timeout=10.0, **options):
        options.setdefault("kinds", ("peer_changed",))
        return wait_for(self.clock, self.predicate, timeout, events=self.events, **options)

    def assertClean(self):
        self.assertEqual(self.events.subscribers("peer_changed"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_true_at_once(self):
        """A condition already true fires at once, with the predicate's value, leaving nothing behind."""
        self.value = "ready"
        self.assertEqual(self.successResultOf(self.wait()), "ready")
        self.assertClean()

    def test_fires_on_event(self):
        """An event re-checks the predicate on the next reactor turn, and the wait fires with its value."""
        d = self.wait()
        self.value = 42
        self.assertNoResult(d)  # nothing announced the change yet
        self.events.emit("peer_changed", peer_id=b"x")
        self.assertNoResult(d)  # the emitter is mid-update: checked on the next turn
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), 42)
        self.assertClean()

    def test_other_kinds_ignored(self):
        """Events of kinds not waited on do not re-check the predicate."""
        d = self.wait()
        checks = self.checks
        self.value = True
        self.events.emit("nat_changed")
        self.clock.advance(0)
        self.assertNoResult(d)
        self.assertEqual(self.checks, checks)
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_events_of_one_turn_coalesce(self):
        """Many events in one reactor turn cost one check."""
        d = self.wait()
        checks = self.checks
        for _ in range(5):
            self.events.emit("peer_changed")
        self.clock.advance(0)
        self.assertEqual(self.checks, checks + 1)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_deadline_default_false(self):
        """At the deadline the wait fires with False, and unsubscribes."""
        d = self.wait(timeout=3)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIs(self.successResultOf(d), False)
        self.assertClean()

    def test_deadline_value(self):
        """At the deadline the wait fires with expired()'s value when the predicate is still false."""
        d = self.wait(timeout=3, expired=lambda: "current")
        self.clock.advance(3)
        self.assertEqual(self.successResultOf(d), "current")
        self.assertClean()

    def test_deadline_checks_once_more(self):
        """A condition that became true silently is still seen at the deadline."""
        d = self.wait(timeout=3, expired=lambda: "late")
        self.value = "true after all"
        self.clock.advance(3)
        self.assertEqual(self.successResultOf(d), "true after all")

    def test_no_events_after_firing(self):
        """Once fired, later events neither re-check nor schedule anything."""
        d = self.wait()
        self.value = 1
        self.events.emit("peer_changed")
        self.clock.advance(0)
        self.successResultOf(d)
        checks = self.checks
        self.events.emit("peer_changed")
        self.clock.advance(0)
        self.assertEqual(self.checks, checks)
        self.assertClean()

    def test_cancel_cleans_up(self):
        """Cancelling fails the wait with CancelledError and removes its subscription and timers."""
        d = self.wait(fallback=1.0)
        self.events.emit("peer_changed")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertClean()

    def test_predicate_raises(self):
        """A predicate that raises fails the wait with its exception, cleaned up."""
        d = self.wait()
        self.value = KeyError("gone")
        self.events.emit("peer_changed")
        self.clock.advance(0)
        self.failureResultOf(d, KeyError)
        self.assertClean()

    def test_fallback_recheck(self):
        """A condition no event announces is seen at the next fallback re-check, not before."""
        d = self.wait(fallback=0.5)
        self.value = "silent"
        self.clock.advance(0.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), "silent")
        self.assertClean()

    def test_fallback_rearmed(self):
        """The fallback re-check repeats at its interval until the deadline."""
        d = self.wait(timeout=2, fallback=0.5)
        self.clock.pump([0.5] * 3)
        self.assertEqual(self.checks, 1 + 3)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.assertIs(self.successResultOf(d), False)
        self.assertClean()

    def test_fallback_is_not_polling(self):
        """A fallback shorter than half a second is refused."""
        self.assertRaises(ValueError, self.wait, fallback=0.1)
        self.assertClean()


class NextEventTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = Events()

    def test_fires_with_data(self):
        """next_event fires with the event's keyword arguments on the next turn."""
        d = next_event(self.clock, "peer_connected", 5, events=self.events)
        self.events.emit("peer_connected", peer_id=b"a", address=("192.0.2.1", 1))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), {"peer_id": b"a", "address": ("192.0.2.1", 1)})
        self.assertEqual(self.events.subscribers("peer_connected"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_match(self):
        """Only events match accepts count; the first one wins."""
        d = next_event(self.clock, "peer_connected", 5, events=self.events,
                       match=lambda peer_id, **_: peer_id == b"b")
        self.events.emit("peer_connected", peer_id=b"a")
        self.events.emit("peer_connected", peer_id=b"b", n=1)
        self.events.emit("peer_connected", peer_id=b"b", n=2)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), {"peer_id": b"b", "n": 1})

    def test_deadline(self):
        """Without such an event, next_event fires with None at the deadline and unsubscribes."""
        d = next_event(self.clock, "peer_connected", 5, events=self.events)
        self.clock.advance(5)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.events.subscribers("peer_connected"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EventsTests(unittest.TestCase):
    def test_unsubscribe_twice(self):
        """An unsubscribe function may be called more than once."""
        events = Events()
        unsubscribe = events.subscribe("peer_changed", lambda **_: None)
        unsubscribe()
        unsubscribe()
        self.assertEqual(events.subscribers("peer_changed"), 0)

    def test_kinds_documented(self):
        """Every kind a wait may use is documented, peer_changed included."""
        self.assertIn("peer_changed", KINDS)
        self.assertIn("path_changed", KINDS)


class RegistryEventsTests(unittest.TestCase):
    def setUp(self):
        self.events = Events()
        self.seen = []
        self.events.subscribe("peer_changed", lambda **e: self.seen.append(
            (e["peer_id"], e["change"])))
        self.registry = PeerRegistry(NET, OWN.peer_id, events=self.events)
        self.alice = identity(2)
        self.registry.accept(announce(self.alice, name="alice"), NOW)

    def test_announcement(self):
        """A new or newer announcement is a change; a duplicate is not."""
        self.registry.accept(announce(self.alice, name="alice"), NOW)
        self.registry.accept(announce(self.alice, name="alice", sequence=2), NOW)
        self.assertEqual(self.seen, [(self.alice.peer_id, "announcement")] * 2)

    def test_state_rtt_removed(self):
        """A new liveness state, a round trip and a removal are changes; the same state again is not."""
        del self.seen[:]
        self.registry.heard_from(self.alice.peer_id, ("192.0.2.1", 7400), NOW)
        self.registry.heard_from(self.alice.peer_id, ("192.0.2.1", 7400), NOW + 1)
        self.registry.set_rtt(self.alice.peer_id, 0.02)
        self.registry.set_state(self.alice.peer_id, "suspect", NOW + 2)
        self.registry.remove(self.alice.peer_id)
        self.assertEqual([c for _, c in self.seen], ["state", "rtt", "state", "removed"])

    def test_no_bus_no_events(self):
        """Without an events bus the registry is the pure logic it was."""
        registry = PeerRegistry(NET, OWN.peer_id)
        registry.accept(announce(self.alice), NOW)
        registry.set_rtt(self.alice.peer_id, 0.01)
        self.assertEqual(len(registry), 1)
