"""
Options shared by the C{omerta-relay} and C{omerta-provider} twistd plugins,
and the assembly of a node from them.

Validation happens here, in C{postOptions}, so a mistake is reported as a
usage error before anything starts: a bad port or bootstrap spec, an unsafe
identity key file, a corrupt C{networks.json}, an expired invite, or a node
that would belong to no network.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from pathlib import Path

from twisted.application.service import MultiService
from twisted.python import usage

from omerta import storage
from omerta.addressing import AddressError, parse_bootstrap, parse_endpoint, parse_port
from omerta.app.paths import default_data_dir
from omerta.crypto.identity import IDENTITY_FILE, IdentityError, validate_name
from omerta.crypto.invite import InviteError, parse_invite
from omerta.crypto.network import NetworkKey, NetworkKeyError
from omerta.mesh.service import NodeService
from omerta.networks import NetworkStore
from omerta.wire.messages import Capability

LOG_FORMATS = ("text", "json")
JSON_LOGGER = "omerta.app.logs.json_stdout_observer"


class NodeOptions(usage.Options):
    """
    Common options; subclasses set C{default_port} and C{role}.
    """

    default_port = 7400

    optParameters = [
        ["port", "p", None, "UDP port for STUN, mesh and relay traffic."],
        ["interface", "i", "", "Local address to bind (default: all IPv4)."],
        ["data-dir", "d", None, "State directory (default: $OMERTA_DATA_DIR or ~/.local/share/omerta)."],
        ["name", "n", "", "Human name of this node (letters, digits, '.', '_', '-')."],
        ["log-format", None, "text", "Log output: text or json (JSON lines on stdout)."],
        ["stun-alternate", None, None,
         "Second address IP[:PORT] for RFC 5780 STUN (needs --interface; port"
         " defaults to --port + 1)."],
        ["nat-interval", None, "300", "Seconds between NAT discoveries (0: never)."],
        ["config", "c", None, "TOML file with any of these options; flags override it."],
        ["manhole", None, None,
         "SSH manhole endpoint, e.g. tcp:7422:interface=127.0.0.1 (off by default)."],
        ["manhole-keys", None, None,
         "authorized_keys file for the manhole (default: ~/.ssh/authorized_keys)."],
        ["metrics", None, None,
         "Prometheus metrics endpoint, e.g. tcp:9400:interface=127.0.0.1 (off by default)."],
        ["dashboard", None, None,
         "Live dashboard in a browser, HOST:PORT or an endpoint, e.g. 127.0.0.1:7480"
         " (off by default; 'omerta dashboard' prints its URL)."],
        ["relay-sessions", None, "50", "Relay role: most sessions open at once."],
        ["relay-sessions-per-peer", None, "8", "Relay role: most sessions per member."],
        ["relay-rate", None, "4000", "Relay role: most packets/s forwarded per source."],
        ["relay-session-mb", None, "1024", "Relay role: most MiB forwarded per session."],
        ["relay-session-duration", None, "3600", "Relay role: longest session, seconds."],
        ["relay-session-idle", None, "90",
         "Relay role: end a session that carried nothing for this many seconds."],
    ]
    optFlags = [
        ["manhole-allow-remote", None, "Allow a manhole endpoint that is not loopback."],
        ["dashboard-allow-remote", None,
         "Allow a dashboard endpoint that is not loopback (clients off loopback then need"
         " the token of DATA_DIR/dashboard.token)."],
        ["no-control", None,
         "Do not serve the control API (DATA_DIR/control.sock) the omerta command uses."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["bootstrap"] = []
        self["invite"] = []
        self["stun"] = []

    def parseOptions(self, options=None) -> None:
        """
        With C{--config PATH} (or C{-c PATH}), the file's settings are applied
        first, so every flag given on the command line overrides them.
        """
        if options is None:
            options = sys.argv[1:]
        options = list(options)
        path = config_path(options)
        if path is not None:
            from omerta.app.config import apply_config_file

            apply_config_file(self, path)
        super().parseOptions(options)

    def relay_role(self) -> bool:
        """
        Whether this node plays the relay role (forwarding, punch
        coordination).
        """
        return False

    def opt_bootstrap(self, spec: str) -> None:
        """
        Peer to start from, ID_OR_NAME@HOST:PORT (repeatable).
        """
        try:
            self["bootstrap"].append(parse_bootstrap(spec))
        except AddressError as e:
            raise usage.UsageError(str(e)) from None

    def opt_stun(self, text: str) -> None:
        """
        STUN server IP:PORT for NAT discovery (repeatable; default: the
        bootstrap peers).
        """
        try:
            endpoint = parse_endpoint(text)
        except AddressError as e:
            raise usage.UsageError(f"--stun: {e}") from None
        if not endpoint.is_ip:
            raise usage.UsageError(f"--stun {text}: give an IP address, not a host name")
        self["stun"].append((endpoint.host, endpoint.port))

    def opt_invite(self, text: str) -> None:
        """
        Invite link (omerta://join/...) to join at start (repeatable).
        """
        self["invite"].append(text)

    def postOptions(self) -> None:
        port = self["port"]
        try:
            self["port"] = self.default_port if port is None else parse_port(port, allow_zero=True)
        except AddressError as e:
            raise usage.UsageError(f"--port: {e}") from None
        if self["interface"]:
            try:
                self["interface"] = str(ipaddress.ip_address(self["interface"]))
            except ValueError:
                raise usage.UsageError(
                    f"--interface {self['interface']!r} is not an IP address of this host"
                ) from None
            _check_local_address(self["interface"])
        if self["name"]:
            try:
                validate_name(self["name"])
            except IdentityError as e:
                raise usage.UsageError(f"--name: {e}") from None
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(
                f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {self['log-format']!r}"
            )
        try:
            self["nat-interval"] = float(self["nat-interval"])
            if not (self["nat-interval"] == 0
                    or MIN_NAT_INTERVAL <= self["nat-interval"] <= MAX_NAT_INTERVAL):
                raise ValueError
        except ValueError:
            raise usage.UsageError(
                f"--nat-interval takes 0 (never) or seconds from {MIN_NAT_INTERVAL:g} to"
                f" {MAX_NAT_INTERVAL:g}") from None
        self._check_stun_alternate()
        for key in ("relay-sessions", "relay-sessions-per-peer", "relay-rate",
                    "relay-session-mb", "relay-session-duration", "relay-session-idle"):
            try:
                self[key] = int(self[key])
                if self[key] <= 0:
                    raise ValueError
            except (TypeError, ValueError):
                raise usage.UsageError(f"--{key} takes a whole number > 0") from None
        if self["manhole"] is not None:
            from omerta.app.manhole import check_manhole_options

            check_manhole_options(self)
        if self["metrics"] is not None:
            from omerta.app.metrics_web import check_metrics_endpoint

            check_metrics_endpoint(self["metrics"])
        if self["dashboard"] is not None:
            from omerta.app.dashboard import check_dashboard_options

            check_dashboard_options(self)
        elif self["dashboard-allow-remote"]:
            raise usage.UsageError("--dashboard-allow-remote needs --dashboard ENDPOINT")
        data_dir = Path(self["data-dir"]).expanduser() if self["data-dir"] else default_data_dir()
        self["data-dir"] = data_dir
        self._check_state(data_dir)
        if self["log-format"] == "json":
            self._use_json_logs()

    def _check_stun_alternate(self) -> None:
        text = self["stun-alternate"]
        if text is None:
            return
        if not self.serves_stun():
            raise usage.UsageError("--stun-alternate needs this node to serve STUN")
        if not self["interface"] or ipaddress.ip_address(self["interface"]).is_unspecified:
            raise usage.UsageError(
                "--stun-alternate needs --interface with this node's primary IP address"
            )
        if not self["port"]:
            raise usage.UsageError("--stun-alternate needs a fixed --port, not 0")
        host, sep, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
        try:
            ip = str(ipaddress.ip_address(host.strip("[]")))
            port_number = parse_port(port) if sep else self["port"] + 1
        except (ValueError, AddressError) as e:
            raise usage.UsageError(f"--stun-alternate {text!r}: expected IP[:PORT] ({e})") from None
        if ip == self["interface"] or port_number == self["port"]:
            raise usage.UsageError(
                "--stun-alternate must differ from --interface in IP and from --port in port"
            )
        self["stun-alternate"] = (ip, port_number)

    def serves_stun(self) -> bool:
        raise NotImplementedError

    def _check_state(self, data_dir: Path) -> None:
        from omerta.crypto.identity import read_identity

        key_file = data_dir / IDENTITY_FILE
        try:
            if key_file.exists():
                read_identity(key_file)
            members = NetworkStore(data_dir).list()
        except storage.StateFileError as e:
            raise usage.UsageError(str(e)) from None
        now = time.time()
        for text in self["invite"]:
            try:
                if "://" in text or len(text) > 64:
                    parse_invite(text, now)
                else:
                    key = NetworkKey.from_text(text)
                    if not any(m.key.network_id == key.network_id for m in members):
                        raise usage.UsageError(
                            f"--invite: a bare network key carries no network name or"
                            f" bootstrap peers: give the invite link (omerta://join/...), or"
                            f" join first with 'omerta --data-dir {data_dir} network join"
                            f" --key KEY --name NAME'")
            except (InviteError, NetworkKeyError) as e:
                raise usage.UsageError(f"--invite: {e}") from None
        if not members and not self["invite"]:
            raise usage.UsageError(
                f"this node belongs to no network yet (data dir {data_dir}): create one"
                f" with 'omerta --data-dir {data_dir} network create --name NAME' or"
                f" pass --invite LINK"
            )

    def _use_json_logs(self) -> None:
        parent = getattr(self, "parent", None)
        if parent is None:
            return
        if parent.get("logfile"):
            raise usage.UsageError(
                "--log-format json writes to standard output; drop twistd's --logfile"
                " (run with twistd -n and redirect, or let systemd collect it)"
            )
        parent["logger"] = JSON_LOGGER

    def capabilities(self) -> Capability:
        raise NotImplementedError


MIN_NAT_INTERVAL = 10.0
MAX_NAT_INTERVAL = 86400.0


def _check_local_address(address: str) -> None:
    """
    @raise usage.UsageError: C{address} is not one of this host's (binding
        to it would fail later, with a traceback).
    """
    import socket

    if ipaddress.ip_address(address).is_unspecified:
        return
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((address, 0))
    except OSError as e:
        raise usage.UsageError(
            f"--interface {address} is not an address of this host ({e.strerror});"
            f" 'ip -br addr' lists them") from None
    finally:
        probe.close()


def make_node_service(options: NodeOptions, reactor=None) -> MultiService:
    """
    Assemble (without starting) the services of one node: the node itself,
    its control API (unless C{--no-control}; it starts after the node), and
    the metrics endpoint and manhole when asked for.
    """
    top = MultiService()
    relay = None
    if options.relay_role():
        from omerta.mesh.relay import RelayConfig

        relay = RelayConfig(
            max_sessions=options["relay-sessions"],
            sessions_per_peer=options["relay-sessions-per-peer"],
            packets_per_second=options["relay-rate"],
            session_bytes=options["relay-session-mb"] << 20,
            session_duration=float(options["relay-session-duration"]),
            session_idle=float(options["relay-session-idle"]),
        )
    node = NodeService(
        options["data-dir"],
        port=options["port"],
        interface=options["interface"],
        name=options["name"],
        bootstrap=options["bootstrap"],
        invites=options["invite"],
        capabilities=options.capabilities(),
        serve_stun=options.serves_stun(),
        stun_alternate=options["stun-alternate"],
        stun_servers=options["stun"],
        nat_interval=options["nat-interval"],
        relay=relay,
        reactor=reactor,
    )
    node.setName("node")
    node.setServiceParent(top)
    from omerta.tunnel.consumer_side import ConsumerTunnelService

    tunnels = ConsumerTunnelService(node)
    tunnels.setName("tunnels")
    tunnels.setServiceParent(top)
    if not options["no-control"]:
        from omerta.app.control import ControlService

        control = ControlService(node, reactor=reactor)
        control.setName("control")
        control.setServiceParent(top)
    if options["metrics"] is not None:
        from omerta.app.metrics_web import MetricsService

        MetricsService(options["metrics"], node, reactor=reactor).setServiceParent(top)
    if options["manhole"] is not None:
        from omerta.app.manhole import make_manhole_service

        make_manhole_service(options, node, reactor=reactor).setServiceParent(top)
    if options["dashboard"] is not None:
        from omerta.app.dashboard import DashboardService

        DashboardService(options["dashboard"], node,
                         allow_remote=bool(options["dashboard-allow-remote"]),
                         reactor=reactor).setServiceParent(top)
    return top


def config_path(argv: list[str]) -> str | None:
    """
    The value of C{--config}/C{-c} in C{argv} (last one wins), or None.
    """
    path = None
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-c") and len(arg) > 2 and not arg.startswith("--"):
            path = arg[2:]
    return path
