#!/usr/bin/env python3
"""
Fuzz omerta's wire decoders: every target in scripts/fuzz/targets.py, each
in its own process, C{--jobs} at a time.

    scripts/fuzz/run [--decoder NAME|all] [--inputs N | --seconds S]
                     [--jobs J] [--engine auto|atheris|builtin] [--seed K]
                     [--max-len BYTES]

With atheris installed (the C{test} extra) each target runs under libFuzzer
with coverage of omerta and construct (scripts/fuzz/worker.py); otherwise,
or with C{--engine builtin}, under the deterministic mutator of
scripts/fuzz/engine.py (no coverage figure).  Per decoder it prints the
inputs run, the coverage libFuzzer reached (edges and features), the
escapes (inputs that raised anything but the decoder's documented error,
or that crashed or hung the process) and the seconds.  Exit status 1 when
any decoder had an escape: each one is printed (input in hex, traceback)
and saved under scripts/fuzz/crashes/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]
WORK = HERE / "work"
NAMES = (
    "demux", "stun", "stun_attributes", "envelope", "frame_opener", "messages", "record",
    "relay", "tunnel", "invite_payload", "invite_link", "vm_request", "vm_reply",
    "job_request", "job_reply", "session_open", "protocol",
)
"""The targets of scripts/fuzz/targets.py (listed here so that this process
never imports omerta: the workers import it under instrumentation)."""


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def run_atheris(name: str, args) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    escapes_path = WORK / f"{name}.escapes.jsonl"
    log_path = WORK / f"{name}.log"
    command = [sys.executable, str(HERE / "worker.py"), name, "--escapes", str(escapes_path),
               "--seed", str(args.seed), "--work", str(WORK), "--max-len", str(args.max_len)]
    command += ["--inputs", str(args.inputs)] if args.seconds is None else ["--seconds", str(args.seconds)]
    start = time.monotonic()
    with open(log_path, "w") as log:
        rc = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=WORK)
    seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    units = re.findall(r"stat::number_of_executed_units: (\d+)", text)
    done = re.findall(r"Done (\d+) runs", text)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    escapes = []
    if escapes_path.exists():
        escapes = [json.loads(line) for line in escapes_path.read_text().splitlines() if line]
    stats_path = Path(f"{escapes_path}.stats")
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    result = {
        "name": name, "engine": "atheris", "rc": rc, "seconds": seconds,
        "inputs": int(units[-1]) if units else int(done[-1]) if done else stats.get("inputs", 0),
        "cov": f"{cov[-1][0]}/{cov[-1][1]}" if cov else "-",
        "escapes": escapes, "message_types": stats.get("message_types", {}), "log": str(log_path),
    }
    if rc != 0:
        # libFuzzer itself stopped: a crash it caught (deadly signal, out of
        # memory, a hang past -timeout); its report is the tail of the log.
        artifacts = re.findall(r"Test unit written to (\S+)", text)
        result["escapes"].append({
            "target": name, "error": f"worker exited with status {rc}",
            "input": Path(artifacts[-1]).read_bytes().hex() if artifacts else "",
            "traceback": "\n".join(text.splitlines()[-40:]), "count": 1,
            "saved": artifacts[-1] if artifacts else "",
        })
    return result


def run_builtin_child(name: str, args) -> dict:
    command = [sys.executable, str(HERE / "run.py"), "--child", name, "--engine", "builtin",
               "--seed", str(args.seed), "--max-len", str(args.max_len)]
    command += ["--inputs", str(args.inputs)] if args.seconds is None else ["--seconds", str(args.seconds)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        return {"name": name, "engine": "builtin", "rc": out.returncode, "seconds": 0, "inputs": 0,
                "cov": "-", "message_types": {},
                "escapes": [{"target": name, "error": "builtin child failed", "input": "",
                             "traceback": out.stderr[-4000:], "count": 1, "saved": ""}]}
    return json.loads(out.stdout.splitlines()[-1])


def child(name: str, args) -> None:
    import engine
    import targets

    campaign, seconds = engine.run_builtin(
        targets.TARGETS[name], inputs=None if args.seconds else args.inputs,
        seconds=args.seconds, seed=args.seed, max_len=args.max_len,
    )
    print(json.dumps({
        "name": name, "engine": "builtin", "rc": 0, "seconds": seconds, "inputs": campaign.inputs,
        "cov": "-", "escapes": [e.as_json() for e in campaign.escapes.values()],
        "message_types": {str(k): v for k, v in sorted(targets.MESSAGE_TYPE_COUNTS.items())},
    }))


def row(r: dict) -> str:
    escapes = sum(e["count"] for e in r["escapes"])
    rate = r["inputs"] / r["seconds"] if r["seconds"] else 0
    return (f"| {r['name']} | {r['engine']} | {r['inputs']:,} | {r['cov']} | {escapes} |"
            f" {r['seconds']:.0f} | {rate:,.0f} |")


HEADER = ("| decoder | engine | inputs | coverage (edges/features) | escapes | seconds | inputs/s |\n"
          "|---|---|---:|---:|---:|---:|---:|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoder", default="all", help=f"one of {', '.join(NAMES)}, or all")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--inputs", type=int, default=None, help="inputs per decoder (default 100000)")
    budget.add_argument("--seconds", type=int, default=None, help="seconds per decoder")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--engine", choices=("auto", "atheris", "builtin"), default="auto")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-len", type=int, default=1200,
        help="longest input (default 1200: a datagram on a 1280-byte MTU path, less headers)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inputs is None and args.seconds is None:
        args.inputs = 100_000
    if args.child:
        child(args.child, args)
        return 0
    names = NAMES if args.decoder == "all" else tuple(args.decoder.split(","))
    unknown = set(names) - set(NAMES)
    if unknown:
        parser.error(f"unknown decoder {', '.join(sorted(unknown))}; choose from {', '.join(NAMES)}")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "builtin"
    elif engine == "atheris" and not have_atheris():
        parser.error("atheris is not installed: .venv/bin/python -m pip install atheris")
    runner = run_atheris if engine == "atheris" else run_builtin_child

    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"fuzzing {len(names)} decoders with {engine}, "
          + (f"{args.inputs:,} inputs" if args.seconds is None else f"{args.seconds} s")
          + f" each, {args.jobs} at a time, seed {args.seed}", flush=True)
    results = []
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        # The quick decoders last, so the slow ones share the cores.
        order = sorted(names, key=lambda n: n in ("demux", "envelope", "relay", "tunnel"))
        futures = {pool.submit(runner, name, args): name for name in order}
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results.append(r)
            print(f"  done {row(r)}", flush=True)
    results.sort(key=lambda r: NAMES.index(r["name"]))
    print()
    print(f"{started:%Y-%m-%d %H:%M} UTC, {time.monotonic() - t0:.0f} s wall")
    print(HEADER)
    for r in results:
        print(row(r))
    for r in results:
        if r["message_types"]:
            from omerta.wire.messages import MessageType

            counts = {int(k): v for k, v in r["message_types"].items()}
            fewest = min(MessageType, key=lambda t: counts.get(int(t), 0))
            print(f"\n{r['name']}: every one of the {len(MessageType)} message types got at least"
                  f" {counts.get(int(fewest), 0):,} inputs (fewest: {fewest.name}); other type"
                  f" bytes {sum(v for k, v in counts.items() if k not in set(MessageType)):,}"
                  " (counted by the harness, up to 4095 short of the total)")
    escaped = [e for r in results for e in r["escapes"]]
    for e in escaped:
        print(f"\nESCAPE in {e['target']}: {e['error']} ({e['count']} inputs)")
        print(f"input (hex): {e['input']}")
        if e.get("saved"):
            print(f"saved: {e['saved']}")
        print(e["traceback"])
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
