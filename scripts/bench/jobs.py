#!/usr/bin/env python3
"""
Compute-job latency and throughput on loopback (docs/jobs.md): a consumer
node submits jobs to a provider that runs them in its bubblewrap sandbox,
next to what the sandbox alone, bare bwrap and a plain fork/exec cost,
measured in the same run.

    .venv/bin/python scripts/bench/jobs.py [--runs 10] [--jobs 100]
        [--in-flight 4] [--output table|json]

Everything is on 127.0.0.1.  How it is set up:

- A real C{twistd -n omerta-relay} (it created the network with C{omerta
  network create}'s store) and a real C{twistd -n omerta-provider}
  (C{--no-tunnels --vm-cpus 2 --vm-memory 2048}, libvirt's test driver, jobs
  in its sandbox: C{--jobs sandbox}, the default), both with
  C{--nat-interval 0}, each with a temporary data directory.
- The consumer is a started L{omerta.mesh.network.MeshNetwork} in this
  process, joined with the invite like a running node, driving
  L{omerta.jobs.client.JobClient} (what C{omerta job submit --wait} does:
  C{submit}, then C{follow} until the job ended and both streams are read).
  Jobs ask for the defaults of C{omerta job submit} (1 core, 256 MiB; with
  2 cores offered, 2 run at once and the others queue) and a 60 s timeout.
  The first submit finds and connects to the provider; it is reported
  apart, not counted.
- Latency, --runs times each, one job at a time: C{true} (no output:
  submit -> result only) and C{sh -c 'echo start; sleep 1; echo end'}
  (submit -> first output byte, submit -> result).  "submit" is the call
  to C{JobClient.submit}; "result" is C{follow} returning the final
  document with state C{exited} (exit 0 and the expected output are
  checked).  Also shown: submit -> accepted (C{submit} returned) and the
  provider's own started -> ended time of the job (its clock, ms).
- Throughput: --jobs C{true} jobs, at most --in-flight at once (the
  provider's per-consumer cap is 8), each submitted and followed to its
  end as above; jobs/s and the wall time.
- The sandbox's own cost, interleaved --runs times (after one warm-up of
  each): L{omerta.jobs.sandbox.SandboxRunner} running C{true} in this
  process (no mesh: work directory tmpfs, cgroups, setpriv, bwrap, the
  wait until the cgroup is empty), the same C{bwrap ... --unshare-all
  true} alone, and a plain fork/exec of C{true} (C{subprocess.run}); the
  medians and the ratios sandbox/bwrap and sandbox/fork.

Needs root and bubblewrap (the sandbox's own requirements: a cgroup memory
controller too).  Progress goes to stderr, the table (or one JSON document
with --output json) to stdout.  The daemons, the in-process node, any job
left and the temporary directories are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
if (VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != VENV.resolve():
    os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), *sys.argv])
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mesh_ping import code_version, free_udp_port, percentile  # noqa: E402

HOST = "127.0.0.1"
TWISTD = Path(sys.executable).with_name("twistd")
PROVIDER_ARGS = ("--no-tunnels", "--vm-cpus", "2", "--vm-memory", "2048")
JOB_TIMEOUT_S = 60
ASK_TIMEOUT = 30.0
TRUE = ["true"]
ONE_SECOND = ["sh", "-c", "echo start; sleep 1; echo end"]
BWRAP = ["bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
         "--proc", "/proc", "--dev", "/dev", "--unshare-all", "true"]


class BenchError(Exception):
    pass


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OMERTA_DATA_DIR", None)
    return env


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median_ms": round(statistics.median(values), 2),
            "p95_ms": round(percentile(values, 95), 2)}


def progress(text: str) -> None:
    sys.stderr.write(f"jobs: {text}\n")
    sys.stderr.flush()


def terminated(signum, frame):
    raise SystemExit(128 + signum)


def requirements_problem() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (the provider's sandbox mounts work directories, makes cgroups" \
               " and drops to uid 65534)"
    if shutil.which("bwrap") is None:
        return "needs bubblewrap: apt-get install bubblewrap (or run scripts/setup-env)"
    from omerta.jobs.sandbox import sandbox_problem

    problem = sandbox_problem()
    if problem is not None:
        return f"the job sandbox cannot run here: {problem}"
    return None


# -- the daemons --------------------------------------------------------------------


class Daemon:
    """One C{twistd -n PLUGIN} child with its log next to its data directory."""

    def __init__(self, plugin: str, data_dir: Path, *args: str):
        self.plugin = plugin
        self.data_dir = data_dir
        self.log_path = data_dir.with_suffix(".log")
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", plugin, "--data-dir", str(data_dir), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=environment(), cwd=REPO)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"{self.plugin} exited {self.process.returncode}:\n"
                             f"{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def online_names(data_dir: Path) -> set:
    """The names of the peers a node's status file has online."""
    try:
        status = json.loads((data_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return set()
    return {p["name"] for p in status.get("peers", []) if p["state"] == "online"}


def start_daemons(base: Path, daemons: list[Daemon]) -> str:
    """
    The relay (with the network) and the provider, appended to C{daemons}
    as they start; returns the invite once the relay sees the provider.
    """
    from omerta.crypto.identity import load_or_create_identity
    from omerta.networks import NetworkStore

    relay_dir = base / "relay"
    port = free_udp_port()
    invite = NetworkStore(relay_dir).create(
        load_or_create_identity(relay_dir), "jobbench", f"{HOST}:{port}", now=time.time()).invite
    daemons.append(Daemon("omerta-relay", relay_dir, "--name", "relay", "--interface", HOST,
                          "--port", str(port), "--nat-interval", "0"))
    daemons.append(Daemon("omerta-provider", base / "provider", "--name", "provider-1",
                          "--interface", HOST, "--port", str(free_udp_port()),
                          "--nat-interval", "0", "--invite", invite, *PROVIDER_ARGS))
    progress("waiting for the relay to see the provider online")
    deadline = time.monotonic() + 60
    while "provider-1" not in online_names(relay_dir):
        for daemon in daemons:
            daemon.check_alive()
        if time.monotonic() > deadline:
            raise BenchError("the relay did not see the provider online within 60 s:\n"
                             + "\n".join(d.tail() for d in daemons))
        time.sleep(0.1)
    return invite


def remove_sandbox_dir(provider_dir: Path) -> None:
    """The provider's work-directory root under /run/omerta-jobs (empty once it stopped)."""
    from omerta.app.provider_tap import sandbox_dir

    root = sandbox_dir(provider_dir)
    if root.is_dir() and not any(os.path.ismount(p) for p in root.glob("*/work")):
        shutil.rmtree(root, ignore_errors=True)


# -- measuring (in the reactor) ---------------------------------------------------------


async def one_job(client, argv: list[str], expected: str, cpu: float) -> dict:
    """Submit, follow to the end; the times in ms from the call to submit."""
    from omerta.jobs.client import JobSpec

    out = bytearray()
    first: list[float] = []

    def on_output(stream: str, data: bytes) -> None:
        if not first:
            first.append(time.perf_counter())
        if stream == "stdout":
            out.extend(data)

    started = time.perf_counter()
    job = await client.submit(JobSpec(argv=argv, cpu=cpu, timeout_s=JOB_TIMEOUT_S),
                              provider="provider-1", timeout=ASK_TIMEOUT)
    accepted = time.perf_counter()
    final = await client.follow(job["job_id"], on_output, timeout=ASK_TIMEOUT)
    ended = time.perf_counter()
    if final["state"] != "exited" or final["exit_code"] != 0 or out.decode() != expected:
        raise BenchError(f"job {' '.join(argv)} ended {final['state']} exit"
                         f" {final['exit_code']} ({final['detail']}), stdout {bytes(out)!r}")

    def ms(t: float) -> float:
        return (t - started) * 1000

    return {"accepted": ms(accepted), "first_output": ms(first[0]) if first else None,
            "result": ms(ended), "path_kind": job.get("path_kind"),
            "provider_run": (final["ended_at"] - final["started_at"]) * 1000
            if final["ended_at"] and final["started_at"] else None}


async def throughput(client, total: int, in_flight: int, cpu: float) -> dict:
    from twisted.internet.defer import ensureDeferred, gatherResults

    numbers = iter(range(total))

    async def worker() -> int:
        done = 0
        for _ in numbers:
            await one_job(client, TRUE, "", cpu)
            done += 1
        return done

    started = time.perf_counter()
    counts = await gatherResults([ensureDeferred(worker()) for _ in range(in_flight)],
                                 consumeErrors=True)
    wall = time.perf_counter() - started
    return {"jobs": sum(counts), "in_flight": in_flight, "wall_s": round(wall, 2),
            "jobs_per_s": round(sum(counts) / wall, 2)}


async def sandbox_run(runner, held: dict) -> float:
    """The wall time (ms) of the sandbox runner running C{true}, directly."""
    from omerta.jobs.runner import Limits, RunRequest

    request = RunRequest(job_id=secrets.token_hex(8), argv=TRUE,
                         limits=Limits(cpu=1.0, memory_mb=256, timeout_s=JOB_TIMEOUT_S))
    started = time.perf_counter()
    held["running"] = running = runner.run(request, lambda stream, data: None)
    result = await running.done
    took = (time.perf_counter() - started) * 1000
    if result.reason != "exited" or result.exit_code != 0:
        raise BenchError(f"the sandbox runner ran true: {result.reason} {result.exit_code}:"
                         f" {result.detail}")
    return took


def process_run(argv: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
    took = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {result.returncode}:"
                         f" {result.stderr.decode(errors='replace').strip()}")
    return took


async def references(runner, runs: int, held: dict) -> dict:
    await sandbox_run(runner, held)  # warm-up, each
    process_run(BWRAP)
    process_run(TRUE)
    times: dict[str, list[float]] = {"sandbox": [], "bwrap": [], "fork": []}
    for _ in range(runs):
        times["sandbox"].append(await sandbox_run(runner, held))
        times["bwrap"].append(process_run(BWRAP))
        times["fork"].append(process_run(TRUE))
    return times


async def measure(reactor, args, base: Path, invite: str, held: dict) -> dict:
    from omerta.jobs.client import JobClient
    from omerta.jobs.sandbox import SandboxRunner
    from omerta.mesh.network import MeshNetwork
    from omerta.roles.consumer_client import ConsumerClient

    consumer_dir = base / "consumer"
    mesh = MeshNetwork(consumer_dir, invites=[invite], interface=HOST, port=0,
                       name="bench-consumer", nat_interval=0, reactor=reactor)
    held["mesh"] = mesh
    await mesh.start()
    client = JobClient(ConsumerClient(mesh, consumer_dir))
    cpu = args.job_cpu
    progress("first job (finds the provider and connects)")
    first = await one_job(client, TRUE, "", cpu)
    figures: dict = {"first_submit": first, "latency": {}}
    for label, argv, expected in (("true", TRUE, ""),
                                  ("sh 1 s", ONE_SECOND, "start\nend\n")):
        progress(f"{args.runs} x {' '.join(argv)}, one at a time")
        figures["latency"][label] = [await one_job(client, argv, expected, cpu)
                                     for _ in range(args.runs)]
    progress(f"{args.jobs} x true, at most {args.in_flight} in flight")
    figures["throughput"] = await throughput(client, args.jobs, args.in_flight, cpu)
    progress(f"sandbox references, {args.runs} x each, interleaved")
    runner = SandboxRunner(reactor, held["sandbox_dir"])
    figures["references"] = await references(runner, args.runs, held)
    return figures


def run_reactor(args, base: Path, invite: str) -> dict:
    """Run L{measure} on the global reactor; its figures (KeyboardInterrupt if stopped)."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.python.failure import Failure

    outcome: list = []
    held: dict = {"sandbox_dir": Path(tempfile.mkdtemp(prefix="omerta-bench-jobs-",
                                                       dir="/run"))}
    os.chmod(held["sandbox_dir"], 0o711)

    async def tidy():
        # before the reactor stops, whatever stopped it (also Ctrl-C): the
        # runner's last job (its cgroup and work directory go once it ended)
        if not outcome:
            held["interrupted"] = True
        if "running" in held:
            held["running"].cancel()
            await held["running"].done
        if "mesh" in held:
            await held["mesh"].stop()

    def finish(result):
        outcome.append(result)
        if not held.get("interrupted"):
            reactor.stop()

    reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(tidy()))
    reactor.callWhenRunning(
        lambda: ensureDeferred(measure(reactor, args, base, invite, held)).addBoth(finish))
    try:
        reactor.run()
    finally:
        shutil.rmtree(held["sandbox_dir"], ignore_errors=True)
    if held.get("interrupted"):
        raise KeyboardInterrupt
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


# -- reporting -----------------------------------------------------------------------


def results_of(figures: dict, args) -> dict:
    latency = {}
    for label, runs in figures["latency"].items():
        row = {key: summary([r[key] for r in runs])
               for key in ("accepted", "first_output", "result", "provider_run")
               if all(r[key] is not None for r in runs)}
        if label == "true":
            row.pop("first_output", None)
        latency[label] = row
    refs = {key: summary(values) for key, values in figures["references"].items()}
    sandbox = refs["sandbox"]["median_ms"]
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        "code": code_version(),
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "job_cpu": args.job_cpu,
        "provider": " ".join(PROVIDER_ARGS),
        "first_submit": {k: round(v, 2) if isinstance(v, float) else v
                         for k, v in figures["first_submit"].items()},
        "latency": latency,
        "throughput": figures["throughput"],
        "sandbox": refs,
        "ratios": {"sandbox_over_bwrap": round(sandbox / refs["bwrap"]["median_ms"], 2),
                   "sandbox_over_fork": round(sandbox / refs["fork"]["median_ms"], 1)},
    }


def print_table(r: dict) -> None:
    first = r["first_submit"]
    print(f"$ {r['command']}")
    print(f"code {r['code']}; {r['cpus']} CPU(s); relay + provider (twistd, {r['provider']})"
          f" on {HOST}, consumer node in this process")
    print(f"jobs ask {r['job_cpu']:g} core(s), 256 MiB; the first submit (provider lookup and"
          f" connect, {first['path_kind']} path) took {first['result']:.1f} ms to its result,"
          f" not counted")
    print()
    print(f"{'latency (ms), ' + str(r['runs']) + ' runs each':44}{'median':>10}{'p95':>10}")
    labels = {"accepted": "submit -> accepted", "first_output": "submit -> first output byte",
              "result": "submit -> result (exited)",
              "provider_run": "provider: started -> ended"}
    for job, row in r["latency"].items():
        for key, label in labels.items():
            if key in row:
                print(f"{job + ': ' + label:44}{row[key]['median_ms']:10.1f}"
                      f"{row[key]['p95_ms']:10.1f}")
    t = r["throughput"]
    print()
    print(f"throughput: {t['jobs']} x true, at most {t['in_flight']} in flight:"
          f" {t['jobs_per_s']:.2f} jobs/s, {t['wall_s']:.2f} s wall")
    print()
    print(f"{'the sandbox alone, true (ms), ' + str(r['runs']) + ' runs each':44}"
          f"{'median':>10}{'p95':>10}")
    for key, label in (("sandbox", "SandboxRunner in-process (no mesh)"),
                       ("bwrap", "bwrap --unshare-all true alone"),
                       ("fork", "fork/exec true (subprocess)")):
        row = r["sandbox"][key]
        print(f"{label:44}{row['median_ms']:10.2f}{row['p95_ms']:10.2f}")
    print(f"{'ratio sandbox / bwrap (medians)':44}{r['ratios']['sandbox_over_bwrap']:10.2f}")
    print(f"{'ratio sandbox / fork/exec (medians)':44}{r['ratios']['sandbox_over_fork']:10.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10,
                        help="runs of each latency and reference measurement (default 10)")
    parser.add_argument("--jobs", type=int, default=100,
                        help="jobs of the throughput measurement (default 100)")
    parser.add_argument("--in-flight", type=int, default=4,
                        help="most throughput jobs at once (default 4; the provider takes 8"
                             " per consumer)")
    parser.add_argument("--job-cpu", type=float, default=1.0,
                        help="cores each job asks for (default 1, as omerta job submit)")
    parser.add_argument("--output", choices=("table", "json"), default="table")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.jobs < 1 or not 1 <= args.in_flight <= 8 or args.job_cpu <= 0:
        parser.error("--runs and --jobs must be >= 1, --in-flight from 1 to 8, --job-cpu > 0")
    problem = requirements_problem()
    if problem is not None:
        print(f"jobs: cannot run: {problem}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, terminated)
    base = Path(tempfile.mkdtemp(prefix="omerta-jobbench-"))
    daemons: list[Daemon] = []
    try:
        invite = start_daemons(base, daemons)
        figures = run_reactor(args, base, invite)
    except KeyboardInterrupt:
        print("jobs: interrupted; stopping the daemons", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"jobs: failed: {e}", file=sys.stderr)
        for daemon in daemons:
            print(f"--- {daemon.log_path}:\n{daemon.tail()}", file=sys.stderr)
        return 1
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        remove_sandbox_dir(base / "provider")
        if args.keep:
            progress(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    results = results_of(figures, args)
    if args.output == "json":
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
