"""
The control API of a running node: HTTP/1.1 with JSON bodies on a Unix
socket, C{<data dir>/control.sock}, so that the C{omerta} command can use the
node that runs on a data directory instead of joining the mesh as a
short-lived node of its own (docs/api.md, "Control API").

    GET    /v1/status                node status (omerta node status)
    GET    /v1/networks              memberships, no keys (omerta network list)
    GET    /v1/peers[?network=]      known peers (omerta mesh peers)
    POST   /v1/ping                  {"peer", "count", "interval", "timeout", ...}
    POST   /v1/connect               {"peer", "timeout", ...}
    GET    /v1/nat                   the last NAT report (503 before the first)
    POST   /v1/vms                   a VM from a provider (omerta vm request)
    GET    /v1/vms[?refresh=1]       the VMs held (omerta vm list)
    GET    /v1/vms/ID                one VM (omerta vm show)
    DELETE /v1/vms/ID, /v1/vms       give VMs back (omerta vm release)
    POST   /v1/jobs                  submit a compute job (omerta job submit)
    GET    /v1/jobs                  the jobs submitted from here (omerta job list)
    GET    /v1/jobs/ID               one job (omerta job status)
    DELETE /v1/jobs/ID               cancel it (omerta job cancel)
    GET    /v1/jobs/ID/logs          its output from an offset, waiting for more
    GET    /v1/jobs/ID/files         its collected files (omerta job fetch)
    GET    /v1/events[?kinds=a,b]    the node's events as server-sent events

The documents are L{omerta.app.documents}'s, the ones C{--output json}
prints, encoded the same way (2-space indent, sorted keys, a final newline).
Failures are C{{"error": MESSAGE}} with a 4xx/5xx status; the messages are
the command's.

Who may ask: the socket is 0600 in a directory that must be 0700 (the API
stays off, with a logged error, when the directory is open to other users),
and each connection's peer credentials (C{SO_PEERCRED}) must be this
process's uid or root; anyone else gets 403.

Nothing here binds or listens before L{ControlService.startService}.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from omerta.addressing import AddressError, parse_endpoint
from omerta.app.control_client import CONTROL_SOCKET  # noqa: F401 (part of this API)
from omerta.app.control_events import (KEEPALIVE_INTERVAL, STREAM_BACKLOG,  # noqa: F401
                                       STREAM_BACKLOG_BYTES, EventStream, encode, jsonable,
                                       sse_event)
from omerta.app import documents
from omerta.app.documents import DocumentError, MeshView
from omerta.mesh.events import KINDS
from omerta.mesh.network import MeshNetwork
from omerta.networks import MembershipError, NetworkStore
from omerta.roles import sshkeys
from omerta.jobs.client import JobClient, UnknownJob, job_spec_of
from omerta.roles.consumer import HeldVM
from omerta.roles.consumer_client import ConsumerClient, VmRequest
from omerta.roles.guest import DEFAULT_IMAGE
from omerta.storage import StateFileError


API_VERSION = 1
MAX_BODY = 64 * 1024
"""The largest request body accepted (bytes); larger ones get 413."""

DEFAULT_TIMEOUT = 10.0
"""Seconds a mesh question (ping, connect, vm show/release) may take unless told."""

VM_REQUEST_TIMEOUT = ConsumerClient.DEFAULT_TIMEOUT

IDLE_TIMEOUT = 600.0
"""An HTTP connection that carries nothing for this long is closed."""

VM_STATE = "vm_state"
EVENT_KINDS = tuple(KINDS)
"""What C{/v1/events?kinds=} may name: every kind the node emits."""

DEFAULT_EVENT_KINDS = ("peer_discovered", "peer_connected", "peer_suspected",
                       "peer_disconnected", "member_suspected", "peer_gone", "path_changed",
                       "nat_changed", VM_STATE)
"""The kinds streamed when C{kinds} is not given (C{peer_changed} is chatty)."""

_UNIX_PATH_MAX = 107
"""The longest socket path bind() takes on Linux (108 bytes with the NUL)."""


def control_socket_path(data_dir) -> Path:
    """Where the node of C{data_dir} serves its control API."""
    return Path(data_dir) / CONTROL_SOCKET


def peer_credentials(transport) -> tuple[int, int, int] | None:
    """
    The (pid, uid, gid) of the process at the other end of a Unix socket
    connection (C{SO_PEERCRED}), or None when the transport cannot say.
    """
    try:
        raw = transport.getHandle().getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", raw)


# -- HTTP plumbing ------------------------------------------------------------------


class ApiError(Exception):
    """A request answered with C{status} and C{{"error": message}}."""

    def __init__(self, status: int, message: str, *, allow: tuple[str, ...] = (),
                 close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow
        self.close = close


ERROR_STATUS: dict[type[DocumentError], int] = {
    documents.NotFoundError: http.NOT_FOUND,
    documents.AmbiguousError: http.BAD_REQUEST,
    documents.NotJoinedError: http.SERVICE_UNAVAILABLE,
    documents.NoPathError: http.GATEWAY_TIMEOUT,
    documents.RefusedError: http.CONFLICT,
    documents.BadAnswerError: http.BAD_GATEWAY,
}
"""The HTTP status of each kind of mesh-side failure (others: 500)."""


class ControlRequest(server.Request):
    """
    A request whose body is kept only up to L{MAX_BODY} bytes: the rest is
    read and dropped, and C{too_large} says so (the API answers 413).
    """

    too_large = False
    _received = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parsePOSTFormSubmission = False

    def gotLength(self, length):
        self.too_large = length is not None and length > MAX_BODY
        self._received = 0
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY and not self.too_large:
            self.too_large = True
            self.content = BytesIO()
        if not self.too_large:
            self.content.write(data)


class ControlChannel(http.HTTPChannel):
    """
    An HTTP connection that knows who is at the other end
    (C{peer_credentials}: pid, uid, gid, or None).
    """

    peer_credentials = None

    def connectionMade(self):
        super().connectionMade()
        self.peer_credentials = peer_credentials(self.transport)
        site = getattr(self, "site", None)
        if site is not None:
            site.channels.add(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        site = getattr(self, "site", None)
        if site is not None:
            site.channel_closed(self)


class ControlSite(server.Site):
    """The control API's site: bounded bodies, peer credentials, no access log file."""

    log_ = Logger()
    protocol = ControlChannel
    requestFactory = ControlRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, resource, reactor=None, timeout: float = IDLE_TIMEOUT):
        super().__init__(resource, reactor=reactor, timeout=timeout)
        self.channels: set[ControlChannel] = set()
        self._closing: list[Deferred] = []

    def channel_closed(self, channel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            waiting, self._closing = self._closing, []
            for d in waiting:
                d.callback(None)

    def close_connections(self) -> Deferred:
        """Close every open connection; fires once they are all gone."""
        if not self.channels:
            return succeed(None)
        d = Deferred()
        self._closing.append(d)
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.loseConnection()
        return d

    def log(self, request) -> None:
        credentials = getattr(request.channel, "peer_credentials", None) or (None, None, None)
        self.log_.debug("Control API {method} {path} -> {code} (uid {uid})",
                        method=request.method.decode("ascii", "replace"),
                        path=request.path.decode("ascii", "replace"),
                        code=request.code, uid=credentials[1])


def api_error(error: BaseException) -> ApiError | None:
    """
    How a failure is answered: an L{ApiError} as it is, a mesh-side
    L{DocumentError} with its L{ERROR_STATUS}, a damaged state file with
    500 and its message; None for anything else (a bug: logged, 500).
    """
    if isinstance(error, ApiError):
        return error
    if isinstance(error, DocumentError):
        for kind, status in ERROR_STATUS.items():
            if isinstance(error, kind):
                return ApiError(status, str(error))
        return ApiError(http.INTERNAL_SERVER_ERROR, str(error))
    if isinstance(error, (StateFileError, MembershipError)):
        return ApiError(http.INTERNAL_SERVER_ERROR, str(error))
    return None


# -- request fields -----------------------------------------------------------------


_MISSING = object()


class Fields:
    """
    The fields of a JSON body (or the parameters of a query), checked one by
    one with messages a person can act on; L{done} refuses the ones nobody
    asked for.
    """

    def __init__(self, values: dict, what: str, where: str):
        self.values = values
        self.what = what
        self.where = where
        self.used: list[str] = []

    def _get(self, name: str, default):
        self.used.append(name)
        value = self.values.get(name, _MISSING)
        if value is None or value is _MISSING:
            return default
        return value

    def _bad(self, name: str, wanted: str) -> ApiError:
        return ApiError(http.BAD_REQUEST, f"{self.what} '{name}' must be {wanted}")

    def text(self, name: str, default=_MISSING, *, wanted: str = "a string",
             max_bytes: int | None = None, empty: bool = False):
        value = self._get(name, default)
        if value is _MISSING:
            raise ApiError(http.BAD_REQUEST, f"{self.what} '{name}' is missing ({wanted})")
        if value is default:
            return value
        if not isinstance(value, str) or (not empty and not value.strip()):
            raise self._bad(name, wanted)
        if max_bytes is not None and len(value.encode("utf-8")) > max_bytes:
            raise self._bad(name, f"{wanted} of at most {max_bytes} bytes")
        return value

    def whole(self, name: str, low: int, high: int, default: int) -> int:
        value = self._get(name, default)
        if isinstance(value, str) and self.where == "query" and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._bad(name, f"a whole number {low}-{high}")
        return value

    def seconds(self, name: str, default: float, *, zero: bool = False,
                high: float = 86400.0) -> float:
        value = self._get(name, default)
        if isinstance(value, str) and self.where == "query":
            try:
                value = float(value)
            except ValueError:
                pass
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and (0 <= value if zero else 0 < value) and value < high)
        if not ok:
            bound = ">= 0" if zero else "> 0"
            raise self._bad(name, f"a number of seconds {bound} and < {high:g}")
        return float(value)

    def flag(self, name: str) -> bool:
        value = self._get(name, False)
        if self.where == "query" and isinstance(value, str):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
        if not isinstance(value, bool):
            raise self._bad(name, "true or false" if self.where == "body" else "1 or 0")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.values) - set(self.used))
        if unknown:
            known = ", ".join(self.used) or "none"
            raise ApiError(http.BAD_REQUEST,
                           f"unknown {self.what} {', '.join(repr(u) for u in unknown)}"
                           f" (known: {known})")


def _query(request) -> Fields:
    values: dict[str, str] = {}
    query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
    try:
        pairs = parse_qsl(query.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ApiError(http.BAD_REQUEST, "the query string is not UTF-8") from None
    for name, value in pairs:
        if name in values:
            raise ApiError(http.BAD_REQUEST, f"parameter '{name}' is given twice")
        values[name] = value
    return Fields(values, "parameter", "query")


def _body(request) -> Fields:
    raw = request.content.getvalue() if request.content is not None else b""
    if not raw.strip():
        return Fields({}, "field", "body")
    try:
        values = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(http.BAD_REQUEST, f"the body is not JSON ({e}); send a JSON object"
                                         f" such as {{\"peer\": \"provider-1\"}}") from None
    if not isinstance(values, dict):
        raise ApiError(http.BAD_REQUEST, "the body must be a JSON object ({...})")
    return Fields(values, "field", "body")


# -- the API ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """A resource: its path (C{{id}} matches one segment) and handler name by method."""

    path: str
    methods: dict[str, str]

    def match(self, path: str) -> dict | None:
        want = self.path.strip("/").split("/")
        got = path.strip("/").split("/")
        if len(want) != len(got):
            return None
        params = {}
        for pattern, segment in zip(want, got):
            if pattern.startswith("{"):
                if not segment:
                    return None
                params[pattern.strip("{}")] = segment
            elif pattern != segment:
                return None
        return params


ROUTES = (
    Route("/v1/status", {"GET": "status"}),
    Route("/v1/networks", {"GET": "networks"}),
    Route("/v1/peers", {"GET": "peers"}),
    Route("/v1/ping", {"POST": "ping"}),
    Route("/v1/connect", {"POST": "connect"}),
    Route("/v1/nat", {"GET": "nat"}),
    Route("/v1/vms", {"GET": "vm_list", "POST": "vm_request", "DELETE": "vm_release_all"}),
    Route("/v1/vms/{id}", {"GET": "vm_show", "DELETE": "vm_release"}),
    Route("/v1/jobs", {"GET": "job_list", "POST": "job_submit"}),
    Route("/v1/jobs/{id}", {"GET": "job_status", "DELETE": "job_cancel"}),
    Route("/v1/jobs/{id}/logs", {"GET": "job_logs"}),
    Route("/v1/jobs/{id}/files", {"GET": "job_files"}),
    Route("/v1/events", {"GET": "events"}),
)

_RESOURCE_LIST = ", ".join(f"{method} {route.path}" for route in ROUTES for method in route.methods)


@dataclass(frozen=True)
class Scope:
    """The network a question is about (what L{MeshView}'s messages name)."""

    network: Any


class _JobLogs:
    """GET /v1/jobs/ID/logs: C{stream}, C{offset}, C{wait} (seconds, at most 10)."""

    def fields(self, query: Fields) -> dict:
        stream = query.text("stream", "stdout", wanted="stdout or stderr")
        if stream not in ("stdout", "stderr"):
            raise ApiError(http.BAD_REQUEST, "parameter 'stream' must be stdout or stderr")
        return {"stream": stream, "offset": query.whole("offset", 0, 2**62, 0),
                "wait": query.seconds("wait", 0.0, zero=True, high=10.001)}

    async def __call__(self, client, job_id, timeout, *, stream, offset, wait) -> dict:
        data, eof, job = await client.logs(job_id, stream, offset, wait, timeout)
        return {"data": base64.b64encode(data).decode(), "eof": eof, "job": job}


class ControlAPI(Resource):
    """
    The control API over a L{NodeService}: routing, who may ask, bodies,
    and one handler per resource and method (see the module docstring).

    @param node: the node (L{omerta.mesh.service.NodeService}), started.
    @param clock: for event keepalives (the node's reactor by default).
    @param own_uid: the uid allowed besides root (this process's by default).
    """

    isLeaf = True
    log = Logger()

    def __init__(self, node, *, clock=None, own_uid: int | None = None,
                 keepalive: float = KEEPALIVE_INTERVAL):
        super().__init__()
        self.node = node
        self.clock = clock if clock is not None else node.reactor
        self.own_uid = os.getuid() if own_uid is None else own_uid
        self.keepalive = keepalive
        self.streams: set[EventStream] = set()

    # dispatch

    def render(self, request):
        request.setHeader(b"cache-control", b"no-store")
        try:
            self._check_peer(request)
            handler, params = self._route(request)
            if request.too_large:
                raise ApiError(http.REQUEST_ENTITY_TOO_LARGE,
                               f"the body is larger than {MAX_BODY} bytes", close=True)
            result = handler(request, **params)
        except Exception as e:
            error = api_error(e)
            if error is None:
                self._internal(request, e)
            else:
                self._fail(request, error)
            return server.NOT_DONE_YET
        if result is server.NOT_DONE_YET:
            return result
        if isinstance(result, _Async):
            self._run(request, result)
            return server.NOT_DONE_YET
        self._respond(request, http.OK, result)
        return server.NOT_DONE_YET

    def _check_peer(self, request) -> None:
        credentials = getattr(request.channel, "peer_credentials", None)
        if credentials is None:
            raise ApiError(http.FORBIDDEN, "cannot tell who is asking (no peer credentials);"
                                           " the control API answers local processes only",
                           close=True)
        pid, uid, _gid = credentials
        if uid not in (self.own_uid, 0):
            self.log.warn("Control API: refused a request from uid {uid} (pid {pid})",
                          uid=uid, pid=pid)
            raise ApiError(http.FORBIDDEN, f"this node's control API answers uid"
                                           f" {self.own_uid} and root only, not uid {uid}",
                           close=True)

    def _route(self, request):
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace").upper()
        for route in ROUTES:
            params = route.match(path)
            if params is None:
                continue
            name = route.methods.get(method)
            if name is None:
                allowed = tuple(route.methods)
                raise ApiError(http.NOT_ALLOWED,
                               f"{method} is not allowed on {route.path}; use"
                               f" {' or '.join(allowed)}", allow=allowed)
            return getattr(self, f"_{name}"), params
        raise ApiError(http.NOT_FOUND,
                       f"no resource {path}; this node serves API version {API_VERSION}:"
                       f" {_RESOURCE_LIST}")

    def _run(self, request, work: _Async) -> None:
        gone = []
        d = Deferred.fromCoroutine(work.coroutine)
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        if work.cancel_on_disconnect:
            request.notifyFinish().addErrback(lambda _: d.cancel())

        def done(document) -> None:
            if not gone:
                self._respond(request, http.OK, document)

        def failed(failure) -> None:
            if gone:
                return
            error = api_error(failure.value)
            if error is None:
                self._internal(request, failure.value, failure)
            else:
                self._fail(request, error)

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: self.log.failure("Control API response failed", f))

    def _respond(self, request, status: int, document, *, close: bool = False) -> None:
        body = encode(document)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        if close:
            request.setHeader(b"connection", b"close")
        channel = request.channel
        request.write(body)
        request.finish()
        if close and channel is not None:
            channel.loseConnection()

    def _fail(self, request, error: ApiError) -> None:
        if error.allow:
            request.setHeader(b"allow", ", ".join(error.allow).encode("ascii"))
        self._respond(request, error.status, {"error": error.message}, close=error.close)

    def _internal(self, request, error: BaseException, failure=None) -> None:
        if failure is not None:
            self.log.failure("Control API: {path} failed", failure,
                             path=request.path.decode("utf-8", "replace"))
        else:
            self.log.failure("Control API: {path} failed",
                             path=request.path.decode("utf-8", "replace"))
        self._fail(request, ApiError(http.INTERNAL_SERVER_ERROR,
                                     f"the node failed to answer ({type(error).__name__}:"
                                     f" {error}); its log has the details"))

    # the node, its networks and its mesh

    def _running_node(self):
        if not self.node.running or self.node.node is None:
            raise ApiError(http.SERVICE_UNAVAILABLE, "the node is not running")
        return self.node

    def _mesh(self, ref: str | None = None) -> tuple[MeshNetwork, Scope]:
        """
        The node as a L{MeshNetwork} working in the network C{ref} names
        (id, id prefix or name; the node's first when None), and that
        network's membership.
        """
        node = self._running_node()
        mesh = MeshNetwork(service=node)
        running = mesh.networks()
        store = NetworkStore(node.data_dir)
        if ref is None:
            network_id = running[0]
            membership = next((m for m in store.list() if m.network_id == network_id), None)
        else:
            try:
                membership = store.get(ref)
            except MembershipError as e:
                raise ApiError(http.NOT_FOUND, str(e)) from None
            network_id = membership.network_id
            if network_id not in running:
                raise ApiError(http.NOT_FOUND,
                               f"this node does not run in network {membership.name}"
                               f" ({network_id}): it joined after the node started;"
                               f" restart the node")
        if membership is None:
            membership = SimpleNamespace(name=network_id[:8], network_id=network_id)
        return MeshNetwork(service=node, network=network_id), Scope(membership)

    def _mesh_for_vms(self, ref: str | None, vms: list[HeldVM]) -> tuple[MeshNetwork, Scope]:
        """
        The network named, else the one the VMs were requested in (when the
        node runs it), else the node's first.
        """
        if ref is None:
            network = documents.network_of(vms)
            if network is not None and network in MeshNetwork(
                    service=self._running_node()).networks():
                ref = network
        return self._mesh(ref)

    # resources

    def _status(self, request) -> dict:
        _query(request).done()
        node = self._running_node()
        status = dict(node.status(), updated_at=node.reactor.seconds())
        document = documents.node_status_document(status, alive=bool(node.running), age=0.0)
        document["api"] = {"version": API_VERSION}
        return document

    def _networks(self, request) -> dict:
        _query(request).done()
        try:
            return documents.networks_document(NetworkStore(self.node.data_dir).list())
        except StateFileError as e:
            raise ApiError(http.INTERNAL_SERVER_ERROR, str(e)) from None

    def _peers(self, request) -> list:
        query = _query(request)
        network = query.text("network", None, wanted="a network id, id prefix or name")
        query.done()
        mesh, _scope = self._mesh(network)
        return documents.peers_document(mesh)

    def _nat(self, request) -> dict:
        _query(request).done()
        node = self._running_node()
        report = node.node.nat
        if report is None or not hasattr(report, "as_dict"):
            message = "no NAT report yet"
            if not node.nat_interval:
                message += " (NAT discovery is off: --nat-interval 0)"
            raise ApiError(http.SERVICE_UNAVAILABLE, message)
        return report.as_dict()

    def _ping(self, request):
        body = _body(request)
        peer = body.text("peer", wanted="a peer id, id prefix or name")
        count = body.whole("count", 1, 1000, 4)
        interval = body.seconds("interval", 1.0)
        timeout = body.seconds("timeout", DEFAULT_TIMEOUT)
        reply_timeout = body.seconds("reply_timeout", 2.0)
        network = body.text("network", None, wanted="a network id, id prefix or name")
        body.done()
        _query(request).done()
        mesh, scope = self._mesh(network)
        view = MeshView(mesh, scope, timeout)
        return _Async(documents.ping_document(view, peer, count, interval, reply_timeout),
                      cancel_on_disconnect=True)

    def _connect(self, request):
        body = _body(request)
        peer = body.text("peer", wanted="a peer id, id prefix or name")
        timeout = body.seconds("timeout", DEFAULT_TIMEOUT)
        wait_direct = body.seconds("wait_direct", 0.0, zero=True)
        network = body.text("network", None, wanted="a network id, id prefix or name")
        body.done()
        _query(request).done()
        mesh, scope = self._mesh(network)
        view = MeshView(mesh, scope, timeout)
        return _Async(documents.connect_document(view, peer, wait_direct),
                      cancel_on_disconnect=True)

    # VMs

    def _consumer(self, mesh: MeshNetwork | None = None) -> ConsumerClient:
        return ConsumerClient(mesh, self.node.data_dir,
                              tunnels=getattr(self.node, "consumer_tunnels", None))

    def _held(self) -> list[HeldVM]:
        try:
            return self._consumer().held()
        except StateFileError as e:
            raise ApiError(http.INTERNAL_SERVER_ERROR, str(e)) from None

    def _vm_request(self, request):
        body = _body(request)
        peer = body.text("peer", None, wanted="a peer id, id prefix or name")
        find = body.flag("find")
        provider_text = body.text("provider", None, wanted="HOST:PORT")
        cpu = body.whole("cpu", 1, 0xFFFF, 1)
        memory = body.whole("memory", 16, 0xFFFFFFFF, 256)
        disk = body.whole("disk", 0, 0xFFFFFFFF, 1)
        image = body.text("image", DEFAULT_IMAGE, wanted="an image name", max_bytes=255)
        name = body.text("name", "", wanted="a label", max_bytes=255, empty=True)
        timeout = body.seconds("timeout", VM_REQUEST_TIMEOUT)
        network = body.text("network", None, wanted="a network id, id prefix or name")
        ssh_key = body.text("ssh_key", "", wanted="an SSH public key line", max_bytes=4096,
                            empty=True)
        ssh_identity = body.text("ssh_identity", "", wanted="a private key path",
                                 max_bytes=4096, empty=True)
        body.done()
        if ssh_key:
            try:
                ssh_key = sshkeys.public_line(ssh_key)
            except sshkeys.SshKeyError as e:
                raise ApiError(http.BAD_REQUEST, f"field 'ssh_key': {e}") from None
        _query(request).done()
        if [peer is not None, find, provider_text is not None].count(True) != 1:
            raise ApiError(http.BAD_REQUEST, "give exactly one of 'peer' (id, prefix or name),"
                                             " 'find': true or 'provider' (HOST:PORT)")
        provider = None
        if provider_text is not None:
            try:
                provider = parse_endpoint(provider_text)
            except AddressError as e:
                raise ApiError(http.BAD_REQUEST, f"field 'provider': {e}") from None
        before = self._held()  # a damaged state file stops us first
        mesh, scope = self._mesh(network)
        view = MeshView(mesh, scope, timeout)
        spec = VmRequest(vcpus=cpu, memory_mb=memory, disk_gb=disk, image=image, name=name,
                         ssh_key=ssh_key, ssh_identity=ssh_identity)
        client = self._consumer(mesh)
        return _Async(self._vm_changes(before, documents.vm_request_document(
            view, client, spec, peer=peer, provider=provider)))

    def _vm_list(self, request):
        query = _query(request)
        refresh = query.flag("refresh")
        timeout = query.seconds("timeout", DEFAULT_TIMEOUT)
        network = query.text("network", None, wanted="a network id, id prefix or name")
        query.done()
        held = self._held()
        if not (refresh and held):
            return documents.vm_list_document(self._consumer())

        async def refreshed() -> dict:
            await documents.vm_refresh(view, self._consumer(mesh))
            return documents.vm_list_document(self._consumer())

        mesh, scope = self._mesh_for_vms(network, held)
        view = MeshView(mesh, scope, timeout)
        return _Async(self._vm_changes(held, refreshed()))

    def _vm_show(self, request, id: str):
        query = _query(request)
        timeout = query.seconds("timeout", DEFAULT_TIMEOUT)
        network = query.text("network", None, wanted="a network id, id prefix or name")
        query.done()
        before = self._held()
        held = documents.held_vm(self._consumer(), id)
        mesh, scope = self._mesh_for_vms(network, [held])
        view = MeshView(mesh, scope, timeout)
        return _Async(self._vm_changes(before, documents.vm_show_document(
            view, self._consumer(mesh), held)))

    def _vm_release(self, request, id: str):
        return self._release(request, lambda held: [documents.held_vm(self._consumer(), id)])

    def _vm_release_all(self, request):
        return self._release(request, lambda held: held)

    def _release(self, request, targets_of):
        query = _query(request)
        timeout = query.seconds("timeout", DEFAULT_TIMEOUT)
        network = query.text("network", None, wanted="a network id, id prefix or name")
        query.done()
        before = self._held()
        targets = targets_of(before)
        if not targets:
            return {"released": [], "failed": [], "elsewhere": []}
        mesh, scope = self._mesh_for_vms(network, targets)
        view = MeshView(mesh, scope, timeout)
        return _Async(self._vm_changes(before, documents.vm_release_document(
            view, self._consumer(mesh), targets)))

    async def _vm_changes(self, before: list[HeldVM], work):
        """
        Run C{work}, then announce each held VM whose state it changed as a
        C{vm_state} event (C{released} for one no longer held).
        """
        states = {v.vm_id: v for v in before}
        try:
            return await work
        finally:
            try:
                after = {v.vm_id: v for v in self._consumer().held()}
            except StateFileError:
                after = states
            for vm_id in sorted(set(states) | set(after)):
                old, new = states.get(vm_id), after.get(vm_id)
                previous = None if old is None else old.state
                state = "released" if new is None else new.state
                if previous != state:
                    held = new or old
                    self.node.events.emit(VM_STATE, network=held.network, vm_id=vm_id,
                                          state=state, previous=previous,
                                          provider=held.provider)

    # compute jobs

    def _jobs(self, mesh: MeshNetwork | None = None) -> JobClient:
        return JobClient(self._consumer(mesh))

    def _job_id(self, ref: str) -> str:
        try:
            return self._jobs().find(ref)[0]
        except UnknownJob as e:
            raise ApiError(http.NOT_FOUND, f"{e}; GET /v1/jobs lists them") from None
        except StateFileError as e:
            raise ApiError(http.INTERNAL_SERVER_ERROR, str(e)) from None

    def _job_view(self, fields: Fields) -> tuple[MeshView, JobClient]:
        timeout = fields.seconds("timeout", DEFAULT_TIMEOUT)
        network = fields.text("network", None, wanted="a network id, id prefix or name")
        mesh, scope = self._mesh(network)
        return MeshView(mesh, scope, timeout), self._jobs(mesh)

    def _job_submit(self, request):
        body = _body(request)
        peer = body.text("peer", None, wanted="a peer id, id prefix or name")
        find = body.flag("find")
        try:
            spec = job_spec_of(body.values.get("job"))
        except ValueError as e:
            raise ApiError(http.BAD_REQUEST, f"field 'job': {e}") from None
        body.used.append("job")
        view, client = self._job_view(body)
        body.done()
        _query(request).done()
        if (peer is not None) == find:
            raise ApiError(http.BAD_REQUEST, "give exactly one of 'peer' (id, prefix or name)"
                                             " or 'find': true")

        async def submitted() -> dict:
            with documents.consumer_errors(view):
                return await client.submit(spec, provider=peer, timeout=view.timeout)

        return _Async(submitted())

    def _job_list(self, request):
        query = _query(request)
        peer = query.text("peer", None, wanted="a peer id, id prefix or name")
        view, client = self._job_view(query)
        query.done()

        async def listed() -> dict:
            with documents.consumer_errors(view):
                return {"jobs": await client.listing(peer, view.timeout)}

        return _Async(listed())

    def _job_call(self, request, id: str, call):
        query = _query(request)
        job_id = self._job_id(id)
        extra = call.fields(query) if hasattr(call, "fields") else {}
        view, client = self._job_view(query)
        query.done()

        async def answered():
            with documents.consumer_errors(view):
                return await call(client, job_id, view.timeout, **extra)

        return _Async(answered(), cancel_on_disconnect=True)

    def _job_status(self, request, id: str):
        return self._job_call(request, id, lambda c, job_id, timeout: c.status(job_id, timeout))

    def _job_cancel(self, request, id: str):
        return self._job_call(request, id, lambda c, job_id, timeout: c.cancel(job_id, timeout))

    def _job_logs(self, request, id: str):
        return self._job_call(request, id, _JobLogs())

    def _job_files(self, request, id: str):
        async def files(client, job_id, timeout) -> dict:
            fetched = await client.fetch(job_id, timeout)
            return {"job_id": job_id, "files": [
                {"path": path, "size": len(data), "data": base64.b64encode(data).decode()}
                for path, data in fetched.items()]}

        return self._job_call(request, id, files)

    # events

    def _events(self, request):
        query = _query(request)
        kinds_text = query.text("kinds", None, wanted="event kinds separated by commas")
        query.done()
        if kinds_text is None:
            kinds = DEFAULT_EVENT_KINDS
        else:
            kinds = tuple(dict.fromkeys(k.strip() for k in kinds_text.split(",") if k.strip()))
            unknown = [k for k in kinds if k not in EVENT_KINDS]
            if unknown or not kinds:
                raise ApiError(http.BAD_REQUEST,
                               f"unknown event kind(s) {', '.join(unknown) or '(none given)'};"
                               f" kinds: {', '.join(EVENT_KINDS)}")
        node = self._running_node()
        stream = EventStream(request, node.events, kinds, self.clock, keepalive=self.keepalive)
        self.streams.add(stream)
        stream.closed.addCallback(lambda _: self.streams.discard(stream))
        stream.start()
        return server.NOT_DONE_YET

    def close_streams(self) -> None:
        """End every event stream (the service stops)."""
        for stream in list(self.streams):
            stream.close()


@dataclass
class _Async:
    """A handler's answer still to come: a coroutine that returns the document."""

    coroutine: Any
    cancel_on_disconnect: bool = False


# -- the service ----------------------------------------------------------------------------


class ControlService(Service):
    """
    Serves L{ControlAPI} for C{node} on C{<data dir>/control.sock}, mode
    0600, once started (after the node, in the same C{MultiService}).

    It refuses to serve (logging why; the node keeps running) when the
    data directory is open to other users, when another live process
    serves the socket, or when the socket cannot be bound.  A socket file
    (and lock) left by a killed node is replaced.

    @param reactor: provides C{IReactorUNIX} (and the time for keepalives);
        the node's reactor when None.
    """

    log = Logger()

    def __init__(self, node, *, reactor=None, own_uid: int | None = None,
                 keepalive: float = KEEPALIVE_INTERVAL):
        self.node = node
        self._reactor = reactor
        self.own_uid = own_uid
        self.keepalive = keepalive
        self.api: ControlAPI | None = None
        self.site: ControlSite | None = None
        self.port = None
        self._dir_fd: int | None = None

    @property
    def reactor(self):
        return self._reactor if self._reactor is not None else self.node.reactor

    @property
    def path(self) -> Path:
        return control_socket_path(self.node.data_dir)

    def startService(self) -> None:
        Service.startService(self)
        data_dir = Path(self.node.data_dir)
        path = self.path
        try:
            mode = stat.S_IMODE(os.stat(data_dir).st_mode)
        except OSError as e:
            self.log.error("Control API off: cannot read {data_dir}: {error}",
                           data_dir=str(data_dir), error=e.strerror)
            return
        if mode & 0o066:
            # Search permission alone (0711, which a provider of real guests
            # sets so that QEMU reaches its disks) lists nothing and the
            # socket itself is 0600; read or write permission is refused.
            self.log.error(
                "Control API off: {data_dir} has mode {mode}, so other users could reach its"
                " control socket; run 'chmod 700 {data_dir}' and restart the node",
                data_dir=str(data_dir), mode=f"{mode:04o}")
            return
        try:
            address = self._address(data_dir)
            if self._in_use(address):
                self.log.error("Control API off: another process serves {path}", path=str(path))
                self._close_dir()
                return
            self._clear_stale(address)
            self.api = ControlAPI(self.node, clock=self.reactor, own_uid=self.own_uid,
                                  keepalive=self.keepalive)
            self.site = ControlSite(self.api, reactor=self.reactor)
            self.port = self.reactor.listenUNIX(address, self.site, mode=0o600, wantPID=True)
        except (CannotListenError, OSError) as e:
            self.log.error("Control API off: cannot listen on {path}: {error}",
                           path=str(path), error=str(e))
            self.api = None
            self._close_dir()
            return
        self.log.info("Control API listening on {path}", path=str(path))

    def _address(self, data_dir: Path) -> str:
        """
        The address to bind: the socket's path, or, when that is longer than
        a socket address can be, the same file reached through an open
        descriptor of the directory (C{/proc/self/fd/N/control.sock}).
        """
        path = str(control_socket_path(data_dir))
        if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
            return path
        self._dir_fd = os.open(data_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._dir_fd}/{CONTROL_SOCKET}"

    @staticmethod
    def _in_use(address: str) -> bool:
        """Whether a live process accepts connections on the socket."""
        if not os.path.exists(address):
            return False
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(address)
        except OSError:
            return False
        finally:
            probe.close()
        return True

    @staticmethod
    def _clear_stale(address: str) -> None:
        """
        Remove a socket nobody serves and its lock (a killed node's); Twisted's
        lock (C{wantPID}) then guards against two nodes starting at once.
        """
        lock = address + ".lock"
        try:
            if stat.S_ISSOCK(os.lstat(address).st_mode):
                os.unlink(address)
        except FileNotFoundError:
            pass
        if os.path.islink(lock):
            os.unlink(lock)

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def stopService(self) -> Deferred:
        """Stop listening, end the event streams, close the connections."""
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        port, self.port = self.port, None
        try:
            if port is not None:
                await maybeDeferred(port.stopListening)
            if self.api is not None:
                self.api.close_streams()
            if self.site is not None:
                await self.site.close_connections()
        finally:
            self._close_dir()
