"""
Local WireGuard tunnels: wireguard-go devices driven over their UAPI socket
(L{omerta.tunnel.wgdevice}, L{omerta.tunnel.uapi}) and the provider host's
nftables isolation between consumers and VMs (L{omerta.tunnel.firewall}).
"""
