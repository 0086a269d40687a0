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
(L{omerta.wire.vm}).  It makes a WireGuard key pair for the VM and keeps it,
with everything else about the VM, in C{<data-dir>/consumer.json}
(L{omerta.roles.consumer}), so C{list}, C{show} and C{release} work after a
restart.  The tunnel itself is not built yet, and the output says so.

Every outcome feeds the provider's reputation in that file; C{--find} ranks
providers with it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from omerta.addressing import AddressError, BootstrapSpec, parse_endpoint
from omerta.app.cli import CommandError, Invocation
from omerta.app.cli_mesh import (MeshView, connect_peer, find_peer, mesh_options,
                                 peer_label, run_on_mesh)
from omerta.crypto.wireguard import WireGuardKey, encode_key
from omerta.mesh.messaging import MessagingError
from omerta.mesh.registry import PeerRecord, Requirements
from omerta.roles.consumer import ConsumerStore, HeldVM
from omerta.roles.guest import DEFAULT_IMAGE
from omerta.wire import ParseError
from omerta.wire.messages import Capability
from omerta.wire.vm import CHANNEL, VmOp, VmStatus, build_request, parse_reply, vm_id_bytes

REQUEST_TIMEOUT = 60.0
NO_TUNNEL = ("not set up: carrying WireGuard over the mesh comes in a later release;"
             " the keys are exchanged and kept for it")
# Outcomes that say something about the provider (the others are ours).
_PROVIDER_FAILURES = (VmStatus.NO_CAPACITY, VmStatus.FAILED, VmStatus.UNAVAILABLE)


# -- arguments --------------------------------------------------------------


def _positive(minimum: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return int(text)

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
    request.add_argument("--cpu", type=_positive(1), default=1, metavar="N",
                         help="cpu cores (default 1)")
    request.add_argument("--memory", type=_positive(16), default=256, metavar="MB",
                         help="memory in MiB (default 256)")
    request.add_argument("--disk", type=_positive(0), default=1, metavar="GB",
                         help="disk in GiB (default 1)")
    request.add_argument("--image", default=DEFAULT_IMAGE, metavar="NAME",
                         help=f"guest image (default {DEFAULT_IMAGE})")
    request.add_argument("--name", default="", metavar="LABEL", help="a label for the VM")
    request.set_defaults(func=request_command, discover_nat=True, timeout=REQUEST_TIMEOUT)

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
    store = ConsumerStore(invocation.data_dir)
    known = store.load()  # a damaged state file stops us before anything is asked
    if args.provider is not None:
        args.bootstrap = [*args.bootstrap, BootstrapSpec(args.provider)]
    key = WireGuardKey.generate()

    async def body(view: MeshView) -> dict:
        record = await _pick_provider(view, args, known)
        connection = await connect_peer(view, record)
        payload = build_request(VmOp.CREATE, vcpus=args.cpu, memory_mb=args.memory,
                                disk_gb=args.disk, image=args.image, name=args.name,
                                wg_public_key=key.public)
        started = view.clock.seconds()
        progress = _Progress(view, f"asking {peer_label(record)} for a VM"
                                   f" over a {connection.kind} path")
        try:
            reply = await _ask(view, record, payload)
        except CommandError:
            _remember_outcome(view, store, record, False, None, invocation.now())
            raise
        finally:
            progress.done()
        latency = view.clock.seconds() - started
        try:
            status = VmStatus(reply.status)
        except ValueError:
            status = None
        if status == VmStatus.OK and reply.vms:
            _remember_outcome(view, store, record, True, latency, invocation.now())
        elif status in _PROVIDER_FAILURES:
            _remember_outcome(view, store, record, False, latency, invocation.now())
        if status != VmStatus.OK or not reply.vms:
            raise CommandError(_refusal(record, reply))
        granted = reply.vms[0]
        held = HeldVM(
            vm_id=granted.vm_id.hex(), provider=record.peer_id_text,
            provider_name=record.name, network=view.plan.network.network_id,
            created_at=granted.created_ms / 1000, vcpus=granted.vcpus,
            memory_mb=granted.memory_mb, disk_gb=granted.disk_gb,
            image=granted.image or args.image, name=granted.name, state=granted.state,
            address=granted.address or None, wg_private_key=key.private_text,
            wg_public_key=key.public_text, provider_wg_key=encode_key(granted.wg_public_key),
            provider_endpoint=granted.wg_endpoint, path_kind=granted.path_kind)
        with store.update() as state:
            state.vms[held.vm_id] = held
        path = view.mesh.connection(record.peer_id) or connection
        return _vm_document(held, path=path.as_dict(), waited_s=round(view.elapsed(), 3))

    document = run_on_mesh(invocation, body)
    invocation.emit(format_vm(document), document)
    return 0


async def _pick_provider(view: MeshView, args, known) -> PeerRecord:
    if args.peer is not None:
        record = await find_peer(view, args.peer)
    elif args.provider is not None:
        record = await _answering_at(view, args.provider)
    else:
        record = await _best_provider(view, args, known)
    if not record.capabilities & Capability.PROVIDER:
        raise CommandError(f"{peer_label(record)} is not a provider (it does not announce"
                           f" the provider capability); 'omerta mesh peers' shows who is")
    return record


async def _answering_at(view: MeshView, endpoint) -> PeerRecord:
    await view.joined()
    boot = next(b for b in view.mesh.node.bootstraps
                if b.spec.peer_id is None and b.spec.name is None and b.spec.endpoint == endpoint)
    if not await view.until(lambda: boot.answered_by is not None
                            and view.registry.get(boot.answered_by) is not None):
        raise CommandError(f"nothing answered at {endpoint} within {view.timeout:g} s:"
                           f" is a provider of network {view.plan.network.name} running there?")
    return view.registry.get(boot.answered_by)


async def _best_provider(view: MeshView, args, known) -> PeerRecord:
    await view.joined()
    await view.settled()
    registry = view.registry
    for provider, score in known.providers.items():
        registry.restore_reputation(bytes.fromhex(provider), score.reputation)
    found = view.mesh.find_peers(Requirements(
        cpu_cores=args.cpu, memory_mb=args.memory, disk_gb=args.disk,
        capabilities=Capability.PROVIDER))
    if found:
        return found[0]
    providers = [r for r in registry.all() if r.capabilities & Capability.PROVIDER]
    offers = "; ".join(
        f"{peer_label(r)}: {r.resources.cpu_cores} cores, {r.resources.memory_mb} MiB,"
        f" {r.resources.disk_gb} GiB free ({r.state})" for r in providers) or "none known"
    raise CommandError(f"no online provider announces room for {args.cpu} cores,"
                       f" {args.memory} MiB and {args.disk} GiB (providers: {offers})")


async def _ask(view: MeshView, record: PeerRecord, payload: bytes):
    try:
        answer = await view.mesh.request(record.peer_id, CHANNEL, payload,
                                         timeout=max(1.0, view.remaining()))
    except MessagingError as e:
        raise CommandError(f"{peer_label(record)}: {e}; try a longer --timeout") from None
    try:
        return parse_reply(answer)
    except ParseError as e:
        raise CommandError(f"{peer_label(record)} answered something that is not a VM reply"
                           f" ({e}); is it running an older omerta?") from None


def _refusal(record: PeerRecord, reply) -> str:
    try:
        status = VmStatus(reply.status).name.lower().replace("_", " ")
    except ValueError:
        status = f"status {reply.status}"
    return f"{peer_label(record)} refused: {status}: {reply.detail or 'no detail given'}"


def _remember_outcome(view: MeshView, store: ConsumerStore, record: PeerRecord,
                      success: bool, latency: float | None, now: float) -> None:
    reputation = view.registry.record_outcome(record.peer_id, success, latency)
    with store.update() as state:
        state.record_outcome(record.peer_id_text, success, latency, now, reputation)


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
    store = ConsumerStore(invocation.data_dir)
    held = store.load().vms.values()
    if args.refresh and held:
        _use_network_of(args, held)

        async def body(view: MeshView) -> None:
            await view.joined()
            state = store.load()
            for provider in sorted({v.provider for v in state.vms.values()
                                    if v.network == view.plan.network.network_id}):
                await _refresh(view, store, provider)

        run_on_mesh(invocation, body)
    vms = sorted(store.load().vms.values(), key=lambda v: (v.created_at, v.vm_id))
    document = {"vms": [_vm_document(v) for v in vms]}
    invocation.emit(format_list(document), document)
    return 0


async def _refresh(view: MeshView, store: ConsumerStore, provider: str) -> None:
    """Ask one provider for the caller's VMs; update their states."""
    try:
        record = await find_peer(view, provider)
        await connect_peer(view, record)
        reply = await _ask(view, record, build_request(VmOp.LIST))
    except CommandError as e:
        reply, problem = None, str(e)
    else:
        problem = None if reply.status == VmStatus.OK else _refusal(record, reply)
    live = {} if reply is None or problem else {v.vm_id.hex(): v for v in reply.vms}
    with store.update() as state:
        for held in state.vms.values():
            if held.provider != provider:
                continue
            if problem is not None:
                held.state = "unknown"
            elif held.vm_id in live:
                held.state = live[held.vm_id].state
                held.address = live[held.vm_id].address or None
            else:
                held.state = "gone"


def show_command(invocation: Invocation) -> int:
    args = invocation.args
    store = ConsumerStore(invocation.data_dir)
    held = _find_held(store, args.vm)
    _use_network_of(args, [held])

    async def body(view: MeshView) -> dict:
        record = await find_peer(view, held.provider)
        connection = await connect_peer(view, record)
        reply = await _ask(view, record, build_request(VmOp.STATUS,
                                                       vm_id=vm_id_bytes(held.vm_id)))
        if reply.status == VmStatus.UNKNOWN_VM:
            state_now, address = "gone", None
        elif reply.status != VmStatus.OK or not reply.vms:
            raise CommandError(_refusal(record, reply))
        else:
            state_now, address = reply.vms[0].state, reply.vms[0].address or None
        with store.update() as state:
            current = state.vms.get(held.vm_id)
            if current is not None:
                current.state, current.address = state_now, address
                return _vm_document(current, path=connection.as_dict())
        return _vm_document(held, path=connection.as_dict())

    document = run_on_mesh(invocation, body)
    invocation.emit(format_vm(document), document)
    return 0


def release_command(invocation: Invocation) -> int:
    args = invocation.args
    store = ConsumerStore(invocation.data_dir)
    if args.all:
        targets = list(store.load().vms.values())
        if not targets:
            document = {"released": [], "failed": [], "elsewhere": []}
            invocation.emit("no VMs held", document)
            return 0
    else:
        targets = [_find_held(store, args.vm)]
    _use_network_of(args, targets)

    async def body(view: MeshView) -> dict:
        network = view.plan.network.network_id
        here = [v for v in targets if v.network == network]
        released, failed = [], []
        for held in here:
            try:
                record = await find_peer(view, held.provider)
                await connect_peer(view, record)
                reply = await _ask(view, record, build_request(
                    VmOp.RELEASE, vm_id=vm_id_bytes(held.vm_id)))
            except CommandError as e:
                failed.append({"vm_id": held.vm_id, "error": str(e)})
                continue
            if reply.status in (VmStatus.OK, VmStatus.UNKNOWN_VM):
                with store.update() as state:
                    state.vms.pop(held.vm_id, None)
                released.append(held.vm_id)
            else:
                failed.append({"vm_id": held.vm_id, "error": _refusal(record, reply)})
        elsewhere = sorted(v.vm_id for v in targets if v.network != network)
        return {"released": released, "failed": failed, "elsewhere": elsewhere}

    document = run_on_mesh(invocation, body)
    invocation.emit(format_release(document), document)
    if document["failed"]:
        invocation.stdout.flush()
        raise CommandError(f"{len(document['failed'])} VM(s) not released; they stay listed")
    return 0


def _find_held(store: ConsumerStore, ref: str) -> HeldVM:
    try:
        return store.load().find(ref)
    except LookupError as e:
        raise CommandError(str(e)) from None


def _use_network_of(args, vms) -> None:
    """Join the network the VMs were requested in, unless one was named."""
    if args.invite is None and args.network is None:
        networks = sorted({v.network for v in vms})
        if networks:
            args.network = networks[0]


# -- documents and text -----------------------------------------------------------


def _vm_document(held: HeldVM, **extra) -> dict:
    document = held.public()
    document["ssh_address"] = held.address
    document["wireguard"] = {
        "public_key": held.wg_public_key,
        "provider_public_key": held.provider_wg_key,
        "provider_endpoint": held.provider_endpoint,
        "tunnel": NO_TUNNEL,
    }
    document.update(extra)
    return document


def format_vm(document: dict) -> str:
    who = document["provider_name"] or document["provider"]
    address = document["address"] or "none (the provider's test driver runs no guest)"
    lines = [
        f"VM {document['vm_id']} from {who}: {document['state']}",
        f"  {document['vcpus']} cpu, {document['memory_mb']} MiB, {document['disk_gb']} GiB"
        f" disk, image {document['image']}" + (f", name {document['name']}"
                                                if document["name"] else ""),
        f"  address     {address}",
    ]
    path = document.get("path")
    if path:
        rtt = "-" if path["rtt_ms"] is None else f"{path['rtt_ms']:.3f} ms"
        lines.append(f"  path        {path['kind']} {path['endpoint']} from port"
                     f" {path['local_port']}, rtt {rtt}")
    wireguard = document["wireguard"]
    lines += [
        f"  wireguard   provider {wireguard['provider_public_key']}"
        f" at {wireguard['provider_endpoint']} ({document['path_kind']} path as it sees us)",
        f"              yours {wireguard['public_key']} (private key in consumer.json)",
        f"  tunnel      {wireguard['tunnel']}",
    ]
    return "\n".join(lines)


def format_list(document: dict) -> str:
    vms = document["vms"]
    if not vms:
        return "no VMs held"
    rows = [("VM", "PROVIDER", "STATE", "CPU", "MEMORY", "DISK", "ADDRESS")]
    for v in vms:
        rows.append((v["vm_id"], v["provider_name"] or v["provider"][:16], v["state"],
                     str(v["vcpus"]), f"{v['memory_mb']} MiB", f"{v['disk_gb']} GiB",
                     v["address"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_release(document: dict) -> str:
    lines = [f"released {vm}" for vm in document["released"]]
    lines += [f"not released {f['vm_id']}: {f['error']}" for f in document["failed"]]
    if document["elsewhere"]:
        lines.append(f"{len(document['elsewhere'])} VM(s) held in other networks stay:"
                     f" run again with --network for them")
    return "\n".join(lines) or "nothing released"
