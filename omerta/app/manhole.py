"""
An SSH manhole: a Python prompt inside a running node, for operators.

Off by default.  Turn it on with C{--manhole ENDPOINT} on either plugin, and
get in with any OpenSSH client whose key is in the keys file::

    twistd -n omerta-relay --manhole tcp:7422:interface=127.0.0.1 \
        [--manhole-keys ~/.ssh/authorized_keys]
    ssh-keygen -lf <data-dir>/manhole_host_key    # the fingerprint ssh will show
    ssh -p 7422 127.0.0.1                         # on the node's host
    ssh -N -L 7422:127.0.0.1:7422 node.example.org &   # or from elsewhere,
    ssh -p 7422 127.0.0.1                         # through the host's sshd
    >>> show()
    >>> node.peer_id
    >>> status()["peers"]

Access
======

 - SSH only (twisted.conch), never telnet; public-key authentication only: no
   password, keyboard-interactive or anonymous login is offered, so
   C{ssh -o PreferredAuthentications=password} gets "Permission denied
   (publickey)".
 - The keys allowed in are those of an OpenSSH C{authorized_keys} file:
   C{--manhole-keys PATH}, by default C{~/.ssh/authorized_keys} of the user
   running the node.  The file is read again at every login attempt, so
   adding or removing a key takes effect without a restart (a session already
   open stays open).  Any SSH user name is accepted: the key is what counts.
   Lines with OpenSSH key options (C{from="..."}, C{command="..."}, ...) are
   ignored, because the manhole cannot honour the restriction they express;
   the node refuses to start if the file has no usable key, or if users other
   than its owner can write to it.
 - The endpoint must be loopback: C{tcp:PORT:interface=127.0.0.1} (any of
   127.0.0.0/8), C{tcp:PORT:interface=\\:\\:1}, or a C{unix:PATH} socket
   (key authentication still applies; the socket's directory decides who can
   connect at all).  A TCP endpoint without C{interface=} listens on every
   interface and is refused, as is any other address, unless
   C{--manhole-allow-remote} is given: the manhole gives full control of the
   node.  Reach a remote node's manhole through an SSH tunnel instead, as
   above.
 - The server's host key is generated (Ed25519) on the first start with a
   manhole and kept in C{<data-dir>/manhole_host_key} (mode 0600); a host key
   file that other users can read stops the node.  Its fingerprint is logged
   at start, so C{StrictHostKeyChecking} can be kept on.
 - Logins are logged with the user name and the SHA256 fingerprint of the key
   (the form C{ssh-keygen -lf} prints); refused keys are logged the same way.

The prompt
==========

A colored Python prompt (twisted.conch's C{ColoredManhole}) running in the
node's reactor thread: whatever you type runs between two packets, so a
blocking call blocks the node.  A Deferred typed at the prompt is shown when
it fires.  Every session gets a fresh namespace, built when it opens:

 - C{node}: the L{omerta.mesh.network.MeshNetwork} facade of this node
   (C{node.peer_id}, C{node.known_peers()}, C{node.connect(peer)}, ...);
 - C{service}: the L{omerta.mesh.service.NodeService};
 - C{mesh}: the L{omerta.mesh.node.MeshNode} controller;
 - C{registry}: the peer registry of the first network;
 - C{metrics}, C{events}, C{stun}: the node's metrics object, event bus and
   STUN service;
 - C{clock}: the reactor (C{clock.seconds()}, C{clock.callLater(...)});
 - C{relay}: the relay role (L{omerta.mesh.relay.RelayServer}: its
   reservations, sessions and C{status()}), None on a node that does not
   relay; C{provider}: the provider role (L{omerta.roles.provider.ProviderService}:
   C{status()}, C{free()}, C{backend}), None on a node that is not a provider;
 - C{status()}: the node's status document (what C{omerta node status} shows);
 - C{show()} or C{help()}: print this list.  C{help(obj)} prints the
   documentation of C{obj} (the interactive C{help()} of Python would block
   the node, so it is not available).

Leave with Ctrl-D on an empty line.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import pydoc
import stat
import struct
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application import strports
from twisted.application.service import Service
from twisted.conch.checkers import SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import connection, keys
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from omerta import storage
from omerta.app.paths import default_data_dir

HOST_KEY_FILE = "manhole_host_key"

REMOTE_EXPLANATION = (
    "the manhole gives full control of the node: bind it to loopback"
    " (tcp:7422:interface=127.0.0.1) or pass --manhole-allow-remote"
)

DEFAULT_KEYS = "~/.ssh/authorized_keys"

_log = Logger(namespace="omerta.app.manhole")


# options


def check_manhole_options(options) -> None:
    """
    Validate C{--manhole}, C{--manhole-keys} and C{--manhole-allow-remote}.

    Sets C{options["manhole-keys"]} to the resolved path of the keys file.

    @raise usage.UsageError: the endpoint is not C{tcp:} or C{unix:}, is not
        loopback (without C{--manhole-allow-remote}), or the keys file is
        missing, unsafe or holds no usable key; or the host key file is
        readable by others.
    """
    description = options["manhole"]
    check_endpoint(description, allow_remote=bool(options["manhole-allow-remote"]))
    keys_path = Path(options["manhole-keys"] or DEFAULT_KEYS).expanduser()
    try:
        found = read_authorized_keys(keys_path, strict=True)
    except OSError as e:
        hint = (
            " (the default is the authorized_keys of the user running the node;"
            " give another file with --manhole-keys PATH)"
            if not options["manhole-keys"]
            else ""
        )
        raise usage.UsageError(
            f"--manhole-keys: cannot read {keys_path}: {e.strerror}{hint}"
        ) from None
    except storage.StateFileError as e:
        raise usage.UsageError(f"--manhole-keys: {e}") from None
    if not found:
        raise usage.UsageError(
            f"--manhole-keys: {keys_path} has no usable public key: add a line such as"
            f" the content of ~/.ssh/id_ed25519.pub (lines with options like from=\"...\""
            f" are not supported by the manhole)"
        )
    options["manhole-keys"] = keys_path
    data_dir = Path(options["data-dir"]).expanduser() if options["data-dir"] else default_data_dir()
    host_key = data_dir / HOST_KEY_FILE
    try:
        if host_key.exists():
            storage.check_private(host_key)
    except storage.StateFileError as e:
        raise usage.UsageError(str(e)) from None


def check_endpoint(description: str, allow_remote: bool = False) -> None:
    """
    Check a manhole endpoint description (twisted's server endpoint syntax).

    @raise usage.UsageError: not C{tcp:} or C{unix:}, unparseable, or (unless
        C{allow_remote}) a TCP endpoint that is not bound to a loopback address.
    """
    kind = description.split(":", 1)[0].lower()
    if kind not in ("tcp", "unix"):
        raise usage.UsageError(
            f"--manhole {description!r}: use tcp:PORT:interface=127.0.0.1 or unix:PATH"
        )
    try:
        # The parser behind twisted.internet.endpoints.serverFromString and
        # strports: same escaping rules, no reactor needed.
        _name, args, kwargs = endpoints._parseServer(description, None)
    except (ValueError, TypeError) as e:
        raise usage.UsageError(
            f"--manhole {description!r}: expected tcp:PORT:interface=127.0.0.1 or"
            f" unix:PATH ({e})"
        ) from None
    if kind == "unix":
        if not args or not args[0]:
            raise usage.UsageError(f"--manhole {description!r}: give the socket path, unix:PATH")
        return
    port = args[0]
    if not 0 <= port <= 65535:
        raise usage.UsageError(f"--manhole {description!r}: port {port} is out of range")
    if allow_remote:
        return
    interface = kwargs.get("interface", "")
    if not interface:
        raise usage.UsageError(
            f"--manhole {description}: without interface= it listens on all interfaces;"
            f" {REMOTE_EXPLANATION}"
        )
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        raise usage.UsageError(
            f"--manhole {description}: interface={interface} is not an IP address;"
            f" {REMOTE_EXPLANATION}"
        ) from None
    if address.is_unspecified:
        raise usage.UsageError(
            f"--manhole {description}: {interface} means all interfaces; {REMOTE_EXPLANATION}"
        )
    if not address.is_loopback:
        raise usage.UsageError(
            f"--manhole {description}: {interface} is not a loopback address;"
            f" {REMOTE_EXPLANATION}"
        )


# authorized keys


def read_authorized_keys(path: Path, strict: bool = False) -> list[keys.Key]:
    """
    The plain public keys of an OpenSSH C{authorized_keys} file.

    Comments and blank lines are skipped; a line that is not a plain public
    key (one with options such as C{from="..."}, or garbage) is skipped with a
    warning naming the line number, never its content.

    @param strict: refuse (L{storage.StateFileError}) a file that users other
        than its owner can write to, as sshd does.
    @raise OSError: the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if strict:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if mode & 0o022:
                raise storage.StateFileError(
                    f"{path} has mode {mode:04o}: other users could add their key to it;"
                    f" run 'chmod go-w {path}'"
                )
        data = f.read()
    found = []
    for number, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            key = keys.Key.fromString(line)
        except Exception:  # conch raises BadKeyError, struct.error, IndexError...
            key = None
        if key is None or not key.isPublic():
            _log.warn(
                "Manhole keys: line {line} of {path} is not a plain public key"
                " (key options such as from= are not supported); ignored",
                line=number,
                path=str(path),
            )
            continue
        found.append(key)
    return found


class AuthorizedKeysFile:
    """
    An C{IAuthorizedKeysDB} that reads an C{authorized_keys} file at every
    lookup, for any user name: editing the file applies at the next login,
    and a file that became unreadable lets nobody in.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def getAuthorizedKeys(self, username: bytes) -> list[keys.Key]:
        try:
            return read_authorized_keys(self.path)
        except OSError as e:
            _log.error(
                "Manhole keys: cannot read {path} ({error}): refusing every key",
                path=str(self.path),
                error=e.strerror,
            )
            return []


def fingerprint(key: keys.Key) -> str:
    """
    The SHA256 fingerprint of C{key} as C{ssh-keygen -lf} prints it.
    """
    return "SHA256:" + key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("=")


class LoggingKeyChecker(SSHPublicKeyChecker):
    """
    L{SSHPublicKeyChecker} that logs each signed login attempt with the user
    name and the key's fingerprint (never the key).
    """

    log = Logger()

    def requestAvatarId(self, credentials):
        d = super().requestAvatarId(credentials)
        if not credentials.signature:
            # "Would this key do?" query: conch answers it without logging in.
            return d
        user = credentials.username.decode("utf-8", "backslashreplace")

        def key_fingerprint() -> str:
            try:
                return fingerprint(keys.Key.fromString(credentials.blob))
            except Exception:
                return "(unparseable key)"

        def accepted(avatar_id):
            self.log.info(
                "Manhole login as {user} with key {fingerprint}",
                user=user,
                fingerprint=key_fingerprint(),
            )
            return avatar_id

        def refused(failure):
            if failure.check(UnauthorizedLogin):
                self.log.warn(
                    "Manhole login refused for {user}: key {fingerprint} is not authorized",
                    user=user,
                    fingerprint=key_fingerprint(),
                )
            return failure

        return d.addCallbacks(accepted, refused)


# SSH plumbing


@functools.cache
def server_classes() -> SimpleNamespace:
    """
    The conch classes the manhole extends, made on first use: conch's SSH
    server and manhole modules import the global reactor, which importing
    this module must not do.

    @return: C{Factory}, C{Realm}, C{Session}, C{TerminalTransport},
        C{UserAuthServer} and conch's C{ColoredManhole}.
    """
    from twisted.conch import manhole, manhole_ssh
    from twisted.conch.ssh import userauth

    class UserAuthServer(userauth.SSHUserAuthServer):
        """
        Tighter limits than conch's defaults (20 attempts, 12 hours to log
        in), timed by the factory's reactor.
        """

        attemptsBeforeDisconnect = 6
        loginTimeout = 120

        def serviceStarted(self):
            self.clock = self.transport.factory.reactor
            super().serviceStarted()

    class TerminalTransport(manhole_ssh.TerminalSessionTransport):
        """
        conch's terminal glue, plus an exit status of 0 when the session ends
        (Ctrl-D) so C{ssh} exits with 0 rather than 255.
        """

        def __init__(self, proto, chainedProtocol, avatar, width, height):
            super().__init__(proto, chainedProtocol, avatar, width, height)
            session = proto.session

            def close() -> None:
                avatar.conn.sendRequest(session, b"exit-status", struct.pack(">L", 0))
                avatar.conn.sendClose(session)

            proto.transport.loseConnection = close

    class Session(manhole_ssh.TerminalSession):
        """
        conch's terminal session, plus window resizes and end of input (both
        raise NotImplementedError in conch).
        """

        _terminal = None

        def openShell(self, proto):
            self._terminal = self.chainedProtocolFactory()
            self.transportFactory(
                proto, self._terminal, IConchUser(self.original), self.width, self.height
            )

        def windowChanged(self, newWindowSize):
            terminal = self._terminal
            if terminal is not None and terminal.terminalProtocol is not None:
                rows, columns = newWindowSize[:2]
                terminal.terminalProtocol.terminalSize(columns, rows)

        def eofReceived(self):
            if self._terminal is not None:
                self._terminal.loseConnection()

    class Realm(manhole_ssh.TerminalRealm):
        """
        conch's terminal realm with our session; logs the end of sessions.
        """

        sessionFactory = Session
        transportFactory = TerminalTransport
        log = Logger(namespace="omerta.app.manhole.Realm")

        def requestAvatar(self, avatarId, mind, *interfaces):
            interface, avatar, _ = super().requestAvatar(avatarId, mind, *interfaces)
            user = avatarId.decode("utf-8", "backslashreplace")

            def logout():
                self.log.info("Manhole session of {user} ended", user=user)

            return interface, avatar, logout

    class ManholeFactory(manhole_ssh.ConchFactory):
        """
        The SSH server factory: one host key, public-key logins, and logs
        each connection's source.
        """

        log = Logger(namespace="omerta.app.manhole.ManholeFactory")
        noisy = False
        services = {
            b"ssh-userauth": UserAuthServer,
            b"ssh-connection": connection.SSHConnection,
        }

        def __init__(self, portal: Portal, host_key: keys.Key, reactor):
            super().__init__(portal)
            self.reactor = reactor
            # ConchFactory keeps these dicts on the class; never share them.
            self.privateKeys = {host_key.sshType(): host_key}
            self.publicKeys = {host_key.sshType(): host_key.public()}

        def buildProtocol(self, addr):
            self.log.info("Manhole connection from {address}", address=_describe(addr))
            return super().buildProtocol(addr)

    return SimpleNamespace(
        Factory=ManholeFactory,
        Realm=Realm,
        Session=Session,
        TerminalTransport=TerminalTransport,
        UserAuthServer=UserAuthServer,
        ColoredManhole=manhole.ColoredManhole,
    )


def _describe(address) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        return f"{host}:{address.port}"
    return str(getattr(address, "name", None) or "unix socket")


def load_or_create_host_key(data_dir: Path) -> keys.Key:
    """
    The manhole's SSH host key, C{<data_dir>/manhole_host_key}: created
    (Ed25519, OpenSSH format, mode 0600, atomically) if missing.

    @raise storage.StateFileError: the file is accessible to other users or is
        not a private key.
    """
    path = Path(data_dir) / HOST_KEY_FILE
    if not path.exists():
        storage.ensure_private_dir(path.parent)
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        storage.atomic_write(path, key.toString("openssh"))
        _log.info(
            "Generated the manhole host key {path} ({fingerprint})",
            path=str(path),
            fingerprint=fingerprint(key),
        )
        return key
    storage.check_private(path)
    try:
        key = keys.Key.fromString(path.read_bytes())
    except Exception as e:
        raise storage.StateFileError(
            f"{path} is not a usable SSH private key ({type(e).__name__}); move it aside"
            f" and a new one is generated at the next start"
        ) from None
    if key.isPublic():
        raise storage.StateFileError(
            f"{path} holds a public key, not the host's private key; move it aside"
            f" and a new one is generated at the next start"
        )
    return key


# the namespace


NAMES = (
    ("node", "MeshNetwork facade: node.peer_id, node.known_peers(), node.connect(peer), ..."),
    ("service", "the NodeService (socket, timers, status file)"),
    ("mesh", "the MeshNode controller (overlays, bootstraps, NAT report)"),
    ("registry", "peer registry of the first network: registry.all(), registry.online()"),
    ("metrics", "the node's metrics object (counters, gauges, histograms)"),
    ("events", "event bus: events.subscribe(kind, callback)"),
    ("stun", "the STUN service (server and NAT discovery; stun.report)"),
    ("clock", "the reactor: clock.seconds(), clock.callLater(delay, f)"),
    ("relay", "relay role (RelayServer: reservations, sessions, status()); None if not a relay"),
    ("provider", "provider role (ProviderService: status(), free(), backend.list()); None if not a provider"),
    ("status()", "the status document, as 'omerta node status' shows it"),
    ("show()", "this list (also help(); help(obj) documents obj)"),
)


def make_namespace(node_service) -> dict:
    """
    A fresh manhole namespace over the live objects of C{node_service}.
    """
    from omerta.mesh.network import MeshNetwork

    mesh = node_service.node
    provider = None
    parent = getattr(node_service, "parent", None)
    if parent is not None:
        try:
            provider = parent.getServiceNamed("provider")
        except KeyError:
            pass
    registry = None
    if mesh is not None and mesh.overlays:
        registry = mesh.overlay().registry

    def show() -> None:
        """Print the names this manhole provides."""
        width = max(len(name) for name, _ in NAMES)
        print("omerta manhole: the live node. Names:")
        for name, description in NAMES:
            print(f"  {name:<{width}}  {description}")
        print("Code runs in the reactor thread: a blocking call blocks the node.")

    def help(obj=show) -> None:  # noqa: A001 - the manhole's own help
        """Without argument, show(); with one, the documentation of obj."""
        if obj is show:
            show()
        else:
            print(pydoc.render_doc(obj, renderer=pydoc.plaintext))

    def status() -> dict:
        """The node's status document."""
        return node_service.status()

    return {
        "node": MeshNetwork(service=node_service),
        "service": node_service,
        "mesh": mesh,
        "registry": registry,
        "metrics": node_service.metrics,
        "events": node_service.events,
        "stun": node_service.stun,
        "clock": node_service.reactor,
        "relay": node_service.node.relay if node_service.node is not None else None,
        "provider": provider,
        "status": status,
        "show": show,
        "help": help,
    }


# the service


class ManholeService(Service):
    """
    Listens for manhole SSH connections once started; nothing happens before.

    @param description: the endpoint, already checked by L{check_endpoint}.
    @param keys_path: the C{authorized_keys} file.
    @param data_dir: where the host key is kept.
    @param namespace: called with no argument for each new session.
    @param allow_remote: the endpoint may be reachable from other hosts
        (logged as a warning at start).
    @param reactor: listens and times logins; the global reactor when None.
    """

    log = Logger()

    def __init__(self, description, keys_path, data_dir, namespace, *, allow_remote=False,
                 reactor=None):
        self.description = description
        self.keys_path = Path(keys_path)
        self.data_dir = Path(data_dir)
        self.namespace = namespace
        self.allow_remote = allow_remote
        self._reactor = reactor
        self.factory = None
        self._listener = None

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def build_factory(self, host_key: keys.Key):
        """
        The SSH server factory: a colored Python prompt over a fresh
        namespace per session, behind a portal whose only checker is the
        public-key one.
        """
        classes = server_classes()
        realm = classes.Realm()
        namespace = self.namespace
        realm.chainedProtocolFactory = lambda: insults.ServerProtocol(
            classes.ColoredManhole, namespace()
        )
        checker = LoggingKeyChecker(AuthorizedKeysFile(self.keys_path))
        return classes.Factory(Portal(realm, [checker]), host_key, self.reactor)

    def startService(self) -> None:
        host_key = load_or_create_host_key(self.data_dir)
        self.factory = self.build_factory(host_key)
        self._listener = strports.service(self.description, self.factory, reactor=self.reactor)
        self._listener.startService()
        Service.startService(self)
        self.log.info(
            "SSH manhole listening on {endpoint}, host key {fingerprint}, keys from {keys}",
            endpoint=self.description,
            fingerprint=fingerprint(host_key),
            keys=str(self.keys_path),
        )
        if self.allow_remote:
            self.log.warn(
                "The manhole endpoint {endpoint} may be reachable from other hosts"
                " (--manhole-allow-remote)",
                endpoint=self.description,
            )

    def stopService(self):
        Service.stopService(self)
        listener, self._listener = self._listener, None
        if listener is None or not listener.running:
            return None
        return listener.stopService()


def make_manhole_service(options, node_service, reactor=None) -> ManholeService:
    """
    The manhole of C{node_service} as C{options} (checked by
    L{check_manhole_options}) describe it; not started.
    """
    keys_path = options["manhole-keys"] or Path(DEFAULT_KEYS).expanduser()
    service = ManholeService(
        options["manhole"],
        keys_path,
        node_service.data_dir,
        lambda: make_namespace(node_service),
        allow_remote=bool(options["manhole-allow-remote"]),
        reactor=reactor,
    )
    service.setName("manhole")
    return service
