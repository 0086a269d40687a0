"""
Identity proofs: who answered a challenge.

The network key only proves membership, so any member can seal a frame under
another member's sender id.  What changes a node's belief about peer X (that
an address leads to X, which run of X is current) therefore rests on a
signature by X's identity key over a challenge this node chose:

- a PONG that answers a PING asking for it (the PING's nonce);
- a PUNCH_ACK that answers a hole-punch probe (the attempt id and sequence).

A proof is 96 bytes: X's Ed25519 public key (X's peer id is its hash, so the
key needs no lookup) and the signature over::

    label || network id || X's peer id || X's boot id || requester's peer id
          || challenge

The boot id binds the proof to the run that answered (the one in the
frame's clear header); the requester's id and its fresh random challenge
make it useless to anyone else and at any other time, so a captured proof
cannot be replayed to another node, to the same node later, or after a
restart.

Signing costs about 40 us and checking about 120 us, so a node asks for a
proof only when it has something to learn (an address or a run not proven
yet), not on every keepalive.
"""

from __future__ import annotations

from omerta.crypto.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    peer_id_for,
    verify_signature,
)

PROOF_SIZE = PUBLIC_KEY_SIZE + SIGNATURE_SIZE

PONG = b"omerta pong proof v1\x00"
PUNCH_ACK = b"omerta punch ack proof v1\x00"


def _signed(label: bytes, network_id: bytes, sender: bytes, boot: bytes,
            requester: bytes, challenge: bytes) -> bytes:
    return b"".join((label, network_id, sender, boot, requester, challenge))


class Prover:
    """
    Makes this node's proofs and checks its peers', in one network during
    one run (C{boot} is the boot id of this run's frames).
    """

    __slots__ = ("identity", "network_id", "boot", "peer_id", "_public_key")

    def __init__(self, identity: Identity, network_id: bytes, boot: bytes):
        self.identity = identity
        self.network_id = network_id
        self.boot = boot
        self.peer_id = identity.peer_id
        self._public_key = identity.public_key

    def prove(self, label: bytes, requester: bytes, challenge: bytes) -> bytes:
        """
        The proof that this node, in this run, answered C{requester}'s
        C{challenge}.
        """
        return self._public_key + self.identity.sign(
            _signed(label, self.network_id, self.peer_id, self.boot, requester, challenge))

    def check(self, label: bytes, proof: bytes, sender: bytes, boot: bytes,
              challenge: bytes) -> bool:
        """
        Whether C{proof} shows that C{sender}, in its run C{boot}, answered
        this node's C{challenge}.  Anything malformed is simply not a proof.
        """
        if len(proof) != PROOF_SIZE:
            return False
        public_key, signature = proof[:PUBLIC_KEY_SIZE], proof[PUBLIC_KEY_SIZE:]
        if peer_id_for(public_key) != sender:
            return False
        return verify_signature(public_key, signature, _signed(
            label, self.network_id, sender, boot, self.peer_id, challenge))
