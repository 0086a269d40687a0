"""
C{omerta vm ...}: VMs from providers, asked for by peer id.

    omerta vm request (--peer PEER | --find | --provider HOST:PORT)
                      [--cpu N] [--memory MB] [--disk GB] [--image NAME] [--name LABEL]
    omerta vm list [--refresh]
    omerta vm show VM_ID
    omerta vm release (VM_ID | --all)

C{request} joins the mesh as the short-lived node of C{omerta mesh} (same
options: C{--invite}/C{--network}, C{--bootstrap}, C{--timeout}), finds the
provider (by id, id prefix or name; with C{--find} the best-ranked provider
with room for the request; with C{--provider HOST:PORT}, whoever answers at
that address, no discovery), connects to it (directly, hole-punched or
through a relay) and asks for the VM on the C{vm} channel
(L{omerta.wire.vm}) with this consumer's WireGuard key for that provider
and an SSH public key for the guest (C{--ssh-key}, else
C{~/.ssh/id_ed25519}, else one made for the VM).  Through a running node
(C{omerta up}) the node brings the VM's tunnel up (docs/tunnel.md) and the
command returns once the guest answers SSH through it; C{omerta vm ssh}
then logs in.  What is held is kept in C{<data-dir>/consumer.json}
(L{omerta.roles.consumer}), so C{list}, C{show} and C{release} work after a
restart.

Every outcome feeds the provider's reputation in that file; C{--find} ranks
providers with it.

The work is the consumer client's (L{omerta.roles.consumer_client}); this
module is its front end: arguments, the progress line and the text printed.
The documents and the error messages that say what to try are built by
L{omerta.app.documents}, shared with the control API of a running node.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from omerta.addressing import AddressError, BootstrapSpec, parse_endpoint
from omerta.app.cli import CommandError, Invocation
from omerta.app.cli_mesh import MeshView, mesh_options, peer_label, run_on_mesh
from omerta.app.documents import (error_text, held_vm,  # noqa: F401
                                  network_of, vm_list_document, vm_refresh,
                                  vm_release_document, vm_request_document, vm_show_document)
from omerta.app.formats import format_vm_list
from omerta.app.via_node import ask, network_field, running_node
from omerta.roles import sshkeys
from omerta.roles.consumer import HeldVM
from omerta.roles.consumer_client import ConsumerClient, VmRequest
from omerta.roles.guest import DEFAULT_IMAGE
from omerta.safe_text import printable

REQUEST_TIMEOUT = ConsumerClient.DEFAULT_TIMEOUT


# -- arguments --------------------------------------------------------------


def _positive(minimum: int, maximum: int):
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not minimum <= int(text) <= maximum:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number from {minimum} to {maximum}")
        return int(text)

    return parse


def _label(what: str):
    def parse(text: str) -> str:
        if len(text.encode()) > 255:
            raise argparse.ArgumentTypeError(f"{what} is {len(text.encode())} bytes in UTF-8;"
                                             f" at most 255")
        return text

    return parse


def _endpoint_arg(text: str):
    try:
        endpoint = parse_endpoint(text)
    except AddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if endpoint.port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give the provider's port, HOST:PORT")
    return endpoint


def register(subparsers: Any) -> None:
    vm = subparsers.add_parser(
        "vm",
        help="VMs from providers: request, list, show, release",
        description="Ask providers of a network for VMs by peer id, and keep"
        " track of the VMs held (in <data-dir>/consumer.json).",
    )
    commands = vm.add_subparsers(dest="vm_command", metavar="COMMAND", required=True)
    common = mesh_options()

    request = commands.add_parser(
        "request",
        parents=[common],
        help="ask a provider for a VM",
        description="Join the mesh, find the provider, connect to it and ask for"
        " a VM; print what it granted (its id, address, the WireGuard keys and"
        " endpoint, the path used).",
    )
    which = request.add_mutually_exclusive_group(required=True)
    which.add_argument("--peer", metavar="PEER", help="the provider: peer id, id prefix or name")
    which.add_argument("--find", action="store_true",
                       help="pick the best-ranked provider (reputation, then round trip)"
                       " that announces room for the request")
    which.add_argument("--provider", metavar="HOST:PORT", type=_endpoint_arg,
                       help="legacy: the provider answering at this address, no discovery")
    request.add_argument("--cpu", type=_positive(1, 0xFFFF), default=1, metavar="N",
                         help="cpu cores (default 1)")
    request.add_argument("--memory", type=_positive(16, 0xFFFFFFFF), default=256, metavar="MB",
                         help="memory in MiB (default 256)")
    request.add_argument("--disk", type=_positive(0, 0xFFFFFFFF), default=1, metavar="GB",
                         help="disk in GiB (default 1)")
    request.add_argument("--image", type=_label("the image name"), default=DEFAULT_IMAGE,
                         metavar="NAME", help=f"guest image (default {DEFAULT_IMAGE})")
    request.add_argument("--name", type=_label("the label"), default="", metavar="LABEL",
                         help="a label for the VM")
    request.add_argument("--ssh-key", metavar="PATH", default=None,
                         help="the SSH key to log into the guest with (private key or its"
                         " .pub; default ~/.ssh/id_ed25519, else one is made for the VM)")
    request.set_defaults(func=request_command, discover_nat=True, timeout=REQUEST_TIMEOUT)

    ssh = commands.add_parser(
        "ssh",
        help="log into a VM held (ssh through its tunnel)",
        description="Run ssh to the VM's guest as user omerta, with the key it"
        " was requested with and its reported host key; arguments after -- are"
        " the command to run there.",
    )
    ssh.add_argument("vm", metavar="VM_ID", help="a held VM's id or unique id prefix")
    ssh.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD",
                     help="a command to run in the guest")
    ssh.set_defaults(func=ssh_command)

    listing = commands.add_parser(
        "list",
        parents=[common],
        help="the VMs held",
        description="The VMs this data directory holds, as last known; with"
        " --refresh, ask their providers for their state first.",
    )
    listing.add_argument("--refresh", action="store_true",
                         help="ask the providers (joins the mesh)")
    listing.set_defaults(func=list_command)

    show = commands.add_parser(
        "show",
        parents=[common],
        help="one VM, as its provider sees it now",
        description="Ask the VM's provider for its state and print everything"
        " known about it.",
    )
    show.add_argument("vm", metavar="VM_ID", help="VM id or unique prefix")
    show.set_defaults(func=show_command)

    release = commands.add_parser(
        "release",
        parents=[common],
        help="give VMs back",
        description="Ask the providers to destroy VMs and forget them here.",
    )
    what = release.add_mutually_exclusive_group(required=True)
    what.add_argument("vm", metavar="VM_ID", nargs="?", help="VM id or unique prefix")
    what.add_argument("--all", action="store_true", help="every VM held (in one network)")
    release.set_defaults(func=release_command)


# -- request --------------------------------------------------------------------


def request_command(invocation: Invocation) -> int:
    args = invocation.args
    ConsumerClient(None, invocation.data_dir).held()  # a damaged state file stops us first
    try:
        identity = sshkeys.choose_identity(args.ssh_key, invocation.data_dir) \
            if args.ssh_key is not None or _default_key_exists() else None
    except sshkeys.SshKeyError as e:
        raise CommandError(str(e)) from None
    key = {} if identity is None else {"ssh_key": identity.public_line,
                                       "ssh_identity": str(identity.private_path)}
    node = running_node(invocation)
    if node is not None:
        which = ({"peer": args.peer} if args.peer is not None else
                 {"find": True} if args.find else {"provider": str(args.provider)})
        document = ask(node, "POST", "/v1/vms", body={
            **which, "cpu": args.cpu, "memory": args.memory, "disk": args.disk,
            "image": args.image, "name": args.name, "timeout": args.timeout,
            **key, **network_field(args)})
        invocation.emit(format_vm(document), document)
        return 0
    if args.provider is not None:
        args.bootstrap = [*args.bootstrap, BootstrapSpec(args.provider)]
    spec = VmRequest(vcpus=args.cpu, memory_mb=args.memory, disk_gb=args.disk,
                     image=args.image, name=args.name, **key)

    async def body(view: MeshView) -> dict:
        def asking(record, connection):
            return _Progress(view, f"asking {peer_label(record)} for a VM"
                                   f" over a {connection.kind} path").done

        return await vm_request_document(view, _client(invocation, view), spec, peer=args.peer,
                                         provider=args.provider, on_asking=asking)

    document = run_on_mesh(invocation, body)
    invocation.emit(format_vm(document), document)
    return 0


def _default_key_exists() -> bool:
    from pathlib import Path

    return (Path.home() / ".ssh" / "id_ed25519.pub").exists()


def ssh_command(invocation: Invocation) -> int:
    """C{omerta vm ssh VM_ID [-- CMD]}: exec ssh into the guest."""
    import os

    args = invocation.args
    held = _find_held(invocation, args.vm)
    if not held.address:
        raise CommandError(f"VM {held.vm_id} has no guest address (the provider's test driver"
                           f" runs no guest); there is nothing to log into")
    if not held.tunnel_address:
        raise CommandError(f"VM {held.vm_id}'s provider carries no tunnels; its guest cannot"
                           f" be reached")
    node = running_node(invocation)
    if node is None:
        raise CommandError("the VM's tunnel lives in the running node: start it with"
                           " 'omerta up' (as root: tunnels need CAP_NET_ADMIN), then try again")
    listed = {v["vm_id"]: v for v in ask(node, "GET", "/v1/vms")["vms"]}
    tunnel = listed.get(held.vm_id, {}).get("tunnel") or {}
    if "interface" not in tunnel:
        raise CommandError(f"VM {held.vm_id} has no tunnel on the running node:"
                           f" {tunnel.get('state', 'unknown')}")
    if not held.host_key:
        raise CommandError(f"the guest of VM {held.vm_id} has not reported its SSH host key"
                           f" yet; 'omerta vm show {held.vm_id}' asks the provider again")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    argv = sshkeys.ssh_argv(invocation.data_dir, held.address, held.ssh_key) + command
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def _client(invocation: Invocation, view: MeshView) -> ConsumerClient:
    return ConsumerClient(view.mesh, invocation.data_dir, now=invocation.now)


class _Progress:
    """
    A line on stderr while a reply is awaited: rewritten each second on a
    terminal, otherwise printed once.
    """

    def __init__(self, view: MeshView, what: str):
        self.view = view
        self.what = what
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.started = view.clock.seconds()
        self.call = None
        if self.tty:
            self._tick()
        else:
            self.stream.write(f"omerta: {what}...\n")
            self.stream.flush()

    def _tick(self) -> None:
        waited = self.view.clock.seconds() - self.started
        self.stream.write(f"\romerta: {self.what}... {waited:.0f} s")
        self.stream.flush()
        self.call = self.view.clock.callLater(1.0, self._tick)

    def done(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


# -- list, show, release ---------------------------------------------------------


def list_command(invocation: Invocation) -> int:
    args = invocation.args
    held = ConsumerClient(None, invocation.data_dir).held()
    node = running_node(invocation) if args.refresh and held else None
    if node is not None:
        document = ask(node, "GET", "/v1/vms", query={
            "refresh": "1", "timeout": args.timeout, **network_field(args)})
        invocation.emit(format_list(document), document)
        return 0
    if args.refresh and held:
        _use_network_of(args, held)

        async def body(view: MeshView) -> None:
            await vm_refresh(view, _client(invocation, view))

        run_on_mesh(invocation, body)
    document = vm_list_document(ConsumerClient(None, invocation.data_dir))
    invocation.emit(format_list(document), document)
    return 0


def show_command(invocation: Invocation) -> int:
    args = invocation.args
    held = _find_held(invocation, args.vm)
    node = running_node(invocation)
    if node is not None:
        document = ask(node, "GET", f"/v1/vms/{held.vm_id}",
                       query={"timeout": args.timeout, **network_field(args)})
        invocation.emit(format_vm(document), document)
        return 0
    _use_network_of(args, [held])

    async def body(view: MeshView) -> dict:
        return await vm_show_document(view, _client(invocation, view), held)

    document = run_on_mesh(invocation, body)
    invocation.emit(format_vm(document), document)
    return 0


def release_command(invocation: Invocation) -> int:
    args = invocation.args
    if args.all:
        targets = ConsumerClient(None, invocation.data_dir).held()
        if not targets:
            document = {"released": [], "failed": [], "elsewhere": []}
            invocation.emit("no VMs held", document)
            return 0
    else:
        targets = [_find_held(invocation, args.vm)]
    node = running_node(invocation)
    if node is not None:
        path = "/v1/vms" if args.all else f"/v1/vms/{targets[0].vm_id}"
        document = ask(node, "DELETE", path)
    else:
        _use_network_of(args, targets)

        async def body(view: MeshView) -> dict:
            return await vm_release_document(view, _client(invocation, view), targets)

        document = run_on_mesh(invocation, body)
    invocation.emit(format_release(document), document)
    if document["failed"]:
        invocation.stdout.flush()
        raise CommandError(f"{len(document['failed'])} VM(s) not released; they stay listed")
    return 0


def _find_held(invocation: Invocation, ref: str) -> HeldVM:
    return held_vm(ConsumerClient(None, invocation.data_dir), ref)


def _use_network_of(args, vms) -> None:
    """Join the network the VMs were requested in, unless one was named."""
    if args.invite is None and args.network is None:
        network = network_of(vms)
        if network is not None:
            args.network = network


# -- documents and text -----------------------------------------------------------


def format_vm(document: dict) -> str:
    """The text of a VM document; its strings are the provider's, so each is L{printable}."""
    who = printable(document["provider_name"] or document["provider"])
    address = (printable(document["address"]) if document["address"]
               else "none (the provider's test driver runs no guest)")
    lines = [
        f"VM {printable(document['vm_id'])} from {who}: {printable(document['state'])}",
        f"  {document['vcpus']} cpu, {document['memory_mb']} MiB, {document['disk_gb']} GiB"
        f" disk, image {printable(document['image'])}"
        + (f", name {printable(document['name'])}" if document["name"] else ""),
        f"  address     {address}",
    ]
    path = document.get("path")
    if path:
        rtt = "-" if path["rtt_ms"] is None else f"{path['rtt_ms']:.3f} ms"
        lines.append(f"  path        {printable(path['kind'])} {printable(path['endpoint'])}"
                     f" from port {path['local_port']}, rtt {rtt}")
    lines.append(f"  tunnel      {format_tunnel(document['tunnel'])}")
    if document.get("ssh_command"):
        lines.append(f"  ssh         {printable(document['ssh_command'])}")
    return "\n".join(lines)


def format_tunnel(tunnel: dict) -> str:
    if "interface" not in tunnel:
        return printable(tunnel["state"])
    path = f", {tunnel['path_kind']} path" if tunnel.get("path_kind") else ""
    return printable(f"{tunnel['state']} on {tunnel['interface']} {tunnel['address']}"
                     f" (provider {tunnel['provider_address']}{path})")


format_list = format_vm_list


def format_release(document: dict) -> str:
    lines = [f"released {vm}" for vm in document["released"]]
    lines += [f"not released {f['vm_id']}: {f['error']}" for f in document["failed"]]
    if document["elsewhere"]:
        lines.append(f"{len(document['elsewhere'])} VM(s) held in other networks stay:"
                     f" run again with --network for them")
    return "\n".join(lines) or "nothing released"
