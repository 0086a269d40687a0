"""
Helpers for tests that run real omerta processes on loopback: start twistd
with a plugin, wait for conditions with a deadline (never a fixed sleep),
stop everything at cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater

REPO = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")


def require_program(name: str, package: str) -> str:
    """
    The path of C{name}; when it is missing, skip the test if not root (the
    package cannot be installed), fail otherwise (CI runs as root and
    scripts/setup-env installs C{package}).
    """
    import shutil

    from twisted.trial.unittest import SkipTest

    path = shutil.which(name)
    if path is not None:
        return path
    if os.geteuid() != 0:
        raise SkipTest(f"needs {name} (Debian package {package}); run scripts/setup-env as root")
    raise AssertionError(f"{name} missing: scripts/setup-env should have installed {package}")


def require_lab() -> None:
    """
    Skip the test when the NAT lab cannot run here and we are not root
    (nothing can be installed); as root (CI), an unusable lab is a failure.
    """
    from twisted.trial.unittest import SkipTest

    from omerta.testing import natlab

    problems = natlab.check_environment()
    if not problems:
        return
    if os.geteuid() != 0:
        raise SkipTest(f"the NAT lab needs root: {'; '.join(problems)}")
    raise AssertionError(f"NAT lab unavailable as root: {'; '.join(problems)}")


def free_udp_port_pair() -> int:
    """
    A port P such that P and P + 1 are free on 127.0.0.1 and 127.0.0.2.
    """
    for _ in range(100):
        port = free_udp_port()
        try:
            for ip in ("127.0.0.1", "127.0.0.2"):
                for candidate in (port, port + 1):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.bind((ip, candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free UDP port pair")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Daemon:
    """
    One C{twistd -n <plugin>} process with its log in C{<data_dir>.log}.
    """

    def __init__(self, testcase, plugin: str, data_dir: Path, *args: str):
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir.with_suffix(".log")
        self.argv = [str(TWISTD), "-n", "--pidfile=", plugin, "--data-dir", str(data_dir), *args]
        self.process = None
        self.start()
        testcase.addCleanup(self.stop)

    def start(self) -> None:
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=environment(), cwd=REPO
        )

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code, self.process = self.process.returncode, None
        self.log.close()
        return code

    def status(self) -> dict:
        try:
            return json.loads((self.data_dir / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def loopback_relay(testcase, base: str, network_name: str) -> tuple:
    """
    A network made on the spot and its relay (C{twistd omerta-relay} on
    127.0.0.1, data in C{base}/relay, no NAT discovery): (the relay's
    L{Daemon}, its port, the network).
    """
    import time

    from omerta.crypto.identity import load_or_create_identity
    from omerta.networks import NetworkStore

    relay_dir = f"{base}/relay"
    port = free_udp_port()
    network = NetworkStore(relay_dir).create(load_or_create_identity(relay_dir), network_name,
                                             f"127.0.0.1:{port}", now=time.time())
    relay = Daemon(testcase, "omerta-relay", relay_dir, "--name", "relay",
                   "--interface", "127.0.0.1", "--port", str(port), "--nat-interval", "0")
    return relay, port, network


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.1, describe=None):
    """
    Poll C{predicate} on the reactor until it is true or C{timeout} passes.

    @raise AssertionError: naming C{what} (and C{describe()} if given).
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() >= deadline:
            detail = f"\n{describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        await deferLater(reactor, interval, lambda: None)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """
    Run the C{omerta} command as a separate process.
    """
    return subprocess.run(
        [sys.executable, "-m", "omerta.app.cli", *args],
        capture_output=True,
        text=True,
        env=environment(),
        cwd=REPO,
        timeout=60,
    )


def start_relay(testcase, base: str, network_name: str = "lab"):
    """
    A network created by a relay's identity in C{base}/relay and that relay
    running (C{twistd -n omerta-relay}) on a free port of 127.0.0.1, NAT
    discovery off.  Returns (membership, relay daemon).
    """
    import time as _time

    from omerta.crypto.identity import load_or_create_identity
    from omerta.networks import NetworkStore

    relay_dir = f"{base}/relay"
    port = free_udp_port()
    network = NetworkStore(relay_dir).create(
        load_or_create_identity(relay_dir), network_name, f"127.0.0.1:{port}",
        now=_time.time())
    relay = Daemon(testcase, "omerta-relay", relay_dir, "--name", "relay",
                   "--interface", "127.0.0.1", "--port", str(port), "--nat-interval", "0")
    return network, relay
