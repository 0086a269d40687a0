"""
The command line's fast path: which command lines it takes (and leaves to
the full command line), and that it answers without loading the mesh.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial import unittest

from omerta.app.fast import _parse


class ParseTests(unittest.TestCase):
    def test_taken(self):
        words, data_dir, output, path, params = _parse(
            ["--data-dir", "/d", "--output", "json", "mesh", "peers", "--network", "lab"])
        self.assertEqual((words, str(data_dir), output, path, params),
                         (["mesh", "peers"], "/d", "json", "/v1/peers", {"network": "lab"}))
        self.assertEqual(_parse(["vm", "list", "--refresh", "--timeout=5"])[3:],
                         ("/v1/vms", {"refresh": "1", "timeout": "5"}))
        self.assertEqual(_parse(["vm", "list", "--timeout", "5"])[4], {})

    def test_left_to_the_full_command_line(self):
        for argv in (["mesh", "peers", "--invite", "x"], ["mesh", "peers", "--help"],
                     ["mesh", "ping", "relay"], ["vm", "list", "--bogus"], ["--output", "xml",
                     "mesh", "peers"], ["mesh", "peers", "--network"], [], ["mesh"],
                     ["mesh", "peers", "--timeout", "3"], ["vm", "request", "--peer", "p"]):
            self.assertIsNone(_parse(argv), argv)

    def test_no_heavy_imports(self):
        """The fast path itself loads neither Twisted's reactor, the mesh, nor cryptography."""
        code = ("import sys, omerta.app.fast, omerta.app.formats;"
                "heavy = [m for m in ('twisted.internet.reactor', 'omerta.mesh.network',"
                " 'cryptography', 'construct') if m in sys.modules]; print(heavy)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
        self.assertEqual(out.strip(), "[]")
