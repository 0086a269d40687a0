"""
The cross-platform WireGuard configuration protocol (UAPI) that wireguard-go
serves on the unix stream socket C{/var/run/wireguard/NAME.sock}.

A request is C{get=1} or C{set=1} followed by C{key=value} lines and ends
with an empty line.  Keys are lowercase hex; a C{public_key} line starts a
peer, every line before the first one configures the device.  The reply to
C{get=1} is the device's C{key=value} lines (peers again introduced by
C{public_key}), then C{errno=N} and an empty line; C{set=1} is answered with
C{errno=N} alone.  C{N} is 0 or a negated errno (-22 EINVAL for a bad
line, -98 EADDRINUSE for a port in use, ...).

The codec here is pure (L{build_set}, L{build_get}, L{parse_get},
L{parse_errno}); L{transact}, L{get_status} and L{configure} make one blocking exchange
on the socket with a timeout.  The device's private key may be written in a
set request and is sent back in every get reply: L{parse_get} drops it (and
peers' preshared keys), and no error here ever quotes a request or reply.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

KEY_LEN = 32


class ParseError(ValueError):
    """
    A UAPI reply that does not follow the protocol.
    """


class UAPIError(Exception):
    """
    The device refused a request (C{errno} is the negated errno it sent,
    or a local one when the socket failed), or the exchange failed.
    """

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class UAPITimeout(UAPIError):
    """
    No complete reply within the timeout.
    """


@dataclass(frozen=True)
class PeerConfig:
    """
    One peer's part of a set request.  C{None} leaves a setting as it is;
    C{persistent_keepalive=0} turns keepalives off.
    """

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    endpoint: tuple[str, int] | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeerStats:
    """
    One peer as a get reply shows it.  C{last_handshake} is unix seconds
    or C{None} for never.
    """

    endpoint: tuple[str, int] | None
    allowed_ips: tuple[str, ...]
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int = 0


@dataclass(frozen=True)
class DeviceStatus:
    """
    A get reply without its secrets: C{listen_port} 0 when no port is bound
    yet (the interface is down), C{has_private_key} instead of the key.
    """

    listen_port: int
    fwmark: int
    has_private_key: bool
    peers: dict[bytes, PeerStats] = field(default_factory=dict)


# -- encoding ----------------------------------------------------------------

def _hex_key(key: bytes, what: str) -> str:
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes")
    return key.hex()


def _port(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{what} must be an integer 0-65535, not {value!r}")
    return value


def format_endpoint(endpoint: tuple[str, int]) -> str:
    """
    C{host:port} for an IPv4 address, C{[host]:port} for IPv6.
    """
    host, port = endpoint
    address = ipaddress.ip_address(host)
    _port(port, "endpoint port")
    if address.version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """
    The inverse of L{format_endpoint}.

    @raise ParseError: not an address and port.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ParseError(f"endpoint {text!r} has no port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host.split("%")[0])), _port(int(port), "port")
    except ValueError:
        raise ParseError(f"endpoint {text!r} is not an address and port") from None


def _prefix(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP prefix") from None


def build_get() -> bytes:
    return b"get=1\n\n"


def build_set(
    *,
    private_key: bytes | None = None,
    listen_port: int | None = None,
    fwmark: int | None = None,
    replace_peers: bool = False,
    peers: Iterable[PeerConfig] = (),
) -> bytes:
    """
    A complete set request (ending with the empty line).

    @raise ValueError: a key that is not 32 bytes, a port, endpoint or
        prefix that is not one.
    """
    lines = ["set=1"]
    if private_key is not None:
        lines.append("private_key=" + _hex_key(private_key, "the private key"))
    if listen_port is not None:
        lines.append(f"listen_port={_port(listen_port, 'listen_port')}")
    if fwmark is not None:
        if not isinstance(fwmark, int) or not 0 <= fwmark <= 0xFFFFFFFF:
            raise ValueError(f"fwmark must be a 32-bit unsigned integer, not {fwmark!r}")
        lines.append(f"fwmark={fwmark}")
    if replace_peers:
        lines.append("replace_peers=true")
    for peer in peers:
        lines.append("public_key=" + _hex_key(peer.public_key, "a peer's public key"))
        if peer.remove:
            lines.append("remove=true")
            continue
        if peer.update_only:
            lines.append("update_only=true")
        if peer.endpoint is not None:
            lines.append("endpoint=" + format_endpoint(peer.endpoint))
        if peer.persistent_keepalive is not None:
            lines.append("persistent_keepalive_interval="
                         f"{_port(peer.persistent_keepalive, 'persistent keepalive')}")
        if peer.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        lines.extend("allowed_ip=" + _prefix(p) for p in peer.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode("ascii")


# -- parsing -----------------------------------------------------------------

def _lines(data: bytes) -> list[tuple[str, str]]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("a UAPI reply is ASCII") from None
    if not text.endswith("\n\n"):
        raise ParseError("a UAPI reply ends with an empty line")
    pairs = []
    for line in text[:-2].split("\n"):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ParseError(f"UAPI reply line without key=value ({len(line)} characters)")
        pairs.append((key, value))
    if not pairs or pairs[-1][0] != "errno":
        raise ParseError("a UAPI reply ends with errno=")
    return pairs


def _int(key: str, value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise ParseError(f"{key} is not a number") from None
    if number < 0:
        raise ParseError(f"{key} is negative")
    return number


def _errno_of(pairs: list[tuple[str, str]]) -> int:
    value = pairs[-1][1]
    try:
        return int(value, 10)
    except ValueError:
        raise ParseError("errno is not a number") from None


def describe_errno(code: int) -> str:
    """
    wireguard-go's error codes as words (they are negated errnos; -55 is
    its "unknown error").
    """
    if code == -55:
        return "unknown error (errno -55)"
    try:
        return f"{os.strerror(abs(code))} (errno {code})"
    except ValueError:
        return f"errno {code}"


def _check(code: int, operation: str) -> None:
    if code != 0:
        raise UAPIError(f"wireguard-go refused the {operation}: {describe_errno(code)}",
                        errno=code)


def parse_errno(data: bytes) -> int:
    """
    The errno of a reply that should hold nothing else (the reply to set).

    @raise ParseError: not such a reply.
    """
    pairs = _lines(data)
    if len(pairs) != 1:
        raise ParseError("a set reply holds errno= alone")
    return _errno_of(pairs)


def parse_get(data: bytes) -> DeviceStatus:
    """
    A get reply as a L{DeviceStatus}; the private and preshared keys are
    dropped unread.

    @raise ParseError: the reply does not follow the protocol.
    @raise UAPIError: the reply carries a non-zero errno.
    """
    pairs = _lines(data)
    _check(_errno_of(pairs), "get request")
    device = {"listen_port": 0, "fwmark": 0, "has_private_key": False}
    peers: dict[bytes, PeerStats] = {}
    current: bytes | None = None
    peer: dict = {}

    def finish():
        if current is not None:
            sec, nsec = peer.pop("sec", 0), peer.pop("nsec", 0)
            peers[current] = PeerStats(
                endpoint=peer.get("endpoint"),
                allowed_ips=tuple(peer.get("allowed_ips", ())),
                last_handshake=(sec + nsec / 1e9) if (sec or nsec) else None,
                rx_bytes=peer.get("rx_bytes", 0),
                tx_bytes=peer.get("tx_bytes", 0),
                persistent_keepalive=peer.get("keepalive", 0),
            )

    for key, value in pairs[:-1]:
        if key == "public_key":
            finish()
            try:
                current = bytes.fromhex(value)
            except ValueError:
                raise ParseError("a public key is not hex") from None
            if len(current) != KEY_LEN:
                raise ParseError(f"a public key is {KEY_LEN} bytes")
            if current in peers:
                raise ParseError("the same peer twice")
            peer = {}
        elif current is None:
            if key == "private_key":
                device["has_private_key"] = any(c != "0" for c in value)
            elif key in ("listen_port", "fwmark"):
                device[key] = _int(key, value)
            # other device keys (extensions) are ignored
        elif key == "endpoint":
            peer["endpoint"] = parse_endpoint(value)
        elif key == "allowed_ip":
            try:
                peer.setdefault("allowed_ips", []).append(_prefix(value))
            except ValueError as e:
                raise ParseError(str(e)) from None
        elif key == "last_handshake_time_sec":
            peer["sec"] = _int(key, value)
        elif key == "last_handshake_time_nsec":
            peer["nsec"] = _int(key, value)
        elif key in ("rx_bytes", "tx_bytes"):
            peer[key] = _int(key, value)
        elif key == "persistent_keepalive_interval":
            peer["keepalive"] = _int(key, value)
        # preshared_key, protocol_version and unknown peer keys are ignored
    finish()
    return DeviceStatus(peers=peers, **device)


# -- the socket --------------------------------------------------------------

def socket_path(name: str, runtime_dir: Path = Path("/var/run/wireguard")) -> Path:
    return Path(runtime_dir) / f"{name}.sock"


def transact(path: Path | str, request: bytes, timeout: float = 5.0) -> bytes:
    """
    Send one request on a fresh connection to C{path} and return the reply,
    up to and including its terminating empty line.

    @raise UAPITimeout: no complete reply within C{timeout} seconds.
    @raise UAPIError: the socket is missing, refuses the connection, or
        closes before the reply is complete.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(request)
            reply = b""
            while b"\n\n" not in reply:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout
                s.settimeout(remaining)
                chunk = s.recv(65536)
                if not chunk:
                    raise UAPIError(f"{path} closed the connection before the reply ended "
                                    "(is wireguard-go exiting?)")
                reply += chunk
        except socket.timeout:
            raise UAPITimeout(f"no reply from {path} within {timeout} s") from None
        except FileNotFoundError:
            raise UAPIError(f"no UAPI socket {path}: is wireguard-go running?",
                            errno=-_errno.ENOENT) from None
        except ConnectionRefusedError:
            raise UAPIError(f"{path} refuses connections: stale socket of a wireguard-go "
                            "that is gone?", errno=-_errno.ECONNREFUSED) from None
        except OSError as e:
            raise UAPIError(f"talking to {path} failed: {e.strerror or e}",
                            errno=-(e.errno or 0)) from None
    return reply[:reply.index(b"\n\n") + 2]


def get_status(path: Path | str, timeout: float = 5.0) -> DeviceStatus:
    """
    The device's state.  @raise UAPIError: see L{transact} and L{parse_get}.
    """
    reply = transact(path, build_get(), timeout)
    try:
        return parse_get(reply)
    except ParseError as e:
        raise UAPIError(f"unexpected reply from {path}: {e}") from None


def configure(path: Path | str, request: bytes, timeout: float = 5.0) -> None:
    """
    Send a set request built by L{build_set}.

    @raise UAPIError: the device refused it (wireguard-go's log says why),
        or see L{transact}.
    """
    if not request.startswith(b"set=1\n"):
        raise ValueError("not a set request")
    reply = transact(path, request, timeout)
    try:
        code = parse_errno(reply)
    except ParseError as e:
        raise UAPIError(f"unexpected reply from {path}: {e}") from None
    _check(code, "configuration")
