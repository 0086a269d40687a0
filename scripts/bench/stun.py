#!/usr/bin/env python3
"""
STUN server benchmark on loopback: binding requests per second and latency
percentiles for omerta's relay (a real `twistd omerta-relay` process, answering
on its mesh socket) and, in the same run, for coturn (`turnserver --stun-only`)
when it is installed.

    .venv/bin/python scripts/bench/stun.py [--seconds 5] [--window 64]

Throughput: one load process keeps --window requests outstanding on each of
--sockets client sockets for --seconds and counts the answers.  Latency: one
request at a time, --samples round trips.  The load generator is Python too,
so a figure that equals the generator's own ceiling (printed for a bare
Python UDP echo server in the same run) means "at least this much".
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from omerta.wire.stun import MessageClass, Method, StunMessage, build  # noqa: E402

BINDING = build(StunMessage(Method.BINDING, MessageClass.REQUEST, bytes(12)))


def request(tid: bytes) -> bytes:
    return BINDING[:8] + tid


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answering(port: int, deadline: float = 20.0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            s.sendto(request(os.urandom(12)), ("127.0.0.1", port))
            try:
                s.recvfrom(2048)
                return
            except socket.timeout:
                continue
    raise RuntimeError(f"nothing answers STUN on port {port}")


def throughput(port: int, seconds: float, window: int, sockets: int) -> float:
    selector = selectors.DefaultSelector()
    socks = []
    for _ in range(sockets):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        selector.register(s, selectors.EVENT_READ)
        socks.append(s)
    target = ("127.0.0.1", port)
    counter = 0
    for s in socks:
        for _ in range(window):
            counter += 1
            s.sendto(request(counter.to_bytes(12, "big")), target)
    answered = 0
    start = time.monotonic()
    end = start + seconds
    last_progress = start
    while True:
        now = time.monotonic()
        if now >= end:
            break
        events = selector.select(timeout=0.05)
        if not events and now - last_progress > 0.2:
            # lost requests: refill the window so the test keeps going
            for s in socks:
                for _ in range(window // 4 or 1):
                    counter += 1
                    s.sendto(request(counter.to_bytes(12, "big")), target)
            last_progress = now
        for key, _ in events:
            s = key.fileobj
            while True:
                try:
                    s.recvfrom(2048)
                except BlockingIOError:
                    break
                answered += 1
                counter += 1
                s.sendto(request(counter.to_bytes(12, "big")), target)
                last_progress = now
    elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    return answered / elapsed


def latency(port: int, samples: int) -> tuple[float, float]:
    rtts = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        for i in range(samples):
            tid = os.urandom(12)
            sent = time.perf_counter()
            s.sendto(request(tid), ("127.0.0.1", port))
            while True:
                try:
                    data, _ = s.recvfrom(2048)
                except socket.timeout:
                    break
                if data[8:20] == tid:
                    rtts.append(time.perf_counter() - sent)
                    break
    rtts.sort()
    p50 = statistics.median(rtts)
    p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
    return p50 * 1e6, p99 * 1e6


ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(data[:20], addr)
"""


def start_omerta(port: int, workdir: Path) -> subprocess.Popen:
    data_dir = workdir / "relay"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    venv_bin = Path(sys.executable).parent
    subprocess.run(
        [str(venv_bin / "omerta"), "--data-dir", str(data_dir), "network", "create",
         "--name", "bench"],
        check=True, env=env, capture_output=True,
    )
    return subprocess.Popen(
        [str(venv_bin / "twistd"), "-n", "--pidfile=", "omerta-relay", "--data-dir",
         str(data_dir), "--interface", "127.0.0.1", "--port", str(port),
         "--nat-interval", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def start_coturn(port: int, workdir: Path) -> subprocess.Popen | None:
    if shutil.which("turnserver") is None:
        return None
    return subprocess.Popen(
        ["turnserver", "-n", "-L", "127.0.0.1", f"--listening-port={port}", "--stun-only",
         "--no-cli", "--no-auth", "--log-file=stdout", "--simple-log",
         f"--pidfile={workdir / 'coturn.pid'}", "--no-tls", "--no-dtls"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sockets", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        servers = {
            "omerta relay": start_omerta,
            "coturn": start_coturn,
            "bare python echo": lambda port, _: subprocess.Popen(
                [sys.executable, "-c", ECHO, str(port)]
            ),
        }
        for name, start in servers.items():
            port = free_port()
            process = start(port, workdir)
            if process is None:
                results[name] = None
                continue
            try:
                wait_answering(port)
                rate = throughput(port, args.seconds, args.window, args.sockets)
                p50, p99 = latency(port, args.samples)
                results[name] = {"requests_per_s": round(rate), "p50_us": round(p50, 1),
                                 "p99_us": round(p99, 1)}
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"STUN binding requests on loopback ({args.seconds:g} s, window {args.window}"
          f" x {args.sockets} sockets; latency over {args.samples} sequential requests)")
    print(f"{'server':18} {'req/s':>10} {'p50 us':>9} {'p99 us':>9}")
    for name, r in results.items():
        if r is None:
            print(f"{name:18} {'not installed':>10}")
            continue
        print(f"{name:18} {r['requests_per_s']:>10} {r['p50_us']:>9} {r['p99_us']:>9}")
    ours, coturn = results.get("omerta relay"), results.get("coturn")
    if ours and coturn:
        print(f"omerta / coturn throughput ratio: {ours['requests_per_s'] / coturn['requests_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
