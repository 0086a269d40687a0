"""
C{omerta node status}: what the node running on this data directory sees.

A running node mirrors its state into C{status.json} in its data directory
(see L{omerta.mesh.service}); this command reads that file, checks the node
is still alive, and can wait (up to C{--timeout}) until the node sees a
number of peers.
"""

from __future__ import annotations

import time
from typing import Any

from omerta.app.cli import CommandError, Invocation
from omerta.app.control_client import ControlClient, ControlError, NoNode
from omerta.app.documents import node_status_document
from omerta.crypto.identity import IDENTITY_FILE, load_or_create_identity
from omerta.mesh.service import STATUS_FILE
from omerta.networks import NetworkStore
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
    document = read_json(invocation.data_dir / STATUS_FILE, lambda: None)
    if document is None:
        return None
    alive = bool(document.get("running")) and pid_alive(int(document.get("pid", 0)))
    age = max(0.0, invocation.now() - float(document.get("updated_at", 0)))
    return node_status_document(document, alive=alive, age=age)


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
        f"node      {document['peer_id']} ({document.get('name') or 'unnamed'})",
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
        lines.append(f"network   {network} ({names.get(network, '?')})")
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
                f"  {p['peer_id']:32}  {(p['name'] or '-'):14}  {(p.get('endpoint') or '-'):21}"
                f"  {p['state']:7}  {rtt:>9}  {heard}"
            )
    metrics = document.get("metrics", {})
    if metrics:
        frames_out = sum(s["value"] for s in metrics.get("frames_out", []))
        drops = {s["labels"]["reason"]: s["value"] for s in metrics.get("drops", [])}
        lines.append(
            f"frames    in {metrics.get('frames_in', 0)}, out {frames_out}; drops: "
            + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none")
        )
    return "\n".join(lines)
