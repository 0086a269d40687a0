"""
The dashboard (L{omerta.app.dashboard}).

L{GateTests} and L{DocumentTests}: the resource over a member node of the
simulated mesh (a relay and the member, as tests/test_control.py does),
spoken to in HTTP/1.1 over an in-memory transport whose client address a
test chooses: who may look, read-only, and the control API's documents.

L{OptionTests}: C{--dashboard} and C{--dashboard-allow-remote}, the token
file and the URL file C{omerta dashboard} reads.

L{BrowserTests}: a real three-node mesh on loopback (a relay and two
providers as twistd daemons), the first provider with C{--dashboard}, the
page in headless Chromium (selenium): three nodes, their path kinds, a
stopped node's state changing without a reload; screenshots of the graph
and the table in docs/screenshots/.  L{PageTests}: the page's drawing over
fixed documents (a relayed edge through its relay, punched, NAT and role
colours, sorting, filtering).  Both skip when Chromium, chromedriver or
selenium is missing and we are not root; as root (CI) that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.trial import unittest

from omerta.app import dashboard
from omerta.app.control import ControlAPI, ControlSite
from omerta.app.dashboard import (COOKIE, TOKEN_FILE, URL_FILE, DashboardResource,
                                  DashboardSite, dashboard_url,
                                  load_or_create_token)
from omerta.storage import StateFileError
from tests.test_control import OWN, MemoryConnection, parse_responses, request_bytes
from tests.test_node import MeshFixture

TOKEN = "s3cret-token-for-the-tests-0123456789"
REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "docs" / "screenshots"


class ClientConnection:
    """One HTTP connection to the dashboard from C{host}."""

    def __init__(self, site, host: str):
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.protocol = site.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def send(self, method: str, path: str, headers=None, host_header="127.0.0.1:7480") -> None:
        data = request_bytes(method, path, None, headers)
        data = data.replace(b"Host: omerta", b"Host: " + host_header.encode(), 1)
        self.protocol.dataReceived(data)

    def responses(self):
        return parse_responses(self.transport.value())

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class _MeshCase(unittest.TestCase):
    def setUp(self):
        self.fixture = MeshFixture(self)
        self.net = self.fixture.net
        self.fixture.start_relay()
        self.member = self.fixture.node("10.0.0.9", "member", nat_interval=0)
        self.assertTrue(self.net.run_until(
            lambda: any(r.state == "online" for r in self.member.node.overlay().registry.all()),
            20))

    def site(self, token=None) -> DashboardSite:
        return DashboardSite(DashboardResource(self.member, token=token,
                                               clock=self.member.reactor),
                             reactor=self.member.reactor)

    def get(self, site, path, *, host="127.0.0.1", method="GET", headers=None,
            host_header="127.0.0.1:7480"):
        connection = ClientConnection(site, host)
        connection.send(method, path, headers, host_header)
        self.net.run_until(lambda: any(r.complete for r in connection.responses()), 10)
        [response] = connection.responses()
        self.addCleanup(connection.close)
        self.assertEqual(response.headers.get("cache-control"), "no-store", path)
        return response

    def control(self, path: str):
        """What the control API answers for C{path}."""
        site = ControlSite(ControlAPI(self.member), reactor=self.member.reactor)
        connection = MemoryConnection(site, OWN)
        connection.send("GET", path)
        self.net.run_until(lambda: any(r.complete for r in connection.responses()), 10)
        [response] = connection.responses()
        self.assertEqual(response.status, 200)
        return response


class GateTests(_MeshCase):
    """Who may look at the dashboard, and how."""

    def test_loopback_without_token(self):
        """A loopback client sees the page and the documents without a token."""
        site = self.site()
        self.assertEqual(self.get(site, "/").status, 200)
        self.assertEqual(self.get(site, "/api/v1/status").status, 200)
        self.assertEqual(self.get(site, "/api/v1/status", host="127.0.0.2").status, 200)

    def test_remote_refused_without_allow_remote(self):
        """Without --dashboard-allow-remote (no token), a client off loopback gets 403."""
        site = self.site()
        for path in ("/", "/api/v1/status", "/static/dashboard.js"):
            response = self.get(site, path, host="192.0.2.7")
            self.assertEqual(response.status, 403, path)
            self.assertNotIn(b"peer_id", response.body)
        self.assertEqual(self.get(site, f"/?token={TOKEN}", host="192.0.2.7").status, 403)

    def test_remote_needs_the_token(self):
        """With a token, off loopback: 401 without it, 403 with a wrong one, 200 with it."""
        site = self.site(TOKEN)
        missing = self.get(site, "/api/v1/status", host="192.0.2.7")
        self.assertEqual(missing.status, 401)
        self.assertIn("bearer", missing.headers["www-authenticate"].lower())
        self.assertEqual(self.get(site, "/api/v1/status?token=nope", host="192.0.2.7").status,
                         403)
        self.assertEqual(self.get(site, "/", host="192.0.2.7",
                                  headers={"Authorization": "Bearer " + TOKEN[:-1]}).status, 403)
        self.assertEqual(self.get(site, "/api/v1/status", host="192.0.2.7",
                                  headers={"Authorization": "Bearer " + TOKEN}).status, 200)
        self.assertEqual(self.get(site, "/api/v1/status", host="192.0.2.7",
                                  headers={"Cookie": f"{COOKIE.decode()}={TOKEN}"}).status, 200)

    def test_token_in_url_becomes_a_cookie(self):
        """?token= on the page sets an HttpOnly, SameSite=Strict cookie; no token in the page."""
        site = self.site(TOKEN)
        response = self.get(site, f"/?token={TOKEN}", host="192.0.2.7")
        self.assertEqual(response.status, 200)
        cookie = response.headers["set-cookie"]
        self.assertIn(f"{COOKIE.decode()}={TOKEN}", cookie)
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=strict", cookie)
        self.assertNotIn(TOKEN.encode(), response.body)

    def test_token_compared_in_constant_time(self):
        """The token is checked with hmac.compare_digest."""
        calls = []
        real = dashboard.hmac.compare_digest

        def spy(a, b):
            calls.append((a, b))
            return real(a, b)

        self.patch(dashboard.hmac, "compare_digest", spy)
        self.get(self.site(TOKEN), "/", host="192.0.2.7",
                 headers={"Authorization": "Bearer x"})
        self.assertEqual(calls, [(b"x", TOKEN.encode())])

    def test_rebound_host_name_refused(self):
        """A loopback request naming another host (DNS rebinding) is refused."""
        site = self.site()
        self.assertEqual(self.get(site, "/api/v1/status", host_header="evil.example:7480").status,
                         403)
        for name in ("localhost:7480", "127.0.0.1:7480", "[::1]:7480", "127.0.0.1"):
            self.assertEqual(self.get(site, "/api/v1/status", host_header=name).status, 200,
                             name)

    def test_get_only(self):
        """Every method but GET (HEAD for pages) gets 405, the API's POST resources too."""
        site = self.site()
        for method, path in (("POST", "/api/v1/ping"), ("POST", "/api/v1/vms"),
                             ("DELETE", "/api/v1/vms"), ("PUT", "/"), ("POST", "/"),
                             ("DELETE", "/api/v1/jobs/x")):
            response = self.get(site, path, method=method)
            self.assertEqual(response.status, 405, f"{method} {path}")
            self.assertEqual(response.headers["allow"], "GET")
        self.assertEqual(self.get(site, "/api/v1/ping").status, 404)
        self.assertEqual(self.get(site, "/api/v1/jobs").status, 404)
        self.assertEqual(self.get(site, "/static/../dashboard.py").status, 404)

    def test_page_is_self_contained(self):
        """The page loads only its own script and style (a CSP), no CDN."""
        site = self.site()
        page = self.get(site, "/")
        self.assertIn("script-src 'self'", page.headers["content-security-policy"])
        for name in ("/", "/static/dashboard.js", "/static/dashboard.css"):
            body = self.get(site, name).body
            self.assertNotIn(b"http://", body.replace(b"http://www.w3.org/2000/svg", b""))
            self.assertNotIn(b"https://", body)


class DocumentTests(_MeshCase):
    """The dashboard's documents are the control API's."""

    def test_status_is_the_control_documents(self):
        """GET /api/v1/status is byte for byte GET /v1/status of the control API."""
        ours = self.get(self.site(), "/api/v1/status")
        self.assertEqual(ours.body, self.control("/v1/status").body)
        self.assertEqual(ours.json()["peer_id"], self.member.node.identity.peer_id_text)

    def test_peers_networks_vms(self):
        """Peers, networks and VMs are the control API's documents."""
        site = self.site()
        for path in ("/peers", "/networks", "/vms"):
            self.assertEqual(self.get(site, "/api/v1" + path).body,
                             self.control("/v1" + path).body, path)
        names = [p["name"] for p in self.get(site, "/api/v1/peers").json()]
        self.assertIn("relay", names)

    def test_provider_document_of_a_member(self):
        """GET /api/v1/provider says null on a node that is not a provider."""
        self.assertEqual(self.get(self.site(), "/api/v1/provider").json(), {"provider": None})

    def test_events_stream(self):
        """GET /api/v1/events is the control API's event stream."""
        connection = ClientConnection(self.site(), "127.0.0.1")
        self.addCleanup(connection.close)
        connection.send("GET", "/api/v1/events?kinds=peer_connected")
        [response] = connection.responses()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "text/event-stream; charset=utf-8")
        self.assertEqual(response.headers["cache-control"], "no-store")
        self.assertTrue(response.body.startswith(b": subscribed to peer_connected"))
        self.member.events.emit("peer_connected", peer_id=b"\x01" * 16, endpoint=None)
        self.assertIn(b"event: peer_connected", connection.responses()[0].body)


class OptionTests(unittest.TestCase):
    """--dashboard, --dashboard-allow-remote, the token and URL files."""

    def options(self, *args):
        from omerta.app.relay_tap import Options
        from omerta.crypto.identity import load_or_create_identity
        from omerta.networks import NetworkStore

        data_dir = self.mktemp()
        NetworkStore(data_dir).create(load_or_create_identity(data_dir), "lab",
                                      "127.0.0.1:7400", now=time.time())
        options = Options()
        options.parseOptions(["--data-dir", data_dir, *args])
        return options

    def test_host_port(self):
        """HOST:PORT becomes a TCP endpoint on that interface."""
        options = self.options("--dashboard", "127.0.0.1:7480")
        self.assertEqual(options["dashboard"], "tcp:7480:interface=127.0.0.1")
        options = self.options("--dashboard", "[::1]:0")
        self.assertEqual(options["dashboard"], "tcp6:0:interface=\\:\\:1")

    def test_loopback_only_without_the_flag(self):
        """A non-loopback or all-interfaces endpoint is refused without --dashboard-allow-remote."""
        for text in ("0.0.0.0:7480", "192.0.2.1:7480", "tcp:7480"):
            with self.assertRaises(usage.UsageError) as caught:
                self.options("--dashboard", text)
            self.assertIn("--dashboard-allow-remote", str(caught.exception))
        options = self.options("--dashboard", "0.0.0.0:7480", "--dashboard-allow-remote")
        self.assertEqual(options["dashboard"], "tcp:7480:interface=0.0.0.0")

    def test_open_token_file_refused(self):
        """With --dashboard-allow-remote, a token file others can read is a usage error."""
        options = self.options("--dashboard", "0.0.0.0:0", "--dashboard-allow-remote")
        token_file = Path(options["data-dir"]) / TOKEN_FILE
        load_or_create_token(options["data-dir"])
        token_file.chmod(0o640)
        from omerta.app.relay_tap import Options

        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--data-dir", str(options["data-dir"]), "--dashboard",
                                    "0.0.0.0:0", "--dashboard-allow-remote"])
        self.assertIn("chmod 600", str(caught.exception))

    def test_bad_endpoints(self):
        """Garbage, non-TCP endpoints and the flag alone are usage errors."""
        for args in (["--dashboard", "7480"], ["--dashboard", "unix:/tmp/x"],
                     ["--dashboard", "127.0.0.1:99999"], ["--dashboard-allow-remote"]):
            self.assertRaises(usage.UsageError, self.options, *args)

    def test_service_only_when_asked(self):
        """make_node_service adds the dashboard service only with --dashboard."""
        from omerta.app.options import make_node_service

        self.assertNotIn("dashboard", [s.name for s in make_node_service(self.options())])
        top = make_node_service(self.options("--dashboard", "127.0.0.1:0"))
        self.assertIn("dashboard", [s.name for s in top])

    def test_token_file(self):
        """The token is made 0600 on first use, then read back; a file open to others is refused."""
        data_dir = Path(self.mktemp())
        data_dir.mkdir()
        token = load_or_create_token(data_dir)
        path = data_dir / TOKEN_FILE
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertGreaterEqual(len(token), 32)
        self.assertEqual(load_or_create_token(data_dir), token)
        path.chmod(0o644)
        self.assertRaises(StateFileError, load_or_create_token, data_dir)

    def test_url_file(self):
        """omerta dashboard's URL: as written, with the token when one is needed."""
        data_dir = Path(self.mktemp())
        data_dir.mkdir()
        self.assertIsNone(dashboard_url(data_dir))
        (data_dir / URL_FILE).write_text(json.dumps(
            {"url": "http://127.0.0.1:7480/", "token_required": False, "pid": os.getpid()}))
        self.assertEqual(dashboard_url(data_dir)["url"], "http://127.0.0.1:7480/")
        (data_dir / URL_FILE).write_text(json.dumps(
            {"url": "http://192.0.2.1:7480/", "token_required": True, "pid": os.getpid()}))
        token = load_or_create_token(data_dir)
        self.assertEqual(dashboard_url(data_dir)["url"], f"http://192.0.2.1:7480/?token={token}")


class ServiceTests(unittest.TestCase):
    """DashboardService on a real loopback port."""

    def test_url_file_while_running(self):
        """Listening writes dashboard.json (a URL, no token); stopping removes it."""
        from types import SimpleNamespace

        from twisted.internet import reactor

        from omerta.app.dashboard import DashboardService

        data_dir = Path(self.mktemp())
        data_dir.mkdir(mode=0o700)
        node = SimpleNamespace(data_dir=data_dir, reactor=reactor, running=True, node=None)
        service = DashboardService("tcp:0:interface=127.0.0.1", node, allow_remote=True)
        self.assertFalse((data_dir / URL_FILE).exists())
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.assertIsNotNone(service.port)  # TCP listens synchronously
        written = json.loads((data_dir / URL_FILE).read_text())
        self.assertEqual(written["url"], f"http://127.0.0.1:{service.port.getHost().port}/")
        self.assertIs(written["token_required"], True)
        token = (data_dir / TOKEN_FILE).read_text().strip()
        self.assertNotIn(token, (data_dir / URL_FILE).read_text())
        d = service.stopService()
        d.addCallback(lambda _: self.assertFalse((data_dir / URL_FILE).exists()))
        return d


class CommandTests(unittest.TestCase):
    """omerta dashboard."""

    def run_cli(self, data_dir, *args):
        import io

        from omerta.app import cli

        stdout, stderr = io.StringIO(), io.StringIO()
        status = cli.main(["--data-dir", str(data_dir), *args, "dashboard"],
                          stdout=stdout, stderr=stderr)
        return status, stdout.getvalue(), stderr.getvalue()

    def test_prints_the_url(self):
        """It prints the URL the node wrote, with the token when one is needed; JSON too."""
        data_dir = Path(self.mktemp())
        data_dir.mkdir(mode=0o700)
        (data_dir / URL_FILE).write_text(json.dumps(
            {"url": "http://0.0.0.0:7480/", "token_required": True, "pid": os.getpid()}))
        token = load_or_create_token(data_dir)
        status, out, _err = self.run_cli(data_dir)
        self.assertEqual((status, out), (0, f"http://0.0.0.0:7480/?token={token}\n"))
        status, out, _err = self.run_cli(data_dir, "--output", "json")
        self.assertEqual(json.loads(out), {"url": f"http://0.0.0.0:7480/?token={token}",
                                           "token_required": True})

    def test_no_dashboard(self):
        """Without a running dashboard it says how to start one."""
        data_dir = Path(self.mktemp())
        data_dir.mkdir(mode=0o700)
        status, out, err = self.run_cli(data_dir)
        self.assertEqual((status, out), (2, ""))
        self.assertIn("--dashboard 127.0.0.1:7480", err)


# -- in a browser ---------------------------------------------------------------------------


def require_browser():
    """
    (chromium, chromedriver) paths; skip when they (or selenium) are
    missing and we are not root; as root (CI, scripts/setup-env) fail.
    """
    from twisted.trial.unittest import SkipTest

    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if not missing:
        return shutil.which("chromium"), shutil.which("chromedriver")
    message = (f"needs {', '.join(missing)} (Debian packages chromium chromium-driver;"
               f" run scripts/setup-env as root)")
    if os.geteuid() != 0:
        raise SkipTest(message)
    raise AssertionError(message)


def open_browser(testcase, chromium: str, chromedriver: str):
    """Headless Chromium driven by selenium, quit at C{testcase}'s cleanup."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", "--window-size=1280,1200",
                 "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    testcase.addCleanup(driver.quit)
    driver.set_page_load_timeout(30)
    return driver


SNAPSHOT = """
    const rows = [...document.querySelectorAll('#peers tbody tr')].map((tr) => ({
        name: tr.cells[1].textContent, state: tr.dataset.state, kind: tr.dataset.kind,
        peer: tr.dataset.peer}));
    const nodes = [...document.querySelectorAll('#graph g.node')].map((g) => ({
        peer: g.dataset.peer, state: g.dataset.state}));
    const edges = [...document.querySelectorAll('#graph polyline')].map((e) => ({
        peer: e.dataset.peer, kind: e.dataset.kind}));
    return {rows, nodes, edges, live: document.getElementById('live').dataset.state};
"""
"""The page's table and graph, read in one go (the page redraws them on every update)."""


class BrowserTests(unittest.TestCase):
    """The page in headless Chromium over a real three-node mesh on loopback."""

    timeout = 150

    def setUp(self):
        self.chromium, self.chromedriver = require_browser()
        from tests.integration import Daemon, free_udp_port, loopback_relay

        base = os.path.abspath(self.mktemp())
        self.relay, self.relay_port, self.network = loopback_relay(self, base, "dash")
        common = ("--interface", "127.0.0.1", "--nat-interval", "0", "--invite",
                  self.network.invite, "--jobs", "none")
        self.provider = Daemon(self, "omerta-provider", f"{base}/provider", "--name", "provider",
                               "--port", str(free_udp_port()), "--dashboard", "127.0.0.1:0",
                               *common)
        self.other = Daemon(self, "omerta-provider", f"{base}/other", "--name", "provider-2",
                            "--port", str(free_udp_port()), *common)

    def describe(self) -> str:
        return "\n".join(f"{d.data_dir.name} log:\n{d.output()[-3000:]}"
                         for d in (self.relay, self.provider, self.other))

    def online(self, daemon) -> set:
        return {p["name"] for p in daemon.status().get("peers", []) if p["state"] == "online"}

    def browser(self):
        return open_browser(self, self.chromium, self.chromedriver)

    def test_mesh_live_in_a_browser(self):
        """Three nodes, their path kinds, a stopped node shown live; screenshots."""
        return ensureDeferred(self._mesh_live())

    async def _mesh_live(self):
        from twisted.internet import threads

        from tests.integration import wait_for

        await wait_for(lambda: {"relay", "provider-2"} <= self.online(self.provider), 45,
                       "the provider to see the relay and provider-2 online",
                       describe=self.describe)
        url = await wait_for(lambda: dashboard_url(self.provider.data_dir), 15,
                             "the provider's dashboard URL", describe=self.describe)
        from tests.integration import run_cli

        printed = run_cli("--data-dir", str(self.provider.data_dir), "dashboard")
        self.assertEqual(printed.stdout.strip(), url["url"], printed.stderr)
        status = self.provider.status()
        kinds = {p["name"]: (p["path"] or {}).get("kind") for p in status["peers"]}
        # the browser works in a thread: the reactor keeps running the test's waits
        result = await threads.deferToThread(self._in_browser, url["url"], kinds)
        self.assertEqual(result, "ok")

    def _in_browser(self, url: str, kinds: dict) -> str:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = self.browser()
        driver.get(url)
        wait = WebDriverWait(driver, 30, poll_frequency=0.2)

        def page() -> dict:
            return driver.execute_script(SNAPSHOT)

        def rows() -> dict:
            return {row["name"]: row for row in page()["rows"]}

        wait.until(lambda d: {"relay", "provider-2"} <= set(rows())
                   and all(r["state"] == "online" for r in rows().values()),
                   "the table to list the relay and provider-2 online")
        # three nodes in the graph: this one and its two peers, with their path kinds
        seen = page()
        assert len(seen["nodes"]) == 3, f"{len(seen['nodes'])} nodes in the graph"
        edges = {e["peer"]: e["kind"] for e in seen["edges"]}
        for row in seen["rows"]:
            assert row["kind"] == kinds[row["name"]], (row, kinds)
            assert edges[row["peer"]] == kinds[row["name"]], (row, edges, kinds)
        assert seen["live"] == "live", seen["live"]
        # the filter and the sort
        driver.find_element(By.ID, "filter").send_keys("relay")
        wait.until(lambda d: list(rows()) == ["relay"], "the filter to keep the relay only")
        driver.execute_script("const f = document.getElementById('filter'); f.value = '';"
                              " f.dispatchEvent(new Event('input'))")
        driver.find_element(By.CSS_SELECTOR, '#peers th[data-key="name"]').click()
        wait.until(lambda d: list(rows()) == ["relay", "provider-2"], "a descending sort by name")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for section, name in (("graph-section", "dashboard-graph.png"),
                              ("peers-section", "dashboard-peers.png")):
            driver.find_element(By.ID, section).screenshot(str(SCREENSHOTS / name))
        driver.save_screenshot(str(SCREENSHOTS / "dashboard.png"))
        # a node stops: its row and its node in the graph leave "online", no reload
        marker = driver.execute_script("return window.__kept = Math.random()")
        peer_id = rows()["provider-2"]["peer"]
        self.other.stop()

        def stopped_shown(d) -> bool:
            seen = page()
            row = {r["name"]: r for r in seen["rows"]}["provider-2"]
            node = {n["peer"]: n for n in seen["nodes"]}.get(peer_id)
            return row["state"] != "online" and node is not None and node["state"] != "online"

        WebDriverWait(driver, 60, poll_frequency=0.25).until(
            stopped_shown, "provider-2 to leave 'online' in the table and the graph")
        assert driver.execute_script("return window.__kept") == marker, "the page reloaded"
        driver.find_element(By.ID, "graph-section").screenshot(
            str(SCREENSHOTS / "dashboard-graph-stopped.png"))
        return "ok"


RELAY, FAR, NEAR = "aa" * 16, "bb" * 16, "cc" * 16
FIXTURE = {
    "/api/v1/status": {
        "peer_id": "ee" * 16, "name": "me", "capabilities": ["provider"], "metrics": {},
        "network_status": [], "nat": None, "resources": {},
        "peers": [
            {"peer_id": RELAY, "active": True, "path": {
                "kind": "direct", "endpoint": "192.0.2.1:7400", "rtt_ms": 1.5, "via": None}},
            {"peer_id": FAR, "active": True, "path": {
                "kind": "relayed", "endpoint": "192.0.2.1:7400", "rtt_ms": 30.0, "via": RELAY}},
            {"peer_id": NEAR, "active": True, "path": {
                "kind": "punched", "endpoint": "198.51.100.4:4000", "rtt_ms": 12.0,
                "via": None}},
        ]},
    "/api/v1/peers": [
        {"peer_id": RELAY, "name": "relay-a", "nat_type": "public", "capabilities": ["relay"],
         "state": "online", "gone": False, "rtt_ms": 1.5, "last_heard_ago_s": 0.2},
        {"peer_id": FAR, "name": "far", "nat_type": "symmetric", "capabilities": [],
         "state": "online", "gone": False, "rtt_ms": 30.0, "last_heard_ago_s": 1.0},
        {"peer_id": NEAR, "name": "near", "nat_type": "port_restricted_cone",
         "capabilities": ["provider"], "state": "suspect", "gone": False, "rtt_ms": 12.0,
         "last_heard_ago_s": 7.5},
    ],
    "/api/v1/vms": {"vms": []},
    "/api/v1/provider": {"provider": None},
}


class FixtureResource(DashboardResource):
    """The dashboard's page over fixed documents (no node): the page's own logic."""

    def __init__(self):
        from twisted.web.resource import Resource

        Resource.__init__(self)
        self.token = None

    def render(self, request):
        path = request.path.decode()
        if path in FIXTURE:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(FIXTURE[path]).encode()
        if path.startswith("/api/"):
            request.setResponseCode(404)
            return b"{}"
        return super().render(request)


class PageTests(unittest.TestCase):
    """The page's drawing, over fixed documents, in headless Chromium."""

    timeout = 90

    def setUp(self):
        from twisted.internet import reactor
        from twisted.web.server import Site

        self.chromium, self.chromedriver = require_browser()
        self.port = reactor.listenTCP(0, Site(FixtureResource()), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def test_paths_sort_filter(self):
        """Relayed edges go through their relay; kinds and NAT drawn; sort by RTT; filter."""
        from twisted.internet import threads

        url = f"http://127.0.0.1:{self.port.getHost().port}/"
        return threads.deferToThread(self._in_browser, url)

    def _in_browser(self, url: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = open_browser(self, self.chromium, self.chromedriver)
        driver.get(url)
        wait = WebDriverWait(driver, 30, poll_frequency=0.2)

        def page() -> dict:
            return driver.execute_script(SNAPSHOT)

        wait.until(lambda d: len(page()["rows"]) == 3, "three rows")
        points = driver.execute_script(
            "const p = {}; for (const e of document.querySelectorAll('#graph polyline'))"
            " p[e.dataset.peer] = [e.dataset.kind, e.getAttribute('points').split(' ')];"
            " const g = {}; for (const n of document.querySelectorAll('#graph g.node'))"
            " g[n.dataset.peer] = n.querySelector('circle.role-relay, circle.role-provider,"
            " circle.role-member').getAttribute('class');"
            " return [p, g, [...document.querySelectorAll('#graph g.node')].map("
            "(n) => [n.dataset.peer, n.querySelector('circle').getAttribute('cx') + ','"
            " + n.querySelector('circle').getAttribute('cy')])];")
        edges, roles, centres = points
        centres = dict(centres)
        assert edges[RELAY] == ["direct", ["320,220", centres[RELAY]]], edges
        assert edges[NEAR][0] == "punched" and len(edges[NEAR][1]) == 2, edges
        assert edges[FAR] == ["relayed", ["320,220", centres[RELAY], centres[FAR]]], edges
        assert "role-relay" in roles[RELAY] and "role-provider" in roles[NEAR], roles
        assert "role-self" in roles["ee" * 16], roles
        states = {n["peer"]: n["state"] for n in page()["nodes"]}
        assert states[NEAR] == "suspect", states
        driver.find_element(By.CSS_SELECTOR, '#peers th[data-key="rtt_ms"]').click()
        wait.until(lambda d: [r["name"] for r in page()["rows"]] == ["relay-a", "near", "far"],
                   "rows by RTT")
        driver.find_element(By.CSS_SELECTOR, '#peers th[data-key="rtt_ms"]').click()
        wait.until(lambda d: [r["name"] for r in page()["rows"]] == ["far", "near", "relay-a"],
                   "rows by RTT, descending")
        driver.find_element(By.ID, "filter").send_keys("symmetric")
        wait.until(lambda d: [r["name"] for r in page()["rows"]] == ["far"], "the filter")
        assert driver.find_element(By.ID, "provider-section").get_attribute("hidden") is not None
