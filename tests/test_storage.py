"""
Atomic state files.
"""

import os
import stat

from twisted.trial import unittest

from omerta.storage import StateFileError, atomic_write, read_json, write_json


class Crash(Exception):
    pass


class AtomicWriteTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "state.json")

    def test_crash_before_rename_keeps_old_file(self):
        """A crash between the durable write and the rename leaves the old content and no temp file."""
        write_json(self.path, {"v": 1})

        def crash(tmp):
            with open(tmp) as f:
                self.assertIn('"v": 2', f.read())
            raise Crash()

        self.assertRaises(Crash, atomic_write, self.path, b'{"v": 2}', _before_rename=crash)
        self.assertEqual(read_json(self.path, dict), {"v": 1})
        self.assertEqual(os.listdir(self.dir), ["state.json"])

    def test_mode(self):
        """New files get the requested mode from the start."""
        atomic_write(self.path, b"x")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_missing_gives_default(self):
        """A file that does not exist yet reads as the default."""
        self.assertEqual(read_json(self.path, list), [])

    def test_corrupt_is_error_and_untouched(self):
        """A corrupt file raises StateFileError naming it and stays as it was."""
        with open(self.path, "wb") as f:
            f.write(b"{not json")
        error = self.assertRaises(StateFileError, read_json, self.path, dict)
        self.assertIn(self.path, str(error))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"{not json")
