"""
C{twistd omerta-provider}: a node that offers compute; with C{--relay} it
also plays the relay role in the same process.
"""

from __future__ import annotations

from omerta.app.options import NodeOptions, make_node_service
from omerta.wire.messages import Capability


class Options(NodeOptions):
    default_port = 7401
    longdesc = "Run an omerta provider node (add --relay to also serve as a relay)."
    optFlags = [
        ["relay", None, "Also run the relay role in this process (serves STUN too)."],
        ["stun-server", None, "Answer STUN requests (implied by --relay)."],
    ]

    def serves_stun(self) -> bool:
        return bool(self["relay"] or self["stun-server"])

    def relay_role(self) -> bool:
        return bool(self["relay"])

    def capabilities(self) -> Capability:
        flags = Capability.PROVIDER
        if self["relay"]:
            flags |= Capability.RELAY
        if self.serves_stun():
            flags |= Capability.STUN
        return flags


def makeService(options: Options):
    return make_node_service(options)
