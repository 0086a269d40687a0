#!/usr/bin/env python3
"""
A small program on the MeshNetwork API (docs/api.md): join a network from an
invite link, serve an "echo" channel, and ask a named peer to echo a message.

    mesh_echo.py --data-dir /tmp/me --invite 'omerta://join/...' serve
    mesh_echo.py --data-dir /tmp/you --invite 'omerta://join/...' ask PEER hello
"""

import argparse
import sys

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from omerta.mesh.network import MeshNetwork


async def main(reactor, args):
    mesh = MeshNetwork(args.data_dir, invites=[args.invite], name=args.name,
                       nat_interval=0, reactor=reactor)
    await mesh.start()
    print(f"I am {mesh.peer_id}")
    if not await mesh.wait_for_peers(1, timeout=10):
        print("no peer answered within 10 s", file=sys.stderr)
        await mesh.stop()
        return 1
    if args.command == "serve":
        mesh.on_channel("echo", lambda peer_id, payload: b"echo: " + payload)
        print("serving the echo channel; Ctrl-C to stop")
        await reactor_forever(reactor)
    else:
        await mesh.wait_for_peers(2, timeout=5)
        connection = await mesh.connect(args.peer)
        print(f"path to {args.peer}: {connection.kind} {connection.endpoint},"
              f" rtt {connection.rtt * 1000:.1f} ms")
        reply = await mesh.request(args.peer, "echo", args.message.encode(), timeout=5)
        print(reply.decode())
    await mesh.stop()
    return 0


def reactor_forever(reactor):
    from twisted.internet.defer import Deferred

    d = Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", d.callback, None)
    return d


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--invite", required=True)
    parser.add_argument("--name", default="")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    ask = sub.add_parser("ask")
    ask.add_argument("peer")
    ask.add_argument("message")
    arguments = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
