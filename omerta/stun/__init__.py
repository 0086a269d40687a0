"""
STUN on the node's socket: the RFC 8489/5780 server, client transactions and
NAT behaviour discovery.  (Built by the STUN issue; until then the socket's
demultiplexer counts STUN datagrams as C{stun_unhandled}.)
"""
