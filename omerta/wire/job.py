"""
The job protocol: compute jobs submitted to providers, carried as the
payload of mesh request/response messages on the C{job} channel (inside a
per-pair session: only the provider reads a request, and the sender it sees
is the authenticated consumer, who alone may see or touch its jobs).

    request  = version (1) | op (1) | body of the op
    reply    = version (1) | status (1) | detail (long text) | jobs (count 1, JobRecord...)
               | data (length 2, bytes) | eof (1)

Ops:

    SUBMIT   argv (count 1, long text...), environment (count 1, NAME=VALUE
             long text...), stdin (length 2, bytes), inputs (count 1: path
             text, size 8), outputs (count 1, path text...), cpu in
             thousandths of a core (4), memory MiB (4), timeout s (4),
             network (1), name (text): the new job, "staging" until its
             inputs arrived (PUT), else "queued"
    PUT      job id (8), input index (1), offset (8), data (length 2): a
             piece of an input, in order
    STATUS   job id (8)
    LOGS     job id (8), stream (1: stdout, 2: stderr), offset (8), most
             bytes (2), wait ms (4): the output from offset; with a wait,
             the reply waits until there is some, or the job ended
    CANCEL   job id (8): the whole process tree is killed
    LIST     (nothing): the caller's jobs, newest first
    FETCH    job id (8), output index (1), offset (8), most bytes (2): a
             piece of a collected output file

Every message stays well below the node's 8 KiB datagram: inputs and
outputs travel in pieces of at most L{CHUNK} bytes.

A job record says where a job is (L{JobState}), why it ended, its exit code,
the limits asked for and the ones the provider's runner enforces, the sizes
of its output streams and files.  Errors carry a L{JobStatus} and a detail a
person can act on.
"""

from __future__ import annotations

import enum

import construct as c

from omerta.wire.codec import SHORT_TEXT, build, hex_id, parse_exact

VERSION = 1
CHANNEL = "job"
CHUNK = 4096
"""Most bytes of data in one PUT, LOGS or FETCH."""
MAX_STDIN = 4096
MAX_ARGS = 64
MAX_ENV = 64
MAX_FILES = 16
MAX_JOBS_PER_REPLY = 24
MAX_PATH = 100
MAX_NAME = 64
"""Bytes of a file path and of a job's label (UTF-8)."""
MAX_DETAIL = 400
MAX_COMMAND = 160
MAX_RUNNER = 120
"""Bytes of a record's detail, command and runner texts (longer ones are cut)."""
NO_EXIT = -32768
"""The exit code of a job that has none (not ended, or killed)."""


class JobOp(enum.IntEnum):
    SUBMIT = 1
    PUT = 2
    STATUS = 3
    LOGS = 4
    CANCEL = 5
    LIST = 6
    FETCH = 7


class JobStatus(enum.IntEnum):
    OK = 0
    NO_CAPACITY = 1
    BAD_REQUEST = 2
    UNKNOWN_JOB = 3
    NOT_YOURS = 4
    FAILED = 5
    UNAVAILABLE = 6
    """The provider runs no jobs (no runner, or the runner cannot work here)."""


class JobState(str, enum.Enum):
    """Where a job is; the last six are ends."""

    STAGING = "staging"      # inputs still arriving
    QUEUED = "queued"
    RUNNING = "running"
    EXITED = "exited"        # ended by itself: see the exit code
    TIMEOUT = "timeout"      # killed at its time limit
    MEMORY = "memory"        # killed for going past its memory limit
    CANCELLED = "cancelled"  # killed or dropped on its owner's request
    LOST = "lost"            # the provider lost it (restarted while it ran)
    FAILED = "failed"        # the provider could not run it (detail says why)

    @property
    def ended(self) -> bool:
        return self not in (JobState.STAGING, JobState.QUEUED, JobState.RUNNING)


class Stream(enum.IntEnum):
    STDOUT = 1
    STDERR = 2


JOB_ID = c.Bytes(8)
LONG_TEXT = c.PascalString(c.Int16ub, "utf8")
DATA = c.Prefixed(c.Int16ub, c.GreedyBytes)

_Submit = c.Struct(
    "argv" / c.PrefixedArray(c.Int8ub, LONG_TEXT),
    "env" / c.PrefixedArray(c.Int8ub, LONG_TEXT),
    "stdin" / DATA,
    "inputs" / c.PrefixedArray(c.Int8ub, c.Struct("path" / SHORT_TEXT, "size" / c.Int64ub)),
    "outputs" / c.PrefixedArray(c.Int8ub, SHORT_TEXT),
    "cpu_milli" / c.Int32ub,
    "memory_mb" / c.Int32ub,
    "timeout_s" / c.Int32ub,
    "network" / c.Flag,
    "name" / SHORT_TEXT,
)

JobRequest = c.Struct(
    "version" / c.Const(VERSION, c.Int8ub),
    "op" / c.Int8ub,
    "body" / c.Switch(
        c.this.op,
        {
            JobOp.SUBMIT: _Submit,
            JobOp.PUT: c.Struct("job_id" / JOB_ID, "index" / c.Int8ub, "offset" / c.Int64ub,
                                "data" / DATA),
            JobOp.STATUS: c.Struct("job_id" / JOB_ID),
            JobOp.LOGS: c.Struct("job_id" / JOB_ID, "stream" / c.Int8ub, "offset" / c.Int64ub,
                                 "most" / c.Int16ub, "wait_ms" / c.Int32ub),
            JobOp.CANCEL: c.Struct("job_id" / JOB_ID),
            JobOp.LIST: c.Struct(),
            JobOp.FETCH: c.Struct("job_id" / JOB_ID, "index" / c.Int8ub, "offset" / c.Int64ub,
                                  "most" / c.Int16ub),
        },
        default=c.Error,
    ),
)

JobRecord = c.Struct(
    "job_id" / JOB_ID,
    "name" / SHORT_TEXT,
    "state" / SHORT_TEXT,
    "exit_code" / c.Int16sb,
    "detail" / LONG_TEXT,
    "command" / SHORT_TEXT,
    "submitted_ms" / c.Int64ub,
    "started_ms" / c.Int64ub,    # 0: not started
    "ended_ms" / c.Int64ub,      # 0: not ended
    "cpu_milli" / c.Int32ub,
    "memory_mb" / c.Int32ub,
    "timeout_s" / c.Int32ub,
    "queue_position" / c.Int16ub,  # 0: not queued
    "runner" / SHORT_TEXT,         # the runner kind and the limits it enforces
    "stdout_bytes" / c.Int64ub,
    "stderr_bytes" / c.Int64ub,
    "outputs" / c.PrefixedArray(c.Int8ub, c.Struct(
        "path" / SHORT_TEXT, "size" / c.Int64ub, "present" / c.Flag)),
)

JobReply = c.Struct(
    "version" / c.Const(VERSION, c.Int8ub),
    "status" / c.Int8ub,
    "detail" / LONG_TEXT,
    "jobs" / c.PrefixedArray(c.Int8ub, JobRecord),
    "data" / DATA,
    "eof" / c.Flag,
)


def build_request(op: JobOp, **body) -> bytes:
    return build(JobRequest, {"version": VERSION, "op": int(op), "body": body}, "job request")


def parse_request(data: bytes):
    """
    @raise omerta.wire.ParseError: not a job request (the op is checked too).
    """
    return parse_exact(JobRequest, data, "job request")


def build_reply(status: JobStatus, detail: str = "", jobs=(), data: bytes = b"",
                eof: bool = False) -> bytes:
    return build(JobReply, {"version": VERSION, "status": int(status), "detail": detail,
                            "jobs": list(jobs), "data": data, "eof": eof}, "job reply")


def parse_reply(data: bytes):
    return parse_exact(JobReply, data, "job reply")


def job_id_bytes(job_id: str) -> bytes:
    """
    A job id as printed (16 hex digits) to its wire form.

    @raise ValueError: not 16 hex digits.
    """
    return hex_id(job_id, "job")
