"""
C{twistd omerta-node}: a plain member node, the one a consumer keeps running
(C{omerta up} starts it in the background, C{omerta down} stops it).

It joins its networks, discovers its NAT, holds relay reservations when it
is behind one, keeps its peers' paths alive and serves the control API on
C{DATA_DIR/control.sock}, through which the C{omerta} command works without
joining the mesh itself.
"""

from __future__ import annotations

from omerta.app.options import NodeOptions, make_node_service
from omerta.wire.messages import Capability

DEFAULT_PORT = 7402


class Options(NodeOptions):
    default_port = DEFAULT_PORT
    longdesc = "Run an omerta member node (what 'omerta up' starts)."

    def serves_stun(self) -> bool:
        return False

    def capabilities(self) -> Capability:
        return Capability.NONE


def makeService(options: Options):
    return make_node_service(options)
