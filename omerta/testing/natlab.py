"""
A NAT lab of Linux network namespaces: real kernels, real sockets, real NAT.

A L{Lab} builds a small internet out of network namespaces joined by veth
pairs: a switch namespace with a bridge standing for the public internet
(documentation range 198.51.100.0/24), a STUN-style server with two public
addresses, NAT routers (nftables masquerade plus a few rules per NAT type),
each with a private LAN 10.99.N.0/24, and hosts behind the routers or
directly on the public segment::

    with Lab() as lab:                       # up() on enter, down() on exit
        server = lab.add_server("server")    # 198.51.100.10 and .11
        nat = lab.add_nat("nat1", "symmetric", loss=5)
        alice = lab.add_host("alice", behind=nat)   # 10.99.1.2
        bob = lab.add_host("bob")                   # public, NAT type "none"
        lab.run(alice, ["ping", "-c1", server.address])

Nothing the lab creates touches the host's own network namespace: every
veth end lives inside a lab namespace and no lab namespace has a route out
of the lab, so no packet can leave it.  Namespaces are named
C{PREFIX-PID-RAND-NODE} so that labs running at the same time never collide
and L{cleanup_stale} can tell the leftovers of a crashed run (its PID is
gone) from a lab still in use.

Building uses pyroute2 (namespaces, links, addresses, routes and sysctls);
nftables rule sets are loaded with C{ip netns exec ROUTER nft -f FILE},
conntrack is flushed with C{conntrack -F}.  Everything here needs root and
the C{ip}, C{nft} and C{conntrack} tools: see L{check_environment}.
See docs/natlab.md for the rule sets and why they give each NAT type.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omerta.storage import pid_alive

NAT_TYPES = ("none", "full-cone", "restricted-cone", "port-restricted", "symmetric")
DEFAULT_PREFIX = "omlab"
DEFAULT_PUBLIC_NET = "198.51.100.0/24"
DEFAULT_SERVER_ADDRESSES = ("198.51.100.10", "198.51.100.11")
#: Where detached labs (the C{natlab} CLI's) record themselves.
STATE_DIR = Path("/run/omerta-natlab")
REQUIRED_TOOLS = ("ip", "nft", "conntrack")

# Interface names inside the namespaces (they are per namespace, so short
# fixed names are safe).
SWITCH_BRIDGE = "br0"
ROUTER_OUTSIDE = "nout"
ROUTER_INSIDE = "nin"
HOST_IF = "eth0"
ISP_UP = "iup"
ISP_DOWN = "idown"
NFT_TABLE = "natlab"
#: How long a mapping lives without traffic, by default: the cone map and
#: set entries, and the kernel's UDP conntrack "stream" timeout, which the
#: router sets to the same value.
MAPPING_TIMEOUT = 120
#: The outside port ranges L{Lab.remap} moves a router to, in turn.
REMAP_PORTS = ("20000-29999", "40000-49999")

_NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,15}$")
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")
_NETNS_DIR = Path("/var/run/netns")


class LabError(Exception):
    """
    The lab cannot be built or used; the message says what to do.
    """


def check_environment() -> list[str]:
    """
    @return: what keeps a lab from running here (root, tools), one sentence
        each; empty when a lab can be built.
    """
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root: network namespaces and nftables need it")
    for tool in REQUIRED_TOOLS:
        if shutil.which(tool) is None:
            package = {"ip": "iproute2", "nft": "nftables"}.get(tool, tool)
            problems.append(f"needs '{tool}': install the Debian package {package}")
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        problems.append("needs pyroute2: pip install pyroute2")
    return problems


def _require_environment() -> None:
    problems = check_environment()
    if problems:
        raise LabError("NAT lab unavailable: " + "; ".join(problems))


def list_namespaces() -> list[str]:
    """
    @return: the names of all named network namespaces (C{ip netns list}).
    """
    try:
        return sorted(os.listdir(_NETNS_DIR))
    except FileNotFoundError:
        return []


def _tag_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^({re.escape(prefix)}-(\d+)-([0-9a-f]{{4}}))-")


def namespace_pids(ns: str, comm: str | None = None) -> list[int]:
    """
    @return: the processes whose network namespace is C{ns} (only those
        whose command name is C{comm}, when given).
    """
    try:
        target = os.stat(_NETNS_DIR / ns)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
            if comm is not None and Path(f"/proc/{entry}/comm").read_text().strip() != comm:
                continue
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def _kill_namespace_processes(namespaces: Iterable[str], grace: float = 2.0) -> None:
    """
    SIGTERM every process inside C{namespaces}, SIGKILL those still there
    after C{grace} seconds.  Only lab namespaces are ever passed here, and
    only the lab starts processes in them.
    """
    namespaces = list(namespaces)
    pids = [pid for ns in namespaces for pid in namespace_pids(ns)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if pid_alive(pid) and not _is_zombie(pid)]
        if pids:
            time.sleep(0.02)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _remove_namespaces(namespaces: Iterable[str]) -> list[str]:
    from pyroute2 import netns

    existing = set(list_namespaces())
    namespaces = [ns for ns in namespaces if ns in existing]
    _kill_namespace_processes(namespaces)
    removed = []
    for ns in namespaces:
        try:
            netns.remove(ns)
        except FileNotFoundError:
            continue
        removed.append(ns)
    return removed


def poll_until(predicate, timeout: float, what: str, describe=None, interval: float = 0.1,
               error: type[Exception] = LabError):
    """
    Call C{predicate} every C{interval} seconds until it returns something
    true (returned) or C{timeout} seconds pass: then raise C{error} naming
    C{what}, plus C{describe()}.  For state outside this process (processes,
    namespaces, links) that nothing announces.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe else ""
            raise error(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


def wait_for_line(proc: subprocess.Popen, predicate, timeout: float, what: str = "") -> str:
    """
    Read C{proc}'s stdout (a pipe) line by line until C{predicate(line)} is
    true for one, and return that line (text, without the newline).  Lines
    after it stay buffered for the next call.

    @raise LabError: the process exits or C{timeout} seconds pass first; the
        message has the output read so far.
    """
    fd = proc.stdout.fileno()
    state = _pipe_state.setdefault(proc, {"buffer": b"", "lines": []})
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            while b"\n" in state["buffer"]:
                raw, state["buffer"] = state["buffer"].split(b"\n", 1)
                line = raw.decode(errors="replace").rstrip("\r")
                state["lines"].append(line)
                if predicate(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"no {what or 'expected line'} within {timeout} s"
                break
            if selector.select(left):
                chunk = os.read(fd, 65536)
                if not chunk:
                    problem = f"process exited ({proc.wait()}) before {what or 'the expected line'}"
                    break
                state["buffer"] += chunk
    output = "\n".join(state["lines"][-40:] + [state["buffer"].decode(errors="replace")])
    raise LabError(f"{' '.join(map(str, proc.args))}: {problem}; output:\n{output}")


_pipe_state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_path(tag: str) -> Path:
    return STATE_DIR / f"{tag}.json"


def cleanup_stale(prefix: str = DEFAULT_PREFIX, include_detached: bool = False) -> list[str]:
    """
    Remove the namespaces (and with them their veths, bridges and nftables
    rules) of labs with this prefix whose creating process is gone, killing
    any process still running inside them.  Labs of live processes are kept,
    and so are detached labs (the CLI's, which outlive their process) unless
    C{include_detached}.

    @return: the namespace names removed.
    """
    pattern = _tag_pattern(prefix)
    doomed = []
    for ns in list_namespaces():
        match = pattern.match(ns)
        if match is None:
            continue
        tag, pid = match.group(1), int(match.group(2))
        if _state_path(tag).exists():
            if not include_detached:
                continue
        elif pid_alive(pid):
            continue
        doomed.append(ns)
    removed = _remove_namespaces(doomed)
    if include_detached:
        for path in STATE_DIR.glob(f"{prefix}-*.json"):
            if pattern.match(path.stem + "-"):
                path.unlink(missing_ok=True)
    return removed


def detached_labs(prefix: str | None = None) -> list[dict]:
    """
    @return: the descriptions (L{Lab.describe}) that detached labs wrote to
        L{STATE_DIR}, optionally only those with C{prefix}.
    """
    labs = []
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if prefix is None or state.get("prefix") == prefix:
            labs.append(state)
    return labs


def remove_detached(state: dict) -> list[str]:
    """
    Tear down a detached lab from its state (see L{detached_labs}).

    @return: the namespace names removed.
    """
    removed = _remove_namespaces(node["ns"] for node in state["nodes"].values())
    removed += _remove_namespaces([state["switch"]])
    _state_path(state["tag"]).unlink(missing_ok=True)
    return removed


@dataclass(eq=False)
class Node:
    """
    One namespace of the lab.

    @ivar name: the name given to C{add_*}.
    @ivar ns: the network namespace's name (for C{ip netns exec}).
    @ivar addresses: the addresses of its main interface (the router's
        outside one), first is L{address}.
    @ivar public_address: where it appears from the public segment: its own
        address, or its router's for a host behind a NAT.
    """

    name: str
    ns: str
    kind: str
    addresses: list[str]
    public_address: str
    built: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return self.addresses[0]


@dataclass(eq=False)
class Router(Node):
    """
    A NAT router: outside interface C{nout} on the public segment, inside
    bridge C{nin} (address L{lan_address}) for its hosts' LAN.
    """

    nat_type: str = "port-restricted"
    loss: int = 0
    lan: ipaddress.IPv4Network | None = None
    lan_address: str = ""
    hosts: list[Host] = field(default_factory=list)
    #: Drop unsolicited UDP to the router's own address (a home router's
    #: firewall); without it such a datagram leaves a conntrack entry on the
    #: router (see docs/natlab.md, "Router variants").
    input_filter: bool = True
    #: Seconds a mapping lives without traffic once both sides have sent.
    mapping_timeout: int = 120
    #: The router whose LAN this router's outside interface is on (double
    #: NAT), or None when it is on the public segment.
    upstream: Router | None = None
    #: The ISP router between its outside interface and the public segment
    #: (a namespace that only routes: one router hop, as on a real path to
    #: any other customer), or None when the router is on the segment itself.
    isp: Node | None = None
    #: How many times L{Lab.remap} moved its outside ports.
    remaps: int = 0

    @property
    def outside_address(self) -> str:
        """The address of the outside interface (public, or on the upstream LAN)."""
        return self.addresses[0]


@dataclass(eq=False)
class Host(Node):
    """
    A host: on the public segment (C{router} is None, NAT type "none") or
    on a router's LAN with a default route via the router.
    """

    router: Router | None = None

    @property
    def nat_type(self) -> str:
        return "none" if self.router is None else self.router.nat_type


def nft_ruleset(nat_type: str, public_address: str, loss: int = 0, input_filter: bool = True,
                mapping_timeout: int = 120) -> str:
    """
    The nftables rule set (for C{nft -f}) that makes a router namespace
    behave as a NAT of C{nat_type}, with C{loss} percent random drop of
    forwarded packets, dropping unsolicited UDP to the router itself when
    C{input_filter}, its cone mappings living C{mapping_timeout} seconds.
    Outside interface C{nout} with address C{public_address}; see
    docs/natlab.md.
    """
    if nat_type not in NAT_TYPES or nat_type == "none":
        raise ValueError(f"no router rule set for NAT type {nat_type!r}")
    masquerade = _masquerade(nat_type)
    cone = nat_type in ("full-cone", "restricted-cone")
    lines = [
        f"table ip {NFT_TABLE} {{",
    ]
    if cone:
        lines += [
            "    # outside port -> inside address and port, learnt from outgoing UDP",
            "    map fc {",
            "        type inet_service : ipv4_addr . inet_service",
            f"        flags dynamic,timeout; timeout {mapping_timeout}s;",
            "    }",
        ]
    if nat_type == "restricted-cone":
        lines += [
            "    # (remote address, outside port) pairs a host has sent to",
            "    set contacted {",
            "        type ipv4_addr . inet_service",
            f"        flags dynamic,timeout; timeout {mapping_timeout}s;",
            "    }",
        ]
    if input_filter:
        lines += [
            "    # Like a home router's firewall: nothing unsolicited reaches the",
            "    # router itself.  (Otherwise a punch probe that arrives before the",
            "    # host behind has sent leaves a conntrack entry for the router's own",
            "    # port, and masquerade moves the host's mapping off that tuple.)",
            "    chain input {",
            "        type filter hook input priority filter; policy accept;",
            f'        iifname "{ROUTER_OUTSIDE}" meta l4proto udp ct state new drop',
            "    }",
        ]
    lines += [
        "    chain loss {",
        "    }",
        "    chain forward {",
        "        type filter hook forward priority filter; policy accept;",
        "        jump loss",
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        f'        oifname "{ROUTER_OUTSIDE}" {masquerade}',
        "    }",
    ]
    if cone:
        learn = [
            f'        oifname "{ROUTER_OUTSIDE}" meta l4proto udp'
            " update @fc { udp sport : ct original ip saddr . ct original proto-src }",
        ]
        if nat_type == "restricted-cone":
            learn.append(
                f'        oifname "{ROUTER_OUTSIDE}" meta l4proto udp'
                " update @contacted { ip daddr . udp sport }"
            )
        lines += [
            "    # after masquerade: udp sport is the outside port",
            "    chain learn {",
            "        type filter hook postrouting priority srcnat + 10; policy accept;",
            *learn,
            "    }",
            "    chain prerouting {",
            "        type nat hook prerouting priority dstnat; policy accept;",
            f'        iifname "{ROUTER_OUTSIDE}" ip daddr {public_address} meta l4proto udp'
            " ct state new dnat ip to udp dport map @fc",
            "    }",
        ]
    if nat_type == "restricted-cone":
        lines += [
            "    chain restrict {",
            "        type filter hook prerouting priority dstnat - 10; policy accept;",
            f'        iifname "{ROUTER_OUTSIDE}" meta l4proto udp ct state new'
            " ip saddr . udp dport != @contacted drop",
            "    }",
        ]
    lines.append("}")
    lines += _loss_rules(loss)
    return "\n".join(lines) + "\n"


def _masquerade(nat_type: str, ports: str | None = None) -> str:
    """
    The masquerade statement of a router of C{nat_type}: keeping the host's
    port where it can (a random one for a symmetric NAT), or for UDP a port
    from C{ports} ("LOW-HIGH").
    """
    statement = "masquerade" if ports is None else f"meta l4proto udp masquerade to :{ports}"
    return statement + " random" if nat_type == "symmetric" else statement


def _loss_rules(loss: int) -> list[str]:
    lines = [f"flush chain ip {NFT_TABLE} loss"]
    if loss > 0:
        lines.append(f"add rule ip {NFT_TABLE} loss numgen random mod 100 < {loss} counter drop")
    return lines


def _check_loss(loss: int) -> int:
    if not isinstance(loss, int) or not 0 <= loss <= 100:
        raise ValueError(f"loss must be an integer percentage 0..100, not {loss!r}")
    return loss


class Lab:
    """
    A topology of network namespaces; see the module docstring.

    C{add_server}, C{add_nat} and C{add_host} describe nodes (and build them
    at once when the lab is already up); L{up} builds, L{down} removes every
    namespace the lab made, kills the processes left in them, and removes
    stale namespaces of crashed earlier runs with the same prefix.  As a
    context manager the lab is up inside the C{with} block.
    """

    def __init__(
        self,
        name_prefix: str = DEFAULT_PREFIX,
        public_net: str = DEFAULT_PUBLIC_NET,
    ):
        if not _PREFIX.match(name_prefix):
            raise ValueError(
                f"name_prefix {name_prefix!r}: use a letter then up to 15 letters, digits or '_'"
            )
        self.prefix = name_prefix
        self.tag = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self.public_net = ipaddress.IPv4Network(public_net)
        self.switch_ns = f"{self.tag}-switch"
        self.nodes: dict[str, Node] = {}
        self.workdir: Path | None = None
        self.is_up = False
        self.detached = False
        self._processes: list[subprocess.Popen] = []
        self._ports = 0

    # -- describing the topology ------------------------------------------

    @property
    def routers(self) -> list[Router]:
        return [n for n in self.nodes.values() if isinstance(n, Router)]

    @property
    def hosts(self) -> list[Host]:
        return [n for n in self.nodes.values() if isinstance(n, Host)]

    @property
    def servers(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == "server"]

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r} in this lab (have {', '.join(self.nodes)})") from None

    def _new_name(self, name: str) -> str:
        if not _NODE_NAME.match(name):
            raise ValueError(
                f"node name {name!r}: use a lowercase letter or digit then up to 15"
                " lowercase letters, digits or '_'"
            )
        if name in self.nodes or name == "switch":
            raise ValueError(f"node name {name!r} is already used")
        return f"{self.tag}-{name}"

    def _taken(self) -> set[str]:
        return {a for n in self.nodes.values() for a in n.addresses}

    def _public(self, address: str | None, start: int, also_taken: Iterable[str] = ()) -> str:
        taken = self._taken() | set(also_taken)
        if address is not None:
            if ipaddress.IPv4Address(address) not in self.public_net:
                raise ValueError(f"{address} is not in the lab's public net {self.public_net}")
            if address in taken:
                raise ValueError(f"{address} is already used in this lab")
            return address
        hosts = list(self.public_net.hosts())
        for candidate in hosts[start - 1 :] + hosts[: start - 1]:
            if str(candidate) not in taken:
                return str(candidate)
        raise LabError(f"no free address left in {self.public_net}")

    def add_server(self, name: str, addresses: Sequence[str] = DEFAULT_SERVER_ADDRESSES) -> Node:
        """
        A namespace on the public segment with several addresses (two for an
        RFC 5780 STUN server).
        """
        ns = self._new_name(name)
        addresses = [self._public(a, 10) for a in addresses] if addresses else []
        if not addresses or len(set(addresses)) != len(addresses):
            raise ValueError("a server needs one or more distinct addresses")
        node = Node(name, ns, "server", addresses, addresses[0])
        return self._added(node)

    def add_nat(
        self, name: str, nat_type: str, loss: int = 0, public_address: str | None = None,
        behind: Router | None = None, input_filter: bool = True,
        mapping_timeout: int = MAPPING_TIMEOUT, isp: bool = False,
    ) -> Router:
        """
        A NAT router of C{nat_type} (one of L{NAT_TYPES} except "none": a
        host without NAT is C{add_host(name)}), dropping C{loss} percent of
        the packets it forwards.  Its LAN is 10.99.N.0/24 for the N-th
        router, router at .1.  Its outside interface is on the public
        segment, or on the LAN of router C{behind} (double NAT, as behind a
        carrier-grade NAT).  C{input_filter} and C{mapping_timeout}: see
        L{Router}.  With C{isp}, a router on the public segment reaches it
        through an ISP router of its own (node C{NAME_isp}, public address
        from .200): it keeps its public address, and every packet between it
        and anyone else crosses one router hop more (see docs/natlab.md,
        "ISP hop").
        """
        if nat_type == "none":
            raise ValueError('NAT type "none" has no router: use add_host(name) (behind=None)')
        if nat_type not in NAT_TYPES:
            raise ValueError(f"unknown NAT type {nat_type!r}; choose from {', '.join(NAT_TYPES)}")
        ns = self._new_name(name)
        index = len(self.routers) + 1
        if index > 254:
            raise LabError("at most 254 routers per lab")
        if not isinstance(mapping_timeout, int) or not 5 <= mapping_timeout <= 3600:
            raise ValueError(f"mapping_timeout must be 5..3600 s, not {mapping_timeout!r}")
        lan = ipaddress.IPv4Network(f"10.99.{index}.0/24")
        if isp and behind is not None:
            raise ValueError("a router behind another reaches the public segment through it,"
                             " not through an ISP router")
        hop = None
        if behind is None:
            address = self._public(public_address, 1)
            public = address
            if isp:
                hop_name = f"{name}_isp"
                hop_address = self._public(None, 200, also_taken=[address])
                hop = Node(hop_name, self._new_name(hop_name), "isp", [hop_address], hop_address)
        else:
            if public_address is not None:
                raise ValueError("a router behind another takes its public address from it")
            address = self._lan_address(behind)
            public = behind.public_address
        router = Router(
            name, ns, "router", [address], public,
            nat_type=nat_type, loss=_check_loss(loss), lan=lan, lan_address=str(lan[1]),
            input_filter=bool(input_filter), mapping_timeout=mapping_timeout, upstream=behind,
            isp=hop,
        )
        if hop is not None:
            self.nodes[hop.name] = hop  # built with its router
        return self._added(router)

    def _lan_address(self, router: Router, address: str | None = None) -> str:
        """The next free address on C{router}'s LAN, or C{address} if free there."""
        if not isinstance(router, Router) or self.nodes.get(router.name) is not router:
            raise ValueError(f"{router!r} is not a router of this lab")
        taken = self._taken()
        if address is None:
            free = [str(a) for a in router.lan.hosts()
                    if str(a) not in taken and str(a) != router.lan_address]
            if not free:
                raise LabError(f"no free address left in {router.lan}")
            return free[0]
        if ipaddress.IPv4Address(address) not in router.lan or address in taken:
            raise ValueError(f"{address} is not a free address in {router.lan}")
        return address

    def add_host(self, name: str, behind: Router | None = None, address: str | None = None) -> Host:
        """
        A host on C{behind}'s LAN (next free address from .2), or on the
        public segment (from .100) when C{behind} is None.
        """
        ns = self._new_name(name)
        if behind is None:
            addr = self._public(address, 100)
            host = Host(name, ns, "host", [addr], addr)
        else:
            address = self._lan_address(behind, address)
            host = Host(name, ns, "host", [address], behind.public_address, router=behind)
            behind.hosts.append(host)
        return self._added(host)

    def _added(self, node: Node) -> Node:
        self.nodes[node.name] = node
        if self.is_up:
            self._build(node)
        return node

    # -- building and tearing down ------------------------------------------

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Lab:
        """
        Build every node not built yet (the switch namespace first).
        Removes stale namespaces of crashed runs with the same prefix first.
        On failure, removes what it made and raises.
        """
        _require_environment()
        try:
            if not self.is_up:
                cleanup_stale(self.prefix)
                self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
                self._create_ns(self.switch_ns)
                with self._ipr(self.switch_ns) as ipr:
                    ipr.link("add", ifname=SWITCH_BRIDGE, kind="bridge")
                    ipr.link("set", index=ipr.link_lookup(ifname=SWITCH_BRIDGE)[0], state="up")
                self.is_up = True
            order = sorted(self.nodes.values(), key=lambda n: 0 if isinstance(n, Router) else 1)
            for node in order:
                if not node.built:
                    self._build(node)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """
        Remove everything this lab made (idempotent): stop the processes it
        started (then any other left in its namespaces), delete its
        namespaces (which deletes their veths, bridges and rules), and
        clean up stale namespaces of crashed runs with the same prefix.
        """
        for proc in self._processes:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 2
        for proc in self._processes:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._processes.clear()
        mine = [n.ns for n in self.nodes.values()] + [self.switch_ns]
        _remove_namespaces(mine)
        for node in self.nodes.values():
            node.built = False
        if self.detached:
            _state_path(self.tag).unlink(missing_ok=True)
            self.detached = False
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self.is_up = False
        if not check_environment():
            cleanup_stale(self.prefix)

    def detach(self) -> Path:
        """
        Keep this lab after the process exits (for the CLI): write its
        description to L{STATE_DIR} so that L{cleanup_stale} leaves it alone
        and L{remove_detached} can take it down later.

        @return: the state file.
        """
        if not self.is_up:
            raise LabError("bring the lab up before detaching it")
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        path = _state_path(self.tag)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2) + "\n")
        tmp.replace(path)
        self.detached = True
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return path

    def describe(self) -> dict:
        """
        @return: a JSON-able description: prefix, tag, switch namespace and
            per node its namespace, kind, addresses, public address, NAT type
            and (routers) LAN, loss, input filter, mapping timeout and
            upstream router.
        """
        nodes = {}
        for n in self.nodes.values():
            d = {
                "ns": n.ns,
                "kind": n.kind,
                "addresses": n.addresses,
                "public_address": n.public_address,
            }
            if isinstance(n, Router):
                d.update(nat_type=n.nat_type, loss=n.loss, lan=str(n.lan),
                         lan_address=n.lan_address, input_filter=n.input_filter,
                         mapping_timeout=n.mapping_timeout,
                         upstream=n.upstream.name if n.upstream else None,
                         isp=n.isp.name if n.isp else None)
            elif isinstance(n, Host):
                d.update(nat_type=n.nat_type, router=n.router.name if n.router else None)
            nodes[n.name] = d
        return {
            "prefix": self.prefix,
            "tag": self.tag,
            "public_net": str(self.public_net),
            "switch": self.switch_ns,
            "nodes": nodes,
        }

    @staticmethod
    def _ipr(ns: str):
        from pyroute2 import IPRoute

        return IPRoute(netns=ns)

    def _create_ns(self, ns: str) -> None:
        from pyroute2 import netns

        netns.create(ns)
        # No IPv6 in the lab: no router solicitations, MLD or DAD noise.
        self._sysctl(ns, {
            "net/ipv6/conf/all/disable_ipv6": "1",
            "net/ipv6/conf/default/disable_ipv6": "1",
        })
        with self._ipr(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    @staticmethod
    def _sysctl(ns: str, values: dict[str, str]) -> None:
        """
        Write sysctls inside C{ns}: /proc/sys/net shows the network namespace
        of the thread that opens it, so enter it with pyroute2's pushns.
        """
        from pyroute2 import netns

        netns.pushns(ns)
        try:
            for key, value in values.items():
                with open(f"/proc/sys/{key}", "w") as f:
                    f.write(value)
        finally:
            netns.popns()

    def _plug(self, ns: str, into_ns: str, master: str, inner: str = HOST_IF) -> None:
        """
        A veth pair from bridge C{master} in C{into_ns} to interface C{inner}
        in C{ns}, both ends up.  Made inside C{into_ns}, so no end is ever in
        the host's namespace.
        """
        self._ports += 1
        port = f"p{self._ports}"
        with self._ipr(into_ns) as ipr:
            ipr.link("add", ifname=port, kind="veth", peer={"ifname": inner, "net_ns_fd": ns})
            index = ipr.link_lookup(ifname=port)[0]
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=master)[0])
            ipr.link("set", index=index, state="up")

    def _configure(self, ns: str, ifname: str, addresses: Iterable[str], prefixlen: int,
                   gateway: str | None = None) -> None:
        with self._ipr(ns) as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            for address in addresses:
                ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
            if gateway is not None:
                ipr.route("add", dst="0.0.0.0/0", gateway=gateway)

    def _build(self, node: Node) -> None:
        self._create_ns(node.ns)
        plen = self.public_net.prefixlen
        if isinstance(node, Router):
            upstream = node.upstream
            if node.isp is not None:
                if not node.isp.built:
                    self._build(node.isp)
                self._connect_isp(node)
            elif upstream is None:
                self._plug(node.ns, self.switch_ns, SWITCH_BRIDGE, inner=ROUTER_OUTSIDE)
                self._configure(node.ns, ROUTER_OUTSIDE, node.addresses, plen)
            else:
                if not upstream.built:
                    self._build(upstream)
                self._plug(node.ns, upstream.ns, ROUTER_INSIDE, inner=ROUTER_OUTSIDE)
                self._configure(node.ns, ROUTER_OUTSIDE, node.addresses, upstream.lan.prefixlen,
                                gateway=upstream.lan_address)
            with self._ipr(node.ns) as ipr:
                ipr.link("add", ifname=ROUTER_INSIDE, kind="bridge")
            self._configure(node.ns, ROUTER_INSIDE, [node.lan_address], node.lan.prefixlen)
            self._sysctl(node.ns, {"net/ipv4/ip_forward": "1"})
            self._nft(node, nft_ruleset(node.nat_type, node.outside_address, node.loss,
                                        node.input_filter, node.mapping_timeout))
            # conntrack exists in the namespace once the NAT rules are loaded
            self._sysctl(node.ns, {
                "net/netfilter/nf_conntrack_udp_timeout_stream": str(node.mapping_timeout),
                "net/netfilter/nf_conntrack_udp_timeout": str(min(30, node.mapping_timeout)),
            })
        elif node.kind == "isp":
            self._plug(node.ns, self.switch_ns, SWITCH_BRIDGE, inner=ISP_UP)
            self._configure(node.ns, ISP_UP, node.addresses, plen)
            self._sysctl(node.ns, {
                "net/ipv4/ip_forward": "1",
                "net/ipv4/conf/all/proxy_arp": "1",
                # answer at once, not after up to 0.8 s
                f"net/ipv4/neigh/{ISP_UP}/proxy_delay": "0",
            })
        elif isinstance(node, Host) and node.router is not None:
            if not node.router.built:
                self._build(node.router)
            self._plug(node.ns, node.router.ns, ROUTER_INSIDE)
            self._configure(node.ns, HOST_IF, node.addresses, node.router.lan.prefixlen,
                            gateway=node.router.lan_address)
        else:
            self._plug(node.ns, self.switch_ns, SWITCH_BRIDGE)
            self._configure(node.ns, HOST_IF, node.addresses, plen)
        node.built = True

    def _connect_isp(self, router: Router) -> None:
        """
        A veth from C{router}'s outside interface to its ISP router, which
        routes its address there and answers ARP on each side for the other
        (proxy ARP): the router keeps its address on the public net and the
        segment's other nodes need no route, yet every packet crosses the
        ISP router, which decrements its TTL (and answers ICMP time
        exceeded from its own public address).
        """
        isp = router.isp
        with self._ipr(isp.ns) as ipr:
            ipr.link("add", ifname=ISP_DOWN, kind="veth",
                     peer={"ifname": ROUTER_OUTSIDE, "net_ns_fd": router.ns})
        self._configure(isp.ns, ISP_DOWN, [], 32)
        self._configure(router.ns, ROUTER_OUTSIDE, router.addresses, self.public_net.prefixlen)
        with self._ipr(isp.ns) as ipr:
            ipr.route("add", dst=f"{router.address}/32", oif=ipr.link_lookup(ifname=ISP_DOWN)[0])
        self._sysctl(isp.ns, {f"net/ipv4/neigh/{ISP_DOWN}/proxy_delay": "0"})

    def _nft(self, router: Router, rules: str) -> None:
        path = Path(tempfile.mkstemp(prefix=f"{router.name}-", suffix=".nft",
                                     dir=self.workdir)[1])
        path.write_text(rules)
        try:
            self._exec(router.ns, ["nft", "-f", str(path)], check=True)
        except subprocess.CalledProcessError as e:
            raise LabError(f"nft -f {path} in {router.ns} failed: {e.stderr.strip()}") from None
        finally:
            path.unlink(missing_ok=True)

    # -- using the lab --------------------------------------------------------

    def _ns_of(self, node: Node | str) -> str:
        if isinstance(node, str):
            node = self.node(node)
        if not self.is_up or not node.built:
            raise LabError(f"node {node.name!r} is not up; call lab.up() first")
        return node.ns

    def run(self, node: Node | str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """
        Run C{argv} in C{node}'s namespace (C{ip netns exec}) and wait.
        Output is captured as text unless C{kw} says otherwise; other
        keywords go to L{subprocess.run}.
        """
        return self._exec(self._ns_of(node), argv, **kw)

    @staticmethod
    def _exec(ns: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)

    def popen(self, node: Node | str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """
        Start C{argv} in C{node}'s namespace; keywords go to
        L{subprocess.Popen}.  L{down} stops it if it is still running.
        """
        proc = subprocess.Popen(["ip", "netns", "exec", self._ns_of(node), *argv], **kw)
        self._processes.append(proc)
        return proc

    def start_coturn(self, server: Node | str, port: int = 3478, timeout: float = 10.0
                     ) -> subprocess.Popen:
        """
        Start coturn as a STUN-only reference server on all of C{server}'s
        addresses (two give RFC 3489/5780 CHANGE-REQUEST answers from the
        other address and port) and wait until its UDP listeners are open.
        L{down} stops it.

        @raise LabError: C{turnserver} is missing, exits, or does not say its
            listeners are open within C{timeout} seconds.
        """
        server = self.node(server) if isinstance(server, str) else server
        if shutil.which("turnserver") is None:
            raise LabError("'turnserver' not found; install the Debian package coturn")
        argv = ["turnserver", "-n", "--stun-only", "-v", "--no-tcp", "--no-tls", "--no-dtls",
                "--no-cli", "--no-auth", f"--listening-port={port}", "--log-file=stdout",
                "--simple-log", f"--db={self.workdir}/turndb-{server.name}",
                f"--pidfile={self.workdir}/turnserver-{server.name}.pid"]
        for address in server.addresses:
            argv += ["-L", address]
        proc = self.popen(server, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        waiting = {f"UDP listener opened on: {a}:{p}"
                   for a in server.addresses for p in (port, port + 1)}

        def opened(line: str) -> bool:
            waiting.difference_update([w for w in waiting if line.endswith(w)])
            return not waiting

        wait_for_line(proc, opened, timeout, what="coturn's UDP listeners")
        return proc

    def _router(self, router: Router | str) -> Router:
        node = self.node(router) if isinstance(router, str) else router
        if not isinstance(node, Router):
            raise LabError(f"{node.name!r} is not a NAT router")
        return node

    def flush_conntrack(self, router: Router | str) -> None:
        """
        Forget every mapping of C{router}: its conntrack table and, for the
        cone types, the learnt full-cone map and restricted-cone set.
        """
        router = self._router(router)
        self.run(router, ["conntrack", "-F"], check=True)
        flush = []
        if router.nat_type in ("full-cone", "restricted-cone"):
            flush.append(f"flush map ip {NFT_TABLE} fc")
        if router.nat_type == "restricted-cone":
            flush.append(f"flush set ip {NFT_TABLE} contacted")
        if flush:
            self._nft(router, "\n".join(flush) + "\n")

    def remap(self, router: Router | str) -> str:
        """
        Make C{router} give its hosts new outside ports, as a router does
        after a reboot (or a carrier-grade NAT reassigning port blocks):
        from now on it maps from the next range of L{REMAP_PORTS}, and it
        forgets every mapping (L{flush_conntrack}).

        @return: the port range now in use.
        """
        router = self._router(router)
        router.remaps += 1
        ports = REMAP_PORTS[(router.remaps - 1) % len(REMAP_PORTS)]
        self._set_ports(router, ports)
        self.flush_conntrack(router)
        return ports

    def restore_ports(self, router: Router | str) -> None:
        """
        Undo L{remap} for new mappings: they keep the host's port again
        where they can.  Mappings made meanwhile stay as they are.
        """
        self._set_ports(self._router(router), None)

    def _set_ports(self, router: Router, ports: str | None) -> None:
        rules = [f"flush chain ip {NFT_TABLE} postrouting"]
        if ports is not None:
            rules.append(f'add rule ip {NFT_TABLE} postrouting oifname "{ROUTER_OUTSIDE}"'
                         f" {_masquerade(router.nat_type, ports)}")
        rules.append(f'add rule ip {NFT_TABLE} postrouting oifname "{ROUTER_OUTSIDE}"'
                     f" {_masquerade(router.nat_type)}")
        self._nft(router, "\n".join(rules) + "\n")

    def set_loss(self, router: Router | str, pct: int) -> None:
        """
        Make C{router} drop C{pct} percent of the packets it forwards (each
        direction), at random; 0 stops dropping.
        """
        router = self._router(router)
        pct = _check_loss(pct)
        self._nft(router, "\n".join(_loss_rules(pct)) + "\n")
        router.loss = pct

    def ruleset(self, router: Router | str) -> str:
        """
        @return: C{nft list ruleset} of C{router}, as loaded (with counters
            and learnt map/set entries).
        """
        return self.run(self._router(router), ["nft", "list", "ruleset"], check=True).stdout
