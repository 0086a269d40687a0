#!/usr/bin/env python3
"""
Mesh ping latency on loopback, next to what bare Python does on the same
loopback in the same run.

 1. Two real nodes as the tests run them (L{tests.integration}): C{twistd -n
    omerta-relay} (it creates the network) and C{twistd -n omerta-node}
    (it joins with the invite), both on 127.0.0.1, NAT discovery off, the
    code of this checkout (C{PYTHONPATH}).
 2. C{omerta mesh ping} through the member's running node (its control
    API, as a person types it): C{--count N --interval SECONDS}; the round
    trips are the node's own figures (C{--output json}).
 3. The reference: a bare Python UDP echo (C{socket}, blocking, in a
    process of its own), the request as large as a mesh PING frame and the
    answer as large as a PONG, the same count and the same interval (an
    idle process wakes up slower than a busy one: the interval counts).
    Its round trip is timed as the node times a ping: from the clock read
    just before C{sendto} to the kernel's receive timestamp of the answer
    (C{SIOCGSTAMPNS}, as ping(8)); and, for comparison, the usual way, to
    when C{recvfrom} returned.

    .venv/bin/python scripts/bench/mesh_ping.py [--count 200] [--interval 0.05]
        [--json]

Prints p50/p95/p99 of each and the ratio of the mesh ping to the echo timed
the same way.  Nothing leaves 127.0.0.1.  Progress goes to stderr; the table
(or JSON with --json) to stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from omerta.crypto.identity import load_or_create_identity  # noqa: E402
from omerta.networks import NetworkStore  # noqa: E402

HOST = "127.0.0.1"
TWISTD = Path(sys.executable).with_name("twistd")
MAIN = "import sys; from omerta.app.cli import main; sys.exit(main(sys.argv[1:]))"
PING_FRAME = 193
"""Bytes of a contact-free mesh PING frame (padded to the size of a challenge)."""
PONG_FRAME = 112
"""Bytes of a contact-free PONG frame without a proof."""
SIOCGSTAMPNS = 0x8907
"""Linux: the kernel's receive time (wall clock) of the last datagram read."""

ECHO_SERVER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 0))
print(sock.getsockname()[1], flush=True)
answer = bytes(int(sys.argv[2]))
while True:
    data, peer = sock.recvfrom(2048)
    if data == b"stop":
        break
    sock.sendto(answer, peer)
"""


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "omerta"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes under omerta/" if dirty else "")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


def summary(values: list[float]) -> dict:
    return {"n": len(values), **{f"p{p}_ms": round(percentile(values, p), 4)
                                 for p in (50, 95, 99)}}


def progress(text: str) -> None:
    sys.stderr.write(f"mesh_ping: {text}\n")
    sys.stderr.flush()


class Daemon:
    """One C{twistd -n PLUGIN} child with its log next to its data directory."""

    def __init__(self, plugin: str, data_dir: Path, *args: str):
        self.data_dir = data_dir
        self.log_path = data_dir.with_suffix(".log")
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", plugin, "--data-dir", str(data_dir), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=environment(), cwd=REPO)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def online_names(data_dir: Path) -> set:
    """The names of the peers a node's status file has online."""
    try:
        status = json.loads((data_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return set()
    return {p["name"] for p in status.get("peers", []) if p["state"] == "online"}


def wait_for(predicate, timeout: float, what: str) -> None:
    """Check C{predicate} every 0.1 s until it holds; RuntimeError after C{timeout}."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def omerta(*args: str, timeout: float) -> dict:
    """Run C{omerta --output json ARGS}; its JSON document."""
    result = subprocess.run([sys.executable, "-c", MAIN, "--output", "json", *args],
                            capture_output=True, text=True, env=environment(), cwd=REPO,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"omerta {' '.join(args)}: exit {result.returncode}\n"
                           f"{result.stderr}{result.stdout}")
    return json.loads(result.stdout)


def mesh_rtts(base: Path, count: int, interval: float) -> list[float]:
    """
    Start the two nodes, wait until the member sees the relay, ping it
    through the member's node; the round trips in ms.
    """
    relay_dir, member_dir = base / "relay", base / "member"
    port = free_udp_port()
    network = NetworkStore(relay_dir).create(
        load_or_create_identity(relay_dir), "bench", f"{HOST}:{port}", now=time.time())
    daemons = [Daemon("omerta-relay", relay_dir, "--name", "bench-relay", "--interface", HOST,
                      "--port", str(port), "--nat-interval", "0")]
    try:
        daemons.append(Daemon("omerta-node", member_dir, "--name", "bench-member",
                              "--interface", HOST, "--port", "0", "--nat-interval", "0",
                              "--invite", network.invite))
        progress("waiting for the member to see the relay online")
        wait_for(lambda: "bench-relay" in online_names(member_dir), 30,
                 "the member to see the relay online")
        ping = ("--data-dir", str(member_dir), "mesh", "ping", "bench-relay")
        omerta(*ping, "--count", "3", "--interval", "0.05", timeout=60)  # connected, warm
        progress(f"{count} mesh pings, {interval:g} s apart")
        wait = count * (interval + 0.01) + 10
        document = omerta(*ping, "--count", str(count), "--interval", str(interval),
                          "--timeout", str(round(wait)), timeout=wait + 30)
    except BaseException:
        for daemon in daemons:
            daemon.stop()
            progress(f"{daemon.log_path}:\n{daemon.log_path.read_text(errors='replace')[-3000:]}")
        raise
    for daemon in daemons:
        daemon.stop()
    replies = document["replies"]
    kinds = {r["kind"] for r in replies}
    if kinds != {"direct"}:
        raise RuntimeError(f"expected direct replies only, got {kinds}")
    return [r["rtt_ms"] for r in replies]


def kernel_stamp(sock: socket.socket) -> float:
    seconds, nanoseconds = struct.unpack(
        "@qq", fcntl.ioctl(sock.fileno(), SIOCGSTAMPNS, bytes(16)))
    return seconds + nanoseconds * 1e-9


def echo_rtts(count: int, interval: float) -> tuple[list[float], list[float]]:
    """
    The same count of round trips to a bare Python UDP echo in another
    process: a PING-sized request, a PONG-sized answer.  Two timings of
    each, in ms: to the kernel's receive stamp of the answer (as the node
    times a ping) and to the return of C{recvfrom}.
    """
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, HOST, str(PONG_FRAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST, 0))
        sock.settimeout(2.0)
        try:
            kernel_stamp(sock)  # switches the stamping on
        except OSError:
            pass
        request = bytes(PING_FRAME)
        stamped, returned = [], []
        for i in range(count + 3):
            if i:
                time.sleep(interval)
            started = time.time()
            sock.sendto(request, (HOST, port))
            sock.recvfrom(2048)
            back = time.time()
            if i >= 3:  # like the mesh pings, after a warm-up of three
                stamped.append((kernel_stamp(sock) - started) * 1000)
                returned.append((back - started) * 1000)
        sock.sendto(b"stop", (HOST, port))
        sock.close()
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return stamped, returned


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="pings (default 200)")
    parser.add_argument("--interval", type=float, default=0.05,
                        help="seconds between pings (default 0.05; omerta mesh ping's own"
                        " default is 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.count < 1 or not 0 < args.interval < 60:
        parser.error("--count must be >= 1 and --interval in (0, 60)")
    with tempfile.TemporaryDirectory(prefix="mesh_ping-") as base:
        mesh = mesh_rtts(Path(base), args.count, args.interval)
    progress(f"{args.count} bare UDP echoes, {args.interval:g} s apart")
    echo, echo_returned = echo_rtts(args.count, args.interval)
    result = {
        "code": code_version(),
        "count": args.count,
        "interval_s": args.interval,
        "mesh": summary(mesh),
        "echo": summary(echo),
        "echo_to_recvfrom": summary(echo_returned),
    }
    result["ratio"] = {key: round(result["mesh"][key] / result["echo"][key], 1)
                       for key in ("p50_ms", "p95_ms", "p99_ms")}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"code {result['code']}; {args.count} pings {args.interval:g} s apart on {HOST}")
    print(f"{'':36}{'p50':>10}{'p95':>10}{'p99':>10}")
    for label, key in (("mesh ping (ms)", "mesh"),
                       ("bare Python UDP echo (ms)", "echo"),
                       ("  the same, to recvfrom's return", "echo_to_recvfrom")):
        row = result[key]
        print(f"{label:36}" + "".join(f"{row[k]:10.3f}" for k in ("p50_ms", "p95_ms", "p99_ms")))
    print(f"{'ratio mesh / echo':36}" + "".join(
        f"{result['ratio'][k]:10.1f}" for k in ("p50_ms", "p95_ms", "p99_ms")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
