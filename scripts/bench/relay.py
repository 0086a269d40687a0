#!/usr/bin/env python3
"""
Relay data-path benchmark on loopback: packets/s and Mb/s through a real
omerta relay for 64 B and 1200 B datagrams, and round-trip time p50/p99
direct and relayed, next to bare forwarders measured in the same run.

    .venv/bin/python scripts/bench/relay.py [--seconds 5] [--samples 2000] [--json]

Everything is on 127.0.0.1.  How it is set up:

- The relay under test is a real `twistd -n omerta-relay` process, in a
  network made with `omerta network create`, started with --relay-rate and
  --relay-session-mb raised far above their defaults (4000 packets/s per
  source and 1 GiB per session would otherwise cap or end the load).
- Two real mesh nodes A and B run in this process (MeshNetwork, no NAT
  discovery, so both keep reservations on the relay).  Once A knows B's
  relayed path, A opens a session (RelayClient.open_session); the benchmark
  waits until A's route to B is that session and B has registered it.  Then
  the reactor is stopped and the nodes' two UDP sockets (the addresses the
  relay bound the session to) are taken over, duplicated, by a plain-socket
  load generator in this process.  Before each measurement and every 10 s
  within one, both nodes' reservations are renewed with a sealed
  RELAY_RESERVE from their own mesh objects, so the session outlives any
  --seconds.
- Throughput: A sends datagrams of SIZE bytes (64 and 1200, the 12-byte
  session header included) to the relay for --seconds, keeping up to
  --window (64) packets in flight, and B counts what arrives; both sockets
  are non-blocking and served by one loop (send a batch of at most 16, drain
  B).  The window keeps the sender just ahead of the forwarder, so the
  figure is its capacity and loss is real drops; --window 0 sends open loop,
  as fast as the generator can, which overloads every forwarder (most of
  the load is then dropped at its socket, and contention for that socket
  can lower what gets through).  Reported: sent and received packets/s, Mb/s
  received (UDP payload bytes), loss.  The relay's own mesh chatter to A
  and B is filtered out.
- RTT: one 64 B datagram at a time, A -> relay -> B, B echoes it with the same
  header B -> relay -> A; --samples round trips after a warm-up, measured
  twice.  "same CPU": the generator and the forwarder under test are pinned
  to one CPU and the generator sleeps in recv, a plain ping-pong of context
  switches, the steadiest figure and the one to read the ratio from.  "CPUs
  apart": one CPU each, the generator spinning, so every forwarded packet
  also costs a cross-CPU wake-up of the forwarder; on a VM that wake-up
  (an IPI to a halted vCPU) can dominate and differs between processes in
  ways this script does not control.  "direct" is the same ping-pong A <-> B
  with no forwarder.
- References, measured with the identical generator and the same two sockets,
  each a separate process: a bare Python socket forwarder (recvfrom/sendto
  loop forwarding A's datagrams to B and B's to A), a bare Twisted
  DatagramProtocol forwarder using transport.write (Port.write re-validates
  the address on every call), and the same using the socket's sendto (what
  the omerta relay's fast path does).  "direct" also gets a throughput run:
  A straight to B, the generator's own ceiling.  A forwarder figure close to
  that ceiling means "at least this much".
- All forwarders run for the whole measurement, idle (blocked in recvfrom or
  epoll) except while measured; the measurements are interleaved (64 B for
  every row, then 1200 B, then RTT) so that a noisy neighbour does not land
  on one row only.

For throughput the scheduler places the processes unless --pin puts the
generator on the first CPU and the forwarder on the second.  Each figure is
measured once per invocation; the ratios come from one run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
if (VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != VENV.resolve():
    os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), *sys.argv])
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

LOOPBACK = "127.0.0.1"
SIZES = (64, 1200)
BATCH = 16
STALL = 0.25  # seconds without progress before the packets in flight count as lost
RENEW = 10.0  # seconds between renewals of the reservations (the relay grants 120)
RELAY_RATE = 10_000_000
RELAY_SESSION_MB = 1_000_000

BARE_FORWARDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
a = ("127.0.0.1", int(sys.argv[2]))
b = ("127.0.0.1", int(sys.argv[3]))
recvfrom, sendto = s.recvfrom, s.sendto
while True:
    data, addr = recvfrom(2048)
    if addr == a:
        sendto(data, b)
    elif addr == b:
        sendto(data, a)
"""

TWISTED_FORWARDER = """
import sys
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
a = ("127.0.0.1", int(sys.argv[2]))
b = ("127.0.0.1", int(sys.argv[3]))
use_socket = sys.argv[4] == "sendto"

class Forwarder(DatagramProtocol):
    noisy = False

    def startProtocol(self):
        self.send = self.transport.socket.sendto if use_socket else self.transport.write

    def datagramReceived(self, data, addr):
        if addr == a:
            self.send(data, b)
        elif addr == b:
            self.send(data, a)

reactor.listenUDP(int(sys.argv[1]), Forwarder(), interface="127.0.0.1")
reactor.run()
"""


REFERENCES = (
    ("bare socket forwarder", BARE_FORWARDER, "-"),
    ("twisted fwd (Port.write)", TWISTED_FORWARDER, "write"),
    ("twisted fwd (sock.sendto)", TWISTED_FORWARDER, "sendto"),
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def environment() -> dict:
    # The repository, not an installed copy of omerta, must be imported.
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def pin(pid: int, cpus) -> None:
    """
    Set the CPU affinity of every thread of C{pid} (0: this process).
    """
    pid = pid or os.getpid()
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def terminated(signum, frame):
    raise SystemExit(128 + signum)


def stop_process(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# the omerta side: a relay daemon and two mesh nodes holding a session through it


def start_relay(workdir: Path, port: int) -> tuple[subprocess.Popen, str, Path]:
    data_dir = workdir / "relay"
    venv_bin = Path(sys.executable).parent
    created = subprocess.run(
        [str(venv_bin / "omerta"), "--data-dir", str(data_dir), "--output", "json",
         "network", "create", "--name", "bench", "--endpoint", f"{LOOPBACK}:{port}"],
        check=True, env=environment(), capture_output=True, text=True,
    )
    invite = json.loads(created.stdout)["invite"]
    log_path = workdir / "relay.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [str(venv_bin / "twistd"), "-n", "--pidfile=", "omerta-relay", "--data-dir",
         str(data_dir), "--name", "relay", "--interface", LOOPBACK, "--port", str(port),
         "--nat-interval", "0", "--relay-rate", str(RELAY_RATE),
         "--relay-session-mb", str(RELAY_SESSION_MB)],
        env=environment(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    log.close()
    return process, invite, log_path


class RelayedPair:
    """
    Nodes A and B, in this process, with a relay session from A to B; after
    L{open} the reactor is stopped and C{a}/C{b} are plain sockets on the
    nodes' addresses.
    """

    def __init__(self, workdir: Path, invite: str, timeout: float):
        self.workdir = workdir
        self.invite = invite
        self.timeout = timeout
        self.meshes = []

    def open(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.defer import ensureDeferred
        from twisted.python.failure import Failure

        outcome = []

        def finish(result):
            outcome.append(result)
            reactor.stop()

        reactor.callWhenRunning(
            lambda: ensureDeferred(self._setup(reactor)).addBoth(finish))
        reactor.run()
        # The reactor's handlers would swallow Ctrl-C and SIGTERM from now on.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, terminated)
        if not outcome:
            raise RuntimeError("the reactor stopped before the relay session was set up")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()

    async def _setup(self, reactor) -> None:
        from twisted.internet.task import deferLater

        from omerta.mesh.network import MeshNetwork

        async def wait(predicate, what, action=None, every=1.0):
            deadline = reactor.seconds() + self.timeout
            next_action = reactor.seconds()
            while not predicate():
                now = reactor.seconds()
                if now >= deadline:
                    raise RuntimeError(f"timed out after {self.timeout:g} s waiting for {what}")
                if action is not None and now >= next_action:
                    action()
                    next_action = now + every
                await deferLater(reactor, 0.05, lambda: None)

        for name in ("a", "b"):
            mesh = MeshNetwork(self.workdir / name, invites=[self.invite], name=f"bench-{name}",
                               port=0, interface=LOOPBACK, nat_interval=0, reactor=reactor)
            await mesh.start()
            self.meshes.append(mesh)
        a, b = self.meshes
        a_ov, b_ov = a.overlay(), b.overlay()
        self.b_id = b.node.peer_id
        await wait(lambda: any(h.live for h in b_ov.relays.held.values())
                   and any(h.live for h in a_ov.relays.held.values()),
                   "both nodes to hold a reservation on the relay")
        await wait(lambda: a_ov.relays.can_open(self.b_id),
                   "A to learn B's relayed path")

        def session_ready():
            route = a_ov.relays.route_to(self.b_id)
            return route is not None and route.header in b.node.relay_routes

        await wait(session_ready, "a relay session from A to B",
                   action=lambda: a_ov.relays.open_session(self.b_id))
        self.route = a_ov.relays.route_to(self.b_id)
        if self.route.host != LOOPBACK:
            raise RuntimeError(f"relay route on {self.route.host}, not loopback")
        self.header = self.route.header
        self.relay_address = self.route.relay_address
        # Take the sockets over: Twisted stops reading them, we read duplicates.
        self.sockets = []
        for mesh in self.meshes:
            port = mesh.service.port
            port.stopReading()
            self.sockets.append(socket.fromfd(port.socket.fileno(), socket.AF_INET,
                                              socket.SOCK_DGRAM))
        self.a, self.b = self.sockets
        self.a_address = self.a.getsockname()
        self.b_address = self.b.getsockname()

    def renew(self) -> None:
        """
        Renew both reservations (a session ends with either), sealed by the
        nodes' own mesh objects and sent on their sockets; the relay's
        answers are drained with the rest of its chatter.  Called before
        every measurement and every L{RENEW} seconds within one.
        """
        from omerta.wire.messages import MessageType

        self.due = time.monotonic() + RENEW
        for mesh in self.meshes:
            overlay = mesh.overlay()
            for held in overlay.relays.held.values():
                overlay.send(held.address, MessageType.RELAY_RESERVE,
                             lifetime_s=overlay.config.reserve_lifetime)


def ratio(x, y):
    return round(x / y, 2) if x is not None and y else None


def relay_status(path: Path, after: float, timeout: float = 6.0) -> dict | None:
    """
    The relay's own account of the session (its status.json, written every
    2 s), once written after C{after}.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            document = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            document = {}
        if document.get("updated_at", 0) >= after and document.get("relay"):
            sessions = document["relay"]["sessions"]
            return {
                "sessions": len(sessions),
                "forwarded_packets": sum(s["packets"] for s in sessions),
                "rate_limited": sum(s["rate_limited"] for s in sessions),
            }
        time.sleep(0.2)
    return None


# the load generator


def drain(*socks) -> None:
    for s in socks:
        s.setblocking(False)
        while True:
            try:
                s.recv(4096)
            except BlockingIOError:
                break


def check_path(a, b, target, prefix: bytes, deadline: float = 10.0) -> None:
    """
    Wait until a datagram from A to C{target} arrives at B.
    """
    drain(a, b)
    probe = prefix + b"probe"
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        a.sendto(probe, target)
        ready, _, _ = select.select([b], [], [], 0.1)
        while ready:
            try:
                data = b.recv(4096)
            except BlockingIOError:
                break
            if data == probe:
                drain(a, b)
                return
    raise RuntimeError(f"nothing sent to {target[0]}:{target[1]} reaches B")


def throughput(a, b, target, prefix: bytes, size: int, seconds: float,
               window: int | None, keepalive) -> dict:
    """
    A sends SIZE-byte datagrams to C{target} for C{seconds}, B counts those
    that start with C{prefix}.
    """
    drain(a, b)
    payload = prefix + bytes(size - len(prefix))
    plen = len(prefix)
    a_send, b_recv, clock = a.sendto, b.recv, time.perf_counter
    sent = received = written_off = 0
    send_errors = stalls = 0
    start = now = clock()
    end = start + seconds
    last_count, last_change = 0, start
    next_renewal = start + RENEW
    while now < end:
        if now >= next_renewal:
            keepalive()
            next_renewal = now + RENEW
        n = BATCH
        if window is not None:
            n = min(BATCH, window - (sent - received - written_off))
            if received != last_count:
                last_count, last_change = received, now
            elif n <= 0 and now - last_change > STALL:
                written_off = sent - received  # lost: refill the window
                last_change = now
                stalls += 1
        for _ in range(n):
            try:
                a_send(payload, target)
            except (BlockingIOError, ConnectionRefusedError):
                send_errors += 1
                break
            sent += 1
        while True:
            try:
                data = b_recv(2048)
            except BlockingIOError:
                break
            if data[:plen] == prefix:
                received += 1
        now = clock()
    elapsed = now - start
    in_time = received
    # stragglers still in the forwarder's queue count against loss, not rate
    quiet_until = clock() + 0.2
    while clock() < quiet_until:
        ready, _, _ = select.select([b], [], [], 0.05)
        while ready:
            try:
                data = b_recv(2048)
            except BlockingIOError:
                break
            if data[:plen] == prefix:
                received += 1
                quiet_until = clock() + 0.2
    return {
        "received": received,
        "sent_pps": round(sent / elapsed),
        "received_pps": round(in_time / elapsed),
        "mbps": round(in_time * size * 8 / elapsed / 1e6, 1),
        "loss_pct": round(100.0 * (1 - received / sent), 2) if sent else None,
        "send_errors": send_errors,
        "window_refills": stalls,
    }


def recv_matching(s, tag: bytes, busy: bool, timeout: float = 1.0) -> bool:
    """
    Wait for a datagram starting with C{tag}: busy-polling the non-blocking
    socket, or sleeping in recv.
    """
    recv, clock = s.recv, time.perf_counter
    deadline = clock() + timeout
    while True:
        try:
            data = recv(4096)
        except BlockingIOError:
            if clock() > deadline:
                return False
            if not busy:
                select.select([s], [], [], max(0.0, deadline - clock()))
            continue
        if data.startswith(tag):
            return True


def latency(a, b, a_target, b_target, prefix: bytes, samples: int, busy: bool,
            keepalive) -> dict:
    """
    Ping-pong: A -> a_target -> B, B -> b_target -> A, one at a time.
    """
    drain(a, b)
    rtts = []
    lost = delivered = 0
    warmup = min(200, max(10, samples // 10))
    clock = time.perf_counter
    next_renewal = clock() + RENEW
    for i in range(warmup + samples):
        if i % 256 == 0 and clock() >= next_renewal:
            keepalive()
            next_renewal = clock() + RENEW
        tag = prefix + i.to_bytes(4, "big")
        payload = tag + bytes(64 - len(tag))
        sent = clock()
        a.sendto(payload, a_target)
        if recv_matching(b, tag, busy):
            delivered += 1
            b.sendto(payload, b_target)
            if recv_matching(a, tag, busy):
                delivered += 1
                if i >= warmup:
                    rtts.append(clock() - sent)
                continue
        lost += 1
        if lost >= 10 and not rtts:
            break  # the path is dead: say so rather than wait a second per sample
    rtts.sort()
    return {
        "p50_us": round(statistics.median(rtts) * 1e6, 1) if rtts else None,
        "p99_us": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e6, 1)
        if rtts else None,
        "lost": lost,
        "received": delivered,
    }


# main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="length of each throughput run (default 5)")
    parser.add_argument("--samples", type=int, default=2000,
                        help="round trips per latency measurement (default 2000)")
    parser.add_argument("--window", type=int, default=64,
                        help="packets in flight from A (default 64: below what the"
                             " forwarder's default socket buffer holds); 0 sends as fast"
                             " as possible, open loop")
    parser.add_argument("--setup-timeout", type=float, default=60.0,
                        help="seconds to wait for the relay session (default 60)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the generator to CPU 0 and the forwarders to CPU 1")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    everywhere = set(cpus)
    apart = len(cpus) >= 2
    pinning = args.pin and apart

    def place(forwarder_pid, where):
        """
        "free": the scheduler decides (or --pin); "same": generator and
        forwarder share the first CPU; "apart": one CPU each.
        """
        if where == "free":
            generator, forwarder = ({cpus[0]}, {cpus[1]}) if pinning else (everywhere,) * 2
        elif where == "same":
            generator = forwarder = {cpus[0]}
        else:
            generator, forwarder = {cpus[0]}, {cpus[1]}
        pin(0, generator)
        if forwarder_pid is not None:
            pin(forwarder_pid, forwarder)

    results: dict = {}
    relay_view = None
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="omerta-bench-relay-") as tmp:
        workdir = Path(tmp)
        relay_port = free_port()
        relay, invite, relay_log = start_relay(workdir, relay_port)
        processes.append(relay)
        try:
            pair = RelayedPair(workdir, invite, args.setup_timeout)
            try:
                pair.open()
            except Exception:
                if relay_log.exists():
                    sys.stderr.write(relay_log.read_text(errors="replace")[-4000:])
                raise
            a, b = pair.a, pair.b
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            header = pair.header
            pair.renew()
            check_path(a, b, pair.relay_address, header)

            # The references: one process each, idle (blocked in recvfrom or
            # epoll) while another forwarder is measured.
            targets = {"omerta relay": (relay.pid, pair.relay_address, pair.relay_address)}
            for name, code, mode in REFERENCES:
                port = free_port()
                process = subprocess.Popen(
                    [sys.executable, "-c", code, str(port), str(pair.a_address[1]),
                     str(pair.b_address[1]), mode], env=environment())
                processes.append(process)
                check_path(a, b, (LOOPBACK, port), header)
                targets[name] = (process.pid, (LOOPBACK, port), (LOOPBACK, port))
            targets["direct (no forwarder)"] = (None, pair.b_address, pair.a_address)

            # Interleaved, so that a noisy neighbour spreads over all rows:
            # each metric for every forwarder in turn, each measured once.
            window = args.window or None
            metrics = ["64", "1200", "rtt"] + (["rtt_apart"] if apart else [])
            for metric in metrics:
                for name, (pid, to_b, to_a) in targets.items():
                    # The session lives as long as both reservations.
                    pair.renew()
                    if metric == "rtt":
                        # one CPU: a plain sleep/wake-up ping-pong
                        place(pid, "same")
                        value = latency(a, b, to_b, to_a, header + b"\xee", args.samples,
                                        busy=False, keepalive=pair.renew)
                    elif metric == "rtt_apart":
                        # two CPUs: the generator spins, the forwarder is woken
                        # from the other CPU
                        place(pid, "apart")
                        value = latency(a, b, to_b, to_a, header + b"\xef", args.samples,
                                        busy=True, keepalive=pair.renew)
                    else:
                        place(pid, "free")
                        size = int(metric)
                        value = throughput(a, b, to_b, header + bytes([size & 0xFF]), size,
                                           args.seconds, window, keepalive=pair.renew)
                    place(pid, "free")
                    results.setdefault(name, {})[metric] = value
            relay_view = relay_status(workdir / "relay" / "status.json", time.time())
        finally:
            for process in processes:
                stop_process(process)

    ours = results["omerta relay"]
    rtts = [m for m in ("rtt", "rtt_apart") if m in ours]

    def ratios(other: dict) -> dict:
        out = {
            "pps_64": ratio(ours["64"]["received_pps"], other["64"]["received_pps"]),
            "pps_1200": ratio(ours["1200"]["received_pps"], other["1200"]["received_pps"]),
        }
        for m in rtts:
            for p in ("p50", "p99"):
                out[f"{m}_{p}"] = ratio(ours[m][f"{p}_us"], other[m][f"{p}_us"])
        return out

    over_bare = ratios(results["bare socket forwarder"])
    over_twisted = ratios(results["twisted fwd (sock.sendto)"])
    delivered = sum(ours[m]["received"] for m in ("64", "1200", *rtts))
    settings = {
        "seconds": args.seconds, "samples": args.samples, "window": args.window,
        "throughput_pinned": pinning, "cpus": len(cpus), "relay_rate": RELAY_RATE,
        "relay_session_mb": RELAY_SESSION_MB,
    }
    if args.json:
        print(json.dumps({"settings": settings, "results": results,
                          "omerta_over_bare": over_bare,
                          "omerta_over_twisted_sendto": over_twisted,
                          "relay_status": relay_view}, indent=2))
        return 0

    load = ("as fast as it can, open loop" if not args.window
            else f"with up to {args.window} packets in flight")
    placement = ("generator on CPU 0, forwarder on CPU 1" if pinning
                 else "the scheduler places generator and forwarder")
    print(f"Relayed UDP on loopback, {len(cpus)} CPU(s).  Throughput: {args.seconds:g} s per"
          f" size, A sends {load}, {placement}.")
    print(f"RTT: {args.samples} ping-pongs of 64 B; 'same CPU': generator and forwarder"
          " pinned to one CPU, sleeping in recv;")
    print("'CPUs apart': one CPU each, the generator spinning (adds a cross-CPU wake-up"
          " per forwarded packet).")
    print("Sizes are whole UDP payloads, the 12-byte relay session header included;"
          " pkt/s and Mb/s are what B received.")
    print()

    def cell(r, m, key):
        value = r.get(m, {}).get(key)
        return "-" if value is None else str(value)

    print(f"{'':27} {'64 B':>19} {'1200 B':>20} {'RTT same CPU (us)':>19}"
          f" {'RTT CPUs apart (us)':>19}")
    print(f"{'forwarder':27} {'pkt/s':>9} {'Mb/s':>9} {'pkt/s':>10} {'Mb/s':>9}"
          f" {'p50':>9} {'p99':>9} {'p50':>9} {'p99':>9}")
    for name, r in results.items():
        print(f"{name:27} {cell(r, '64', 'received_pps'):>9} {cell(r, '64', 'mbps'):>9}"
              f" {cell(r, '1200', 'received_pps'):>10} {cell(r, '1200', 'mbps'):>9}"
              f" {cell(r, 'rtt', 'p50_us'):>9} {cell(r, 'rtt', 'p99_us'):>9}"
              f" {cell(r, 'rtt_apart', 'p50_us'):>9} {cell(r, 'rtt_apart', 'p99_us'):>9}")
    print()
    print(f"{'offered load and loss':27} {'sent 64B':>9} {'loss':>9} {'sent 1200B':>10}"
          f" {'loss':>9} {'RTT lost':>9}")
    for name, r in results.items():
        lost = sum(r[m]["lost"] for m in rtts)
        print(f"{name:27} {cell(r, '64', 'sent_pps'):>9} {cell(r, '64', 'loss_pct') + '%':>9}"
              f" {cell(r, '1200', 'sent_pps'):>10} {cell(r, '1200', 'loss_pct') + '%':>9}"
              f" {lost:>9}")
    print()
    for label, r in (("bare socket forwarder", over_bare),
                     ("twisted fwd (sock.sendto)", over_twisted)):
        line = (f"omerta relay / {label}: pkt/s and Mb/s {r['pps_64']} at 64 B,"
                f" {r['pps_1200']} at 1200 B; RTT p50/p99 {r['rtt_p50']}/{r['rtt_p99']}")
        if "rtt_apart_p50" in r:
            line += f" (same CPU), {r['rtt_apart_p50']}/{r['rtt_apart_p99']} (CPUs apart)"
        print(line)
    direct = results["direct (no forwarder)"]["rtt"]["p50_us"]
    bare = results["bare socket forwarder"]["rtt"]["p50_us"]
    if ours["rtt"]["p50_us"] is not None and bare is not None:
        print(f"on one CPU, relaying adds {ours['rtt']['p50_us'] - direct:.1f} us to the"
              f" median RTT (a bare socket forwarder {bare - direct:.1f} us)")
    broken = [name for name, r in results.items()
              if any(r[m]["lost"] for m in rtts) or r["64"]["received"] == 0
              or r["1200"]["received"] == 0]
    if broken:
        print(f"WARNING: lost round trips or nothing received through: {', '.join(broken)}")
    if relay_view is not None:
        print(f"the relay's own count: {relay_view['forwarded_packets']} packets forwarded in"
              f" {relay_view['sessions']} session(s), {relay_view['rate_limited']} rate-limited;"
              f" the generator received {delivered} through it (plus the path probes)")
    print(f"note: the relay ran with --relay-rate {RELAY_RATE} and --relay-session-mb"
          f" {RELAY_SESSION_MB}; its defaults (4000 packets/s per source, 1024 MiB per"
          " session) would cap the relayed rate at 4000 pkt/s per sender and end the"
          " session after 1 GiB")
    if "rtt_apart" in ours:
        print("note: 'CPUs apart' includes a cross-CPU wake-up of the forwarder per packet,"
              " which on a VM can dominate and vary per process; read the RTT ratio from"
              " 'same CPU'")
    print("note: the generator is Python too; a figure near the 'direct' row is the"
          " generator's ceiling, i.e. 'at least this much'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
