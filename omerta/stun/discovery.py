"""
NAT behaviour discovery (RFC 5780 §4) and the classic NAT type.

With a server that has an alternate address (OTHER-ADDRESS in its answer):

1. Test I: Binding to the primary address P -> mapped address M1 and the
   alternate address A.  No answer from any server: UDP is blocked.  M1 equal
   to the local address: there is no NAT.
2. Filtering first, before anything is sent to A, so no earlier packet has
   opened the NAT's filter for A, and from a fresh probe socket when the
   caller can open one (it binds to P first), so the answers that arrive
   unasked leave nothing on the main socket's mapping:
   - ask P to answer from A's IP and port (CHANGE-REQUEST ip+port): an answer
     means endpoint-independent filtering;
   - else ask P to answer from P's IP but A's port (CHANGE-REQUEST port): an
     answer means address-dependent filtering, silence address-and-port-
     dependent.
3. Mapping: Binding to (A.ip, P.port) -> M2; M2 == M1 is endpoint-
   independent; else Binding to (A.ip, A.port) -> M3; M3 == M2 is address-
   dependent, otherwise address-and-port-dependent.  From another fresh
   probe socket when there is one (with its own M1): what reached the NAT
   for the main socket's port before (peers' probes) cannot change it.
4. Hairpin: a Binding request sent to our own mapped address; it counts if it
   comes back to our socket (RFC 5780 §4.5).
5. Mapping lifetime (optional, needs extra sockets and time): a fresh socket X
   makes a mapping, stays silent T seconds, then our main socket asks the
   server (RESPONSE-PORT) to answer to X's mapped port; X hearing it means the
   mapping outlived T.  T doubles until the mapping is gone, then a binary
   search narrows the bound, all within a time budget.

With only single-address servers the node compares the mappings two servers
see: equal means endpoint-independent mapping, different means dependent
(symmetric); filtering then stays unknown.

Classic types: no NAT -> public; EI mapping with EI / AD / APD filtering ->
full cone / restricted cone / port-restricted cone; dependent mapping ->
symmetric; no answer -> blocked.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Callable

from twisted.internet.task import deferLater
from twisted.logger import Logger

from omerta.stun.client import (
    RFC8489,
    BindingResult,
    Retransmission,
    StunClient,
    StunErrorResponse,
    StunTimeout,
)
from omerta.wire.messages import NatType

Address = tuple[str, int]

NEGATIVE_TEST = Retransmission(rto=0.5, rc=3, rm=4)
"""
Timers for tests where silence is an answer (filtering, hairpin, lifetime):
requests at 0, 0.5 and 1.5 s, verdict at 3.5 s.
"""


class Behaviour(str, enum.Enum):
    NO_NAT = "no-nat"
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    DEPENDENT = "dependent"
    UNKNOWN = "unknown"


CLASSIC_NAMES = {
    NatType.PUBLIC: "public",
    NatType.FULL_CONE: "full cone",
    NatType.RESTRICTED_CONE: "restricted cone",
    NatType.PORT_RESTRICTED_CONE: "port-restricted cone",
    NatType.SYMMETRIC: "symmetric",
    NatType.BLOCKED: "blocked",
    NatType.UNKNOWN: "unknown",
}


def classify(mapping: Behaviour, filtering: Behaviour) -> NatType:
    """
    The classic NAT type for an RFC 5780 mapping and filtering behaviour.
    """
    if mapping is Behaviour.NO_NAT:
        return NatType.PUBLIC
    if mapping in (Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT,
                   Behaviour.DEPENDENT):
        return NatType.SYMMETRIC
    if mapping is Behaviour.ENDPOINT_INDEPENDENT:
        return {
            Behaviour.ENDPOINT_INDEPENDENT: NatType.FULL_CONE,
            Behaviour.ADDRESS_DEPENDENT: NatType.RESTRICTED_CONE,
            Behaviour.ADDRESS_AND_PORT_DEPENDENT: NatType.PORT_RESTRICTED_CONE,
        }.get(filtering, NatType.UNKNOWN)
    return NatType.UNKNOWN


@dataclass
class Lifetime:
    """
    The mapping outlived C{alive} seconds of silence and did not outlive
    C{dead} (None: never seen to expire within the budget).
    """

    alive: float
    dead: float | None
    probes: int


@dataclass
class NatReport:
    mapped: Address | None
    local: Address | None
    mapping: Behaviour
    filtering: Behaviour
    nat_type: NatType
    rfc5780: bool
    servers: list[Address]
    hairpin: bool | None = None
    lifetime: Lifetime | None = None
    duration: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: NATs between the host and the internet (L{omerta.stun.hops}), when measured
    nat_hops: int | None = None

    @property
    def classic(self) -> str:
        return CLASSIC_NAMES[self.nat_type]

    def as_dict(self) -> dict:
        document = asdict(self)
        document["mapped"] = _text(self.mapped)
        document["local"] = _text(self.local)
        document["servers"] = [_text(s) for s in self.servers]
        document["mapping"] = self.mapping.value
        document["filtering"] = self.filtering.value
        document["nat_type"] = self.nat_type.name.lower()
        document["classic"] = self.classic
        return document


def _text(address: Address | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


ProbeSocket = tuple[StunClient, Callable[[], object]]


class Discovery:
    """
    Runs the tests above with one L{StunClient} (the socket under test).

    @param local: the socket's own address, to recognise "no NAT"; None if
        bound to a wildcard (then a mapped address equal to one of the host's
        addresses cannot be recognised and "no NAT" is not reported).
    @param open_probe_socket: for the filtering tests and lifetime
        measurement: called with the main client, opens a fresh socket and
        returns a L{StunClient.sibling} of the main client bound to it, and
        a function that closes it.
    """

    log = Logger()

    def __init__(
        self,
        client: StunClient,
        clock,
        *,
        local: Address | None = None,
        policy: Retransmission = RFC8489,
        negative: Retransmission = NEGATIVE_TEST,
        open_probe_socket: Callable[[], ProbeSocket] | None = None,
    ):
        self.client = client
        self.clock = clock
        self.local = local
        self.policy = policy
        self.negative = negative
        self.open_probe_socket = open_probe_socket

    async def _binding(self, server: Address, policy: Retransmission | None = None, **kw):
        return await self.client.binding(server, policy=policy or self.policy, **kw)

    async def _answers(self, server: Address, client: StunClient | None = None,
                       **kw) -> BindingResult | None:
        try:
            return await (client or self.client).binding(server, policy=self.negative, **kw)
        except StunTimeout:
            return None

    async def run(
        self,
        servers: list[Address],
        *,
        hairpin: bool = True,
        lifetime_budget: float = 0.0,
    ) -> NatReport:
        started = self.clock.seconds()
        report = await self._behaviour(servers)
        if hairpin and report.mapped is not None and report.mapping is not Behaviour.NO_NAT:
            result = await self._answers(report.mapped, accept_from=report.mapped)
            report.hairpin = result is not None
        if lifetime_budget > 0 and report.mapped is not None and report.rfc5780:
            if self.open_probe_socket is None:
                report.notes.append("lifetime not measured: no way to open probe sockets")
            else:
                report.lifetime = await self.measure_lifetime(report.servers[0], lifetime_budget)
        report.duration = self.clock.seconds() - started
        return report

    async def _first_answer(self, servers: list[Address], notes: list[str]):
        for server in servers:
            try:
                return server, await self._binding(server)
            except StunTimeout as e:
                notes.append(str(e))
            except StunErrorResponse as e:
                notes.append(f"{_text(server)}: {e}")
        return None, None

    async def _behaviour(self, servers: list[Address]) -> NatReport:
        notes: list[str] = []
        server, first = await self._first_answer(servers, notes)
        if first is None:
            return NatReport(None, self.local, Behaviour.UNKNOWN, Behaviour.UNKNOWN,
                             NatType.BLOCKED, False, list(servers), notes=notes)
        no_nat = self.local is not None and first.mapped == self.local
        other = first.other
        if other is not None and other[0] != server[0] and other[1] != server[1]:
            filtering = await self._filtering(server, other)
            mapping = Behaviour.NO_NAT if no_nat else await self._mapping(server, other, first)
            rfc5780 = True
        else:
            if other is not None:
                notes.append(f"OTHER-ADDRESS {_text(other)} does not differ in both IP and port")
            filtering = Behaviour.UNKNOWN
            rfc5780 = False
            mapping = Behaviour.NO_NAT if no_nat else await self._mapping_two_servers(
                server, first, [s for s in servers if s != server], notes
            )
        report = NatReport(first.mapped, self.local, mapping, filtering,
                           classify(mapping, filtering), rfc5780, [server], notes=notes)
        return report

    async def _filtering(self, server: Address, other: Address) -> Behaviour:
        client, close = self.client, None
        if self.open_probe_socket is not None:
            # A fresh socket that has sent to the server only: the answers
            # this test asks for come unasked to its mapping, not to the
            # main socket's (a router without an input filter keeps a
            # conntrack entry for each, which would move the main
            # socket's mapping towards those addresses later).
            client, close = self.open_probe_socket(self.client)
            try:
                await client.binding(server, policy=self.policy)
            except (StunTimeout, StunErrorResponse):
                close()
                client, close = self.client, None
        try:
            if await self._answers(server, client, change_ip=True, change_port=True,
                                   accept_from=other):
                return Behaviour.ENDPOINT_INDEPENDENT
            if await self._answers(server, client, change_port=True,
                                   accept_from=(server[0], other[1])):
                return Behaviour.ADDRESS_DEPENDENT
            return Behaviour.ADDRESS_AND_PORT_DEPENDENT
        finally:
            if close is not None:
                close()

    async def _mapping(self, server: Address, other: Address, first: BindingResult) -> Behaviour:
        client, close = self.client, None
        if self.open_probe_socket is not None:
            # A fresh socket, so that nothing that reached the NAT for the
            # main socket's port before (peers' probes; on a router without
            # an input filter each leaves a conntrack entry that moves the
            # mapping towards its sender) changes what this test sees.
            client, close = self.open_probe_socket(self.client)
            try:
                first = await client.binding(server, policy=self.policy)
            except (StunTimeout, StunErrorResponse):
                close()
                client, close = self.client, None
        try:
            second = await client.binding((other[0], server[1]), policy=self.policy)
            if second.mapped == first.mapped:
                return Behaviour.ENDPOINT_INDEPENDENT
            third = await client.binding(other, policy=self.policy)
            if third.mapped == second.mapped:
                return Behaviour.ADDRESS_DEPENDENT
            return Behaviour.ADDRESS_AND_PORT_DEPENDENT
        finally:
            if close is not None:
                close()

    async def _mapping_two_servers(self, server, first, others, notes) -> Behaviour:
        for candidate in others:
            if candidate[0] == server[0]:
                continue
            try:
                second = await self._binding(candidate)
            except (StunTimeout, StunErrorResponse) as e:
                notes.append(f"{_text(candidate)}: {e}")
                continue
            notes.append(
                f"no RFC 5780 server: compared the mappings seen by {_text(server)}"
                f" and {_text(candidate)}; filtering not tested"
            )
            if second.mapped == first.mapped:
                return Behaviour.ENDPOINT_INDEPENDENT
            return Behaviour.DEPENDENT
        notes.append("one single-address server only: mapping behaviour not testable")
        return Behaviour.UNKNOWN

    async def measure_lifetime(
        self, server: Address, budget: float, first: float = 2.0, resolution: float = 1.0
    ) -> Lifetime:
        """
        Bound the mapping lifetime within C{budget} seconds (see module doc).
        """
        deadline = self.clock.seconds() + budget
        alive, dead, probes = 0.0, None, 0
        wait = first
        while True:
            if dead is not None:
                if dead - alive <= resolution:
                    break
                wait = (alive + dead) / 2
            needed = wait + self.negative.schedule()[-1] + 2 * self.policy.rto
            if self.clock.seconds() + needed > deadline:
                break
            probes += 1
            if await self._survives(server, wait):
                alive = wait
                if dead is None:
                    wait *= 2
            else:
                dead = wait
        return Lifetime(alive, dead, probes)

    async def _survives(self, server: Address, silence: float) -> bool:
        client, close = self.open_probe_socket(self.client)
        try:
            created = await client.binding(server, policy=self.policy)
            await deferLater(self.clock, silence, lambda: None)
            # Sent from the main socket, answered to the probe socket's
            # mapping: the shared transaction table lets either complete it.
            answer = await self._answers(
                server, response_port=created.mapped[1], accept_from=server
            )
            return answer is not None
        finally:
            close()
