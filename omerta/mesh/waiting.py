"""
Waiting for a condition on a node without polling: a Deferred that fires
when a predicate becomes true, re-checked when the node emits an event that
may have made it true, with a deadline from C{clock.callLater}.

    d = wait_for(clock, lambda: len(registry.online()) >= 3, timeout=10,
                 events=events, kinds=("peer_changed",))
    ready = await d      # True, or False at the deadline

Events are emitted in the middle of the update they announce (see
L{omerta.mesh.events}), so the predicate is re-checked on the next reactor
turn after them (several events in one turn cost one check).  Whatever
happens (fired, deadline, cancelled, the predicate raised), every
subscription and timer is gone afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred

MIN_FALLBACK = 0.5
"""
The shortest fallback re-check interval: a fallback is for conditions no
event announces, not a polling loop.
"""


class _Wait:
    def __init__(self, clock, predicate: Callable[[], Any], timeout: float, events,
                 kinds: Iterable[str], fallback: float | None, expired: Callable[[], Any]):
        if fallback is not None and fallback < MIN_FALLBACK:
            raise ValueError(f"a fallback re-check every {fallback} s is polling;"
                             f" use at least {MIN_FALLBACK} s")
        self.clock = clock
        self.predicate = predicate
        self.expired = expired
        self.fallback = fallback
        self.deferred = Deferred(self._cancel)
        self._check_call = None
        self._fallback_call = None
        self._unsubscribe = [events.subscribe(kind, self._event) for kind in kinds]
        self._deadline = clock.callLater(max(0.0, timeout), self._expire)
        self._arm_fallback()

    def _event(self, **_data) -> None:
        if self._check_call is None and not self.deferred.called:
            self._check_call = self.clock.callLater(0, self._check)

    def _arm_fallback(self) -> None:
        # The fallback for conditions no event covers: one re-check every
        # `fallback` seconds (at least MIN_FALLBACK), re-armed after each.
        if self.fallback is not None and not self.deferred.called:
            self._fallback_call = self.clock.callLater(self.fallback, self._fallback_check)

    def _fallback_check(self) -> None:
        self._fallback_call = None
        self._check()
        self._arm_fallback()

    def check_now(self) -> None:
        self._check()

    def _check(self) -> None:
        self._check_call = None
        if self.deferred.called:
            return
        try:
            value = self.predicate()
        except Exception as e:
            self._finish()
            self.deferred.errback(e)
            return
        if value:
            self._finish()
            self.deferred.callback(value)

    def _expire(self) -> None:
        self._deadline = None
        if self.deferred.called:
            return
        try:
            value = self.predicate() or self.expired()
        except Exception as e:
            self._finish()
            self.deferred.errback(e)
            return
        self._finish()
        self.deferred.callback(value)

    def _cancel(self, _deferred) -> None:
        self._finish()  # the Deferred then fails with CancelledError

    def _finish(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        for call in (self._check_call, self._fallback_call, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._check_call = self._fallback_call = self._deadline = None


def wait_for(clock, predicate: Callable[[], Any], timeout: float, *, events,
             kinds: Iterable[str], fallback: float | None = None,
             expired: Callable[[], Any] = lambda: False) -> Deferred:
    """
    A Deferred that fires with the first true value of C{predicate()}:
    checked now, then on the reactor turn after each event of C{kinds} on
    C{events} (and every C{fallback} seconds when given, for conditions no
    event announces).  At the deadline (C{timeout} seconds) it fires with
    C{predicate() or expired()}.  If the predicate raises, the Deferred fails
    with that exception.  Cancelling it stops the wait.

    @param clock: an C{IReactorTime} provider (the reactor, a
        L{twisted.internet.task.Clock}, the simulator's clock).
    @param events: an L{omerta.mesh.events.Events} bus.
    """
    wait = _Wait(clock, predicate, timeout, events, kinds, fallback, expired)
    wait.check_now()
    return wait.deferred


def next_event(clock, kind: str, timeout: float, *, events,
               match: Callable[..., bool] = lambda **data: True) -> Deferred:
    """
    A Deferred that fires with the keyword arguments (a dict) of the next
    C{kind} event for which C{match(**data)} is true, on the reactor turn
    after it; with None after C{timeout} seconds.
    """
    seen: list[dict] = []

    def heard(**data) -> None:
        if not seen and match(**data):
            seen.append(data)

    unsubscribe = events.subscribe(kind, heard)
    d = wait_for(clock, lambda: seen[0] if seen else None, timeout, events=events,
                 kinds=(kind,), expired=lambda: None)

    def done(result):
        unsubscribe()
        return result

    return d.addBoth(done)

