#!/usr/bin/env python3
"""
Run one fuzz target under atheris (libFuzzer with Python coverage) in this
process; scripts/fuzz/run starts one of these per target.

    .venv/bin/python scripts/fuzz/worker.py TARGET --escapes FILE
        [--inputs N | --seconds S] [--seed K] [--work DIR]

omerta and construct are imported under C{atheris.instrument_imports}, so
libFuzzer is guided by the branches of the decoders and of the construct
machinery they run.  libFuzzer keeps the inputs that found new coverage in
C{--work/TARGET} (the first corpus folder, so the seed folder is never
written to) and prints its figures on standard error; each escape is
appended to C{--escapes} as a JSON line as it happens (libFuzzer ends the
process with exit(), so nothing runs after the last input).  A file
C{--escapes}.stats holds the harness's own input count and, for the
messages target, the inputs per message type, rewritten every 4096 inputs.
A libFuzzer dictionary in C{dicts/TARGET.dict}, if there is one, is used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import atheris  # noqa: E402

with atheris.instrument_imports(include=["omerta", "construct"]):
    import targets  # noqa: E402

import engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", choices=sorted(targets.TARGETS))
    parser.add_argument("--escapes", type=Path, required=True)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--inputs", type=int)
    budget.add_argument("--seconds", type=int)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--max-len", type=int, default=engine.MAX_LEN)
    args = parser.parse_args()

    target = targets.TARGETS[args.target]
    args.escapes.unlink(missing_ok=True)
    stats_path = Path(f"{args.escapes}.stats")
    campaign = engine.Campaign(target, log=args.escapes)

    def write_stats() -> None:
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "inputs": campaign.inputs,
            "message_types": {str(k): v for k, v in sorted(targets.MESSAGE_TYPE_COUNTS.items())},
        }))
        os.replace(tmp, stats_path)

    def one_input(data: bytes) -> None:
        campaign.one(data)
        if campaign.inputs & 4095 == 0:
            write_stats()

    work = args.work / args.target
    work.mkdir(parents=True, exist_ok=True)
    crashes = engine.CRASHES
    crashes.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-seed={args.seed}",
        f"-max_len={args.max_len}",
        "-timeout=30",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
        "-print_pcs=0",
        f"-artifact_prefix={crashes}/{args.target}-",
    ]
    dictionary = HERE / "dicts" / f"{args.target}.dict"
    if dictionary.exists():
        flags.append(f"-dict={dictionary}")
    if args.inputs is not None:
        flags.append(f"-runs={args.inputs}")
    if args.seconds is not None:
        flags.append(f"-max_total_time={args.seconds}")
    atheris.Setup([sys.argv[0], *flags, str(work), str(engine.CORPUS / args.target)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
