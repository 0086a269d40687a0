"""
What both fuzzing engines share: the seed corpus, running one input and
recording an escape, and a small deterministic mutator.

L{Campaign.one} runs a target on one input.  The target's documented
exceptions are the decoder saying no; any other exception is an escape:
counted, and (the first time for each exception type and raising line)
saved under C{scripts/fuzz/crashes/} as the input (C{.bin}) and a report
with its hex and traceback (C{.txt}).  The campaign then goes on, so one run
counts every escape it meets.

L{mutate} is the built-in engine (no coverage feedback): libFuzzer-style
byte mutations of seeds, driven by a seeded C{random.Random}, so a run with
the same seed and count feeds the same inputs.  tests/test_fuzz.py and
C{scripts/fuzz/run --engine builtin} use it; C{scripts/fuzz/run} uses
atheris when it is installed (scripts/fuzz/worker.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
MAX_LEN = 4096


def seeds(name: str) -> list[bytes]:
    """The seed inputs of a target, in file-name order."""
    folder = CORPUS / name
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()] if folder.is_dir() else []


@dataclass
class Escape:
    target: str
    data: bytes
    error: str
    traceback: str
    signature: str
    count: int = 1
    saved: str = ""

    def report(self) -> str:
        return (
            f"escape in {self.target}: {self.error} ({self.count} inputs)\n"
            f"input ({len(self.data)} bytes, hex): {self.data.hex()}\n"
            f"{self.traceback}"
        )

    def as_json(self) -> dict:
        return {
            "target": self.target, "input": self.data.hex(), "error": self.error,
            "traceback": self.traceback, "signature": self.signature,
            "count": self.count, "saved": self.saved,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Escape":
        return cls(d["target"], bytes.fromhex(d["input"]), d["error"], d["traceback"],
                   d["signature"], d["count"], d.get("saved", ""))


def _describe(error: BaseException) -> tuple[str, str, str]:
    """(one-line error, traceback text, signature) of an escaped exception."""
    failure = getattr(error, "failure", None)  # targets.SwallowedError
    if failure is not None:
        text = failure.getTraceback()
        frames = failure.frames
        where = f"{frames[-1][1]}:{frames[-1][2]}" if frames else "?"
        kind = failure.type.__name__
        line = f"{kind} (swallowed by datagramReceived): {failure.getErrorMessage()}"
    else:
        text = "".join(traceback.format_exception(error))
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        kind = type(error).__name__
        line = f"{kind}: {error}"
    return line, text, f"{kind}@{where}"


@dataclass
class Campaign:
    """
    One target's run: counts inputs, collects escapes by signature.

    @param save: write each new escape's input and report under C{crashes}.
    @param log: if set, a file to which each new or recounted escape is
        appended as a JSON line (the atheris worker's channel to run.py).
    """

    target: object
    save: bool = True
    crashes: Path = CRASHES
    log: Path | None = None
    inputs: int = 0
    escapes: dict[str, Escape] = field(default_factory=dict)

    @property
    def escape_count(self) -> int:
        return sum(e.count for e in self.escapes.values())

    def one(self, data: bytes) -> None:
        self.inputs += 1
        try:
            self.target.run(data)
        except self.target.allowed:
            pass
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as error:  # noqa: BLE001 - that is the point
            # BaseException: a Rust panic in cryptography (PanicException)
            # is one, and would escape a decoder just the same.
            self._escaped(data, error)

    def _escaped(self, data: bytes, error: BaseException) -> None:
        line, text, signature = _describe(error)
        known = self.escapes.get(signature)
        if known is not None:
            known.count += 1
            return
        escape = Escape(self.target.name, bytes(data), line, text, signature)
        if self.save:
            self.crashes.mkdir(parents=True, exist_ok=True)
            stem = f"{self.target.name}-{hashlib.sha1(data).hexdigest()[:12]}"
            (self.crashes / f"{stem}.bin").write_bytes(data)
            (self.crashes / f"{stem}.txt").write_text(escape.report())
            escape.saved = str(self.crashes / f"{stem}.bin")
        self.escapes[signature] = escape
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps(escape.as_json()) + "\n")


INTERESTING = (
    0, 1, 2, 3, 4, 6, 0x10, 0x20, 0x3F, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000,
    0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1,
)
WIDTHS = (1, 2, 4, 8)


def mutate(rng: random.Random, pool: list[bytes], max_len: int = MAX_LEN) -> bytes:
    """
    One input: a seed from C{pool} under 1-6 byte-level mutations (bit
    flips, random and "interesting" big-endian integers, inserts, deletes,
    copies, splices with another seed, truncation), or now and then random
    bytes.
    """
    if not pool or rng.random() < 0.03:
        return rng.randbytes(rng.randrange(0, 96))
    data = bytearray(rng.choice(pool))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(10)
        size = len(data)
        pos = rng.randrange(size) if size else 0
        if op == 0 and size:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and size:
            data[pos] = rng.randrange(256)
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and size:
            del data[pos : pos + rng.randint(1, 16)]
        elif op == 4 and size:
            start = rng.randrange(size)
            data[pos:pos] = data[start : start + rng.randint(1, 32)]
        elif op == 5:
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            data = data[:pos] + other[cut:]
        elif op == 6 and size:
            width = rng.choice(WIDTHS)
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            data[pos : pos + width] = value.to_bytes(width, "big")
        elif op == 7 and size:
            del data[pos:]
        elif op == 8:
            data += rng.randbytes(rng.randint(1, 16))
        elif size:
            data[pos] = (data[pos] + rng.choice((-2, -1, 1, 2))) & 0xFF
    return bytes(data[:max_len])


def run_builtin(
    target,
    *,
    inputs: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    save: bool = True,
    crashes: Path = CRASHES,
    max_len: int = MAX_LEN,
) -> tuple[Campaign, float]:
    """
    Every seed as it is, then mutations until C{inputs} inputs in all (or
    C{seconds} have passed).  Returns the campaign and the seconds it took.
    """
    campaign = Campaign(target, save=save, crashes=crashes)
    pool = seeds(target.name)
    rng = random.Random(f"{target.name}:{seed}")
    start = time.monotonic()
    deadline = start + seconds if seconds is not None else None
    limit = inputs if inputs is not None else float("inf")
    for data in pool:
        if campaign.inputs >= limit:
            break
        campaign.one(data)
    while campaign.inputs < limit:
        if deadline is not None and campaign.inputs % 64 == 0 and time.monotonic() >= deadline:
            break
        campaign.one(mutate(rng, pool, max_len))
    return campaign, time.monotonic() - start
