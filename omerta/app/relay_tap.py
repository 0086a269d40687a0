"""
C{twistd omerta-relay}: a reachable node that other nodes bootstrap from.

At this stage of the product the relay role is a well-known, always-on mesh
member (bootstrap and announcements); forwarding, STUN service and hole-punch
coordination are added by their own components.
"""

from __future__ import annotations

from omerta.app.options import NodeOptions, make_node_service
from omerta.wire.messages import Capability


class Options(NodeOptions):
    default_port = 7400
    longdesc = "Run an omerta relay node: a public bootstrap and relay for NAT-bound peers."

    def capabilities(self) -> Capability:
        return Capability.RELAY


def makeService(options: Options):
    return make_node_service(options)
