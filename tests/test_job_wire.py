"""The job protocol's format (L{omerta.wire.job})."""

from __future__ import annotations

import struct

from twisted.trial import unittest

from omerta.wire import ParseError
from omerta.wire.job import (CHUNK, MAX_COMMAND, MAX_DETAIL, MAX_FILES, MAX_JOBS_PER_REPLY,
                             MAX_NAME, MAX_PATH, MAX_RUNNER, JobOp, JobStatus, build_reply,
                             build_request, job_id_bytes, parse_reply, parse_request)

# the largest record the provider sends
RECORD = dict(job_id=b"\x01" * 8, name="n" * MAX_NAME, state="cancelled", exit_code=-32768,
              detail="d" * MAX_DETAIL, command="c" * MAX_COMMAND, submitted_ms=1, started_ms=2,
              ended_ms=0, cpu_milli=1500, memory_mb=256, timeout_s=60, queue_position=0,
              runner="r" * MAX_RUNNER, stdout_bytes=3, stderr_bytes=4,
              outputs=[dict(path="p" * MAX_PATH, size=9, present=True)] * MAX_FILES)


class JobWireTests(unittest.TestCase):
    def test_every_op_round_trips(self):
        bodies = {
            JobOp.SUBMIT: dict(argv=["python3", "-c", "print(6*7)"], env=["A=1"], stdin=b"x",
                               inputs=[dict(path="a", size=5)], outputs=["out.txt"],
                               cpu_milli=500, memory_mb=128, timeout_s=60, network=False,
                               name="six times seven"),
            JobOp.PUT: dict(job_id=b"\x02" * 8, index=0, offset=4096, data=b"y" * CHUNK),
            JobOp.STATUS: dict(job_id=b"\x03" * 8),
            JobOp.LOGS: dict(job_id=b"\x03" * 8, stream=2, offset=10, most=CHUNK, wait_ms=5000),
            JobOp.CANCEL: dict(job_id=b"\x03" * 8),
            JobOp.LIST: dict(),
            JobOp.FETCH: dict(job_id=b"\x03" * 8, index=1, offset=0, most=CHUNK),
        }
        for op, body in bodies.items():
            parsed = parse_request(build_request(op, **body))
            self.assertEqual(parsed.op, op)
            for key, value in body.items():
                got = getattr(parsed.body, key)
                if key == "inputs":
                    got = [dict(path=i.path, size=i.size) for i in got]
                self.assertEqual(got if not isinstance(got, list) else list(got), value, key)

    def test_the_start_of_a_request_is_fixed(self):
        self.assertEqual(build_request(JobOp.STATUS, job_id=b"\xaa" * 8),
                         b"\x01\x03" + b"\xaa" * 8)
        self.assertEqual(build_request(JobOp.LIST), b"\x01\x06")

    def test_replies_stay_below_the_datagram_size(self):
        """The largest LOGS reply and a full LIST reply fit the node's 8 KiB datagrams."""
        logs = build_reply(JobStatus.OK, "", [RECORD], b"z" * CHUNK, True)
        self.assertLess(len(logs), 8192 - 200)
        small = dict(RECORD, name="", detail="exited with code 0", command="python3 job.py",
                     runner="sandbox: memory,cpu,pids,timeout,network,work_size",
                     outputs=[dict(path="out.txt", size=1, present=True)])
        listing = build_reply(JobStatus.OK, "", [small] * MAX_JOBS_PER_REPLY)
        self.assertLess(len(listing), 8192 - 200)
        parsed = parse_reply(logs)
        self.assertEqual((parsed.status, bytes(parsed.data), parsed.eof),
                         (JobStatus.OK, b"z" * CHUNK, True))
        self.assertEqual(parsed.jobs[0].exit_code, -32768)

    def test_malformed_requests_raise_parse_errors(self):
        for data in (b"", b"\x02\x03" + b"\x00" * 8, b"\x01\x63", b"\x01\x03" + b"\x00" * 7,
                     b"\x01\x03" + b"\x00" * 9, b"\x01\x04" + b"\x00" * 8 + b"\x01"
                     + struct.pack("!Q", 0)):
            self.assertRaises(ParseError, parse_request, data)

    def test_job_ids(self):
        self.assertEqual(job_id_bytes("00ff" * 4), b"\x00\xff" * 4)
        for bad in ("", "00ff", "zz" * 8, "00ff" * 5):
            with self.assertRaises(ValueError) as caught:
                job_id_bytes(bad)
            self.assertIn("a job id is 16 hex digits", str(caught.exception))
