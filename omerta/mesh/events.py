"""
Events a node emits (peer connected, NAT changed, ...): subscribers are
called synchronously, and one failing subscriber neither stops the others nor
the node.

Subscribers run in the middle of the update that emitted the event (the
state may be half changed: C{path_changed} comes before the link moves), so
a subscriber that wants to look at the node's state should do so on the next
reactor turn (L{omerta.mesh.waiting.wait_for} does).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from twisted.logger import Logger

KINDS = {
    "peer_discovered": "a new peer's announcement was accepted (gossip); network, peer_id",
    "peer_changed": "a peer's record changed (registry): a new announcement, its liveness"
                    " state, its round-trip time (a pong), or it was dropped;"
                    " network, peer_id, change (announcement|state|rtt|removed)",
    "peer_connected": "the first frame of a peer on a new liveness link; network, peer_id,"
                      " address",
    "peer_suspected": "a peer of the active set missed its keepalives; network, peer_id",
    "peer_disconnected": "a suspected peer of the active set did not answer indirect probes"
                         " either: its link is dropped (the peer is not declared gone for"
                         " that alone: see member_suspected); network, peer_id",
    "member_suspected": "this node began to suspect a member (its own evidence or a"
                        " rumour); it is declared gone unless it refutes; network, peer_id",
    "peer_gone": "a member is known gone: declared dead after an unrefuted suspicion, or"
                 " it left; network, peer_id, reason (failed|left)",
    "path_changed": "a peer's path moved to another address or relay session;"
                    " network, peer_id, old, new, path_kind (direct|punched|relayed)",
    "bootstrap_reached": "a bootstrap peer answered for the first time; spec, peer_id",
    "relay_session": "a relay session request ended: opened, denied or timed out;"
                     " network, peer_id, relay_id, outcome",
    "nat_changed": "NAT discovery found another NAT type or mapped address; report, previous",
    "vm_state": "a VM held through this node changed state (requested, refreshed, released);"
                " network, vm_id, state, previous, provider",
}
"""
Every kind a node emits, with what it means and its keyword arguments.
"""


class Events:
    log = Logger()

    def __init__(self) -> None:
        self._subscribers: defaultdict[str, list[Callable]] = defaultdict(list)

    def subscribe(self, kind: str, callback: Callable[..., object]) -> Callable[[], None]:
        """
        Call C{callback(**data)} on every C{kind} event; returns a function
        that unsubscribes (calling it again does nothing).
        """
        self._subscribers[kind].append(callback)

        def unsubscribe() -> None:
            subscribers = self._subscribers.get(kind, [])
            if callback in subscribers:
                subscribers.remove(callback)

        return unsubscribe

    def subscribers(self, kind: str) -> int:
        """
        How many callbacks are subscribed to C{kind} (for tests).
        """
        return len(self._subscribers.get(kind, ()))

    def emit(self, kind: str, **data) -> None:
        for callback in list(self._subscribers.get(kind, ())):
            try:
                callback(**data)
            except Exception:
                self.log.failure("Subscriber to {kind} events failed", kind=kind)
