#!/usr/bin/env python3
"""
A small program on the consumer client (docs/api.md): join a network from an
invite link, ask a provider for a VM (by name, or the best-ranked one with
room), show what it granted, list the VMs held, and give the VM back.

    vm_client.py --data-dir /tmp/me --invite 'omerta://join/...' [--provider provider-1]

Against the local mesh of scripts/run-local-mesh --keep (its invite:
.venv/bin/omerta --data-dir run/local-mesh/relay network show --id local).
"""

import argparse
import sys

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from omerta.mesh.network import MeshNetwork, NotJoined
from omerta.roles.consumer_client import ConsumerClient, ConsumerError, VmRequest


async def main(reactor, args):
    mesh = MeshNetwork(args.data_dir, invites=[args.invite], nat_interval=0, reactor=reactor)
    await mesh.start()
    client = ConsumerClient(mesh, args.data_dir)
    try:
        granted = await client.request(VmRequest(vcpus=1, memory_mb=256, name="example"),
                                       provider=args.provider, timeout=60)
        vm = granted.vm
        print(f"VM {vm.vm_id} from {vm.provider_name or vm.provider}: {vm.state},"
              f" over a {granted.connection.kind} path")
        print(f"  provider's WireGuard key {vm.provider_wg_key}; tunnel address"
              f" {vm.tunnel_address} (the running node carries the tunnel: docs/tunnel.md)")
        for held in client.held():
            print(f"held: {held.vm_id} {held.state} ({held.provider_name})")
        await client.release(vm, timeout=30)
        print(f"released {vm.vm_id}")
    except (ConsumerError, NotJoined, LookupError) as e:
        print(f"vm_client: {e}", file=sys.stderr)
        return 1
    finally:
        await mesh.stop()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--invite", required=True)
    parser.add_argument("--provider", default=None,
                        help="peer id, prefix or name (default: the best-ranked with room)")
    arguments = parser.parse_args()

    def run(reactor):
        d = ensureDeferred(main(reactor, arguments))
        d.addCallback(lambda status: status and sys.exit(status))
        return d

    react(run)
