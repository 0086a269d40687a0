"""
L{MeshNetwork}: the public face of an omerta node (see docs/api.md).

    mesh = MeshNetwork(data_dir, invites=[link], name="worker-3")
    await mesh.start()
    await mesh.wait_for_peers(1, timeout=10)
    reply = await mesh.request("provider-1", "vm", b"...", timeout=10)

Everything returns Deferreds (usable with C{await} inside
C{ensureDeferred}); nothing blocks the reactor, and nothing polls: waits are
Deferreds fired by the node's events (L{omerta.mesh.waiting}), with
deadlines.  Peers are named by peer id (hex or bytes), a unique id prefix, or
a name.  A node in several networks uses the first one unless C{network=}
names another.

This module is the one place that reaches into the mesh's internals (the
overlays and their registry, paths, liveness, relays, gossip, freshness and
messaging); roles and the application use only what it offers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, ensureDeferred, succeed

from omerta.addressing import BootstrapSpec
from omerta.mesh import waiting
from omerta.mesh.events import KINDS
from omerta.mesh.paths import Connection, is_relayed
from omerta.mesh.registry import AmbiguousPeer, PeerNotFound, PeerRecord, Requirements
from omerta.mesh.service import NodeService
from omerta.safe_text import printable

PATH_EVENTS = ("path_changed", "peer_connected", "peer_changed")
"""What may bring a path up: a move, a new link's first frame, a pong (rtt)."""

REGISTRY_EVENTS = ("peer_discovered", "peer_changed")
"""What changes the peers known and their states."""


class ConnectError(Exception):
    """
    No path to a peer; C{attempts} says what was tried.
    """

    def __init__(self, message: str, attempts: str = ""):
        super().__init__(f"{message} ({attempts})" if attempts else message)
        self.attempts = attempts


class NotJoined(Exception):
    """
    No bootstrap peer answered, and no peer is online, within the time
    given.
    """


@dataclass(frozen=True)
class BootstrapProgress:
    """
    One bootstrap peer and how far the node got with it.

    @ivar address: the (host, port) its endpoint resolved to, None before
        (or when the name did not resolve).
    @ivar reached: it proved to be the peer named (a signed announcement).
    @ivar answered_by: the peer id that answered there, if any.
    """

    spec: BootstrapSpec
    address: tuple | None
    reached: bool
    answered_by: bytes | None


def peer_label(record: PeerRecord) -> str:
    """
    How to name a peer to a person: C{name (id)}, or the id alone.  The
    name is the peer's own choice, so it is L{printable} (it goes into
    error messages, progress lines and logs).
    """
    return (f"{printable(record.name)} ({record.peer_id_text})" if record.name
            else record.peer_id_text)


class MeshNetwork:
    """
    @param service: an existing L{NodeService} to wrap; otherwise one is built
        from the keyword arguments (see L{NodeService}).
    @param node: an already running L{omerta.mesh.node.MeshNode} to wrap (the
        simulator's, in tests); C{start} and C{stop} are then its owner's
        business and do nothing.
    """

    FRESH_CONTACT = 2.0
    """
    C{connect} trusts an existing path heard from this recently; older ones
    are confirmed with a ping first.
    """

    SETTLE_TIME = 1.0
    """
    L{wait_settled}: how long the peer counts must stay unchanged.
    """

    PEER_LIST_ASKS = 4
    PEER_LIST_SPACING = 2.0
    """
    L{find_peer}: a peer not in the first peer lists: ask the reached
    bootstrap peers this many more times, this many seconds apart (their
    C{MeshConfig.peer_list_interval} is 2 s), before saying it is not there.
    """

    def __init__(self, data_dir: Path | None = None, *, service: NodeService | None = None,
                 node=None, network: bytes | str | None = None, **options):
        if service is None and node is None:
            service = NodeService(data_dir, **options)
        self.service = service
        self._node = node
        self.default_network = network

    # lifecycle

    def start(self) -> Deferred:
        if self.service is not None:
            self.service.startService()
        return succeed(self)

    def stop(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        if self.service is None:
            return None
        result = self.service.stopService()
        if isinstance(result, Deferred):
            await result
        return None

    # identity and state

    @property
    def node(self):
        """
        The L{omerta.mesh.node.MeshNode} behind this API (None before
        C{start}); for the manhole and tests, not for roles.
        """
        return self._live_node()

    def _live_node(self):
        return self._node if self._node is not None else self.service.node

    @property
    def started(self) -> bool:
        """
        Whether the node exists (it was started).
        """
        return self.node is not None

    @property
    def clock(self):
        return self.service.reactor if self.service is not None else self._node.clock

    @property
    def events(self):
        """
        Subscribe with C{events.subscribe(kind, callback)}; the kinds are
        L{omerta.mesh.events.KINDS}.
        """
        return self.service.events if self.service is not None else self._node.events

    @property
    def metrics(self):
        """
        The node's one L{omerta.metrics.Metrics} object.
        """
        return self.service.metrics if self.service is not None else self._node.metrics

    @property
    def peer_id(self) -> str:
        return self.node.identity.peer_id_text

    @property
    def nat(self):
        """
        The last NAT discovery report (L{omerta.stun.discovery.NatReport}) or
        None before the first one.
        """
        return self.node.nat

    def local_address(self) -> tuple[str, int] | None:
        """
        The (host, port) the node's socket is bound to, None when it has none.
        """
        node = self.node
        if node is None or node.transport is None:
            return None
        host = node.transport.getHost()
        return host.host, host.port

    def public_endpoints(self) -> list[tuple[str, int]]:
        """
        Addresses at which this node may be reachable directly, best first
        (the STUN-mapped one, the one peers observe, the bound one).
        """
        return self.node.public_endpoints()

    def networks(self) -> list[str]:
        """
        The ids (hex) of the networks this node is in.
        """
        return [network_id.hex() for network_id in self.node.overlays]

    def network_id(self, network=None) -> str:
        """
        The id (hex) of the network a call with C{network} uses.
        """
        return self.overlay(network).network_id.hex()

    def overlay(self, network=None):
        """
        The overlay of a network: the mesh's internals, for tests and the
        manhole; roles and the application use the methods of this class.
        """
        return self.node.overlay(network if network is not None else self.default_network)

    # peers

    def resolve(self, peer, network=None) -> bytes:
        """
        A peer id from bytes, hex, a unique prefix or a name.

        @raise LookupError: unknown or ambiguous.
        """
        if isinstance(peer, bytes):
            return peer
        return self.overlay(network).registry.lookup(peer).peer_id

    def known_peers(self, network=None) -> list[PeerRecord]:
        return list(self.overlay(network).registry.all())

    def peer_info(self, peer, network=None) -> PeerRecord | None:
        """
        The record of a peer (None for unknown peer id bytes).

        @raise PeerNotFound: an unknown name, prefix or hex id.
        @raise AmbiguousPeer: a name or prefix more than one peer matches.
        """
        return self.overlay(network).registry.get(self.resolve(peer, network))

    def knows(self, peer, network=None) -> bool:
        """
        Whether C{peer} names a known peer (or several: ambiguous is known).
        """
        try:
            return self.peer_info(peer, network) is not None
        except AmbiguousPeer:
            return True
        except PeerNotFound:
            return False

    def find_peers(self, requirements: Requirements, max_results: int = 10, network=None):
        return self.overlay(network).registry.find_peers(
            requirements, max_results, now=self.clock.seconds()
        )

    def record_outcome(self, peer, success: bool, latency: float | None = None,
                       network=None) -> float | None:
        """
        Fold how a peer served us into its reputation (the registry's rule);
        returns the new score, None for an unknown peer.
        """
        return self.overlay(network).registry.record_outcome(
            self.resolve(peer, network), success, latency)

    def restore_reputation(self, peer, reputation: float, network=None) -> bool:
        """
        Set a peer's reputation to one kept from earlier runs; returns
        whether the peer is known.
        """
        return self.overlay(network).registry.restore_reputation(
            self.resolve(peer, network), reputation)

    # what this node announces

    @property
    def resources(self) -> dict:
        """
        What this node announces it offers (cpu_cores, memory_mb, disk_gb,
        gpus).
        """
        return dict(self.node.resources)

    def set_resources(self, resources: dict) -> bool:
        """
        Announce other resources, in every network (re-signed and spread at
        once).  Returns False, announcing nothing, when they are the same.
        """
        node = self.node
        resources = dict(resources)
        if node.resources == resources:
            return False
        node.resources = resources
        for overlay in node.overlays.values():
            overlay.gossip.reannounce()
        return True

    # bootstrap

    def bootstraps(self) -> list[BootstrapProgress]:
        return [BootstrapProgress(b.spec, b.address, b.reached, b.answered_by)
                for b in self.node.bootstraps]

    def joined(self, network=None) -> bool:
        """
        A bootstrap peer proved who it is, or some peer is online.
        """
        return (any(b.reached for b in self.node.bootstraps)
                or bool(self.overlay(network).registry.online()))

    def ask_for_peer_lists(self, network=None) -> int:
        """
        Ask every reached bootstrap peer for its whole peer list again (a
        lost peer-list datagram must not make a peer look absent); returns
        how many were asked.
        """
        overlay = self.overlay(network)
        asked = 0
        for boot in self.node.bootstraps:
            if boot.reached and boot.address is not None:
                overlay.gossip.send_peer_list(boot.address, request=True)
                asked += 1
        return asked

    def wait_joined(self, timeout: float, network=None) -> Deferred:
        """
        Fires with True once L{joined}, False at the timeout.
        """
        return self.wait_until(lambda: self.joined(network), timeout,
                               kinds=("bootstrap_reached", "peer_changed"))

    def wait_settled(self, timeout: float, done: Callable[[], bool] = lambda: False,
                     network=None) -> Deferred:
        """
        Fires (with None) once the numbers of known and online peers stayed
        the same for L{SETTLE_TIME}, C{done()} is true, or C{timeout} passed.
        """
        return ensureDeferred(self._settled(timeout, done, network))

    def _counts(self, network) -> tuple[int, int]:
        registry = self.overlay(network).registry
        return len(registry), len(registry.online())

    async def _settled(self, timeout: float, done, network) -> None:
        deadline = self.clock.seconds() + timeout
        while not done():
            remaining = deadline - self.clock.seconds()
            if remaining <= 0:
                return
            last = self._counts(network)
            changed = await self.wait_until(
                lambda: done() or self._counts(network) != last,
                min(self.SETTLE_TIME, remaining), kinds=REGISTRY_EVENTS)
            if not changed:
                return

    def find_peer(self, peer, timeout: float, network=None) -> Deferred:
        """
        The record of C{peer} (id, prefix or name) once this node knows it:
        at once if it does, else after joining the mesh, waiting for the
        view to settle and asking the bootstrap peers for their lists again
        (L{PEER_LIST_ASKS} times) while it is still unknown.

        Fails with L{NotJoined} (nobody answered), C{PeerNotFound} or
        C{AmbiguousPeer}.
        """
        return ensureDeferred(self._find_peer(peer, timeout, network))

    async def _find_peer(self, peer, timeout: float, network) -> PeerRecord:
        deadline = self.clock.seconds() + timeout

        def remaining() -> float:
            return max(0.0, deadline - self.clock.seconds())

        def knows() -> bool:
            return self.knows(peer, network)

        if not knows():
            if not await self.wait_joined(remaining(), network):
                raise NotJoined(f"no bootstrap peer answered within {timeout:g} s")
            await self.wait_settled(remaining(), knows, network)
            for _ in range(self.PEER_LIST_ASKS):
                if knows() or remaining() <= 0:
                    break
                # the bootstrap peers answer a list request once per 2 s
                await self.wait_until(knows, min(self.PEER_LIST_SPACING, remaining()),
                                      kinds=REGISTRY_EVENTS)
                if knows():
                    break
                self.ask_for_peer_lists(network)
                await self.wait_settled(remaining(), knows, network)
        record = self.peer_info(peer, network)
        if record is None:  # an id given as bytes
            raise PeerNotFound(f"no peer {peer.hex()} in this network")
        return record

    # waiting on events

    def wait_until(self, predicate: Callable[[], Any], timeout: float, *,
                   kinds: Iterable[str] = tuple(KINDS), fallback: float | None = None,
                   expired: Callable[[], Any] = lambda: False) -> Deferred:
        """
        Fires with the first true value of C{predicate()}, checked now and
        after every event of C{kinds} (all kinds by default), or with
        C{expired()} (False) after C{timeout} seconds.  C{fallback}: also
        re-check every so many seconds (at least 0.5), for a condition no
        event announces.  See L{omerta.mesh.waiting.wait_for}.
        """
        self._live_node()  # (wires the registries' events)
        return waiting.wait_for(self.clock, predicate, timeout, events=self.events,
                                kinds=kinds, fallback=fallback, expired=expired)

    def next_event(self, kind: str, timeout: float,
                   match: Callable[..., bool] = lambda **data: True) -> Deferred:
        """
        Fires with the keyword arguments (a dict) of the next C{kind} event
        that C{match(**data)} accepts, or with None after C{timeout} seconds.
        """
        return waiting.next_event(self.clock, kind, timeout, events=self.events, match=match)

    # paths

    def connection(self, peer, network=None) -> Connection | None:
        """
        The path in use to C{peer} now, or None without a live one.
        """
        return self.overlay(network).paths.connection(self.resolve(peer, network))

    def connect(self, peer, timeout: float | None = None, network=None) -> Deferred:
        """
        Make sure there is a live path to C{peer} and return it (a
        L{Connection}).  Every way that may work starts at once (its direct
        address, a relay session through a relay it announces, a hole punch
        coordinated there); the first to answer a ping wins, and a punched
        path replaces a relayed one later (L{wait_direct}).  Without any of
        those, the mesh is asked who heard from the peer recently
        (freshness query).
        """
        return ensureDeferred(self._connect(peer, timeout, network))

    async def _connect(self, peer, timeout, network) -> Connection:
        overlay = self.overlay(network)
        peer_id = self.resolve(peer, network)
        connection = await self._connect_path(overlay, peer_id, timeout)
        if connection.rtt is None:
            # The pong that proved the path can answer before the link
            # stores its round trip; the registry already has the value.
            record = overlay.registry.get(peer_id)
            if record is not None and record.rtt is not None:
                connection = replace(connection, rtt=record.rtt)
        return connection

    async def _connect_path(self, overlay, peer_id: bytes, timeout) -> Connection:
        timeout = overlay.config.request_timeout if timeout is None else timeout
        clock = self.clock
        deadline = clock.seconds() + timeout
        link = overlay.liveness.links.get(peer_id)
        connection = overlay.paths.connection(peer_id)
        if (connection is not None and connection.rtt is not None
                and clock.seconds() - link.last_heard <= self.FRESH_CONTACT):
            return connection
        overlay.paths.establish(peer_id)
        tried = set()
        started = clock.seconds()

        def live() -> Connection | None:
            """A path that answered since we started (relayed, punched, direct)."""
            link = overlay.liveness.links.get(peer_id)
            connection = overlay.paths.connection(peer_id)
            if (connection is not None and connection.rtt is not None and link.verified
                    and link.last_heard >= started):
                return connection
            return None

        def remaining() -> float:
            return max(0.0, deadline - clock.seconds())

        while clock.seconds() < deadline:
            connection = live()
            if connection is not None:
                return connection
            address = overlay.paths.address_of(peer_id)
            if (address is not None and not is_relayed(address)
                    and not overlay.paths.may_reach(peer_id, address)):
                address = None  # behind a filtering NAT: the relay session and the punch
            if address is None or address in tried:
                if peer_id in overlay.relays.pending:
                    # a relay session is being opened: it becomes the
                    # address, or the request is denied or given up
                    await self.wait_until(
                        lambda: live() or peer_id not in overlay.relays.pending,
                        remaining(), kinds=PATH_EVENTS + ("relay_session",))
                    continue
                answers = await overlay.freshness.query(peer_id, overlay.config.contact_max_age)
                fresh = [a.address for a in answers if a.address not in tried
                         and overlay.paths.may_reach(peer_id, a.address)]
                if not fresh:
                    if overlay.relays.can_open(peer_id):
                        # relayed: ask again (a denied or lost request); when
                        # every relay it announces is backing off, nothing
                        # goes out: ask again when the first backoff ends
                        overlay.paths.establish(peer_id)
                        if peer_id not in overlay.relays.pending:
                            retry = overlay.relays.retry_at(peer_id)
                            wait = remaining() if retry is None else retry - clock.seconds()
                            await self.wait_until(live, max(0.0, min(wait, remaining())),
                                                  kinds=PATH_EVENTS)
                        continue
                    break
                address = fresh[0]
                overlay.liveness.connect(peer_id, address)
                overlay.gossip.announce_to(address)
            tried.add(address)
            # a NAT-bound peer's direct address rarely answers: do not hold
            # up the relayed path that is being opened meanwhile
            patience = 0.25 if peer_id in overlay.relays.pending else 1.0
            wait = max(0.1, min(patience, remaining()))
            rtt = await overlay.liveness.ping_and_wait(peer_id, address, wait)
            connection = overlay.paths.connection(peer_id)
            if rtt is not None and connection is not None:
                return connection
            if connection is not None and connection.rtt is not None and connection.endpoint != address:
                return connection  # another path answered meanwhile
        raise ConnectError(f"no path to {peer_id.hex()} within {timeout:g} s",
                           self._attempts(overlay, peer_id, tried))

    @staticmethod
    def _attempts(overlay, peer_id: bytes, tried) -> str:
        """
        What a failed connect tried, for the person reading the error.
        """
        direct = sorted(f"{a[0]}:{a[1]}" for a in tried if not is_relayed(a))
        relays = overlay.relays.announced_relays(peer_id)
        sessions = overlay.relays.sessions.get(peer_id, {})
        metrics = overlay.metrics
        denied = metrics.by_label("relay_denials", "reason")
        parts = [f"direct {', '.join(direct)} unanswered" if direct else "no direct address"]
        if relays:
            parts.append(
                f"{len(relays)} relay(s) announced, {metrics.total('relay_connects')} session"
                f" request(s), {len(sessions)} session(s) open"
                + (f", denials {denied}" if denied else ""))
        else:
            parts.append("it announces no relay")
        punches = overlay.paths.punch_attempts(peer_id)
        if punches:
            parts.append(f"{punches} hole punch(es) tried")
        return "; ".join(parts)

    def wait_direct(self, peer, timeout: float, network=None) -> Deferred:
        """
        Wait up to C{timeout} seconds for the path to C{peer} to be direct
        (its own address or a punched one); fires with the L{Connection}
        then, or with the current one (or None) at the deadline.
        """
        paths = self.overlay(network).paths
        peer_id = self.resolve(peer, network)

        def direct() -> Connection | None:
            connection = paths.connection(peer_id)
            if connection is not None and connection.direct and connection.rtt is not None:
                return connection
            return None

        return self.wait_until(direct, timeout, kinds=PATH_EVENTS,
                               expired=lambda: paths.connection(peer_id))

    def punch_attempts(self, peer, network=None) -> int:
        """
        How many hole punches this node asked for towards C{peer}.
        """
        return self.overlay(network).paths.punch_attempts(self.resolve(peer, network))

    def ping(self, peer, timeout: float = 2.0, network=None) -> Deferred:
        """
        One ping; fires with C{(rtt_seconds_or_None, connection)}.
        """
        return ensureDeferred(self._ping(peer, timeout, network))

    async def _ping(self, peer, timeout, network):
        overlay = self.overlay(network)
        peer_id = self.resolve(peer, network)
        address = overlay.paths.message_address(peer_id)
        if address is None:
            connection = await self._connect(peer, timeout, network)
            address = connection.endpoint
        rtt = await overlay.liveness.ping_and_wait(peer_id, address, timeout)
        return rtt, overlay.paths.connection(peer_id)

    # messages

    def on_channel(self, channel: str, handler, network=None) -> None:
        """
        C{handler(peer_id_bytes, payload)} for messages and requests on
        C{channel}; for a request its return value (bytes or a Deferred of
        bytes) is the response.  None removes it.  One network at a time: a
        role serving every network registers in each of L{networks}.
        """
        self.overlay(network).messaging.on_channel(channel, handler)

    def send(self, peer, channel: str, payload: bytes, network=None) -> None:
        self.overlay(network).messaging.send(self.resolve(peer, network), channel, payload)

    def request(self, peer, channel: str, payload: bytes, timeout: float | None = None,
                network=None, trace_id: bytes | None = None) -> Deferred:
        """
        Fires with the response payload, or fails with RequestTimeout,
        RemoteError or NoRoute (L{omerta.mesh.messaging}).
        """
        return self.overlay(network).messaging.request(
            self.resolve(peer, network), channel, payload, timeout, trace_id
        )

    # waiting and statistics

    def wait_for_peers(self, count: int, timeout: float, network=None) -> Deferred:
        """
        Fires with True once C{count} peers are online, False at the timeout.
        """
        return self.wait_until(
            lambda: len(self.overlay(network).registry.online()) >= count, timeout,
            kinds=REGISTRY_EVENTS)

    def statistics(self, network=None) -> dict:
        """
        Peers by state and capability; live paths by kind (direct, punched,
        relayed); per-peer sessions; bytes and frames in and out (the node's,
        all networks); drops by reason.
        """
        overlay = self.overlay(network)
        metrics = self.metrics
        return {
            "peers": overlay.registry.statistics(),
            "paths": overlay.paths.statistics(),
            "sessions": len(overlay.messaging.sessions),
            "bytes_in": metrics.total("bytes_in"),
            "bytes_out": metrics.total("bytes_out"),
            "frames_in": metrics.total("frames_in"),
            "frames_out": metrics.total("frames_out"),
            "drops": metrics.by_label("drops", "reason"),
        }
