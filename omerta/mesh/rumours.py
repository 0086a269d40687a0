"""
One round of rumour mongering, shared by announcements (L{omerta.mesh.gossip})
and membership notices (L{omerta.mesh.membership}).

A rumour has transmissions C{left} and the set of active peers C{told} that
are known to hold it (they sent it to us, or we sent it to them; at most
L{TOLD_MAX}).  A round visits the active peers in random order and gives
each, in one datagram of at most C{budget} bytes, the pending rumours it is
not known to hold (most transmissions left first), until C{fanout} peers
were sent something.  A rumour with no transmission left, or that every
active peer holds, is done.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

TOLD_MAX = 64
"""Peers remembered per rumour as holding it (beyond it, its senders are not)."""


class Rumour(Protocol):
    left: int
    told: set


def holds(rumour: Rumour | None, peer_id: bytes | None) -> None:
    """C{peer_id} is known to hold C{rumour}: it is not sent it."""
    if rumour is not None and peer_id is not None and len(rumour.told) < TOLD_MAX:
        rumour.told.add(peer_id)


def spread(rumours: dict, targets: list[tuple[bytes, Any]], *, fanout: int, budget: int,
           size: Callable[[Any], int], send: Callable[[Any, list], None],
           skip: Callable[[Any, Any, bytes], bool], holder: Callable[[Any], Iterable]
           ) -> None:
    """
    One round over C{rumours} (key -> rumour, changed in place): C{targets}
    are the active peers, (peer id, address), in random order.

    @param size: a rumour's bytes in a datagram.
    @param send: C{send(address, batch)}.
    @param skip: C{skip(key, rumour, peer_id)}: never send it to that peer.
    @param holder: the peers a rumour's key says hold it already (its origin).
    """
    if not targets:
        return
    pending = sorted(rumours.items(), key=lambda kv: -kv[1].left)
    sent = 0
    for peer_id, address in targets:
        batch, used = [], 0
        for key, rumour in pending:
            if rumour.left <= 0 or peer_id in rumour.told or skip(key, rumour, peer_id):
                continue
            if used + size(rumour) > budget:
                break
            batch.append(rumour)
            used += size(rumour)
        if batch:
            send(address, batch)
            for rumour in batch:
                rumour.left -= 1
                rumour.told.add(peer_id)
            sent += 1
            if sent >= fanout:
                break
    everyone = {peer_id for peer_id, _ in targets}
    for key in [k for k, r in rumours.items()
                if r.left <= 0 or everyone <= r.told.union(holder(k))]:
        del rumours[key]
