"""
Events a node emits (peer connected, NAT changed, ...): subscribers are
called synchronously, and one failing subscriber neither stops the others nor
the node.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from twisted.logger import Logger


class Events:
    log = Logger()

    def __init__(self) -> None:
        self._subscribers: defaultdict[str, list[Callable]] = defaultdict(list)

    def subscribe(self, kind: str, callback: Callable[..., object]) -> Callable[[], None]:
        """
        Call C{callback(**data)} on every C{kind} event; returns a function
        that unsubscribes.
        """
        self._subscribers[kind].append(callback)
        return lambda: self._subscribers[kind].remove(callback)

    def emit(self, kind: str, **data) -> None:
        for callback in list(self._subscribers.get(kind, ())):
            try:
                callback(**data)
            except Exception:
                self.log.failure("Subscriber to {kind} events failed", kind=kind)
