"""
The node: one UDP socket, the demultiplexer in front of it, and the mesh
controller behind it.
"""
