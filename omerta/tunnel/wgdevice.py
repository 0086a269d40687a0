"""
One local WireGuard interface run by wireguard-go (the kernel module is not
assumed) and configured over its UAPI socket (L{omerta.tunnel.uapi}) and
netlink (pyroute2).

The node owns each wireguard-go as a child process that dies with it
(C{PR_SET_PDEATHSIG}), leaves a pidfile C{NAME.pid} (and the process's log
C{NAME.log}) in its state directory, and after a crash L{reap_stale}
removes what the previous run left behind.  Each peer's endpoint is a UDP
address the node itself owns (normally on loopback), so the mesh carries
the WireGuard datagrams.

Everything here blocks (process start, socket waits with deadlines,
netlink): call it from a thread, not the reactor.  Note that the kernel
sends C{PDEATHSIG} when the I{thread} that started the process ends, so
L{WireGuardDevice.up} belongs in a thread that lives as long as the device
(a dedicated one, not a pool thread that may be retired).

No private key is ever written to a log line, repr or exception.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.logger import Logger

from omerta.crypto.wireguard import encode_key
from omerta.tunnel import uapi
from omerta.tunnel.uapi import PeerStats

__all__ = [
    "DeviceError", "NotPermitted", "PeerStats", "RUNTIME_DIR", "WireGuardDevice",
    "WireGuardError", "WireGuardUnavailable", "check_available", "check_name",
    "interface_name", "reap_stale",
]

RUNTIME_DIR = Path("/var/run/wireguard")
PROGRAM = "wireguard-go"
INSTALL_HINT = "apt install wireguard-go wireguard-tools"
PR_SET_PDEATHSIG = 1
CAP_NET_ADMIN = 12
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,14}\Z")
_PREFIX = re.compile(r"[a-z][a-z0-9-]{0,2}\Z")
_LOG_TAIL = 2000
_POLL = 0.02

log = Logger()


class WireGuardError(Exception):
    """
    Base of the errors here.
    """


class WireGuardUnavailable(WireGuardError):
    """
    wireguard-go cannot run on this host (not installed).
    """


class NotPermitted(WireGuardUnavailable):
    """
    This process may not create tunnels (not root / no CAP_NET_ADMIN, or
    no /dev/net/tun).
    """


class DeviceError(WireGuardError):
    """
    Starting, configuring or stopping a device failed; the message says
    why, with the end of wireguard-go's log where it helps.
    """


def _has_net_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def check_available(program: str = PROGRAM) -> str:
    """
    The path of wireguard-go if this process can run tunnels.

    @raise WireGuardUnavailable: wireguard-go is not installed.
    @raise NotPermitted: not root (no CAP_NET_ADMIN) or no usable
        /dev/net/tun.
    """
    path = shutil.which(program)
    if path is None:
        raise WireGuardUnavailable(
            f"{program} is not installed (no {program} on PATH); install it with "
            f"`{INSTALL_HINT}`")
    if not _has_net_admin():
        raise NotPermitted("tunnels need root (CAP_NET_ADMIN); run the node as root")
    if not os.path.exists("/dev/net/tun"):
        raise NotPermitted("tunnels need root (CAP_NET_ADMIN) and /dev/net/tun, which is "
                           "missing (load the tun module or pass the device into the "
                           "container)")
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        raise NotPermitted("tunnels need root (CAP_NET_ADMIN): /dev/net/tun is not "
                           "readable and writable by this user")
    return path


def check_name(name: str) -> str:
    """
    C{name} if it can name an interface here: 1-15 characters of
    C{[a-z0-9-]}, not starting with C{-}.

    @raise ValueError: it cannot.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"interface name {name!r} must be 1-15 characters of a-z, 0-9 "
                         "and '-', not starting with '-'")
    return name


def interface_name(prefix: str, *parts: bytes) -> str:
    """
    A deterministic interface name: C{prefix} (1-3 characters, e.g.
    C{omp}) and the first 12 hex digits of SHA-256 over C{parts} (each
    length-prefixed, so C{(b"ab", b"c")} and C{(b"a", b"bc")} differ).
    """
    if not _PREFIX.match(prefix):
        raise ValueError(f"interface name prefix {prefix!r} must be 1-3 characters of "
                         "a-z, 0-9 and '-', starting with a letter")
    digest = hashlib.sha256()
    for part in parts:
        if not isinstance(part, bytes):
            raise TypeError("interface_name parts are bytes")
        digest.update(len(part).to_bytes(4, "big") + part)
    return check_name(prefix + digest.hexdigest()[:12])


def _short(key: bytes) -> str:
    return encode_key(key)[:8] + "..."


def _pdeathsig_preexec():
    """
    A preexec_fn making the child receive SIGTERM when this thread ends,
    and end at once if the parent already did.
    """
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork
    parent = os.getpid()

    def preexec():
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _netlink():
    from pyroute2 import IPRoute

    return IPRoute()


def _netlink_error():
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


def _socket_answers(path: Path) -> bool:
    try:
        uapi.get_status(path, timeout=1.0)
    except uapi.UAPIError:
        return False
    return True


def _remove_dead_socket(path: Path) -> bool:
    if path.exists() and not _socket_answers(path):
        path.unlink(missing_ok=True)
        return True
    return False


class WireGuardDevice:
    """
    A wireguard-go interface C{name} with private key C{private_key}.

    Nothing happens until L{up}; L{down} undoes everything and may be
    called any number of times.

    @ivar listen_port: the UDP port wireguard-go bound (chosen by the
        system), after L{up}.
    @ivar public_key: the interface's public key.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        private_key: bytes,
        *,
        mtu: int = 1360,
        runtime_dir: Path = RUNTIME_DIR,
        state_dir: Path | None = None,
        program: str = PROGRAM,
        timeout: float = 5.0,
    ):
        self.name = check_name(name)
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise ValueError("a WireGuard private key is 32 bytes")
        if not isinstance(mtu, int) or not 576 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu!r} is not an integer 576-65535")
        self._private_key = private_key
        self.public_key = (X25519PrivateKey.from_private_bytes(private_key).public_key()
                           .public_bytes(Encoding.Raw, PublicFormat.Raw))
        self.mtu = mtu
        self.runtime_dir = Path(runtime_dir)
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.program = program
        self.timeout = timeout
        self.listen_port: int | None = None
        self._process: subprocess.Popen | None = None
        self._started = False
        self._log_file = None
        self._log_start = 0

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "down"
        return (f"<WireGuardDevice {self.name} public_key={encode_key(self.public_key)} "
                f"{state}>")

    # -- paths and state -----------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return uapi.socket_path(self.name, self.runtime_dir)

    @property
    def pidfile(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def log_tail(self, limit: int = _LOG_TAIL) -> str:
        """
        The end of what wireguard-go wrote since L{up} (empty if nothing).
        """
        f = self._log_file
        if f is None or f.closed:
            return ""
        try:
            f.flush()
            end = f.seek(0, os.SEEK_END)
            start = max(self._log_start, end - limit)
            f.seek(start)
            data = f.read(end - start)
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()

    def _error(self, message: str) -> DeviceError:
        tail = self.log_tail()
        if tail:
            message += f"\nwireguard-go {self.name} log (end):\n{tail}"
        return DeviceError(message)

    # -- up ------------------------------------------------------------------

    def up(self, addresses: list[str]) -> None:
        """
        Start wireguard-go, give it the private key and a system-chosen
        port (in L{listen_port}), set the MTU and C{addresses} (e.g.
        C{"100.64.0.1/24"}) and bring the link up.  On failure everything
        started is stopped again.

        @raise WireGuardUnavailable: see L{check_available}.
        @raise DeviceError: the interface or its socket is in use, or
            wireguard-go failed (its log is quoted).
        @raise ValueError: an address is not one.
        """
        if self.running:
            raise DeviceError(f"{self.name} is already up (wireguard-go pid {self.pid})")
        if isinstance(addresses, str):
            raise TypeError("addresses is a list of addresses, not one string")
        interfaces = [ipaddress.ip_interface(a) for a in addresses]
        path = check_available(self.program)
        with _netlink() as ipr:
            if ipr.link_lookup(ifname=self.name):
                raise DeviceError(
                    f"an interface named {self.name} already exists; a previous run may "
                    f"have left it (reap_stale, or `ip link del {self.name}`)")
        if self.socket_path.exists():
            if _socket_answers(self.socket_path):
                raise DeviceError(f"another wireguard-go already serves {self.socket_path} "
                                  f"(interface {self.name} in another network namespace?)")
            self.socket_path.unlink(missing_ok=True)
        self._start(path)
        try:
            self._wait_for_socket()
            self._configure(uapi.build_set(private_key=self._private_key, listen_port=0),
                            "setting the private key")
            self._configure_link(interfaces)
            self.listen_port = self._wait_for_port()
        except BaseException:
            try:
                self.down()
            except DeviceError:
                self.log.failure("cleaning up {name} after a failed start", name=self.name)
            raise
        self.log.info("WireGuard {name} up: wireguard-go pid {pid}, port {port}, public key "
                      "{public}", name=self.name, pid=self.pid, port=self.listen_port,
                      public=encode_key(self.public_key))

    def _start(self, path: str) -> None:
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.logfile, "a+b")
        else:
            self._log_file = tempfile.TemporaryFile()
        self._log_start = self._log_file.seek(0, os.SEEK_END)
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        try:
            self._process = subprocess.Popen(
                [path, "-f", self.name],
                stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                env=env, close_fds=True, preexec_fn=_pdeathsig_preexec())
        except (OSError, subprocess.SubprocessError) as e:
            self._log_file.close()
            self._log_file = None
            raise DeviceError(f"cannot start {path}: {e}") from None
        self._started = True
        if self.pidfile is not None:
            self.pidfile.write_text(f"{self._process.pid}\n")

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise self._error(f"wireguard-go for {self.name} exited with status {code} "
                                  "before its UAPI socket appeared")
            if self.socket_path.exists() and _socket_answers(self.socket_path):
                return
            if time.monotonic() >= deadline:
                raise self._error(f"wireguard-go for {self.name} opened no UAPI socket "
                                  f"{self.socket_path} within {self.timeout} s")
            time.sleep(_POLL)

    def _configure_link(self, interfaces) -> None:
        NetlinkError = _netlink_error()
        try:
            with _netlink() as ipr:
                found = ipr.link_lookup(ifname=self.name)
                if not found:
                    raise self._error(f"wireguard-go runs but there is no interface "
                                      f"{self.name} in this network namespace")
                index = found[0]
                ipr.link("set", index=index, mtu=self.mtu)
                for interface in interfaces:
                    ipr.addr("add", index=index, address=str(interface.ip),
                             prefixlen=interface.network.prefixlen)
                ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise self._error(f"configuring interface {self.name} failed: "
                              f"{os.strerror(e.code)}") from None

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + self.timeout
        while True:
            if not self.running:
                raise self._error(f"wireguard-go for {self.name} exited while coming up")
            port = self._status().listen_port
            if port:
                return port
            if time.monotonic() >= deadline:
                raise self._error(f"wireguard-go for {self.name} bound no UDP port within "
                                  f"{self.timeout} s of the link going up")
            time.sleep(_POLL)

    # -- configuration -------------------------------------------------------

    def _require_running(self) -> None:
        if not self.running:
            if self._process is None:
                raise DeviceError(f"{self.name} is not up")
            raise self._error(f"wireguard-go for {self.name} is not running (exit status "
                              f"{self._process.returncode})")

    def _configure(self, request: bytes, what: str) -> None:
        self._require_running()
        try:
            uapi.configure(self.socket_path, request, timeout=self.timeout)
        except uapi.UAPIError as e:
            raise self._error(f"{what} on {self.name} failed: {e}") from None

    def _status(self) -> uapi.DeviceStatus:
        self._require_running()
        try:
            return uapi.get_status(self.socket_path, timeout=self.timeout)
        except uapi.UAPIError as e:
            raise self._error(f"reading {self.name}'s state failed: {e}") from None

    def set_peer(self, public_key: bytes, endpoint: tuple[str, int], allowed_ips: list[str],
                 keepalive: int | None = None) -> None:
        """
        Add or update the peer C{public_key}: its endpoint, exactly
        C{allowed_ips} (replacing earlier ones) and a persistent keepalive
        of C{keepalive} seconds (C{None}: off).
        """
        peer = uapi.PeerConfig(public_key, endpoint=tuple(endpoint),
                               persistent_keepalive=keepalive or 0,
                               replace_allowed_ips=True, allowed_ips=tuple(allowed_ips))
        self._configure(uapi.build_set(peers=[peer]), f"setting peer {_short(public_key)}")
        self.log.info("WireGuard {name}: peer {peer} at {endpoint} for {allowed}",
                      name=self.name, peer=_short(public_key), endpoint=endpoint,
                      allowed=list(allowed_ips))

    def remove_peer(self, public_key: bytes) -> None:
        """
        Remove the peer C{public_key} (nothing if there is none).
        """
        request = uapi.build_set(peers=[uapi.PeerConfig(public_key, remove=True)])
        self._configure(request, f"removing peer {_short(public_key)}")
        self.log.info("WireGuard {name}: removed peer {peer}", name=self.name,
                      peer=_short(public_key))

    def peers(self) -> dict[bytes, PeerStats]:
        """
        Each peer's endpoint, allowed IPs, last handshake and byte counts.
        """
        return self._status().peers

    def _route(self, command: str, prefix: str) -> None:
        network = ipaddress.ip_network(prefix, strict=False)
        NetlinkError = _netlink_error()
        self._require_running()
        try:
            with _netlink() as ipr:
                found = ipr.link_lookup(ifname=self.name)
                if not found:
                    raise DeviceError(f"interface {self.name} is gone")
                family = socket.AF_INET6 if network.version == 6 else socket.AF_INET
                ipr.route(command, dst=str(network), oif=found[0], family=family)
        except NetlinkError as e:
            if command == "del" and e.code in (errno.ESRCH, errno.ENOENT):
                return
            raise DeviceError(f"{'adding' if command != 'del' else 'removing'} route "
                              f"{network} via {self.name} failed: {os.strerror(e.code)}"
                              ) from None

    def add_route(self, prefix: str) -> None:
        """
        Route C{prefix} into the tunnel (replacing a route to it).
        """
        self._route("replace", prefix)

    def remove_route(self, prefix: str) -> None:
        """
        Remove the route to C{prefix} through the tunnel, if there is one.
        """
        self._route("del", prefix)

    # -- down ----------------------------------------------------------------

    def down(self) -> None:
        """
        Stop wireguard-go, delete the interface if it is still there,
        remove the pidfile and the socket.  Safe to call again, or before
        L{up}.

        @raise DeviceError: the process or the interface would not go.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.log.warn("wireguard-go {name} (pid {pid}) ignored SIGTERM; killing it",
                              name=self.name, pid=process.pid)
                process.kill()
                process.wait(self.timeout)
        if not self._started:
            return
        NetlinkError = _netlink_error()
        try:
            with _netlink() as ipr:
                for index in ipr.link_lookup(ifname=self.name):
                    ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise DeviceError(f"deleting interface {self.name} failed: "
                                  f"{os.strerror(e.code)}") from None
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)
        _remove_dead_socket(self.socket_path)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._started = False
        self.listen_port = None
        if process is not None:
            self.log.info("WireGuard {name} down", name=self.name)


# -- after a crash -------------------------------------------------------------

def _wireguard_go_for(pid: int, name: str) -> bool:
    """
    Whether process C{pid} is (still) a wireguard-go serving C{name}.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    argv = raw.rstrip(b"\0").split(b"\0")
    return (len(argv) >= 2 and os.path.basename(argv[0]) == PROGRAM.encode()
            and argv[-1] == name.encode())


def _wait_gone(pid: int, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _wireguard_go_for(pid, name):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _kill(pid: int, name: str, timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, name, timeout):
            return
    raise DeviceError(f"wireguard-go for {name} (pid {pid}) survived SIGKILL")


def reap_stale(prefix: str, state_dir: Path, keep: Iterable[str] = frozenset(), *,
               own: Iterable[str] = (), runtime_dir: Path = RUNTIME_DIR,
               timeout: float = 5.0) -> list[str]:
    """
    Remove what a crashed run left: for each pidfile C{<prefix>*.pid} in
    C{state_dir} whose name is not in C{keep}, stop the process if it
    really is wireguard-go for that name (C{/proc/PID/cmdline}), then
    remove the pidfile and a socket nobody answers on; and delete the tun
    interfaces those pidfiles name, and those named in C{own} (names only
    this node uses), unless in C{keep}.  Interfaces of other nodes on the
    host, which share the prefix, are never touched.

    @return: the names removed, sorted.
    """
    keep = frozenset(keep)
    own = frozenset(own)
    removed: set[str] = set()
    state_dir = Path(state_dir)
    for pidfile in sorted(state_dir.glob(f"{prefix}*.pid")):
        name = pidfile.name[:-len(".pid")]
        if name in keep or not _NAME.match(name):
            continue
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid > 1 and _wireguard_go_for(pid, name):
            log.info("stopping stale wireguard-go {name} (pid {pid})", name=name, pid=pid)
            _kill(pid, name, timeout)
        pidfile.unlink(missing_ok=True)
        _remove_dead_socket(uapi.socket_path(name, runtime_dir))
        removed.add(name)
    NetlinkError = _netlink_error()
    with _netlink() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname")
            if (not name or not name.startswith(prefix) or name in keep
                    or name not in removed | own
                    or link.get(("linkinfo", "kind")) != "tun"):
                continue
            log.info("deleting stale interface {name}", name=name)
            try:
                ipr.link("del", index=link["index"])
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise DeviceError(f"deleting stale interface {name} failed: "
                                      f"{os.strerror(e.code)}") from None
            _remove_dead_socket(uapi.socket_path(name, runtime_dir))
            removed.add(name)
    return sorted(removed)
