"""
The fast path of the C{omerta} command: the read-only commands a running
node answers (C{mesh peers}, C{vm list}) go straight to its control socket,
before the rest of the command line (the mesh, Twisted, cryptography) is
imported, so they take about as long as Python takes to start.

Anything this module does not recognise exactly (another command, another
option, C{--help}, no node on the data directory) returns None and the full
command line runs instead, with the same output and errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from omerta.app.control_client import ControlClient, ControlError, NoNode
from omerta.app.paths import default_data_dir

# (command words) -> (path, {option: query parameter or None for a flag})
COMMANDS = {
    ("mesh", "peers"): ("/v1/peers", {"--network": "network"}),
    ("vm", "list"): ("/v1/vms", {"--network": "network", "--refresh": None,
                                  "--timeout": "timeout"}),
}


_WITH_VALUE = {"--data-dir", "--output", "--network", "--timeout"}


def _parse(argv: list[str]) -> tuple | None:
    data_dir, output, words, query = None, "text", [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _WITH_VALUE:
            if not eq:
                if i + 1 >= len(argv):
                    return None
                value = argv[i + 1]
                i += 1
            if name == "--data-dir":
                data_dir = value
            elif name == "--output":
                if value not in ("text", "json"):
                    return None
                output = value
            else:
                query[name] = value
        elif arg == "--refresh":
            query[arg] = "1"
        elif arg.startswith("-"):
            return None
        else:
            words.append(arg)
        i += 1
    command = COMMANDS.get(tuple(words))
    if command is None:
        return None
    path, allowed = command
    if any(option not in allowed for option in query):
        return None
    if words == ["vm", "list"] and "--refresh" not in query:
        query.pop("--timeout", None)
    params = {allowed[o] or o.lstrip("-"): v for o, v in query.items()}
    return words, Path(data_dir).expanduser() if data_dir else default_data_dir(), output, \
        path, params


def run(argv: list[str], stdout: TextIO, stderr: TextIO) -> int | None:
    """The exit status when a running node answered, else None."""
    parsed = _parse(argv)
    if parsed is None:
        return None
    words, data_dir, output, path, params = parsed
    try:
        timeout = float(params.get("timeout", 10.0)) + 15.0
    except ValueError:
        return None
    node = ControlClient.for_data_dir(data_dir, timeout=timeout)
    if node is None:
        return None
    try:
        document = node.get(path, **params)
    except ControlError as e:
        stderr.write(f"omerta: error: {e}\n")
        return 2
    except (NoNode, OSError):
        return None  # it went away: the full command line decides
    if output == "json":
        json.dump(document, stdout, indent=2, sort_keys=True)
        stdout.write("\n")
    else:
        from omerta.app import formats

        text = (formats.format_peers(document) if words == ["mesh", "peers"]
                else formats.format_vm_list(document))
        stdout.write(text + "\n")
    return 0
