"""
Identities (Ed25519), network keys, frame sealing (ChaCha20-Poly1305) and
invite links.  Everything here is synchronous and free of I/O except the
explicit load/save helpers, which go through L{omerta.storage}.
"""
