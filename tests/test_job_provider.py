"""
The provider's job service on a Clock with a simulated runner
(L{omerta.testing.fakejobs}): the protocol, the queue, inputs, output,
cancel, restarts, retention and refusals.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial import unittest

from omerta.jobs.provider import INDEX_FILE, MAX_WAIT, JobService
from omerta.metrics import Metrics
from omerta.testing.fakejobs import FakeRunner
from omerta.wire.job import (CHUNK, NO_EXIT, JobOp, JobStatus, build_request, parse_reply)

ALICE = b"a" * 16
BOB = b"b" * 16


class FakeMesh:
    started = False

    def __init__(self):
        self.metrics = Metrics()

    def networks(self):
        return []


def submit_body(argv=("python3", "job.py"), **overrides) -> dict:
    body = dict(argv=list(argv), env=["A=1"], stdin=b"in", inputs=[], outputs=[],
                cpu_milli=1000, memory_mb=256, timeout_s=60, network=False, name="")
    body.update(overrides)
    return body


class JobServiceTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.runner = FakeRunner()
        self.mesh = FakeMesh()
        self.data_dir = self.mktemp()
        self.changes = 0
        self.service = self.make()

    def make(self, runner="same", **options) -> JobService:
        def changed():
            self.changes += 1

        service = JobService(self.mesh, self.runner if runner == "same" else runner,
                             self.data_dir, self.clock,
                             SimpleNamespace(cpu_cores=2, memory_mb=2048),
                             on_change=changed, **options)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def ask(self, op: JobOp, peer: bytes = ALICE, service=None, **body):
        d = (service or self.service).handle(peer, build_request(op, **body))
        results = []
        d.addCallback(results.append)
        return results

    def call(self, op: JobOp, peer: bytes = ALICE, **body):
        (reply,) = self.ask(op, peer, **body)
        return parse_reply(reply)

    def submit(self, peer=ALICE, **overrides):
        reply = self.call(JobOp.SUBMIT, peer, **submit_body(**overrides))
        self.assertEqual(reply.status, JobStatus.OK, reply.detail)
        return reply.jobs[0]

    def refused(self, op, status, peer=ALICE, **body) -> str:
        reply = self.call(op, peer, **body)
        self.assertEqual(JobStatus(reply.status), status, reply.detail)
        self.assertEqual(reply.jobs, [])
        return reply.detail

    # running

    def test_a_job_runs_streams_and_ends_with_its_exit_code(self):
        job = self.submit(outputs=["result.txt"])
        self.assertEqual(job.state, "running")
        (run,) = self.runner.runs
        request = run.request
        self.assertEqual((request.argv, request.env, request.stdin),
                         (["python3", "job.py"], {"A": "1"}, b"in"))
        self.assertEqual((request.limits.cpu, request.limits.memory_mb, request.limits.timeout_s,
                          request.limits.network), (1.0, 256, 60.0, False))
        self.assertEqual(self.changes, 1)
        run.print(b"hello ")
        run.print(b"oops\n", "stderr")
        run.print(b"world\n")
        logs = self.call(JobOp.LOGS, job_id=job.job_id, stream=1, offset=0, most=CHUNK, wait_ms=0)
        self.assertEqual((bytes(logs.data), logs.eof), (b"hello world\n", False))
        logs = self.call(JobOp.LOGS, job_id=job.job_id, stream=2, offset=2, most=CHUNK, wait_ms=0)
        self.assertEqual(bytes(logs.data), b"ps\n")
        run.finish("exited", 3, outputs={"result.txt": b"42\n"})
        status = self.call(JobOp.STATUS, job_id=job.job_id).jobs[0]
        self.assertEqual((status.state, status.exit_code, status.stdout_bytes, status.stderr_bytes),
                         ("exited", 3, 12, 5))
        self.assertEqual([(o.path, o.size, o.present) for o in status.outputs],
                         [("result.txt", 3, True)])
        logs = self.call(JobOp.LOGS, job_id=job.job_id, stream=1, offset=6, most=CHUNK, wait_ms=0)
        self.assertEqual((bytes(logs.data), logs.eof), (b"world\n", True))
        fetched = self.call(JobOp.FETCH, job_id=job.job_id, index=0, offset=0, most=CHUNK)
        self.assertEqual((bytes(fetched.data), fetched.eof), (b"42\n", True))
        self.assertEqual(self.changes, 2)
        self.assertEqual(self.mesh.metrics.get("jobs_ended", state="exited"), 1)

    def test_the_end_reasons_of_the_runner_become_states(self):
        for reason, state, code in (("timeout", "timeout", NO_EXIT), ("memory", "memory", NO_EXIT),
                                    ("failed", "failed", NO_EXIT), ("exited", "exited", 0)):
            job = self.submit()
            self.runner.runs[-1].finish(reason, 0 if reason == "exited" else None, reason)
            status = self.call(JobOp.STATUS, job_id=job.job_id).jobs[0]
            self.assertEqual((status.state, status.exit_code, status.detail),
                             (state, code, reason))

    def test_logs_wait_for_more_output_or_the_end(self):
        job = self.submit()
        run = self.runner.runs[0]
        waiting = self.ask(JobOp.LOGS, job_id=job.job_id, stream=1, offset=0, most=CHUNK,
                           wait_ms=30_000)
        self.assertEqual(waiting, [])
        run.print(b"line\n")
        self.assertEqual(bytes(parse_reply(waiting[0]).data), b"line\n")
        # nothing comes: the reply goes empty after at most MAX_WAIT
        waiting = self.ask(JobOp.LOGS, job_id=job.job_id, stream=1, offset=5, most=CHUNK,
                           wait_ms=30_000)
        self.clock.advance(MAX_WAIT - 0.01)
        self.assertEqual(waiting, [])
        self.clock.advance(0.01)
        self.assertEqual((bytes(parse_reply(waiting[0]).data), parse_reply(waiting[0]).eof),
                         (b"", False))
        # the end answers a waiting reader
        waiting = self.ask(JobOp.LOGS, job_id=job.job_id, stream=1, offset=5, most=CHUNK,
                           wait_ms=30_000)
        run.finish()
        self.assertTrue(parse_reply(waiting[0]).eof)

    def test_output_beyond_the_cap_is_counted_not_kept(self):
        self.service.max_log_bytes = 10
        job = self.submit()
        self.runner.runs[0].print(b"0123456789abcdef")
        status = self.call(JobOp.STATUS, job_id=job.job_id).jobs[0]
        self.assertEqual(status.stdout_bytes, 10)
        self.assertEqual(self.mesh.metrics.get("job_output_dropped_bytes"), 6)

    # inputs

    def test_inputs_arrive_in_pieces_then_the_job_queues(self):
        job = self.submit(inputs=[{"path": "data/a.bin", "size": 5}, {"path": "b", "size": 0}])
        self.assertEqual(job.state, "staging")
        self.assertEqual(self.runner.runs, [])
        detail = self.refused(JobOp.PUT, JobStatus.BAD_REQUEST, job_id=job.job_id, index=0,
                              offset=2, data=b"x")
        self.assertIn("expected bytes from 0 of 5", detail)
        self.call(JobOp.PUT, job_id=job.job_id, index=0, offset=0, data=b"ab")
        self.refused(JobOp.PUT, JobStatus.NOT_YOURS, BOB, job_id=job.job_id, index=0, offset=2,
                     data=b"cde")
        reply = self.call(JobOp.PUT, job_id=job.job_id, index=0, offset=2, data=b"cde")
        self.assertEqual(reply.jobs[0].state, "running")
        self.assertEqual(self.runner.runs[0].request.inputs, {"data/a.bin": b"abcde", "b": b""})

    def test_only_so_many_jobs_of_a_consumer_stage_at_once(self):
        """Inputs wait in memory: at most two jobs of a consumer receive them at a time."""
        for _ in range(2):
            self.submit(inputs=[{"path": "a", "size": 5}])
        detail = self.refused(JobOp.SUBMIT, JobStatus.NO_CAPACITY,
                              **submit_body(inputs=[{"path": "a", "size": 5}]))
        self.assertIn("still receiving their inputs here, the most one consumer may (2)", detail)
        self.submit()  # a job without inputs is not held back
        self.submit(BOB, inputs=[{"path": "a", "size": 5}])

    def test_inputs_that_never_arrive_fail_the_job(self):
        job = self.submit(inputs=[{"path": "a", "size": 5}])
        self.clock.advance(self.service.staging_timeout)
        status = self.call(JobOp.STATUS, job_id=job.job_id).jobs[0]
        self.assertEqual(status.state, "failed")
        self.assertIn("did not all arrive", status.detail)
        self.assertEqual(self.service.live, {})

    # the queue

    def test_jobs_wait_for_room_in_order(self):
        first = self.submit(cpu_milli=2000)
        second = self.submit(cpu_milli=1500)
        third = self.submit(cpu_milli=500, memory_mb=1024)
        self.assertEqual([r.request.job_id for r in self.runner.runs], [first.job_id.hex()])
        self.assertEqual([second.queue_position, third.queue_position], [1, 2])
        self.assertEqual(self.service.committed().cpu_cores, 2)
        self.runner.runs[0].finish()
        self.assertEqual([r.request.job_id for r in self.runner.runs],
                         [first.job_id.hex(), second.job_id.hex(), third.job_id.hex()])
        self.assertEqual(self.service.committed().memory_mb, 256 + 1024)

    def test_vms_leave_less_room_for_jobs(self):
        from omerta.roles.vmtypes import Resources

        service = self.make(committed=lambda: Resources(cpu_cores=2, memory_mb=512))
        reply = parse_reply(self.ask(JobOp.SUBMIT, service=service, **submit_body())[0])
        self.assertEqual(reply.jobs[0].state, "queued")

    def test_jobs_in_guests_are_counted_once(self):
        """A runner whose jobs are VMs of the backend: the backend counts them."""
        self.runner.counted_by_backend = True
        self.submit(cpu_milli=2000)
        self.assertEqual(self.service.committed().cpu_cores, 0)
        self.assertEqual(self.submit(cpu_milli=2000).state, "running")

    def test_a_consumer_may_hold_only_so_many_jobs(self):
        self.service.max_per_consumer = 2
        self.submit(cpu_milli=2000)
        self.submit()
        detail = self.refused(JobOp.SUBMIT, JobStatus.NO_CAPACITY, **submit_body())
        self.assertIn("the most one consumer may (2)", detail)
        self.submit(BOB)  # others are not affected

    # cancel

    def test_cancel_a_queued_or_a_running_job(self):
        running = self.submit(cpu_milli=2000)
        queued = self.submit()
        status = self.call(JobOp.CANCEL, job_id=queued.job_id).jobs[0]
        self.assertEqual(status.state, "cancelled")
        self.refused(JobOp.CANCEL, JobStatus.NOT_YOURS, BOB, job_id=running.job_id)
        status = self.call(JobOp.CANCEL, job_id=running.job_id).jobs[0]
        self.assertTrue(self.runner.runs[0].cancelled)
        self.assertEqual(status.state, "cancelled")
        self.assertEqual(len(self.runner.runs), 1, "the cancelled queued job never ran")

    # who may see what

    def test_only_the_submitter_sees_its_jobs(self):
        job = self.submit()
        self.submit(BOB)
        self.refused(JobOp.STATUS, JobStatus.NOT_YOURS, BOB, job_id=job.job_id)
        self.refused(JobOp.LOGS, JobStatus.NOT_YOURS, BOB, job_id=job.job_id, stream=1, offset=0,
                     most=10, wait_ms=0)
        self.refused(JobOp.FETCH, JobStatus.NOT_YOURS, BOB, job_id=job.job_id, index=0, offset=0,
                     most=10)
        self.assertEqual([j.job_id for j in self.call(JobOp.LIST).jobs], [job.job_id])
        detail = self.refused(JobOp.STATUS, JobStatus.UNKNOWN_JOB, job_id=b"\x01" * 8)
        self.assertIn("no job 0101010101010101 on this provider", detail)

    # refusals

    def test_bad_requests_get_a_reason(self):
        cases = [
            (dict(argv=[]), JobStatus.BAD_REQUEST, "no command"),
            (dict(cpu_milli=0), JobStatus.BAD_REQUEST, "cpu 0 cores"),
            (dict(cpu_milli=3000), JobStatus.NO_CAPACITY, "offers 0.001 to 2"),
            (dict(memory_mb=4096), JobStatus.NO_CAPACITY, "offers 16 to 2048"),
            (dict(timeout_s=0), JobStatus.BAD_REQUEST, "timeout 0 s"),
            (dict(env=["1X=2"]), JobStatus.BAD_REQUEST, "is not NAME=VALUE"),
            (dict(inputs=[{"path": "../x", "size": 1}]), JobStatus.BAD_REQUEST,
             "not a relative path"),
            (dict(outputs=["/etc/passwd"]), JobStatus.BAD_REQUEST, "not a relative path"),
            (dict(inputs=[{"path": "a", "size": 1}, {"path": "a", "size": 1}]),
             JobStatus.BAD_REQUEST, "same path"),
            (dict(inputs=[{"path": "big", "size": 17 * 2**20}]), JobStatus.BAD_REQUEST,
             "at most 16777216 per job"),
            (dict(stdin=b"x" * 4097), JobStatus.BAD_REQUEST, "stdin is 4097 bytes"),
            (dict(network=True), JobStatus.BAD_REQUEST, "gives jobs no network"),
            (dict(outputs=["p" * 101]), JobStatus.BAD_REQUEST, "longer than 100 bytes"),
            (dict(name="n" * 65), JobStatus.BAD_REQUEST, "the label is 65 bytes; at most 64"),
        ]
        for overrides, status, words in cases:
            detail = self.refused(JobOp.SUBMIT, status, **submit_body(**overrides))
            self.assertIn(words, detail)
        self.assertEqual(self.service.jobs, {})
        reply = parse_reply(self.service.handle(ALICE, b"\x01\x63junk").result)
        self.assertEqual(reply.status, JobStatus.BAD_REQUEST)
        self.assertEqual(self.mesh.metrics.get("job_requests", op="unknown",
                                               status="bad_request"), 1)

    def test_without_a_runner_jobs_are_unavailable(self):
        service = self.make(runner=None, problem="bubblewrap is not installed")
        reply = parse_reply(self.ask(JobOp.SUBMIT, service=service, **submit_body())[0])
        self.assertEqual((reply.status, reply.detail),
                         (JobStatus.UNAVAILABLE, "bubblewrap is not installed"))

    # state

    def test_a_restarted_provider_reports_what_ran_as_lost(self):
        job = self.submit(cpu_milli=2000)
        queued = self.submit()
        self.runner.runs[0].print(b"partial\n")
        # the provider dies (kill -9: nothing of stopService runs)
        self.service.running = False
        service = self.make()
        self.assertEqual(self.runner.cleaned, 2, "the runner cleans what was left at each start")
        for lost in (job, queued):
            status = parse_reply(self.ask(JobOp.STATUS, service=service,
                                          job_id=lost.job_id)[0]).jobs[0]
            self.assertEqual(status.state, "lost")
            self.assertIn("restarted while the job was", status.detail)
        logs = parse_reply(self.ask(JobOp.LOGS, service=service, job_id=job.job_id, stream=1,
                                    offset=0, most=CHUNK, wait_ms=1000)[0])
        self.assertEqual((bytes(logs.data), logs.eof), (b"partial\n", True))

    def test_a_damaged_index_stops_the_start_and_is_left_alone(self):
        from omerta.storage import StateFileError

        self.service.stopService()
        path = self.service.dir / INDEX_FILE
        path.write_text(json.dumps({"jobs": []}))
        service = JobService(self.mesh, self.runner, self.data_dir, self.clock,
                             SimpleNamespace(cpu_cores=2, memory_mb=2048))
        self.assertRaises(StateFileError, service.startService)
        self.assertEqual(json.loads(path.read_text()), {"jobs": []})

    def test_ended_jobs_are_kept_for_the_retention_then_forgotten(self):
        job = self.submit()
        self.runner.runs[0].print(b"x" * 100)
        self.runner.runs[0].finish()
        self.clock.advance(self.service.retention - 60)
        self.assertEqual(self.call(JobOp.STATUS, job_id=job.job_id).status, JobStatus.OK)
        self.clock.advance(120)
        self.refused(JobOp.STATUS, JobStatus.UNKNOWN_JOB, job_id=job.job_id)
        self.assertFalse((self.service.dir / job.job_id.hex()).exists())

    def test_a_consumers_kept_output_is_bounded(self):
        self.service.max_kept_per_consumer = 150
        jobs = []
        for n in range(3):
            jobs.append(self.submit())
            self.runner.runs[-1].print(b"x" * 60)
            self.runner.runs[-1].finish()
            self.clock.advance(1)
        other = self.submit(BOB)
        self.runner.runs[-1].print(b"y" * 100)
        self.runner.runs[-1].finish()
        self.assertEqual(self.service.purge(), [jobs[0].job_id.hex()])
        self.assertIn(other.job_id.hex(), self.service.jobs)
