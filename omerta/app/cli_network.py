"""
C{omerta network ...}: create, join, list, show and leave networks.

The raw network key is printed only by C{show --show-key}.  The invite link
(which also carries the key, since that is how it lets a node in) is printed
by C{create} and C{show}, never by C{list} or C{join}.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from omerta.app.cli import Invocation
from omerta.app.documents import networks_document
from omerta.crypto.identity import load_or_create_identity
from omerta.crypto.invite import format_time
from omerta.networks import Membership, NetworkStore

_DURATION = re.compile(r"(\d+)([smhdw]?)\Z")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """
    C{7d}, C{12h}, C{30m}, C{3600s}, C{2w} or plain seconds, as seconds.

    @raise argparse.ArgumentTypeError: not such a duration, or zero.
    """
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use a number followed by s, m, h, d"
            f" or w, for example 7d or 12h"
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a duration must be longer than 0 seconds")
    return seconds


def register(subparsers: Any) -> None:
    """
    Add C{network} and its commands.
    """
    network = subparsers.add_parser(
        "network",
        help="create, join, list, show and leave networks",
        description="Manage the networks this node belongs to.",
    )
    commands = network.add_subparsers(
        dest="network_command", metavar="COMMAND", required=True
    )

    create = commands.add_parser(
        "create",
        help="make a new network and print its invite link",
        description="Make a network with a fresh key; print its id and an"
        " invite link signed by this node.",
    )
    create.add_argument("--name", required=True, help="the network's name")
    create.add_argument(
        "--endpoint",
        metavar="HOST:PORT",
        help="where other nodes can reach this node; the invite names it as"
        " the bootstrap peer",
    )
    create.add_argument(
        "--expires",
        metavar="DURATION",
        type=parse_duration,
        help="how long the invite is accepted, e.g. 7d, 12h, 3600s"
        " (default: it never expires)",
    )
    create.set_defaults(func=create_network)

    join = commands.add_parser(
        "join",
        help="join a network from an invite link or a network key",
        description="Join a network from an invite link (omerta://join/...)"
        " or a bare network key (then --name is required).  Joining again"
        " with a newer invite refreshes the bootstrap peers.",
    )
    join.add_argument(
        "--key", required=True, metavar="KEY", help="invite link or network key"
    )
    join.add_argument("--name", help="local name for the network")
    join.set_defaults(func=join_network)

    listing = commands.add_parser("list", help="list the networks this node is in")
    listing.set_defaults(func=list_networks)

    show = commands.add_parser(
        "show",
        help="show one network, with its invite link",
        description="Show everything about one network.  REF is a network id,"
        " a unique prefix of one (4+ hex digits), or a name.",
    )
    show.add_argument("--id", required=True, metavar="REF", dest="ref")
    show.add_argument(
        "--show-key", action="store_true", help="also print the raw network key"
    )
    show.set_defaults(func=show_network)

    leave = commands.add_parser(
        "leave",
        help="leave a network and forget its key",
        description="Leave a network and delete its key from this node.",
    )
    leave.add_argument("--id", required=True, metavar="REF", dest="ref")
    leave.add_argument(
        "--force",
        action="store_true",
        help="leave even a network this node created (its key may be lost)",
    )
    leave.set_defaults(func=leave_network)


def _document(
    membership: Membership, *, invite: bool = False, key: bool = False
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "network_id": membership.network_id,
        "name": membership.name,
        "created_by_me": membership.created_by_me,
        "creator_peer_id": membership.creator_peer_id,
        "bootstrap": [str(spec) for spec in membership.bootstrap],
        "created_at": membership.created_at,
        "joined_at": membership.joined_at,
        "expires_at": membership.expires_at,
    }
    if invite:
        document["invite"] = membership.invite
    if key:
        document["key"] = membership.key.to_text()
    return document


def _when(seconds: int | None, missing: str) -> str:
    return missing if seconds is None else format_time(seconds)


def create_network(inv: Invocation) -> None:
    args = inv.args
    identity = load_or_create_identity(inv.data_dir)
    now = inv.now()
    expires_at = None if args.expires is None else now + args.expires
    membership = NetworkStore(inv.data_dir).create(
        identity, args.name, args.endpoint, now=now, expires_at=expires_at
    )
    lines = [
        f"created network {membership.name} ({membership.network_id})",
        f"invite: {membership.invite}",
        "",
        "The invite carries the network key: share it only with the nodes you"
        " want in the network.",
    ]
    if membership.expires_at is not None:
        lines.append(f"It is accepted until {format_time(membership.expires_at)}.")
    if not membership.bootstrap:
        lines.append(
            "It names no bootstrap peer; pass --endpoint HOST:PORT so joining"
            " nodes can find this one."
        )
    inv.emit("\n".join(lines), _document(membership, invite=True))


def join_network(inv: Invocation) -> None:
    args = inv.args
    result = NetworkStore(inv.data_dir).join(args.key, inv.now(), name=args.name)
    membership = result.membership
    if result.updated:
        text = (
            f"updated network {membership.name} ({membership.network_id}) from a"
            f" newer invite: {len(membership.bootstrap)} bootstrap peer(s)"
        )
    else:
        text = (
            f"joined network {membership.name} ({membership.network_id}) with"
            f" {len(membership.bootstrap)} bootstrap peer(s)"
        )
        if not membership.bootstrap:
            text += (
                "\nNo bootstrap peer is known: this node finds the network only"
                " through peers it is told about."
            )
    document = _document(membership)
    document["action"] = "updated" if result.updated else "joined"
    inv.emit(text, document)


def list_networks(inv: Invocation) -> None:
    memberships = NetworkStore(inv.data_dir).list()
    document = networks_document(memberships)
    if not memberships:
        text = (
            "This node is in no network; make one with 'omerta network create"
            " --name NAME' or join one with 'omerta network join --key INVITE'."
        )
    else:
        rows = [("ID", "NAME", "CREATED-BY-ME", "BOOTSTRAP")] + [
            (
                m.network_id,
                m.name,
                "yes" if m.created_by_me else "no",
                str(len(m.bootstrap)),
            )
            for m in memberships
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        text = "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows
        )
    inv.emit(text, document)


def show_network(inv: Invocation) -> None:
    args = inv.args
    m = NetworkStore(inv.data_dir).get(args.ref)
    bootstrap = [str(spec) for spec in m.bootstrap] or ["(none)"]
    fields = [
        ("id", m.network_id),
        ("name", m.name),
        ("created by me", "yes" if m.created_by_me else "no"),
        ("creator", m.creator_peer_id or "(unknown: joined with a bare key)"),
        ("created at", _when(m.created_at, "(unknown)")),
        ("joined at", format_time(m.joined_at)),
        ("invite expires", _when(m.expires_at, "never")),
    ]
    fields += [("bootstrap" if i == 0 else "", spec) for i, spec in enumerate(bootstrap)]
    fields.append(("invite", m.invite or "(none: joined with a bare key)"))
    if args.show_key:
        fields.append(("key", m.key.to_text()))
    width = max(len(label) for label, _ in fields) + 1
    text = "\n".join(
        f"{(label + ':') if label else '':<{width}} {value}" for label, value in fields
    )
    inv.emit(text, _document(m, invite=True, key=args.show_key))


def leave_network(inv: Invocation) -> None:
    args = inv.args
    m = NetworkStore(inv.data_dir).leave(args.ref, force=args.force)
    inv.emit(
        f"left network {m.name} ({m.network_id}); its key is deleted from this node",
        {"action": "left", "network_id": m.network_id, "name": m.name},
    )
