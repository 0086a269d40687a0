"""
Shortcuts for simulations of thousands of nodes in one process, and only
there: simulated signatures (a cheap keyed hash in place of Ed25519), and
memoized parsing of announcement records.

    with simulated_signatures() as counts:
        ...                         # run the simulation
    signed, verified = counts.snapshot()
    cost = real_cost(measure_ed25519(), signed, verified, node_seconds)

Inside the block every Ed25519 signature the product makes
(L{omerta.crypto.identity.Identity.sign}) is BLAKE2b-512 of the signed bytes
keyed by the signer's public key, and every check
(C{omerta.crypto.identity.verify_signature}, wherever a module imported it)
recomputes that hash.  Tampered data or a signature by another key still
fails; a forgery by someone who knows the public key does not, so this is
never a security test and never runs outside a simulation: nothing under
C{omerta/} except this package imports it (C{tests/test_meshsim.py} checks).

What the shortcut saves is counted: signatures made and checked, by the
domain label the signed bytes start with ("omerta announce v1", "omerta pong
proof v1", ...).  L{measure_ed25519} times the real operations in the same
process, so a report can give the per-node crypto cost the simulation did
not pay (L{real_cost}).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from omerta.crypto import identity as _identity
from omerta.crypto.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity
from omerta.wire import messages as _messages

_LABEL_MAX = 48
_REAL_SIGN = Identity.sign
_REAL_VERIFY = _identity.verify_signature
_REAL_PUBLIC_KEY = Identity.public_key

_active: SignatureCounts | None = None


def label_of(data: bytes) -> str:
    """
    The domain label signed bytes start with (up to the first NUL), or
    "unlabelled".
    """
    end = data.find(b"\x00", 0, _LABEL_MAX)
    if end <= 0:
        return "unlabelled"
    return data[:end].decode("ascii", "replace")


def simulated_signature(public_key: bytes, data: bytes) -> bytes:
    """
    The simulated "signature" of C{data} by C{public_key}: 64 bytes of
    BLAKE2b keyed by the public key.  Not a signature: anyone who knows the
    key can make it.
    """
    return hashlib.blake2b(data, key=public_key, digest_size=SIGNATURE_SIZE).digest()


@dataclass
class SignatureCounts:
    """
    What happened under L{simulated_signatures}: signatures made and
    checked, by label, and checks that failed.
    """

    signed: Counter = field(default_factory=Counter)
    verified: Counter = field(default_factory=Counter)
    rejected: int = 0
    _public_keys: dict = field(default_factory=dict, repr=False)

    def sign(self, identity: Identity, data: bytes) -> bytes:
        key = self._public_keys.get(identity)
        if key is None:
            key = self._public_keys[identity] = _REAL_PUBLIC_KEY.fget(identity)
        self.signed[label_of(data)] += 1
        return simulated_signature(key, data)

    def verify(self, public_key: bytes, signature: bytes, data: bytes) -> bool:
        self.verified[label_of(data)] += 1
        if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
            self.rejected += 1
            return False
        if _identity.weak_identity_key(public_key):
            self.rejected += 1
            return False
        if not hmac.compare_digest(simulated_signature(bytes(public_key), data), signature):
            self.rejected += 1
            return False
        return True

    def snapshot(self) -> tuple[Counter, Counter]:
        """
        Copies of the counters (subtract two snapshots for a window).
        """
        return Counter(self.signed), Counter(self.verified)


@dataclass(frozen=True)
class Ed25519Timing:
    """Microseconds per real Ed25519 operation, measured in this process."""

    sign_us: float
    verify_us: float
    rounds: int


def measure_ed25519(rounds: int = 2000, size: int = 200) -> Ed25519Timing:
    """
    Time C{rounds} real signatures and checks of C{size}-byte messages (an
    announcement record is about that long), best of three runs.  Uses the
    product's own functions, even inside L{simulated_signatures}.
    """
    signer = Identity.generate()
    public_key = _REAL_PUBLIC_KEY.fget(signer)
    messages = [i.to_bytes(4, "big") * (size // 4) for i in range(rounds)]
    best_sign = best_verify = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        signatures = [_REAL_SIGN(signer, m) for m in messages]
        best_sign = min(best_sign, time.perf_counter() - start)
        start = time.perf_counter()
        ok = all(_REAL_VERIFY(public_key, s, m) for s, m in zip(signatures, messages))
        best_verify = min(best_verify, time.perf_counter() - start)
        if not ok:
            raise AssertionError("a real Ed25519 signature did not verify")
    return Ed25519Timing(best_sign / rounds * 1e6, best_verify / rounds * 1e6, rounds)


def real_cost(timing: Ed25519Timing, signed: Counter, verified: Counter,
              node_seconds: float) -> dict:
    """
    The Ed25519 work a window would have cost with real signatures.

    @param signed: signatures made in the window, by label.
    @param verified: signatures checked in the window, by label.
    @param node_seconds: live nodes times simulated seconds of the window.
    @return: per node per second: signatures, checks, and the CPU
        microseconds they take at C{timing}'s speed (and the fraction of
        one core that is).
    """
    signs = sum(signed.values()) / node_seconds
    checks = sum(verified.values()) / node_seconds
    us = signs * timing.sign_us + checks * timing.verify_us
    return {
        "signs_per_node_s": signs,
        "verifies_per_node_s": checks,
        "cpu_us_per_node_s": us,
        "cpu_fraction": us / 1e6,
        "by_label_per_node_s": {
            label: {"signed": round(signed[label] / node_seconds, 3),
                    "verified": round(verified[label] / node_seconds, 3)}
            for label in sorted(set(signed) | set(verified))
        },
    }


def _modules_holding(function) -> list:
    return [module for name, module in list(sys.modules.items())
            if (name == "omerta" or name.startswith("omerta.")) and module is not None
            and getattr(module, "verify_signature", None) is function]


@contextmanager
def simulated_signatures() -> Iterator[SignatureCounts]:
    """
    Replace Ed25519 signing and checking with L{simulated_signature} in this
    process for the duration of the block; yields the L{SignatureCounts}.
    Modules that import C{verify_signature} inside the block get the
    simulated one and are put back too.  Not re-entrant.

    @raise RuntimeError: already inside a C{simulated_signatures} block.
    """
    global _active
    if _active is not None:
        raise RuntimeError("simulated_signatures() is already active")
    counts = SignatureCounts()
    holders = _modules_holding(_REAL_VERIFY)

    def sign(self, data):
        return counts.sign(self, data)

    verify = counts.verify
    _active = counts
    Identity.sign = sign
    for module in holders:
        module.verify_signature = verify
    try:
        yield counts
    finally:
        Identity.sign = _REAL_SIGN
        for module in set(holders) | set(_modules_holding(verify)):
            module.verify_signature = _REAL_VERIFY
        _active = None


def active() -> SignatureCounts | None:
    """The counts of the L{simulated_signatures} block running now, if any."""
    return _active


_REAL_PARSE_RECORD = _messages.parse_record


@contextmanager
def memoized_record_parsing(maxsize: int = 1 << 16) -> Iterator:
    """
    Memoize C{omerta.wire.messages.parse_record} (a pure function of the
    record's bytes) in this process for the duration of the block, wherever
    a module imported it; yields the cached function (its C{cache_info()}
    says how many parses were saved).

    Gossip hands every node each record many times and the product parses
    it with construct each time it looks at it (about 70 us a parse, several
    per record received); in a simulation of a thousand nodes that is most
    of the wall time.  The parsed record is shared between callers, which
    only read it.  Nothing the nodes do changes (C{tests/test_meshsim.py}
    runs a mesh with and without and compares); only the simulation's wall
    time no longer shows that cost, which is the product's to remove.
    """
    cached = functools.lru_cache(maxsize=maxsize)(_REAL_PARSE_RECORD)
    holders = [module for name, module in list(sys.modules.items())
               if (name == "omerta" or name.startswith("omerta.")) and module is not None
               and getattr(module, "parse_record", None) is _REAL_PARSE_RECORD]
    for module in holders:
        module.parse_record = cached
    try:
        yield cached
    finally:
        for name, module in list(sys.modules.items()):
            if getattr(module, "parse_record", None) is cached:
                module.parse_record = _REAL_PARSE_RECORD
