"""
C{--dashboard ENDPOINT}: a live view of the mesh in a browser, served by the
node over HTTP (twisted.web), for example C{--dashboard 127.0.0.1:7480} (or
C{tcp:7480:interface=127.0.0.1}), then open the URL C{omerta dashboard}
prints.

    GET /                        the page (HTML, vanilla JavaScript, inline SVG)
    GET /static/NAME             its script and style sheet
    GET /api/v1/status           } the control API's documents, answered by the
    GET /api/v1/peers            } control API's own handlers (L{ControlAPI}):
    GET /api/v1/networks         } one source of truth
    GET /api/v1/nat              }
    GET /api/v1/vms              }
    GET /api/v1/events           the control API's event stream (server-sent events)
    GET /api/v1/provider         the provider role's status (capacity, VMs, jobs), as
                                 the manhole shows it; C{{"provider": null}} otherwise

Read-only: every other method is refused (405), and only these resources
exist.  Every response is C{Cache-Control: no-store}.

Who may look: the endpoint must be loopback unless C{--dashboard-allow-remote};
a client that is not on loopback is refused (403) without that flag, and with
it must show the token of C{<data dir>/dashboard.token} (0600, made on first
use, never logged): C{?token=...} on the URL (the page then keeps it in an
HttpOnly, SameSite=Strict cookie), a cookie or C{Authorization: Bearer ...};
compared in constant time.  Loopback clients must name the host by address
or as C{localhost} (a page elsewhere cannot reach the dashboard by
re-binding a DNS name to 127.0.0.1) unless they show the token.

Once listening, the node writes C{<data dir>/dashboard.json} (the URL and
whether a token is needed, never the token) for C{omerta dashboard}; it is
removed when the node stops.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import http, server
from twisted.web.resource import Resource

from omerta import storage
from omerta.app.control import API_VERSION, ROUTES, ApiError, ControlAPI, ControlRequest

TOKEN_FILE = "dashboard.token"
URL_FILE = "dashboard.json"
COOKIE = b"omerta_dashboard"

API_PREFIX = "/api"
PROVIDER_PATH = "/v1/provider"
READ_ONLY = ("status", "networks", "peers", "nat", "vm_list", "events")
"""The control API's handlers the dashboard serves (all GET)."""

STATIC = {
    "index.html": b"text/html; charset=utf-8",
    "dashboard.js": b"text/javascript; charset=utf-8",
    "dashboard.css": b"text/css; charset=utf-8",
}

REMOTE_EXPLANATION = (
    "the dashboard listens on loopback only (e.g. --dashboard 127.0.0.1:7480); add"
    " --dashboard-allow-remote to serve other hosts (they then need the token of"
    " DATA_DIR/dashboard.token)"
)


# -- options ------------------------------------------------------------------------------


def endpoint_description(text: str) -> str:
    """
    C{HOST:PORT} (C{[V6]:PORT}) as a twisted server endpoint; an endpoint
    description (C{tcp:...}, C{tcp6:...}) as it is.
    """
    if text.startswith(("tcp:", "tcp6:")):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise usage.UsageError(
            f"--dashboard {text!r}: give HOST:PORT such as 127.0.0.1:7480, or a server"
            f" endpoint such as tcp:7480:interface=127.0.0.1")
    host = host.strip("[]")
    kind = "tcp6" if ":" in host else "tcp"
    return f"{kind}:{port}:interface={host.replace(':', chr(92) + ':')}"


def check_dashboard_options(options) -> None:
    """
    Validate C{--dashboard} and C{--dashboard-allow-remote}; sets
    C{options["dashboard"]} to a server endpoint description.

    @raise usage.UsageError: unparseable, not TCP, not loopback (without
        C{--dashboard-allow-remote}), or an unsafe token file.
    """
    from twisted.internet import endpoints

    text = options["dashboard"]
    description = endpoint_description(text)
    try:
        _name, args, kwargs = endpoints._parseServer(description, None)
    except (ValueError, TypeError) as e:
        raise usage.UsageError(f"--dashboard {text!r}: {e}") from None
    if description.split(":", 1)[0] not in ("tcp", "tcp6"):
        raise usage.UsageError(f"--dashboard {text!r}: give a TCP endpoint")
    try:
        port = int(args[0]) if args else -1
    except (TypeError, ValueError):
        port = -1
    if not 0 <= port <= 65535:
        raise usage.UsageError(f"--dashboard {text!r}: give a port from 0 to 65535")
    interface = kwargs.get("interface", "")
    if not options["dashboard-allow-remote"]:
        try:
            address = ipaddress.ip_address(interface)
        except ValueError:
            raise usage.UsageError(
                f"--dashboard {text}: {'no interface' if not interface else interface}"
                f" is not a loopback address; {REMOTE_EXPLANATION}") from None
        if not address.is_loopback:
            raise usage.UsageError(
                f"--dashboard {text}: {interface} is not a loopback address;"
                f" {REMOTE_EXPLANATION}")
    options["dashboard"] = description
    if options["dashboard-allow-remote"] and options["data-dir"]:
        token_file = Path(options["data-dir"]).expanduser() / TOKEN_FILE
        try:
            if token_file.exists():
                storage.check_private(token_file)
        except storage.StateFileError as e:
            raise usage.UsageError(str(e)) from None


# -- the token ----------------------------------------------------------------------------


def load_or_create_token(data_dir) -> str:
    """
    The dashboard token of C{data_dir}: read (refused when others can read
    it), or made and written 0600 on first use.

    @raise storage.StateFileError: the file is open to others or damaged.
    """
    path = Path(data_dir) / TOKEN_FILE
    try:
        storage.check_private(path)
        token = path.read_text("ascii").strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        storage.atomic_write(path, token.encode("ascii") + b"\n")
        return token
    except (UnicodeDecodeError, ValueError):
        raise storage.StateFileError(
            f"{path} is damaged; delete it and restart the node to make a new one") from None
    if len(token) < 16:
        raise storage.StateFileError(
            f"{path} holds too short a token; delete it and restart the node")
    return token


def dashboard_url(data_dir) -> dict | None:
    """
    What C{omerta dashboard} prints: C{{"url": ..., "token_required": ...}}
    of the node running on C{data_dir} (the token added to the URL when
    needed), or None when it serves no dashboard.
    """
    path = Path(data_dir) / URL_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise storage.StateFileError(f"{path}: {e}; delete it and restart the node") from None
    pid = document.get("pid")
    if isinstance(pid, int) and not storage.pid_alive(pid):
        return None
    url = document["url"]
    if document.get("token_required"):
        url += "?token=" + load_or_create_token(data_dir)
    return {"url": url, "token_required": bool(document.get("token_required"))}


def _loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _local_host_header(value: bytes | None) -> bool:
    """Whether a Host header names this host by address or as localhost."""
    if not value:
        return True
    text = value.decode("ascii", "replace").lower()
    if text.startswith("["):
        host = text[1:text.find("]")]
    else:
        host = text.rsplit(":", 1)[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- the resources ------------------------------------------------------------------------


class DashboardAPI(ControlAPI):
    """
    The control API's read-only documents and event stream, for the
    dashboard: its handlers, under C{/api}; who may ask is
    L{DashboardResource}'s business.
    """

    def _check_peer(self, request) -> None:
        return None

    def _route(self, request):
        path = request.path.decode("utf-8", "replace")[len(API_PREFIX):]
        method = request.method.decode("ascii", "replace").upper()
        if path.rstrip("/") == PROVIDER_PATH:
            if method != "GET":
                raise ApiError(http.NOT_ALLOWED, "the dashboard is read-only; use GET",
                               allow=("GET",))
            return self._provider, {}
        for route in ROUTES:
            params = route.match(path)
            if params is None:
                continue
            name = route.methods.get("GET")
            if name in READ_ONLY:
                if method != "GET":
                    raise ApiError(http.NOT_ALLOWED, "the dashboard is read-only; use GET",
                                   allow=("GET",))
                return getattr(self, f"_{name}"), params
        served = [f"GET {API_PREFIX}{r.path}" for r in ROUTES if r.methods.get("GET") in READ_ONLY]
        raise ApiError(http.NOT_FOUND,
                       f"no resource {path}; the dashboard serves {', '.join(served)}"
                       f" and GET {API_PREFIX}{PROVIDER_PATH} (API version {API_VERSION})")

    def _provider(self, request) -> dict:
        """
        The provider role's own status (capacity, free, VMs, jobs), as the
        manhole shows it; C{{"provider": null}} on a node that is not one.
        """
        from omerta.app.control import _query

        _query(request).done()
        node = self._running_node()
        parent = getattr(node, "parent", None)
        try:
            provider = parent.getServiceNamed("provider") if parent is not None else None
        except KeyError:
            provider = None
        return {"provider": None if provider is None else provider.status()}


class DashboardResource(Resource):
    """
    The whole dashboard: the gate (method, client address, Host, token),
    then the page, its static files or L{DashboardAPI}.

    @param token: the token clients off loopback must show; None when only
        loopback is served (then they are refused).
    """

    isLeaf = True
    log = Logger()

    def __init__(self, node, *, token: str | None = None, clock=None, keepalive=None):
        super().__init__()
        self.token = token
        kwargs = {} if keepalive is None else {"keepalive": keepalive}
        self.api = DashboardAPI(node, clock=clock, **kwargs)

    def render(self, request):
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        method = request.method.upper()
        if method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET")
            return self._plain(request, http.NOT_ALLOWED, "the dashboard is read-only; use GET")
        refused = self._gate(request)
        if refused is not None:
            return refused
        path = request.path.decode("utf-8", "replace")
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            if method == b"HEAD":
                return self._plain(request, http.NOT_ALLOWED, "use GET")
            return self.api.render(request)
        if path in ("/", "/index.html"):
            return self._static(request, "index.html")
        if path.startswith("/static/") and path[len("/static/"):] in STATIC:
            return self._static(request, path[len("/static/"):])
        return self._plain(request, http.NOT_FOUND, "no such page; open /")

    def _gate(self, request):
        """None when the client may look; else the refusal's body."""
        client = request.getClientAddress()
        host = getattr(client, "host", None)
        shown = self._shown_token(request)
        if host is not None and _loopback(host):
            if shown is None and not _local_host_header(request.getHeader(b"host")):
                return self._plain(request, http.FORBIDDEN,
                                   "open the dashboard as 127.0.0.1 or localhost")
            if shown is None or self.token is None:
                return None
        elif self.token is None:
            return self._plain(request, http.FORBIDDEN,
                               "this dashboard answers this host only (loopback)")
        if shown is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="omerta dashboard"')
            return self._plain(request, http.UNAUTHORIZED,
                               "give the dashboard token (omerta dashboard prints the URL"
                               " with it)")
        if self.token is None or not hmac.compare_digest(shown.encode("utf-8"),
                                                         self.token.encode("ascii")):
            return self._plain(request, http.FORBIDDEN, "wrong dashboard token")
        if self._query_token(request) is not None:
            request.addCookie(COOKIE, self.token.encode("ascii"), path=b"/", httpOnly=True,
                              secure=request.isSecure(), sameSite="strict")
        return None

    def _query_token(self, request) -> str | None:
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        for name, value in parse_qsl(query.decode("utf-8", "replace")):
            if name == "token":
                return value
        return None

    def _shown_token(self, request) -> str | None:
        token = self._query_token(request)
        if token is not None:
            return token
        header = request.getHeader(b"authorization")
        if header and header.lower().startswith(b"bearer "):
            return header[7:].strip().decode("utf-8", "replace")
        cookie = request.getCookie(COOKIE)
        if cookie:
            return cookie.decode("utf-8", "replace")
        return None

    def _plain(self, request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return (json.dumps({"error": message}) + "\n").encode("ascii")

    def _static(self, request, name: str) -> bytes:
        body = resources.files("omerta.app").joinpath("dashboard_static", name).read_bytes()
        request.setHeader(b"content-type", STATIC[name])
        if name == "index.html":
            request.setHeader(b"content-security-policy",
                              b"default-src 'none'; script-src 'self'; style-src 'self';"
                              b" connect-src 'self'; img-src 'self' data:;"
                              b" frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
            request.setHeader(b"x-frame-options", b"DENY")
        return body


class DashboardSite(server.Site):
    """The dashboard's site: no access log (a URL may carry the token)."""

    noisy = False
    displayTracebacks = False
    requestFactory = ControlRequest

    def log(self, request) -> None:
        return None


class DashboardService(Service):
    """
    Serves L{DashboardResource} for C{node} on C{endpoint} once started, and
    writes C{dashboard.json} for C{omerta dashboard}.

    @param allow_remote: serve clients off loopback, with the token.
    """

    log = Logger()

    def __init__(self, endpoint: str, node, *, allow_remote: bool = False, reactor=None):
        self.setName("dashboard")
        self.endpoint = endpoint
        self.node = node
        self.allow_remote = allow_remote
        self._reactor = reactor
        self.resource: DashboardResource | None = None
        self.site: DashboardSite | None = None
        self.port = None
        self.url: str | None = None

    @property
    def reactor(self):
        return self._reactor if self._reactor is not None else self.node.reactor

    def startService(self) -> None:
        Service.startService(self)
        from twisted.internet import endpoints

        try:
            token = load_or_create_token(self.node.data_dir) if self.allow_remote else None
        except (storage.StateFileError, OSError) as e:
            self.log.error("Dashboard off: {error}", error=str(e))
            return
        self.resource = DashboardResource(self.node, token=token, clock=self.reactor)
        self.site = DashboardSite(self.resource, reactor=self.reactor)
        endpoint = endpoints.serverFromString(self.reactor, self.endpoint)
        d = endpoint.listen(self.site)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port) -> None:
        if not self.running:
            port.stopListening()
            return
        self.port = port
        address = port.getHost()
        host = address.host
        if ipaddress.ip_address(host).is_unspecified:
            host = "127.0.0.1" if address.type == "TCP" and ":" not in host else "::1"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{address.port}/"
        try:
            storage.write_json(Path(self.node.data_dir) / URL_FILE, {
                "url": self.url, "token_required": self.allow_remote, "pid": os.getpid()})
        except OSError as e:
            self.log.error("Dashboard: cannot write {file}: {error}", file=URL_FILE,
                           error=str(e))
        self.log.info("Dashboard at {url}{note}", url=self.url,
                      note=" (remote clients need the token of dashboard.token)"
                      if self.allow_remote else "")

    def _failed(self, failure) -> None:
        self.log.error("Dashboard off: cannot listen on {endpoint}: {error}",
                       endpoint=self.endpoint, error=failure.getErrorMessage())

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        port, self.port = self.port, None
        if port is None:
            return
        try:
            (Path(self.node.data_dir) / URL_FILE).unlink()
        except OSError:
            pass
        await maybeDeferred(port.stopListening)
        if self.resource is not None:
            self.resource.api.close_streams()
