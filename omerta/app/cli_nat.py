"""
C{omerta nat check}: discover this machine's NAT behaviour with STUN.

It binds its own UDP socket (on the address the system would use to reach the
first server, so "no NAT" can be recognised), runs the RFC 5780 tests against
the servers given, and prints the mapped address, mapping and filtering
behaviour, classic type, hairpin support, the mapping lifetime when asked
(C{--lifetime SECONDS} of budget), and the time taken.
"""

from __future__ import annotations

import socket
from typing import Any

from omerta.addressing import parse_endpoint
from omerta.app.cli import CommandError, Invocation, run_reactor
from omerta.stun.client import StunClient
from omerta.stun.discovery import Discovery, NatReport
from omerta.stun.endpoint import StunEndpoint, StunSocketProtocol
from omerta.metrics import Metrics


def register(subparsers: Any) -> None:
    nat = subparsers.add_parser("nat", help="NAT behaviour discovery")
    commands = nat.add_subparsers(dest="nat_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="classify the NAT in front of this machine",
        description="Run RFC 5780 NAT behaviour discovery against STUN servers."
        " A server with an alternate address (OTHER-ADDRESS) gives mapping and"
        " filtering; single-address servers give the mapping by comparing two.",
    )
    check.add_argument("--stun", action="append", required=True, metavar="HOST:PORT",
                       help="STUN server (repeatable)")
    check.add_argument("--lifetime", type=float, default=0.0, metavar="SECONDS",
                       help="also measure the mapping lifetime within this time budget")
    check.add_argument("--no-hairpin", action="store_true", help="skip the hairpin test")
    check.add_argument("--port", type=int, default=0, help="local UDP port (default: any)")
    check.set_defaults(func=check_command)


def _resolve(text: str) -> tuple[str, int]:
    endpoint = parse_endpoint(text)
    try:
        info = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise CommandError(f"--stun {text}: cannot resolve {endpoint.host}: {e.strerror}") from None
    family, _, _, _, address = info[0]
    return (address[0], address[1])


def _source_address(server: tuple[str, int]) -> str:
    """
    The local IP the system routes to C{server} from (no packet is sent).
    """
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(server)
        except OSError as e:
            raise CommandError(f"no route to STUN server {server[0]}: {e.strerror}") from None
        return probe.getsockname()[0]


def check_command(invocation: Invocation) -> int:
    args = invocation.args
    servers = [_resolve(text) for text in args.stun]
    interface = _source_address(servers[0])
    report: NatReport = run_reactor(
        lambda reactor: _check(reactor, servers, interface, args.port, args)
    )
    invocation.emit(format_report(report), report.as_dict())
    return 0


async def _check(reactor, servers, interface, port_number, args) -> NatReport:
    metrics = Metrics()
    protocol = StunSocketProtocol(StunEndpoint((interface, 0), metrics))
    port = reactor.listenUDP(port_number, protocol, interface=interface)
    local = (interface, port.getHost().port)
    client = StunClient(port.write, reactor, metrics)
    protocol.endpoint = StunEndpoint(local, metrics, client)
    probes = []

    def open_probe_socket(main: StunClient):
        probe = StunSocketProtocol(StunEndpoint((interface, 0), metrics))
        probe_port = reactor.listenUDP(0, probe, interface=interface)
        sibling = main.sibling(probe_port.write)
        probe.endpoint = StunEndpoint((interface, probe_port.getHost().port), metrics, sibling)
        probes.append(probe_port)
        return sibling, probe_port.stopListening

    try:
        discovery = Discovery(client, reactor, local=local, open_probe_socket=open_probe_socket)
        return await discovery.run(servers, hairpin=not args.no_hairpin,
                                   lifetime_budget=args.lifetime)
    finally:
        client.stop()
        await port.stopListening()


def format_report(report: NatReport) -> str:
    document = report.as_dict()
    yes_no = {True: "yes", False: "no", None: "not tested"}
    lines = [
        f"mapped address   {document['mapped'] or '-'}",
        f"local address    {document['local'] or '-'}",
        f"mapping          {report.mapping.value}",
        f"filtering        {report.filtering.value}",
        f"NAT type         {report.classic}",
        f"hairpin          {yes_no[report.hairpin]}",
    ]
    if report.lifetime is not None:
        life = report.lifetime
        upper = f"< {life.dead:.1f} s" if life.dead is not None else "not seen to expire"
        lines.append(f"lifetime         >= {life.alive:.1f} s, {upper} ({life.probes} probes)")
    kind = "RFC 5780" if report.rfc5780 else "single address"
    lines.append(f"servers          {', '.join(document['servers'])} ({kind})")
    lines.append(f"time taken       {report.duration:.2f} s")
    lines.extend(f"note             {note}" for note in report.notes)
    return "\n".join(lines)
