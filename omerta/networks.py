"""
The networks a node belongs to, kept in C{<data dir>/networks.json}.

The file holds network keys, so it is written with mode 0600 and refused when
other users can read it.  Every change rewrites it atomically (see
L{omerta.storage}).  A file that cannot be read, is not JSON, has an unknown
C{version} or a wrong structure raises L{StateFileError} naming it; the store
then writes nothing, so the operator's file is never overwritten silently.

The file is re-read on every call, so a CLI command and a running daemon see
each other's changes; concurrent writers are not locked against each other
(the last writer wins).

Joining a network this node is already in:
 - with an invite made later than the one on record (a larger C{created_at}),
   the bootstrap peers, invite link, expiry and creator are replaced from the
   newer invite (the local name and join time are kept) and the result says
   C{updated};
 - otherwise it is an error that says the node is already a member, unless
   the caller passes C{exist_ok=True} (a daemon given the same C{--invite} on
   every start), which returns the membership unchanged.

Names are local labels and unique within one store: creating or joining a
network under a name already in use is refused (pass another name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from omerta import storage
from omerta.addressing import BootstrapSpec, parse_bootstrap, parse_endpoint
from omerta.crypto.identity import (
    Identity,
    IdentityError,
    format_peer_id,
    parse_peer_id,
    validate_name,
)
from omerta.crypto.invite import Invite, make_invite, parse_invite
from omerta.crypto.network import NetworkKey, NetworkKeyError
from omerta.storage import StateFileError

NETWORKS_FILE = "networks.json"
FORMAT_VERSION = 1
MIN_PREFIX = 4
_HEX = re.compile(r"[0-9a-f]+\Z")


class MembershipError(Exception):
    """
    A request about memberships that cannot be carried out (unknown or
    ambiguous network, already a member, leave refused); the message says
    what to do instead.
    """


@dataclass(frozen=True)
class Membership:
    """
    This node's membership of one network.  Its C{repr} never shows the key
    or the invite link (which carries the key).

    @ivar created_at: when the network's invite was made (unix seconds), or
        C{None} when the network was joined with a bare key.
    @ivar creator_peer_id: hex peer id of the invite's signer, or C{None}
        when joined with a bare key.
    @ivar invite: the invite link to share again, or C{None}.
    @ivar expires_at: when that invite expires, or C{None} for never.
    """

    network_id: str
    name: str
    key: NetworkKey = field(repr=False)
    bootstrap: tuple[BootstrapSpec, ...]
    created_at: int | None
    joined_at: int
    creator_peer_id: str | None
    created_by_me: bool
    invite: str | None = field(repr=False)
    expires_at: int | None

    def to_json(self) -> dict[str, Any]:
        """
        The record as stored in C{networks.json} (including the key).
        """
        return {
            "network_id": self.network_id,
            "name": self.name,
            "key": self.key.to_text(),
            "bootstrap": [str(spec) for spec in self.bootstrap],
            "created_at": self.created_at,
            "joined_at": self.joined_at,
            "creator_peer_id": self.creator_peer_id,
            "created_by_me": self.created_by_me,
            "invite": self.invite,
            "expires_at": self.expires_at,
        }


_Memberships = list[Membership]


@dataclass(frozen=True)
class JoinResult:
    """
    What L{NetworkStore.join} did: C{updated} is true when the node was
    already a member and a newer invite refreshed the record.
    """

    membership: Membership
    updated: bool


class NetworkStore:
    """
    The memberships in C{<data_dir>/networks.json}.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / NETWORKS_FILE

    # -- queries

    def list(self) -> _Memberships:
        """
        All memberships, in the order they were added.
        """
        return self._load()

    def get(self, ref: str) -> Membership:
        """
        The membership named by C{ref}: a full network id, a unique id prefix
        of at least 4 hex digits, or a name.

        @raise MembershipError: nothing or more than one network matches.
        """
        return self._find(self._load(), ref)

    def keys(self) -> dict[bytes, NetworkKey]:
        """
        Network id (8 bytes) to key, for every network this node is in.
        """
        return {m.key.network_id: m.key for m in self._load()}

    # -- changes

    def create(
        self,
        identity: Identity,
        name: str,
        endpoint: str | None = None,
        *,
        now: float,
        expires_at: float | None = None,
    ) -> Membership:
        """
        Make a new network with a fresh key and join it.

        @param endpoint: C{host:port} where this node can be reached; when
            given, the invite names this node as its bootstrap peer.
        @param expires_at: when the invite stops being accepted (unix
            seconds), or C{None} for never.
        """
        memberships = self._load()
        validate_name(name)
        self._check_name_free(memberships, name)
        bootstrap: list[BootstrapSpec] = []
        if endpoint is not None:
            bootstrap.append(
                BootstrapSpec(parse_endpoint(endpoint), peer_id=identity.peer_id_text)
            )
        key = NetworkKey.generate()
        created = int(now)
        link = make_invite(identity, key, name, bootstrap, created, expires_at)
        membership = Membership(
            network_id=key.network_id_text,
            name=name,
            key=key,
            bootstrap=tuple(bootstrap),
            created_at=created,
            joined_at=created,
            creator_peer_id=identity.peer_id_text,
            created_by_me=True,
            invite=link,
            expires_at=None if expires_at is None else int(expires_at),
        )
        self._save(memberships + [membership])
        return membership

    def join(
        self,
        text: str,
        now: float,
        name: str | None = None,
        *,
        exist_ok: bool = False,
    ) -> JoinResult:
        """
        Join a network from an invite link (or its bare base64url part), or
        from a bare network key (43 base64url characters or 64 hex digits),
        which needs C{name} and brings no bootstrap peers.

        @param name: a local name to use instead of the invite's.
        @param exist_ok: when already a member and there is nothing newer,
            return the membership as it is instead of failing.
        @raise MembershipError: already a member (see the module docstring),
            name in use, or a bare key without a name.
        """
        memberships = self._load()
        if name is not None:
            validate_name(name)
        text = text.strip()
        if "://" not in text and len(text) <= 64:
            return self._join_key(memberships, text, now, name, exist_ok)
        invite = parse_invite(text, now)
        return self._join_invite(memberships, invite, now, name, exist_ok)

    def leave(self, ref: str, force: bool = False) -> Membership:
        """
        Forget a network (and its key); return what was removed.

        @raise MembershipError: this node created the network and C{force}
            is false.
        """
        memberships = self._load()
        membership = self._find(memberships, ref)
        if membership.created_by_me and not force:
            raise MembershipError(
                f"network {membership.name} ({membership.network_id}) was created by"
                f" this node: leaving deletes the only copy of its key unless you"
                f" shared the invite; pass --force"
            )
        self._save([m for m in memberships if m.network_id != membership.network_id])
        return membership

    # -- helpers

    def _join_key(
        self,
        memberships: _Memberships,
        text: str,
        now: float,
        name: str | None,
        exist_ok: bool,
    ) -> JoinResult:
        try:
            key = NetworkKey.from_text(text)
        except NetworkKeyError as e:
            raise NetworkKeyError(
                f"{e}; or give an invite link (omerta://join/...)"
            ) from None
        existing = self._by_id(memberships, key.network_id_text)
        if existing is not None:
            if exist_ok:
                return JoinResult(existing, updated=False)
            raise MembershipError(
                f"this node is already in network {existing.name} ({existing.network_id})"
            )
        if name is None:
            raise MembershipError(
                "a bare network key carries no name: give this network a local"
                " name with --name NAME"
            )
        self._check_name_free(memberships, name)
        membership = Membership(
            network_id=key.network_id_text,
            name=name,
            key=key,
            bootstrap=(),
            created_at=None,
            joined_at=int(now),
            creator_peer_id=None,
            created_by_me=False,
            invite=None,
            expires_at=None,
        )
        self._save(memberships + [membership])
        return JoinResult(membership, updated=False)

    def _join_invite(
        self,
        memberships: _Memberships,
        invite: Invite,
        now: float,
        name: str | None,
        exist_ok: bool,
    ) -> JoinResult:
        existing = self._by_id(memberships, invite.network_id_text)
        if existing is not None:
            if existing.created_at is not None and invite.created_at <= existing.created_at:
                if exist_ok:
                    return JoinResult(existing, updated=False)
                raise MembershipError(
                    f"this node is already in network {existing.name}"
                    f" ({existing.network_id}) and this invite is not newer than"
                    f" the one on record; nothing changed"
                )
            updated = replace(
                existing,
                bootstrap=invite.bootstrap,
                created_at=invite.created_at,
                creator_peer_id=invite.creator_peer_id_text,
                invite=invite.link,
                expires_at=invite.expires_at,
            )
            self._save(
                [updated if m.network_id == existing.network_id else m for m in memberships]
            )
            return JoinResult(updated, updated=True)
        local_name = invite.name if name is None else name
        self._check_name_free(memberships, local_name, suggest_name=name is None)
        membership = Membership(
            network_id=invite.network_id_text,
            name=local_name,
            key=invite.network_key,
            bootstrap=invite.bootstrap,
            created_at=invite.created_at,
            joined_at=int(now),
            creator_peer_id=invite.creator_peer_id_text,
            created_by_me=False,
            invite=invite.link,
            expires_at=invite.expires_at,
        )
        self._save(memberships + [membership])
        return JoinResult(membership, updated=False)

    @staticmethod
    def _by_id(memberships: _Memberships, network_id: str) -> Membership | None:
        for membership in memberships:
            if membership.network_id == network_id:
                return membership
        return None

    @staticmethod
    def _check_name_free(
        memberships: _Memberships, name: str, suggest_name: bool = True
    ) -> None:
        for membership in memberships:
            if membership.name == name:
                hint = "; choose another name" + (" with --name" if suggest_name else "")
                raise MembershipError(
                    f"this node is already in a network named {name!r}"
                    f" ({membership.network_id}){hint}"
                )

    @staticmethod
    def _find(memberships: _Memberships, ref: str) -> Membership:
        ref = ref.strip()
        lowered = ref.lower()
        for membership in memberships:
            if membership.network_id == lowered:
                return membership
        candidates = [m for m in memberships if m.name == ref]
        if len(lowered) >= MIN_PREFIX and _HEX.match(lowered):
            candidates += [
                m
                for m in memberships
                if m.network_id.startswith(lowered) and m.name != ref
            ]
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            listing = ", ".join(f"{m.network_id} ({m.name})" for m in candidates)
            raise MembershipError(
                f"{ref!r} matches {len(candidates)} networks: {listing};"
                f" give more of the id"
            )
        hint = ""
        if _HEX.match(lowered) and len(lowered) < MIN_PREFIX:
            hint = f" (an id prefix needs at least {MIN_PREFIX} hex digits)"
        raise MembershipError(
            f"no network matches {ref!r}{hint}; 'omerta network list' shows the"
            f" networks this node is in"
        )

    # -- the file

    def _load(self) -> _Memberships:
        if self.path.exists():
            storage.check_private(self.path)
        document = storage.read_json(self.path, default=lambda: None)
        if document is None:
            return []
        return _decode(self.path, document)

    def _save(self, memberships: _Memberships) -> None:
        storage.ensure_private_dir(self.data_dir)
        storage.write_json(
            self.path,
            {"version": FORMAT_VERSION, "networks": [m.to_json() for m in memberships]},
        )


def _decode(path: Path, document: Any) -> list[Membership]:
    """
    Check and convert the whole document; any problem is a StateFileError.
    """

    def bad(what: str) -> StateFileError:
        return StateFileError(
            f"{path} is not a valid networks file ({what}); it was left untouched:"
            f" fix it, restore it from a backup, or move it aside to start afresh"
        )

    if not isinstance(document, dict):
        raise bad("the top level is not an object")
    version = document.get("version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool):
            raise StateFileError(
                f"{path} has format version {version}, which this omerta does not"
                f" read (it reads version {FORMAT_VERSION}); it was probably written"
                f" by a newer omerta: upgrade, or move the file aside; it was left"
                f" untouched"
            )
        raise bad("no integer 'version'")
    entries = document.get("networks")
    if not isinstance(entries, list):
        raise bad("'networks' is not a list")
    memberships: list[Membership] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        try:
            membership = _decode_entry(entry)
        except (KeyError, TypeError, ValueError, IdentityError) as e:
            raise bad(f"network #{index + 1}: {_describe(e)}") from None
        if membership.network_id in seen:
            raise bad(f"network {membership.network_id} appears twice")
        seen.add(membership.network_id)
        memberships.append(membership)
    return memberships


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing field {error.args[0]!r}"
    return str(error)


def _typed(
    entry: Mapping[str, Any], name: str, kind: type, optional: bool = False
) -> Any:
    value = entry[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise TypeError(f"field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise TypeError(f"field {name!r} has the wrong type")
    return value


def _decode_entry(entry: Any) -> Membership:
    if not isinstance(entry, dict):
        raise TypeError("not an object")
    key = NetworkKey.from_text(_typed(entry, "key", str))
    network_id = _typed(entry, "network_id", str)
    if network_id != key.network_id_text:
        raise ValueError(f"network id {network_id!r} does not match its key")
    bootstrap = _typed(entry, "bootstrap", list)
    creator = _typed(entry, "creator_peer_id", str, optional=True)
    if creator is not None:
        creator = format_peer_id(parse_peer_id(creator))
    name = _typed(entry, "name", str)
    validate_name(name)
    return Membership(
        network_id=network_id,
        name=name,
        key=key,
        bootstrap=tuple(parse_bootstrap(_text(spec)) for spec in bootstrap),
        created_at=_typed(entry, "created_at", int, optional=True),
        joined_at=_typed(entry, "joined_at", int),
        creator_peer_id=creator,
        created_by_me=_typed(entry, "created_by_me", bool),
        invite=_typed(entry, "invite", str, optional=True),
        expires_at=_typed(entry, "expires_at", int, optional=True),
    )


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a bootstrap peer is not a string")
    return value
