"""
Atomic state files.
"""

import os
import stat
import subprocess
import sys

from twisted.trial import unittest

from omerta.storage import StateFileError, atomic_write, pid_alive, read_json, write_json


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


class StaleTemporaryTests(unittest.TestCase):
    """
    Temporary files a killed writer left behind are removed by the next
    write of the same file; a live writer's are not.
    """

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "status.json")

    def temporary(self, pid, name="status.json"):
        path = os.path.join(self.dir, f".{name}.tmp-{pid}")
        with open(path, "wb") as f:
            f.write(b"partial")
        return path

    def dead_pid(self):
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        return child.pid

    def test_dead_writers_temporary_removed(self):
        """A .status.json.tmp-PID of a process that no longer exists goes at the next write."""
        stale = self.temporary(self.dead_pid())
        write_json(self.path, {"v": 1})
        self.assertFalse(os.path.exists(stale))
        self.assertEqual(sorted(os.listdir(self.dir)), ["status.json"])

    def test_zombie_writers_temporary_removed(self):
        """A killed writer its parent has not reaped yet counts as dead."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(child.wait)
        child.kill()
        # until the kernel has made it a zombie (WNOWAIT: not reaped)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        self.assertFalse(pid_alive(child.pid))
        stale = self.temporary(child.pid)
        write_json(self.path, {"v": 1})
        self.assertFalse(os.path.exists(stale))

    def test_live_writers_temporary_kept(self):
        """A temporary file of a running process (a write in progress) stays."""
        live = self.temporary(os.getppid())
        write_json(self.path, {"v": 1})
        self.assertTrue(os.path.exists(live))

    def test_other_files_temporaries_kept(self):
        """Only the written file's temporaries are considered, and odd names are left alone."""
        dead = self.dead_pid()
        other = self.temporary(dead, name="peers-00.json")
        odd = self.temporary("x1")
        write_json(self.path, {"v": 1})
        self.assertTrue(os.path.exists(other))
        self.assertTrue(os.path.exists(odd))
