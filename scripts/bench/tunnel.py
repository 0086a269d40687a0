#!/usr/bin/env python3
"""
Tunnel benchmark in the NAT lab: iperf3 TCP throughput and ping RTT from a
consumer to a provider through WireGuard carried by the mesh, over a direct
and over a relayed path, next to plain wireguard-go between the same two
namespaces (the reference), all measured in the same run.

    .venv/bin/python scripts/bench/tunnel.py [--seconds 5] [--rounds 1]
        [--pings 50] [--profile direct|relayed] [--json]

Needs root, wireguard-go, iperf3, nftables (and what omerta.testing.natlab
needs).  How it is set up:

- A L{omerta.testing.natlab.Lab} with three public hosts on one bridge:
  C{relay} (198.51.100.10), C{consumer} and C{provider}.  No NAT: the
  hosts' own addresses are what the plain reference uses.
- The relay is a real C{twistd -n omerta-relay} (it created the network),
  run with --relay-rate and --relay-session-mb raised far above their
  defaults (4000 packets/s per source would cap a relayed tunnel at about
  45 Mb/s of inner packets per direction; the run says so).
- Each of consumer and provider runs two real mesh nodes, each a process
  of L{omerta.testing.tunnelbench} holding one wireguard-go interface (MTU
  1360) whose one peer's endpoint is the node's tunnel-plane endpoint for
  the other side (C{node.tunnels.open(..., TO_CONSUMER / TO_PROVIDER,
  device.listen_port)}), as the product does it.  The nodes run without
  NAT discovery, so they hold relay reservations like nodes behind a NAT.
  The consumer node finds the provider and connects over the mesh first.
  - the I{direct} pair (UDP port 7401, tunnel 100.64.50.0/24) reaches the
    other directly;
  - the I{relayed} pair (port 7402, 100.64.52.0/24): an nftables table in
    the consumer's namespace drops UDP between the two hosts to or from port
    7402, so direct pings and hole punches fail and the path is the relay
    session.  The other pair and the reference are not affected.
- The reference: one more wireguard-go interface per namespace (100.64.51.0/24)
  whose peer endpoint is the other host's lab address and port.
- Throughput: C{iperf3 -c} in the consumer's namespace to C{iperf3 -s}
  bound to the provider's tunnel address, --seconds each (consumer ->
  provider; the TCP ACKs travel back through the same tunnel).  RTT:
  --pings pings at --interval, with the tunnel otherwise idle; p50.
- The mesh path in use is read from the consumer node before and after each
  measurement and printed; a figure on another path than the row says is
  flagged.  --rounds repeats every measurement, interleaved (plain, direct,
  relayed, plain, ...), and reports the median throughput and the RTT p50
  over all pings.
- Ratios: direct/plain and relayed/plain throughput; added RTT per node
  crossed ((mesh p50 - plain p50) / nodes: a direct path crosses 2 nodes,
  a relayed one 3).  Targets are printed next to them.
- Where the time goes: during each iperf3 run, the CPU used by each node
  and each wireguard-go (from /proc; 1.00 = one CPU), each node's CPU time
  per tunnel datagram it handled (in + out, from its endpoint's counters),
  and each host's UdpRcvbufErrors (datagrams dropped at a full socket
  receive buffer: loss that TCP inside the tunnel answers by slowing down).
- --profile direct|relayed runs cProfile in both nodes of that pair during
  one more iperf3 run and prints their top functions and cost per datagram.

All traffic stays inside the lab's namespaces; they are removed at the end,
also on failure or Ctrl-C.  Everything shares this machine's CPUs: every
figure includes the others' contention (the CPU count is printed).
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
import pstats  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

RELAY_ADDRESS = "198.51.100.10"
RELAY_PORT = 7400
RELAY_RATE = 10_000_000
RELAY_SESSION_MB = 1_000_000
DEFAULT_RELAY_RATE = 4000
NFT_TABLE = "tunnelbench"
IPERF_PORT = 5201

#: name, label, tunnel /24, mesh node port (None: no mesh), nodes crossed, path kinds
CASES = (
    ("plain", "plain wireguard-go", "100.64.51", None, 0, ()),
    ("direct", "mesh, direct path", "100.64.50", 7401, 2, ("direct", "punched")),
    ("relayed", "mesh, relayed path", "100.64.52", 7402, 3, ("relayed",)),
)
TARGETS = {"direct": 0.5, "relayed": 0.3}
RTT_TARGET_MS = 0.5


class BenchError(Exception):
    pass


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OMERTA_DATA_DIR", None)
    return env


def terminated(signum, frame):
    raise SystemExit(128 + signum)


def check_tools() -> list[str]:
    from omerta.testing.natlab import check_environment

    problems = check_environment()
    for tool, package in (("wireguard-go", "wireguard-go"), ("iperf3", "iperf3"),
                          ("ping", "iputils-ping")):
        if shutil.which(tool) is None:
            problems.append(f"needs '{tool}': install the Debian package {package}")
    return problems


class Helper:
    """
    One L{omerta.testing.tunnelbench} process in a lab namespace, spoken to
    in JSON lines.
    """

    def __init__(self, lab, host, name: str, argv: list[str], workdir: Path):
        self.name = name
        self.log_path = workdir / f"{name}.stderr"
        with open(self.log_path, "wb") as log:
            self.proc = lab.popen(host, [sys.executable, "-m", "omerta.testing.tunnelbench",
                                         *argv],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                  env=environment(), cwd=REPO)
        self.ready: dict = {}

    def send(self, command: dict) -> None:
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def answer(self, key: str, timeout: float) -> dict:
        from omerta.testing.natlab import LabError, wait_for_line

        def wanted(line: str) -> bool:
            try:
                obj = json.loads(line)
            except ValueError:
                return False
            return isinstance(obj, dict) and (key in obj or "error" in obj)

        try:
            obj = json.loads(wait_for_line(self.proc, wanted, timeout, what=f"{key!r} answer"))
        except LabError as e:
            raise BenchError(f"{self.name}: {e}\n{self.stderr_tail()}") from None
        if "error" in obj:
            raise BenchError(f"{self.name}: {obj['error']}\n{self.stderr_tail()}")
        return obj[key]

    def ask(self, command: dict, key: str, timeout: float = 10.0) -> dict:
        self.send(command)
        return self.answer(key, timeout)

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = text.splitlines()[-lines:]
        return f"--- {self.name} stderr:\n" + "\n".join(tail) if tail else ""

    def close(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait()


def nft_drop(consumer_ns_run, provider_address: str, port: int) -> None:
    """
    In the consumer's namespace: drop UDP between this host and the
    provider's host from or to C{port} (the relayed pair's nodes), both ways.
    """
    rules = f"""table inet {NFT_TABLE} {{
    chain output {{
        type filter hook output priority filter; policy accept;
        ip daddr {provider_address} udp sport {port} counter drop
        ip daddr {provider_address} udp dport {port} counter drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip saddr {provider_address} udp sport {port} counter drop
        ip saddr {provider_address} udp dport {port} counter drop
    }}
}}
"""
    result = consumer_ns_run(["nft", "-f", "-"], input=rules)
    if result.returncode != 0:
        raise BenchError(f"nft -f in the consumer's namespace failed: {result.stderr.strip()}")


def nft_dropped(consumer_ns_run) -> int:
    result = consumer_ns_run(["nft", "--json", "list", "table", "inet", NFT_TABLE])
    if result.returncode != 0:
        return -1
    total = 0
    for item in json.loads(result.stdout).get("nftables", []):
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += expr["counter"]["packets"]
    return total


def parse_pings(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", output)]


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def relay_status(path: Path, after: float, timeout: float = 6.0) -> dict | None:
    """
    The relay's own count (its status.json, rewritten every few seconds),
    once written after C{after}.
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


class Bench:
    def __init__(self, args):
        self.args = args
        self.cases = [c for c in CASES if c[0] in args.cases]
        self.lab = None
        self.workdir: Path | None = None
        self.helpers: dict[tuple[str, str], Helper] = {}
        self.relay = None
        self.relay_log = None
        self.iperf_servers = []

    # -- building ------------------------------------------------------------

    def up(self) -> None:
        from omerta.crypto.identity import load_or_create_identity
        from omerta.networks import NetworkStore
        from omerta.testing.natlab import Lab

        self.workdir = Path(tempfile.mkdtemp(prefix="omerta-tunnelbench-"))
        self.lab = Lab("omtb")
        relay_host = self.lab.add_server("relay", [RELAY_ADDRESS])
        self.consumer = self.lab.add_host("consumer")
        self.provider = self.lab.add_host("provider")
        self.lab.up()
        self.run_c = lambda argv, **kw: self.lab.run(self.consumer, argv, **kw)
        self.run_p = lambda argv, **kw: self.lab.run(self.provider, argv, **kw)

        relay_dir = self.workdir / "relay"
        membership = NetworkStore(relay_dir).create(
            load_or_create_identity(relay_dir), "tunnelbench", f"{RELAY_ADDRESS}:{RELAY_PORT}",
            now=time.time())
        invite = membership.invite
        self.relay_log = open(self.workdir / "relay.log", "wb")
        twistd = Path(sys.executable).with_name("twistd")
        self.relay = self.lab.popen(
            relay_host, [str(twistd), "-n", "--pidfile=", "omerta-relay", "--data-dir",
                         str(relay_dir), "--name", "relay", "--interface", RELAY_ADDRESS,
                         "--port", str(RELAY_PORT), "--nat-interval", "0",
                         "--relay-rate", str(self.args.relay_rate),
                         "--relay-session-mb", str(RELAY_SESSION_MB)],
            stdout=self.relay_log, stderr=subprocess.STDOUT, env=environment(), cwd=REPO)

        if "relayed" in self.args.cases:
            nft_drop(self.run_c, self.provider.address, CASES_BY_NAME["relayed"][3])
        tag = str(os.getpid())[-6:]
        for name, _, net, port, _, _ in self.cases:
            for role, host, last in (("consumer", self.consumer, 2),
                                     ("provider", self.provider, 1)):
                device = f"tb{role[0]}{name[0]}{tag}"
                argv = ["--device", device, "--address", f"{net}.{last}/24",
                        "--state-dir", str(self.workdir / "wg")]
                if port is None:
                    argv = ["plain", *argv]
                else:
                    argv = ["node", *argv, "--role", role, "--data-dir",
                            str(self.workdir / f"{role}-{name}"), "--invite", invite,
                            "--interface", host.address, "--port", str(port),
                            "--name", f"{role}-{name}"]
                self.helpers[name, role] = Helper(self.lab, host, f"{role}-{name}", argv,
                                                  self.workdir)
        for helper in self.helpers.values():
            helper.ready = helper.answer("ready", 30)

    def connect(self) -> dict:
        """
        Tell each side its peer; the consumer nodes connect over the mesh.
        @return: per case, the path the consumer's connect returned.
        """
        from omerta.testing.natlab import wait_for_line

        paths = {}
        for name, _, net, port, _, _ in self.cases:
            consumer, provider = self.helpers[name, "consumer"], self.helpers[name, "provider"]
            to_provider = {"op": "peer", "public_key": provider.ready["public_key"],
                           "allowed": f"{net}.1/32"}
            to_consumer = {"op": "peer", "public_key": consumer.ready["public_key"],
                           "allowed": f"{net}.2/32"}
            if port is None:
                to_provider.update(endpoint=f"{self.provider.address}:{provider.ready['wg_port']}",
                                   keepalive=25)
                to_consumer.update(endpoint=f"{self.consumer.address}:{consumer.ready['wg_port']}")
            else:
                to_provider["peer_id"] = provider.ready["peer_id"]
                to_consumer["peer_id"] = consumer.ready["peer_id"]
            provider.ask(to_consumer, "tunnel")
            consumer.send(to_provider)
        for name, *_ in self.cases:
            paths[name] = self.helpers[name, "consumer"].answer("tunnel", 75)["path"]
        for name, _, net, _, _, _ in self.cases:
            self.wait_ping(f"{net}.1", name)
            server = self.lab.popen(self.provider, ["iperf3", "-s", "-B", f"{net}.1", "-p",
                                                    str(IPERF_PORT), "--forceflush"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self.iperf_servers.append(server)
            wait_for_line(server, lambda line: "listening" in line, 10, "iperf3 -s listening")
        return paths

    def wait_ping(self, address: str, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run_c(["ping", "-c", "1", "-W", "1", address]).returncode == 0:
                return
        raise BenchError(f"no ping answer from {address} through the {name} tunnel within"
                         f" {timeout:g} s\n" + self.helpers[name, "consumer"].stderr_tail())

    # -- measuring -----------------------------------------------------------

    def path(self, name: str) -> dict | None:
        if CASES_BY_NAME[name][3] is None:
            return None
        return self.helpers[name, "consumer"].ask({"op": "status"}, "status")

    def settle(self, name: str, timeout: float = 15.0) -> str | None:
        """
        Wait until the consumer node's path is of the kind the case is
        about; returns the kind in use at the end.
        """
        kinds = CASES_BY_NAME[name][5]
        if not kinds:
            return None
        deadline = time.monotonic() + timeout
        while True:
            status = self.path(name)
            kind = status["path"]["kind"] if status["path"] else None
            if kind in kinds or time.monotonic() >= deadline:
                return kind
            time.sleep(0.2)

    def ping(self, name: str) -> dict:
        address = f"{CASES_BY_NAME[name][2]}.1"
        args = self.args
        result = self.run_c(["ping", "-c", str(args.pings), "-i", str(args.interval),
                             "-W", "1", address])
        rtts = parse_pings(result.stdout)
        return {"rtts": rtts, "lost": args.pings - len(rtts)}

    def iperf(self, name: str, seconds: float) -> dict:
        address = f"{CASES_BY_NAME[name][2]}.1"
        result = self.run_c(["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t",
                             f"{seconds:g}", "-J"], timeout=seconds + 30)
        try:
            document = json.loads(result.stdout)
        except ValueError:
            raise BenchError(f"iperf3 to {address}: {result.stderr or result.stdout}") from None
        if "error" in document:
            raise BenchError(f"iperf3 to {address}: {document['error']}")
        end = document["end"]
        return {"mbps": end["sum_received"]["bits_per_second"] / 1e6,
                "retransmits": end["sum_sent"].get("retransmits"),
                "cpu_sender_pct": round(end["cpu_utilization_percent"]["host_total"], 1),
                "cpu_receiver_pct": round(end["cpu_utilization_percent"]["remote_total"], 1)}

    def udp_drops(self) -> dict:
        """
        Each host's UdpRcvbufErrors (datagrams dropped at a full socket
        receive buffer), absolute.
        """
        out = {}
        for role, run in (("consumer", self.run_c), ("provider", self.run_p)):
            text = run(["nstat", "-az", "UdpRcvbufErrors"]).stdout
            found = re.search(r"UdpRcvbufErrors\s+(\d+)", text)
            out[role] = int(found.group(1)) if found else 0
        return out

    def statuses(self, name: str) -> dict:
        return {role: self.helpers[name, role].ask({"op": "status"}, "status")
                for role in ("consumer", "provider")}

    def measure(self, name: str) -> dict:
        before = self.settle(name)
        ping = self.ping(name)
        s0, u0, t0 = self.statuses(name), self.udp_drops(), time.monotonic()
        iperf = self.iperf(name, self.args.seconds)
        s1, u1, elapsed = self.statuses(name), self.udp_drops(), time.monotonic() - t0
        after = s1["consumer"].get("path")
        out = {"ping": ping, "iperf": iperf, "path_before": before,
               "path_after": after["kind"] if after else None, "cpu": {}}
        for role in ("consumer", "provider"):
            a, b = s1[role], s0[role]
            cpu = {"udp_rcvbuf_drops": u1[role] - u0[role]}
            if a.get("wg_cpu_s") is not None and b.get("wg_cpu_s") is not None:
                cpu["wg_cpu_share"] = round((a["wg_cpu_s"] - b["wg_cpu_s"]) / elapsed, 2)
            if a.get("cpu_s") is not None:
                node = a["cpu_s"] - b["cpu_s"]
                ea, eb = a["endpoint"], b["endpoint"]
                frames = {"out": ea["frames_out"] - eb["frames_out"],
                          "in": ea["frames_in"] - eb["frames_in"]}
                datagrams = frames["out"] + frames["in"]
                cpu.update(node_cpu_share=round(node / elapsed, 2), frames=frames,
                           node_us_per_datagram=round(node / datagrams * 1e6, 1)
                           if datagrams else None,
                           drops=a["drops"])
            out["cpu"][role] = cpu
        return out

    def profile(self, name: str) -> dict:
        """
        cProfile both nodes of the pair during one iperf3 run.
        """
        pair = [self.helpers[name, "consumer"], self.helpers[name, "provider"]]
        before = [h.ask({"op": "status"}, "status")["endpoint"] for h in pair]
        for h in pair:
            h.ask({"op": "profile", "action": "start"}, "profile")
        iperf = self.iperf(name, self.args.seconds)
        files = []
        for h in pair:
            path = self.workdir / f"{h.name}.prof"
            h.ask({"op": "profile", "action": "stop", "path": str(path)}, "profile", 60)
            files.append(path)
        after = [h.ask({"op": "status"}, "status")["endpoint"] for h in pair]
        out = {"iperf": iperf, "nodes": {}}
        for h, path, b, a in zip(pair, files, before, after):
            datagrams = ((a["frames_in"] - b["frames_in"]) + (a["frames_out"] - b["frames_out"]))
            stats = pstats.Stats(str(path))
            rows = []
            for (filename, line, function), (cc, nc, tt, ct, _) in stats.stats.items():
                rows.append((tt, ct, nc, f"{Path(filename).name}:{line}({function})"))
            rows.sort(reverse=True)
            # waiting in epoll is idle time, not work
            total = sum(r[0] for r in rows if "select.epoll" not in r[3])
            out["nodes"][h.name] = {
                "datagrams": datagrams, "profiled_s": round(total, 3),
                "us_per_datagram": round(total / datagrams * 1e6, 2) if datagrams else None,
                "top": [{"function": f, "calls": nc, "tottime_s": round(tt, 3),
                         "cumtime_s": round(ct, 3),
                         "us_per_datagram": round(tt / datagrams * 1e6, 2) if datagrams else None}
                        for tt, ct, nc, f in rows[:self.args.top]],
            }
        return out

    # -- tearing down --------------------------------------------------------

    def down(self) -> None:
        for helper in self.helpers.values():
            try:
                helper.close()
            except Exception:
                pass
        if self.lab is not None:
            self.lab.down()
        if self.relay_log is not None:
            self.relay_log.close()
        if self.workdir is not None and not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


CASES_BY_NAME = {case[0]: case for case in CASES}


def summarise(rounds: list[dict], cases) -> dict:
    results = {}
    for name, *_ in cases:
        runs = [r[name] for r in rounds]
        rtts = [x for r in runs for x in r["ping"]["rtts"]]
        mbps = [r["iperf"]["mbps"] for r in runs]
        results[name] = {
            "mbps": round(statistics.median(mbps), 1),
            "mbps_each": [round(m, 1) for m in mbps],
            "retransmits": [r["iperf"]["retransmits"] for r in runs],
            "rtt_p50_ms": percentile(rtts, 50),
            "rtt_p90_ms": percentile(rtts, 90),
            "pings_lost": sum(r["ping"]["lost"] for r in runs),
            "paths": sorted({k for r in runs for k in (r["path_before"], r["path_after"]) if k}),
            "cpu": {role: cpu_summary([r["cpu"][role] for r in runs])
                    for role in ("consumer", "provider")},
        }
    return results


def cpu_summary(rows: list[dict]) -> dict:
    """
    Means over the rounds (drops and frames: sums); the node's drop
    counters as of the last round.
    """
    out = {"udp_rcvbuf_drops": sum(r["udp_rcvbuf_drops"] for r in rows)}
    for key in ("wg_cpu_share", "node_cpu_share", "node_us_per_datagram"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = round(statistics.mean(values), 2)
    if rows and "frames" in rows[-1]:
        out["frames_out"] = sum(r["frames"]["out"] for r in rows)
        out["frames_in"] = sum(r["frames"]["in"] for r in rows)
        out["drops"] = rows[-1]["drops"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 run length")
    parser.add_argument("--rounds", type=int, default=1, help="measure every case this often")
    parser.add_argument("--pings", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between pings")
    parser.add_argument("--relay-rate", type=int, default=RELAY_RATE,
                        help=f"the relay's --relay-rate (default {RELAY_RATE}; the daemon's"
                             f" own default is {DEFAULT_RELAY_RATE})")
    parser.add_argument("--profile", choices=("direct", "relayed"),
                        help="also cProfile both nodes of this pair during one more iperf3 run")
    parser.add_argument("--top", type=int, default=15, help="profile rows per node")
    parser.add_argument("--cases", default="plain,direct,relayed",
                        help="comma-separated cases to run; plain (the reference) always runs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if args.seconds <= 0 or args.rounds < 1 or args.pings < 1 or args.interval <= 0:
        parser.error("--seconds, --rounds, --pings and --interval must be positive")
    names = [c[0] for c in CASES]
    wanted = {"plain", *(n.strip() for n in args.cases.split(",") if n.strip())}
    if not wanted <= set(names):
        parser.error(f"--cases: choose from {', '.join(names)}")
    if args.profile and args.profile not in wanted:
        parser.error(f"--profile {args.profile} needs that case in --cases")
    args.cases = wanted
    problems = check_tools()
    if problems:
        print("cannot run the tunnel benchmark: " + "; ".join(problems), file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, terminated)
    bench = Bench(args)
    started = time.monotonic()
    try:
        bench.up()
        connected = bench.connect()
        setup_s = time.monotonic() - started
        rounds = []
        for _ in range(args.rounds):
            rounds.append({name: bench.measure(name) for name, *_ in bench.cases})
        profile = bench.profile(args.profile) if args.profile else None
        dropped = nft_dropped(bench.run_c) if "relayed" in args.cases else None
        relay_view = relay_status(bench.workdir / "relay" / "status.json", time.time())
    except KeyboardInterrupt:
        print("interrupted; removing the lab", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"tunnel benchmark failed: {e}", file=sys.stderr)
        if bench.workdir is not None:
            print(f"(logs in {bench.workdir}; rerun with --keep to keep them)", file=sys.stderr)
        return 1
    finally:
        bench.down()

    cases = bench.cases
    meshed = [c for c in cases if c[3] is not None]
    results = summarise(rounds, cases)
    plain = results["plain"]
    ratios = {}
    for name, _, _, _, nodes, _ in meshed:
        r = results[name]
        ratios[name] = {
            "throughput": round(r["mbps"] / plain["mbps"], 3) if plain["mbps"] else None,
            "throughput_target": TARGETS[name],
            "added_rtt_ms": round(r["rtt_p50_ms"] - plain["rtt_p50_ms"], 3)
            if r["rtt_p50_ms"] is not None and plain["rtt_p50_ms"] is not None else None,
            "nodes": nodes,
        }
        added = ratios[name]["added_rtt_ms"]
        ratios[name]["added_rtt_per_node_ms"] = None if added is None else round(added / nodes, 3)
    settings = {"seconds": args.seconds, "rounds": args.rounds, "pings": args.pings,
                "interval": args.interval, "cpus": os.cpu_count(), "mtu": 1360,
                "relay_rate": args.relay_rate, "relay_session_mb": RELAY_SESSION_MB,
                "setup_s": round(setup_s, 1)}
    if args.json:
        print(json.dumps({"settings": settings, "connected": connected, "results": results,
                          "ratios": ratios, "direct_udp_dropped": dropped,
                          "relay_status": relay_view, "profile": profile}, indent=2))
        return 0

    print(f"WireGuard consumer -> provider in a NAT lab (3 public namespaces on one bridge),"
          f" {os.cpu_count()} CPU(s) shared by everything, MTU 1360.")
    print(f"iperf3 TCP {args.seconds:g} s per case; {args.pings} pings at {args.interval:g} s"
          f" on an idle tunnel; {args.rounds} round(s), interleaved; setup took"
          f" {setup_s:.1f} s.")
    print()
    print(f"{'case':22} {'path used':18} {'Mb/s':>8} {'retr':>6} {'RTT p50':>9}"
          f" {'p90 (ms)':>9} {'lost':>5}")
    for name, label, *_ in cases:
        r = results[name]
        path = ", ".join(r["paths"]) if r["paths"] else "- (no mesh)"
        retr = sum(x or 0 for x in r["retransmits"])
        p50 = "-" if r["rtt_p50_ms"] is None else f"{r['rtt_p50_ms']:.3f}"
        p90 = "-" if r["rtt_p90_ms"] is None else f"{r['rtt_p90_ms']:.3f}"
        print(f"{label:22} {path:18} {r['mbps']:>8.1f} {retr:>6} {p50:>9} {p90:>9}"
              f" {r['pings_lost']:>5}")
    if args.rounds > 1:
        print("per round Mb/s: " + "; ".join(
            f"{name} {', '.join(map(str, results[name]['mbps_each']))}" for name, *_ in cases))
    print()
    for name, *_ in meshed:
        q = ratios[name]
        met = q["throughput"] is not None and q["throughput"] >= q["throughput_target"]
        print(f"{name:8} / plain throughput: {q['throughput']:.2f}"
              f" (target >= {q['throughput_target']}: {'met' if met else 'MISSED'})")
    for name, *_ in meshed:
        q = ratios[name]
        if q["added_rtt_per_node_ms"] is None:
            continue
        met = q["added_rtt_per_node_ms"] <= RTT_TARGET_MS
        print(f"{name:8} added RTT: {q['added_rtt_ms']:+.3f} ms over {q['nodes']} nodes ="
              f" {q['added_rtt_per_node_ms']:+.3f} ms per node crossed"
              f" (target <= {RTT_TARGET_MS}: {'met' if met else 'MISSED'})")
    print()
    print("During iperf3: CPU used (1.00 = one CPU) by each process, the node's CPU time per"
          " tunnel datagram it")
    print("handled (in + out), and UDP datagrams dropped at full socket buffers on each host:")
    print(f"{'case':22} {'node C':>7} {'node P':>7} {'wg-go C':>8} {'wg-go P':>8}"
          f" {'us/dgram C':>11} {'us/dgram P':>11} {'rcvbuf drops C/P':>17}")
    for name, label, *_ in cases:
        c, p = results[name]["cpu"]["consumer"], results[name]["cpu"]["provider"]

        def v(d, key):
            value = d.get(key)
            return "-" if value is None else f"{value:.2f}" if "share" in key else f"{value:.1f}"

        print(f"{label:22} {v(c, 'node_cpu_share'):>7} {v(p, 'node_cpu_share'):>7}"
              f" {v(c, 'wg_cpu_share'):>8} {v(p, 'wg_cpu_share'):>8}"
              f" {v(c, 'node_us_per_datagram'):>11} {v(p, 'node_us_per_datagram'):>11}"
              f" {c['udp_rcvbuf_drops']:>8}/{p['udp_rcvbuf_drops']}")
    print()
    for name, *_ in meshed:
        kinds = CASES_BY_NAME[name][5]
        wrong = [k for k in results[name]["paths"] if k not in kinds]
        connect = connected.get(name) or {}
        print(f"{name} pair: connect() returned a {connect.get('kind')} path"
              f" (rtt {connect.get('rtt_ms')} ms); path during measurements:"
              f" {', '.join(results[name]['paths'])}"
              + (f"  WARNING: not {'/'.join(kinds)}" if wrong else ""))
        for role in ("consumer", "provider"):
            drops = results[name]["cpu"][role].get("drops")
            if drops:
                print(f"  {role} node's drop counters (whole run): {drops}")
    if dropped is not None:
        print(f"UDP between consumer and provider to/from port {CASES_BY_NAME['relayed'][3]}"
              f" dropped by the lab's rule (the relayed pair's direct attempts):"
              f" {dropped} packets")
    if relay_view is not None:
        print(f"the relay's own count: {relay_view['forwarded_packets']} packets forwarded in"
              f" {relay_view['sessions']} session(s), {relay_view['rate_limited']}"
              " rate-limited")
    print(f"note: the relay ran with --relay-rate {args.relay_rate} and --relay-session-mb"
          f" {RELAY_SESSION_MB}; its default --relay-rate {DEFAULT_RELAY_RATE} packets/s per"
          f" source would cap a relayed tunnel at about"
          f" {DEFAULT_RELAY_RATE * 1360 * 8 / 1e6:.0f} Mb/s of inner packets per direction")
    if profile:
        print()
        print(f"cProfile of the {args.profile} pair during one more {args.seconds:g} s iperf3"
              f" run ({profile['iperf']['mbps']:.1f} Mb/s under the profiler):")
        for node, p in profile["nodes"].items():
            print(f"  {node}: {p['datagrams']} datagrams, {p['profiled_s']} s in Python"
                  f" functions besides epoll waits = {p['us_per_datagram']} us per datagram"
                  " (profiler overhead included); top by own time:")
            print(f"    {'us/dgram':>9} {'own s':>7} {'cum s':>7} {'calls':>9}  function")
            for row in p["top"]:
                print(f"    {row['us_per_datagram']:>9} {row['tottime_s']:>7}"
                      f" {row['cumtime_s']:>7} {row['calls']:>9}  {row['function']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
