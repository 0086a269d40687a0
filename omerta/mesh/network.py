"""
L{MeshNetwork}: the public face of an omerta node (see docs/api.md).

    mesh = MeshNetwork(data_dir, invites=[link], name="worker-3")
    await mesh.start()
    await mesh.wait_for_peers(1, timeout=10)
    reply = await mesh.request("provider-1", "vm", b"...", timeout=10)

Everything returns Deferreds (usable with C{await} inside
C{ensureDeferred}); nothing blocks the reactor.  Peers are named by peer id
(hex or bytes), a unique id prefix, or a name.  A node in several networks
uses the first one unless C{network=} names another.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater

from omerta.mesh.paths import Connection, is_relayed
from omerta.mesh.registry import PeerRecord, Requirements
from omerta.mesh.service import NodeService


class ConnectError(Exception):
    """
    No path to a peer; C{attempts} says what was tried.
    """

    def __init__(self, message: str, attempts: str = ""):
        super().__init__(f"{message} ({attempts})" if attempts else message)
        self.attempts = attempts


class MeshNetwork:
    """
    @param service: an existing L{NodeService} to wrap; otherwise one is built
        from the keyword arguments (see L{NodeService}).
    """

    FRESH_CONTACT = 2.0
    """
    C{connect} trusts an existing path heard from this recently; older ones
    are confirmed with a ping first.
    """

    def __init__(self, data_dir: Path | None = None, *, service: NodeService | None = None,
                 network: bytes | str | None = None, **options):
        if service is None:
            service = NodeService(data_dir, **options)
        self.service = service
        self.default_network = network

    # lifecycle

    def start(self) -> Deferred:
        self.service.startService()
        return succeed(self)

    def stop(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        result = self.service.stopService()
        if isinstance(result, Deferred):
            await result
        return None

    # identity and state

    @property
    def node(self):
        return self.service.node

    @property
    def clock(self):
        return self.service.reactor

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

    @property
    def events(self):
        """
        Subscribe with C{events.subscribe(kind, callback)}; kinds:
        peer_discovered, peer_connected, peer_suspected, peer_disconnected,
        path_changed, nat_changed.
        """
        return self.service.events

    def overlay(self, network=None):
        return self.node.overlay(network if network is not None else self.default_network)

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

    def peer_info(self, peer, network=None) -> PeerRecord:
        return self.overlay(network).registry.get(self.resolve(peer, network))

    def find_peers(self, requirements: Requirements, max_results: int = 10, network=None):
        return self.overlay(network).registry.find_peers(
            requirements, max_results, now=self.clock.seconds()
        )

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
        while clock.seconds() < deadline:
            link = overlay.liveness.links.get(peer_id)
            connection = overlay.paths.connection(peer_id)
            if (connection is not None and connection.rtt is not None and link.verified
                    and link.last_heard >= started):
                return connection  # a path came up meanwhile (relayed, punched)
            address = overlay.paths.address_of(peer_id)
            if address is None or address in tried:
                if peer_id in overlay.relays.pending:
                    # a relay session is being opened: it becomes the address
                    await _sleep(clock, 0.05)
                    continue
                answers = await overlay.freshness.query(peer_id, overlay.config.contact_max_age)
                fresh = [a.address for a in answers if a.address not in tried]
                if not fresh:
                    if overlay.relays.can_open(peer_id):
                        # relayed: ask again (a denied or lost request)
                        overlay.paths.establish(peer_id)
                        await _sleep(clock, 0.2)
                        continue
                    break
                address = fresh[0]
                overlay.liveness.connect(peer_id, address)
                overlay.gossip.announce_to(address)
            tried.add(address)
            # a NAT-bound peer's direct address rarely answers: do not hold
            # up the relayed path that is being opened meanwhile
            patience = 0.25 if peer_id in overlay.relays.pending else 1.0
            wait = max(0.1, min(patience, deadline - clock.seconds()))
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
        return ensureDeferred(self._wait_direct(peer, timeout, network))

    async def _wait_direct(self, peer, timeout, network):
        overlay = self.overlay(network)
        peer_id = self.resolve(peer, network)
        deadline = self.clock.seconds() + timeout
        while True:
            connection = overlay.paths.connection(peer_id)
            if connection is not None and connection.direct and connection.rtt is not None:
                return connection
            if self.clock.seconds() >= deadline:
                return connection
            await _sleep(self.clock, 0.05)

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
        address = overlay.paths.address_of(peer_id)
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
        bytes) is the response.
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
        return ensureDeferred(self._wait(
            lambda: len(self.overlay(network).registry.online()) >= count, timeout))

    async def _wait(self, predicate, timeout: float, interval: float = 0.05) -> bool:
        from twisted.internet.task import deferLater

        deadline = self.clock.seconds() + timeout
        while not predicate():
            if self.clock.seconds() >= deadline:
                return False
            await deferLater(self.clock, interval, lambda: None)
        return True

    def statistics(self, network=None) -> dict:
        overlay = self.overlay(network)
        metrics = self.service.metrics
        links = overlay.liveness.links.values()
        return {
            "peers": overlay.registry.statistics(),
            "paths": {"direct": sum(1 for l in links if l.suspected_at is None), "relayed": 0},
            "bytes_in": metrics.total("bytes_in"),
            "bytes_out": metrics.total("bytes_out"),
            "frames_in": metrics.total("frames_in"),
            "frames_out": metrics.total("frames_out"),
            "drops": metrics.by_label("drops", "reason"),
        }


def _sleep(clock, seconds: float) -> Deferred:
    return deferLater(clock, seconds, lambda: None)
