"""
Text forms of endpoints and bootstrap specs, parsed with errors a person can
act on.

- endpoint: C{host:port}, C{[v6addr]:port}; host is an IPv4 or IPv6 literal or
  a DNS name (resolution happens later, in the node).
- bootstrap spec: C{ID_OR_NAME@endpoint}; a 32-hex-digit peer id is checked
  against the bootstrap node's key, a name is taken on trust until a signed
  announcement binds it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from omerta.crypto.identity import IdentityError, is_peer_id_text, validate_name

_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


class AddressError(ValueError):
    """
    A text endpoint or bootstrap spec that cannot be used; the message says
    what form is expected.
    """


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def family(self) -> int:
        """
        4 or 6 for an IP literal; 0 for a host name.
        """
        try:
            return ipaddress.ip_address(self.host).version
        except ValueError:
            return 0

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    if not (text.isascii() and text.isdigit()):
        raise AddressError(f"port {text!r} is not a number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise AddressError(f"port {port} is out of range ({low}-65535)")
    return port


def _check_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not name or not all(
        _HOSTNAME_LABEL.match(label) for label in name.split(".")
    ):
        raise AddressError(f"{host!r} is neither an IP address nor a valid host name")
    return name.lower()


def parse_endpoint(text: str) -> Endpoint:
    """
    Parse C{host:port} or C{[ipv6]:port}.
    """
    text = text.strip()
    usage = "expected HOST:PORT, or [IPV6]:PORT for an IPv6 address"
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise AddressError(f"{text!r}: {usage}")
        host, port = text[1:close], text[close + 2 :]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError(host)
        except ValueError:
            raise AddressError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise AddressError(f"{text!r}: {usage}")
        if ":" in host:
            raise AddressError(f"{text!r}: put an IPv6 address in brackets, e.g. [{host}]:{port}")
    return Endpoint(_check_host(host), parse_port(port))


@dataclass(frozen=True)
class BootstrapSpec:
    """
    A peer to bootstrap from: C{peer_id} (hex) when given as an id, otherwise
    C{name}; neither for "whoever answers at this address" (C{omerta vm
    request --provider HOST:PORT}).
    """

    endpoint: Endpoint
    peer_id: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        who = self.peer_id or self.name
        return f"{who}@{self.endpoint}" if who else str(self.endpoint)


def parse_bootstrap(text: str) -> BootstrapSpec:
    """
    Parse C{ID_OR_NAME@host:port}.
    """
    who, sep, where = text.strip().partition("@")
    if not sep or not who:
        raise AddressError(
            f"bootstrap {text!r}: expected ID_OR_NAME@HOST:PORT, for example"
            f" relay-1@192.0.2.7:7400"
        )
    endpoint = parse_endpoint(where)
    if is_peer_id_text(who.lower()):
        return BootstrapSpec(endpoint, peer_id=who.lower())
    try:
        return BootstrapSpec(endpoint, name=validate_name(who))
    except IdentityError as e:
        raise AddressError(f"bootstrap {text!r}: {e}") from None
