"""
Every wire decoder, fed its seed corpus and deterministic mutations of it
(scripts/fuzz/engine.py), lets nothing through but its documented error;
and the harness does catch a decoder that misbehaves.

The long, coverage-guided campaign is scripts/fuzz/run (docs/security.md,
"Fuzzing"); this is its short budget for every test run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from twisted.trial import unittest

from omerta.mesh import protocol as mesh_protocol
from omerta.wire import ParseError, relay
from omerta.wire.messages import MessageType

FUZZ = Path(__file__).resolve().parents[1] / "scripts" / "fuzz"
INPUTS = 12000
"""Inputs per decoder: seeds, then mutations (about 15 s for all on this machine)."""


def _load(name: str):
    module_name = f"omerta_fuzz_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, FUZZ / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


engine = _load("engine")
targets = _load("targets")


def _run(name: str, inputs: int = INPUTS):
    campaign, _ = engine.run_builtin(targets.TARGETS[name], inputs=inputs, seed=0, save=False)
    return campaign


class FuzzTests(unittest.TestCase):
    def assertNoEscapes(self, name: str) -> None:
        campaign = _run(name)
        self.assertEqual(campaign.inputs, INPUTS)
        if campaign.escapes:
            self.fail("\n\n".join(e.report() for e in campaign.escapes.values()))


def _decoder_test(name: str):
    def test(self):
        self.assertNoEscapes(name)

    test.__doc__ = (
        f"Seeds and mutations of {targets.TARGETS[name].what} raise only"
        f" {', '.join(e.__name__ for e in targets.TARGETS[name].allowed) or 'nothing'}."
    )
    test.__name__ = f"test_{name}"
    return test


for _name in targets.TARGETS:
    setattr(FuzzTests, f"test_{_name}", _decoder_test(_name))


class HarnessTests(unittest.TestCase):
    def test_every_target_has_seeds(self):
        """Each target has a seed corpus, and the runner knows every target."""
        run_names = _load("run").NAMES
        self.assertEqual(sorted(run_names), sorted(targets.TARGETS))
        for name in targets.TARGETS:
            self.assertTrue(engine.seeds(name), name)

    def test_every_message_type_is_seeded(self):
        """The messages corpus holds a valid body of every message type."""
        from omerta.wire.messages import parse_body

        seen = set()
        for data in engine.seeds("messages"):
            parse_body(data[0], data[1:])
            seen.add(data[0])
        self.assertEqual(seen, {int(t) for t in MessageType})

    def test_seeds_decode(self):
        """Seeds of the plain decoders are valid inputs, so mutations start from real frames."""
        from omerta.wire import vm
        from omerta.wire.invite import parse_invite_payload
        from omerta.wire.stun import parse

        for name, decode in (("stun", parse), ("vm_request", vm.parse_request),
                             ("vm_reply", vm.parse_reply),
                             ("invite_payload", parse_invite_payload)):
            for data in engine.seeds(name):
                decode(data)

    def test_mutator_is_deterministic(self):
        """The same seed gives the same inputs, so a failing run repeats."""
        import random

        pool = engine.seeds("stun")
        first = [engine.mutate(random.Random(5), pool) for _ in range(3)]
        again = [engine.mutate(random.Random(5), pool) for _ in range(3)]
        self.assertEqual(first, again)

    def test_escape_is_caught(self):
        """A decoder that raises anything else is reported with the input that did it."""
        real = relay.parse

        def broken(datagram):
            if datagram[12:13] == b"\xf0":
                return {}[datagram]
            return real(datagram)

        self.patch(relay, "parse", broken)
        campaign = _run("relay", inputs=200)
        [escape] = campaign.escapes.values()
        self.assertTrue(escape.error.startswith("KeyError"), escape.error)
        self.assertEqual(escape.data[12:13], b"\xf0")
        self.assertGreaterEqual(campaign.escape_count, 1)
        self.assertIn("broken", escape.traceback)

    def test_documented_error_is_not_an_escape(self):
        """The decoder's own error is the decoder saying no, not an escape."""

        def refuse(datagram):
            raise ParseError("no")

        self.patch(relay, "parse", refuse)
        self.assertEqual(_run("relay", inputs=200).escapes, {})

    def test_swallowed_protocol_error_is_caught(self):
        """An exception datagramReceived swallows (counted internal_error) is an escape."""

        def classify(datagram):
            raise IndexError("demux bug")

        self.patch(mesh_protocol, "classify", classify)
        campaign = _run("protocol", inputs=50)
        [escape] = campaign.escapes.values()
        self.assertIn("IndexError", escape.error)
        self.assertIn("demux bug", escape.traceback)

    def test_escape_saved(self):
        """An escape's input and report are written under the crashes folder."""
        def broken(datagram):
            raise KeyError("x")

        self.patch(relay, "parse", broken)
        crashes = Path(self.mktemp())
        campaign = engine.Campaign(targets.TARGETS["relay"], crashes=crashes)
        campaign.one(b"\xf0M\x01\x80" + bytes(9))
        [escape] = campaign.escapes.values()
        self.assertEqual(Path(escape.saved).read_bytes(), b"\xf0M\x01\x80" + bytes(9))
        report = Path(escape.saved).with_suffix(".txt").read_text()
        self.assertIn((b"\xf0M\x01\x80" + bytes(9)).hex(), report)
