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
   the bridge the provider made in the provider's;
 - consumers (L{Consumer}): a host of their own (public or behind a router of
   their own), C{omerta up} there, then C{omerta vm request / vm ssh / vm
   release} through the running node.

The flows (L{FLOWS}) are the scripts in C{scripts/e2e/} and the tests in
C{tests/test_tunnel_e2e.py}: L{flow_provision}, L{flow_nat}, L{flow_relay},
L{flow_failover}, L{flow_isolation}.  Each returns a L{FlowResult} (its
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

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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

#: provider kind -> (daemon name, NAT type of its router or None, bridge address)
PROVIDERS = {
    "public": ("provider-1", None, "10.237.1.1/24"),
    "restricted-cone": ("provider-rc", "restricted-cone", "10.237.2.1/24"),
    "symmetric": ("provider-sym", "symmetric", "10.237.3.1/24"),
}
#: lab node names per provider kind
_SHORT = {"public": "p_pub", "restricted-cone": "p_rc", "symmetric": "p_sym"}

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
    """
    Poll C{predicate} until it returns something true (returned) or
    C{timeout} seconds pass (L{E2EError} naming C{what}, plus C{describe()}).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe else ""
            raise E2EError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


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
        import libvirt  # noqa: F401  (only whether it imports)
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


def ns_pids(ns: str, comm: str | None = None) -> list[int]:
    """
    The processes in network namespace C{ns} (optionally only those whose
    command name is C{comm}).
    """
    try:
        target = os.stat(f"/var/run/netns/{ns}")
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
            if comm is not None and Path(f"/proc/{entry}/comm").read_text().strip() != comm:
                continue
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return sorted(pids)


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
        socket = Path(f"/proc/{self.process.pid}/root/run/libvirt/libvirt-sock")
        wait(lambda: self.pid and socket.exists(), timeout,
             f"the libvirtd of {self.node.name} to open its socket",
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
            virtlogd = [pid for pid in ns_pids(self.node.ns, "e2e-virtlogd")]
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
    A provider daemon with real guests, its libvirtd and its lab host.
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
        self.libvirt = PrivateLibvirt(lab, self.host, e2e.base)
        args = ["--port", str(NODE_PORT), "--invite", e2e.invite,
                "--libvirt-uri", "qemu:///system", "--vm-bridge", BRIDGE,
                "--vm-bridge-address", bridge_address, "--vm-images", str(e2e.image_cache),
                "--max-vms", "4", "--vm-cpus", "4", "--vm-memory", "2048", "--vm-disk", "8"]
        for spec in e2e.bootstrap:
            args += ["--bootstrap", spec]
        self.daemon = Daemon(lab, self.host, "omerta-provider", name, self.data_dir, args)

    def start(self) -> None:
        # 0700 like every node's (its control socket is refused otherwise);
        # the backend itself gives QEMU's user search permission (0711)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.libvirt.start()
        self.daemon.argv = [*self.libvirt.enter(), *self.daemon.argv]
        self.daemon.start()

    def stop(self, vm_ids: Sequence[str] = ()) -> None:
        self.daemon.stop(timeout=10)
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
        return ns_pids(self.ns, "wireguard-go")

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
             lambda: self.describe(daemon))
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
            return provider.interface() is not None

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


# -- checks ------------------------------------------------------------------------


def check_hostname(consumer: Consumer, vm: dict, via_json: bool = False) -> float:
    """
    C{hostname} in the guest through the tunnel prints C{omerta-<8 hex>}:
    with C{omerta vm ssh}, or with the request's C{ssh_command}.

    @return: the seconds it took.
    """
    import shlex

    started = time.monotonic()
    expected = f"omerta-{vm['vm_id'][:8]}"
    if via_json:
        argv = [*shlex.split(vm["ssh_command"]), "-o", "BatchMode=yes", "-o",
                "ConnectTimeout=10", "hostname"]
        result = consumer.e2e.lab.run(consumer.host, argv, timeout=SSH_TIMEOUT)
        how = f"{vm['ssh_command']} hostname"
    else:
        result = consumer.ssh(vm["vm_id"], "hostname", check=False)
        how = f"omerta vm ssh {vm['vm_id']} -- hostname"
    if result.returncode != 0 or result.stdout.strip() != expected:
        raise E2EError(f"{consumer.name}: {how} gave exit {result.returncode},"
                       f" {result.stdout.strip()!r} (expected {expected!r}):"
                       f" {result.stderr.strip()}")
    took = time.monotonic() - started
    consumer.e2e.log(f"{consumer.name}: {how} -> {expected} ({took:.2f} s)")
    return took


def wg_transfer(lab: Lab, node: natlab.Node, interface: str) -> dict[str, tuple[int, int]]:
    """Peer public key -> (received, sent) bytes of a WireGuard interface."""
    result = lab.run(node, ["wg", "show", interface, "transfer"], check=True)
    transfer = {}
    for line in result.stdout.splitlines():
        key, rx, tx = line.split()
        transfer[key] = (int(rx), int(tx))
    return transfer


def check_released(e2e: E2ELab, consumer: Consumer, provider: Provider, vm: dict,
                   timeout: float = 30.0) -> float:
    """
    After C{vm release}: no libvirt domain, no disk, no address in the
    provider's ledger, no WireGuard peer on its interface, no firewall
    pair, no consumer interface.

    @return: the seconds until all of that held.
    """
    vm_id = vm["vm_id"]
    started = time.monotonic()

    def left() -> list[str]:
        found = []
        if f"omerta-{vm_id}" in provider.libvirt.domain_names():
            found.append(f"libvirt domain omerta-{vm_id}")
        if (provider.data_dir / "vms" / vm_id).exists():
            found.append(f"disk directory {provider.data_dir / 'vms' / vm_id}")
        ledger = provider.ledger()
        if vm_id in ledger or any(e.get("address") == vm["address"] for e in ledger.values()):
            found.append(f"{vm['address']} in the ledger {provider.data_dir / 'vms.json'}")
        peers = provider.wg_peers()
        if vm["wg_public_key"] in peers:
            found.append(f"WireGuard peer {vm['wg_public_key']} on {provider.interface()}")
        pairs = [p for p in provider.firewall_pairs() if vm["address"] in p]
        if pairs:
            found.append(f"firewall pairs {pairs}")
        if consumer.interfaces():
            found.append(f"consumer interfaces {sorted(consumer.interfaces())}")
        return found

    remaining: list[str] = []

    def clean() -> bool:
        remaining[:] = left()
        return not remaining

    wait(clean, timeout, f"the release of {vm_id} to leave nothing behind",
         lambda: "still there: " + "; ".join(remaining) + "\n"
         + e2e.logs(consumer, provider))
    took = time.monotonic() - started
    e2e.log(f"{consumer.name}: {vm_id} released; on {provider.name} no domain, disk, ledger"
            f" address, WireGuard peer or firewall pair, on {consumer.name} no omc interface"
            f" ({took:.2f} s)")
    return took


def _flow(name: str, e2e: E2ELab, body: Callable[[FlowResult], None], *nodes) -> FlowResult:
    result = FlowResult(name)
    started = time.monotonic()
    try:
        body(result)
    except E2EError as e:
        raise E2EError(f"{name}: {e}\n" + e2e.logs(*[n for n in nodes if n is not None])
                       ) from None
    result.seconds = time.monotonic() - started
    result.ok = True
    e2e.log(result.summary())
    for note in result.notes:
        e2e.log(f"  {note}")
    return result


def _request(e2e: E2ELab, consumer: Consumer, provider: Provider, result: FlowResult) -> dict:
    started = time.monotonic()
    vm = consumer.request(provider.name)
    result.figures["request_s"] = round(time.monotonic() - started, 1)
    e2e.log(f"{consumer.name}: vm {vm['vm_id']} at {vm['ssh_address']} from {provider.name}"
            f" in {result.figures['request_s']} s; tunnel {vm['tunnel']['interface']}"
            f" {vm['tunnel']['state']} over a {vm['tunnel'].get('path_kind')} path")
    if vm["tunnel"]["state"] != "up":
        raise E2EError(f"the tunnel is {vm['tunnel']['state']!r} after the request: {vm}")
    if vm["tunnel"]["interface"] not in consumer.interfaces():
        raise E2EError(f"{vm['tunnel']['interface']} is not in {consumer.name}'s namespace")
    return vm


def _path(consumer: Consumer, provider: Provider) -> dict:
    return consumer.peer(provider.name).get("path") or {}


# -- the flows ---------------------------------------------------------------------


def flow_provision(e2e: E2ELab) -> FlowResult:
    """
    Relay, provider and consumer public: request, ssh hostname (both ways),
    release, and nothing is left on either side.
    """
    provider = e2e.provider("public")
    consumer = e2e.consumer("c_prov")

    def body(result: FlowResult) -> None:
        vm = _request(e2e, consumer, provider, result)
        interface = vm["tunnel"]["interface"]
        before = wg_transfer(e2e.lab, consumer.host, interface)
        result.figures["ssh_s"] = round(check_hostname(consumer, vm), 2)
        check_hostname(consumer, vm, via_json=True)
        after = wg_transfer(e2e.lab, consumer.host, interface)
        key = vm["wireguard"]["provider_public_key"]
        if not after.get(key, (0, 0))[0] > before.get(key, (0, 0))[0]:
            raise E2EError(f"ssh worked but {interface} received nothing: {before} -> {after}")
        result.notes.append(f"ssh omerta@{vm['ssh_address']} hostname printed"
                            f" omerta-{vm['vm_id'][:8]} (omerta vm ssh and the JSON's"
                            f" ssh_command); {interface} received"
                            f" {after[key][0] - before.get(key, (0, 0))[0]} bytes meanwhile")
        released = consumer.release_all()
        if vm["vm_id"] not in released.get("released", []):
            raise E2EError(f"vm release --all did not release {vm['vm_id']}: {released}")
        result.figures["release_clean_s"] = round(check_released(e2e, consumer, provider, vm), 2)

    return _flow("vm-provision", e2e, body, consumer, provider)


def flow_nat(e2e: E2ELab, deadline: float = 30.0) -> FlowResult:
    """
    Consumer behind a port-restricted NAT, provider behind a restricted
    cone: the tunnel's path is punched (or direct) and ssh works.
    """
    provider = e2e.provider("restricted-cone")
    consumer = e2e.consumer("c_nat", "port-restricted")

    def body(result: FlowResult) -> None:
        vm = _request(e2e, consumer, provider, result)
        path = wait(lambda: _path(consumer, provider).get("kind") in DIRECT_KINDS
                    and _path(consumer, provider), deadline,
                    f"a punched or direct path from {consumer.name} to {provider.name}",
                    lambda: f"path now: {_path(consumer, provider)}")
        result.figures["path"] = path["kind"]
        result.figures["ssh_s"] = round(check_hostname(consumer, vm), 2)
        kind = _path(consumer, provider).get("kind")
        if kind not in DIRECT_KINDS:
            raise E2EError(f"the path fell back to {kind!r} during ssh")
        result.notes.append(f"path {path['kind']} to {path['endpoint']} (the request saw"
                            f" {vm['tunnel'].get('path_kind')}); ssh hostname ok")
        consumer.release_all()
        check_released(e2e, consumer, provider, vm)

    return _flow("vm-nat", e2e, body, consumer, provider)


def flow_relay(e2e: E2ELab) -> FlowResult:
    """
    Consumer and provider behind symmetric NATs: the path is relayed and ssh
    works.
    """
    provider = e2e.provider("symmetric")
    consumer = e2e.consumer("c_relay", "symmetric")

    def body(result: FlowResult) -> None:
        vm = _request(e2e, consumer, provider, result)
        result.figures["ssh_s"] = round(check_hostname(consumer, vm), 2)
        path = _path(consumer, provider)
        if path.get("kind") != "relayed":
            raise E2EError(f"expected a relayed path between two symmetric NATs, got {path}")
        result.figures["path"] = f"relayed via {e2e.relay_name(path.get('endpoint'))}"
        consumer.release_all()
        check_released(e2e, consumer, provider, vm)

    return _flow("vm-relay", e2e, body, consumer, provider)


class _Transfer:
    """
    C{data} into C{omerta vm ssh VM -- sha256sum} in chunks from a thread,
    with the time each chunk was taken by the pipe (TCP's back pressure
    makes the writes stall while the path is broken).
    """

    CHUNK = 64 * 1024

    def __init__(self, proc: subprocess.Popen, data: bytes):
        self.proc = proc
        self.data = data
        self.progress: list[tuple[float, int]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, daemon=True, name="e2e-transfer")

    def start(self) -> None:
        self.progress.append((time.monotonic(), 0))
        self.thread.start()

    def _write(self) -> None:
        try:
            view = memoryview(self.data)
            for offset in range(0, len(view), self.CHUNK):
                self.proc.stdin.write(view[offset:offset + self.CHUNK])
                self.proc.stdin.flush()
                self.progress.append((time.monotonic(), offset + len(view[offset:offset
                                                                          + self.CHUNK])))
            self.proc.stdin.close()
        except BaseException as e:
            self.error = e

    @property
    def written(self) -> int:
        return self.progress[-1][1]

    def longest_gap(self, after: float | None = None) -> tuple[float, float]:
        """(gap seconds, time it ended) of the longest pause between two chunks."""
        best = (0.0, 0.0)
        for (t0, _), (t1, _) in zip(self.progress, self.progress[1:]):
            if after is not None and t1 < after:
                continue
            if t1 - t0 > best[0]:
                best = (t1 - t0, t1)
        return best


class _Watch:
    """
    Samples, every L{POLL} seconds from a thread, the consumer's path to the
    provider and its WireGuard interface (index, up flag) and wireguard-go pids.
    """

    def __init__(self, consumer: Consumer, provider: Provider, interface: str):
        self.consumer = consumer
        self.provider = provider
        self.interface = interface
        self.samples: list[tuple[float, dict, dict | None, list[int]]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="e2e-watch")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                path = _path(self.consumer, self.provider)
                link = links(self.consumer.ns).get(self.interface)
                link = None if link is None else {"ifindex": link["ifindex"],
                                                  "up": "UP" in link.get("flags", [])}
                self.samples.append((time.monotonic(), path, link,
                                     self.consumer.wireguard_pids()))
            except Exception as e:  # recorded, the flow judges
                self.samples.append((time.monotonic(), {"error": str(e)}, None, []))
            self.stopping.wait(POLL)


def flow_failover(e2e: E2ELab, size_mb: int = 20, kill_at: float = 0.2,
                  transfer_deadline: float = 240.0) -> FlowResult:
    """
    Consumer and provider behind symmetric NATs (relayed, two relays):
    while C{size_mb} MB of random data go through the tunnel into the guest
    (C{cat | omerta vm ssh VM -- sha256sum}), kill -9 the relay in use.  The
    copy completes intact, the consumer's WireGuard interface stays (same
    index, same wireguard-go), and the stall is measured next to the path's
    recovery.  The killed relay is started again afterwards.
    """
    provider = e2e.provider("symmetric")
    consumer = e2e.consumer("c_fail", "symmetric")

    def body(result: FlowResult) -> None:
        vm = _request(e2e, consumer, provider, result)
        check_hostname(consumer, vm)
        interface = vm["tunnel"]["interface"]
        path = _path(consumer, provider)
        if path.get("kind") != "relayed":
            raise E2EError(f"expected a relayed path between two symmetric NATs, got {path}")
        relay = e2e.relay_name(path.get("endpoint"))
        if relay is None:
            raise E2EError(f"the relayed path's endpoint {path.get('endpoint')} is no relay's")
        link_before = links(consumer.ns)[interface]["ifindex"]
        pids_before = consumer.wireguard_pids()
        data = os.urandom(size_mb << 20)
        digest = hashlib.sha256(data).hexdigest()
        proc = consumer.ssh_popen(vm["vm_id"], "sha256sum", stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        transfer = _Transfer(proc, data)
        watch = _Watch(consumer, provider, interface)
        watch.start()
        transfer.start()
        try:
            wait(lambda: transfer.written >= kill_at * len(data) or transfer.error
                 or not transfer.thread.is_alive(), 120.0,
                 f"{kill_at:.0%} of the data to go through",
                 lambda: f"{transfer.written} bytes written")
            if transfer.error is not None or not transfer.thread.is_alive():
                raise E2EError(f"the transfer ended before the kill ({transfer.written} bytes):"
                               f" {transfer.error}; ssh said"
                               f" {proc.stderr.read().decode(errors='replace')[-500:]}")
            written_at_kill = transfer.written
            e2e.relays[relay].kill()
            killed = time.monotonic()
            killed_relays.append(relay)
            e2e.log(f"killed {relay} (kill -9) after {written_at_kill >> 20} MiB")
            # (communicate() would close stdin under the writing thread)
            transfer.thread.join(timeout=transfer_deadline)
            try:
                if transfer.thread.is_alive():
                    raise subprocess.TimeoutExpired(proc.args, transfer_deadline)
                proc.stdin = None  # closed by the writing thread
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                raise E2EError(f"the copy did not finish within {transfer_deadline:g} s of the"
                               f" kill ({transfer.written} of {len(data)} bytes written); ssh"
                               f" said {err.decode(errors='replace')[-500:]}") from None
            finished = time.monotonic()
        finally:
            watch.stop()
        if transfer.error is not None:
            raise E2EError(f"writing into ssh failed after {transfer.written} bytes:"
                           f" {transfer.error}; ssh said {err.decode(errors='replace')}")
        got = out.decode(errors="replace").split()
        if proc.returncode != 0 or not got or got[0] != digest:
            raise E2EError(f"the copy is not intact: exit {proc.returncode}, guest sha256"
                           f" {got[:1]}, sent {digest}; ssh said {err.decode(errors='replace')}")
        # the interface never went away
        gone = [(round(t - killed, 2), link) for t, _, link, _ in watch.samples
                if link is None or link["ifindex"] != link_before or not link["up"]]
        if gone:
            raise E2EError(f"{interface} (index {link_before}) went down or changed: {gone[:5]}")
        link_after = links(consumer.ns).get(interface, {}).get("ifindex")
        pids_after = consumer.wireguard_pids()
        if link_after != link_before or pids_after != pids_before:
            raise E2EError(f"{interface}: index {link_before} -> {link_after}, wireguard-go"
                           f" {pids_before} -> {pids_after}")
        pid_changes = [(round(t - killed, 2), pids) for t, _, _, pids in watch.samples
                       if pids != pids_before]
        if pid_changes:
            raise E2EError(f"wireguard-go changed during the copy: {pid_changes[:5]}")
        # the path recovered: first sample after the kill on another path
        killed_endpoint = path.get("endpoint")
        recovered = next(((t, p) for t, p, _, _ in watch.samples
                          if t > killed and p.get("endpoint") not in (None, killed_endpoint)),
                         None)
        gap, gap_end = transfer.longest_gap()
        resumed = next((t for t, n in transfer.progress if t > killed and n > written_at_kill),
                       None)
        result.figures.update({
            "size_mb": size_mb,
            "relay_killed": relay,
            "copy_s": round(finished - transfer.progress[0][0], 1),
            "longest_stall_s": round(gap, 2),
            "stall_ended_after_kill_s": round(gap_end - killed, 2),
            "first_progress_after_kill_s": None if resumed is None else round(resumed - killed, 2),
            "path_recovery_s": None if recovered is None else round(recovered[0] - killed, 2),
            "path_after": None if recovered is None else
            f"{recovered[1].get('kind')} {recovered[1].get('endpoint')}"
            f" ({e2e.relay_name(recovered[1].get('endpoint')) or 'no relay'})",
        })
        result.notes.append(
            f"{size_mb} MiB into the guest's sha256sum intact ({digest[:16]}...);"
            f" {interface} kept index {link_before}, wireguard-go {pids_before}")
        if recovered is None:
            raise E2EError(f"the consumer's node never showed a path off {killed_endpoint}"
                           f" after the kill (samples: {[p for _, p, _, _ in watch.samples][-5:]})")
        consumer.release_all()
        check_released(e2e, consumer, provider, vm)

    killed_relays: list[str] = []
    try:
        return _flow("failover", e2e, body, consumer, provider)
    finally:
        for name in killed_relays:
            e2e.restart_relay(name)


_PROBE = r"""
import socket, subprocess, sys
kind, address, arg, device = sys.argv[1:5]
if kind == "tcp":
    s = socket.socket()
    s.settimeout(float(arg))
    if device:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    try:
        s.connect((address, 22))
        print("open")
    except OSError as e:
        print(f"closed: {e}")
else:
    argv = ["ping", "-n", "-c", arg, "-i", "0.2", "-W", "1", address]
    if device:
        argv[1:1] = ["-I", device]
    r = subprocess.run(argv, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines() or [r.stderr.strip()]
    print("open" if r.returncode == 0 else "closed: " + lines[-1])
"""


def _reach(consumer: Consumer, kind: str, address: str, arg: str,
           device: str = "") -> tuple[bool, str]:
    """
    Whether C{address} answers ping (kind "ping", C{arg} pings) or opens
    port 22 ("tcp", C{arg} seconds), sent out of C{device} when given
    (SO_BINDTODEVICE: through the tunnel even where the lab routes the
    address elsewhere).
    """
    result = consumer.e2e.lab.run(consumer.host, [sys.executable, "-c", _PROBE, kind, address,
                                                  arg, device], timeout=30)
    line = (result.stdout.strip() or result.stderr.strip()).splitlines()[-1:] or [""]
    return line[0] == "open", line[0]


def rogue_main(argv: Sequence[str]) -> int:
    """
    C{python -m omerta.testing.e2e rogue --data-dir D --invite L --bootstrap S
    --provider-id HEX [--count N]}: a member node that holds no VM at the
    provider sends C{N} datagrams into a tunnel endpoint of its own for the
    provider, as if it had a WireGuard interface there; its node seals them
    as TUNNEL_DATA frames to the provider, which has no endpoint for it.
    Prints one JSON line: frames sent, datagrams still waiting.
    """
    import argparse
    import socket

    from twisted.internet import reactor, task

    from omerta.app import node_tap
    from omerta.wire.tunnel import TO_CONSUMER

    parser = argparse.ArgumentParser(prog="e2e rogue")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--invite", required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--provider-id", required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    options = node_tap.Options()
    node_argv = ["--data-dir", args.data_dir, "--port", str(NODE_PORT), "--name", "rogue",
                 "--invite", args.invite, "--no-control"]
    for spec in args.bootstrap:
        node_argv += ["--bootstrap", spec]
    options.parseOptions(node_argv)
    top = node_tap.makeService(options)
    provider_id = bytes.fromhex(args.provider_id)
    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg.bind(("127.0.0.1", 0))
    outcome: dict[str, Any] = {"sent": 0}

    async def run() -> None:
        node = top.getServiceNamed("node").node
        deadline = reactor.seconds() + args.timeout
        while node.tunnels is None or not node.overlays:
            if reactor.seconds() > deadline:
                raise RuntimeError("the node never attached its socket")
            await task.deferLater(reactor, POLL, lambda: None)
        network_id = next(iter(node.overlays))
        endpoint = node.tunnels.open(network_id, provider_id, TO_CONSUMER,
                                     wg_port=wg.getsockname()[1])
        while outcome["sent"] < args.count or endpoint.waiting:
            if reactor.seconds() > deadline:
                break
            if outcome["sent"] < args.count:
                # a WireGuard handshake initiation is 148 bytes
                wg.sendto(b"\x01\x00\x00\x00" + os.urandom(144), endpoint.address)
                outcome["sent"] += 1
            await task.deferLater(reactor, 0.2, lambda: None)
        outcome.update(frames_out=endpoint.frames_out, waiting=len(endpoint.waiting))

    def finish(result) -> None:
        if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
            outcome["error"] = str(getattr(result, "value", result))
        print(json.dumps(outcome), flush=True)
        top.stopService().addBoth(lambda _: reactor.stop())

    def begin() -> None:
        top.startService()
        from twisted.internet import defer

        defer.ensureDeferred(run()).addBoth(finish)

    reactor.callWhenRunning(begin)
    reactor.run()
    return 0 if "error" not in outcome else 1


def flow_isolation(e2e: E2ELab) -> FlowResult:
    """
    Two consumers with a VM each from the same provider: each reaches its
    own VM; the second, even after opening its own WireGuard side to
    everything (AllowedIPs and routes, as a hostile consumer may), reaches
    neither the first's VM nor the provider's bridge or lab address through
    the tunnel, though its packets get there.  A member holding no VM there
    sends tunnel frames: the provider drops them (tunnel_no_endpoint).
    """
    provider = e2e.provider("public")
    first = e2e.consumer("c_iso_a")
    second = e2e.consumer("c_iso_b")

    def body(result: FlowResult) -> None:
        vms: dict[str, dict] = {}
        errors: list[BaseException] = []

        def request(consumer: Consumer) -> None:
            try:
                vms[consumer.name] = consumer.request(provider.name)
            except BaseException as e:
                errors.append(e)

        started = time.monotonic()
        threads = [threading.Thread(target=request, args=(c,)) for c in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        result.figures["two_requests_s"] = round(time.monotonic() - started, 1)
        vm_a, vm_b = vms[first.name], vms[second.name]
        if vm_a["tunnel_address"] == vm_b["tunnel_address"]:
            raise E2EError(f"both consumers were given tunnel address {vm_a['tunnel_address']}"
                           f" by {provider.name} (their requests were in flight together)")
        check_hostname(first, vm_a)
        check_hostname(second, vm_b)
        interface = vm_b["tunnel"]["interface"]
        provider_key = vm_b["wireguard"]["provider_public_key"]
        bridge_address = provider.bridge_address.split("/")[0]
        lab_address = provider.host.address
        # the second consumer opens its side of the tunnel to everything
        # (probes go out of its interface: the lab address must stay routed
        # through the lab, which carries the tunnel itself)
        targets = [vm_a["address"], bridge_address, lab_address]
        allowed = [f"{vm_b['provider_tunnel_address']}/32", f"{vm_b['address']}/32",
                   *[f"{a}/32" for a in targets]]
        e2e.lab.run(second.host, ["wg", "set", interface, "peer", provider_key,
                                  "allowed-ips", ",".join(allowed)], check=True)
        checks = {}
        ok, line = _reach(second, "ping", vm_b["provider_tunnel_address"], "2", interface)
        checks["ping provider tunnel address (allowed)"] = ok
        ok_own, line_own = _reach(second, "tcp", vm_b["address"], "5", interface)
        checks["own VM port 22 (allowed)"] = ok_own
        if not (ok and ok_own):
            raise E2EError(f"{second.name} cannot reach what it may: {checks}"
                           f" ({line}; {line_own})")
        before = wg_transfer(e2e.lab, provider.host, provider.interface())
        key_b = vm_b["wg_public_key"]
        denied = {}
        for address, what in ((vm_a["address"], "the first consumer's VM"),
                              (bridge_address, "the provider's bridge address"),
                              (lab_address, "the provider's lab address")):
            reached, line = _reach(second, "ping", address, "3", interface)
            denied[f"ping {what} {address}"] = (reached, line)
            reached, line = _reach(second, "tcp", address, "3", interface)
            denied[f"tcp {what} {address}:22"] = (reached, line)
        after = wg_transfer(e2e.lab, provider.host, provider.interface())
        leaks = {k: v for k, v in denied.items() if v[0]}
        if leaks:
            raise E2EError(f"{second.name} reached through the tunnel: {leaks}")
        got = after.get(key_b, (0, 0))[0] - before.get(key_b, (0, 0))[0]
        if got <= 0:
            raise E2EError(f"the probes never reached the provider's interface ({before} ->"
                           f" {after}): isolation was not tested")
        result.notes.append(f"{second.name} (its AllowedIPs opened, probes bound to"
                            f" {interface}) could not reach:"
                            f" {', '.join(denied)}; the provider's interface received"
                            f" {got} bytes of those probes from it")
        # the first consumer still reaches its own VM
        check_hostname(first, vm_a)
        # a member that is not a consumer here sends tunnel frames
        drops_before = provider.metrics_drops().get("tunnel_no_endpoint", 0)
        rogue = e2e.lab.add_host("rogue")
        rogue_dir = e2e.base / "rogue"
        rogue_dir.mkdir(mode=0o700, exist_ok=True)
        argv = [sys.executable, "-m", "omerta.testing.e2e", "rogue", "--data-dir",
                str(rogue_dir), "--invite", e2e.invite, "--provider-id",
                provider.daemon.status()["peer_id"], "--count", "20"]
        for spec in e2e.bootstrap:
            argv += ["--bootstrap", spec]
        out = e2e.lab.run(rogue, argv, env=environment(), cwd=REPO, timeout=90)
        try:
            sent = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise E2EError(f"the rogue member failed: {out.stdout}\n{out.stderr[-2000:]}"
                           ) from None
        if sent.get("error") or not sent.get("frames_out"):
            raise E2EError(f"the rogue member sent no tunnel frames: {sent}"
                           f"\n{out.stderr[-2000:]}")
        drops = wait(lambda: (provider.metrics_drops().get("tunnel_no_endpoint", 0)
                              - drops_before >= sent["frames_out"]) and provider.metrics_drops(),
                     10.0, "the provider to count the rogue's frames as tunnel_no_endpoint",
                     lambda: f"drops now {provider.metrics_drops()}, before"
                             f" {drops_before}, rogue {sent}")
        result.figures["rogue_frames"] = sent["frames_out"]
        result.figures["tunnel_no_endpoint"] = (
            f"{drops_before} -> {drops.get('tunnel_no_endpoint')}")
        check_hostname(second, vm_b)
        for consumer, vm in ((first, vm_a), (second, vm_b)):
            consumer.release_all()
            check_released(e2e, consumer, provider, vm)

    return _flow("isolation", e2e, body, first, second, provider)


FLOWS = {
    "vm-provision": flow_provision,
    "vm-nat": flow_nat,
    "vm-relay": flow_relay,
    "failover": flow_failover,
    "isolation": flow_isolation,
}


def main(argv: Sequence[str] | None = None) -> int:
    """
    C{python -m omerta.testing.e2e [--keep DIR] FLOW...} (what the scripts in
    C{scripts/e2e/} run): one lab, the flows in order, a summary line each.
    """
    import argparse

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
    sys.exit(main())
