"""
L{Basics}: what every component of one network's overlay uses, handed to
each explicitly (the wiring is in L{omerta.mesh.overlay.Overlay}).  The
components' collaborators beyond these (the registry, another component's
method) are constructor arguments of their own, so each component can be
built alone, on a C{Clock} with fakes (L{omerta.testing.fakes}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # node.py builds the overlays that use this
    from omerta.crypto.proof import Prover
    from omerta.mesh.node import MeshConfig
    from omerta.metrics import Metrics


@dataclass(frozen=True)
class Basics:
    """
    @ivar network_id: the network (8 bytes).
    @ivar peer_id: this node's peer id.
    @ivar config: the mesh's settings.
    @ivar clock: an C{IReactorTime} (C{seconds}, C{callLater}).
    @ivar metrics: the node's one metrics object.
    @ivar send: C{send(address, msg_type, **fields)} seals a message of this
        network and sends it to an address or relay route (addressed to the
        peer proven at that address, if any); it returns when the datagram
        was handed to the socket (None if it was not).
    @ivar send_to: C{send_to(peer_id, address, msg_type, **fields)}, the same
        for a message meant for C{peer_id}: addressed to it only if the
        address is proven to be its own, unaddressed otherwise.
    @ivar emit: C{emit(kind, **data)} emits a node event for this network.
    @ivar prover: makes this node's identity proofs and checks its peers'
        (L{omerta.crypto.proof}).
    """

    network_id: bytes
    peer_id: bytes
    config: "MeshConfig"
    clock: Any
    metrics: "Metrics"
    send: Callable[..., float | None]
    send_to: Callable[..., float | None]
    emit: Callable[..., None]
    prover: "Prover"
