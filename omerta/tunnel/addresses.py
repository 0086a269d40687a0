"""
Tunnel addresses: each provider terminates its consumers in a /24 of its
own inside 100.64.0.0/10 (the shared address space of RFC 6598, which no
home LAN or public service uses), chosen from its peer id, so a consumer
that holds VMs from several providers sees a different subnet for each.

    subnet = provider_subnet(provider_id)      # e.g. 100.93.17.0/24
    subnet[1]                                  # the provider's own address
    pool = ConsumerPool(subnet)
    pool.allocate(used={"100.93.17.2"})        # '100.93.17.3'

Two providers land on the same /24 with probability 1 in 16,384; a consumer
holding VMs from both is told so (L{omerta.tunnel.consumer_side}).
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Iterable

SPACE = ipaddress.IPv4Network("100.64.0.0/10")
PREFIX = 24
_LABEL = b"omerta tunnel subnet v1\x00"


class AddressesExhausted(Exception):
    """Every consumer address of a provider's subnet is in use."""


def provider_subnet(provider_id: bytes) -> ipaddress.IPv4Network:
    """The /24 a provider gives its consumers' tunnels."""
    digest = hashlib.sha256(_LABEL + provider_id).digest()
    count = 1 << (PREFIX - SPACE.prefixlen)
    index = int.from_bytes(digest[:4], "big") % count
    base = int(SPACE.network_address) + (index << (32 - PREFIX))
    return ipaddress.IPv4Network((base, PREFIX))


def provider_address(provider_id: bytes) -> str:
    """The provider's own address in its subnet (the first host)."""
    return str(provider_subnet(provider_id)[1])


class ConsumerPool:
    """The consumer addresses of a provider's subnet: every host but the first."""

    def __init__(self, subnet: ipaddress.IPv4Network):
        self.subnet = subnet

    def allocate(self, used: Iterable[str]) -> str:
        taken = set(used)
        hosts = self.subnet.hosts()
        next(hosts)  # the provider's own
        for address in hosts:
            if str(address) not in taken:
                return str(address)
        raise AddressesExhausted(f"all {self.subnet.num_addresses - 3} consumer addresses of"
                                 f" {self.subnet} are in use")

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        return ip in self.subnet and ip not in (self.subnet[0], self.subnet[1],
                                                self.subnet.broadcast_address)
