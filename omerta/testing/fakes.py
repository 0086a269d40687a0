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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from omerta.crypto.identity import Identity
from omerta.crypto.proof import Prover
from omerta.mesh.context import Basics
from omerta.mesh.node import MeshConfig
from omerta.metrics import Metrics

NETWORK = bytes.fromhex("0123456789abcdef")
SELF_IDENTITY = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
SELF = SELF_IDENTITY.peer_id
BOOT = bytes(8)


def fixed_identity(seed: int) -> Identity:
    """A deterministic identity for a test peer (its peer id is C{.peer_id})."""
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


def fake_prover(identity: Identity, boot: bytes = BOOT) -> Prover:
    """The prover of a test peer in the fake network."""
    return Prover(identity, NETWORK, boot)


@dataclass
class Sent:
    address: object
    type: object
    fields: dict
    hops: int | None = None  # the IP TTL it was sent with, when held (L{Outbox.hold})


class Outbox(list):
    """
    What a component sent, in order (L{Sent} entries).  Like a node's
    C{hold_address}, L{hold} makes what is sent to an address carry a hop
    limit (0: not sent) until L{release}.
    """

    def __init__(self):
        super().__init__()
        self.held: dict = {}

    def hold(self, address, hops: int) -> None:
        self.held[address] = hops

    def release(self, address) -> None:
        self.held.pop(address, None)

    def record(self, address, msg_type, fields: dict) -> None:
        hops = self.held.get(address)
        if hops != 0:
            self.append(Sent(address, msg_type, fields, hops))

    def of(self, msg_type) -> list[Sent]:
        return [s for s in self if s.type == msg_type]

    def to(self, address) -> list[Sent]:
        return [s for s in self if s.address == address]


class EventLog(list):
    """Events a component emitted, as (kind, data)."""

    def of(self, kind: str) -> list[dict]:
        return [data for k, data in self if k == kind]


def proven_pong(identity: Identity, requester: bytes, nonce: int, boot: bytes = BOOT,
                observed: tuple = ("0.0.0.0", 0)):
    """
    The (frame, message) pair of C{identity}'s PONG, from its run C{boot},
    answering C{requester}'s ping C{nonce} with its identity proof, as
    L{omerta.mesh.liveness.Liveness.on_pong} receives it.
    """
    from types import SimpleNamespace

    from omerta.crypto import proof

    signed = fake_prover(identity, boot).prove(proof.PONG, requester, nonce.to_bytes(8, "big"))
    return (SimpleNamespace(sender=identity.peer_id, boot=boot),
            SimpleNamespace(nonce=nonce, echo_ms=0, observed=observed, contacts=[],
                            proof=signed))


def fake_basics(config: MeshConfig | None = None, clock: Clock | None = None,
                identity: Identity = SELF_IDENTITY) -> tuple[Basics, Outbox, EventLog]:
    outbox, events = Outbox(), EventLog()
    peer_id = identity.peer_id
    basics = Basics(
        network_id=NETWORK,
        peer_id=peer_id,
        config=config or MeshConfig(),
        clock=clock or Clock(),
        metrics=Metrics(),
        send=lambda address, msg_type, **fields: outbox.record(address, msg_type, fields),
        send_to=lambda peer_id, address, msg_type, **fields: outbox.record(
            address, msg_type, fields),
        emit=lambda kind, **data: events.append((kind, data)),
        prover=fake_prover(identity),
    )
    return basics, outbox, events
