"""
Invite links: C{omerta://join/<base64url>}.

An invite carries a network's key, its name, the peers to bootstrap from and
when it was made; it is signed by the node that made it and may expire.  The
payload layout is in L{omerta.wire.invite}; this module signs, verifies and
interprets it.

Nothing here reads a clock: callers pass C{now}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

from omerta.addressing import AddressError, BootstrapSpec, parse_bootstrap
from omerta.crypto.identity import (
    Identity,
    IdentityError,
    format_peer_id,
    peer_id_for,
    validate_name,
    verify_signature,
)
from omerta.crypto.network import NetworkKey, b64url_decode, b64url_encode
from omerta.wire import ParseError
from omerta.wire.invite import (
    MAX_BOOTSTRAP,
    build_invite_body,
    build_invite_payload,
    parse_invite_payload,
)

INVITE_PREFIX = "omerta://join/"
_ASK_AGAIN = "ask the network's creator for a new one"


class InviteError(ValueError):
    """
    An invite that cannot be used, or cannot be made; the message says what
    a person can do about it.
    """


@dataclass(frozen=True)
class Invite:
    """
    A verified invite.  Its C{repr} shows the network id, never the key.

    @ivar expires_at: unix seconds, or C{None} when the invite never expires.
    @ivar link: the canonical C{omerta://join/...} text (it holds the key).
    """

    network_key: NetworkKey
    name: str
    bootstrap: tuple[BootstrapSpec, ...]
    created_at: int
    expires_at: int | None
    creator_public_key: bytes
    link: str = field(compare=False)

    @property
    def network_id_text(self) -> str:
        return self.network_key.network_id_text

    @property
    def creator_peer_id_text(self) -> str:
        return format_peer_id(peer_id_for(self.creator_public_key))

    def __repr__(self) -> str:
        return (
            f"<Invite network {self.network_id_text} {self.name!r}"
            f" by {self.creator_peer_id_text}, {len(self.bootstrap)} bootstrap peers>"
        )

    __str__ = __repr__


def format_time(seconds: float) -> str:
    """
    Unix seconds as C{YYYY-MM-DD HH:MM:SS UTC} (or the raw number when it is
    out of the calendar's range).
    """
    try:
        moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (unix time)"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def make_invite(
    identity: Identity,
    key: NetworkKey,
    name: str,
    bootstrap: Iterable[BootstrapSpec | str],
    created_at: float,
    expires_at: float | None = None,
) -> str:
    """
    Sign an invite to the network C{key} and return its link.

    @param bootstrap: peers as L{BootstrapSpec} or C{ID_OR_NAME@host:port}.
    @param expires_at: unix seconds after which the invite is refused, or
        C{None} for never.
    @raise InviteError: the name, a bootstrap peer or the expiry is unusable.
    """
    try:
        validate_name(name)
        specs = [
            spec if isinstance(spec, BootstrapSpec) else parse_bootstrap(spec)
            for spec in bootstrap
        ]
    except (IdentityError, AddressError) as e:
        raise InviteError(str(e)) from None
    if len(specs) > MAX_BOOTSTRAP:
        raise InviteError(
            f"an invite carries at most {MAX_BOOTSTRAP} bootstrap peers, not {len(specs)}"
        )
    created = int(created_at)
    expires = 0 if expires_at is None else int(expires_at)
    if expires_at is not None and expires <= created:
        raise InviteError("an invite must expire after it was created")
    texts = [str(spec) for spec in specs]
    try:
        body = build_invite_body(
            key.secret, name, texts, created, expires, identity.public_key
        )
        payload = build_invite_payload(
            key.secret, name, texts, created, expires, identity.public_key,
            identity.sign(body),
        )
    except ValueError as e:
        raise InviteError(f"cannot make this invite: {e}") from None
    return INVITE_PREFIX + b64url_encode(payload)


def _payload_text(text: str) -> str:
    """
    The base64url part of a link, or C{text} itself when it is already bare.
    """
    text = text.strip()
    if text.startswith(INVITE_PREFIX):
        return text[len(INVITE_PREFIX) :]
    if "://" in text or "/" in text or not text:
        raise InviteError(
            "not an omerta invite link: expected omerta://join/... (or the"
            " base64url text after 'join/')"
        )
    return text


def parse_invite(text: str, now: float) -> Invite:
    """
    Decode, verify and check the expiry of an invite link (or of its bare
    base64url part).

    @param now: the current unix time.
    @raise InviteError: with what is wrong and what to do about it.
    """
    encoded = _payload_text(text)
    try:
        raw = b64url_decode(encoded)
    except ValueError:
        raise InviteError(
            "not an omerta invite link: expected omerta://join/ followed by"
            " base64url text; check that the whole link was copied"
        ) from None
    try:
        payload = parse_invite_payload(raw)
    except ParseError as e:
        raise InviteError(
            f"this invite is damaged or incomplete ({e}); check that the whole"
            f" link was copied, or {_ASK_AGAIN}"
        ) from None
    if not verify_signature(
        payload.creator_public_key, payload.signature, payload.signed_data
    ):
        raise InviteError(
            f"this invite was altered or damaged (bad signature); {_ASK_AGAIN}"
        )
    if payload.expires_at and now >= payload.expires_at:
        raise InviteError(
            f"this invite expired on {format_time(payload.expires_at)}; {_ASK_AGAIN}"
        )
    try:
        name = validate_name(payload.name)
        bootstrap = tuple(parse_bootstrap(spec) for spec in payload.bootstrap)
    except (IdentityError, AddressError) as e:
        raise InviteError(f"this invite carries unusable data ({e}); {_ASK_AGAIN}") from None
    return Invite(
        network_key=NetworkKey(payload.network_key),
        name=name,
        bootstrap=bootstrap,
        created_at=payload.created_at,
        expires_at=payload.expires_at or None,
        creator_public_key=payload.creator_public_key,
        link=INVITE_PREFIX + b64url_encode(raw),
    )
