"""
The processes of the tunnel benchmark (scripts/bench/tunnel.py), one per
WireGuard interface, each started inside a NAT lab namespace
(C{ip netns exec NS python -m omerta.testing.tunnelbench ...}).

    tunnelbench node --role consumer|provider --data-dir D --invite LINK
        --bootstrap relay@ADDR:PORT --interface ADDR --port P --device NAME
        --address 100.64.50.2/24
        A real mesh node (L{omerta.mesh.network.MeshNetwork}, no NAT
        discovery, so it keeps relay reservations like a node behind a NAT)
        and a wireguard-go interface whose only peer is reached through the
        node's tunnel plane, as the product does it.
    tunnelbench plain --device NAME --address 100.64.51.2/24
        A wireguard-go interface alone: its peer's endpoint is the other
        namespace's lab address (the reference, no mesh).

Commands arrive on stdin and answers leave on stdout, one JSON object per
line:

    -> {"ready": {"public_key": HEX, "wg_port": N, "peer_id": HEX}}   (once up)
    <- {"op": "peer", "public_key": HEX, "allowed": "100.64.50.1/32",
        "peer_id": HEX (node), "endpoint": "ip:port" (plain)}
    -> {"tunnel": {"endpoint": "127.0.0.1:N", "path": {...} or null}}
       (a consumer node first connects to the peer over the mesh; the path
       is what MeshNetwork.connect returned)
    <- {"op": "status"}
    -> {"status": {"path": {...}, "endpoint": {...}, "drops": {...},
        "cpu_s": this process's CPU seconds, "wg_cpu_s": wireguard-go's, ...}}
    <- {"op": "profile", "action": "start"} / {"op": "profile", "action":
        "stop", "path": FILE}     cProfile of the reactor thread
    -> {"profile": "started"} / {"profile": FILE}

End of stdin (or SIGTERM) takes the interface down and ends the process.
Errors are answered as C{{"error": "..."}}.  The node logs to
C{DATA_DIR/node.log}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from omerta.tunnel.wgdevice import WireGuardDevice

MTU = 1360
"""The MTU the product gives both ends (L{omerta.tunnel.provider_side.MTU})."""


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def cpu_seconds(pid: int | None = None) -> float | None:
    """
    User plus system CPU time of process C{pid} (all its threads; default
    this one), from /proc.
    """
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def device_up(args) -> WireGuardDevice:
    """
    The interface, up, with a fresh key (called on the main thread, which
    lives as long as the process: wireguard-go dies with that thread).
    """
    state = Path(args.state_dir) if args.state_dir else None
    device = WireGuardDevice(args.device, os.urandom(32), mtu=MTU, state_dir=state)
    device.up([args.address])
    return device


# -- the reference: wireguard-go alone -------------------------------------------


def run_plain(args) -> int:
    device = device_up(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        emit({"ready": {"public_key": device.public_key.hex(), "wg_port": device.listen_port}})
        for line in sys.stdin:
            try:
                command = json.loads(line)
                if command.get("op") == "peer":
                    device.set_peer(bytes.fromhex(command["public_key"]),
                                    endpoint(command["endpoint"]), [command["allowed"]],
                                    keepalive=command.get("keepalive"))
                    emit({"tunnel": {"endpoint": command["endpoint"], "path": None}})
                elif command.get("op") == "status":
                    peers = device.peers()
                    emit({"status": {"peers": len(peers), "wg_cpu_s": cpu_seconds(device.pid)}})
                else:
                    emit({"error": f"unknown command {command!r}"})
            except Exception as e:  # the bench reads the message
                emit({"error": f"{type(e).__name__}: {e}"})
    finally:
        device.down()
    return 0


# -- a mesh node carrying the tunnel ----------------------------------------------


class NodeBench:
    """
    One mesh node and its interface, driven by the commands on stdin.
    """

    def __init__(self, args, device: WireGuardDevice, reactor):
        from omerta.wire.tunnel import TO_CONSUMER, TO_PROVIDER

        self.args = args
        self.device = device
        self.reactor = reactor
        # what this side's endpoint serves: the provider terminates its
        # consumer (TO_PROVIDER), the consumer reaches its provider (TO_CONSUMER)
        self.kind = TO_PROVIDER if args.role == "provider" else TO_CONSUMER
        self.mesh = None
        self.peer_id: bytes | None = None
        self.endpoint = None
        self.profiler = None

    async def start(self) -> None:
        from omerta.mesh.network import MeshNetwork

        self.mesh = MeshNetwork(Path(self.args.data_dir), invites=[self.args.invite],
                                name=self.args.name, port=self.args.port,
                                interface=self.args.interface, bootstrap=self._bootstrap(),
                                nat_interval=0, reactor=self.reactor)
        await self.mesh.start()
        emit({"ready": {"public_key": self.device.public_key.hex(),
                        "wg_port": self.device.listen_port,
                        "peer_id": self.mesh.node.peer_id.hex()}})

    def _bootstrap(self) -> list:
        from omerta.addressing import parse_bootstrap

        return [parse_bootstrap(spec) for spec in self.args.bootstrap]

    @property
    def network_id(self) -> bytes:
        return next(iter(self.mesh.node.overlays))

    def command(self, command: dict) -> None:
        from twisted.internet.defer import ensureDeferred

        op = command.get("op")
        if op == "peer":
            d = ensureDeferred(self._peer(command))
        elif op == "status":
            d = ensureDeferred(self._status())
        elif op == "profile":
            d = ensureDeferred(self._profile(command))
        else:
            emit({"error": f"unknown command {command!r}"})
            return
        d.addErrback(lambda f: emit({"error": f"{f.type.__name__}: {f.getErrorMessage()}"}))

    async def _peer(self, command: dict) -> None:
        self.peer_id = bytes.fromhex(command["peer_id"])
        self.endpoint = self.mesh.node.tunnels.open(self.network_id, self.peer_id, self.kind,
                                                    self.device.listen_port)
        consumer = self.args.role == "consumer"
        self.device.set_peer(bytes.fromhex(command["public_key"]), self.endpoint.address,
                             [command["allowed"]], keepalive=25 if consumer else None)
        path = None
        if consumer:
            # as a consumer's node does before it brings a tunnel up
            await self.mesh.find_peer(self.peer_id.hex(), timeout=30)
            connection = await self.mesh.connect(self.peer_id.hex(), timeout=30)
            path = connection.as_dict()
        emit({"tunnel": {"endpoint": "%s:%d" % self.endpoint.address, "path": path}})

    async def _status(self) -> None:
        connection = None
        if self.peer_id is not None and self.mesh.knows(self.peer_id.hex()):
            connection = self.mesh.connection(self.peer_id.hex())
        metrics = self.mesh.metrics
        relay = self.mesh.node.overlay().relays
        emit({"status": {
            "path": None if connection is None else connection.as_dict(),
            "endpoint": None if self.endpoint is None else self.endpoint.status(),
            "drops": metrics.by_label("drops", "reason"),
            "relay_reservations": sum(1 for h in relay.held.values() if h.live),
            "cpu_s": cpu_seconds(),
            "wg_cpu_s": cpu_seconds(self.device.pid),
        }})

    async def _profile(self, command: dict) -> None:
        import cProfile

        if command.get("action") == "start":
            self.profiler = cProfile.Profile()
            self.profiler.enable()
            emit({"profile": "started"})
            return
        profiler, self.profiler = self.profiler, None
        if profiler is None:
            emit({"error": "no profile running"})
            return
        profiler.disable()
        profiler.dump_stats(command["path"])
        emit({"profile": command["path"]})

    def stop(self):
        if self.mesh is None:
            return None
        return self.mesh.stop()


def run_node(args) -> int:
    from twisted.internet import reactor, stdio
    from twisted.internet.defer import ensureDeferred
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.protocols.basic import LineReceiver

    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(args.data_dir) / "node.log", "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log)], redirectStandardIO=False)
    device = device_up(args)
    bench = NodeBench(args, device, reactor)

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            try:
                command = json.loads(line)
            except ValueError:
                emit({"error": f"not JSON: {line[:80]!r}"})
                return
            bench.command(command)

        def connectionLost(self, reason=None) -> None:
            if reactor.running:
                reactor.stop()

    def started() -> None:
        def failed(failure):
            emit({"error": f"{failure.type.__name__}: {failure.getErrorMessage()}"})
            reactor.stop()

        ensureDeferred(bench.start()).addErrback(failed)
        stdio.StandardIO(Commands())

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", bench.stop)
    try:
        reactor.run()
    finally:
        device.down()
        log.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelbench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("node", "plain"):
        p = sub.add_parser(mode)
        p.add_argument("--device", required=True, help="interface name")
        p.add_argument("--address", required=True, help="tunnel address, e.g. 100.64.50.2/24")
        p.add_argument("--state-dir", help="wireguard-go pidfile and log")
        if mode == "node":
            p.add_argument("--role", choices=("consumer", "provider"), required=True)
            p.add_argument("--data-dir", required=True)
            p.add_argument("--invite", required=True)
            p.add_argument("--bootstrap", action="append", default=[])
            p.add_argument("--interface", required=True)
            p.add_argument("--port", type=int, required=True)
            p.add_argument("--name", default="")
    args = parser.parse_args(argv)
    return run_node(args) if args.mode == "node" else run_plain(args)


if __name__ == "__main__":
    sys.exit(main())
