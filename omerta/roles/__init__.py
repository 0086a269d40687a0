"""
Roles on top of the mesh: the relay (forwarding, reservations, hole-punch
coordination) and the provider (VMs on libvirt, resources, jobs).  At this
stage the roles are the capabilities a node announces; their behaviour is
built by the traversal and provider issues.
"""
