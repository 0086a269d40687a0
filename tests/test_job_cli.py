"""
C{omerta job}'s arguments and exit statuses, without a mesh: what a person
gets for bad input, and what C{submit --wait} exits with.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from omerta.app.cli import CommandError, build_parser
from omerta.app.cli_job import exit_status, job_spec
from tests.test_cli_mesh import run_omerta


class JobSpecTests(unittest.TestCase):
    def parse(self, *argv: str):
        return build_parser().parse_args(["job", "submit", "--peer", "p", *argv])

    def test_a_command_after_the_dashes(self):
        spec = job_spec(self.parse("--cpu", "0.5", "--memory", "64", "--timeout", "9",
                                   "--env", "A=1", "--output-file", "out/x", "--",
                                   "python3", "-c", "print(6*7)"))
        self.assertEqual((spec.argv, spec.env, spec.outputs, spec.cpu, spec.memory_mb,
                          spec.timeout_s), (["python3", "-c", "print(6*7)"], {"A": "1"},
                                            ["out/x"], 0.5, 64, 9))

    def test_a_script_and_inputs_travel_as_files(self):
        base = Path(self.mktemp())
        base.mkdir()
        (base / "run.py").write_text("print(1)\n")
        (base / "data.csv").write_text("a,b\n")
        spec = job_spec(self.parse("--script", str(base / "run.py"),
                                   "--input", str(base / "data.csv"),
                                   "--input", f"{base / 'data.csv'}:in/copy.csv"))
        self.assertEqual(spec.argv, ["python3", ".omerta-script.py"])
        self.assertEqual(spec.inputs, {"data.csv": b"a,b\n", "in/copy.csv": b"a,b\n",
                                       ".omerta-script.py": b"print(1)\n"})
        (base / "run").write_text("echo 1\n")
        spec = job_spec(self.parse("--script", str(base / "run"), "--language", "sh"))
        self.assertEqual(spec.argv, ["/bin/sh", ".omerta-script.sh"])

    def test_bad_input_says_what_to_do(self):
        base = Path(self.mktemp())
        base.mkdir()
        (base / "x.rb").write_text("")
        (base / "big").write_bytes(b"x" * 5000)
        for argv, words in [
            ((), "no command: give one after --"),
            (("--script", str(base / "x.rb")), "cannot tell the language of"),
            (("--script", str(base / "x.rb"), "--", "true"), "either --script FILE or a command"),
            (("--language", "sh", "--", "true"), "--language goes with --script"),
            (("--input", str(base / "missing"), "--", "true"), "No such file or directory"),
            (("--stdin", str(base / "big"), "--", "true"), "at most 4096: give a larger file"),
            (("--input", f"{base / 'big'}:a", "--input", f"{base / 'big'}:a", "--", "true"),
             "two --input files go to 'a'"),
        ]:
            with self.assertRaises(CommandError) as caught:
                job_spec(self.parse(*argv))
            self.assertIn(words, str(caught.exception), argv)

    def test_argument_errors_before_anything_runs(self):
        for argv, words in [
            (("--cpu", "0", "--", "true"), "--cpu must be from 0.001 to 1024"),
            (("--cpu", "x", "--", "true"), "'x' is not a number"),
            (("--timeout", "0", "--", "true"), "--timeout must be from 1"),
            (("--env", "1A=2", "--", "true"), "'1A=2' is not NAME=VALUE"),
            (("--input", "f:/etc/x", "--", "true"), "not a relative path"),
            (("--output-file", "../x", "--", "true"), "not a relative path"),
            (("--language", "ruby", "--script", "x"), "invalid choice: 'ruby'"),
        ]:
            result = run_omerta("--data-dir", self.mktemp(), "job", "submit", "--peer", "p",
                                *argv)
            self.assertEqual(result.returncode, 2, argv)
            self.assertIn(words, result.stderr, argv)
            self.assertNotIn("Traceback", result.stderr, argv)

    def test_an_unknown_job_id(self):
        result = run_omerta("--data-dir", self.mktemp(), "job", "status", "0123")
        self.assertEqual(result.returncode, 2)
        self.assertIn("no job submitted from here has an id starting '0123'; 'omerta job list'"
                      " shows the jobs submitted from here", result.stderr)


class ExitStatusTests(unittest.TestCase):
    def test_the_job_decides(self):
        cases = [({"state": "exited", "exit_code": 0}, 0), ({"state": "exited", "exit_code": 3}, 3),
                 ({"state": "exited", "exit_code": 137}, 137),
                 ({"state": "timeout", "exit_code": None}, 124),
                 ({"state": "memory", "exit_code": None}, 137),
                 ({"state": "cancelled", "exit_code": None}, 130),
                 ({"state": "lost", "exit_code": None}, 2),
                 ({"state": "failed", "exit_code": None}, 2),
                 ({"state": "new-state", "exit_code": None}, 2)]
        for document, status in cases:
            self.assertEqual(exit_status(document), status, document)
