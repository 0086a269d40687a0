"""
C{twistd omerta-relay}: a reachable node that other nodes bootstrap from.

A relay serves STUN on its mesh port by default (with C{--stun-alternate}
also the RFC 5780 tests), holds reservations for NAT-bound members, forwards
relayed data between members (C{--relay-*} limits) and coordinates hole
punches (docs/traversal.md).
"""

from __future__ import annotations

from omerta.app.options import NodeOptions, make_node_service
from omerta.wire.messages import Capability


class Options(NodeOptions):
    default_port = 7400
    longdesc = "Run an omerta relay node: a public bootstrap and relay for NAT-bound peers."
    optFlags = [["no-stun-server", None, "Do not answer STUN requests."]]

    def serves_stun(self) -> bool:
        return not self["no-stun-server"]

    def relay_role(self) -> bool:
        return True

    def capabilities(self) -> Capability:
        return Capability.RELAY | (Capability.STUN if self.serves_stun() else Capability.NONE)


def makeService(options: Options):
    return make_node_service(options)
