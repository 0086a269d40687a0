"""
What the NAT matrix measured, and the tables it is reported in: one
L{Trial} per CLI run, a L{PairResult} per (initiator, target) pair, a
L{FailoverResult} per failover case, and the markdown of docs/natlab-results.md.
Pure data and text: L{omerta.testing.matrix} runs the lab that fills them.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from omerta.testing.natlab import NAT_TYPES

#: Path kinds that count as a direct path.
DIRECT_KINDS = frozenset({"direct", "punched"})

def _expected(initiator: str, target: str) -> str:
    pair = {initiator, target}
    if pair & {"none", "full-cone"}:
        return "direct"
    if pair == {"symmetric"}:
        return "relayed"
    if pair == {"symmetric", "port-restricted"}:
        return "either"
    # cone/cone, and symmetric with restricted-cone
    return "direct"


#: The router variants of the matrix lab (docs/natlab.md, "Router
#: variants"): name -> what differs from a home router of each NAT type.
VARIANTS: dict[str, str] = {
    "home": "routers drop unsolicited UDP to themselves (a home router's firewall);"
            " mappings live 120 s",
    "open-input": "routers without that input filter: unsolicited UDP to the router itself"
                  " leaves a conntrack entry that can move a host's mapping; each reaches"
                  " the public segment through an ISP router of its own",
    "open-input-no-hop": "open-input routers side by side on the public segment, no router"
                         " between them (customers on one carrier Ethernet segment)",
    "short-timeout": "mappings forgotten after 30 s without traffic",
    "double-nat": "every router of a NAT type sits behind a carrier-grade NAT of its own"
                  " (port-restricted, no input filter, 30 s mappings, behind an ISP router)",
    "same-lan": "initiator and target on one LAN behind one router, which does not hairpin",
}


def effective_type(nat_type: str, variant: str = "home") -> str:
    """
    The NAT type a host of C{nat_type} shows the world in C{variant}: behind
    a port-restricted carrier NAT, a cone becomes port-restricted.
    """
    if variant == "double-nat" and nat_type in ("full-cone", "restricted-cone"):
        return "port-restricted"
    return nat_type


def expected_path(initiator: str, target: str, variant: str = "home") -> str:
    """
    What an (initiator, target) pair should end on in C{variant}: on one
    LAN always direct (the hosts' own addresses), otherwise as
    L{EXPECTED} says for the types they show the world.
    """
    if variant == "same-lan":
        return "direct"
    return EXPECTED[(effective_type(initiator, variant), effective_type(target, variant))]


#: What each (initiator NAT type, target NAT type) pair should end on:
#: "direct" (a direct or punched path), "relayed", or "either" (symmetric
#: with port-restricted: tried with port prediction, may end either way).
#: Every pair must connect.
EXPECTED: dict[tuple[str, str], str] = {
    (x, y): _expected(x, y) for x in NAT_TYPES for y in NAT_TYPES
}


# -- results ---------------------------------------------------------------------


@dataclass
class Trial:
    """
    One C{omerta mesh connect} from an initiator to a target.
    """

    initiator: str
    target: str
    ok: bool
    kind: str | None = None
    first_message_s: float | None = None
    direct_s: float | None = None
    punch_attempts: int | None = None
    rtt_ms: float | None = None
    wall_s: float = 0.0
    error: str | None = None
    document: dict | None = None

    @property
    def is_direct(self) -> bool:
        return self.ok and self.kind in DIRECT_KINDS


def _median(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _max(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


@dataclass
class PairResult:
    """
    All trials of one (initiator, target) pair and their summary.
    """

    initiator: str
    target: str
    loss: int
    trials: list[Trial] = field(default_factory=list)
    variant: str = "home"

    @property
    def expected(self) -> str:
        return expected_path(self.initiator, self.target, self.variant)

    @property
    def successes(self) -> int:
        return sum(1 for t in self.trials if t.ok)

    @property
    def kinds(self) -> Counter:
        return Counter(t.kind for t in self.trials if t.ok)

    @property
    def direct(self) -> int:
        return sum(1 for t in self.trials if t.is_direct)

    @property
    def relayed(self) -> int:
        return sum(1 for t in self.trials if t.ok and t.kind == "relayed")

    @property
    def first_message_median(self) -> float | None:
        return _median(t.first_message_s for t in self.trials if t.ok)

    @property
    def first_message_max(self) -> float | None:
        return _max(t.first_message_s for t in self.trials if t.ok)

    @property
    def direct_median(self) -> float | None:
        return _median(t.direct_s for t in self.trials if t.ok)

    @property
    def punch_attempts_median(self) -> float | None:
        return _median(t.punch_attempts for t in self.trials if t.ok)

    @property
    def punch_attempts_max(self) -> int | None:
        return _max(t.punch_attempts for t in self.trials if t.ok)

    @property
    def wall_median(self) -> float | None:
        return _median(t.wall_s for t in self.trials if t.ok)

    def problems(self, require_path: bool = True) -> list[str]:
        """
        What differs from L{EXPECTED} (every trial must connect; with
        C{require_path}, every trial must end on the expected path), one
        sentence each; [] when the pair is as expected.
        """
        name = f"{self.initiator} -> {self.target}"
        problems = []
        failed = [t for t in self.trials if not t.ok]
        if failed or not self.trials:
            errors = "; ".join(sorted({t.error or "?" for t in failed}))[:400]
            problems.append(f"{name}: {len(failed)} of {len(self.trials)} trials did not"
                            f" connect: {errors}")
        if require_path:
            kinds = dict(self.kinds)
            if self.expected == "direct" and self.direct < self.successes:
                problems.append(f"{name}: expected a direct path on every trial, got {kinds}")
            if self.expected == "relayed" and self.relayed < self.successes:
                problems.append(f"{name}: expected a relayed path on every trial, got {kinds}")
        return problems

    def as_dict(self) -> dict:
        return {
            "initiator": self.initiator,
            "target": self.target,
            "loss": self.loss,
            "expected": self.expected,
            "trials": len(self.trials),
            "successes": self.successes,
            "kinds": dict(self.kinds),
            "first_message_median_s": self.first_message_median,
            "first_message_max_s": self.first_message_max,
            "direct_median_s": self.direct_median,
            "punch_attempts_median": self.punch_attempts_median,
            "punch_attempts_max": self.punch_attempts_max,
            "wall_median_s": self.wall_median,
            "errors": [t.error for t in self.trials if not t.ok],
        }


@dataclass
class PingEvent:
    """
    One line of a live C{omerta mesh ping}: a reply or a missed reply, with
    the time it was read (monotonic, seconds).
    """

    at: float
    seq: int
    rtt_ms: float | None = None
    kind: str | None = None
    endpoint: str | None = None
    local_port: int | None = None
    via: str | None = None

    @property
    def replied(self) -> bool:
        return self.rtt_ms is not None


@dataclass
class FailoverResult:
    """
    A path broken in the middle of a ping, and how it came back.

    @ivar recovery_s: from the break to the first reply after it (None: no
        reply within the deadline).
    @ivar direct_again_s: from the break to the first reply over a direct
        path (conntrack and remap cases).
    @ivar gap_s: between the last reply before the break and the first
        after it.
    """

    case: str
    initiator: str
    target: str
    action: str
    before: PingEvent | None = None
    after: PingEvent | None = None
    recovery_s: float | None = None
    direct_again_s: float | None = None
    gap_s: float | None = None
    lost: int = 0
    kinds_after: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: bool = False
    restart_error: str | None = None
    relays_held: int | None = None

    def summary(self) -> str:
        def fmt(v):
            return "-" if v is None else f"{v:.2f} s"

        before = f"{self.before.kind} {self.before.endpoint}" if self.before else "-"
        after = f"{self.after.kind} {self.after.endpoint}" if self.after else "-"
        text = (f"{self.case}: {self.initiator} -> {self.target}, {self.action}; path before"
                f" {before}, after {after}; recovery {fmt(self.recovery_s)}, gap"
                f" {fmt(self.gap_s)}, {self.lost} ping(s) lost")
        if self.direct_again_s is not None or self.case in ("conntrack", "remap"):
            text += f", direct again after {fmt(self.direct_again_s)}"
        if self.notes:
            text += " (" + "; ".join(self.notes) + ")"
        return text


_REPLY = re.compile(
    r"^seq (\d+): rtt ([\d.]+) ms, (\S+) (\S+), local port (\d+)(?:, via (\S+))?"
)
_MISSED = re.compile(r"^seq (\d+): no reply")


def parse_ping_line(line: str, at: float) -> PingEvent | None:
    match = _REPLY.match(line)
    if match:
        return PingEvent(at, int(match.group(1)), float(match.group(2)), match.group(3),
                         match.group(4), int(match.group(5)), match.group(6))
    match = _MISSED.match(line)
    if match:
        return PingEvent(at, int(match.group(1)))
    return None


# -- tables ------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _kind_summary(pair: PairResult) -> str:
    parts = [f"{n} {k}" for k, n in sorted(pair.kinds.items(), key=lambda kv: str(kv[0]))]
    failed = len(pair.trials) - pair.successes
    if failed:
        parts.append(f"{failed} failed")
    return ", ".join(parts) or "-"


def verdict(pair: PairResult, require_path: bool = True) -> str:
    return "ok" if not pair.problems(require_path) else "**UNEXPECTED**"


def render_grid(pairs: Sequence[PairResult], require_path: bool = True) -> str:
    """
    A compact initiator x target grid: successes/trials and the path kinds.
    """
    initiators = list(dict.fromkeys(p.initiator for p in pairs))
    targets = list(dict.fromkeys(p.target for p in pairs))
    by = {(p.initiator, p.target): p for p in pairs}
    lines = ["| initiator \\ target | " + " | ".join(targets) + " |",
             "|---|" + "---|" * len(targets)]
    for x in initiators:
        cells = []
        for y in targets:
            p = by.get((x, y))
            if p is None:
                cells.append("")
                continue
            kinds = "/".join(f"{n}{str(k)[0]}" for k, n in sorted(p.kinds.items(),
                                                                  key=lambda kv: str(kv[0])))
            mark = "" if not p.problems(require_path) else " ✗"
            cells.append(f"{p.successes}/{len(p.trials)} {kinds or '-'}{mark}")
        lines.append(f"| **{x}** | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: connected/trials, then path kinds (d direct, p punched, r relayed);"
                 " ✗ differs from the expectation.")
    return "\n".join(lines)


def render_table(pairs: Sequence[PairResult], require_path: bool = True) -> str:
    """
    One row per pair: expected path, trials, successes, path kinds, times
    to first message and to a direct path, punch attempts, verdict.
    """
    header = ("| initiator | target | expected | ok/trials | paths | first msg median/max (s)"
              " | direct median (s) | punch attempts median/max | CLI wall median (s) | verdict |")
    lines = [header, "|" + "---|" * 10]
    for p in pairs:
        punch = "-"
        if p.punch_attempts_median is not None:
            punch = f"{p.punch_attempts_median:g}/{p.punch_attempts_max}"
        lines.append(
            f"| {p.initiator} | {p.target} | {p.expected} | {p.successes}/{len(p.trials)}"
            f" | {_kind_summary(p)} | {_s(p.first_message_median)}/{_s(p.first_message_max)}"
            f" | {_s(p.direct_median)} | {punch} | {_s(p.wall_median)}"
            f" | {verdict(p, require_path)} |"
        )
    return "\n".join(lines)


def render_markdown(pairs: Sequence[PairResult], title: str, require_path: bool = True) -> str:
    problems = [msg for p in pairs for msg in p.problems(require_path)]
    parts = [f"### {title}", "", render_grid(pairs, require_path), "",
             render_table(pairs, require_path), ""]
    if problems:
        parts += ["Differences from the expectation:", ""]
        parts += [f"- {m}" for m in problems]
        parts.append("")
    return "\n".join(parts)


def render_failover(results: Sequence[FailoverResult]) -> str:
    lines = ["| case | initiator -> target | action | path before | first path after"
             " | recovery (s) | gap (s) | direct again (s) | pings lost | result |",
             "|" + "---|" * 10]
    for r in results:
        before = f"{r.before.kind} {r.before.endpoint}" if r.before else "-"
        after = f"{r.after.kind} {r.after.endpoint}" if r.after else "-"
        lines.append(
            f"| {r.case} | {r.initiator} -> {r.target} | {r.action} | {before} | {after}"
            f" | {_s(r.recovery_s)} | {_s(r.gap_s)} | {_s(r.direct_again_s)} | {r.lost}"
            f" | {'recovered' if r.ok else '**not recovered**'} |"
        )
    notes = [f"- {r.case}: " + "; ".join(r.notes) for r in results if r.notes]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def expectation_table() -> str:
    """
    L{EXPECTED} as a markdown grid.
    """
    lines = ["| initiator \\ target | " + " | ".join(NAT_TYPES) + " |",
             "|---|" + "---|" * len(NAT_TYPES)]
    for x in NAT_TYPES:
        lines.append(f"| **{x}** | " + " | ".join(EXPECTED[(x, y)] for y in NAT_TYPES) + " |")
    return "\n".join(lines)
