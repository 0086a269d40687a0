"""
omerta: a peer-to-peer overlay network node on Twisted.

Layers, lowest first (a module only imports from its own layer or below):

- L{omerta.wire}: pure codecs (construct), one L{omerta.wire.ParseError}.
- L{omerta.crypto}: identities, network keys, frame sealing, invite links.
- L{omerta.stun}: STUN server, client and NAT behaviour discovery.
- L{omerta.mesh}: the node with its single UDP socket.
- L{omerta.roles}: relay and provider behaviour on top of the mesh.
- L{omerta.app}: twistd plugins, command line, operations.

L{omerta.testing} holds fakes and the simulated network used by the tests and
benchmarks; it may import any layer and nothing imports it.
"""

__version__ = "0.1.0"
