"""
Fakes for building one mesh component alone in a unit test: L{Basics} on a
C{Clock} whose C{send} records what would have gone out.

    basics, sent = fake_basics()
    gossip = Gossip(basics, registry=..., ...)
    basics.clock.advance(1)
    assert sent.of(MessageType.PEER_LIST)
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.task import Clock

from omerta.mesh.context import Basics
from omerta.mesh.node import MeshConfig
from omerta.metrics import Metrics

NETWORK = bytes.fromhex("0123456789abcdef")
SELF = bytes(range(16))


@dataclass
class Sent:
    address: object
    type: object
    fields: dict


class Outbox(list):
    """What a component sent, in order (L{Sent} entries)."""

    def of(self, msg_type) -> list[Sent]:
        return [s for s in self if s.type == msg_type]

    def to(self, address) -> list[Sent]:
        return [s for s in self if s.address == address]


class EventLog(list):
    """Events a component emitted, as (kind, data)."""

    def of(self, kind: str) -> list[dict]:
        return [data for k, data in self if k == kind]


def fake_basics(config: MeshConfig | None = None, clock: Clock | None = None,
                peer_id: bytes = SELF) -> tuple[Basics, Outbox, EventLog]:
    outbox, events = Outbox(), EventLog()
    basics = Basics(
        network_id=NETWORK,
        peer_id=peer_id,
        config=config or MeshConfig(),
        clock=clock or Clock(),
        metrics=Metrics(),
        send=lambda address, msg_type, **fields: outbox.append(Sent(address, msg_type, fields)),
        emit=lambda kind, **data: events.append((kind, data)),
    )
    return basics, outbox, events
