"""
Commands through the running node: when a node serves the data directory's
control socket (C{omerta up}, or a relay or provider daemon), a command asks
it over the control API (L{omerta.app.control}) instead of joining the mesh
as a short-lived node of its own.  The documents and the error messages are
the same either way; only the time differs.

A command uses the running node unless it was given options that describe a
short-lived node (C{--invite}, C{--bootstrap}, C{--port}, C{--interface}).
"""

from __future__ import annotations

from typing import Any

from omerta.app.cli import CommandError, Invocation
from omerta.app.control_client import ControlClient, ControlError, NoNode

HTTP_MARGIN = 15.0
"""Seconds the command waits for the node beyond the node's own timeout."""


def running_node(invocation: Invocation) -> ControlClient | None:
    """
    The node serving C{--data-dir}, when this command can use it; None
    means: join as a short-lived node.
    """
    args = invocation.args
    if (getattr(args, "invite", None) or getattr(args, "bootstrap", None)
            or getattr(args, "port", 0) or getattr(args, "interface", None)):
        return None
    timeout = float(getattr(args, "timeout", 10.0) or 10.0)
    return ControlClient.for_data_dir(invocation.data_dir, timeout=timeout + HTTP_MARGIN)


def ask(node: ControlClient, method: str, path: str, body: dict | None = None,
        query: dict | None = None) -> Any:
    """
    One request; the node's refusal becomes the command's error (exit 2,
    the node's message).
    """
    try:
        return node.request(method, path, body=body, query=query)
    except ControlError as e:
        raise CommandError(str(e)) from None
    except (NoNode, TimeoutError, ConnectionError) as e:
        raise CommandError(f"the node of {node.data_dir} stopped answering ({e});"
                           f" 'omerta up' starts it again") from None


def network_field(args) -> dict:
    network = getattr(args, "network", None)
    return {} if network is None else {"network": network}
