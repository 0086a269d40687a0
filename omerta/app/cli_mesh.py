"""
C{omerta mesh ...}: look at a network's mesh from a short-lived node.

    omerta mesh status  [--invite LINK | --network REF] [--bootstrap ID_OR_NAME@HOST:PORT]...
    omerta mesh peers   [...]
    omerta mesh ping PEER [--count N] [--interval SECONDS] [...]
    omerta mesh connect PEER [...]

Each command joins the mesh for as long as it runs, as a node of its own:
its identity, its copy of the network and the peers it learnt last time
live in C{<data-dir>/cli/} (created on first use), so it never shares a peer
id with a daemon running on C{<data-dir>} and can bootstrap from that very
daemon.  The node has no name and no capabilities, binds an ephemeral UDP
port (C{--port} to choose one), holds no relay reservations, announces
itself for 10 minutes only, and runs NAT discovery only for C{ping} and
C{connect} (hole punching needs it).  When it leaves it ends its relay
sessions.

The network is C{--invite LINK}, else the membership of C{<data-dir>} that
C{--network REF} names (id, id prefix or name; default: the first one), else
the network the last C{mesh} command used.  The C{cli} directory keeps only
that one network, so the node never announces itself in networks nobody
asked about.  Bootstrap peers are the network's own plus every
C{--bootstrap}.

Nothing waits a fixed time, and nothing polls: a command waits (on the
node's events, for at most C{--timeout} seconds) until a bootstrap peer has
answered and the number of known and online peers has not changed for a
second, or, for C{ping} and C{connect}, until the peer asked for is known
(L{MeshNetwork.find_peer}).  No answer from any bootstrap peer within the
timeout is an error (exit status 2).  Everything goes through the
L{MeshNetwork} API; the documents printed are built by
L{omerta.app.documents}, which the control API of a running node shares.

Examples::

    omerta mesh peers --invite omerta://join/...
    omerta --output json mesh status --network lab --timeout 5
    omerta mesh ping provider-1 --count 5 --interval 0.5
    omerta mesh connect 3f2a
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.internet.error import CannotListenError

from omerta.addressing import AddressError, BootstrapSpec, parse_bootstrap
from omerta.app.cli import CommandError, Invocation, run_reactor
from omerta.app.documents import (MeshView, connect_document, connect_peer,  # noqa: F401
                                  find_peer, peers_document, ping_document, summarise,
                                  unreachable_text)
from omerta.app.control_client import ControlClient, ControlError
from omerta.app.formats import format_peers  # noqa: F401 (the command prints with it)
from omerta.app.via_node import ask, network_field, running_node
from omerta.crypto.identity import Identity, load_or_create_identity
from omerta.crypto.invite import InviteError, parse_invite
from omerta.crypto.network import NetworkKey
from omerta.mesh.network import MeshNetwork, peer_label
from omerta.mesh.node import MeshConfig
from omerta.networks import Membership, MembershipError, NetworkStore
from omerta.safe_text import printable

CLI_DIR = "cli"
"""
The subdirectory of the data directory where the command's own node lives.
"""

STATUS_INTERVAL = 3600.0
#: The command's node is short-lived: it holds no relay reservations (it
#: opens sessions through its target's relays, and leaves within the
#: command's run), and its announcement lapses after 10 minutes, so the
#: network forgets it soon after it is gone.
CLI_MESH_CONFIG = MeshConfig(relay_count=0, announce_ttl=600)
"""
The short-lived node writes its status file at start and stop only.
"""


# -- arguments --------------------------------------------------------------


def _bootstrap_arg(text: str) -> BootstrapSpec:
    try:
        return parse_bootstrap(text)
    except AddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def _count_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _port_arg(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number in 0-65535")
    return int(text)


def _interface_arg(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address of this host") from None


def mesh_options(timeout_flag: str = "--timeout") -> argparse.ArgumentParser:
    """
    The options of a command that joins the mesh; C{timeout_flag} names the
    wait for the mesh (C{args.timeout}) where C{--timeout} means something
    else to the command.
    """
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("joining the mesh")
    which = group.add_mutually_exclusive_group()
    which.add_argument(
        "--invite",
        metavar="LINK",
        help="the network to look at, from an invite link (kept in <data-dir>/cli)",
    )
    which.add_argument(
        "--network",
        metavar="REF",
        help="the network of --data-dir to look at: id, id prefix or name"
        " (default: its first network)",
    )
    group.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        type=_bootstrap_arg,
        metavar="ID_OR_NAME@HOST:PORT",
        help="a peer to start from, besides the network's own (repeatable)",
    )
    group.add_argument(
        timeout_flag,
        dest="timeout",
        type=_seconds_arg,
        default=10.0,
        metavar="SECONDS",
        help="the longest the command waits for the mesh (default 10)",
    )
    group.add_argument(
        "--port", type=_port_arg, default=0, help="local UDP port (default: any free one)"
    )
    group.add_argument(
        "--interface",
        type=_interface_arg,
        default=None,
        metavar="IP",
        help="local address to bind (default: all IPv4)",
    )
    return options


def register(subparsers: Any) -> None:
    """
    Add C{mesh} and its commands.
    """
    mesh = subparsers.add_parser(
        "mesh",
        help="look at a network's mesh: through the running node, or a short-lived one",
        description="Ask the node that runs on --data-dir (omerta up, or a relay or"
        " provider daemon) through its control socket; without one (or with"
        " --invite, --bootstrap, --port or --interface), join the network's mesh"
        " for the duration of the command as the node kept in <data-dir>/cli"
        " (never the daemon's identity) and report what it sees.",
    )
    commands = mesh.add_subparsers(dest="mesh_command", metavar="COMMAND", required=True)
    common = mesh_options()

    status = commands.add_parser(
        "status",
        parents=[common],
        help="this command's node, the bootstrap peers and the traffic",
        description="Join the mesh, wait until the view settles, and show the"
        " command's own peer id, the network, which bootstrap peers answered,"
        " how many peers are known and online, and the traffic counters.",
    )
    status.set_defaults(func=status_command)

    peers = commands.add_parser(
        "peers",
        parents=[common],
        help="the peers of the network",
        description="Join the mesh, wait until the view settles, and list every"
        " peer known: id, name, state, capabilities, resources, NAT type,"
        " announced endpoints and round-trip time.",
    )
    peers.set_defaults(func=peers_command)

    ping = commands.add_parser(
        "ping",
        parents=[common],
        help="measure the round trip to a peer",
        description="Join the mesh, connect to PEER and ping it; print each"
        " reply (round trip, path, endpoint, local port) and a summary.",
    )
    ping.add_argument("peer", metavar="PEER", help="peer id, unique id prefix or name")
    ping.add_argument("--count", "-c", type=_count_arg, default=4, metavar="N",
                      help="how many pings (default 4)")
    ping.add_argument("--interval", "-i", type=_seconds_arg, default=1.0, metavar="SECONDS",
                      help="time between pings, answered or not, as ping(8) (default 1)")
    ping.add_argument("--reply-timeout", type=_seconds_arg, default=2.0, metavar="SECONDS",
                      help="how long to wait for each reply (default 2)")
    ping.set_defaults(func=ping_command)

    connect = commands.add_parser(
        "connect",
        parents=[common],
        help="find a live path to a peer",
        description="Join the mesh and make sure there is a live path to PEER"
        " (its known address, else one the mesh heard from recently); print"
        " the path.",
    )
    connect.add_argument("peer", metavar="PEER", help="peer id, unique id prefix or name")
    connect.add_argument("--wait-direct", type=_seconds_arg, default=0.0, metavar="SECONDS",
                         help="after connecting, wait up to SECONDS for a direct (or"
                         " hole-punched) path to replace a relayed one (default 0)")
    connect.set_defaults(func=connect_command, discover_nat=True)
    ping.set_defaults(discover_nat=True)

    watch = commands.add_parser(
        "watch",
        help="print the running node's events as they happen",
        description="Follow the event stream of the node running on --data-dir:"
        " peers discovered, connected, suspected and offline, paths changed,"
        " NAT changes, VM states.  Text lines, or one JSON object per line with"
        " --output json.  Needs a running node (omerta up).",
    )
    watch.add_argument("--kind", action="append", default=[], metavar="KIND",
                       help="only events of this kind (repeatable)")
    watch.add_argument("--count", type=_count_arg, default=None, metavar="N",
                       help="stop after N events")
    watch.set_defaults(func=watch_command)


# -- the command's own node ----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """
    What a C{mesh} command joins: its node's directory and identity, the
    network (as copied into that directory) and the bootstrap peers.
    """

    cli_dir: Path
    identity: Identity
    network: Membership
    bootstrap: tuple[BootstrapSpec, ...]


def prepare(invocation: Invocation) -> Plan:
    """
    Create (or load) the command's node in C{<data-dir>/cli} and put in it
    the network to join, and only that one.

    @raise CommandError: no network to join, or nothing to bootstrap from.
    """
    args = invocation.args
    now = invocation.now()
    cli_dir = invocation.data_dir / CLI_DIR
    cli_store = NetworkStore(cli_dir)
    if args.invite:
        network_id, text, name, extra = _from_invite(args.invite, now)
    else:
        source = _pick_membership(invocation, cli_store)
        network_id, text, name, extra = _from_membership(source, now)
    identity = load_or_create_identity(cli_dir)
    for membership in cli_store.list():
        if membership.network_id != network_id:
            cli_store.leave(membership.network_id, force=True)
    network = cli_store.join(text, now, name, exist_ok=True).membership
    bootstrap: list[BootstrapSpec] = []
    for spec in [*args.bootstrap, *extra, *network.bootstrap]:
        if spec not in bootstrap:
            bootstrap.append(spec)
    if not bootstrap:
        raise CommandError(
            f"network {network.name} ({network.network_id}) names no bootstrap peer:"
            f" give one with --bootstrap ID_OR_NAME@HOST:PORT"
        )
    return Plan(cli_dir, identity, network, tuple(bootstrap))


def _from_invite(text: str, now: float) -> tuple[str, str, str | None, tuple]:
    text = text.strip()
    if "://" not in text and len(text) <= 64:
        key = NetworkKey.from_text(text)
        return key.network_id_text, text, f"net-{key.network_id_text[:8]}", ()
    invite = parse_invite(text, now)
    return invite.network_id_text, text, None, ()


def _from_membership(source: Membership, now: float) -> tuple[str, str, str | None, tuple]:
    """
    How to copy C{source} into the cli store: by its invite while that is
    still accepted, else by its key (then its bootstrap list comes along
    separately).
    """
    if source.invite is not None:
        try:
            parse_invite(source.invite, now)
        except InviteError:
            pass
        else:
            return source.network_id, source.invite, source.name, ()
    return source.network_id, source.key.to_text(), source.name, source.bootstrap


def _pick_membership(invocation: Invocation, cli_store: NetworkStore) -> Membership:
    ref = invocation.args.network
    data_dir = invocation.data_dir
    own = NetworkStore(data_dir)
    if ref is not None:
        try:
            return own.get(ref)
        except MembershipError as e:
            try:
                return cli_store.get(ref)
            except MembershipError:
                raise e from None
    for store in (own, cli_store):
        memberships = store.list()
        if memberships:
            return memberships[0]
    raise CommandError(
        f"{data_dir} belongs to no network: pass --invite LINK, or join one with"
        f" 'omerta --data-dir {data_dir} network join --key LINK'"
    )


def run_on_mesh(
    invocation: Invocation, body: Callable[[MeshView], Awaitable[Any]]
) -> Any:
    """
    Prepare the node, run it on the reactor for the duration of C{body(view)}
    and return what C{body} returns.
    """
    plan = prepare(invocation)
    args = invocation.args

    async def session(reactor) -> Any:
        mesh = MeshNetwork(
            plan.cli_dir,
            network=plan.network.network_id,
            port=args.port,
            interface=args.interface or "",
            bootstrap=list(plan.bootstrap),
            # NAT discovery (for hole punching) only for commands that connect
            nat_interval=300 if getattr(args, "discover_nat", False) else 0,
            status_interval=STATUS_INTERVAL,
            config=CLI_MESH_CONFIG,
            reactor=reactor,
        )

        def stop_on_shutdown():
            if mesh.service.running:
                return mesh.stop()
            return None

        try:
            await mesh.start()
        except CannotListenError as e:
            where = f"{args.interface or '*'}:{args.port}"
            raise CommandError(
                f"cannot bind UDP {where}: {e.socketError}; choose another --port"
                f" (0 picks a free one)"
            ) from None
        trigger = reactor.addSystemEventTrigger("before", "shutdown", stop_on_shutdown)
        try:
            return await body(MeshView(mesh, plan, args.timeout))
        finally:
            reactor.removeSystemEventTrigger(trigger)
            await mesh.stop()

    return run_reactor(session)


# -- status -------------------------------------------------------------------


def status_command(invocation: Invocation) -> int:
    async def body(view: MeshView) -> dict:
        if await view.mesh.wait_joined(view.remaining()):
            await view.settled()
        return status_document(view)

    document = run_on_mesh(invocation, body)
    invocation.emit(format_status(document), document)
    if not document["answered"]:
        invocation.stdout.flush()
        raise CommandError(document["error"])
    return 0


def status_document(view: MeshView) -> dict:
    mesh = view.mesh
    host, port = mesh.local_address()
    network = view.plan.network
    known, online = view.counts()
    document = {
        "peer_id": mesh.peer_id,
        "data_dir": str(view.plan.cli_dir),
        "listen": f"{host}:{port}",
        "network": {"id": network.network_id, "name": network.name},
        "bootstrap": [
            {"spec": str(b.spec), "reached": b.reached} for b in mesh.bootstraps()
        ],
        "answered": view.answered(),
        "peers": {"known": known, "online": online},
        "waited_s": round(view.elapsed(), 3),
        "statistics": mesh.statistics(),
        "metrics": mesh.metrics.snapshot(),
    }
    if not document["answered"]:
        document["error"] = view.no_answer()
    return document


def format_status(document: dict) -> str:
    network = document["network"]
    statistics = document["statistics"]
    lines = [
        f"cli node   {document['peer_id']} ({document['data_dir']})",
        f"listening  udp {document['listen']}",
        f"network    {network['id']} ({printable(network['name'])})",
    ]
    for index, boot in enumerate(document["bootstrap"]):
        label = "bootstrap" if index == 0 else ""
        state = "answered" if boot["reached"] else "no answer"
        lines.append(f"{label:9}  {boot['spec']}: {state}")
    peers = document["peers"]
    lines.append(f"peers      {peers['known']} known, {peers['online']} online"
                 f" (after {document['waited_s']:.1f} s)")
    drops = statistics["drops"]
    lines.append(
        f"traffic    frames in {statistics['frames_in']}, out {statistics['frames_out']};"
        f" bytes in {statistics['bytes_in']}, out {statistics['bytes_out']}; drops: "
        + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none")
    )
    return "\n".join(lines)


# -- peers ----------------------------------------------------------------------


def peers_command(invocation: Invocation) -> int:
    async def body(view: MeshView) -> list[dict]:
        await view.joined()
        await view.settled()
        return peers_document(view.mesh)

    node = running_node(invocation)
    if node is not None:
        peers = ask(node, "GET", "/v1/peers", query=network_field(invocation.args))
    else:
        peers = run_on_mesh(invocation, body)
    invocation.emit(format_peers(peers), peers)
    return 0


# -- ping and connect --------------------------------------------------------------


def connect_command(invocation: Invocation) -> int:
    args = invocation.args

    async def body(view: MeshView) -> dict:
        return await connect_document(view, args.peer, args.wait_direct)

    node = running_node(invocation)
    if node is not None:
        document = ask(node, "POST", "/v1/connect", body={
            "peer": args.peer, "timeout": args.timeout, "wait_direct": args.wait_direct,
            **network_field(args)})
    else:
        document = run_on_mesh(invocation, body)
    invocation.emit(format_connection(document), document)
    return 0


def format_connection(document: dict) -> str:
    who = printable(document["name"] or document["peer_id"])
    rtt = "-" if document["rtt_ms"] is None else f"{document['rtt_ms']:.3f} ms"
    lines = [
        f"connected to {who}",
        f"peer id     {document['peer_id']}",
        f"path        {document['kind']}"
        + (f" via {printable(document['via'])}" if document["via"] else ""),
        f"endpoint    {printable(document['endpoint'])}",
        f"local port  {document['local_port']}",
        f"rtt         {rtt}",
    ]
    timings = document.get("timings")
    if timings:
        direct = timings["direct_s"]
        lines.append(
            f"timings     first answer {timings['first_message_s']:.3f} s, direct "
            + ("never" if direct is None else f"{direct:.3f} s")
            + f", {timings['punch_attempts']} punch attempt(s)"
        )
    return "\n".join(lines)


def ping_command(invocation: Invocation) -> int:
    args = invocation.args
    out = invocation.stdout
    live = not invocation.wants_json

    def on_path(record, connection) -> None:
        out.write(
            f"PING {peer_label(record)}: {connection.kind} path to"
            f" {connection.as_dict()['endpoint']} from local port {connection.local_port}\n"
        )
        out.flush()

    def on_reply(reply: dict) -> None:
        out.write(format_reply(reply) + "\n")
        out.flush()

    def on_lost(seq: int) -> None:
        out.write(f"seq {seq}: no reply within {args.reply_timeout:g} s\n")

    async def body(view: MeshView) -> dict:
        return await ping_document(
            view, args.peer, args.count, args.interval, args.reply_timeout,
            on_path=on_path if live else None, on_reply=on_reply if live else None,
            on_lost=on_lost if live else None)

    node = running_node(invocation)
    if node is not None:
        document = ask(node, "POST", "/v1/ping", body={
            "peer": args.peer, "count": args.count, "interval": args.interval,
            "timeout": args.timeout, "reply_timeout": args.reply_timeout,
            **network_field(args)})
        if live:
            _replay(document, args, on_reply, on_lost, out)
    else:
        document = run_on_mesh(invocation, body)
    invocation.emit(format_summary(document), document)
    if not document["replies"]:
        invocation.stdout.flush()
        raise CommandError(
            f"no reply from {printable(document['name'] or document['peer_id'])} to"
            f" {args.count} ping(s)"
        )
    return 0


def _replay(document: dict, args, on_reply, on_lost, out) -> None:
    """The lines a ping prints as it goes, from the running node's document."""
    replies = {r["seq"]: r for r in document["replies"]}
    if replies:
        first = replies[min(replies)]
        out.write(f"PING {printable(document['name'] or document['peer_id'])}: {first['kind']}"
                  f" path to {printable(first['endpoint'])} from local port"
                  f" {first['local_port']}\n")
    for seq in range(1, args.count + 1):
        if seq in replies:
            on_reply(replies[seq])
        else:
            on_lost(seq)


def format_reply(reply: dict) -> str:
    return (
        f"seq {reply['seq']}: rtt {reply['rtt_ms']:.3f} ms, {reply['kind']}"
        f" {printable(reply['endpoint'])}, local port {reply['local_port']}"
        + (f", via {printable(reply['via'])}" if reply.get("via") else "")
    )


def format_summary(document: dict) -> str:
    summary = document["summary"]
    lines = [
        f"--- {printable(document['name'] or document['peer_id'])} ping statistics ---",
        f"{summary['sent']} sent, {summary['received']} received,"
        f" {summary['loss_pct']:g}% loss",
    ]
    if summary["received"]:
        lines[-1] += (
            f"; rtt min/avg/max {summary['rtt_min_ms']:.3f}/{summary['rtt_avg_ms']:.3f}"
            f"/{summary['rtt_max_ms']:.3f} ms"
        )
    return "\n".join(lines)


# -- watch ----------------------------------------------------------------------


def watch_command(invocation: Invocation) -> int:
    args = invocation.args
    node = ControlClient.for_data_dir(invocation.data_dir, timeout=None)
    if node is None:
        raise CommandError(f"no node runs on {invocation.data_dir}: start one with"
                           f" 'omerta --data-dir {invocation.data_dir} up'")
    out = invocation.stdout
    seen = 0

    def subscribed() -> None:
        sys.stderr.write(f"omerta mesh watch: following the events of {invocation.data_dir}\n")
        sys.stderr.flush()

    try:
        for kind, data in node.events(args.kind or None, subscribed):
            if invocation.wants_json:
                out.write(json.dumps({"event": kind, **data}, sort_keys=True) + "\n")
            else:
                out.write(format_event(kind, data) + "\n")
            out.flush()
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    except ControlError as e:
        raise CommandError(str(e)) from None
    except (OSError, http.client.HTTPException):
        raise CommandError(f"the node of {invocation.data_dir} stopped") from None
    return 0


def format_event(kind: str, data: dict) -> str:
    """One line: the kind, then the fields (peer first), in a stable order."""
    fields = dict(data)
    head = [kind]
    for key in ("peer_id", "vm_id"):
        if key in fields:
            head.append(printable(fields.pop(key)))
    fields.pop("network", None)
    rest = " ".join(f"{k}={_plain(v)}" for k, v in sorted(fields.items()))
    return " ".join(head) + (f"  {rest}" if rest else "")


def _plain(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else printable(value)
