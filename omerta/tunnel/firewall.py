"""
Isolation on the provider host: what may enter from, and leave to, the
WireGuard interface that carries all consumers' tunnels.

One nftables table (family C{inet}) per provider holds everything, so the
rest of the host's rule set is never touched and removing the table undoes
it all.  Its base chains hook input and forward with policy accept (the
host's other traffic passes as before) and send only packets from or to
the tunnel interface through chains that drop by default:

  - input from the tunnel: ICMP echo requests to the provider's tunnel
    address, and established/related traffic to it;
  - forward from the tunnel: only packets whose C{ip saddr . ip daddr}
    is in the set C{pairs} (consumer tunnel address . VM address);
  - forward to the tunnel: established/related traffic only, so a VM can
    answer its consumer but open nothing itself;
  - no IPv6 at all from or to the tunnel.

Traffic the host itself sends (output hook) is not filtered here.

Forwarding: L{enable_forwarding} turns IPv4 forwarding on for one
interface, not globally.  Linux decides by the interface a packet arrives
on, so both the tunnel interface and the VMs' bridge need it.

Scripts are built by pure functions (L{ruleset}, L{allow_script}, ...) and
loaded atomically with C{nft -f -}.  Everything here blocks.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

from twisted.logger import Logger

__all__ = [
    "FirewallError", "FirewallUnavailable", "TunnelFirewall", "allow_script",
    "check_nftables", "enable_forwarding", "parse_pairs", "remove_script", "revoke_script",
    "ruleset", "sync_script",
]

SET = "pairs"
_TABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
INSTALL_HINT = "apt install nftables"

Pair = tuple[str, str]


class FirewallError(Exception):
    """
    An nftables operation (or a sysctl) failed; the message says why.
    """


class FirewallUnavailable(FirewallError):
    """
    nftables cannot be used here: not installed, or not permitted.
    """


def check_nftables(command: Sequence[str] = ("nft",)) -> None:
    """
    @raise FirewallUnavailable: C{nft} is missing, or this process may
        not use it (not root / no CAP_NET_ADMIN).
    """
    if shutil.which(command[0]) is None:
        raise FirewallUnavailable(f"{command[0]} is not installed (no {command[0]} on PATH); "
                                  f"install it with `{INSTALL_HINT}`")
    try:
        result = subprocess.run([*command, "list", "tables"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        raise FirewallUnavailable(f"cannot run {' '.join(command)}: {e}") from None
    if result.returncode != 0:
        detail = result.stderr.strip()
        if "not permitted" in detail.lower() or "permission denied" in detail.lower():
            raise FirewallUnavailable("the provider's tunnel firewall needs root "
                                      f"(CAP_NET_ADMIN) for nftables: {detail}")
        raise FirewallUnavailable(f"nftables does not work here: {detail}")


# -- pure parts ------------------------------------------------------------------

def _table(name: str) -> str:
    if not isinstance(name, str) or not _TABLE.match(name):
        raise ValueError(f"nftables table name {name!r} must be a letter then up to 63 "
                         "letters, digits or '_'")
    return name


def _interface(name: str) -> str:
    if not isinstance(name, str) or not _IFNAME.match(name) or name in (".", ".."):
        raise ValueError(f"interface name {name!r} must be 1-15 of A-Z, a-z, 0-9, '_', "
                         "'.' and '-'")
    return name


def _ipv4(address: str) -> str:
    try:
        return str(ipaddress.IPv4Address(address))
    except (ValueError, TypeError):
        raise ValueError(f"{address!r} is not an IPv4 address") from None


def _pair(pair: Pair) -> Pair:
    consumer, vm = pair
    return _ipv4(consumer), _ipv4(vm)


def _elements(pairs: Iterable[Pair]) -> str:
    return ", ".join(f"{c} . {v}" for c, v in sorted(_pair(p) for p in pairs))


def ruleset(table: str, interface: str, provider_address: str,
            pairs: Iterable[Pair] = ()) -> str:
    """
    The script that (re)creates the table in one transaction: it creates
    the table if missing, deletes it, and declares it whole, so loading it
    again gives the same table (with the set holding C{pairs}).
    """
    table, interface = _table(table), _interface(interface)
    provider = _ipv4(provider_address)
    elements = _elements(pairs)
    elements_line = f"\t\telements = {{ {elements} }}\n" if elements else ""
    return (
        f"table inet {table} {{}}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        f"\tset {SET} {{\n"
        f"\t\ttype ipv4_addr . ipv4_addr\n"
        f"{elements_line}"
        f"\t}}\n"
        f"\tchain input {{\n"
        f"\t\ttype filter hook input priority filter; policy accept;\n"
        f"\t\tiifname \"{interface}\" jump tunnel_to_host\n"
        f"\t}}\n"
        f"\tchain forward {{\n"
        f"\t\ttype filter hook forward priority filter; policy accept;\n"
        f"\t\tiifname \"{interface}\" jump from_tunnel\n"
        f"\t\toifname \"{interface}\" jump to_tunnel\n"
        f"\t}}\n"
        f"\tchain tunnel_to_host {{\n"
        f"\t\tmeta nfproto ipv6 drop\n"
        f"\t\tip daddr {provider} ct state established,related accept\n"
        f"\t\tip daddr {provider} icmp type echo-request accept\n"
        f"\t\tdrop\n"
        f"\t}}\n"
        f"\tchain from_tunnel {{\n"
        f"\t\tmeta nfproto ipv6 drop\n"
        f"\t\tip saddr . ip daddr @{SET} accept\n"
        f"\t\tdrop\n"
        f"\t}}\n"
        f"\tchain to_tunnel {{\n"
        f"\t\tmeta nfproto ipv6 drop\n"
        f"\t\tct state established,related accept\n"
        f"\t\tdrop\n"
        f"\t}}\n"
        f"}}\n"
    )


def allow_script(table: str, consumer: str, vm: str) -> str:
    """
    Add one pair (adding a pair already there is not an error).
    """
    return f"add element inet {_table(table)} {SET} {{ {_elements([(consumer, vm)])} }}\n"


def revoke_script(table: str, consumer: str, vm: str) -> str:
    """
    Remove one pair; adding it first in the same transaction makes
    revoking a pair that is not there a no-op rather than an error.
    """
    elements = _elements([(consumer, vm)])
    table = _table(table)
    return (f"add element inet {table} {SET} {{ {elements} }}\n"
            f"delete element inet {table} {SET} {{ {elements} }}\n")


def sync_script(table: str, pairs: Iterable[Pair]) -> str:
    """
    Make the set exactly C{pairs}, atomically.
    """
    table = _table(table)
    script = f"flush set inet {table} {SET}\n"
    elements = _elements(pairs)
    if elements:
        script += f"add element inet {table} {SET} {{ {elements} }}\n"
    return script


def remove_script(table: str) -> str:
    """
    Delete the table; creating it first makes this a no-op when it is
    already gone.
    """
    table = _table(table)
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


def parse_pairs(text: str) -> set[Pair]:
    """
    The pairs in the output of C{nft -j list set inet TABLE pairs}.

    @raise ValueError: not such output.
    """
    try:
        document = json.loads(text)
        pairs = set()
        for item in document["nftables"]:
            if "set" not in item:
                continue
            for element in item["set"].get("elem", []):
                if isinstance(element, dict) and "elem" in element:
                    element = element["elem"]["val"]
                consumer, vm = element["concat"]
                pairs.add(_pair((consumer, vm)))
        return pairs
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"unexpected nft -j output: {e}") from None


# -- the firewall ------------------------------------------------------------

class TunnelFirewall:
    """
    The table C{table} isolating consumers arriving on C{interface} (the
    provider's WireGuard interface, tunnel address C{provider_address}).

    C{command} runs nft (e.g. C{("ip", "netns", "exec", "NS", "nft")} to
    act in another network namespace).
    """

    log = Logger()

    def __init__(self, table: str, interface: str, provider_address: str, *,
                 command: Sequence[str] = ("nft",), timeout: float = 10.0):
        self.table = _table(table)
        self.interface = _interface(interface)
        self.provider_address = _ipv4(provider_address)
        self.command = tuple(command)
        self.timeout = timeout

    def __repr__(self) -> str:
        return (f"<TunnelFirewall table inet {self.table} on {self.interface} "
                f"({self.provider_address})>")

    def _nft(self, args: Sequence[str], what: str, script: str | None = None) -> str:
        try:
            result = subprocess.run([*self.command, *args], input=script, capture_output=True,
                                    text=True, timeout=self.timeout)
        except FileNotFoundError:
            raise FirewallUnavailable(f"{self.command[0]} is not installed; install it with "
                                      f"`{INSTALL_HINT}`") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise FirewallError(f"{what} (table inet {self.table}) failed: {e}") from None
        if result.returncode != 0:
            detail = result.stderr.strip()
            if "not permitted" in detail.lower():
                raise FirewallUnavailable(f"{what} needs root (CAP_NET_ADMIN): {detail}")
            if "No such file or directory" in detail:
                detail += " (is the firewall installed? call install() first)"
            raise FirewallError(f"{what} (table inet {self.table}) failed: {detail}")
        return result.stdout

    def _load(self, script: str, what: str) -> None:
        self._nft(["-f", "-"], what, script)

    def install(self, pairs: Iterable[Pair] = ()) -> None:
        """
        Create or replace the whole table, atomically, with the set holding
        C{pairs}.  Loading it again is harmless (but resets the set).
        """
        self._load(ruleset(self.table, self.interface, self.provider_address, pairs),
                   "installing the tunnel firewall")
        self.log.info("tunnel firewall inet {table} installed on {interface}",
                      table=self.table, interface=self.interface)

    def allow(self, consumer_addr: str, vm_addr: str) -> None:
        """
        Let C{consumer_addr} (its tunnel address) reach C{vm_addr}.
        """
        self._load(allow_script(self.table, consumer_addr, vm_addr),
                   f"allowing {consumer_addr} to {vm_addr}")
        self.log.info("tunnel firewall {table}: {consumer} may reach {vm}", table=self.table,
                      consumer=consumer_addr, vm=vm_addr)

    def revoke(self, consumer_addr: str, vm_addr: str) -> None:
        """
        Stop C{consumer_addr} reaching C{vm_addr} (its open flows included).
        """
        self._load(revoke_script(self.table, consumer_addr, vm_addr),
                   f"revoking {consumer_addr} to {vm_addr}")
        self.log.info("tunnel firewall {table}: {consumer} may no longer reach {vm}",
                      table=self.table, consumer=consumer_addr, vm=vm_addr)

    def sync(self, pairs: set[Pair]) -> None:
        """
        Make the allowed pairs exactly C{pairs}.
        """
        self._load(sync_script(self.table, pairs), "setting the allowed pairs")

    def pairs(self) -> set[Pair]:
        """
        The allowed (consumer, VM) pairs, read back from the kernel.
        """
        output = self._nft(["-j", "list", "set", "inet", self.table, SET],
                           "listing the allowed pairs")
        try:
            return parse_pairs(output)
        except ValueError as e:
            raise FirewallError(str(e)) from None

    def remove(self) -> None:
        """
        Delete the table (nothing if it is not there).
        """
        self._load(remove_script(self.table), "removing the tunnel firewall")
        self.log.info("tunnel firewall inet {table} removed", table=self.table)


def enable_forwarding(interface: str, proc_sys: Path = Path("/proc/sys")) -> None:
    """
    Turn IPv4 forwarding on for C{interface} only (not the global switch),
    in the network namespace of the calling thread.

    @raise FirewallError: no such interface, or not permitted.
    """
    interface = _interface(interface)
    path = Path(proc_sys) / "net" / "ipv4" / "conf" / interface / "forwarding"
    try:
        path.write_text("1\n")
    except FileNotFoundError:
        raise FirewallError(f"cannot enable forwarding on {interface}: no such interface in "
                            f"this network namespace (no {path})") from None
    except PermissionError:
        raise FirewallError(f"enabling forwarding on {interface} needs root "
                            f"(CAP_NET_ADMIN): {path} is not writable") from None
    except OSError as e:
        raise FirewallError(f"enabling forwarding on {interface} ({path}) failed: "
                            f"{e.strerror or e} (is /proc/sys read-only in this "
                            "container?)") from None
