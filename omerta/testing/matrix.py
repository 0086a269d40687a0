"""
The NAT traversal matrix: real omerta processes behind real NATs of every
pair of types, measured.

A L{MatrixLab} builds one L{omerta.testing.natlab.Lab}:

 - two relay servers on the public segment (C{relay} on 198.51.100.10:7400
   with RFC 5780 STUN on .11, C{relay2} on .12:7400 with STUN on .13), each a
   C{twistd -n omerta-relay} daemon; C{relay} created the network, C{relay2}
   joined it through the invite;
 - for every NAT type Y a I{target}: a router of type Y (none for "none")
   with one host running C{twistd -n omerta-provider --name target-Y},
   bootstrapping from both relays;
 - for every NAT type X an I{initiator} host behind a router of its own
   (initiators and targets never share a router: no NAT of the lab hairpins).

The routers are home routers unless a I{variant} says otherwise
(L{omerta.testing.matrix_results.VARIANTS}): without an input filter
(behind an ISP router each, or side by side), with 30 s mappings, behind a
carrier-grade NAT of their own (behind an ISP router), or (C{same-lan})
one router per type with both the target and the initiator on its LAN, the
pairs then being each type with itself.

A trial (L{MatrixLab.run_trial}) runs a fresh short-lived CLI node in the
initiator's namespace (fresh data directory, so a fresh identity)::

    omerta --data-dir DIR --output json mesh connect target-Y --invite LINK
        --bootstrap relay@198.51.100.10:7400 --bootstrap relay2@198.51.100.12:7400
        --wait-direct 10 --timeout 20

and records the path it ended on (C{kind}: "direct" or "punched" count as a
direct path, "relayed" does not), the time to the first message and to a
direct path and the hole-punch attempts (the C{timings} object), or the
error.  L{MatrixLab.run_matrix} runs every (X, Y) pair C{trials} times, one
thread per initiator host (its targets in sequence), optionally with random
loss on every router, and returns one L{PairResult} per pair.  L{MatrixLab.failover_relay} and
L{MatrixLab.failover_conntrack} break a path in the middle of a long
C{omerta mesh ping} (kill -9 the relay in use; flush a router's conntrack)
and measure how long the path takes to come back.

The results, L{omerta.testing.matrix_results.EXPECTED} (the outcome each
pair should have, see docs/natlab.md) and the tables are in
L{omerta.testing.matrix_results}.

Everything waits on conditions with deadlines (status files, output
lines); sleeps are only the short polling intervals inside those loops.
Needs root like the lab itself.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from omerta.testing import natlab
from omerta.testing.matrix_results import (DIRECT_KINDS, VARIANTS, FailoverResult, PairResult,
                                           PingEvent, Trial, parse_ping_line)
from omerta.testing.natlab import NAT_TYPES, Lab

REPO = Path(__file__).resolve().parent.parent.parent
TWISTD = Path(sys.executable).with_name("twistd")

RELAY_PORT = 7400
TARGET_PORT = 7400
#: (daemon name, (address, STUN alternate address)) of the relays.
RELAYS = (
    ("relay", ("198.51.100.10", "198.51.100.11")),
    ("relay2", ("198.51.100.12", "198.51.100.13")),
)
NETWORK_NAME = "matrix"

#: Short names for lab node names (lowercase, up to 16 characters).
SHORT = {
    "none": "pub",
    "full-cone": "fc",
    "restricted-cone": "rc",
    "port-restricted": "pr",
    "symmetric": "sym",
}

POLL = 0.1
"""Polling interval inside deadline loops."""


class MatrixError(Exception):
    """
    The matrix lab cannot be built or a measurement cannot be made; the
    message says what happened (with log excerpts).
    """


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OMERTA_DATA_DIR", None)
    return env


def _wait(predicate: Callable[[], Any], timeout: float, what: str,
          describe: Callable[[], str] | None = None, interval: float = POLL) -> Any:
    """L{natlab.poll_until}, failing with L{MatrixError}."""
    return natlab.poll_until(predicate, timeout, what, describe, interval, MatrixError)


# -- daemons ---------------------------------------------------------------------


class Daemon:
    """
    One C{twistd -n PLUGIN} process in a lab namespace, with its data
    directory and its log in C{<data_dir>.log}.
    """

    def __init__(self, lab: Lab, node: natlab.Node, plugin: str, name: str,
                 data_dir: Path, args: Sequence[str]):
        self.lab = lab
        self.node = node
        self.plugin = plugin
        self.name = name
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir.with_suffix(".log")
        self.argv = [str(TWISTD), "-n", "--pidfile=", plugin, "--data-dir", str(data_dir),
                     "--name", name, *args]
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "status.json").unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.process = self.lab.popen(
            self.node, self.argv, stdout=self._log, stderr=subprocess.STDOUT,
            env=environment(), cwd=REPO,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """
        Send C{sig} (SIGKILL after C{timeout} seconds) and wait for the exit.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code, self.process = self.process.returncode, None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill(self) -> None:
        """
        C{kill -9}: no goodbye to anyone.
        """
        self.stop(signal.SIGKILL)

    def status(self) -> dict:
        """
        The daemon's C{status.json} ({} while missing, partly written or
        left from an earlier process).
        """
        try:
            document = json.loads((self.data_dir / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        if self.process is None:
            return {}
        # twistd runs the daemon in the ip-netns-exec child (exec'd, same pid).
        if document.get("pid") not in (None, self.process.pid):
            return {}
        return document

    def online_peers(self) -> set[str]:
        return {p.get("name") or p.get("peer_id")
                for p in self.status().get("peers", []) if p.get("state") == "online"}

    def relays(self) -> list[dict]:
        """
        The live relay reservations the daemon lists in its status file
        (C{network_status[].relays.reservations}: relay id, address, live).
        """
        held = []
        for network in self.status().get("network_status", []):
            relays = network.get("relays") or {}
            held += [r for r in relays.get("reservations", []) if r.get("live", True)]
        return held

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"({self.log_path} missing)"
        tail = text.splitlines()[-lines:]
        return f"--- {self.name} log ({self.log_path}), last {len(tail)} lines:\n" + "\n".join(tail)

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise MatrixError(f"{self.name} exited with {self.process.returncode}\n"
                              + self.log_tail())


class _LiveProcess:
    """
    A process whose stdout lines are read by a thread and queued with the
    time they were read.
    """

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put((time.monotonic(), raw.rstrip("\n")))
        self.lines.put(None)

    def next_line(self, deadline: float) -> tuple[float, str] | None:
        """
        The next line, or None when the process ended or the deadline passed.
        """
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            item = self.lines.get(timeout=left)
        except queue.Empty:
            return None
        if item is None:
            self.lines.put(None)
            return None
        self.seen.append(item)
        return item

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(timeout=5)
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        return stderr

    def transcript(self, last: int = 20) -> str:
        return "\n".join(line for _, line in self.seen[-last:])


# -- the lab -----------------------------------------------------------------------


class MatrixLab:
    """
    The matrix topology with its daemons; see the module docstring.

    @param nat_types: the initiator and target NAT types to build.
    @param base_dir: where data directories and logs go (default: a new
        temporary directory, removed by L{down} unless C{keep}).
    @param log: called with one line of progress at a time.
    """

    def __init__(self, nat_types: Sequence[str] = NAT_TYPES, base_dir: str | Path | None = None,
                 prefix: str = "ommx", relays: int = 2, keep: bool = False,
                 log: Callable[[str], None] | None = None, variant: str = "home"):
        for t in nat_types:
            if t not in NAT_TYPES:
                raise ValueError(f"unknown NAT type {t!r}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        self.variant = variant
        if not 1 <= relays <= len(RELAYS):
            raise ValueError(f"relays must be 1..{len(RELAYS)}")
        self.nat_types = tuple(nat_types)
        self.lab = Lab(prefix)
        self._own_base = base_dir is None
        self.base = Path(base_dir) if base_dir else None
        self.keep = keep
        self.log = log or (lambda line: None)
        self.relay_specs = RELAYS[:relays]
        self.relays: dict[str, Daemon] = {}
        self.targets: dict[str, Daemon] = {}
        self.target_hosts: dict[str, natlab.Host] = {}
        self.initiator_hosts: dict[str, natlab.Host] = {}
        self.invite: str | None = None
        self.wait_direct_supported: bool | None = None
        self._trial_counter = 0
        self._counter_lock = threading.Lock()

    # -- building -----------------------------------------------------------

    def __enter__(self) -> MatrixLab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def bootstrap(self) -> list[str]:
        """
        C{--bootstrap} values for every node: all relays.
        """
        return [f"{name}@{addresses[0]}:{RELAY_PORT}" for name, addresses in self.relay_specs]

    def relay_endpoints(self) -> dict[str, str]:
        """
        C{address:port} -> relay name.
        """
        return {f"{addresses[0]}:{RELAY_PORT}": name for name, addresses in self.relay_specs}

    def up(self, timeout: float = 60.0) -> MatrixLab:
        """
        Build the lab, start the relays and the targets and wait until every
        target is online at every relay and every relay at every target.
        """
        started = time.monotonic()
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="omerta-matrix-"))
        self.base.mkdir(parents=True, exist_ok=True)
        relay_nodes = {}
        for name, addresses in self.relay_specs:
            relay_nodes[name] = self.lab.add_server(name, addresses)
        for nat_type in self.nat_types:
            short = SHORT[nat_type]
            router = None
            for role in ("t", "i"):
                if nat_type != "none" and (router is None or self.variant != "same-lan"):
                    router = self._add_router(f"{role}_{short}", nat_type)
                host = self.lab.add_host(f"{role}_{short}", behind=router)
                (self.target_hosts if role == "t" else self.initiator_hosts)[nat_type] = host
        self.lab.up()
        self.log(f"lab {self.lab.tag} up ({len(self.lab.nodes)} namespaces),"
                 f" data in {self.base}")
        self._probe_cli()
        self._create_network()
        for (name, addresses), index in zip(self.relay_specs, range(len(self.relay_specs))):
            args = ["--interface", addresses[0], "--port", str(RELAY_PORT),
                    "--stun-alternate", addresses[1]]
            if index > 0:
                args += ["--invite", self.invite]
                for spec in self.bootstrap:
                    if not spec.startswith(name + "@"):
                        args += ["--bootstrap", spec]
            self.relays[name] = Daemon(self.lab, relay_nodes[name], "omerta-relay", name,
                                       self.base / name, args)
        for daemon in self.relays.values():
            daemon.start()
        for nat_type in self.nat_types:
            self.targets[nat_type] = self._target_daemon(nat_type)
            self.targets[nat_type].start()
        self.wait_ready(timeout)
        self.log(f"relays and {len(self.targets)} targets ready after"
                 f" {time.monotonic() - started:.1f} s")
        return self

    def _add_router(self, name: str, nat_type: str) -> natlab.Router:
        """
        The router of type C{nat_type} of one host, as the variant has it
        (see L{omerta.testing.matrix_results.VARIANTS}).
        """
        options = {}
        upstream = None
        if self.variant == "open-input":
            options.update(input_filter=False, isp=True)
        elif self.variant == "open-input-no-hop":
            options["input_filter"] = False
        elif self.variant == "short-timeout":
            options["mapping_timeout"] = 30
        elif self.variant == "double-nat":
            upstream = self.lab.add_nat(f"{name}_cgn", "port-restricted", input_filter=False,
                                        mapping_timeout=30, isp=True)
        return self.lab.add_nat(f"{name}_nat", nat_type, behind=upstream, **options)

    def pairs(self, initiators: Sequence[str] | None = None,
              targets: Sequence[str] | None = None) -> list[tuple[str, str]]:
        """
        The (initiator, target) pairs of a matrix run: every pair of the
        given types, or on one LAN (variant "same-lan") each type with
        itself.
        """
        initiators = list(initiators or self.nat_types)
        targets = list(targets or self.nat_types)
        return [(x, y) for x in initiators for y in targets
                if self.variant != "same-lan" or x == y]

    @staticmethod
    def _routers_of(host: natlab.Host) -> list[natlab.Router]:
        """A host's router, its upstream router and so on."""
        chain, router = [], host.router
        while router is not None:
            chain.append(router)
            router = router.upstream
        return chain

    def _target_daemon(self, nat_type: str) -> Daemon:
        args = ["--port", str(TARGET_PORT), "--invite", self.invite]
        for spec in self.bootstrap:
            args += ["--bootstrap", spec]
        return Daemon(self.lab, self.target_hosts[nat_type], "omerta-provider",
                      f"target-{nat_type}", self.base / f"target-{SHORT[nat_type]}", args)

    def _create_network(self) -> None:
        from omerta.crypto.identity import load_or_create_identity
        from omerta.networks import NetworkStore

        name, addresses = self.relay_specs[0]
        data_dir = self.base / name
        store = NetworkStore(data_dir)
        existing = [m for m in store.list() if m.name == NETWORK_NAME]
        if existing and existing[0].invite:
            self.invite = existing[0].invite
            return
        membership = store.create(load_or_create_identity(data_dir), NETWORK_NAME,
                                  f"{addresses[0]}:{RELAY_PORT}", now=time.time())
        self.invite = membership.invite

    def _probe_cli(self) -> None:
        """
        Does C{omerta mesh connect} take C{--wait-direct} yet?
        """
        result = subprocess.run(
            [sys.executable, "-m", "omerta.app.cli", "mesh", "connect", "--help"],
            capture_output=True, text=True, env=environment(), cwd=REPO, timeout=60,
        )
        self.wait_direct_supported = "--wait-direct" in result.stdout
        if not self.wait_direct_supported:
            self.log("omerta mesh connect has no --wait-direct yet: trials run without it")

    def daemons(self) -> list[Daemon]:
        return [*self.relays.values(), *self.targets.values()]

    def describe(self) -> str:
        return "\n".join(d.log_tail() for d in self.daemons())

    def _ready(self) -> bool:
        for daemon in self.daemons():
            daemon.check_alive()
        relay_names = set(self.relays)
        target_names = {d.name for d in self.targets.values()}
        for relay in self.relays.values():
            if not target_names | (relay_names - {relay.name}) <= relay.online_peers():
                return False
        for target in self.targets.values():
            status = target.status()
            if not relay_names <= target.online_peers():
                return False
            # NAT discovery done (its report is what peers use to pick a strategy)
            if "nat" in status and not status["nat"]:
                return False
        return True

    def wait_ready(self, timeout: float = 60.0) -> None:
        """
        Wait until every target is online at every relay and every relay
        at every target (and the relays at each other), and every target
        has its NAT discovery report.
        """
        def missing() -> str:
            lines = []
            for d in self.daemons():
                lines.append(f"{d.name} sees online: {sorted(map(str, d.online_peers()))}")
            return "\n".join(lines) + "\n" + self.describe()

        _wait(self._ready, timeout, "every target online at every relay", missing)

    def down(self) -> None:
        for daemon in self.daemons():
            try:
                daemon.stop(timeout=5)
            except Exception:
                pass
        self.lab.down()
        if self._own_base and not self.keep and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- running the CLI ------------------------------------------------------

    def _trial_dir(self, label: str) -> Path:
        with self._counter_lock:
            self._trial_counter += 1
            n = self._trial_counter
        path = self.base / "cli" / f"{n:05d}-{label}"
        path.mkdir(parents=True)
        return path

    def cli_argv(self, data_dir: Path, *args: str) -> list[str]:
        argv = [sys.executable, "-m", "omerta.app.cli", "--data-dir", str(data_dir), *args,
                "--invite", self.invite]
        for spec in self.bootstrap:
            argv += ["--bootstrap", spec]
        return argv

    def set_loss(self, pct: int) -> None:
        """
        C{pct} percent random loss on every router of the lab.
        """
        for router in self.lab.routers:
            self.lab.set_loss(router, pct)

    def forget(self, initiator: str, target: str) -> None:
        """
        Make the NATs between an initiator host and a target forget each
        other: flush the initiator's router entirely (only the thread of
        this initiator uses it), and on the target's router delete the
        conntrack entries to and from the initiator's public address and,
        for a restricted cone, the (address, port) permissions for it.
        Other initiators' state on the target's router is left alone, so
        trials of other pairs running at the same time are not disturbed.
        """
        host = self.initiator_hosts[initiator]
        target_routers = self._routers_of(self.target_hosts[target])
        if self.variant == "same-lan":
            # the router is the target's too: forget only the initiator host
            for router in target_routers:
                self._forget_remote(router, host.address)
            return
        for router in self._routers_of(host):
            self.lab.flush_conntrack(router)
        for router in target_routers:
            self._forget_remote(router, host.public_address)

    def _forget_remote(self, router: natlab.Router, remote: str) -> None:
        """
        Delete C{router}'s conntrack entries to and from C{remote} and, for
        a restricted cone, its (address, port) permissions for it.
        """
        for flag in ("--orig-src", "--orig-dst"):
            # exit status 1 when nothing matched
            self.lab.run(router, ["conntrack", "-D", flag, remote])
        if router.nat_type == "restricted-cone":
            listing = self.lab.run(router, ["nft", "list", "set", "ip", natlab.NFT_TABLE,
                                            "contacted"]).stdout
            ports = re.findall(rf"\b{re.escape(remote)} \. (\d+)", listing)
            for port in sorted(set(ports)):
                self.lab.run(router, ["nft", "delete", "element", "ip", natlab.NFT_TABLE,
                                      "contacted", f"{{ {remote} . {port} }}"])

    def run_trial(self, initiator: str, target: str, wait_direct: float = 10.0,
                  timeout: float = 20.0, flush: bool = True) -> Trial:
        """
        One C{omerta mesh connect target-TARGET} from a fresh CLI node on
        the initiator host of type C{initiator}.  With C{flush}, the
        initiator's router forgets its mappings first (only this trial's
        thread uses that router).
        """
        host = self.initiator_hosts[initiator]
        if flush:
            self.forget(initiator, target)
        data_dir = self._trial_dir(f"{SHORT[initiator]}-{SHORT[target]}")
        args = ["--output", "json", "mesh", "connect", f"target-{target}",
                "--timeout", f"{timeout:g}"]
        if self.wait_direct_supported:
            args += ["--wait-direct", f"{wait_direct:g}"]
        argv = self.cli_argv(data_dir, *args)
        started = time.monotonic()
        try:
            result = self.lab.run(host, argv, env=environment(), cwd=REPO,
                                  timeout=timeout + wait_direct + 30)
        except subprocess.TimeoutExpired:
            return Trial(initiator, target, False, wall_s=time.monotonic() - started,
                         error=f"the CLI did not exit within {timeout + wait_direct + 30:g} s")
        wall = time.monotonic() - started
        (data_dir / "stdout").write_text(result.stdout)
        (data_dir / "stderr").write_text(result.stderr)
        if result.returncode != 0:
            message = result.stderr.strip().splitlines()
            return Trial(initiator, target, False, wall_s=wall,
                         error=f"exit {result.returncode}: "
                               + (message[-1] if message else "(no message)"))
        try:
            document = json.loads(result.stdout)
        except json.JSONDecodeError as e:
            return Trial(initiator, target, False, wall_s=wall,
                         error=f"output is not JSON ({e}): {result.stdout[:200]!r}")
        timings = document.get("timings") or {}
        return Trial(
            initiator, target, True,
            kind=document.get("kind"),
            first_message_s=timings.get("first_message_s"),
            direct_s=timings.get("direct_s"),
            punch_attempts=timings.get("punch_attempts"),
            rtt_ms=document.get("rtt_ms"),
            wall_s=wall,
            document=document,
        )

    def run_matrix(self, trials: int = 10, loss: int = 0,
                   initiators: Sequence[str] | None = None,
                   targets: Sequence[str] | None = None,
                   wait_direct: float = 10.0, timeout: float = 20.0,
                   progress: Callable[[Trial], None] | None = None) -> list[PairResult]:
        """
        Every pair of L{pairs} C{trials} times, with C{loss} percent
        random loss on every router (reset to 0 afterwards).  One thread per
        initiator host runs the rounds: in each round, each target once.

        @return: one L{PairResult} per pair, in L{NAT_TYPES} order.
        """
        pairs = self.pairs(initiators, targets)
        results = {(x, y): PairResult(x, y, loss, variant=self.variant) for x, y in pairs}
        lock = threading.Lock()
        errors: list[BaseException] = []

        def worker(x: str) -> None:
            try:
                for _ in range(trials):
                    for y in [y for i, y in pairs if i == x]:
                        trial = self.run_trial(x, y, wait_direct=wait_direct, timeout=timeout)
                        with lock:
                            results[(x, y)].trials.append(trial)
                        if progress is not None:
                            progress(trial)
            except BaseException as e:  # reported after the join
                errors.append(e)

        self.set_loss(loss)
        try:
            threads = [threading.Thread(target=worker, args=(x,), name=f"matrix-{x}")
                       for x in dict.fromkeys(x for x, _ in pairs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self.set_loss(0)
        if errors:
            raise errors[0]
        return [results[pair] for pair in pairs]

    # -- failover ------------------------------------------------------------------

    def _start_ping(self, initiator: str, target: str, interval: float,
                    reply_timeout: float, count: int = 100000,
                    timeout: float = 20.0) -> _LiveProcess:
        host = self.initiator_hosts[initiator]
        data_dir = self._trial_dir(f"ping-{SHORT[initiator]}-{SHORT[target]}")
        argv = self.cli_argv(data_dir, "mesh", "ping", f"target-{target}",
                             "--count", str(count), "--interval", f"{interval:g}",
                             "--reply-timeout", f"{reply_timeout:g}", "--timeout", f"{timeout:g}")
        proc = self.lab.popen(host, [*argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(environment(), PYTHONUNBUFFERED="1"),
                              cwd=REPO)
        return _LiveProcess(proc)

    @staticmethod
    def _events_until(live: _LiveProcess, done: Callable[[list[PingEvent]], bool],
                      timeout: float, events: list[PingEvent]) -> bool:
        """
        Read ping lines into C{events} until C{done(events)} or the deadline.
        """
        deadline = time.monotonic() + timeout
        while not done(events):
            item = live.next_line(deadline)
            if item is None:
                return done(events)
            event = parse_ping_line(item[1], item[0])
            if event is not None:
                events.append(event)
        return True

    def _wait_relays_held(self, target: Daemon, count: int, timeout: float) -> list:
        try:
            return _wait(lambda: len(target.relays()) >= count and target.relays(), timeout,
                         f"{target.name} to list {count} relays in its status file")
        except MatrixError:
            return target.relays()

    def restart_relay(self, name: str, timeout: float = 60.0) -> None:
        """
        Start relay C{name} again (same data directory, so the same
        identity) and wait until the lab is ready again.
        """
        daemon = self.relays[name]
        daemon.stop()
        daemon.start()
        self.wait_ready(timeout)

    def failover_relay(self, initiator: str = "symmetric", target: str = "symmetric",
                       interval: float = 0.2, reply_timeout: float = 1.0,
                       steady_replies: int = 5, recovery_deadline: float = 30.0,
                       after_replies: int = 5) -> FailoverResult:
        """
        A long ping from C{initiator} to the target behind C{target}; after
        C{steady_replies} replies, kill -9 the relay the path goes through
        and measure until a reply arrives again (through the other relay).
        The killed relay is started again afterwards.
        """
        result = FailoverResult("relay", initiator, target, "kill -9 the relay in use")
        target_daemon = self.targets[target]
        held = self._wait_relays_held(target_daemon, 2, 20.0)
        names = sorted(self.relay_endpoints().get(r.get("address"), str(r.get("address")))
                       for r in held)
        result.notes.append(f"target holds reservations on: {', '.join(names) or 'none'}")
        result.relays_held = len(held)
        live = self._start_ping(initiator, target, interval, reply_timeout)
        events: list[PingEvent] = []
        killed = None
        try:
            if not self._events_until(
                    live, lambda ev: sum(e.replied for e in ev) >= steady_replies, 40.0, events):
                raise MatrixError(f"no {steady_replies} replies from target-{target} before the"
                                  f" kill:\n{live.transcript()}\n{live.stop()}")
            before = [e for e in events if e.replied][-1]
            result.before = before
            endpoints = self.relay_endpoints()
            killed = endpoints.get(before.endpoint)
            if killed is None and before.via:
                for name, relay in self.relays.items():
                    if relay.status().get("peer_id", "").startswith(before.via[:16]):
                        killed = name
            if killed is None:
                via = self._via_from_status(target_daemon)
                if via is not None:
                    killed = via
                    result.notes.append(f"relay in use taken from the target's status: {via}")
            if killed is None:
                raise MatrixError(
                    f"cannot tell which relay the path uses: last reply {before.kind}"
                    f" {before.endpoint} is no relay endpoint ({endpoints}) and the target's"
                    f" status names none:\n{live.transcript()}")
            result.action = f"kill -9 {killed}"
            self.relays[killed].kill()
            broke = time.monotonic()
            count_before = len(events)
            recovered = self._events_until(
                live, lambda ev: any(e.replied and e.at > broke for e in ev[count_before:]),
                recovery_deadline, events)
            after_events = events[count_before:]
            result.lost = sum(1 for e in after_events if not e.replied)
            if recovered:
                first = next(e for e in after_events if e.replied)
                result.after = first
                result.recovery_s = first.at - broke
                result.gap_s = first.at - before.at
                # a few more replies to see the path settle
                self._events_until(
                    live, lambda ev: sum(e.replied for e in ev[count_before:]) >= after_replies,
                    after_replies * (interval + reply_timeout) + 5, events)
                result.kinds_after = [f"{e.kind} {e.endpoint}" for e in events[count_before:]
                                      if e.replied]
                result.ok = True
            else:
                result.notes.append(f"no reply within {recovery_deadline:g} s of the kill;"
                                    f" transcript:\n{live.transcript()}")
                # what the target and the surviving relays saw
                result.notes.append("\n".join(
                    [target_daemon.log_tail(40)]
                    + [relay.log_tail(25) for name, relay in self.relays.items()
                       if name != killed]))
        finally:
            stderr = live.stop()
            if stderr.strip() and not result.ok:
                result.notes.append("ping stderr: " + stderr.strip()[-300:])
            if killed is not None:
                restarted = time.monotonic()
                try:
                    self.restart_relay(killed)
                except MatrixError as e:
                    result.restart_error = str(e)
                    result.notes.append(f"{killed} restarted, but the lab was not whole again"
                                        f" within 60 s: {str(e).splitlines()[0]}")
                else:
                    result.notes.append(f"{killed} restarted; every target online at every"
                                        f" relay again after {time.monotonic() - restarted:.1f} s")
        return result

    def _via_from_status(self, target: Daemon) -> str | None:
        """
        The relay of the target's first live reservation (by address).
        """
        endpoints = self.relay_endpoints()
        for reservation in target.relays():
            name = endpoints.get(reservation.get("address"))
            if name is not None:
                return name
        return None

    def failover_conntrack(self, initiator: str = "port-restricted",
                           target: str = "restricted-cone", flush: str = "target",
                           interval: float = 0.2, reply_timeout: float = 1.0,
                           steady_replies: int = 5, direct_deadline: float = 30.0,
                           recovery_deadline: float = 30.0, remap: bool = False
                           ) -> FailoverResult:
        """
        A long ping over a direct path from C{initiator} to the target behind
        C{target}; after C{steady_replies} direct replies, flush the
        conntrack table (and cone map/set) of the C{flush} side's router
        ("target" or "initiator"), with C{remap} also moving its hosts'
        mappings to new outside ports (L{natlab.Lab.remap}), and measure
        until a reply arrives again and until one arrives over a direct
        path.
        """
        host = (self.target_hosts if flush == "target" else self.initiator_hosts)[
            target if flush == "target" else initiator]
        if host.router is None:
            raise ValueError(f"the {flush} side ({host.name}) has no router to flush")
        case, action = ("remap", "new outside ports on") if remap else (
            "conntrack", "flush conntrack of")
        result = FailoverResult(case, initiator, target,
                                f"{action} {host.router.name} ({flush} side)")
        live = self._start_ping(initiator, target, interval, reply_timeout)
        events: list[PingEvent] = []
        try:
            def steady(ev):
                recent = [e for e in ev if e.replied][-steady_replies:]
                return (len(recent) == steady_replies
                        and all(e.kind in DIRECT_KINDS for e in recent))

            if not self._events_until(live, steady, direct_deadline, events):
                raise MatrixError(
                    f"no {steady_replies} direct replies in a row from target-{target} within"
                    f" {direct_deadline:g} s, nothing to break:\n{live.transcript()}"
                    f"\n{live.stop()}")
            result.before = [e for e in events if e.replied][-1]
            (self.lab.remap if remap else self.lab.flush_conntrack)(host.router)
            broke = time.monotonic()
            count_before = len(events)

            def direct_again(ev):
                return any(e.replied and e.kind in DIRECT_KINDS for e in ev[count_before:])

            recovered = self._events_until(live, direct_again, recovery_deadline, events)
            after_events = events[count_before:]
            result.lost = sum(1 for e in after_events if not e.replied)
            replies = [e for e in after_events if e.replied]
            if replies:
                result.after = replies[0]
                result.recovery_s = replies[0].at - broke
                result.gap_s = replies[0].at - result.before.at
            result.kinds_after = [f"{e.kind} {e.endpoint}" for e in replies][:10]
            if recovered:
                direct = next(e for e in replies if e.kind in DIRECT_KINDS)
                result.direct_again_s = direct.at - broke
                result.ok = True
            else:
                result.notes.append(f"no direct reply within {recovery_deadline:g} s of the"
                                    f" flush; transcript:\n{live.transcript()}")
        finally:
            stderr = live.stop()
            if stderr.strip() and not result.ok:
                result.notes.append("ping stderr: " + stderr.strip()[-300:])
            if remap:
                # the next case finds the router keeping ports again
                self.lab.restore_ports(host.router)
        return result
