#!/usr/bin/env python3
"""
Command-line latency on loopback: the wall time of whole `omerta` processes
through a running node (`omerta up`, the control socket) next to the same
commands as a short-lived node of their own (no running node on the data
directory), measured in the same run.

    .venv/bin/python scripts/bench/cli.py [--runs 7]

Set up: a relay and a provider (`twistd omerta-relay`, `twistd
omerta-provider`, libvirt's test driver) on 127.0.0.1; consumer A runs its
node with `omerta up`, consumer B has no node.  Each holds one VM (asked for
before timing), so `vm list --refresh` asks the provider.  Each command runs
--runs times per side; printed: min/median/max seconds and the ratio of the
medians.  Everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the installed console script (as a person runs it), importing this checkout
OMERTA = [str(Path(sys.executable).with_name("omerta"))]
TWISTD = str(Path(sys.executable).with_name("twistd"))
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def omerta(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*OMERTA, "--data-dir", str(data_dir), *args], capture_output=True,
                            text=True, env=ENV, cwd=REPO, timeout=120)
    if check and result.returncode != 0:
        raise SystemExit(f"omerta {' '.join(args)} failed: {result.stderr}")
    return result


def timed(data_dir: Path, args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        omerta(data_dir, *args)
        times.append(time.perf_counter() - started)
    return times


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="omerta-bench-cli-"))
    os.chmod(base, 0o700)
    daemons = []
    relay_dir, provider_dir, a_dir, b_dir = (base / n for n in ("relay", "provider", "a", "b"))
    try:
        relay_port, provider_port = free_port(), free_port()
        omerta(relay_dir, "network", "create", "--name", "bench",
               "--endpoint", f"127.0.0.1:{relay_port}")
        invite = json.loads(omerta(relay_dir, "--output", "json", "network", "show",
                                   "--id", "bench").stdout)["invite"]
        for plugin, data_dir, port, extra in (
                ("omerta-relay", relay_dir, relay_port, ["--name", "relay"]),
                ("omerta-provider", provider_dir, provider_port,
                 ["--name", "provider-1", "--invite", invite, "--vm-cpus", "4"])):
            log = open(base / f"{plugin}.log", "ab")
            daemons.append(subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", plugin, "--data-dir", str(data_dir),
                 "--interface", "127.0.0.1", "--port", str(port), "--nat-interval", "0", *extra],
                stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO))

        def relay_sees_provider() -> bool:
            try:
                status = json.loads((relay_dir / "status.json").read_text())
            except (OSError, ValueError):
                return False
            return any(p["name"] == "provider-1" and p["state"] == "online"
                       for p in status.get("peers", []))

        wait_for(relay_sees_provider, "the relay to see the provider")
        omerta(a_dir, "up", "--invite", invite, "--interface", "127.0.0.1", "--port", "0")
        omerta(b_dir, "network", "join", "--key", invite)
        for data_dir in (a_dir, b_dir):
            omerta(data_dir, "vm", "request", "--peer", "provider-1", "--memory", "64")
        commands = [["mesh", "peers"], ["vm", "list", "--refresh"]]
        print(f"omerta command wall time on loopback, {args.runs} runs each"
              f" (relay, provider, consumer node), {os.cpu_count()} CPU(s)\n")
        print(f"{'command':24} {'through the running node (s)':>30} {'short-lived node (s)':>24}"
              f" {'ratio':>7}")
        for command in commands:
            fast = timed(a_dir, command, args.runs)
            slow = timed(b_dir, command, args.runs)
            ratio = statistics.median(slow) / statistics.median(fast)
            print(f"{' '.join(command):24} {_stats(fast):>30} {_stats(slow):>24} {ratio:>6.1f}x")
        print("\n(min/median/max; ratio = short-lived median / running-node median)")
    finally:
        omerta(a_dir, "vm", "release", "--all", check=False)
        omerta(b_dir, "vm", "release", "--all", check=False)
        omerta(a_dir, "down", check=False)
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(timeout=15)
        shutil.rmtree(base, ignore_errors=True)


def _stats(times: list[float]) -> str:
    return f"{min(times):.3f}/{statistics.median(times):.3f}/{max(times):.3f}"


if __name__ == "__main__":
    main()
