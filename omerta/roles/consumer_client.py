"""
The consumer role on the L{MeshNetwork} API: choose a provider, ask it for a
VM, keep track of the VMs held, give them back.  C{omerta vm} is a front end
to it; a program or a daemon needs only a started L{MeshNetwork} and a data
directory:

    mesh = MeshNetwork(data_dir, invites=[link], reactor=reactor)
    await mesh.start()
    client = ConsumerClient(mesh, data_dir)
    granted = await client.request(VmRequest(vcpus=1, memory_mb=256),
                                   provider="provider-1", timeout=60)
    print(granted.vm.vm_id, granted.connection.kind)
    await client.release(granted.vm.vm_id, timeout=30)

Requests travel on the C{vm} channel (L{omerta.wire.vm}) inside the per-pair
session, with this consumer's WireGuard public key for that provider and
the SSH public key the guest should accept.  With C{tunnels} (the running
node's L{omerta.tunnel.consumer_side.ConsumerTunnels}) the client also
brings the VM's tunnel up and waits until the guest answers SSH through it.
What is held is kept in C{<data-dir>/consumer.json}
(L{omerta.roles.consumer.ConsumerStore}), so what is held survives restarts.
Every request's outcome (granted and how fast; refused for capacity, failed,
unavailable or no answer) is folded into the provider's reputation and kept
there; L{ConsumerClient.find_provider} ranks providers with it.

The client works in one network of the mesh (C{network}, default the mesh's
own default); VMs held in other networks are left alone.  Every method that
talks to providers returns a Deferred and takes a C{timeout} in seconds for
the whole operation.  Failures are L{ConsumerError}s (what went wrong with a
provider), or the mesh's L{NotJoined} and C{AmbiguousPeer}.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twisted.internet.defer import Deferred

from omerta.crypto.wireguard import decode_key, encode_key
from omerta.mesh.messaging import MessagingError
from omerta.mesh.network import ConnectError, MeshNetwork, NotJoined, peer_label
from omerta.mesh.paths import Connection
from omerta.mesh.registry import AmbiguousPeer, PeerNotFound, PeerRecord, Requirements
from omerta.roles.consumer import ConsumerStore, HeldVM, ProviderScore
from omerta.roles import sshkeys
from omerta.roles.guest import DEFAULT_IMAGE
from omerta.safe_text import printable
from omerta.wire import ParseError
from omerta.wire.messages import Capability
from omerta.wire.vm import CHANNEL, VmOp, VmStatus, build_request, parse_reply, vm_id_bytes

PROVIDER_FAILURES = (VmStatus.NO_CAPACITY, VmStatus.FAILED, VmStatus.UNAVAILABLE)
"""Refusals that say something about the provider (the others are ours)."""


# -- errors -------------------------------------------------------------------


class ConsumerError(Exception):
    """
    A provider could not be found, reached or did not give what was asked.
    """


class ProviderNotFound(ConsumerError, LookupError):
    """
    No peer known by C{ref} (after waiting for the mesh); C{known} peers were
    known at the time C{at} (the mesh clock's seconds).
    """

    def __init__(self, ref: str, known: int, at: float):
        super().__init__(f"no peer named or with an id starting {ref.strip()!r}"
                         f" ({known} peer(s) known)")
        self.ref = ref
        self.known = known
        self.at = at


class NotAProvider(ConsumerError):
    def __init__(self, record: PeerRecord):
        super().__init__(f"{peer_label(record)} is not a provider (it does not announce"
                         f" the provider capability)")
        self.record = record


class NothingAnswered(ConsumerError):
    """Nobody answered at a bootstrap endpoint given for the provider."""

    def __init__(self, endpoint, timeout: float):
        super().__init__(f"nothing answered at {endpoint} within {timeout:g} s")
        self.endpoint = endpoint
        self.timeout = timeout


class NoRoom(ConsumerError):
    """No online provider announces room for the request."""

    def __init__(self, spec: VmRequest, providers: list[PeerRecord]):
        offers = "; ".join(
            f"{peer_label(r)}: {r.resources.cpu_cores} cores, {r.resources.memory_mb} MiB,"
            f" {r.resources.disk_gb} GiB free ({r.state})" for r in providers) or "none known"
        super().__init__(f"no online provider announces room for {spec.vcpus} cores,"
                         f" {spec.memory_mb} MiB and {spec.disk_gb} GiB (providers: {offers})")
        self.spec = spec
        self.providers = providers


class Unreachable(ConsumerError):
    """No path to the provider; C{attempts} says what was tried."""

    def __init__(self, record: PeerRecord, attempts: str, state: str):
        super().__init__(f"no path to {peer_label(record)} (its state here: {state};"
                         f" tried: {attempts})")
        self.record = record
        self.attempts = attempts
        self.state = state


class NoAnswer(ConsumerError):
    """The request got no answer (C{error}: the messaging layer's)."""

    def __init__(self, record: PeerRecord, error: MessagingError):
        super().__init__(f"{peer_label(record)}: {printable(error)}")
        self.record = record
        self.error = error


class BadReply(ConsumerError):
    def __init__(self, record: PeerRecord, error: ParseError):
        super().__init__(f"{peer_label(record)} answered something that is not a VM reply"
                         f" ({error}); is it running an older omerta?")
        self.record = record
        self.error = error


class Refused(ConsumerError):
    """The provider answered with an error status (L{VmStatus})."""

    def __init__(self, record: PeerRecord, status: int, detail: str):
        try:
            name = VmStatus(status).name.lower().replace("_", " ")
        except ValueError:
            name = f"status {status}"
        super().__init__(f"{peer_label(record)} refused: {name}:"
                         f" {printable(detail, 1000) if detail else 'no detail given'}")
        self.record = record
        self.status = status
        self.detail = detail


# -- what is asked for and what comes back ------------------------------------


@dataclass(frozen=True)
class VmRequest:
    vcpus: int = 1
    memory_mb: int = 256
    disk_gb: int = 1
    image: str = DEFAULT_IMAGE
    name: str = ""
    ssh_key: str = ""
    """The SSH public key line the guest accepts (empty: one is made)."""
    ssh_identity: str = ""
    """The private key file that goes with C{ssh_key}."""

    def requirements(self) -> Requirements:
        return Requirements(cpu_cores=self.vcpus, memory_mb=self.memory_mb,
                            disk_gb=self.disk_gb, capabilities=Capability.PROVIDER)


@dataclass(frozen=True)
class Granted:
    """
    A VM a provider granted: what is kept about it, who, and the path used.
    """

    vm: HeldVM
    provider: PeerRecord
    connection: Connection


@dataclass
class ReleaseReport:
    released: list[str]
    """Ids of the VMs given back (or already gone at the provider)."""
    failed: list[tuple[HeldVM, Exception]]
    """VMs not released, with why; they stay held."""
    elsewhere: list[str]
    """Ids of VMs held in other networks, not asked about."""


def _deferred(method):
    """An C{async def} method that returns a Deferred."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs) -> Deferred:
        return Deferred.fromCoroutine(method(*args, **kwargs))

    return wrapper


_LOOKUP_FAILURES = (ConsumerError, AmbiguousPeer, NotJoined)


class ConsumerClient:
    """
    @param mesh: a started L{MeshNetwork} (None: only the local methods,
        L{held}, L{held_vm} and L{scores}, work).
    @param data_dir: where C{consumer.json} lives.
    @param network: the network to work in (id, bytes or hex); the mesh's
        default when None.
    @param now: the wall clock, for the times kept in C{consumer.json}.
    """

    DEFAULT_TIMEOUT = 60.0

    def __init__(self, mesh: MeshNetwork | None, data_dir: Path, *, network=None,
                 now: Callable[[], float] = time.time, tunnels=None):
        self.mesh = mesh
        self.network = network
        self.data_dir = Path(data_dir)
        self.tunnels = tunnels
        self.store = ConsumerStore(data_dir)
        self._now = now

    # what is held (no mesh needed)

    def held(self) -> list[HeldVM]:
        """
        The VMs held, as last known, oldest first.

        @raise omerta.roles.consumer.ConsumerStateError: a damaged state file.
        """
        return sorted(self.store.load().vms.values(), key=lambda v: (v.created_at, v.vm_id))

    def held_vm(self, ref: str) -> HeldVM:
        """
        A held VM by id or unique id prefix.

        @raise LookupError: none, or more than one (the message says which).
        """
        return self.store.load().find(ref)

    def scores(self) -> dict[str, ProviderScore]:
        """How each provider served us, by peer id (hex)."""
        return self.store.load().providers

    # time

    def _deadline(self, timeout: float) -> Callable[[], float]:
        clock = self.mesh.clock
        deadline = clock.seconds() + timeout
        return lambda: max(0.0, deadline - clock.seconds())

    # providers

    @_deferred
    async def provider(self, ref: str, timeout: float = DEFAULT_TIMEOUT) -> PeerRecord:
        """
        The provider C{ref} names (peer id, id prefix or name), once the mesh
        knows it (L{MeshNetwork.find_peer}).  Fails with L{ProviderNotFound},
        L{NotAProvider}, L{NotJoined} or C{AmbiguousPeer}.
        """
        return _provider(await self._find(ref, timeout))

    async def _find(self, ref: str, timeout: float) -> PeerRecord:
        mesh = self.mesh
        try:
            return await mesh.find_peer(ref, timeout, network=self.network)
        except PeerNotFound:
            raise ProviderNotFound(ref, len(mesh.known_peers(self.network)),
                                   mesh.clock.seconds()) from None

    @_deferred
    async def provider_at(self, endpoint, timeout: float = DEFAULT_TIMEOUT) -> PeerRecord:
        """
        Whoever answers at C{endpoint} (an L{omerta.addressing.Endpoint} the
        mesh was given as a bootstrap peer without id or name), no
        discovery.  Fails with L{NothingAnswered}, L{NotAProvider} or
        L{NotJoined}.
        """
        mesh = self.mesh
        remaining = self._deadline(timeout)
        if not any(_anonymous_at(b.spec, endpoint) for b in mesh.bootstraps()):
            raise ValueError(f"{endpoint} is not one of the node's bootstrap peers: give it"
                             f" as BootstrapSpec({endpoint!r}) when building the MeshNetwork")
        if not await mesh.wait_joined(remaining(), network=self.network):
            raise NotJoined(f"no bootstrap peer answered within {timeout:g} s")

        def answered() -> PeerRecord | None:
            for boot in mesh.bootstraps():
                if _anonymous_at(boot.spec, endpoint) and boot.answered_by is not None:
                    return mesh.peer_info(boot.answered_by, network=self.network)
            return None

        record = await mesh.wait_until(answered, remaining(), kinds=("bootstrap_reached",),
                                       expired=lambda: None)
        if record is None:
            raise NothingAnswered(endpoint, timeout)
        return _provider(record)

    @_deferred
    async def find_provider(self, spec: VmRequest, timeout: float = DEFAULT_TIMEOUT
                            ) -> PeerRecord:
        """
        The best-ranked online provider announcing room for C{spec}: highest
        reputation (as kept in C{consumer.json}), then lowest round trip,
        once the mesh's view settled.  Fails with L{NoRoom} or L{NotJoined}.
        """
        mesh = self.mesh
        remaining = self._deadline(timeout)
        if not await mesh.wait_joined(remaining(), network=self.network):
            raise NotJoined(f"no bootstrap peer answered within {timeout:g} s")
        await mesh.wait_settled(remaining(), network=self.network)
        for provider, score in self.scores().items():
            mesh.restore_reputation(bytes.fromhex(provider), score.reputation,
                                    network=self.network)
        found = mesh.find_peers(spec.requirements(), network=self.network)
        if found:
            return found[0]
        raise NoRoom(spec, [r for r in mesh.known_peers(self.network)
                            if r.capabilities & Capability.PROVIDER])

    @_deferred
    async def connect(self, record: PeerRecord, timeout: float = DEFAULT_TIMEOUT
                      ) -> Connection:
        """
        A live path to the provider (L{MeshNetwork.connect}); fails with
        L{Unreachable}.
        """
        try:
            return await self.mesh.connect(record.peer_id, timeout=timeout, network=self.network)
        except ConnectError as e:
            raise Unreachable(record, e.attempts, record.state) from None

    # VMs

    @_deferred
    async def create(self, record: PeerRecord, spec: VmRequest,
                     timeout: float = DEFAULT_TIMEOUT) -> HeldVM:
        """
        Ask the provider for a VM, with a WireGuard key pair made for it;
        keep what it granted (and the key pair) and return it.  The outcome
        goes into the provider's reputation.  Fails with L{Refused},
        L{NoAnswer} or L{BadReply}.
        """
        from omerta.tunnel.consumer_side import tunnel_key

        mesh = self.mesh
        key = tunnel_key(self.data_dir, record.peer_id_text)
        if spec.ssh_key:
            identity = sshkeys.Identity(Path(spec.ssh_identity), sshkeys.public_line(spec.ssh_key))
        else:
            identity = sshkeys.make_identity(self.data_dir)
        payload = build_request(VmOp.CREATE, vcpus=spec.vcpus, memory_mb=spec.memory_mb,
                                disk_gb=spec.disk_gb, image=spec.image, name=spec.name,
                                wg_public_key=key.public, ssh_key=identity.public_line)
        started = mesh.clock.seconds()
        try:
            reply = await self._ask(record, payload, timeout)
        except ConsumerError:
            self.record_outcome(record, False, None)
            raise
        latency = mesh.clock.seconds() - started
        status = _status(reply.status)
        if status == VmStatus.OK and reply.vms:
            self.record_outcome(record, True, latency)
        elif status in PROVIDER_FAILURES:
            self.record_outcome(record, False, latency)
        if status != VmStatus.OK or not reply.vms:
            raise Refused(record, reply.status, reply.detail)
        granted = reply.vms[0]
        vm_id = granted.vm_id.hex()
        identity = identity.keep_for(self.data_dir, vm_id)
        held = HeldVM(
            vm_id=vm_id, provider=record.peer_id_text,
            provider_name=printable(record.name), network=mesh.network_id(self.network),
            created_at=granted.created_ms / 1000, vcpus=granted.vcpus,
            memory_mb=granted.memory_mb, disk_gb=granted.disk_gb,
            image=printable(granted.image or spec.image), name=printable(granted.name),
            state=printable(granted.state), address=_ip_address(granted.address),
            wg_public_key=key.public_text, provider_wg_key=encode_key(granted.wg_public_key),
            path_kind=printable(granted.path_kind),
            tunnel_address=_ip_address(granted.tunnel_address),
            provider_tunnel_address=_ip_address(granted.provider_tunnel_address),
            tunnel_prefix=granted.tunnel_prefix, host_key=_host_key(granted.host_key),
            ssh_key=str(identity.private_path))
        if held.address and held.host_key:
            sshkeys.remember_host_key(self.data_dir, held.address, held.host_key)
        with self.store.update() as state:
            state.vms[held.vm_id] = held
        return held

    # tunnels

    def tunnel_problem(self, held: HeldVM) -> str | None:
        """Why C{held} has no tunnel here, or None when it can have one."""
        if not held.tunnel_address or not held.provider_tunnel_address:
            return "not carried: the provider carries no tunnels"
        if self.tunnels is None:
            return ("not carried: tunnels live in the running node; start it with"
                    " 'omerta up' and the VM's tunnel comes up")
        from omerta.tunnel.consumer_side import TunnelError

        try:
            self.tunnels.check()
        except TunnelError as e:
            return f"not carried: {e}"
        return None

    @_deferred
    async def open_tunnel(self, held: HeldVM, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """
        Bring C{held}'s tunnel up (the running node's) and wait until it
        works: the guest answers on its SSH port through it, or, without a
        guest, WireGuard's handshake with the provider completed.  Returns
        the tunnel's state; fails with L{TunnelError}.
        """
        from omerta.tunnel.consumer_side import TunnelError

        problem = self.tunnel_problem(held)
        if problem is not None:
            return {"state": problem}
        mesh = self.mesh
        remaining = self._deadline(timeout)
        provider_id = bytes.fromhex(held.provider)
        await self.tunnels.ensure(
            bytes.fromhex(held.network), provider_id,
            provider_key=decode_key(held.provider_wg_key), address=held.tunnel_address,
            provider_address=held.provider_tunnel_address, prefix=held.tunnel_prefix,
            vms={held.vm_id: held.address})

        def handshaken():
            state = self.tunnels.state(provider_id)
            return state is not None and state["state"] == "up"

        if not await mesh.wait_until(handshaken, max(0.1, remaining()), fallback=0.5):
            raise TunnelError(f"no WireGuard handshake with the provider through the mesh"
                              f" within {timeout:g} s")
        if held.address:
            if not await _port_answers(mesh.clock, held.address, 22, remaining()):
                raise TunnelError(f"the tunnel is up but the guest {held.address} does not"
                                  f" answer SSH (port 22) within {timeout:g} s")
        return self.tunnels.state(provider_id)

    def tunnel_state(self, held: HeldVM) -> dict:
        """The tunnel of C{held} as documents show it."""
        problem = self.tunnel_problem(held)
        if problem is not None:
            return {"state": problem}
        state = self.tunnels.state(bytes.fromhex(held.provider))
        return state or {"state": "down"}

    @_deferred
    async def request(self, spec: VmRequest, *, provider: str | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> Granted:
        """
        All of it: the provider C{provider} names (else the best-ranked with
        room, L{find_provider}), a path to it, the VM.
        """
        remaining = self._deadline(timeout)
        if provider is not None:
            record = await self.provider(provider, remaining())
        else:
            record = await self.find_provider(spec, remaining())
        connection = await self.connect(record, max(1.0, remaining()))
        held = await self.create(record, spec, max(1.0, remaining()))
        return Granted(held, record,
                       self.mesh.connection(record.peer_id, network=self.network) or connection)

    def record_outcome(self, record: PeerRecord, success: bool, latency: float | None) -> None:
        """
        Fold how the provider served us into its reputation (the registry's
        rule) and keep it in C{consumer.json}.
        """
        reputation = self.mesh.record_outcome(record.peer_id, success, latency,
                                              network=self.network)
        with self.store.update() as state:
            state.record_outcome(record.peer_id_text, success, latency, self._now(), reputation)

    async def _ask(self, record: PeerRecord, payload: bytes, timeout: float):
        try:
            answer = await self.mesh.request(record.peer_id, CHANNEL, payload, timeout=timeout,
                                             network=self.network)
        except MessagingError as e:
            raise NoAnswer(record, e) from None
        try:
            return parse_reply(answer)
        except ParseError as e:
            raise BadReply(record, e) from None

    async def _reach(self, held: HeldVM, remaining) -> PeerRecord:
        record = await self._find(held.provider, remaining())
        await self.connect(record, max(1.0, remaining()))
        return record

    @_deferred
    async def refresh(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Exception | None]:
        """
        Ask each provider of the VMs held (in this network) for their state
        now; a VM its provider no longer has becomes C{gone}, one whose
        provider could not be asked C{unknown}.  Returns, by provider, why it
        could not be asked (None: it answered).  Fails with L{NotJoined}
        when nobody answers at all.
        """
        mesh = self.mesh
        remaining = self._deadline(timeout)
        network_id = mesh.network_id(self.network)
        providers = sorted({v.provider for v in self.held() if v.network == network_id})
        if not providers:
            return {}
        if not await mesh.wait_joined(remaining(), network=self.network):
            raise NotJoined(f"no bootstrap peer answered within {timeout:g} s")
        return {provider: await self._refresh(provider, remaining) for provider in providers}

    async def _refresh(self, provider: str, remaining) -> Exception | None:
        try:
            record = await self._find(provider, remaining())
            await self.connect(record, max(1.0, remaining()))
            reply = await self._ask(record, build_request(VmOp.LIST), max(1.0, remaining()))
        except _LOOKUP_FAILURES as e:
            reply, problem = None, e
        else:
            problem = (None if reply.status == VmStatus.OK
                       else Refused(record, reply.status, reply.detail))
        live = {} if problem is not None else {v.vm_id.hex(): v for v in reply.vms}
        with self.store.update() as state:
            for held in state.vms.values():
                if held.provider != provider:
                    continue
                if problem is not None:
                    held.state = "unknown"
                elif held.vm_id in live:
                    self._update(held, live[held.vm_id])
                else:
                    held.state = "gone"
        return problem

    @_deferred
    async def show(self, vm: HeldVM | str, timeout: float = DEFAULT_TIMEOUT
                   ) -> tuple[HeldVM, Connection]:
        """
        One held VM (a L{HeldVM}, or an id or unique prefix) as its provider
        sees it now (C{gone} when it no longer has it), kept, with the path
        to the provider.  Fails with L{Refused} and the errors of reaching
        the provider.
        """
        held = vm if isinstance(vm, HeldVM) else self.held_vm(vm)
        remaining = self._deadline(timeout)
        record = await self._find(held.provider, remaining())
        connection = await self.connect(record, max(1.0, remaining()))
        reply = await self._ask(record, build_request(VmOp.STATUS, vm_id=vm_id_bytes(held.vm_id)),
                                max(1.0, remaining()))
        if reply.status == VmStatus.UNKNOWN_VM:
            record_now = None
        elif reply.status != VmStatus.OK or not reply.vms:
            raise Refused(record, reply.status, reply.detail)
        else:
            record_now = reply.vms[0]
        with self.store.update() as state:
            current = state.vms.get(held.vm_id)
            if current is not None:
                if record_now is None:
                    current.state, current.address = "gone", None
                else:
                    self._update(current, record_now)
                return current, connection
        return held, connection

    def _update(self, held: HeldVM, record) -> None:
        """A held VM takes what its provider says of it now."""
        held.state = printable(record.state)
        held.address = _ip_address(record.address)
        host_key = _host_key(record.host_key)
        if host_key and host_key != held.host_key:
            held.host_key = host_key
            if held.address:
                sshkeys.remember_host_key(self.data_dir, held.address, held.host_key)

    @_deferred
    async def release_vms(self, vms: list[HeldVM], timeout: float = DEFAULT_TIMEOUT
                          ) -> ReleaseReport:
        """
        Ask the providers to destroy C{vms} (those in this network), one
        after the other, and forget each one released (or already gone
        there).  A VM that could not be released stays held, and is in the
        report with why.
        """
        remaining = self._deadline(timeout)
        network_id = self.mesh.network_id(self.network)
        released, failed = [], []
        for held in [v for v in vms if v.network == network_id]:
            try:
                record = await self._reach(held, remaining)
                reply = await self._ask(record, build_request(
                    VmOp.RELEASE, vm_id=vm_id_bytes(held.vm_id)), max(1.0, remaining()))
            except _LOOKUP_FAILURES as e:
                failed.append((held, e))
                continue
            if reply.status in (VmStatus.OK, VmStatus.UNKNOWN_VM):
                with self.store.update() as state:
                    state.vms.pop(held.vm_id, None)
                await self._forget(held)
                released.append(held.vm_id)
            else:
                failed.append((held, Refused(record, reply.status, reply.detail)))
        elsewhere = sorted(v.vm_id for v in vms if v.network != network_id)
        return ReleaseReport(released, failed, elsewhere)

    async def _forget(self, held: HeldVM) -> None:
        """What was kept locally for a released VM goes: tunnel, key, host key."""
        if self.tunnels is not None:
            await self.tunnels.forget(bytes.fromhex(held.provider), held.vm_id)
        sshkeys.forget_identity(self.data_dir, held.vm_id)
        if held.address:
            sshkeys.forget_host(self.data_dir, held.address)

    @_deferred
    async def release(self, vm: HeldVM | str, timeout: float = DEFAULT_TIMEOUT) -> HeldVM:
        """
        Release one held VM (a L{HeldVM}, or an id or unique prefix); fails
        with why it was not released.
        """
        held = vm if isinstance(vm, HeldVM) else self.held_vm(vm)
        report = await self.release_vms([held], timeout)
        if report.failed:
            raise report.failed[0][1]
        if report.elsewhere:
            raise ConsumerError(f"VM {held.vm_id} is held in network {held.network}, not in"
                                f" {self.mesh.network_id(self.network)}")
        return held

    def release_all(self, timeout: float = DEFAULT_TIMEOUT) -> Deferred:
        """
        Release every VM held in this network (L{release_vms}).
        """
        return self.release_vms(self.held(), timeout)


CONNECT_RETRY = 0.3
"""Seconds between attempts to reach a guest's SSH port through its new tunnel."""


async def _port_answers(clock, host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to (host, port) opens within C{timeout} (retried)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import deferLater

    deadline = clock.seconds() + timeout
    while True:
        left = deadline - clock.seconds()
        if left <= 0:
            return False
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=max(1, int(min(left, 3))))
        try:
            protocol = await endpoint.connect(Factory.forProtocol(Protocol))
        except Exception:
            # nothing announces a port opening: try again shortly, within the deadline
            await deferLater(clock, min(CONNECT_RETRY, max(0.0, deadline - clock.seconds())),
                             lambda: None)
            continue
        protocol.transport.loseConnection()
        return True


def _provider(record: PeerRecord) -> PeerRecord:
    if not record.capabilities & Capability.PROVIDER:
        raise NotAProvider(record)
    return record


def _anonymous_at(spec, endpoint) -> bool:
    return spec.peer_id is None and spec.name is None and spec.endpoint == endpoint


def _ip_address(text: str) -> str | None:
    """A provider's address for a VM or tunnel end: an IP address, else None."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _host_key(text: str) -> str | None:
    """A guest's SSH host key as its provider reported it: one key line, else None."""
    try:
        return sshkeys.public_line(text) if text else None
    except sshkeys.SshKeyError:
        return None


def _status(value: int) -> VmStatus | None:
    try:
        return VmStatus(value)
    except ValueError:
        return None
