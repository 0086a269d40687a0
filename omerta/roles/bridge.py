"""
The Linux bridge the provider's VMs are plugged into, and their addresses.

L{ensure_bridge} creates the bridge (default L{DEFAULT_BRIDGE}, with the host
address L{DEFAULT_BRIDGE_ADDRESS}) if it is missing, gives it its address and
brings it up; running it again changes nothing.  It uses netlink (pyroute2),
blocks, and needs CAP_NET_ADMIN: call it from a worker thread.

The bridge is deliberately not libvirt's C{default} network: that one runs
dnsmasq and NATs the guests to the host's uplink, and a provider decides
itself what its guests may reach.  Nothing here routes or NATs: guests reach
the host's bridge address and each other.

L{AddressPool} is pure: it hands out the host addresses of the bridge's
subnet that are neither the bridge's own nor already used.  The VM backend
keeps the used ones in its ledger, so allocation survives a restart.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Iterable

from twisted.logger import Logger

DEFAULT_BRIDGE = "omerta-br0"
DEFAULT_BRIDGE_ADDRESS = "10.237.0.1/24"

log = Logger()


class BridgeError(Exception):
    """
    The bridge cannot be set up; the message says what to do.
    """


class AddressesExhausted(BridgeError):
    """
    Every host address of the bridge's subnet is in use.
    """


class AddressPool:
    """
    Guest addresses from the subnet of the bridge's address.

    @param interface: the bridge's address with its prefix length, e.g.
        C{10.237.0.1/24}; it is the guests' gateway.
    """

    def __init__(self, interface: str) -> None:
        try:
            self.interface = ipaddress.IPv4Interface(interface)
        except ValueError as e:
            raise BridgeError(f"bad bridge address {interface!r}: {e}") from e
        if self.interface.network.prefixlen > 30:
            raise BridgeError(
                f"bridge address {interface} leaves no room for guests; use a prefix of /30 or"
                f" shorter, e.g. 10.237.0.1/24"
            )
        if self.interface.ip in (self.interface.network.network_address,
                                 self.interface.network.broadcast_address):
            raise BridgeError(f"bridge address {interface} is not a host address of its subnet")

    @property
    def gateway(self) -> str:
        return str(self.interface.ip)

    @property
    def prefixlen(self) -> int:
        return self.interface.network.prefixlen

    def with_prefix(self, address: str) -> str:
        """
        C{address} as the guest configures it, e.g. C{10.237.0.2/24}.
        """
        return f"{address}/{self.prefixlen}"

    def allocate(self, used: Iterable[str | None]) -> str:
        """
        The lowest host address not in C{used} and not the gateway.

        @raise AddressesExhausted: there is none.
        """
        taken = {ipaddress.IPv4Address(u) for u in used if u}
        taken.add(self.interface.ip)
        for host in self.interface.network.hosts():
            if host not in taken:
                return str(host)
        raise AddressesExhausted(
            f"all {self.interface.network.num_addresses - 2} addresses of"
            f" {self.interface.network} are in use"
        )

    def __contains__(self, address: str) -> bool:
        return ipaddress.IPv4Address(address) in self.interface.network


def ensure_bridge(name: str = DEFAULT_BRIDGE, address: str = DEFAULT_BRIDGE_ADDRESS,
                  iproute: Callable[[], object] | None = None) -> bool:
    """
    Make sure bridge C{name} exists, carries C{address} and is up.

    @param iproute: opens a pyroute2 C{IPRoute} (tests pass a fake).
    @return: whether the bridge was created.
    @raise BridgeError: C{name} is another kind of interface, or netlink
        refused (typically: not root).
    """
    if len(name.encode()) > 15:
        raise BridgeError(f"bridge name {name!r} is longer than 15 bytes")
    interface = ipaddress.IPv4Interface(address)
    if iproute is None:
        from pyroute2 import IPRoute as iproute
    from pyroute2.netlink.exceptions import NetlinkError

    created = False
    try:
        with iproute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                ipr.link("add", ifname=name, kind="bridge")
                found = ipr.link_lookup(ifname=name)
                created = True
                log.info("created bridge {name}", name=name)
            index = found[0]
            [link] = ipr.get_links(index)
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind != "bridge":
                raise BridgeError(
                    f"{name} exists but is a {kind or 'plain'} interface, not a bridge;"
                    f" choose another bridge name or remove it"
                )
            have = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in ipr.get_addr(index=index, family=2)
            }
            if (str(interface.ip), interface.network.prefixlen) not in have:
                ipr.addr("add", index=index, address=str(interface.ip),
                         prefixlen=interface.network.prefixlen)
            ipr.link("set", index=index, state="up")
    except NetlinkError as e:
        raise BridgeError(
            f"cannot set up bridge {name} with {address}: {e.args[-1] if e.args else e}"
            f" (needs root or CAP_NET_ADMIN)"
        ) from e
    return created
