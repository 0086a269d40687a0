"""
The C{omerta} command: the operator's and consumer's front end.

Each command module (C{cli_network}, ...) exposes C{register(subparsers)},
which adds its commands with C{set_defaults(func=...)}; C{func} receives an
L{Invocation} and returns an exit code (or C{None} for 0).

Global options (C{--data-dir}, C{--output}) are accepted before and after
the command: every parser created under the top level gets them from a
parent parser whose defaults are suppressed, so a value given after the
command wins and a missing one leaves the top-level value alone.

Errors a person can fix print C{omerta: error: <message>} on stderr and exit
with status 2, without a traceback.  With C{--output json} a successful
command prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from omerta.app.paths import default_data_dir

COMMAND_MODULES = (
    "omerta.app.cli_network",
    "omerta.app.cli_node",
    "omerta.app.cli_nat",
    "omerta.app.cli_mesh",
    "omerta.app.cli_vm",
    "omerta.app.cli_job",
    "omerta.app.cli_daemon",
    "omerta.app.cli_dashboard",
)
"""
Modules whose C{register(subparsers)} adds commands, imported when the
parser is built.
"""

EXIT_OK = 0
EXIT_ERROR = 2


class CommandError(Exception):
    """
    A command cannot do what was asked; the message says why and what to do.
    """


def user_errors() -> tuple[type[BaseException], ...]:
    """
    Exceptions reported as C{omerta: error: ...} with exit status 2
    (imported when an error happens: a command a running node answers
    never loads the modules that define them).
    """
    from omerta.addressing import AddressError
    from omerta.crypto.identity import IdentityError
    from omerta.crypto.invite import InviteError
    from omerta.crypto.network import NetworkKeyError
    from omerta.networks import MembershipError
    from omerta.storage import StateFileError

    return (CommandError, StateFileError, InviteError, AddressError, NetworkKeyError,
            IdentityError, MembershipError, OSError)


@dataclass
class Invocation:
    """
    One run of a command: the parsed arguments, where output goes, and the
    clock (the only place the CLI reads the time).
    """

    args: argparse.Namespace
    stdout: TextIO
    clock: Callable[[], float] = time.time

    @property
    def data_dir(self) -> Path:
        return Path(self.args.data_dir).expanduser()

    @property
    def wants_json(self) -> bool:
        return self.args.output == "json"

    def now(self) -> float:
        return self.clock()

    def emit(self, text: str, document: Any) -> None:
        """
        Print C{document} as one JSON document with C{--output json}, else
        C{text}.
        """
        if self.wants_json:
            json.dump(document, self.stdout, indent=2, sort_keys=True)
            self.stdout.write("\n")
        else:
            self.stdout.write(text if text.endswith("\n") else text + "\n")


def run_reactor(coroutine_function: Callable[[Any], Any]) -> Any:
    """
    Run C{coroutine_function(reactor)} on the global reactor until it
    finishes and return its result (or raise its exception).  A process can
    run the reactor only once, so a command calls this at most once.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    outcome: list = []

    def start() -> None:
        d = ensureDeferred(coroutine_function(reactor))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=True)
    if not outcome:
        raise KeyboardInterrupt()
    result = outcome[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def _global_options(data_dir: Any, output: Any) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("global options")
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        type=Path,
        default=data_dir,
        help="where this node keeps its identity and networks"
        " (default: $OMERTA_DATA_DIR, else $XDG_DATA_HOME/omerta,"
        " else ~/.local/share/omerta)",
    )
    group.add_argument(
        "--output",
        choices=("text", "json"),
        default=output,
        help="text for people (default) or one JSON document for scripts",
    )
    return options


class _CommandParser(argparse.ArgumentParser):
    """
    A parser for a command below the top level: it accepts the global
    options too, without defaults, so it only overrides what was given.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parents = list(kwargs.pop("parents", []))
        parents.append(_global_options(argparse.SUPPRESS, argparse.SUPPRESS))
        super().__init__(*args, parents=parents, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """
    The whole C{omerta} parser, with every command module registered.
    """
    parser = argparse.ArgumentParser(
        prog="omerta",
        description="Operate an omerta node: networks, peers, VMs.",
        parents=[_global_options(default_data_dir(), "text")],
    )
    subparsers = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        required=True,
        parser_class=_CommandParser,
    )
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        if error.filename is not None:
            return f"{error.filename}: {error.strerror}"
        return error.strerror
    return str(error)


def main(
    argv: list[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """
    Run the C{omerta} command and return its exit status.

    @param stdout: where output goes (default C{sys.stdout}).
    @param stderr: where errors and usage messages go (default C{sys.stderr}).
    @param clock: the source of the current unix time.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    from omerta.app import fast

    status = fast.run(sys.argv[1:] if argv is None else list(argv), stdout, stderr)
    if status is not None:
        return status
    parser = build_parser()
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as e:
        if e.code is None:
            return EXIT_OK
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        status = args.func(Invocation(args, stdout, clock))
    except user_errors() as e:
        stderr.write(f"omerta: error: {_describe(e)}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        stderr.write("omerta: interrupted\n")
        return 130
    return EXIT_OK if status is None else status


if __name__ == "__main__":
    # Run as "python -m omerta.app.cli": use the imported module, not this
    # __main__ copy, so the command modules' exceptions are the same classes.
    from omerta.app import cli

    sys.exit(cli.main())
