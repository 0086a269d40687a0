"""
The documents the C{omerta} command prints with C{--output json}, built from
a L{MeshNetwork} (and a L{ConsumerClient}): one builder per question, shared
by the command (a short-lived node of its own) and the control API of a
running node (L{omerta.app.control}), so both answer the same question with
the same document.

    view = MeshView(mesh, scope, timeout=10)     # one deadline for the question
    document = await ping_document(view, "provider-1", count=4, interval=1.0,
                                   reply_timeout=2.0)

A builder that cannot answer raises a L{DocumentError} (a
L{omerta.app.cli.CommandError}, so the command prints it as C{omerta: error:
...}) carrying the text the command has always printed; its class says what
kind of failure it is, which the control API turns into an HTTP status:

    L{NotFoundError}     no such peer, provider, VM or network
    L{AmbiguousError}    a name or prefix that matches several
    L{NotJoinedError}    no bootstrap peer answered and no peer is online
    L{NoPathError}       no path to the peer, or no answer over it in time
    L{RefusedError}      the provider would not (or cannot) do it
    L{BadAnswerError}    the provider answered something unreadable

Text formatting stays with the command modules.  No document carries a
private key (VM tunnel keys, identity keys, network keys).
"""

from __future__ import annotations

import contextlib
import shlex
import statistics as stats
from typing import Any, Callable, Iterator

from twisted.internet.task import deferLater

from omerta.addressing import Endpoint
from omerta.app.cli import CommandError
from omerta.mesh.network import ConnectError, MeshNetwork, NotJoined, peer_label
from omerta.mesh.paths import Connection
from omerta.mesh.registry import AmbiguousPeer, PeerNotFound, PeerRecord
from omerta.networks import Membership
from omerta.tunnel.consumer_side import TunnelError
from omerta.roles import sshkeys
from omerta.roles.consumer import HeldVM
from omerta.roles.consumer_client import (BadReply, ConsumerClient, ConsumerError, NoAnswer,
                                          NoRoom, NotAProvider, NothingAnswered,
                                          ProviderNotFound, Refused, Unreachable, VmRequest)



# -- failures -------------------------------------------------------------------


class DocumentError(CommandError):
    """
    A question the node cannot answer; the message says why and what to try.
    """


class NotFoundError(DocumentError):
    """No such peer, provider, held VM or network."""


class AmbiguousError(DocumentError):
    """A name or id prefix that matches more than one."""


class NotJoinedError(DocumentError):
    """No bootstrap peer answered and no peer is online: the node is not in the mesh."""


class NoPathError(DocumentError):
    """No path to the peer, or nothing answered over it, in the time given."""


class RefusedError(DocumentError):
    """The peer is not a provider, none has room, or the provider refused."""


class BadAnswerError(DocumentError):
    """The provider answered something that is not a VM reply."""


# -- one question's view of the node --------------------------------------------


class MeshView:
    """
    The node seen by one question: one deadline for all of it, and error
    messages that say what to try.

    @param scope: anything with a C{network} attribute, the L{Membership}
        the question is about (its name and id go into messages); the
        command passes its plan, the control API the daemon's membership.
    """

    def __init__(self, mesh: MeshNetwork, scope: Any, timeout: float):
        self.mesh = mesh
        self.plan = scope
        self.timeout = timeout
        self.clock = mesh.clock
        self.started = self.clock.seconds()
        self.deadline = self.started + timeout

    def remaining(self) -> float:
        return max(0.0, self.deadline - self.clock.seconds())

    def elapsed(self) -> float:
        return self.clock.seconds() - self.started

    def answered(self) -> bool:
        """
        A bootstrap peer proved who it is, or some peer is heard directly.
        """
        return self.mesh.joined()

    def counts(self) -> tuple[int, int]:
        peers = self.mesh.known_peers()
        return len(peers), sum(1 for p in peers if p.state == "online")

    async def joined(self) -> None:
        """
        Wait until L{answered}.

        @raise NotJoinedError: not within the timeout.
        """
        if not await self.mesh.wait_joined(self.remaining()):
            raise NotJoinedError(self.no_answer())

    async def settled(self) -> None:
        """
        Wait until the peer counts stayed the same for a second, or the
        deadline passes.
        """
        await self.mesh.wait_settled(self.remaining())

    def no_answer(self) -> str:
        boots = self.mesh.bootstraps()
        where = ", ".join(str(b.spec.endpoint) for b in boots)
        if len(boots) == 1:
            question = f"is the relay at {where} running?"
        else:
            question = f"are the bootstrap peers at {where} running?"
        hints = []
        unresolved = [str(b.spec) for b in boots if b.address is None]
        if unresolved:
            hints.append(f"could not resolve {', '.join(unresolved)}")
        if self.mesh.metrics.by_label("drops", "reason").get("bootstrap_mismatch"):
            hints.append("a peer answered with another peer id than the one given")
        network = self.plan.network
        hints.append(
            f"check that UDP reaches it and that it is in network {network.name}"
            f" ({network.network_id}); give another with --bootstrap ID_OR_NAME@HOST:PORT"
            f" or wait longer with --timeout"
        )
        return f"no bootstrap peer answered within {self.timeout:g} s: {question} " + "; ".join(
            hints
        )

    def not_found(self, ref: str, at: float, known: int) -> str:
        return (
            f"no peer named or with an id starting {ref.strip()!r} in network"
            f" {self.plan.network.name} after {at - self.started:.1f} s"
            f" ({known} peer(s) known); 'omerta mesh peers' lists them"
        )


# -- node, networks, peers -------------------------------------------------------


def node_status_document(status: dict, *, alive: bool, age: float) -> dict:
    """
    What C{omerta node status --output json} prints: the node's status
    (L{omerta.mesh.service.NodeService.status} plus C{updated_at}), whether
    it is alive, and how old the status is (C{age} seconds, added to each
    peer's C{last_heard_ago_s}).  C{status} is changed in place.
    """
    status["alive"] = alive
    status["status_age_s"] = round(age, 3)
    for peer in status.get("peers", []):
        if peer.get("last_heard_ago_s") is not None:
            peer["last_heard_ago_s"] = round(peer["last_heard_ago_s"] + age, 3)
    return status


def networks_document(memberships: list[Membership]) -> dict:
    """
    What C{omerta network list --output json} prints: no keys, no invites.
    """
    return {
        "networks": [
            {
                "network_id": m.network_id,
                "name": m.name,
                "created_by_me": m.created_by_me,
                "bootstrap_count": len(m.bootstrap),
            }
            for m in memberships
        ]
    }


def peers_document(mesh: MeshNetwork, network=None) -> list[dict]:
    """
    What C{omerta mesh peers --output json} prints: every known peer's
    record, named ones first (by name), then by id.
    """
    now = mesh.clock.seconds()
    records = sorted(mesh.known_peers(network), key=lambda r: (r.name == "", r.name, r.peer_id))
    return [record.as_dict(now) for record in records]


# -- ping and connect --------------------------------------------------------------


async def find_peer(view: MeshView, ref: str) -> PeerRecord:
    """
    The peer C{ref} names, once the node knows it (or the view settled
    without it).
    """
    try:
        return await view.mesh.find_peer(ref, view.remaining())
    except NotJoined:
        raise NotJoinedError(view.no_answer()) from None
    except PeerNotFound:
        raise NotFoundError(view.not_found(ref, view.clock.seconds(),
                                           len(view.mesh.known_peers()))) from None
    except AmbiguousPeer as e:
        raise AmbiguousError(str(e)) from None


async def connect_peer(view: MeshView, record: PeerRecord) -> Connection:
    try:
        return await view.mesh.connect(record.peer_id, timeout=max(1.0, view.remaining()))
    except ConnectError as e:
        raise NoPathError(unreachable_text(view, record, record.state, e.attempts)) from None


def unreachable_text(view: MeshView, record: PeerRecord, state: str, attempts: str) -> str:
    return (
        f"no path to {peer_label(record)} within {view.timeout:g} s: it did not answer"
        f" at its known address and no peer heard from it recently (its state"
        f" here: {state}; tried: {attempts}); is it running? try a longer"
        f" --timeout"
    )


async def connect_document(view: MeshView, ref: str, wait_direct: float = 0.0) -> dict:
    """
    What C{omerta mesh connect --output json} prints: the path to the peer
    C{ref} names (L{Connection.as_dict}), its name, and how long the first
    answer and a direct path took.  C{wait_direct}: after a relayed path,
    wait up to that many seconds for a direct or punched one.
    """
    record = await find_peer(view, ref)
    started = view.clock.seconds()
    connection = await connect_peer(view, record)
    first = view.clock.seconds() - started
    direct = first if connection.direct else None
    if not connection.direct and wait_direct > 0:
        later = await view.mesh.wait_direct(record.peer_id, wait_direct)
        if later is not None and later.direct:
            connection = later
            direct = view.clock.seconds() - started
        elif later is not None:
            connection = later
    return dict(connection.as_dict(), name=record.name, timings={
        "first_message_s": round(first, 3),
        "direct_s": None if direct is None else round(direct, 3),
        "punch_attempts": view.mesh.punch_attempts(record.peer_id),
    })


async def ping_document(
    view: MeshView,
    ref: str,
    count: int,
    interval: float,
    reply_timeout: float,
    *,
    on_path: Callable[[PeerRecord, Connection], None] | None = None,
    on_reply: Callable[[dict], None] | None = None,
    on_lost: Callable[[int], None] | None = None,
) -> dict:
    """
    What C{omerta mesh ping --output json} prints: C{count} pings to the
    peer C{ref} names, one every C{interval} seconds whether or not the last
    was answered (as ping(8) does, so a path that breaks and comes back is
    seen at the interval, not only after a reply timeout), each waiting up
    to C{reply_timeout} seconds; the replies in order of sequence (round
    trip, path, time sent) and L{summarise}'s summary.  No reply at all is
    not an error here: the document says so (C{summary.received} is 0).

    C{on_path(record, connection)} once connected, C{on_reply(reply)} and
    C{on_lost(seq)} for each ping as its answer arrives or its wait ends:
    for printing as it goes.
    """
    record = await find_peer(view, ref)
    connection = await connect_peer(view, record)
    if on_path is not None:
        on_path(record, connection)
    replies = []
    first_sent = view.clock.seconds()

    def answered(result, seq: int, sent: float) -> None:
        rtt, now_connection = result
        if rtt is None:
            if on_lost is not None:
                on_lost(seq)
            return
        path = (now_connection or connection).as_dict()
        reply = {
            "seq": seq,
            "rtt_ms": round(rtt * 1000, 3),
            "kind": path["kind"],
            "endpoint": path["endpoint"],
            "local_port": path["local_port"],
            "via": path["via"],
            "t_s": round(sent, 3),
        }
        replies.append(reply)
        if on_reply is not None:
            on_reply(reply)

    waiting = []
    for seq in range(1, count + 1):
        if seq > 1:
            due = first_sent + (seq - 1) * interval
            await deferLater(view.clock, max(0.0, due - view.clock.seconds()), lambda: None)
        sent = view.clock.seconds() - first_sent
        d = view.mesh.ping(record.peer_id, timeout=reply_timeout)
        d.addCallback(answered, seq, sent)
        waiting.append(d)
    try:
        for d in waiting:
            await d  # an error (no route, not found) is raised as itself
    finally:
        for d in waiting:
            d.addErrback(lambda _: None)  # the others' errors: the same, once is enough
    replies.sort(key=lambda reply: reply["seq"])
    return {
        "peer_id": record.peer_id_text,
        "name": record.name,
        "replies": replies,
        "summary": summarise(count, [r["rtt_ms"] for r in replies]),
    }


def summarise(sent: int, rtts_ms: list[float]) -> dict:
    """
    ping(8)'s summary: counts, loss and min/avg/max round trip (None
    without replies).
    """
    received = len(rtts_ms)
    return {
        "sent": sent,
        "received": received,
        "loss_pct": round(100.0 * (sent - received) / sent, 1),
        "rtt_min_ms": min(rtts_ms) if rtts_ms else None,
        "rtt_avg_ms": round(stats.fmean(rtts_ms), 3) if rtts_ms else None,
        "rtt_max_ms": max(rtts_ms) if rtts_ms else None,
    }


# -- VMs ------------------------------------------------------------------------------


def error_text(view: MeshView, error: Exception) -> str:
    """
    What to tell a person about a failed step of the consumer client, with
    what to try.
    """
    if isinstance(error, NotJoined):
        return view.no_answer()
    if isinstance(error, ProviderNotFound):
        return view.not_found(error.ref, error.at, error.known)
    if isinstance(error, NotAProvider):
        return f"{error}; 'omerta mesh peers' shows who is"
    if isinstance(error, NothingAnswered):
        return (f"nothing answered at {error.endpoint} within {view.timeout:g} s:"
                f" is a provider of network {view.plan.network.name} running there?")
    if isinstance(error, Unreachable):
        return unreachable_text(view, error.record, error.state, error.attempts)
    if isinstance(error, NoAnswer):
        return f"{error}; try a longer --timeout"
    return str(error)  # Refused, BadReply, NoRoom, AmbiguousPeer


def error_class(error: Exception) -> type[DocumentError]:
    """
    The kind of L{DocumentError} a failure of the consumer client (or the
    mesh) is.
    """
    if isinstance(error, NotJoined):
        return NotJoinedError
    from omerta.jobs.client import JobRefused, UnknownJob

    if isinstance(error, (ProviderNotFound, PeerNotFound, UnknownJob)):
        return NotFoundError
    if isinstance(error, AmbiguousPeer):
        return AmbiguousError
    if isinstance(error, (NothingAnswered, Unreachable, NoAnswer, ConnectError)):
        return NoPathError
    if isinstance(error, (NotAProvider, NoRoom, Refused, JobRefused)):
        return RefusedError
    if isinstance(error, BadReply):
        return BadAnswerError
    return DocumentError


@contextlib.contextmanager
def consumer_errors(view: MeshView) -> Iterator[None]:
    """Failures of the consumer client as DocumentErrors a person can act on."""
    try:
        yield
    except (ConsumerError, NotJoined, AmbiguousPeer) as e:
        raise error_class(e)(error_text(view, e)) from None


def vm_document(held: HeldVM, client: ConsumerClient | None = None, **extra) -> dict:
    """
    One held VM as C{omerta vm request/show --output json} prints it:
    everything kept about it, how to log in (C{ssh_address}, C{ssh_user},
    C{ssh_command}), its tunnel as C{client}'s node carries it now, plus
    C{extra} (the path, the time waited).
    """
    document = held.public()
    document["ssh_address"] = held.address
    document["ssh_user"] = sshkeys.USER
    document["ssh_command"] = None
    if held.address and client is not None:
        document["ssh_command"] = shlex.join(sshkeys.ssh_argv(client.data_dir, held.address,
                                                              held.ssh_key))
    document["wireguard"] = {
        "public_key": held.wg_public_key,
        "provider_public_key": held.provider_wg_key,
    }
    document["tunnel"] = (client.tunnel_state(held) if client is not None
                          else {"state": "unknown"})
    document.update(extra)
    return document


async def vm_request_document(
    view: MeshView,
    client: ConsumerClient,
    spec: VmRequest,
    *,
    peer: str | None = None,
    provider=None,
    on_asking: Callable[[PeerRecord, Connection], Callable[[], None]] | None = None,
) -> dict:
    """
    What C{omerta vm request --output json} prints: a VM from the provider
    C{peer} names (id, prefix or name), else the one answering at
    C{provider} (an L{omerta.addressing.Endpoint}: a bootstrap peer of the
    node given without id, else a known peer announcing that address),
    else the best-ranked with room; with the path used and the time waited.

    C{on_asking(record, connection)} is called before the VM is asked for
    and returns what to call once the answer is in (the command's progress
    line).
    """
    with consumer_errors(view):
        if peer is not None:
            record = await client.provider(peer, view.remaining())
        elif provider is not None:
            record = await provider_at(view, client, provider)
        else:
            record = await client.find_provider(spec, view.remaining())
        connection = await client.connect(record, max(1.0, view.remaining()))
        done = on_asking(record, connection) if on_asking is not None else None
        try:
            held = await client.create(record, spec, max(1.0, view.remaining()))
        finally:
            if done is not None:
                done()
    try:
        await client.open_tunnel(held, max(1.0, view.remaining()))
    except TunnelError as e:
        raise NoPathError(f"VM {held.vm_id} was granted (it stays held; 'omerta vm release"
                          f" {held.vm_id}' gives it back) but {e}") from None
    path = view.mesh.connection(record.peer_id) or connection
    return vm_document(held, client, path=path.as_dict(), waited_s=round(view.elapsed(), 3))


async def provider_at(view: MeshView, client: ConsumerClient, endpoint) -> PeerRecord:
    """
    The provider at C{endpoint}: whoever answers there when it is one of the
    node's bootstrap peers given without id or name (what the command
    does: it adds the address as one), else a known peer whose address or
    announced paths are that endpoint (a running node cannot add bootstrap
    peers).
    """
    if any(b.spec.peer_id is None and b.spec.name is None and b.spec.endpoint == endpoint
           for b in view.mesh.bootstraps()):
        return await client.provider_at(endpoint, view.remaining())
    text = str(endpoint)
    for record in view.mesh.known_peers():
        addresses = [address for _kind, address, _via in record.paths]
        if record.endpoint is not None:
            addresses.append(record.endpoint)
        if any(str(Endpoint(*address)) == text for address in addresses):
            return await client.provider(record.peer_id_text, view.remaining())
    raise NotFoundError(
        f"no peer known at {text} in network {view.plan.network.name}: name the provider"
        f" by id or name instead ('omerta mesh peers' lists them)")


def vm_list_document(client: ConsumerClient) -> dict:
    """What C{omerta vm list --output json} prints: the VMs held, as last known."""
    return {"vms": [vm_document(v, client) for v in client.held()]}


async def vm_refresh(view: MeshView, client: ConsumerClient) -> None:
    """Ask the providers of the VMs held for their states (C{vm list --refresh})."""
    with consumer_errors(view):
        await client.refresh(view.remaining())


async def vm_show_document(view: MeshView, client: ConsumerClient, held: HeldVM) -> dict:
    """What C{omerta vm show --output json} prints: the VM as its provider sees it now."""
    with consumer_errors(view):
        current, connection = await client.show(held, view.remaining())
    return vm_document(current, client, path=connection.as_dict())


async def vm_release_document(view: MeshView, client: ConsumerClient,
                              targets: list[HeldVM]) -> dict:
    """
    What C{omerta vm release --output json} prints: which of C{targets}
    were released, which not (with why; they stay held) and which are held
    in other networks.  Failures are in the document, not raised.
    """
    report = await client.release_vms(targets, view.remaining())
    return {
        "released": report.released,
        "failed": [{"vm_id": held.vm_id, "error": error_text(view, error)}
                   for held, error in report.failed],
        "elsewhere": report.elsewhere,
    }


def network_of(vms: list[HeldVM]) -> str | None:
    """The network to work in for C{vms}: the first (by id) they were requested in."""
    networks = sorted({v.network for v in vms})
    return networks[0] if networks else None


def held_vm(client: ConsumerClient, ref: str) -> HeldVM:
    """
    A held VM by id or unique prefix; L{NotFoundError} (L{AmbiguousError} for
    a prefix of several) with the store's message.
    """
    try:
        return client.held_vm(ref)
    except LookupError as e:
        prefix = ref.strip().lower()
        several = prefix and sum(v.vm_id.startswith(prefix) for v in client.held()) > 1
        raise (AmbiguousError if several else NotFoundError)(str(e)) from None
