"""
End-to-end flows of the VM tunnel (docs/tunnel.md) in the NAT lab: real
relay, provider and consumer processes in lab namespaces, real guests under
QEMU, ssh through WireGuard carried by the mesh.

An L{E2ELab} builds one L{omerta.testing.natlab.Lab} and starts, on demand:

 - two relays on the public segment (C{relay} 198.51.100.10:7400 with RFC
   5780 STUN on .11, C{relay2} .12:7400 with .13), as in the NAT matrix;
   C{relay} created the network, C{relay2} joined it;
 - providers (L{PROVIDERS}): C{provider-1} on the public segment,
   C{provider-rc} behind a restricted-cone NAT, C{provider-sym} behind a
   symmetric NAT.  Each runs C{twistd -n omerta-provider --libvirt-uri
   qemu:///system} with a libvirtd of its own (L{PrivateLibvirt}), because
   libvirtd makes a guest's tap in I{its} network namespace and plugs it into
   the bridge the provider made in the provider's.  C{provider-jobs}, behind
   a symmetric NAT, has no guests (libvirt's test driver, C{--no-tunnels}):
   it runs compute jobs in its sandbox (docs/jobs.md);
 - consumers (L{Consumer}): a host of their own (public or behind a router of
   their own), C{omerta up} there, then C{omerta vm request / vm ssh / vm
   release} through the running node.

This module holds that infrastructure: the environment checks, L{wait},
the guest image cache, namespace helpers, L{PrivateLibvirt}, L{Provider},
L{Consumer}, L{FlowResult}, L{E2ELab}, and L{main} (the command line).  The
checks and the flows themselves (L{omerta.testing.e2e_flows.FLOWS}, the
scripts in C{scripts/e2e/} and the tests in C{tests/test_tunnel_e2e.py})
live in L{omerta.testing.e2e_flows}.  Each flow returns a L{FlowResult} (its
figures, printed as it goes) or raises L{E2EError} with what differed and the
logs of the nodes involved.

Why a private libvirtd: only one system libvirtd can own C{/run/libvirt}.
L{PrivateLibvirt} runs C{libvirtd} and C{virtlogd} inside the provider's
lab namespace I{and} a mount namespace of their own, where C{/run/libvirt}
and C{/etc/libvirt/qemu} are fresh tmpfs mounts: the host's libvirtd, its
sockets and its domains are never touched, and the provider process joins
that mount namespace (C{nsenter -m}) so C{qemu:///system} is the private
daemon.  Everything runs inside lab namespaces, so L{natlab.Lab.down} stops
it all.  Files QEMU reads or writes (the image cache, each provider's data
directory) live under C{/var/tmp} in a 0711 directory, so QEMU's user
reaches them even when the checkout sits in a 0700 directory.

Everything waits on conditions with deadlines; sleeps are only the polling
intervals inside those loops.  Needs root.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omerta.testing import natlab
from omerta.testing.matrix import RELAYS, Daemon
from omerta.testing.natlab import Lab

REPO = Path(__file__).resolve().parent.parent.parent
TWISTD = Path(sys.executable).with_name("twistd")

#: The guest image cache, shared with tests/test_vm_qemu.py.
IMAGE_CACHE = Path(os.environ.get("OMERTA_TEST_IMAGE_CACHE", "/var/cache/omerta-test-images"))
RELAY_PORT = 7400
NODE_PORT = 7400
NETWORK_NAME = "e2e"
BRIDGE = "omerta-br0"
GUEST_USER = "omerta"

#: provider kind -> (daemon name, NAT type of its router or None, bridge address;
#: None: no guests, jobs only)
PROVIDERS = {
    "public": ("provider-1", None, "10.237.1.1/24"),
    "restricted-cone": ("provider-rc", "restricted-cone", "10.237.2.1/24"),
    "symmetric": ("provider-sym", "symmetric", "10.237.3.1/24"),
    "jobs": ("provider-jobs", "symmetric", None),
}
#: lab node names per provider kind
_SHORT = {"public": "p_pub", "restricted-cone": "p_rc", "symmetric": "p_sym", "jobs": "p_job"}

POLL = 0.1
READY_TIMEOUT = 60.0
REQUEST_TIMEOUT = 150.0
"""vm request: guest boot under TCG (~5 s) plus the tunnel, with room for a busy machine."""
SSH_TIMEOUT = 60.0
DIRECT_KINDS = ("direct", "punched")


class E2EError(Exception):
    """
    A flow did not go as it should; the message says what, with the logs.
    """


def say_nothing(line: str) -> None:
    pass


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OMERTA_DATA_DIR", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait(predicate: Callable[[], Any], timeout: float, what: str,
         describe: Callable[[], str] | None = None, interval: float = POLL) -> Any:
    """L{natlab.poll_until}, failing with L{E2EError}."""
    return natlab.poll_until(predicate, timeout, what, describe, interval, E2EError)


def check_environment() -> list[str]:
    """
    @return: what keeps the flows from running here, one sentence each.
    """
    problems = natlab.check_environment()
    tools = {"wireguard-go": "wireguard-go", "wg": "wireguard-tools", "libvirtd":
             "libvirt-daemon-system", "virtlogd": "libvirt-daemon-system", "virsh":
             "libvirt-clients", "qemu-system-x86_64": "qemu-system-x86", "ssh": "openssh-client",
             "ssh-keygen": "openssh-client", "nsenter": "util-linux", "ping": "iputils-ping"}
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            problems.append(f"needs '{tool}': install the Debian package {package}")
    try:
        importlib.import_module("libvirt")  # only whether it imports
    except ImportError:
        problems.append("needs libvirt-python: pip install '.[libvirt]'")
    return problems


def ensure_image(cache: Path = IMAGE_CACHE) -> float:
    """
    Build the guest image into C{cache} unless it is there (the providers
    run in lab namespaces, which have no way out to fetch packages).

    @return: the seconds it took.
    """
    from omerta.roles import guest

    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    guest.ImageBuilder(cache).ensure(guest.DEFAULT_IMAGE)
    return time.monotonic() - started


def links(ns: str) -> dict[str, dict]:
    """
    Interface name -> C{ip -j link} entry, inside C{ns}.
    """
    result = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True,
                            text=True, check=True)
    return {link["ifname"]: link for link in json.loads(result.stdout or "[]")}


def tail(path: Path, lines: int = 40, title: str | None = None) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"--- {title or path}: (missing)"
    return f"--- {title or path}, last {len(text)} lines:\n" + "\n".join(text)


# -- libvirtd in a lab namespace ---------------------------------------------------


def _accepting(path: Path) -> bool:
    """Whether something accepts connections on the UNIX socket at C{path}."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
    except OSError:
        return False
    finally:
        client.close()
    return True


class PrivateLibvirt:
    """
    C{libvirtd} and C{virtlogd} serving C{qemu:///system} inside one lab
    namespace, in a mount namespace of their own (fresh tmpfs on
    C{/run/libvirt} and C{/etc/libvirt/qemu}), so that the host's libvirtd
    and its domains are untouched.  They run as C{e2e-libvirtd} and
    C{e2e-virtlogd} (symlinks), so tools that look for a running
    C{libvirtd} by name do not take them for the host's.

    Start a process in the same mount namespace with L{enter}.
    """

    def __init__(self, lab: Lab, node: natlab.Node, workdir: Path):
        self.lab = lab
        self.node = node
        self.workdir = Path(workdir)
        self.log_path = self.workdir / f"libvirtd-{node.name}.log"
        self.process: subprocess.Popen | None = None
        self.domains: set[str] = set()

    @property
    def pid(self) -> int:
        if self.process is None or self.process.poll() is not None:
            raise E2EError(f"the libvirtd of {self.node.name} is not running\n"
                           + tail(self.log_path))
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        bindir = self.workdir / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        names = {}
        for daemon in ("libvirtd", "virtlogd"):
            link = bindir / f"e2e-{daemon}"
            if not link.exists():
                link.symlink_to(shutil.which(daemon))
            names[daemon] = str(link)
        script = "\n".join([
            "set -e",
            "mount -t tmpfs -o mode=0755 omerta-e2e /run/libvirt",
            "mount -t tmpfs -o mode=0700 omerta-e2e /etc/libvirt/qemu",
            f"{names['virtlogd']} -d -p /run/libvirt/virtlogd.pid",
            f"exec {names['libvirtd']} -p /run/libvirt/libvirtd.pid",
        ])
        log = open(self.log_path, "ab")
        try:
            self.process = self.lab.popen(self.node, ["sh", "-c", script], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        path = Path(f"/proc/{self.process.pid}/root/run/libvirt/libvirt-sock")
        # (the socket file exists a moment before libvirtd listens on it, and
        # longer on a busy machine: a client that came then was refused)
        wait(lambda: self.pid and path.exists() and _accepting(path), timeout,
             f"the libvirtd of {self.node.name} to accept connections on its socket",
             lambda: tail(self.log_path))

    def enter(self) -> list[str]:
        """The argv prefix that runs a command in libvirtd's mount namespace."""
        return ["nsenter", "-t", str(self.pid), "-m", "--"]

    def virsh(self, *args: str, check: bool = True) -> str:
        result = self.lab.run(self.node, [*self.enter(), "virsh", "-c", "qemu:///system",
                                          *args], timeout=60)
        if check and result.returncode != 0:
            raise E2EError(f"virsh {' '.join(args)} in {self.node.name}: {result.stderr.strip()}")
        return result.stdout

    def domain_names(self) -> list[str]:
        names = [n.strip() for n in self.virsh("list", "--all", "--name").splitlines()]
        names = [n for n in names if n]
        self.domains.update(names)
        return names

    def stop(self) -> None:
        """
        Destroy and undefine every domain it holds (all of them are the
        lab's), stop the daemons and remove the domains' QEMU logs from
        C{/var/log/libvirt/qemu}.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                for name in self.domain_names():
                    self.virsh("destroy", name, check=False)
                    self.virsh("undefine", name, check=False)
            except (E2EError, subprocess.TimeoutExpired):
                pass
            virtlogd = [pid for pid in natlab.namespace_pids(self.node.ns, "e2e-virtlogd")]
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for pid in virtlogd:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self.process = None
        for name in self.domains:
            Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)


# -- nodes -------------------------------------------------------------------------


class Provider:
    """
    A provider daemon with real guests, its libvirtd and its lab host; or,
    with no bridge address (kind C{jobs}), one without guests running jobs.
    """

    def __init__(self, e2e: E2ELab, kind: str):
        name, nat_type, bridge_address = PROVIDERS[kind]
        self.e2e = e2e
        self.kind = kind
        self.name = name
        lab = e2e.lab
        short = _SHORT[kind]
        if nat_type is None:
            self.host = lab.add_host(short)
        else:
            self.host = lab.add_host(short, behind=lab.add_nat(f"{short}_nat", nat_type))
        self.bridge_address = bridge_address
        self.data_dir = e2e.base / name
        args = ["--port", str(NODE_PORT), "--invite", e2e.invite]
        if bridge_address is None:
            self.libvirt = None
            args += ["--no-tunnels", "--vm-cpus", "2", "--vm-memory", "1024"]
        else:
            self.libvirt = PrivateLibvirt(lab, self.host, e2e.base)
            args += ["--libvirt-uri", "qemu:///system", "--vm-bridge", BRIDGE,
                     "--vm-bridge-address", bridge_address, "--vm-images",
                     str(e2e.image_cache), "--max-vms", "4", "--vm-cpus", "4", "--vm-memory",
                     "2048", "--vm-disk", "8"]
        for spec in e2e.bootstrap:
            args += ["--bootstrap", spec]
        self.daemon = Daemon(lab, self.host, "omerta-provider", name, self.data_dir, args)

    def start(self) -> None:
        # 0700 like every node's (its control socket is refused otherwise);
        # the backend itself gives QEMU's user search permission (0711)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.libvirt is None:
            # ip netns exec mounts a fresh /sys, which hides the cgroup
            # hierarchies the job sandbox needs: back into this process's
            # mount namespace (the network namespace stays the lab's)
            self.daemon.argv = ["nsenter", "-t", str(os.getpid()), "-m", "--",
                                *self.daemon.argv]
        else:
            self.libvirt.start()
            self.daemon.argv = [*self.libvirt.enter(), *self.daemon.argv]
        self.daemon.start()

    def stop(self, vm_ids: Sequence[str] = ()) -> None:
        self.daemon.stop(timeout=10)
        if self.libvirt is None:
            from omerta.app.provider_tap import sandbox_dir

            try:  # its jobs' (empty) work-directory root under /run
                sandbox_dir(self.data_dir).rmdir()
            except OSError:
                pass
            return
        self.libvirt.domains.update(f"omerta-{vm_id}" for vm_id in vm_ids)
        self.libvirt.stop()

    # what the provider holds

    @property
    def ns(self) -> str:
        return self.host.ns

    def interface(self) -> str | None:
        found = [name for name in links(self.ns) if name.startswith("omp")]
        return found[0] if found else None

    def wg_peers(self) -> list[str]:
        interface = self.interface()
        if interface is None:
            return []
        result = self.e2e.lab.run(self.host, ["wg", "show", interface, "peers"], check=True)
        return result.stdout.split()

    def firewall_pairs(self) -> list[str]:
        """The (consumer tunnel address . VM address) pairs of its nftables table."""
        interface = self.interface()
        if interface is None:
            return []
        result = self.e2e.lab.run(self.host, ["nft", "-j", "list", "set", "inet",
                                              f"omerta_{interface}", "pairs"], check=True)
        pairs = []
        for item in json.loads(result.stdout)["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                pairs.append(" . ".join(str(v) for v in element["concat"]))
        return pairs

    def ledger(self) -> dict:
        try:
            return json.loads((self.data_dir / "vms.json").read_text()).get("vms", {})
        except (OSError, json.JSONDecodeError):
            return {}

    def metrics_drops(self) -> dict[str, int]:
        """drops{reason} from the provider's control API (its live status)."""
        from omerta.app.control_client import ControlClient

        client = ControlClient.for_data_dir(self.data_dir, timeout=5.0)
        if client is None:
            raise E2EError(f"{self.name}'s control socket does not answer")
        metrics = client.get("/v1/status").get("metrics", {})
        return {s["labels"]["reason"]: s["value"] for s in metrics.get("drops", [])}

    def state(self) -> str:
        """What the provider's namespace holds now (for failure messages)."""
        lab, parts = self.e2e.lab, [f"--- {self.name}'s namespace"]
        interface = self.interface()
        commands = [["ip", "-br", "addr"], ["ip", "neigh"], ["ip", "route"]]
        if interface is not None:
            commands += [["wg", "show", interface],
                         ["nft", "list", "table", "inet", f"omerta_{interface}"]]
        for argv in commands:
            try:
                result = lab.run(self.host, argv, timeout=10)
                parts.append(f"$ {' '.join(argv)}\n{result.stdout.strip()}{result.stderr.strip()}")
            except Exception as e:
                parts.append(f"$ {' '.join(argv)}: {e}")
        try:
            parts.append(f"$ virsh list --all\n{self.libvirt.virsh('list', '--all').strip()}")
        except Exception as e:
            parts.append(f"virsh list: {e}")
        return "\n".join(parts)

    def tunnel_failure(self) -> str | None:
        """The provider's log line saying its tunnels did not come up, if any."""
        try:
            text = self.daemon.log_path.read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if "tunnel interface did not come up" in line:
                return line.split("] ", 1)[-1]
        return None

    def log_tail(self, lines: int = 40) -> str:
        return self.daemon.log_tail(lines)


class Consumer:
    """
    A consumer: a lab host of its own, a data directory, an ssh key, and
    its node run by C{omerta up}.
    """

    def __init__(self, e2e: E2ELab, name: str, nat_type: str | None = None):
        self.e2e = e2e
        self.name = name
        lab = e2e.lab
        if nat_type is None:
            self.host = lab.add_host(name)
        else:
            self.host = lab.add_host(name, behind=lab.add_nat(f"{name}_nat", nat_type))
        self.data_dir = e2e.base / name
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.key = self.data_dir / "id_ed25519"
        if not self.key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                            f"{name}@e2e", "-f", str(self.key)], check=True,
                           capture_output=True)
        self.vms: list[dict] = []

    @property
    def ns(self) -> str:
        return self.host.ns

    def cli(self, *args: str, timeout: float = 120.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "omerta.app.cli", "--data-dir", str(self.data_dir), *args]
        try:
            result = self.e2e.lab.run(self.host, argv, env=environment(), cwd=REPO,
                                      timeout=timeout, input=input)
        except subprocess.TimeoutExpired as e:
            raise E2EError(f"{self.name}: omerta {' '.join(args)} did not exit within"
                           f" {timeout:g} s\n{self.log_tail()}") from e
        if check and result.returncode != 0:
            raise E2EError(f"{self.name}: omerta {' '.join(args)} exited {result.returncode}:"
                           f"\n{result.stderr.strip()}\n{result.stdout.strip()}")
        return result

    def up(self) -> float:
        started = time.monotonic()
        args = ["up", "--invite", self.e2e.invite, "--name", self.name, "--port", str(NODE_PORT)]
        for spec in self.e2e.bootstrap:
            args += ["--bootstrap", spec]
        self.cli(*args, timeout=60)
        return time.monotonic() - started

    def down(self) -> None:
        if (self.data_dir / "node.pid").exists():
            self.cli("down", timeout=30, check=False)

    def request(self, provider: str, timeout: float = REQUEST_TIMEOUT, name: str = "") -> dict:
        args = ["--output", "json", "vm", "request", "--peer", provider,
                "--ssh-key", str(self.key), "--timeout", f"{timeout:g}"]
        if name:
            args += ["--name", name]
        result = self.cli(*args, timeout=timeout + 30)
        document = json.loads(result.stdout)
        self.vms.append(document)
        return document

    def ssh(self, vm_id: str, *command: str, timeout: float = SSH_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess:
        """C{omerta vm ssh VM -- CMD} in the consumer's namespace."""
        return self.cli("vm", "ssh", vm_id, "--", *command, timeout=timeout, check=check)

    def ssh_popen(self, vm_id: str, *command: str, **kw) -> subprocess.Popen:
        argv = [sys.executable, "-m", "omerta.app.cli", "--data-dir", str(self.data_dir),
                "vm", "ssh", vm_id, "--", *command]
        return self.e2e.lab.popen(self.host, argv, env=environment(), cwd=REPO, **kw)

    def release_all(self) -> dict:
        result = self.cli("--output", "json", "vm", "release", "--all", timeout=90)
        return json.loads(result.stdout or "{}")

    def status(self) -> dict:
        from omerta.app.control_client import ControlClient

        client = ControlClient.for_data_dir(self.data_dir, timeout=5.0)
        if client is None:
            return {}
        try:
            return client.get("/v1/status")
        except Exception:
            return {}

    def peer(self, name: str) -> dict:
        """The consumer node's status entry for peer C{name} ({} if none)."""
        for p in self.status().get("peers", []):
            if p.get("name") == name:
                return p
        return {}

    def interfaces(self) -> dict[str, dict]:
        return {name: link for name, link in links(self.ns).items() if name.startswith("omc")}

    def wireguard_pids(self) -> list[int]:
        return natlab.namespace_pids(self.ns, "wireguard-go")

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.data_dir / "node.log", lines, f"{self.name} node log")


# -- the lab -----------------------------------------------------------------------


@dataclass
class FlowResult:
    """What a flow measured, for the report."""

    flow: str
    ok: bool = False
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        figures = ", ".join(f"{k} {v}" for k, v in self.figures.items())
        return f"{self.flow}: {'ok' if self.ok else 'FAILED'} in {self.seconds:.1f} s; {figures}"


class E2ELab:
    """
    The lab of the end-to-end flows; see the module docstring.

    @param base_dir: where data directories and logs go (default: a new
        0711 directory under /var/tmp, removed by L{down} unless C{keep}).
    """

    def __init__(self, prefix: str = "ome2e", base_dir: str | Path | None = None,
                 image_cache: Path = IMAGE_CACHE, keep: bool = False,
                 log: Callable[[str], None] = say_nothing):
        self.lab = Lab(prefix)
        self._own_base = base_dir is None
        self.base = Path(base_dir) if base_dir else None
        self.image_cache = Path(image_cache)
        self.keep = keep
        self.log = log
        self.relays: dict[str, Daemon] = {}
        self.providers: dict[str, Provider] = {}
        self.consumers: dict[str, Consumer] = {}
        self.invite: str | None = None
        self.started = 0.0

    def __enter__(self) -> E2ELab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def bootstrap(self) -> list[str]:
        return [f"{name}@{addresses[0]}:{RELAY_PORT}" for name, addresses in RELAYS]

    def relay_name(self, endpoint: str | None) -> str | None:
        """The relay whose address:port is C{endpoint} (None if none is)."""
        for name, addresses in RELAYS:
            if endpoint == f"{addresses[0]}:{RELAY_PORT}":
                return name
        return None

    def up(self, timeout: float = READY_TIMEOUT) -> E2ELab:
        """The lab, the guest image and both relays (ready: online at each other)."""
        self.started = time.monotonic()
        problems = check_environment()
        if problems:
            raise E2EError("the end-to-end lab cannot run here: " + "; ".join(problems))
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="omerta-e2e-", dir="/var/tmp"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o711)
        took = ensure_image(self.image_cache)
        self.log(f"guest image in {self.image_cache} ready ({took:.1f} s)")
        nodes = {name: self.lab.add_server(name, addresses) for name, addresses in RELAYS}
        self.lab.up()
        self._create_network()
        for index, (name, addresses) in enumerate(RELAYS):
            (self.base / name).mkdir(mode=0o700, exist_ok=True)
            args = ["--interface", addresses[0], "--port", str(RELAY_PORT),
                    "--stun-alternate", addresses[1]]
            if index > 0:
                args += ["--invite", self.invite, "--bootstrap", self.bootstrap[0]]
            self.relays[name] = Daemon(self.lab, nodes[name], "omerta-relay", name,
                                       self.base / name, args)
            self.relays[name].start()
        names = set(self.relays)
        wait(lambda: all(names - {d.name} <= self._online(d) for d in self.relays.values()),
             timeout, "the relays to see each other online", self.describe)
        self.log(f"lab {self.lab.tag} up with relays {', '.join(names)} in"
                 f" {time.monotonic() - self.started:.1f} s; files in {self.base}")
        return self

    def restart_relay(self, name: str, timeout: float = READY_TIMEOUT) -> None:
        """Start relay C{name} again (same identity) and wait until it sees its peers."""
        daemon = self.relays[name]
        daemon.stop()
        daemon.start()
        others = {d.name for d in self.relays.values()} | {p.name for p in
                                                           self.providers.values()}
        wait(lambda: others - {name} <= self._online(daemon), timeout,
             f"{name} to see the other relay and the providers online again",
             lambda: f"{name} sees online {sorted(self._online(daemon))}, waits for"
                     f" {sorted(others - {name})}\n" + self.describe(daemon))
        self.log(f"{name} started again")

    def _online(self, daemon: Daemon) -> set[str]:
        daemon.check_alive()
        return daemon.online_peers()

    def _create_network(self) -> None:
        from omerta.crypto.identity import load_or_create_identity
        from omerta.networks import NetworkStore

        name, addresses = RELAYS[0]
        data_dir = self.base / name
        membership = NetworkStore(data_dir).create(
            load_or_create_identity(data_dir), NETWORK_NAME, f"{addresses[0]}:{RELAY_PORT}",
            now=time.time())
        self.invite = membership.invite

    def provider(self, kind: str, timeout: float = READY_TIMEOUT) -> Provider:
        """
        The provider of C{kind} (L{PROVIDERS}), started and ready (online at
        both relays, both relays online there, its tunnel interface up)
        on first use.
        """
        if kind in self.providers:
            self.providers[kind].daemon.check_alive()
            return self.providers[kind]
        started = time.monotonic()
        provider = Provider(self, kind)
        self.providers[kind] = provider
        provider.start()
        relays = set(self.relays)

        def ready() -> bool:
            broken = provider.tunnel_failure()
            if broken:
                raise E2EError(f"{provider.name} runs without tunnels: {broken}\n"
                               + provider.log_tail())
            if not relays <= self._online(provider.daemon):
                return False
            if not all(provider.name in self._online(r) for r in self.relays.values()):
                return False
            status = provider.daemon.status()
            if "nat" in status and not status["nat"]:
                return False
            return provider.libvirt is None or provider.interface() is not None

        wait(ready, timeout, f"{provider.name} to be online at both relays",
             lambda: self.describe(provider.daemon))
        self.log(f"{provider.name} ({kind}, {provider.host.address}) ready in"
                 f" {time.monotonic() - started:.1f} s")
        return provider

    def consumer(self, name: str, nat_type: str | None = None) -> Consumer:
        """A new consumer host (public, or behind a router of C{nat_type}), its node up."""
        if name in self.consumers:
            raise ValueError(f"consumer {name!r} exists")
        consumer = Consumer(self, name, nat_type)
        self.consumers[name] = consumer
        took = consumer.up()
        self.log(f"{name} ({nat_type or 'public'}, {consumer.host.address}): omerta up"
                 f" in {took:.1f} s")
        return consumer

    def describe(self, *daemons: Daemon) -> str:
        daemons = daemons or tuple(self.relays.values())
        return "\n".join(d.log_tail(30) for d in daemons)

    def logs(self, *nodes) -> str:
        """The log ends of C{nodes} (consumers, providers) and the relays."""
        parts = []
        for node in nodes:
            parts.append(node.log_tail())
            if isinstance(node, Provider):
                try:
                    parts.append(node.state())
                except Exception as e:
                    parts.append(f"({node.name}'s state unavailable: {e})")
        parts += [d.log_tail(20) for d in self.relays.values()]
        return "\n".join(parts)

    def down(self) -> None:
        for consumer in self.consumers.values():
            try:
                consumer.down()
            except Exception:
                pass
        vm_ids = [vm["vm_id"] for c in self.consumers.values() for vm in c.vms]
        for provider in self.providers.values():
            try:
                provider.stop(vm_ids)
            except Exception:
                pass
        for daemon in self.relays.values():
            try:
                daemon.stop(timeout=5)
            except Exception:
                pass
        self.lab.down()
        if self._own_base and not self.keep and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """
    C{python -m omerta.testing.e2e [--keep DIR] FLOW...} (what the scripts in
    C{scripts/e2e/} run): one lab, the flows in order, a summary line each.
    """
    import argparse

    # lazily: omerta.testing.e2e_flows imports this module
    from omerta.testing.e2e_flows import FLOWS, rogue_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rogue"]:
        return rogue_main(argv[1:])
    parser = argparse.ArgumentParser(prog="e2e", description=main.__doc__)
    parser.add_argument("flows", nargs="+", choices=sorted(FLOWS), metavar="FLOW")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="keep data directories and logs in DIR")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    problems = check_environment()
    if problems:
        print("e2e: " + "; ".join(problems), file=sys.stderr)
        return 2
    results, failed = [], []
    with E2ELab(base_dir=args.keep, keep=args.keep is not None, log=say) as e2e:
        for name in args.flows:
            say(f"== {name}")
            try:
                results.append(FLOWS[name](e2e))
            except E2EError as e:
                failed.append(name)
                say(f"{name} FAILED: {e}")
    for result in results:
        say(result.summary())
    if failed:
        say(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    # run the imported module's main, not this __main__ copy's: the flows
    # (omerta.testing.e2e_flows) raise omerta.testing.e2e.E2EError
    from omerta.testing.e2e import main as _main

    sys.exit(_main())
