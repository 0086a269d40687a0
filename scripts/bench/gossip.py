#!/usr/bin/env python3
"""
Gossip and liveness benchmark: many real mesh nodes (L{MeshSim}: the
product's MeshNode, NodeProtocol, signing and verification) on the in-memory
simulated network, for each mesh size N:

 1. cold start: node 0 is the only seed (with --seeds K, nodes 0..K-1 are
    seeds and seed k > 0 bootstraps from seed 0); nodes 1..N-1 are started
    evenly over --start-window simulated seconds, each bootstrapping from
    the seeds.  Simulated seconds until every node knows every other
    (C{MeshSim.converged}), and the wall-clock and CPU time that took;
 2. steady state: frames and bytes each node sends per simulated second
    over --steady seconds, by message type;
 3. join: one node joins the converged mesh through node 0; simulated
    seconds until every node knows it, and until it knows every node;
 4. dead node: a random non-seed node is killed without a goodbye;
    simulated seconds until every node that had it in its active set has it
    "offline" in its registry, and how many nodes learned it died;
 5. false offline: --loss random loss on every link for --loss-window
    simulated seconds; "peer_disconnected" events about nodes that are alive.

    .venv/bin/python scripts/bench/gossip.py [--sizes 100,1000] [--seed 1]
        [--loss 0.10] [--latency 0.02] [--max-seconds 1800] [--json]

Times are simulated seconds unless marked "wall" or "cpu".  Progress goes to
stderr; the table (or JSON with --json) to stdout.  Nothing in the protocol
is skipped or stubbed: every node verifies the Ed25519 signature of every
announcement new to it (~90 us each), so a cold start costs ~N^2
verifications of CPU.  A size that runs out of its --max-seconds wall budget
or of --max-rss-gb memory is reported as "did not finish within budget" with
the knowledge fraction it reached.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from omerta.mesh.node import MeshConfig  # noqa: E402
from omerta.testing.meshsim import MeshSim  # noqa: E402

CONFIG_FIELDS = (
    "gossip_interval", "fanout", "retransmit_mult", "gossip_hop_limit", "degree",
    "max_active", "keepalive", "suspect_after_missed", "indirect_timeout",
    "indirect_helpers", "reannounce", "announce_ttl",
)
PAGE = os.sysconf("SC_PAGE_SIZE")


def code_version() -> str:
    """
    The commit the protocol code comes from, and whether omerta/ differs
    from it (other work in progress), so a figure can be tied to the code.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "omerta"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes under omerta/" if dirty else "")


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1e9


def address(i: int) -> str:
    return f"10.{i // 62500 % 250 + 1}.{i // 250 % 250}.{i % 250 + 1}"


class OutOfBudget(Exception):
    """
    The wall-clock or memory budget of this size ran out.
    """


class Bench:
    """
    One mesh of N nodes and the measurements on it.  Everything is observed
    through the nodes' events and metrics and the network's counters, so the
    checks between simulation steps cost O(1) or O(N), never O(N^2).
    """

    def __init__(self, n: int, args):
        self.n = n
        self.args = args
        self.sim = MeshSim(seed=args.seed, latency=args.latency)
        self.config = self.sim.config
        self.wall_start = time.monotonic()
        self.deadline = self.wall_start + args.max_seconds
        self.last_progress = self.wall_start
        self.known = 0                # (node, peer) pairs learnt, from peer_discovered
        self.index: dict[bytes, int] = {}
        self.watch_join: bytes | None = None
        self.join_known: dict[int, float] = {}
        self.watch_dead: bytes | None = None
        self.offline: dict[int, float] = {}
        self.false_offline: list[tuple[float, int, int]] = []
        self.suspected_live = 0
        self.counting_false = False
        self.timeline: list[tuple[float, float]] = []
        self.result: dict = {"n": n}
        self.traffic: list[tuple[float, int, int, int]] = []
        self.backlog: list[tuple[float, float, float]] = []
        self.sim.clock.callLater(0, self._sample_traffic)

    # nodes and events

    def add(self, i: int, bootstrap) -> object:
        ip = f"198.51.100.{i + 1}" if i < self.args.seeds else address(i)
        node = self.sim.add_node(ip, bootstrap=bootstrap, name=f"n{i}")
        self.index[node.peer_id] = i
        events = node.node.events
        events.subscribe("peer_discovered", lambda peer_id, network, i=i: self._discovered(i, peer_id))
        events.subscribe("peer_disconnected", lambda peer_id, network, i=i: self._offline(i, peer_id))
        events.subscribe("peer_suspected", lambda peer_id, network, i=i: self._suspected(i, peer_id))
        return node

    def _discovered(self, i: int, peer_id: bytes) -> None:
        self.known += 1
        if peer_id == self.watch_join:
            self.join_known.setdefault(i, self.sim.clock.seconds())

    def _offline(self, i: int, peer_id: bytes) -> None:
        now = self.sim.clock.seconds()
        if peer_id == self.watch_dead:
            self.offline.setdefault(i, now)
        elif self.counting_false and self.index.get(peer_id) is not None:
            j = self.index[peer_id]
            if id(self.sim.nodes[j]) not in self.sim.dead:
                self.false_offline.append((now, i, j))

    def _suspected(self, i: int, peer_id: bytes) -> None:
        if self.counting_false and peer_id != self.watch_dead:
            self.suspected_live += 1

    def _sample_traffic(self) -> None:
        """
        Every 10 simulated seconds: datagrams and bytes sent so far, and how
        many nodes were live, for the traffic-over-time figures.
        """
        net = self.sim.net
        sent_bytes = sum(host.bytes_sent for host in net.hosts.values())
        live = self.sim.live()
        self.traffic.append((self.sim.clock.seconds(), net.sent, sent_bytes, len(live)))
        # Rumours still queued, and transmissions they still have to make,
        # per live node: the backlog the gossip rounds are working through.
        queued = sends = 0
        for node in live:
            rumours = node.overlay.gossip.rumours
            queued += len(rumours)
            sends += sum(r.left for r in rumours.values())
        if live:
            self.backlog.append((self.sim.clock.seconds(), queued / len(live), sends / len(live)))
        self.sim.clock.callLater(10.0, self._sample_traffic)

    def traffic_summary(self) -> dict:
        """
        Per-node rates in each 10 s bucket: the median and the busiest
        bucket, when it happened (reannounce bursts show up here).
        """
        buckets = []
        for (t0, s0, b0, _), (t1, s1, b1, live) in zip(self.traffic, self.traffic[1:]):
            if live:
                buckets.append((t0, (s1 - s0) / live / (t1 - t0), (b1 - b0) / live / (t1 - t0)))
        if not buckets:
            return {}
        by_msgs = sorted(buckets, key=lambda b: b[1])
        peak = by_msgs[-1]
        median = by_msgs[len(by_msgs) // 2]
        return {"buckets": [(t, round(m, 2), round(b)) for t, m, b in buckets],
                "backlog": [(t, round(q, 1), round(left, 1)) for t, q, left in self.backlog],
                "median_msgs": median[1], "median_bytes": median[2],
                "peak_at": peak[0], "peak_msgs": peak[1], "peak_bytes": peak[2]}

    def knowledge(self) -> float:
        """
        Fraction of (live node, live peer) pairs known, from the registries.
        """
        live = self.sim.live()
        alive = {n.peer_id for n in live}
        total = len(live) * (len(live) - 1)
        dead = [n.peer_id for n in self.sim.nodes if n.peer_id not in alive]
        known = 0
        for node in live:
            registry = node.overlay.registry
            known += len(registry) - sum(1 for d in dead if d in registry)
        return known / total if total else 1.0

    # running with a budget

    def check_budget(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise OutOfBudget(f"wall-clock budget of {self.args.max_seconds:.0f} s used up")
        if now - self.last_progress > 15:
            self.last_progress = now
            rss = rss_gb()
            self.progress(f"t={self.sim.clock.seconds():.1f}s sim, knowledge "
                          f"{self.known / max(1, self.n * (self.n - 1)):.4f}, "
                          f"rss {rss:.1f} GB")
            if rss > self.args.max_rss_gb:
                raise OutOfBudget(f"memory budget of {self.args.max_rss_gb} GB used up "
                                  f"(rss {rss:.1f} GB)")

    def progress(self, message: str) -> None:
        wall = time.monotonic() - self.wall_start
        print(f"[N={self.n} wall {wall:7.1f}s] {message}", file=sys.stderr, flush=True)

    def run(self, seconds: float, step: float = 0.5) -> None:
        end = self.sim.clock.seconds() + seconds
        while self.sim.clock.seconds() < end - 1e-9:
            self.sim.net.run(min(step, end - self.sim.clock.seconds()))
            self.check_budget()

    def run_until(self, predicate, timeout: float, step: float = 0.1) -> bool:
        """
        Advance in C{step}s until C{predicate()}; the exact time something
        happened is taken from event timestamps, not from the step.
        """
        end = self.sim.clock.seconds() + timeout
        while not predicate():
            if self.sim.clock.seconds() >= end - 1e-9:
                return False
            self.sim.net.run(min(step, end - self.sim.clock.seconds()))
            self.check_budget()
        return True

    # phases

    def cold_start(self) -> bool:
        args, sim, n = self.args, self.sim, self.n
        seeds = [self.add(0, [])]
        for k in range(1, min(args.seeds, n)):
            seeds.append(self.add(k, [seeds[0]]))
        rest = range(len(seeds), n)
        spacing = args.start_window / max(1, len(rest))
        for k, i in enumerate(rest):
            sim.clock.callLater(k * spacing, self.add, i, seeds)
        pairs = n * (n - 1)
        marks = {0.5: None, 0.9: None, 0.99: None, 1.0: None}
        cpu0 = time.process_time()
        wall0 = time.monotonic()
        converged = False
        # Small steps at large N, where 0.1 simulated seconds can take minutes,
        # so the wall-clock budget is checked often enough.
        step = min(0.1, 100.0 / n)
        try:
            while sim.clock.seconds() < args.cold_cap:
                sim.net.run(step)
                now = sim.clock.seconds()
                fraction = self.known / pairs
                for mark in marks:
                    if marks[mark] is None and fraction >= mark:
                        marks[mark] = now
                if not self.timeline or now - self.timeline[-1][0] >= 1.0 - 1e-9:
                    self.timeline.append((round(now, 1), fraction))
                if len(sim.nodes) == n and self.known >= pairs:
                    converged = True
                    break
                self.check_budget()
        except OutOfBudget as e:
            self.result["cold_start"] = {
                "finished": False, "reason": str(e),
                "sim_seconds": sim.clock.seconds(), "nodes_started": len(sim.nodes),
                "knowledge": self.known / pairs, "timeline": self._sparse_timeline(),
                "wall_seconds": time.monotonic() - wall0,
                "cpu_seconds": time.process_time() - cpu0, "rss_gb": rss_gb(),
            }
            raise
        checked = sim.converged() if converged else False
        self.result["cold_start"] = {
            "finished": True,
            "seeds": args.seeds,
            "start_window": args.start_window,
            "converged": checked,
            "sim_seconds": sim.clock.seconds() if converged else None,
            "after_last_start": (sim.clock.seconds() - spacing * (len(rest) - 1)
                                 if converged else None),
            "marks": {str(k): v for k, v in marks.items()},
            "knowledge": self.knowledge(),
            "timeline": None if converged else self._sparse_timeline(),
            "wall_seconds": time.monotonic() - wall0,
            "cpu_seconds": time.process_time() - cpu0,
            "rss_gb": rss_gb(),
            "announcements": self.gossip_outcomes(),
            "missing": self.missing(),
            "frames": dict(self.frames_by_type()),
        }
        return checked

    def warm_start(self) -> None:
        """
        A restart of a mesh whose nodes kept their peer files: all N nodes
        start at once, each with every other node's signed
        announcement already in its registry.  They are put there by
        C{PeerRegistry.accept}, the check C{PeerRegistry.load} applies to a
        peers file (signature verified), so the N^2 verifications are made;
        only the gossip that would have carried them is skipped.  Active sets
        then form from the registries as after any restart.
        """
        args, sim, n = self.args, self.sim, self.n
        cpu0, wall0 = time.process_time(), time.monotonic()
        seeds = [self.add(0, [])]
        for k in range(1, min(args.seeds, n)):
            seeds.append(self.add(k, [seeds[0]]))
        nodes = seeds + [self.add(i, seeds) for i in range(len(seeds), n)]
        now = sim.clock.seconds()
        signed = [node.overlay.gossip.own_announcement() for node in nodes]
        for k, node in enumerate(nodes):
            registry = node.overlay.registry
            for j, announcement in enumerate(signed):
                if j != k:
                    registry.accept(announcement, now)
            self.known += n - 1
            self.check_budget()
        self.result["warm_start"] = {
            "converged": sim.converged(),
            "wall_seconds": time.monotonic() - wall0,
            "cpu_seconds": time.process_time() - cpu0,
        }

    def _sparse_timeline(self) -> list[tuple[float, float]]:
        out, last = [], None
        for t, f in self.timeline:
            if last is None or t >= last * 1.5 or t - last >= 30:
                out.append((t, round(f, 4)))
                last = t
        if self.timeline and out[-1][0] != self.timeline[-1][0]:
            out.append((self.timeline[-1][0], round(self.timeline[-1][1], 4)))
        return out

    def missing(self) -> dict:
        """
        The (node, peer) pairs still unknown: how many, and how many nodes
        lack some peer and how many peers some node lacks.
        """
        live = self.sim.live()
        everyone = {node.peer_id for node in live}
        pairs, nodes, peers = 0, 0, set()
        for node in live:
            registry = node.overlay.registry
            lacking = [p for p in everyone if p != node.peer_id and p not in registry]
            if lacking:
                pairs += len(lacking)
                nodes += 1
                peers.update(lacking)
        return {"pairs": pairs, "nodes": nodes, "peers": len(peers)}

    def gossip_outcomes(self) -> dict[str, int]:
        total: Counter = Counter()
        for node in self.sim.nodes:
            total.update(node.node.metrics.by_label("gossip_announcements", "outcome"))
        return dict(total)

    def frames_by_type(self) -> Counter:
        total: Counter = Counter()
        for node in self.sim.live():
            total.update(node.node.metrics.by_label("frames_out", "type"))
        return total

    def graph(self) -> dict:
        """
        The active-set digraph: an edge a -> b when b is in a's links (a
        gossips to b).  A node nobody has in its links receives no rumours.
        """
        live = self.sim.live()
        indegree: Counter = Counter()
        outdeg = []
        for node in live:
            links = node.overlay.liveness.links
            outdeg.append(len(links))
            indegree.update(links.keys())
        ins = [indegree.get(node.peer_id, 0) for node in live]
        return {
            "out_min": min(outdeg), "out_mean": sum(outdeg) / len(outdeg), "out_max": max(outdeg),
            "in_min": min(ins), "in_mean": sum(ins) / len(ins), "in_max": max(ins),
            "in_zero": sum(1 for x in ins if x == 0),
        }

    def steady(self) -> None:
        sim, seconds = self.sim, self.args.steady
        self.run(self.args.settle)
        live = sim.live()
        sent0 = sim.net.sent
        bytes0 = sum(node.host.bytes_sent for node in live)
        per_host0 = [node.host.packets_sent for node in live]
        types0 = self.frames_by_type()
        self.run(seconds)
        count = len(live)
        sent = sim.net.sent - sent0
        sent_bytes = sum(node.host.bytes_sent for node in live) - bytes0
        per_host = [node.host.packets_sent - p for node, p in zip(live, per_host0)]
        types = self.frames_by_type() - types0
        self.result["steady"] = {
            "seconds": seconds,
            "msgs_per_node_s": sent / count / seconds,
            "bytes_per_node_s": sent_bytes / count / seconds,
            "max_node_msgs_s": max(per_host) / seconds,
            "by_type_per_node_s": {k: round(v / count / seconds, 3)
                                   for k, v in sorted(types.items())},
            "graph": self.graph(),
        }

    def join(self) -> None:
        sim = self.sim
        others = sim.live()
        before = self.frames_by_type()
        self.watch_join = None
        start = sim.clock.seconds()
        newcomer = self.add(self.n, [sim.nodes[0]])
        self.watch_join = newcomer.peer_id
        target = {self.index[node.peer_id] for node in others}

        def everyone_knows():
            return len(self.join_known) >= len(target)

        done = self.run_until(everyone_knows, self.args.join_cap)
        registry = newcomer.overlay.registry
        knows_all = all(node.peer_id in registry for node in others)
        times = sorted(t - start for i, t in self.join_known.items() if i in target)
        def quantile(q):
            return times[min(len(times) - 1, int(q * len(times)))] if times else None
        self.result["join"] = {
            "everyone_knows": done,
            "sim_seconds": times[-1] if done else None,
            "p50": quantile(0.5), "p90": quantile(0.9), "p99": quantile(0.99),
            "fraction_knowing": len(times) / len(target),
            "newcomer_knows_all": knows_all,
            "newcomer_knows": len(registry) / len(others),
            "frames_during": dict(self.frames_by_type() - before),
        }

    def dead(self) -> None:
        sim = self.sim
        rng = random.Random(self.args.seed)
        candidates = [node for node in sim.live()[self.args.seeds:]]
        victim = rng.choice(candidates)
        watchers = [self.index[node.peer_id] for node in sim.live()
                    if victim.peer_id in node.overlay.liveness.links]
        self.watch_dead = victim.peer_id
        start = sim.clock.seconds()
        sim.kill(victim)

        def all_offline():
            return all(i in self.offline for i in watchers)

        done = self.run_until(all_offline, self.args.dead_cap, step=0.5)
        detected = [self.offline[i] - start for i in watchers if i in self.offline]
        states: Counter = Counter()
        for node in sim.live():
            record = node.overlay.registry.get(victim.peer_id)
            states[str(record.state) if record else "forgotten"] += 1
        config = self.config
        self.result["dead"] = {
            "watchers": len(watchers),
            "all_detected": done,
            "first": min(detected) if detected else None,
            "last": max(detected) if done else None,
            "declared_offline_by": len(self.offline),
            "live_others": len(sim.live()),
            "states_elsewhere": dict(states),
            "bound": config.keepalive * (config.suspect_after_missed + 1) + config.indirect_timeout,
        }

    def lossy(self) -> None:
        sim, args = self.sim, self.args
        live_before = sum(node.node.metrics.get("liveness_offline") for node in sim.live())
        self.false_offline.clear()
        self.suspected_live = 0
        self.counting_false = True
        sim.net.loss = args.loss
        dropped0 = sim.net.dropped["loss"]
        sent0 = sim.net.sent
        self.run(args.loss_window)
        sim.net.loss = 0.0
        self.counting_false = False
        wrongly = {(i, j) for _, i, j in self.false_offline}
        self.result["loss"] = {
            "loss": args.loss,
            "seconds": args.loss_window,
            "false_offline": len(self.false_offline),
            "false_offline_pairs": len(wrongly),
            "suspicions_of_live": self.suspected_live,
            "dropped": sim.net.dropped["loss"] - dropped0,
            "sent": sim.net.sent - sent0,
            "liveness_offline_metric": sum(node.node.metrics.get("liveness_offline")
                                          for node in sim.live()) - live_before,
            "knowledge_after": self.knowledge(),
        }

    def run_all(self) -> dict:
        self.result["budget"] = {"max_seconds": self.args.max_seconds,
                                 "max_rss_gb": self.args.max_rss_gb}
        try:
            if self.args.warm:
                self.progress("warm start: every registry filled from the others' announcements")
                self.warm_start()
                self.progress("warm start done")
            else:
                self.progress("cold start")
                converged = self.cold_start()
                self.progress(f"cold start done, converged={converged}")
            self.steady()
            self.progress("steady state done")
            self.join()
            self.progress("join done")
            self.dead()
            self.progress("dead node done")
            self.lossy()
            self.progress("loss done")
            self.result["finished"] = True
        except OutOfBudget as e:
            self.result["finished"] = False
            self.result["reason"] = str(e)
            self.result["knowledge_reached"] = self.known / max(1, self.n * (self.n - 1))
            self.progress(f"stopped: {e}")
        self.result["traffic"] = self.traffic_summary()
        self.result["wall_seconds"] = time.monotonic() - self.wall_start
        self.result["cpu_seconds"] = time.process_time()
        self.result["rss_gb"] = rss_gb()
        return self.result


def fmt(value, spec=".1f", unit="") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def report(config: MeshConfig, args, results: list[dict], version: str) -> None:
    print("# gossip benchmark (simulated network, real protocol code)")
    print(f"code: {version}")
    print("command: " + " ".join([".venv/bin/python", "scripts/bench/gossip.py"] + sys.argv[1:]))
    print("config: " + ", ".join(f"{k}={getattr(config, k)}" for k in CONFIG_FIELDS))
    print(f"network: latency {args.latency * 1000:.0f} ms one way, no loss except phase 5; "
          f"seed {args.seed}; {args.seeds} seed node(s), others started evenly over "
          f"{args.start_window:.0f} s and bootstrap from the seed(s)")
    print()
    rows = []
    for r in results:
        c = r.get("cold_start", {})
        s = r.get("steady", {})
        j = r.get("join", {})
        d = r.get("dead", {})
        l_ = r.get("loss", {})
        if "warm_start" in r:
            cold = "warm start"
        elif c.get("finished") and c.get("converged"):
            cold = fmt(c["sim_seconds"], ".1f", " s")
        elif c.get("finished"):
            cold = f"no ({c['knowledge']:.4f} at {args.cold_cap:.0f} s)"
        else:
            cold = "budget"
        rows.append([
            ("N", str(r["n"])),
            ("cold start", cold),
            ("after last start", fmt(c.get("after_last_start"), ".1f", " s")),
            ("cold wall / cpu", f"{fmt(c.get('wall_seconds'), '.0f')}/{fmt(c.get('cpu_seconds'), '.0f')} s"),
            ("msgs/node/s", fmt(s.get("msgs_per_node_s"), ".2f")),
            ("bytes/node/s", fmt(s.get("bytes_per_node_s"), ".0f")),
            ("join: all know", fmt(j.get("sim_seconds"), ".2f", " s") if j.get("everyone_knows")
             else (f"no ({j['fraction_knowing']:.3f})" if j else "-")),
            ("join p50/p90", f"{fmt(j.get('p50'), '.2f')}/{fmt(j.get('p90'), '.2f')} s"),
            ("dead: detected", fmt(d.get("last"), ".1f", " s") if d.get("all_detected")
             else ("no" if d else "-")),
            ("knew it died", f"{d['declared_offline_by']}/{d['live_others']}" if d else "-"),
            (f"false offline @{args.loss:.0%}", str(l_["false_offline"]) if l_ else "-"),
        ])
    headers = [name for name, _ in rows[0]] if rows else []
    widths = [max(len(h), *(len(row[k][1]) for row in rows)) for k, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(v.ljust(w) for (_, v), w in zip(row, widths)))
    print()
    for r in results:
        print(f"## N = {r['n']}: wall {r['wall_seconds']:.0f} s, cpu {r['cpu_seconds']:.0f} s "
              f"(process total), rss {r['rss_gb']:.1f} GB")
        if not r.get("finished"):
            print(f"  did not finish within budget: {r['reason']}; knowledge fraction "
                  f"reached {r['knowledge_reached']:.4f}")
        w = r.get("warm_start")
        if w:
            print(f"  warm start (no cold start measured): {r['n']} registries filled with "
                  f"{r['n'] - 1} verified announcements each in {w['wall_seconds']:.0f} s wall; "
                  f"converged() = {w['converged']}")
        c = r.get("cold_start")
        if c:
            if not c.get("finished"):
                print(f"  cold start: {c['nodes_started']}/{r['n']} nodes started, "
                      f"{c['sim_seconds']:.1f} s simulated in {c['wall_seconds']:.0f} s wall")
            else:
                marks = ", ".join(f"{float(k):.0%} at {fmt(v, '.1f', ' s')}"
                                  for k, v in c["marks"].items())
                print(f"  cold start: knowledge {marks}; converged() = {c['converged']}")
                m = c["missing"]
                print(f"  unknown (node, peer) pairs at the end: {m['pairs']} "
                      f"({m['nodes']} nodes lack {m['peers']} distinct peers)")
                received = sum(c["announcements"].values())
                lists = c["frames"].get("peer_list", 0)
                dup = c["announcements"].get("duplicate", 0)
                print(f"  announcements received (all nodes): {c['announcements']}; "
                      f"{dup / max(1, received):.1%} duplicates; {lists} PEER_LIST frames, "
                      f"{received / max(1, lists + c['frames'].get('announce', 0)):.1f} "
                      f"announcements per PEER_LIST/ANNOUNCE frame; frames sent {c['frames']}")
            if c.get("timeline"):
                print("  knowledge over time: " + ", ".join(
                    f"{t:g} s {f:.4f}" for t, f in c["timeline"]))
        s = r.get("steady")
        if s:
            print(f"  steady state over {s['seconds']:.0f} s: {s['msgs_per_node_s']:.2f} frames "
                  f"and {s['bytes_per_node_s']:.0f} B per node per s (busiest node "
                  f"{s['max_node_msgs_s']:.2f} frames/s); by type "
                  + ", ".join(f"{k} {v}" for k, v in s["by_type_per_node_s"].items()))
            g = s["graph"]
            print(f"  active sets: out-degree {g['out_min']}/{g['out_mean']:.1f}/{g['out_max']}, "
                  f"in-degree {g['in_min']}/{g['in_mean']:.1f}/{g['in_max']} (min/mean/max), "
                  f"{g['in_zero']} nodes in nobody's active set")
        tr = r.get("traffic")
        if tr:
            print(f"  traffic in 10 s buckets over the whole run: median {tr['median_msgs']:.2f} "
                  f"frames/{tr['median_bytes']:.0f} B per node per s; busiest bucket at "
                  f"{tr['peak_at']:.0f} s: {tr['peak_msgs']:.2f} frames/{tr['peak_bytes']:.0f} B "
                  f"per node per s")
            print("  per-node frames/s by bucket start: " + ", ".join(
                f"{t:g}:{m}" for t, m, _ in tr["buckets"]))
            print("  rumour backlog per node (queued rumours/transmissions left) every 10 s: "
                  + ", ".join(f"{t:g}:{q:g}/{left:g}" for t, q, left in tr["backlog"]
                              if q or left))
        j = r.get("join")
        if j:
            print(f"  join: {j['fraction_knowing']:.4f} of nodes know the newcomer; p50 "
                  f"{fmt(j['p50'], '.2f')} s, p90 {fmt(j['p90'], '.2f')} s, p99 "
                  f"{fmt(j['p99'], '.2f')} s, all {fmt(j['sim_seconds'], '.2f')} s; newcomer "
                  f"knows {j['newcomer_knows']:.4f} of the mesh; frames sent meanwhile "
                  f"{j['frames_during']}")
        d = r.get("dead")
        if d:
            print(f"  dead node: {d['watchers']} nodes had it in their active set; first "
                  f"detection {fmt(d['first'], '.1f')} s, all {fmt(d['last'], '.1f')} s "
                  f"(nominal keepalive*(suspect_after_missed+1)+indirect_timeout = "
                  f"{d['bound']:.0f} s); {d['declared_offline_by']} nodes declared it "
                  f"offline; its state in the live registries: {d['states_elsewhere']}")
        l_ = r.get("loss")
        if l_:
            print(f"  {l_['loss']:.0%} loss for {l_['seconds']:.0f} s: {l_['false_offline']} false "
                  f"offline declarations ({l_['false_offline_pairs']} distinct pairs), "
                  f"{l_['suspicions_of_live']} suspicions of live nodes, "
                  f"{l_['dropped']}/{l_['sent']} datagrams dropped; knowledge after "
                  f"{l_['knowledge_after']:.4f}")
        print()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000",
                        help="comma-separated mesh sizes (default 100,1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1,
                        help="bootstrap seed nodes (default 1: node 0)")
    parser.add_argument("--loss", type=float, default=0.10,
                        help="random loss on every link in phase 5 (default 0.10)")
    parser.add_argument("--latency", type=float, default=0.02,
                        help="one-way latency in seconds (default 0.02)")
    parser.add_argument("--start-window", type=float, default=10.0,
                        help="simulated seconds over which the nodes start (default 10)")
    parser.add_argument("--warm", action="store_true",
                        help="skip the cold start: every node starts with every other's "
                             "announcement in its registry (a restart with saved peer "
                             "files; signatures still verified), to measure the other "
                             "phases at sizes whose cold start is too slow to simulate")
    parser.add_argument("--cold-cap", type=float, default=120.0,
                        help="simulated seconds allowed for the cold start (default 120)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="simulated seconds run after convergence before measuring")
    parser.add_argument("--steady", type=float, default=60.0,
                        help="steady-state measurement window, simulated seconds")
    parser.add_argument("--join-cap", type=float, default=120.0)
    parser.add_argument("--dead-cap", type=float, default=180.0)
    parser.add_argument("--loss-window", type=float, default=300.0)
    parser.add_argument("--max-seconds", type=float, default=1800.0,
                        help="wall-clock budget per size (default 1800)")
    parser.add_argument("--max-rss-gb", type=float, default=16.0,
                        help="memory budget (resident set) per process (default 16)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, not {args.sizes!r}")
    if any(s < 3 for s in args.sizes):
        parser.error("every size must be at least 3")
    if not 0 <= args.loss < 1:
        parser.error("--loss must be in [0, 1)")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    version = code_version()
    results = []
    for n in args.sizes:
        bench = Bench(n, args)
        results.append(bench.run_all())
        bench.sim.stop()
        del bench
    config = MeshConfig()
    if args.json:
        json.dump({"code": version,
                   "config": {k: getattr(config, k) for k in CONFIG_FIELDS},
                   "args": {k: v for k, v in vars(args).items()},
                   "results": results}, sys.stdout, indent=2, default=str)
        print()
    else:
        report(config, args, results, version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
