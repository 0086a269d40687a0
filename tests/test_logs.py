"""
JSON log lines.
"""

import io
import json
from datetime import datetime, timedelta

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest

from omerta.app.logs import event_as_json, json_line_observer


class JsonLogTests(unittest.TestCase):
    def test_fields(self):
        """A log event becomes one JSON line with stable fields plus its own."""
        out = io.StringIO()
        log = Logger(namespace="omerta.test", observer=json_line_observer(out))
        log.info("Peer {peer_id} at {addr}", peer_id="ab", addr=("127.0.0.1", 1))
        [line] = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "omerta.test")
        self.assertEqual(record["message"], "Peer ab at ('127.0.0.1', 1)")
        self.assertEqual(record["peer_id"], "ab")
        self.assertEqual(record["addr"], ["127.0.0.1", 1])
        self.assertEqual(datetime.fromisoformat(record["time"]).utcoffset(), timedelta(0))

    def test_failure(self):
        """A logged failure carries its traceback."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        line = event_as_json({
            "log_format": "boom", "log_level": LogLevel.critical, "log_time": 0,
            "log_failure": failure, "log_namespace": "x",
        })
        record = json.loads(line)
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(record["level"], "critical")

    def test_unserialisable_value(self):
        """Values JSON cannot hold are written as strings."""
        record = json.loads(event_as_json({"log_format": "{x}", "x": object(), "log_time": 0}))
        self.assertTrue(record["x"].startswith("<object object"))
