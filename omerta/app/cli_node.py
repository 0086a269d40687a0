"""
C{omerta node status}: what the node running on this data directory sees.

A running node mirrors its state into C{status.json} in its data directory
(see L{omerta.mesh.service}); this command reads that file, checks the node
is still alive, and can wait (up to C{--timeout}) until the node sees a
number of peers.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from omerta.app.cli import CommandError, Invocation
from omerta.app.control_client import ControlClient, ControlError, NoNode
from omerta.app.documents import node_status_document
from omerta.crypto.identity import IDENTITY_FILE, load_or_create_identity
from omerta.mesh.service import STATUS_FILE
from omerta.networks import NetworkStore
from omerta.safe_text import printable
from omerta.storage import pid_alive, read_json

POLL_INTERVAL = 0.2


def register(subparsers: Any) -> None:
    node = subparsers.add_parser(
        "node", help="inspect the node that runs on this data directory"
    )
    commands = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    status = commands.add_parser(
        "status",
        help="identity, networks and the peers the running node sees",
        description="Show what the node running on --data-dir sees, from its"
        " status file.",
    )
    status.add_argument(
        "--wait-peers",
        type=int,
        default=0,
        metavar="N",
        help="wait until the node sees at least N online peers",
    )
    status.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long --wait-peers waits (default 10)",
    )
    status.set_defaults(func=status_command)


def read_status(invocation: Invocation) -> dict | None:
    """
    The running node's status: from its control API when it serves one
    (current), else from the status file it mirrors (up to 2 s old).
    """
    node = ControlClient.for_data_dir(invocation.data_dir, timeout=5.0)
    if node is not None:
        try:
            return node.get("/v1/status")
        except (ControlError, NoNode, OSError):
            pass  # the status file says what it last knew
    path = invocation.data_dir / STATUS_FILE
    document = read_json(path, lambda: None)
    if document is None:
        return None
    problem = status_problem(document)
    if problem is not None:
        raise CommandError(
            f"{path} is not a node status file ({problem}); a running node rewrites it"
            f" within seconds, so wait and retry, or, if no node runs on"
            f" {invocation.data_dir}, delete it"
        )
    alive = bool(document.get("running")) and pid_alive(int(document.get("pid", 0)))
    age = max(0.0, invocation.now() - float(document.get("updated_at", 0)))
    return node_status_document(document, alive=alive, age=age)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


_STATUS_FIELDS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    # field: (required, check, what it should be)
    "pid": (True, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "a process id"),
    "running": (True, lambda v: isinstance(v, bool), "true or false"),
    "updated_at": (True, _is_number, "a time"),
    "peer_id": (True, _is_str, "a peer id"),
    "name": (False, _optional(_is_str), "a name"),
    "listen": (False, _optional(_is_str), "an address"),
    "capabilities": (False, _list_of(_is_str), "a list of role names"),
    "networks": (False, _list_of(_is_str), "a list of network ids"),
    "resources": (False, _optional(lambda v: isinstance(v, dict) and (not v or all(
        _is_number(v.get(k)) for k in ("cpu_cores", "memory_mb", "disk_gb", "gpus")))),
        "the offered resources"),
    "metrics": (False, lambda v: isinstance(v, dict), "an object"),
}
_PEER_FIELDS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "peer_id": (True, _is_str, "a peer id"),
    "state": (True, _is_str, "a state name"),
    "name": (True, _optional(_is_str), "a name"),
    "rtt_ms": (True, _optional(_is_number), "milliseconds"),
    "last_heard_ago_s": (False, _optional(_is_number), "seconds"),
    "endpoint": (False, _optional(_is_str), "an address"),
}


def _fields_problem(document: dict, fields: dict, where: str) -> str | None:
    for field, (required, check, what) in fields.items():
        if field not in document:
            if required:
                return f"{where}has no {field!r}"
            continue
        if not check(document[field]):
            return f"{where}{field!r} is {document[field]!r}, not {what}"
    return None


def status_problem(document: Any) -> str | None:
    """
    What makes C{document} unusable as a node's status (the fields this
    command reads, of the types it reads them as), or None.
    """
    if not isinstance(document, dict):
        return f"it holds a {type(document).__name__}, not an object"
    problem = _fields_problem(document, _STATUS_FIELDS, "")
    if problem is not None:
        return problem
    peers = document.get("peers", [])
    if not isinstance(peers, list):
        return f"'peers' is {peers!r}, not a list"
    for index, peer in enumerate(peers):
        if not isinstance(peer, dict):
            return f"peer {index} is {peer!r}, not an object"
        problem = _fields_problem(peer, _PEER_FIELDS, f"peer {index} ")
        if problem is not None:
            return problem
    metrics = document.get("metrics", {})
    try:
        _metrics_line(metrics)
    except (AttributeError, KeyError, TypeError, ValueError):
        return "its 'metrics' are not counters"
    return None


def _online(document: dict | None) -> int:
    if not document or not document["alive"]:
        return 0
    return sum(1 for p in document.get("peers", []) if p["state"] == "online")


def status_command(invocation: Invocation) -> int:
    args = invocation.args
    if not (invocation.data_dir / IDENTITY_FILE).exists():
        raise CommandError(
            f"no node has run on {invocation.data_dir} yet (no identity there);"
            f" start one with 'twistd -n omerta-relay --data-dir {invocation.data_dir}'"
        )
    document = read_status(invocation)
    deadline = time.monotonic() + args.timeout
    while _online(document) < args.wait_peers and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        document = read_status(invocation)
    if document is None:
        identity = load_or_create_identity(invocation.data_dir)
        document = {"peer_id": identity.peer_id_text, "alive": False, "peers": []}
    invocation.emit(format_status(document, invocation), document)
    if _online(document) < args.wait_peers:
        if not document["alive"]:
            why = "the node is not running"
        else:
            why = f"it sees {_online(document)} online peer(s) after {args.timeout:g} s"
        invocation.stdout.flush()
        raise CommandError(f"waited for {args.wait_peers} peer(s) but {why}")
    return 0


def format_status(document: dict, invocation: Invocation) -> str:
    names = {m.network_id: m.name for m in NetworkStore(invocation.data_dir).list()}
    state = "running" if document["alive"] else "not running"
    lines = [
        f"node      {document['peer_id']} ({printable(document.get('name') or 'unnamed')})",
        f"state     {state}" + (f", pid {document['pid']}" if document["alive"] else ""),
    ]
    if document.get("listen"):
        lines.append(f"listening udp {document['listen']}")
    if document.get("capabilities"):
        lines.append(f"roles     {', '.join(document['capabilities'])}")
    if "provider" in document.get("capabilities", ()) and document.get("resources"):
        r = document["resources"]
        lines.append(f"offers    {r['cpu_cores']} cores, {r['memory_mb']} MiB,"
                     f" {r['disk_gb']} GiB free, {r['gpus']} GPU(s)")
    for network in document.get("networks", []):
        lines.append(f"network   {network} ({printable(names.get(network, '?'))})")
    peers = document.get("peers", [])
    lines.append(f"peers     {len(peers)}")
    if peers:
        lines.append(
            f"  {'PEER ID':32}  {'NAME':14}  {'ENDPOINT':21}  {'STATE':7}  {'RTT':>9}  LAST HEARD"
        )
        for p in peers:
            rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f} ms"
            heard = p.get("last_heard_ago_s")
            heard = "never" if heard is None else f"{heard:.1f} s ago"
            lines.append(
                f"  {p['peer_id']:32}  {printable(p['name'] or '-'):14}"
                f"  {printable(p.get('endpoint') or '-'):21}  {printable(p['state']):7}"
                f"  {rtt:>9}  {heard}"
            )
    metrics = document.get("metrics", {})
    if metrics:
        lines.append(_metrics_line(metrics))
    return "\n".join(lines)


def _metrics_line(metrics: dict) -> str:
    frames_out = sum(s["value"] for s in metrics.get("frames_out", []))
    drops = {s["labels"]["reason"]: s["value"] for s in metrics.get("drops", [])}
    return (
        f"frames    in {metrics.get('frames_in', 0)}, out {frames_out}; drops: "
        + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none")
    )
