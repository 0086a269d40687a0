"""
C{omerta up} / C{omerta down}: the data directory's node in the background.

    omerta up [--invite LINK] [--bootstrap SPEC ...] [--port N] [--name NAME]
    omerta down

C{up} starts C{twistd omerta-node} as a daemon with its pidfile
(C{node.pid}) and log (C{node.log}) in the data directory, waits until it
has joined (a bootstrap peer answered, or some peer is online; progress on
stderr, a deadline, the log's last lines when it fails) and prints its
status.  A node that already serves the directory (started by C{up}, or a
relay or provider daemon) is left alone: C{up} says so and exits 0.  A
pidfile left by a node that was killed is removed, and the new node's
control service replaces the socket it left.

C{down} stops the node C{up} started (SIGTERM: it says goodbye to its
relays and peers) and waits for it to exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.python import usage

from omerta.app import node_tap
from omerta.app.cli import CommandError, Invocation
from omerta.app.cli_node import format_status, read_status
from omerta.app.control_client import ControlClient
from omerta.storage import ensure_private_dir, pid_alive

PID_FILE = "node.pid"
LOG_FILE = "node.log"
UP_TIMEOUT = 30.0
DOWN_TIMEOUT = 15.0
CHECK_INTERVAL = 0.1
PIDFILE_GRACE = 3.0
LOG_SETTLE = 3.0
NO_REASON = "no reason in its log"
LOG_LINES = 15


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up",
        help="start this data directory's node in the background",
        description="Start the member node of --data-dir in the background"
        " (twistd omerta-node), wait until it has joined its network and print"
        " its status.  Nothing happens if a node already serves the directory.",
    )
    up.add_argument("--invite", action="append", default=[], metavar="LINK",
                    help="join this network first (repeatable)")
    up.add_argument("--bootstrap", action="append", default=[], metavar="ID_OR_NAME@HOST:PORT",
                    help="a peer to bootstrap from, besides the networks' own (repeatable)")
    up.add_argument("--port", metavar="N", default=None,
                    help=f"UDP port (default {node_tap.DEFAULT_PORT}; 0 picks a free one)")
    up.add_argument("--interface", metavar="ADDRESS", default=None,
                    help="local address to bind (default: all IPv4)")
    up.add_argument("--name", metavar="NAME", default=None, help="this node's name")
    up.add_argument("--dashboard", metavar="ENDPOINT", default=None,
                    help="serve the mesh dashboard here (e.g. 127.0.0.1:7480; loopback only;"
                         " 'omerta dashboard' prints its URL)")
    up.add_argument("--timeout", type=float, default=UP_TIMEOUT, metavar="SECONDS",
                    help=f"how long to wait for the node to join (default {UP_TIMEOUT:g})")
    up.set_defaults(func=up_command)

    down = subparsers.add_parser(
        "down",
        help="stop the node 'omerta up' started",
        description="Stop the background node of --data-dir and wait for it to exit.",
    )
    down.add_argument("--timeout", type=float, default=DOWN_TIMEOUT, metavar="SECONDS",
                      help=f"how long to wait for it to exit (default {DOWN_TIMEOUT:g})")
    down.set_defaults(func=down_command)


# -- what runs on the directory ------------------------------------------------


def running_pid(data_dir: Path) -> int | None:
    """
    The pid in the directory's pidfile when that process is alive; a pidfile
    naming a dead process (a node killed with -9) is removed.
    """
    pidfile = data_dir / PID_FILE
    try:
        pid = int(pidfile.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        pid = 0
    if pid > 0 and pid_alive(pid):
        return pid
    pidfile.unlink(missing_ok=True)
    return None


def control_answers(data_dir: Path) -> bool:
    """
    Whether a node serves the directory's control socket.  (A socket file
    no process listens on, left by a kill, is replaced by the next node's
    control service when it starts.)
    """
    return ControlClient.for_data_dir(data_dir) is not None


def _node_argv(invocation: Invocation) -> list[str]:
    args = invocation.args
    argv = ["--data-dir", str(invocation.data_dir)]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    if args.interface:
        argv += ["--interface", args.interface]
    if args.name:
        argv += ["--name", args.name]
    if args.dashboard is not None:
        argv += ["--dashboard", args.dashboard]
    for link in args.invite:
        argv += ["--invite", link]
    for spec in args.bootstrap:
        argv += ["--bootstrap", spec]
    return argv


def _check(argv: list[str]) -> None:
    """The node's own option checks, here, so a mistake is a plain error message."""
    try:
        node_tap.Options().parseOptions(argv)
    except usage.UsageError as e:
        raise CommandError(str(e)) from None


def _progress(message: str) -> None:
    sys.stderr.write(f"omerta up: {message}\n")
    sys.stderr.flush()


def _log_tail(data_dir: Path) -> str:
    try:
        lines = (data_dir / LOG_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_LINES:]) or "(empty log)"


def _failure(data_dir: Path, said: str) -> str:
    """
    Why the node stopped, in a line: the last exception its log names
    (its message without the class), else what twistd said.
    """
    try:
        lines = (data_dir / LOG_FILE).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        text = line.split("] ", 1)[-1].strip()
        name, colon, message = text.partition(": ")
        if colon and name.rpartition(".")[2].endswith(("Error", "Exception")):
            return message.strip()
    return said.strip().splitlines()[0] if said.strip() else NO_REASON


def _joined(document: dict | None) -> bool:
    if not document or not document.get("alive"):
        return False
    boots = document.get("bootstrap", [])
    if any(b.get("reached") for b in boots):
        return True
    online = any(p.get("state") == "online" for p in document.get("peers", []))
    return online or not boots


# -- up -------------------------------------------------------------------------


def up_command(invocation: Invocation) -> int:
    data_dir = invocation.data_dir
    ensure_private_dir(data_dir)
    pid = running_pid(data_dir)
    if pid is not None or control_answers(data_dir):
        _progress(f"a node already serves {data_dir}"
                  + (f" (pid {pid})" if pid is not None else " (its control socket answers)"))
        return _print_status(invocation)
    argv = _node_argv(invocation)
    _check(argv)
    pidfile, logfile = data_dir / PID_FILE, data_dir / LOG_FILE
    command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
               "--pidfile", str(pidfile), "--logfile", str(logfile), "--umask", "0077",
               "omerta-node", *argv]
    os.close(os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(logfile, 0o600)  # the log names peers and addresses: private like the rest
    _progress(f"starting the node of {data_dir} (log {logfile})")
    started = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=_environment())
    if started.returncode != 0:
        # the daemon reports to twistd before its log is complete: give the
        # log a moment to say why
        settle = time.monotonic() + LOG_SETTLE
        while _failure(data_dir, "") == NO_REASON and time.monotonic() < settle:
            time.sleep(CHECK_INTERVAL)
        raise CommandError(f"the node did not start: {_failure(data_dir, started.stdout)};"
                           f" the end of {logfile}:\n{_log_tail(data_dir)}")
    started_at = time.monotonic()
    deadline = started_at + invocation.args.timeout
    announced = started_at
    while True:
        document = read_status(invocation)
        if _joined(document):
            break
        pid = running_pid(data_dir)
        # (the daemon writes its pidfile just after it forks: a moment's grace)
        if pid is None and time.monotonic() - started_at > PIDFILE_GRACE:
            raise CommandError(f"the node exited: {_failure(data_dir, '')};"
                               f" the end of {logfile}:\n{_log_tail(data_dir)}")
        if time.monotonic() >= deadline:
            raise CommandError(
                f"the node runs (pid {pid}) but has not joined within"
                f" {invocation.args.timeout:g} s: is a bootstrap peer reachable?"
                f" 'omerta down' stops it; the end of {logfile}:\n{_log_tail(data_dir)}")
        if time.monotonic() - announced >= 2:
            announced = time.monotonic()
            _progress("waiting for a bootstrap peer to answer...")
        time.sleep(CHECK_INTERVAL)
    return _print_status(invocation)


def _environment() -> dict:
    """The node imports the same omerta as this command."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])
    if (Path(here) / "omerta" / "__init__.py").exists():
        env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _print_status(invocation: Invocation) -> int:
    document = read_status(invocation) or {"peer_id": "?", "alive": False, "peers": []}
    invocation.emit(format_status(document, invocation), document)
    return 0


# -- down -----------------------------------------------------------------------


def down_command(invocation: Invocation) -> int:
    data_dir = invocation.data_dir
    pid = running_pid(data_dir)
    if pid is None:
        invocation.emit(f"no node started by 'omerta up' runs on {data_dir}",
                        {"stopped": False, "pid": None})
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + invocation.args.timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            raise CommandError(f"the node (pid {pid}) did not exit within"
                               f" {invocation.args.timeout:g} s; 'kill -9 {pid}' ends it")
        time.sleep(CHECK_INTERVAL)
    (data_dir / PID_FILE).unlink(missing_ok=True)
    invocation.emit(f"stopped the node of {data_dir} (pid {pid})", {"stopped": True, "pid": pid})
    return 0
