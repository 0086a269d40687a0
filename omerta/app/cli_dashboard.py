"""
C{omerta dashboard}: print the URL of the dashboard the node running on
C{--data-dir} serves (C{--dashboard ENDPOINT}), with its token when the
dashboard takes clients off loopback (C{--dashboard-allow-remote}).

The node writes C{<data dir>/dashboard.json} once it listens (the URL, never
the token); the token is read from C{<data dir>/dashboard.token}, which only
the node's user can read.
"""

from __future__ import annotations

from typing import Any

from omerta.app.cli import CommandError, Invocation


def register(subparsers: Any) -> None:
    command = subparsers.add_parser(
        "dashboard",
        help="print the URL of the running node's dashboard",
        description="Print the URL of the live dashboard of the node running on --data-dir"
        " (started with --dashboard ENDPOINT), with the token when it needs one.",
    )
    command.set_defaults(func=dashboard_command)


def dashboard_command(invocation: Invocation) -> int:
    from omerta.app.dashboard import dashboard_url
    from omerta.storage import StateFileError

    try:
        found = dashboard_url(invocation.data_dir)
    except StateFileError as e:
        raise CommandError(str(e)) from None
    if found is None:
        raise CommandError(
            f"no node serves a dashboard on {invocation.data_dir}: start it with"
            f" --dashboard 127.0.0.1:7480 (twistd omerta-relay, omerta-provider or"
            f" omerta-node; or 'dashboard = \"127.0.0.1:7480\"' in its --config file)")
    invocation.emit(found["url"], found)
    return 0
