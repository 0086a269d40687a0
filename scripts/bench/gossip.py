#!/usr/bin/env python3
"""
Membership benchmark: how fast a mesh of N nodes learns who joined, who
died and who left, and what that costs, at each mesh size N.

Two implementations run the same phases, measured the same way:

  real   the product's MeshNode (its liveness, gossip, membership and
         anti-entropy, sealing, codecs) on the in-memory simulated network
         (L{omerta.testing.meshsim});
  model  L{omerta.testing.membership_model}: a discrete-event MODEL of the
         same protocol with compact per-node state, for sizes whose real
         registries do not fit in memory.  At sizes where both run, both
         are printed side by side: that is the model's validation.

A real run is made where its projected memory (measured bytes per registry
record and per node, times N^2 and N) fits --max-rss-gb; the model runs at
every size (--no-model / --no-real to skip one).

Phases, each after the previous one:
 1. cold start: node 0 is the seed; nodes 1..N-1 start evenly over
    --start-window seconds, bootstrapping from it.  Simulated seconds until
    every node knows every other, and the wall seconds that took;
 2. steady state: after --settle s, frames and bytes each node sends per
    second over --steady s, by message type, and the signatures made and
    checked;
 3. join: a node joins through node 0; seconds until every node knows it;
 4. dead node: a random node is killed without a goodbye; seconds until
    the first of its neighbours (the nodes with it in their active set)
    declares it gone ("peer_gone"), until all its neighbours have, and
    until every live node knows it gone;
 5. clean leave: a random node stops cleanly (its signed LEFT notice);
    seconds until every live node knows it left;
 6. loss: --loss random loss on every datagram for --loss-window s; live
    nodes declared gone ("peer_gone" about a node that is running: false
    offline), suspicions of live nodes raised, and refutations.

    .venv/bin/python scripts/bench/gossip.py [--sizes 100,1000,10000]
        [--fast-signatures] [--seed 1] [--loss 0.10] [--latency 0.02]
        [--max-seconds 3600] [--max-rss-gb 20] [--json]

Times are simulated seconds unless marked wall.  Progress goes to stderr,
the tables (or JSON) to stdout.  --fast-signatures replaces Ed25519 with a
keyed hash in this process only (L{omerta.testing.fastsig}); the real
Ed25519 cost is then measured in the same run and reported per node per
second from the signatures the run counted.  A run that uses up its wall
or memory budget is reported as "did not finish within budget", with how
far it got.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from omerta.mesh.node import MeshConfig  # noqa: E402
from omerta.testing import fastsig  # noqa: E402
from omerta.testing.membership_model import MembershipModel  # noqa: E402
from omerta.testing.meshsim import MeshSim  # noqa: E402
from omerta.wire.envelope import MAGIC  # noqa: E402
from omerta.wire.messages import MessageType  # noqa: E402

CONFIG_FIELDS = (
    "keepalive", "ping_retry", "ping_retries", "suspect_after_missed", "indirect_timeout",
    "indirect_helpers", "degree", "max_active", "gossip_interval", "fanout",
    "retransmit_mult", "gossip_hop_limit", "sync_interval", "suspicion_mult",
    "suspicion_max_mult", "suspicion_confirmations", "reconnect_interval", "reannounce",
)
PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = 1024 ** 3
TARGETS = {
    "join_s": 3.0, "dead_neighbours_s": 10.0, "dead_all_s": 15.0, "false_offline": 0,
}


def code_version() -> str:
    """
    The commit the protocol code comes from, and whether omerta/ differs
    from it (work in progress), so a figure can be tied to the code.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "omerta"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes under omerta/" if dirty else "")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def address(i: int) -> str:
    return f"10.{i // 62500 % 250 + 1}.{i // 250 % 250}.{i % 250 + 1}"


def frame_type(data: bytes) -> str:
    """The message type in a frame's clear header (what the simulator counts by)."""
    if data[:2] != MAGIC or len(data) < 4:
        return "other"
    try:
        return MessageType(data[3] & 0x3F).name.lower()
    except ValueError:
        return "other"


class OutOfBudget(Exception):
    """The wall-clock or memory budget of this run ran out."""


# -- memory ------------------------------------------------------------------


def measure_memory(records: int = 600, registries: int = 8, nodes: int = 30) -> dict:
    """
    Bytes per registry record (the product's PeerRegistry holding verified
    announcements) and per simulated node without peers (MeshNode, its
    overlay, socket and timers), measured with tracemalloc.
    """
    from omerta.crypto.announce import sign_announcement
    from omerta.crypto.identity import Identity
    from omerta.mesh.registry import PeerRegistry
    from omerta.wire.messages import parse_record

    network_id = bytes(8)
    sim = MeshSim(seed=0)
    one = sim.add_node("10.9.0.1", name="n5000")
    sim.run(0.1)
    record = parse_record(one.overlay.gossip.own_announcement()["record"])
    template = {key: record[key] for key in (
        "sequence", "timestamp_ms", "ttl_s", "nat_type", "capabilities", "paths", "resources")}
    signed = [sign_announcement(Identity.generate(), network_id,
                                dict(template, name=f"n{5000 + k}"))
              for k in range(records)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held = []
    for _ in range(registries):
        registry = PeerRegistry(network_id, bytes(16), max_peers=records + 10)
        for announcement in signed:
            registry.accept(announcement, 1.0)
        held.append(registry)
    gc.collect()
    per_record = (tracemalloc.get_traced_memory()[0] - before) / (records * registries)
    del held
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for k in range(nodes):
        sim.add_node(f"10.9.1.{k + 1}", name=f"n{5000 + k}")
    sim.run(0.5)
    gc.collect()
    per_node = (tracemalloc.get_traced_memory()[0] - before) / nodes
    tracemalloc.stop()
    sim.stop()
    return {"bytes_per_record": per_record, "bytes_per_node": per_node}


def projected_bytes(memory: dict, n: int) -> float:
    """Memory a real run of N nodes needs for its registries and nodes."""
    return n * (n - 1) * memory["bytes_per_record"] + n * memory["bytes_per_node"]


# -- the two implementations behind one interface ------------------------------


class RealMesh:
    """N real MeshNodes on the simulated network."""

    kind = "real"

    def __init__(self, n: int, args, hooks):
        self.sim = MeshSim(seed=args.seed, latency=args.latency, classify=frame_type)
        self.hooks = hooks
        self.nodes: list = []
        self.index: dict[bytes, int] = {}

    @property
    def now(self) -> float:
        return self.sim.clock.seconds()

    def run(self, seconds: float) -> None:
        self.sim.net.run(seconds)

    def call_later(self, delay: float, function, *args) -> None:
        self.sim.clock.callLater(delay, function, *args)

    def add(self, i: int, bootstrap: list[int]) -> None:
        ip = f"198.51.100.{i + 1}" if i == 0 else address(i)
        node = self.sim.add_node(ip, bootstrap=[self.nodes[b] for b in bootstrap],
                                 name=f"n{i}")
        self.nodes.append(node)
        self.index[node.peer_id] = i
        events, hooks, index = node.node.events, self.hooks, self.index
        events.subscribe("peer_discovered", lambda peer_id, network, i=i:
                         hooks.discovered(i, index.get(peer_id)))
        events.subscribe("peer_gone", lambda peer_id, network, reason, i=i:
                         hooks.gone(i, index.get(peer_id), reason))
        events.subscribe("member_suspected", lambda peer_id, network, i=i:
                         hooks.suspected(i, index.get(peer_id)))
        events.subscribe("peer_disconnected", lambda peer_id, network, i=i:
                         hooks.disconnected(i, index.get(peer_id)))

    def fill(self) -> None:
        """
        Every registry holds every other node's announcement, put there by
        C{PeerRegistry.accept} (signatures checked), as when a mesh restarts
        with saved peer files.
        """
        now = self.sim.clock.seconds()
        signed = [node.overlay.gossip.own_announcement() for node in self.nodes]
        for k, node in enumerate(self.nodes):
            registry = node.overlay.registry
            for j, announcement in enumerate(signed):
                if j != k:
                    registry.accept(announcement, now)
            # (as after a restart: its own announcement is its only rumour,
            # not what it heard in the second before)
            gossip = node.overlay.gossip
            gossip.rumours = {k: r for k, r in gossip.rumours.items() if k == node.peer_id}

    def kill(self, i: int) -> None:
        self.sim.kill(self.nodes[i])

    def leave(self, i: int) -> None:
        self.sim.leave(self.nodes[i])

    def set_loss(self, loss: float) -> None:
        self.sim.net.loss = loss

    def links_of(self, i: int) -> list[int]:
        return [self.index[p] for p in self.nodes[i].overlay.liveness.links if p in self.index]

    def gone_known(self, i: int, j: int) -> bool:
        record = self.nodes[i].overlay.registry.get(self.nodes[j].peer_id)
        return record is not None and record.state == "offline"

    def traffic(self) -> tuple[Counter, Counter]:
        net = self.sim.net
        return Counter(net.sent_by_kind), Counter(net.bytes_by_kind)

    def signatures(self) -> tuple[Counter, Counter] | None:
        counts = fastsig.active()
        return None if counts is None else counts.snapshot()

    def refutations(self) -> int:
        return sum(node.node.metrics.get("membership_refuted") for node in self.nodes)

    def rumour_backlog(self, live: list[int]) -> float:
        return sum(len(self.nodes[i].overlay.gossip.rumours) for i in live) / max(1, len(live))

    def stop(self) -> None:
        self.sim.stop()


class ModelMesh:
    """The discrete-event model of the same protocol."""

    kind = "model"

    def __init__(self, n: int, args, hooks):
        self.model = MembershipModel(capacity=n + args.joins, seed=args.seed,
                                     latency=args.latency)
        self.hooks = hooks
        model = self.model
        model.on("discovered", lambda i, j, now: hooks.discovered(i, j))
        model.on("gone", lambda i, j, now, reason: hooks.gone(i, j, reason))
        model.on("suspected", lambda i, j, now: hooks.suspected(i, j))
        model.on("disconnected", lambda i, j, now: hooks.disconnected(i, j))

    @property
    def now(self) -> float:
        return self.model.now

    def run(self, seconds: float) -> None:
        self.model.run(seconds)

    def call_later(self, delay: float, function, *args) -> None:
        self.model.call_later(delay, function, *args)

    def add(self, i: int, bootstrap: list[int]) -> None:
        added = self.model.add_node(bootstrap)
        assert added == i, (added, i)

    def fill(self) -> None:
        self.model.fill_registries()

    def kill(self, i: int) -> None:
        self.model.kill(i)

    def leave(self, i: int) -> None:
        self.model.leave(i)

    def set_loss(self, loss: float) -> None:
        self.model.loss = loss

    def links_of(self, i: int) -> list[int]:
        return self.model.links_of(i)

    def gone_known(self, i: int, j: int) -> bool:
        return self.model.state_of(i, j) == "offline"

    def traffic(self) -> tuple[Counter, Counter]:
        return Counter(self.model.frames), Counter(self.model.bytes)

    def signatures(self) -> tuple[Counter, Counter]:
        return Counter(self.model.signed), Counter(self.model.verified)

    def refutations(self) -> int:
        return self.model.counters["refuted"]

    def rumour_backlog(self, live: list[int]) -> float:
        return sum(self.model.nodes[i].rumours for i in live) / max(1, len(live))

    def stop(self) -> None:
        pass


# -- the phases ------------------------------------------------------------------


class Bench:
    """
    One mesh of N nodes (real or model) and the measurements on it.  What
    nodes learn is observed through their events, so the checks between
    simulation steps cost O(1), never O(N^2).
    """

    def __init__(self, n: int, args, implementation, timing):
        self.n = n
        self.args = args
        self.implementation = implementation
        self.timing = timing
        self.wall_start = time.monotonic()
        self.deadline = self.wall_start + args.max_seconds
        self.last_progress = self.wall_start
        self.mesh = implementation(n, args, self)
        self.alive: set[int] = set()
        self.added = 0
        self.known = 0
        self.watch_join: int | None = None
        self.join_known: dict[int, float] = {}
        self.watch_gone: int | None = None
        self.gone_at: dict[int, float] = {}
        self.gone_reasons: Counter = Counter()
        self.counting = False
        self.false_gone: list[tuple[float, int, int]] = []
        self.false_gone_outside: list[tuple[float, int, int, str]] = []
        self.suspected_live = 0
        self.dropped_live = 0
        self.phase = "cold start"
        self.result: dict = {"n": n, "impl": self.mesh.kind}

    # events from either implementation

    def discovered(self, i: int, j: int | None) -> None:
        self.known += 1
        if j is not None and j == self.watch_join:
            self.join_known.setdefault(i, self.mesh.now)

    def gone(self, i: int, j: int | None, reason: str) -> None:
        if j is None:
            return
        if j == self.watch_gone:
            self.gone_at.setdefault(i, self.mesh.now)
            self.gone_reasons[reason] += 1
        elif j in self.alive:
            if self.counting:
                self.false_gone.append((self.mesh.now, i, j))
            else:
                self.false_gone_outside.append((self.mesh.now, i, j, self.phase))

    def suspected(self, i: int, j: int | None) -> None:
        if self.counting and j in self.alive:
            self.suspected_live += 1

    def disconnected(self, i: int, j: int | None) -> None:
        if self.counting and j in self.alive:
            self.dropped_live += 1

    # running with a budget

    def check_budget(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise OutOfBudget(f"wall-clock budget of {self.args.max_seconds:.0f} s used up")
        if now - self.last_progress > 15:
            self.last_progress = now
            rss = rss_bytes() / GIB
            pairs = max(1, self.n * (self.n - 1))
            self.progress(f"{self.phase}: t={self.mesh.now:.1f}s sim, knowledge "
                          f"{self.known / pairs:.4f}, rss {rss:.1f} GiB")
            if rss > self.args.max_rss_gb:
                raise OutOfBudget(f"memory budget of {self.args.max_rss_gb} GiB used up "
                                  f"(rss {rss:.1f} GiB)")

    def progress(self, message: str) -> None:
        wall = time.monotonic() - self.wall_start
        print(f"[N={self.n} {self.mesh.kind} wall {wall:7.1f}s] {message}", file=sys.stderr,
              flush=True)

    def run(self, seconds: float, step: float = 0.5) -> None:
        end = self.mesh.now + seconds
        while self.mesh.now < end - 1e-9:
            self.mesh.run(min(step, end - self.mesh.now))
            self.check_budget()

    def run_until(self, predicate, timeout: float, step: float = 0.1) -> bool:
        """
        Advance in C{step}s until C{predicate()}; when something happened is
        taken from the events' timestamps, not from the step.
        """
        end = self.mesh.now + timeout
        while not predicate():
            if self.mesh.now >= end - 1e-9:
                return False
            self.mesh.run(min(step, end - self.mesh.now))
            self.check_budget()
        return True

    def live(self) -> list[int]:
        return sorted(self.alive)

    def add(self, i: int, bootstrap: list[int]) -> None:
        self.mesh.add(i, bootstrap)
        self.alive.add(i)
        self.added += 1

    # phases

    def cold_start(self) -> None:
        args, mesh, n = self.args, self.mesh, self.n
        self.add(0, [])
        spacing = args.start_window / max(1, n - 2)
        for k in range(1, n):
            mesh.call_later((k - 1) * spacing, self.add, k, [0])
        pairs = n * (n - 1)
        marks = {0.5: None, 0.9: None, 0.99: None, 1.0: None}
        wall0 = time.monotonic()
        step = min(0.1, 100.0 / n) if mesh.kind == "real" else 0.5
        result = self.result["cold_start"] = {"finished": False, "marks": marks}
        signatures0 = mesh.signatures()
        converged = False
        cap = args.cold_cap if mesh.kind == "real" else args.model_cold_cap
        result["cap"] = cap
        while mesh.now < cap:
            mesh.run(step)
            fraction = self.known / pairs
            for mark in marks:
                if marks[mark] is None and fraction >= mark:
                    marks[mark] = mesh.now
            result.update(sim_seconds=mesh.now, knowledge=fraction,
                          wall_seconds=time.monotonic() - wall0)
            if len(self.alive) == n and self.known >= pairs:
                converged = True
                break
            self.check_budget()
            if time.monotonic() - wall0 > args.cold_wall:
                # the phases after it have their own mesh: they still run
                result["cut_by_wall"] = True
                break
        result.update(finished=True, converged=converged, reached_s=mesh.now,
                      sim_seconds=mesh.now if converged else None,
                      after_last_start=mesh.now - spacing * (n - 2) if converged else None,
                      wall_seconds=time.monotonic() - wall0, rss_gib=rss_bytes() / GIB,
                      rumour_backlog=mesh.rumour_backlog(self.live()))
        signatures1 = mesh.signatures()
        if signatures0 is not None and signatures1 is not None and self.timing is not None:
            result["crypto"] = fastsig.real_cost(
                self.timing, signatures1[0] - signatures0[0], signatures1[1] - signatures0[1],
                n * mesh.now)

    def warm_start(self) -> None:
        """
        The phases after the cold start run on a second mesh of N nodes,
        all started at once with every registry full (as a restart with
        saved peer files): a converged mesh with nothing left to pass on,
        whatever the cold start left behind.
        """
        self.phase = "warm start"
        self.mesh.stop()
        self.mesh = None
        gc.collect()
        wall0 = time.monotonic()
        self.mesh = self.implementation(self.n, self.args, self)
        self.alive.clear()
        self.added = 0
        # N - joins nodes, so that with the newcomers the mesh has N
        # (started within one second, so their timers are not in step)
        size = self.n - self.args.joins
        rng = random.Random(self.args.seed)
        self.add(0, [])
        for i, delay in enumerate(sorted(rng.random() for _ in range(1, size)), 1):
            self.mesh.call_later(delay, self.add, i, [0])
        self.mesh.run(1.0)
        self.mesh.fill()
        self.known = size * (size - 1)
        self.result["warm_start"] = {"wall_seconds": time.monotonic() - wall0}

    def steady(self) -> None:
        self.phase = "steady state"
        mesh, seconds = self.mesh, self.args.steady
        self.run(self.args.settle)
        # The cold start leaves each node rumours to pass on (every record
        # it learnt); the steady state begins when they are passed on.
        drain_start = mesh.now
        drained = self.run_until(lambda: mesh.rumour_backlog(self.live()) < 1.0,
                                 self.args.drain_cap, step=1.0)
        drain = {"drained": drained, "seconds": mesh.now - drain_start,
                 "since_converged": mesh.now - drain_start + self.args.settle}
        frames0, bytes0 = mesh.traffic()
        signatures0 = mesh.signatures()
        backlog0 = mesh.rumour_backlog(self.live())
        self.run(seconds)
        frames1, bytes1 = mesh.traffic()
        count = len(self.alive)
        frames, sent = frames1 - frames0, bytes1 - bytes0
        node_seconds = count * seconds
        result = self.result["steady"] = {
            "seconds": seconds,
            "frames_per_node_s": sum(frames.values()) / node_seconds,
            "bytes_per_node_s": sum(sent.values()) / node_seconds,
            "by_type": {k: (round(frames[k] / node_seconds, 3), round(sent[k] / node_seconds))
                        for k in sorted(frames1) if frames[k] or sent[k]},
            "rumour_backlog": (backlog0, mesh.rumour_backlog(self.live())),
            "drain": drain,
        }
        signatures1 = mesh.signatures()
        if signatures0 is not None and signatures1 is not None and self.timing is not None:
            result["crypto"] = fastsig.real_cost(
                self.timing, signatures1[0] - signatures0[0], signatures1[1] - signatures0[1],
                node_seconds)

    def join(self) -> None:
        """
        --joins nodes join one after the other through node 0 (each once
        the mesh knows the previous one, or its cap ran out).
        """
        self.phase = "join"
        mesh = self.mesh
        joins = []
        for k in range(self.args.joins):
            others = self.live()
            newcomer = self.added
            start = mesh.now
            self.watch_join, self.join_known = newcomer, {}
            self.add(newcomer, [0])
            target = set(others)

            def everyone_knows():
                return len(self.join_known) >= len(target)

            done = self.run_until(everyone_knows, self.args.join_cap)
            times = sorted(t - start for i, t in self.join_known.items() if i in target)
            joins.append({"everyone_knows": done, "all_s": times[-1] if done else None,
                          "p50": quantile(times, 0.5), "p90": quantile(times, 0.9),
                          "fraction_knowing": len(times) / len(target)})
        self.watch_join = None
        everyone = all(j["everyone_knows"] for j in joins)
        self.result["join"] = {
            "joins": joins, "everyone_knows": everyone,
            "all_s": max(j["all_s"] for j in joins) if everyone else None,
            "fraction_knowing": min(j["fraction_knowing"] for j in joins),
        }

    def _victim(self, rng: random.Random) -> int:
        return rng.choice([i for i in self.live() if i != 0])

    def dead(self) -> None:
        """
        --deaths nodes, one after the other, are killed without a goodbye;
        each once every live node knows the previous one gone (or its cap
        ran out).  The figures are the worst of them.
        """
        self.phase = "dead node"
        mesh = self.mesh
        rng = random.Random(self.args.seed)
        trials = []
        for _ in range(self.args.deaths):
            victim = self._victim(rng)
            neighbours = [i for i in self.live() if victim in mesh.links_of(i)]
            self.watch_gone, self.gone_at = victim, {}
            self.gone_reasons.clear()
            start = mesh.now
            mesh.kill(victim)
            self.alive.discard(victim)
            live = self.live()

            def all_know():
                return len(self.gone_at) >= len(live)

            done = self.run_until(all_know, self.args.dead_cap)
            by_neighbours = [self.gone_at[i] - start for i in neighbours if i in self.gone_at]
            everyone = [self.gone_at[i] - start for i in live if i in self.gone_at]
            trials.append({
                "neighbours": len(neighbours),
                "first_neighbour_s": min(by_neighbours) if by_neighbours else None,
                "all_neighbours_s": (max(by_neighbours)
                                     if len(by_neighbours) == len(neighbours) else None),
                "first_s": min(everyone) if everyone else None,
                "all_live_s": max(everyone) if done else None,
                "p50_s": quantile(sorted(everyone), 0.5),
                "knowing": len(everyone), "live": len(live),
                "registry_offline": sum(1 for i in live if mesh.gone_known(i, victim)),
                "reasons": dict(self.gone_reasons),
            })
            self.watch_gone = None

        def worst(key):
            values = [t[key] for t in trials]
            return None if None in values else max(values)

        self.result["dead"] = {
            "trials": trials,
            "neighbours": min(t["neighbours"] for t in trials),
            "first_neighbour_s": worst("first_neighbour_s"),
            "all_neighbours_s": worst("all_neighbours_s"),
            "first_s": worst("first_s"),
            "all_live_s": worst("all_live_s"),
            "knowing": min(t["knowing"] for t in trials),
            "live": trials[-1]["live"],
        }

    def leave(self) -> None:
        self.phase = "clean leave"
        mesh = self.mesh
        victim = self._victim(random.Random(self.args.seed + 1000))
        self.watch_gone, self.gone_at = victim, {}
        self.gone_reasons.clear()
        start = mesh.now
        mesh.leave(victim)
        self.alive.discard(victim)
        live = self.live()

        def all_know():
            return len(self.gone_at) >= len(live)

        done = self.run_until(all_know, self.args.leave_cap)
        everyone = sorted(self.gone_at[i] - start for i in live if i in self.gone_at)
        self.result["leave"] = {
            "all_s": everyone[-1] if done else None,
            "p50": quantile(everyone, 0.5), "knowing": len(everyone), "live": len(live),
            "reasons": dict(self.gone_reasons),
        }
        self.watch_gone = None

    def lossy(self) -> None:
        self.phase = "loss"
        mesh, args = self.mesh, self.args
        self.false_gone.clear()
        self.suspected_live = self.dropped_live = 0
        refuted0 = mesh.refutations()
        frames0, _ = mesh.traffic()
        self.counting = True
        mesh.set_loss(args.loss)
        try:
            self.run(args.loss_window)
        finally:
            mesh.set_loss(0.0)
            self.counting = False
        frames1, _ = mesh.traffic()
        self.result["loss"] = {
            "loss": args.loss, "seconds": args.loss_window,
            "false_offline": len(self.false_gone),
            "false_offline_pairs": len({(i, j) for _, i, j in self.false_gone}),
            "suspicions_of_live": self.suspected_live,
            "refutations": mesh.refutations() - refuted0,
            "links_dropped_to_live": self.dropped_live,
            "frames_per_node_s": sum((frames1 - frames0).values())
            / len(self.alive) / args.loss_window,
        }

    def run_all(self) -> dict:
        self.result["budget"] = {"max_seconds": self.args.max_seconds,
                                 "max_rss_gb": self.args.max_rss_gb}
        try:
            self.progress("cold start")
            self.cold_start()
            self.progress(f"cold start done at {self.mesh.now:.1f} s")
            if self.args.later_phases == "warm":
                self.warm_start()
                self.progress("warm start done")
            for phase in (self.steady, self.join, self.dead, self.leave, self.lossy):
                phase()
                self.progress(f"{self.phase} done")
            self.result["finished"] = True
        except OutOfBudget as e:
            self.result["finished"] = False
            self.result["reason"] = str(e)
            self.result["stopped_in"] = self.phase
            self.result["sim_seconds_reached"] = self.mesh.now
            self.result["knowledge_reached"] = self.known / max(1, self.n * (self.n - 1))
            self.progress(f"stopped: {e}")
        self.result["false_offline_outside_loss"] = len(self.false_gone_outside)
        self.result["wall_seconds"] = time.monotonic() - self.wall_start
        self.result["rss_gib"] = rss_bytes() / GIB
        self.mesh.stop()
        return self.result


def quantile(values: list[float], q: float):
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


# -- the report ------------------------------------------------------------------


def fmt(value, spec=".1f", unit="") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def row(r: dict, args) -> list[tuple[str, str]]:
    c, s, j = r.get("cold_start", {}), r.get("steady", {}), r.get("join", {})
    d, le, lo = r.get("dead", {}), r.get("leave", {}), r.get("loss", {})
    if r.get("skipped"):
        return [("N", str(r["n"])), ("run", r["impl"]), ("cold start 100%", r["skipped"])]
    if c.get("converged"):
        cold = f"{c['sim_seconds']:.1f} s / {c['wall_seconds']:.0f} s"
    elif c.get("finished"):
        cold = (f"no: {c['knowledge']:.4f} at {c.get('reached_s', c.get('cap', 0)):.0f} s"
                + (" (wall)" if c.get("cut_by_wall") else ""))
    elif c:
        cold = f"budget: {c.get('knowledge', 0):.4f} at {c.get('sim_seconds', 0):.1f} s"
    else:
        cold = "-"
    if d:
        dead = (f"{fmt(d['first_neighbour_s'], '.1f')} / {fmt(d['all_neighbours_s'], '.1f')}"
                f" / {fmt(d['all_live_s'], '.1f')}"
                + ("" if d["all_live_s"] is not None else f" ({d['knowing']}/{d['live']})"))
    else:
        dead = "-"
    if le:
        leave = fmt(le["all_s"], ".2f", " s") if le["all_s"] is not None \
            else f"no ({le['knowing']}/{le['live']})"
    else:
        leave = "-"
    if j:
        join = fmt(j["all_s"], ".2f", " s") if j["everyone_knows"] \
            else f"no ({j['fraction_knowing']:.3f})"
    else:
        join = "-"
    loss = (f"{lo['false_offline']} ({lo['links_dropped_to_live']}/{lo['refutations']})"
            if lo else "-")
    return [
        ("N", str(r["n"])),
        ("run", r["impl"] + ("" if r.get("finished") else "*")),
        ("cold start 100% sim/wall", cold),
        ("join: all know (worst)", join),
        ("dead (worst): 1st nbr / all nbrs / all live", dead),
        ("leave: all know", leave),
        (f"false offline @{args.loss:.0%} (raised/refuted)", loss),
        ("frames/node/s", fmt(s.get("frames_per_node_s"), ".2f")),
        ("bytes/node/s", fmt(s.get("bytes_per_node_s"), ".0f")),
    ]


def table(rows: list[list[tuple[str, str]]]) -> None:
    width = max(len(r) for r in rows)
    full = [r for r in rows if len(r) == width]
    headers = [name for name, _ in full[0]]
    widths = [max(len(h), *(len(r[k][1]) for r in rows if k < len(r)))
              for k, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(v.ljust(w) for (_, v), w in zip(r, widths)))


def report(args, results: list[dict], version: str, memory: dict, timing,
           config: dict | None = None, command: str | None = None) -> None:
    if config is None:
        config = {k: getattr(MeshConfig(), k, "?") for k in CONFIG_FIELDS}
    print("# membership benchmark: real nodes on the simulated network, and the model")
    print(f"code: {version}")
    print("command: " + (command or " ".join([".venv/bin/python", "scripts/bench/gossip.py"]
                                             + sys.argv[1:])))
    print("config: " + ", ".join(f"{k}={config.get(k, '?')}" for k in CONFIG_FIELDS))
    print(f"network: {args.latency * 1000:.0f} ms one way, loss only in the loss phase; seed "
          f"{args.seed}; node 0 is the seed, the others start evenly over "
          f"{args.start_window:.0f} s")
    print("signatures: " + ("SIMULATED (keyed hash, omerta.testing.fastsig) in the real runs; "
                            "the Ed25519 cost is computed below" if args.fast_signatures
                            else "real Ed25519 in the real runs"))
    if args.memo_records:
        print("record parsing: MEMOIZED in the real runs (omerta.testing.fastsig; same "
              "behaviour, but wall times omit the product's repeated construct parsing)")
    print("later phases: " + (
        "on a second mesh of N - joins nodes started with full registries (warm start, as "
        "after a restart with saved peer files), after --settle s; the newcomers make it N" if getattr(args, "later_phases", "after-cold")
        == "warm" else "on the mesh the cold start left, after --settle s and the drain of "
        "its rumours"))
    print("real  = the product's MeshNode on the in-memory simulated network")
    print("model = omerta/testing/membership_model.py, a discrete-event MODEL of the protocol "
          "(not the product)")
    print("*     = did not finish within budget (see below)")
    print()
    table([row(r, args) for r in results])
    print()
    print(f"targets: join all know <= {TARGETS['join_s']:.0f} s (1,000 and 10,000); dead: all "
          f"neighbours <= {TARGETS['dead_neighbours_s']:.0f} s, all live <= "
          f"{TARGETS['dead_all_s']:.0f} s; false offline at {args.loss:.0%} loss = 0; frames and "
          f"bytes per node per s growing no faster than log N")
    for r in results:
        if r.get("skipped"):
            continue
        misses = missed_targets(r)
        print(f"  N={r['n']} {r['impl']}: " + ("all met" if not misses else "; ".join(misses)))
    scaling(results)
    print()
    print(f"memory (real): {memory['bytes_per_record']:.0f} B per registry record, "
          f"{memory['bytes_per_node'] / 1024:.0f} KiB per node without peers (tracemalloc); a "
          f"full-fidelity run needs N(N-1) records: "
          + ", ".join(f"N={n}: {projected_bytes(memory, n) / GIB:.1f} GiB"
                      for n in sorted(set(args.sizes))))
    if timing is not None:
        print(f"Ed25519 in the benchmark's process: sign {timing.sign_us:.1f} us, verify "
              f"{timing.verify_us:.1f} us (best of 3 runs)")
    print()
    for r in results:
        detail(r, args)


def command_of(args) -> str:
    """The command line that gives C{args} (for a report from a saved run)."""
    defaults = vars(parse_args([]))
    words = [".venv/bin/python", "scripts/bench/gossip.py",
             "--sizes", ",".join(str(n) for n in args.sizes)]
    for key, value in sorted(vars(args).items()):
        if key in ("sizes", "report_from") or defaults.get(key) == value:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return " ".join(words)


def scaling(results: list[dict]) -> None:
    """
    Steady-state frames and bytes per node per second against N, next to
    how log N grows over the same sizes.
    """
    for kind in ("real", "model"):
        points = [(r["n"], r["steady"]) for r in results
                  if r["impl"] == kind and r.get("steady")]
        if len(points) < 2:
            continue
        (n0, s0), parts = points[0], []
        for n, steady in points[1:]:
            parts.append(
                f"N {n0}->{n}: frames x{steady['frames_per_node_s'] / s0['frames_per_node_s']:.2f}"
                f", bytes x{steady['bytes_per_node_s'] / s0['bytes_per_node_s']:.2f}"
                f" (log N x{math.log(n) / math.log(n0):.2f})")
        print(f"  steady traffic per node, {kind}: " + "; ".join(parts))


def missed_targets(r: dict) -> list[str]:
    out = []
    j, d, lo = r.get("join", {}), r.get("dead", {}), r.get("loss", {})
    if r["n"] >= 1000 and j:
        if not j["everyone_knows"] or j["all_s"] > TARGETS["join_s"]:
            out.append(f"join {fmt(j.get('all_s'), '.2f')} s > {TARGETS['join_s']:.0f} s")
    if d:
        if d["all_neighbours_s"] is None or d["all_neighbours_s"] > TARGETS["dead_neighbours_s"]:
            out.append(f"dead by neighbours {fmt(d['all_neighbours_s'], '.1f')} s > "
                       f"{TARGETS['dead_neighbours_s']:.0f} s")
        if d["all_live_s"] is None or d["all_live_s"] > TARGETS["dead_all_s"]:
            out.append(f"dead known by all {fmt(d['all_live_s'], '.1f')} s > "
                       f"{TARGETS['dead_all_s']:.0f} s")
    if lo and lo["false_offline"] > TARGETS["false_offline"]:
        out.append(f"{lo['false_offline']} false offline")
    if not r.get("finished"):
        out.append(f"did not finish ({r.get('stopped_in')})")
    return out


def detail(r: dict, args) -> None:
    if r.get("skipped"):
        print(f"## N = {r['n']} {r['impl']}: not run: {r['skipped']}")
        print()
        return
    print(f"## N = {r['n']} {r['impl']}: wall {r['wall_seconds']:.0f} s, rss after "
          f"{r['rss_gib']:.2f} GiB (process)")
    if not r.get("finished"):
        print(f"  did not finish within budget: {r['reason']}, in the {r['stopped_in']} phase "
              f"at {r['sim_seconds_reached']:.1f} s simulated; knowledge fraction reached "
              f"{r['knowledge_reached']:.4f}")
    c = r.get("cold_start")
    if c:
        marks = ", ".join(f"{float(k):.0%} at {fmt(v, '.1f', ' s')}"
                          for k, v in c["marks"].items())
        if c.get("cut_by_wall"):
            print(f"  cold start cut short by --cold-wall at {c['reached_s']:.1f} s simulated")
        print(f"  cold start: knowledge {marks}; wall {c.get('wall_seconds', 0):.0f} s; rumours "
              f"still queued per node at convergence {fmt(c.get('rumour_backlog'), '.0f')}")
        cr = c.get("crypto")
        if cr:
            print(f"  cold start signatures per node per s (averaged over the {c['sim_seconds'] or 0:.0f}"
                  f" s): {cr['signs_per_node_s']:.2f} made, {cr['verifies_per_node_s']:.2f} "
                  f"checked -> real Ed25519 cost {cr['cpu_us_per_node_s']:.0f} us CPU per node "
                  f"per s ({cr['cpu_fraction']:.2%} of a core)")
        if r["impl"] == "real" and c.get("rss_gib"):
            print(f"  memory after cold start: {c['rss_gib']:.2f} GiB process, "
                  f"{c['rss_gib'] * GIB / r['n'] / 1024:.0f} KiB per node")
    s = r.get("steady")
    if s:
        print(f"  steady state over {s['seconds']:.0f} s: {s['frames_per_node_s']:.2f} frames, "
              f"{s['bytes_per_node_s']:.0f} B per node per s; by type (frames, bytes): "
              + ", ".join(f"{k} {f}/{b}" for k, (f, b) in s["by_type"].items()))
        b0, b1 = s["rumour_backlog"]
        dr = s["drain"]
        print(f"  rumours queued at the start were " + (
            f"passed on {dr['since_converged']:.0f} s later" if dr["drained"] else
            f"still queued {dr['since_converged']:.0f} s later (--drain-cap)")
            + f"; rumours queued per node: {b0:.1f} at the start of the window, {b1:.1f} at "
              f"its end")
        cr = s.get("crypto")
        if cr:
            print(f"  signatures per node per s: {cr['signs_per_node_s']:.2f} made, "
                  f"{cr['verifies_per_node_s']:.2f} checked -> real Ed25519 cost "
                  f"{cr['cpu_us_per_node_s']:.0f} us CPU per node per s "
                  f"({cr['cpu_fraction']:.3%} of a core); by label "
                  + ", ".join(f"{k}: {v['signed']}/{v['verified']}"
                              for k, v in cr["by_label_per_node_s"].items()))
    j = r.get("join")
    if j:
        print(f"  join ({len(j['joins'])} newcomers one after the other): " + "; ".join(
            f"p50 {fmt(k['p50'], '.2f')} s, p90 {fmt(k['p90'], '.2f')} s, all "
            f"{fmt(k['all_s'], '.2f')} s ({k['fraction_knowing']:.4f} know)"
            for k in j["joins"]))
    d = r.get("dead")
    for t in (d or {}).get("trials", [d] if d else []):
        print(f"  dead node: {t['neighbours']} neighbours; first neighbour "
              f"{fmt(t['first_neighbour_s'], '.2f')} s, all neighbours "
              f"{fmt(t['all_neighbours_s'], '.2f')} s; first anyone {fmt(t['first_s'], '.2f')} s, "
              f"p50 {fmt(t.get('p50_s'), '.2f')} s, all live {fmt(t['all_live_s'], '.2f')} s "
              f"({t['knowing']}/{t['live']} peer_gone, {t['registry_offline']} registries say "
              f"offline; reasons {t['reasons']})")
    le = r.get("leave")
    if le:
        print(f"  clean leave: {le['knowing']}/{le['live']} know, p50 {fmt(le['p50'], '.2f')} s, "
              f"all {fmt(le['all_s'], '.2f')} s; reasons {le['reasons']}")
    lo = r.get("loss")
    if lo:
        print(f"  {lo['loss']:.0%} loss for {lo['seconds']:.0f} s: {lo['false_offline']} false "
              f"offline ({lo['false_offline_pairs']} pairs); suspicions of live nodes raised "
              f"(a link's peer not reached directly nor through helpers, then suspected): "
              f"{lo['links_dropped_to_live']}, held by {lo['suspicions_of_live']} node-suspicion "
              f"events in all; {lo['refutations']} refutations; "
              f"{lo['frames_per_node_s']:.2f} frames/node/s")
    print(f"  false offline outside the loss phase: {r.get('false_offline_outside_loss', 0)}")
    print()


# -- main ------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000",
                        help="comma-separated mesh sizes (default 100,1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loss", type=float, default=0.10,
                        help="random loss on every datagram in the loss phase (default 0.10)")
    parser.add_argument("--latency", type=float, default=0.02,
                        help="one-way latency in seconds (default 0.02)")
    parser.add_argument("--start-window", type=float, default=10.0,
                        help="simulated seconds over which the nodes start (default 10)")
    parser.add_argument("--cold-cap", type=float, default=120.0,
                        help="simulated seconds allowed for the real nodes' cold start "
                             "(default 120)")
    parser.add_argument("--cold-wall", type=float, default=float("inf"),
                        help="wall seconds after which a cold start that has not converged "
                             "is cut short; the later phases still run on their warm mesh "
                             "(default: no limit but --max-seconds)")
    parser.add_argument("--model-cold-cap", type=float, default=600.0,
                        help="simulated seconds allowed for the model's cold start "
                             "(default 600)")
    parser.add_argument("--later-phases", choices=("warm", "after-cold"), default="warm",
                        help="run the phases after the cold start on a second mesh started "
                             "with full registries (warm, the default: a converged mesh with "
                             "nothing left to pass on), or on what the cold start left "
                             "(after-cold)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="simulated seconds after convergence before measuring (default 30)")
    parser.add_argument("--drain-cap", type=float, default=600.0,
                        help="after --settle, simulated seconds allowed for the cold start's "
                             "rumours to be passed on before the steady state is measured "
                             "(default 600)")
    parser.add_argument("--steady", type=float, default=30.0,
                        help="steady-state window, simulated seconds (default 30)")
    parser.add_argument("--joins", type=int, default=3,
                        help="newcomers that join one after the other (default 3)")
    parser.add_argument("--join-cap", type=float, default=60.0)
    parser.add_argument("--deaths", type=int, default=3,
                        help="nodes killed one after the other (default 3)")
    parser.add_argument("--dead-cap", type=float, default=60.0)
    parser.add_argument("--leave-cap", type=float, default=30.0)
    parser.add_argument("--loss-window", type=float, default=120.0)
    parser.add_argument("--fast-signatures", action="store_true",
                        help="SIMULATED signatures (a keyed hash) instead of Ed25519 in the real "
                             "runs; the real Ed25519 cost is measured and reported separately")
    parser.add_argument("--memo-records", action="store_true",
                        help="memoize announcement-record parsing in the real runs (a pure "
                             "function; nothing the nodes do changes, only the wall time, "
                             "which then no longer shows that product cost)")
    parser.add_argument("--no-real", action="store_true", help="run only the model")
    parser.add_argument("--no-model", action="store_true", help="run only the real nodes")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="wall-clock budget per run (size and implementation; default 3600)")
    parser.add_argument("--max-rss-gb", type=float, default=20.0,
                        help="memory budget (resident set, GiB) of the process (default 20)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs (size and implementation) in parallel processes (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--json-file", help="also write the results as JSON to this file")
    parser.add_argument("--report-from", metavar="JSON_FILE",
                        help="print the tables of an earlier run's --json-file and exit")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, not {args.sizes!r}")
    if not args.sizes or any(s < 3 for s in args.sizes):
        parser.error("every size must be at least 3")
    if not 0 <= args.loss < 1:
        parser.error("--loss must be in [0, 1)")
    if args.joins < 1 or args.deaths < 1:
        parser.error("--joins and --deaths must be at least 1")
    if args.no_real and args.no_model:
        parser.error("--no-real and --no-model leave nothing to run")
    return args


def run_one(n: int, kind: str, args, timing) -> dict:
    """
    One size in one implementation, in this process (simulated signatures
    switched on for a real run when asked).
    """
    implementation = RealMesh if kind == "real" else ModelMesh
    real = kind == "real"
    signatures = (fastsig.simulated_signatures() if args.fast_signatures and real
                  else contextlib.nullcontext())
    records = (fastsig.memoized_record_parsing() if args.memo_records and real
               else contextlib.nullcontext())
    with signatures, records:
        result = Bench(n, args, implementation, timing).run_all()
    gc.collect()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_from:
        with open(args.report_from) as f:
            document = json.load(f)
        saved = argparse.Namespace(**document["args"])
        timing = fastsig.Ed25519Timing(document["ed25519_us"]["sign"],
                                       document["ed25519_us"]["verify"], 0)
        command = document.get("command") or command_of(saved)
        report(saved, document["results"], document["code"], document["memory"], timing,
               document["config"], command)
        return 0
    version = code_version()
    timing = fastsig.measure_ed25519()
    print("measuring memory per registry record and per node", file=sys.stderr, flush=True)
    memory = measure_memory()
    runs, results = [], {}
    for n in args.sizes:
        if not args.no_real:
            need = projected_bytes(memory, n)
            if need > args.max_rss_gb * GIB:
                results[(n, "real")] = {"n": n, "impl": "real", "skipped": (
                    f"needs ~{need / GIB:.0f} GiB ({n * (n - 1):.2g} registry records x "
                    f"{memory['bytes_per_record']:.0f} B) > --max-rss-gb "
                    f"{args.max_rss_gb:g}")}
            else:
                runs.append((n, "real"))
        if not args.no_model:
            runs.append((n, "model"))
    if args.jobs > 1 and len(runs) > 1:
        # One process per run, the most expensive first (each has its own
        # budget; --max-rss-gb is per process).
        cost = {"real": 1.0, "model": 0.01}
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = {pool.submit(run_one, n, kind, args, timing): (n, kind)
                       for n, kind in sorted(runs, key=lambda r: -r[0] ** 2 * cost[r[1]])}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
    else:
        for n, kind in runs:
            results[(n, kind)] = run_one(n, kind, args, timing)
    ordered = [results[key] for key in sorted(results, key=lambda k: (k[0], k[1] != "real"))]
    document = {"code": version,
                "command": " ".join([".venv/bin/python", "scripts/bench/gossip.py"]
                                    + (sys.argv[1:] if argv is None else list(argv))),
                "config": {k: getattr(MeshConfig(), k, None) for k in CONFIG_FIELDS},
                "args": vars(args), "memory": memory,
                "ed25519_us": {"sign": timing.sign_us, "verify": timing.verify_us},
                "results": ordered}
    if args.json_file:
        with open(args.json_file, "w") as f:
            json.dump(document, f, indent=2, default=str)
    if args.json:
        json.dump(document, sys.stdout, indent=2, default=str)
        print()
    else:
        report(args, ordered, version, memory, timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
