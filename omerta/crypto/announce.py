"""
Signed announcements: who a peer is, how to reach it and what it offers.

The signature covers a domain label, the network id and the exact record
bytes, so a record signed for one network cannot be replayed into another.
"""

from __future__ import annotations

from omerta.crypto.identity import Identity, peer_id_for, verify_signature
from omerta.wire import ParseError
from omerta.wire.messages import build_record, parse_record

_LABEL = b"omerta announce v1\x00"


class AnnouncementError(Exception):
    """
    An announcement that fails validation; C{reason} is a drop-counter label.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def sign_announcement(identity: Identity, network_id: bytes, record: dict) -> dict:
    """
    Build and sign a record; returns the C{SignedAnnouncement} value.
    """
    raw = build_record(dict(record, public_key=identity.public_key))
    return {"record": raw, "signature": identity.sign(_LABEL + network_id + raw)}


def open_announcement(network_id: bytes, signed, sender: bytes | None = None):
    """
    Verify a C{SignedAnnouncement} and return its parsed record with an extra
    C{peer_id} field.

    @param sender: when given, the announcement must be the sender's own.
    @raise AnnouncementError: reasons malformed_announcement, bad_signature,
        sender_mismatch.
    """
    try:
        record = parse_record(signed.record)
    except ParseError as e:
        raise AnnouncementError("malformed_announcement", str(e)) from None
    if not verify_signature(record.public_key, signed.signature, _LABEL + network_id + signed.record):
        raise AnnouncementError("bad_signature")
    record.peer_id = peer_id_for(record.public_key)
    if sender is not None and record.peer_id != sender:
        raise AnnouncementError("sender_mismatch")
    return record
