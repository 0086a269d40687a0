"""
The control API (L{omerta.app.control}).

L{ResourceTests}: every resource against a member node on the simulated
network (a relay and two providers on the in-memory L{FakeBackend}, as in
tests/test_consumer_client.py), spoken to in HTTP/1.1 over an in-memory
transport that reports the peer credentials a test chooses.  The nodes are
L{NodeService}s (the API serves one: its status, data directory and
networks) on the simulator's hosts; time is the simulator's.

L{SocketTests}: the L{ControlService} on a real Unix socket with the real
reactor: the socket's mode, a stale socket replaced, a directory open to
others refused, bad requests, event streams, and a request from another uid
(as C{nobody}, when the tests run as root).
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from omerta.app import cli, control, documents
from omerta.app.control import (CONTROL_SOCKET, MAX_BODY, STREAM_BACKLOG, ControlAPI,
                                ControlService, ControlSite, control_socket_path, jsonable)
from omerta.crypto.identity import load_or_create_identity
from omerta.crypto.wireguard import load_or_create_key


from omerta.mesh.peer import RelayRoute
from omerta.mesh.service import NodeService
from omerta.roles.consumer import ConsumerStore
from omerta.roles.provider import ProviderService
from omerta.roles.vm import Quota
from omerta.stun.discovery import Behaviour, NatReport
from omerta.wire.messages import Capability, NatType
from tests.test_node import PORT, MeshFixture
from tests.test_provider import HOST, FakeBackend

OWN = (4321, os.getuid(), os.getgid())
"""Peer credentials of a process of the node's own user."""


# -- HTTP, as a client sees it --------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes
    complete: bool

    def json(self):
        return json.loads(self.body)


def request_bytes(method: str, path: str, body=None, headers: dict | None = None) -> bytes:
    """One HTTP/1.1 request; C{body} a dict (sent as JSON) or bytes."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: omerta"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def parse_responses(data: bytes) -> list[Response]:
    """
    The responses in C{data}, in order; the last one may be incomplete (a
    stream: its body is the chunks received so far).
    """
    responses = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = data[end + 4:]
        if "content-length" in headers:
            length = int(headers["content-length"])
            responses.append(Response(status, headers, rest[:length], len(rest) >= length))
            data = rest[length:]
            continue
        if headers.get("transfer-encoding") != "chunked":
            responses.append(Response(status, headers, rest, False))
            break
        body, position, complete = b"", 0, False
        while True:
            line_end = rest.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(rest[position:line_end], 16)
            if size == 0:
                complete = len(rest) >= line_end + 4
                position = line_end + 4
                break
            if len(rest) < line_end + 2 + size + 2:
                break
            body += rest[line_end + 2:line_end + 2 + size]
            position = line_end + 2 + size + 2
        responses.append(Response(status, headers, body, complete))
        if not complete:
            break
        data = rest[position:]
    return responses


def sse_events(body: bytes) -> list[tuple[str, dict]]:
    """The (kind, data) of each event in a stream's body (comments skipped)."""
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n")
                      if line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


# -- in memory ----------------------------------------------------------------------------


class FakeHandle:
    """A socket that answers SO_PEERCRED with the credentials given (None: it cannot)."""

    def __init__(self, credentials):
        self.credentials = credentials

    def getsockopt(self, level, option, size):
        if (level, option) != (socket.SOL_SOCKET, socket.SO_PEERCRED) or self.credentials is None:
            raise OSError("no peer credentials")
        return struct.pack("3i", *self.credentials)


class PeerTransport(StringTransport):
    def __init__(self, credentials):
        super().__init__()
        self.handle = FakeHandle(credentials)

    def getHandle(self):
        return self.handle


class MemoryConnection:
    """One HTTP connection to the API over a L{StringTransport}."""

    def __init__(self, site, credentials=OWN):
        self.transport = PeerTransport(credentials)
        self.protocol = site.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def send(self, method: str, path: str, body=None, headers=None) -> None:
        self.protocol.dataReceived(request_bytes(method, path, body, headers))

    def responses(self) -> list[Response]:
        return parse_responses(self.transport.value())

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class ResourceTests(unittest.TestCase):
    """
    Each resource against a member node ("daemon") of a simulated mesh with
    a relay and two providers.
    """

    def setUp(self):
        self.fixture = MeshFixture(self)
        self.net = self.fixture.net
        self.fixture.start_relay()
        self.backends, self.providers = {}, {}
        for ip, name in (("10.0.0.2", "provider-1"), ("10.0.0.3", "provider-2")):
            node = self.fixture.node(ip, name, capabilities=Capability.PROVIDER)
            backend = FakeBackend(Quota(max_vms=3, cpu_cores=4, memory_mb=4096, disk_gb=50))
            provider = ProviderService(node, backend, HOST, node.data_dir)
            provider.startService()
            self.addCleanup(lambda p=provider: p.running and p.stopService())
            self.backends[name], self.providers[name] = backend, provider
        self.daemon = self.fixture.node("10.0.0.9", "daemon", nat_interval=0)
        self.api = ControlAPI(self.daemon)
        self.site = ControlSite(self.api, reactor=self.daemon.reactor)
        self.assertTrue(self.net.run_until(
            lambda: {"relay", "provider-1", "provider-2"} <= self.online()
            and all(r.resources.cpu_cores for r in self.records()
                    if r.capabilities & Capability.PROVIDER), 20))

    def records(self):
        return self.daemon.node.overlay().registry.all()

    def online(self) -> set:
        return {r.name for r in self.records() if r.state == "online"}

    def call(self, method: str, path: str, body=None, *, credentials=OWN, headers=None,
             timeout: float = 70) -> Response:
        connection = MemoryConnection(self.site, credentials)
        connection.send(method, path, body, headers)
        self.net.run_until(lambda: any(r.complete for r in connection.responses()), timeout)
        [response] = connection.responses()
        self.assertTrue(response.complete, f"{method} {path}: no answer within {timeout} s")
        self.assertEqual(response.headers["content-type"], "application/json")
        return response

    def ok(self, method: str, path: str, body=None, **kwargs):
        response = self.call(method, path, body, **kwargs)
        self.assertEqual(response.status, 200, response.body)
        return response.json()

    def error(self, status: int, method: str, path: str, body=None, **kwargs) -> str:
        response = self.call(method, path, body, **kwargs)
        self.assertEqual(response.status, status, response.body)
        document = response.json()
        self.assertEqual(list(document), ["error"])
        return document["error"]

    def stream(self, kinds: str | None = None) -> MemoryConnection:
        connection = MemoryConnection(self.site)
        connection.send("GET", "/v1/events" + (f"?kinds={kinds}" if kinds else ""))
        [response] = connection.responses()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "text/event-stream; charset=utf-8")
        self.assertTrue(response.body.startswith(b": subscribed to "))
        return connection

    def streamed(self, connection) -> list[tuple[str, dict]]:
        return sse_events(connection.responses()[0].body)

    # node, networks, peers

    def test_status(self):
        """GET /v1/status is the node's status, as 'node status' shows it, with the API version."""
        status = self.ok("GET", "/v1/status")
        self.assertEqual(status["api"], {"version": 1})
        self.assertEqual(status["peer_id"], self.daemon.node.identity.peer_id_text)
        self.assertIs(status["alive"], True)
        self.assertEqual((status["running"], status["status_age_s"]), (True, 0.0))
        self.assertTrue(status["listen"].endswith(f":{PORT}"), status["listen"])
        self.assertEqual({p["name"] for p in status["peers"]},
                         {"relay", "provider-1", "provider-2"})
        self.assertEqual(status["pid"], os.getpid())

    def test_networks_as_the_command_prints(self):
        """GET /v1/networks is byte for byte what 'network list --output json' prints."""
        printed = io.StringIO()
        cli.main(["--data-dir", str(self.daemon.data_dir), "--output", "json", "network", "list"],
                 stdout=printed)
        response = self.call("GET", "/v1/networks")
        self.assertEqual(response.body.decode(), printed.getvalue())
        [network] = response.json()["networks"]
        self.assertEqual(network["name"], "sim")

    def test_peers(self):
        """GET /v1/peers lists the peer records, named ones first; ?network= picks the network."""
        peers = self.ok("GET", "/v1/peers")
        self.assertEqual([p["name"] for p in peers], ["provider-1", "provider-2", "relay"])
        self.assertEqual(peers[0]["capabilities"], ["provider"])
        self.assertEqual(peers, documents.peers_document(self.api._mesh()[0]))
        self.assertEqual(self.ok("GET", "/v1/peers?network=sim"), peers)
        message = self.error(404, "GET", "/v1/peers?network=nowhere")
        self.assertIn("nowhere", message)
        self.assertIn("unknown parameter 'color'", self.error(400, "GET", "/v1/peers?color=red"))

    # ping and connect

    def test_ping(self):
        """POST /v1/ping pings the peer count times and summarises, as 'mesh ping' does."""
        started = self.net.clock.seconds()
        document = self.ok("POST", "/v1/ping", {"peer": "provider-1", "count": 3,
                                                "interval": 0.5})
        self.assertEqual(document["name"], "provider-1")
        self.assertEqual([r["seq"] for r in document["replies"]], [1, 2, 3])
        times = [r["t_s"] for r in document["replies"]]
        self.assertEqual(times[0], 0.0)
        self.assertTrue(all(0.5 <= b - a < 0.6 for a, b in zip(times, times[1:])), times)
        self.assertEqual(document["replies"][0]["endpoint"], f"10.0.0.2:{PORT}")
        self.assertEqual(document["summary"]["received"], 3)
        self.assertAlmostEqual(document["summary"]["rtt_avg_ms"], 20.0, delta=1)
        self.assertLess(self.net.clock.seconds() - started, 3)

    def test_ping_checks_fields(self):
        """Wrong fields get 400 with a message that names the field and what it takes."""
        self.assertEqual(self.error(400, "POST", "/v1/ping", {"peer": "provider-1", "count": 0}),
                         "field 'count' must be a whole number 1-1000")
        self.assertEqual(self.error(400, "POST", "/v1/ping", {"peer": "x", "count": "3"}),
                         "field 'count' must be a whole number 1-1000")
        self.assertEqual(self.error(400, "POST", "/v1/ping", {"count": 3}),
                         "field 'peer' is missing (a peer id, id prefix or name)")
        self.assertEqual(self.error(400, "POST", "/v1/ping", {"peer": "x", "interval": -1}),
                         "field 'interval' must be a number of seconds > 0 and < 86400")
        self.assertIn("unknown field 'cuont'",
                      self.error(400, "POST", "/v1/ping", {"peer": "x", "cuont": 2}))
        self.assertIn("must be a JSON object", self.error(400, "POST", "/v1/ping", [1]))
        self.assertIn("is not JSON", self.error(400, "POST", "/v1/ping", b"{peer: x"))

    def test_unknown_and_ambiguous_peers(self):
        """An unknown peer is 404 and an ambiguous prefix 400, with the command's messages."""
        message = self.error(404, "POST", "/v1/ping", {"peer": "provider-9", "timeout": 5})
        self.assertIn("no peer named or with an id starting 'provider-9' in network sim", message)
        self.assertIn("'omerta mesh peers' lists them", message)
        # a peer named like the start of provider-1's id: the name and the prefix both match
        prefix = self.providers["provider-1"].mesh.peer_id[:6]
        twin = self.fixture.node("10.0.0.6", prefix, nat_interval=0)
        self.assertTrue(self.net.run_until(lambda: prefix in self.online(), 20))
        message = self.error(400, "POST", "/v1/connect", {"peer": prefix})
        self.assertIn(twin.node.identity.peer_id_text, message)
        self.assertIn(self.providers["provider-1"].mesh.peer_id, message)

    def test_connect(self):
        """POST /v1/connect gives the path, as 'mesh connect' does."""
        document = self.ok("POST", "/v1/connect", {"peer": "provider-2", "timeout": 5})
        self.assertEqual((document["name"], document["kind"]), ("provider-2", "direct"))
        self.assertEqual(document["endpoint"], f"10.0.0.3:{PORT}")
        self.assertEqual(document["timings"]["punch_attempts"], 0)

    def test_no_path(self):
        """A peer that is gone: 504 with the command's 'no path' message."""
        self.providers["provider-2"].mesh.stop()
        self.net.run(3)
        message = self.error(504, "POST", "/v1/connect", {"peer": "provider-2", "timeout": 3})
        self.assertIn("no path to provider-2", message)
        self.assertIn("try a longer --timeout", message)

    # NAT

    def test_nat(self):
        """GET /v1/nat is 503 before the first report, then the report; nat_changed is streamed."""
        self.assertEqual(self.error(503, "GET", "/v1/nat"),
                         "no NAT report yet (NAT discovery is off: --nat-interval 0)")
        events = self.stream("nat_changed")
        report = NatReport(("203.0.113.9", 40001), ("10.0.0.9", PORT),
                           Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_DEPENDENT,
                           NatType.RESTRICTED_CONE, True, [("198.51.100.1", PORT)])
        from omerta.wire.messages import parse_record

        gossip = next(iter(self.daemon.node.overlays.values())).gossip
        gossip.own_announcement()
        gossip.rumours.clear()  # (spread everywhere)
        self.daemon._nat_report(report, None)
        self.assertEqual(self.ok("GET", "/v1/nat"), report.as_dict())
        # announced at once, with the new type, as a rumour to spread
        record = parse_record(gossip.rumours[self.daemon.node.peer_id].signed["record"])
        self.assertEqual(record.nat_type, int(NatType.RESTRICTED_CONE))
        [(kind, data)] = self.streamed(events)
        self.assertEqual(kind, "nat_changed")
        self.assertEqual((data["report"]["mapped"], data["previous"]),
                         ("203.0.113.9:40001", None))

    # VMs

    def test_vm_request_list_show_release(self):
        """A VM requested through the API is kept in the daemon's data dir, listed, shown, released."""
        vm = self.ok("POST", "/v1/vms", {"peer": "provider-1", "cpu": 2, "memory": 512,
                                         "name": "web"})
        self.assertEqual((vm["state"], vm["vcpus"], vm["memory_mb"], vm["name"]),
                         ("running", 2, 512, "web"))
        self.assertEqual((vm["provider_name"], vm["path"]["kind"]), ("provider-1", "direct"))
        self.assertNotIn("wg_private_key", vm)
        self.assertEqual(list(self.backends["provider-1"].vms), [vm["vm_id"]])
        held = ConsumerStore(self.daemon.data_dir).load().vms
        self.assertEqual(list(held), [vm["vm_id"]])

        listed = self.ok("GET", "/v1/vms")
        self.assertEqual([v["vm_id"] for v in listed["vms"]], [vm["vm_id"]])
        self.assertEqual(listed, documents.vm_list_document(
            documents.ConsumerClient(None, self.daemon.data_dir)))
        refreshed = self.ok("GET", "/v1/vms?refresh=1")
        self.assertEqual(refreshed["vms"][0]["state"], "running")
        shown = self.ok("GET", f"/v1/vms/{vm['vm_id'][:6]}")
        self.assertEqual((shown["vm_id"], shown["state"]), (vm["vm_id"], "running"))
        self.assertEqual(shown["path"]["endpoint"], f"10.0.0.2:{PORT}")

        released = self.ok("DELETE", f"/v1/vms/{vm['vm_id']}")
        self.assertEqual(released, {"released": [vm["vm_id"]], "failed": [], "elsewhere": []})
        self.assertEqual(self.backends["provider-1"].vms, {})
        self.assertEqual(self.ok("GET", "/v1/vms"), {"vms": []})
        self.assertEqual(self.ok("DELETE", "/v1/vms"),
                         {"released": [], "failed": [], "elsewhere": []})

    def test_vm_find_provider_and_release_all(self):
        """'find': true picks a provider with room; DELETE /v1/vms releases every VM held."""
        first = self.ok("POST", "/v1/vms", {"find": True})
        second = self.ok("POST", "/v1/vms", {"provider": f"10.0.0.3:{PORT}"})
        self.assertEqual(second["provider_name"], "provider-2")
        released = self.ok("DELETE", "/v1/vms")
        self.assertEqual(sorted(released["released"]), sorted([first["vm_id"], second["vm_id"]]))

    def test_vm_errors(self):
        """Refusals are 409, unknown VMs and providers 404, bad requests 400, with clear messages."""
        self.assertIn("refused: no capacity",
                      self.error(409, "POST", "/v1/vms", {"peer": "provider-1", "cpu": 8}))
        message = self.error(409, "POST", "/v1/vms", {"peer": "relay"})
        self.assertIn("relay (", message)
        self.assertIn("is not a provider", message)
        self.assertTrue(message.endswith("; 'omerta mesh peers' shows who is"), message)
        self.assertIn("no online provider announces room",
                      self.error(409, "POST", "/v1/vms", {"find": True, "memory": 1 << 20}))
        self.assertIn("'provider-9'",
                      self.error(404, "POST", "/v1/vms", {"peer": "provider-9", "timeout": 5}))
        self.assertIn("no peer known at 10.0.0.77:7400",
                      self.error(404, "POST", "/v1/vms", {"provider": "10.0.0.77:7400"}))
        self.assertEqual(self.error(400, "POST", "/v1/vms", {"peer": "provider-1", "find": True}),
                         "give exactly one of 'peer' (id, prefix or name), 'find': true or"
                         " 'provider' (HOST:PORT)")
        self.assertEqual(self.error(400, "POST", "/v1/vms", {"find": "yes"}),
                         "field 'find' must be true or false")
        self.assertIn("field 'provider': '10.0.0.3': expected HOST:PORT",
                      self.error(400, "POST", "/v1/vms", {"provider": "10.0.0.3"}))
        self.assertIn("port 0 is out of range",
                      self.error(400, "POST", "/v1/vms", {"provider": "10.0.0.3:0"}))
        self.assertIn("no VM 'ffff' held here", self.error(404, "GET", "/v1/vms/ffff"))
        self.assertIn("no VM 'ffff' held here", self.error(404, "DELETE", "/v1/vms/ffff"))
        self.assertEqual(self.ok("GET", "/v1/vms"), {"vms": []})

    # events

    def test_events_stream_mesh_events(self):
        """A new peer is streamed as peer_discovered, ids in hex, until the client goes."""
        events = self.stream("peer_discovered,peer_connected")
        events_service = self.daemon.events
        self.assertEqual(events_service.subscribers("peer_discovered"), 1)
        carol = self.fixture.node("10.0.0.5", "carol", nat_interval=0)
        carol_id = carol.node.identity.peer_id_text
        self.assertTrue(self.net.run_until(
            lambda: ("peer_discovered", carol_id) in
            [(k, d["peer_id"]) for k, d in self.streamed(events)], 20))
        kind, data = next((k, d) for k, d in self.streamed(events) if d["peer_id"] == carol_id)
        self.assertEqual(data["network"], self.fixture.membership.network_id)
        [stream] = self.api.streams
        events.close()
        self.assertTrue(stream.closed.called)
        self.assertEqual(events_service.subscribers("peer_discovered"), 0)
        self.assertEqual(events_service.subscribers("peer_connected"), 0)
        self.assertEqual(self.api.streams, set())

    def test_vm_state_events(self):
        """VMs requested and released through the API are streamed as vm_state changes."""
        events = self.stream("vm_state")
        vm = self.ok("POST", "/v1/vms", {"peer": "provider-2"})
        self.ok("DELETE", f"/v1/vms/{vm['vm_id']}")
        streamed = self.streamed(events)
        self.assertEqual([(k, d["vm_id"], d["previous"], d["state"]) for k, d in streamed],
                         [("vm_state", vm["vm_id"], None, "running"),
                          ("vm_state", vm["vm_id"], "running", "released")])
        self.assertEqual(streamed[0][1]["provider"], vm["provider"])
        self.assertEqual(streamed[0][1]["network"], self.fixture.membership.network_id)

    def test_events_keepalive(self):
        """An idle stream gets a ': keepalive' comment every 15 s."""
        events = self.stream("peer_suspected")
        self.net.run(31)
        self.assertEqual(events.responses()[0].body.count(b": keepalive\n\n"), 2)

    def test_events_kinds_checked(self):
        """Unknown event kinds are 400, listing the kinds; no kinds given means the usual ones."""
        message = self.error(400, "GET", "/v1/events?kinds=peer_discovered,bogus")
        self.assertIn("unknown event kind(s) bogus", message)
        self.assertIn("vm_state", message)
        events = self.stream()
        self.assertIn(b"peer_discovered,peer_connected,peer_suspected,peer_disconnected,"
                      b"member_suspected,peer_gone,path_changed,nat_changed,vm_state",
                      events.responses()[0].body)

    def test_slow_reader_disconnected(self):
        """A client whose socket stays full is disconnected past the backlog, unsubscribed."""
        events = self.stream("peer_changed")
        [stream] = self.api.streams
        events.protocol.pauseProducing()  # what the transport does when its buffer is full
        self.assertTrue(stream.paused)
        for i in range(STREAM_BACKLOG):
            self.daemon.events.emit("peer_changed", network=b"n", peer_id=b"p", change="rtt")
        self.assertFalse(events.transport.disconnecting)
        self.assertEqual(len(stream.queue), STREAM_BACKLOG)
        self.daemon.events.emit("peer_changed", network=b"n", peer_id=b"p", change="rtt")
        self.assertTrue(events.transport.disconnecting)
        self.assertTrue(stream.closed.called)
        self.assertEqual(self.daemon.events.subscribers("peer_changed"), 0)
        self.assertEqual(len(stream.queue), 0)

    def test_paused_stream_catches_up(self):
        """Events that arrive while the client's socket is full are sent, in order, once it drains."""
        events = self.stream("peer_changed")
        events.protocol.pauseProducing()
        for change in ("a", "b"):
            self.daemon.events.emit("peer_changed", network=b"n", peer_id=b"p", change=change)
        self.assertEqual(self.streamed(events), [])
        events.protocol.resumeProducing()
        self.assertEqual([d["change"] for _, d in self.streamed(events)], ["a", "b"])

    # who may ask, and bad requests

    def test_other_uid_refused(self):
        """Another uid gets 403 and the connection is closed; root and the node's own uid are served."""
        connection = MemoryConnection(self.site, (99, 4242, 4242))
        connection.send("GET", "/v1/status")
        [response] = connection.responses()
        self.assertEqual(response.status, 403)
        self.assertIn("not uid 4242", response.json()["error"])
        self.assertTrue(connection.transport.disconnecting)
        api = ControlAPI(self.daemon, own_uid=1000)
        site = ControlSite(api, reactor=self.daemon.reactor)
        for uid, status in ((1000, 200), (0, 200), (1001, 403)):
            connection = MemoryConnection(site, (1, uid, uid))
            connection.send("GET", "/v1/networks")
            self.assertEqual(connection.responses()[0].status, status, uid)

    def test_unknown_credentials_refused(self):
        """A connection whose peer credentials cannot be read is refused."""
        self.assertIn("no peer credentials",
                      self.error(403, "GET", "/v1/status", credentials=None))

    def test_not_found_and_not_allowed(self):
        """An unknown path is 404 listing the resources; a wrong method 405 with Allow."""
        message = self.error(404, "GET", "/v2/status")
        self.assertIn("no resource /v2/status", message)
        self.assertIn("GET /v1/status", message)
        self.assertIn("DELETE /v1/vms/{id}", message)
        response = self.call("PUT", "/v1/vms")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.headers["allow"], "GET, POST, DELETE")
        self.assertEqual(response.json(), {"error": "PUT is not allowed on /v1/vms; use GET or"
                                                    " POST or DELETE"})
        self.assertEqual(self.call("GET", "/v1/ping").status, 405)

    def test_keeps_serving_after_bad_requests(self):
        """Bad requests on one connection do not stop the next ones on it."""
        connection = MemoryConnection(self.site)
        connection.send("POST", "/v1/ping", b"not json")
        connection.send("POST", "/v1/ping", b"x" * (MAX_BODY + 1))
        connection.send("GET", "/v1/networks")
        responses = connection.responses()
        self.assertEqual([r.status for r in responses[:2]], [400, 413])
        self.assertEqual(responses[1].json(),
                         {"error": f"the body is larger than {MAX_BODY} bytes"})
        # the 413 closes the connection: the client learns the rest was not read
        self.assertTrue(connection.transport.disconnecting)
        again = MemoryConnection(self.site)
        again.send("POST", "/v1/ping", b"[")
        again.send("GET", "/v1/networks")
        self.assertEqual([r.status for r in again.responses()], [400, 200])

    def test_oversized_chunked_body(self):
        """A chunked body that grows past the bound is dropped as it comes and answered 413."""
        connection = MemoryConnection(self.site)
        head = (b"POST /v1/ping HTTP/1.1\r\nHost: omerta\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 8192
        connection.protocol.dataReceived(head)
        for _ in range(MAX_BODY // len(chunk) + 2):
            connection.protocol.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        [request] = [r for r in connection.protocol.requests]
        self.assertLessEqual(len(request.content.getvalue()), MAX_BODY)
        connection.protocol.dataReceived(b"0\r\n\r\n")
        self.assertEqual(connection.responses()[0].status, 413)

    def test_no_private_key_in_any_response(self):
        """No response carries the identity key, the network key, the invite or a VM's WireGuard key."""
        vm = self.ok("POST", "/v1/vms", {"peer": "provider-1"})
        held = ConsumerStore(self.daemon.data_dir).load().vms[vm["vm_id"]]
        identity = load_or_create_identity(self.daemon.data_dir)
        raw = identity.private_key.private_bytes_raw()
        membership = self.fixture.membership
        secrets = {
            "wireguard private key": load_or_create_key(
                self.daemon.data_dir / "tunnels" / f"{held.provider}.key").private_text.encode(),
            "identity key (hex)": raw.hex().encode(),
            "identity key (PEM)": identity.private_pem().split(b"\n")[1],
            "network key": membership.key.to_text().encode(),
            "network key (hex)": membership.key.secret.hex().encode(),
            "invite": membership.invite.encode(),
        }
        events = self.stream("vm_state,peer_changed,path_changed")
        bodies = [self.call(method, path).body for method, path in (
            ("GET", "/v1/status"), ("GET", "/v1/networks"), ("GET", "/v1/peers"),
            ("GET", "/v1/vms"), ("GET", "/v1/vms?refresh=1"), ("GET", f"/v1/vms/{vm['vm_id']}"),
            ("GET", "/v1/nat"), ("GET", "/v1/nowhere"))]
        bodies.append(json.dumps(vm).encode())
        bodies.append(self.call("POST", "/v1/connect", {"peer": "provider-1"}).body)
        bodies.append(self.call("DELETE", "/v1/vms").body)
        bodies.append(events.responses()[0].body)
        self.assertIn(b"event: vm_state", bodies[-1])
        for body in bodies:
            for what, secret in secrets.items():
                self.assertNotIn(secret, body, f"{what} in {body[:200]!r}")


class JsonableTests(unittest.TestCase):
    def test_event_values(self):
        """Event values become JSON: ids in hex, addresses host:port, relay routes without their header."""
        self.assertEqual(jsonable({"peer_id": b"\x01\x02", "address": ("10.0.0.1", 7400),
                                   "v6": ("::1", 1), "new": RelayRoute("1.2.3.4", 7400, b"h" * 12),
                                   "kind": NatType.SYMMETRIC, "n": None, "list": [b"\xff"]}),
                         {"peer_id": "0102", "address": "10.0.0.1:7400", "v6": "[::1]:1",
                          "new": "1.2.3.4:7400", "kind": int(NatType.SYMMETRIC), "n": None,
                          "list": ["ff"]})


# -- a real socket ---------------------------------------------------------------------------


class Client(Protocol):
    """Collects what the server sends; C{wait(condition)} fires once it holds."""

    def __init__(self):
        self.data = b""
        self.lost = Deferred()
        self._waits: list[tuple] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def connectionLost(self, reason=None) -> None:
        self._check(final=True)
        self.lost.callback(None)

    def _check(self, final: bool = False) -> None:
        for wait in list(self._waits):
            condition, d = wait
            if condition(self.data) or final:
                self._waits.remove(wait)
                d.callback(self.data)

    def wait(self, condition, timeout: float = 10) -> Deferred:
        d = Deferred()
        self._waits.append((condition, d))
        self._check()
        return d.addTimeout(timeout, reactor)


def completed(count: int):
    def condition(data: bytes) -> bool:
        responses = parse_responses(data)
        return len(responses) >= count and all(r.complete for r in responses[:count])

    return condition


class SocketTests(unittest.TestCase):
    """
    The service on a real Unix socket, real reactor; the node (the API's
    subject) runs on the simulator and is not driven: these tests are about
    the socket, not the mesh.
    """

    def setUp(self):
        self.fixture = MeshFixture(self)
        self.dir = tempfile.mkdtemp(prefix="omerta-ctl-")  # short: socket paths are limited
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data_dir = os.path.join(self.dir, "node")

    def node(self, data_dir=None) -> NodeService:
        node = NodeService(data_dir or self.data_dir, port=PORT, name="daemon",
                           invites=[self.fixture.membership.invite], nat_interval=0,
                           reactor=self.fixture.net.host("10.0.0.9").reactor)
        node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        return node

    def service(self, node) -> ControlService:
        service = ControlService(node, reactor=reactor)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    async def connect(self, address: str) -> Client:
        client = Client()
        await connectProtocol(UNIXClientEndpoint(reactor, address), client)

        def close():
            if not client.lost.called:
                client.transport.abortConnection()
            return client.lost

        self.addCleanup(close)
        return client

    async def ask(self, address: str, *requests: bytes) -> list[Response]:
        client = await self.connect(address)
        client.transport.write(b"".join(requests))
        data = await client.wait(completed(len(requests)))
        client.transport.loseConnection()
        await client.lost
        return parse_responses(data)

    def logged(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_socket_mode_and_status(self):
        """The socket is control.sock in the data dir, mode 0600, and answers /v1/status."""
        node = self.node()
        service = self.service(node)
        path = control_socket_path(self.data_dir)
        self.assertEqual(str(path), os.path.join(self.data_dir, CONTROL_SOCKET))
        mode = os.stat(path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)

        async def check():
            [response] = await self.ask(str(path), request_bytes("GET", "/v1/status"))
            self.assertEqual(response.status, 200)
            self.assertEqual(response.json()["peer_id"], node.node.identity.peer_id_text)
            await service.stopService()
            self.assertFalse(path.exists())
            self.assertFalse(os.path.lexists(f"{path}.lock"))

        return ensureDeferred(check())

    def test_stale_socket_replaced(self):
        """A socket file and lock left by a killed node do not stop the next one from serving."""
        os.makedirs(self.data_dir, mode=0o700)
        path = str(control_socket_path(self.data_dir))
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # the file stays, nobody listens
        os.symlink("2147483646", path + ".lock")  # a pid no process has
        node = self.node()
        self.service(node)

        async def check():
            [response] = await self.ask(path, request_bytes("GET", "/v1/networks"))
            self.assertEqual(response.status, 200)

        return ensureDeferred(check())

    def test_socket_in_use_left_alone(self):
        """A second service on the same data dir leaves the serving one alone and says so."""
        node = self.node()
        self.service(node)
        logged = self.logged()
        second = self.service(node)
        self.assertIsNone(second.port)
        self.assertTrue(any("another process serves" in e.get("log_format", "") for e in logged))

        async def check():
            [response] = await self.ask(str(control_socket_path(self.data_dir)),
                                        request_bytes("GET", "/v1/networks"))
            self.assertEqual(response.status, 200)

        return ensureDeferred(check())

    def test_open_directory_refused(self):
        """A data dir other users can enter keeps the API off (logged); the node keeps running."""
        os.makedirs(self.data_dir, mode=0o700)
        os.chmod(self.data_dir, 0o755)
        node = self.node()
        logged = self.logged()
        service = self.service(node)
        self.assertIsNone(service.port)
        self.assertFalse(control_socket_path(self.data_dir).exists())
        [event] = [e for e in logged if "Control API off" in e.get("log_format", "")]
        self.assertIn("chmod 700", event["log_format"])
        self.assertEqual(event["mode"], "0755")
        self.assertTrue(node.running)

    def test_search_only_directory_served(self):
        """A data dir others may only traverse (0711, as a provider of real guests sets) is served."""
        os.makedirs(self.data_dir, mode=0o700)
        os.chmod(self.data_dir, 0o711)
        service = self.service(self.node())
        self.assertIsNotNone(service.port)
        self.assertEqual(stat.S_IMODE(os.stat(control_socket_path(self.data_dir)).st_mode), 0o600)

    def test_long_data_dir(self):
        """A data dir whose socket path is too long for bind() is served through a directory descriptor."""
        data_dir = os.path.join(self.dir, "d" * 120)
        node = self.node(data_dir)
        service = self.service(node)
        path = control_socket_path(data_dir)
        self.assertGreater(len(str(path)), 108)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

        async def check():
            directory = os.open(data_dir, os.O_PATH)
            self.addCleanup(os.close, directory)
            [response] = await self.ask(f"/proc/self/fd/{directory}/{CONTROL_SOCKET}",
                                        request_bytes("GET", "/v1/status"))
            self.assertEqual(response.status, 200)
            await service.stopService()
            self.assertFalse(path.exists())

        return ensureDeferred(check())

    def test_bad_requests(self):
        """Malformed JSON 400, oversized 413, unknown path 404, wrong method 405; then it still serves."""
        service = self.service(self.node())
        path = str(service.path)

        async def check():
            bad, good = await self.ask(path, request_bytes("POST", "/v1/ping", b"{oops"),
                                       request_bytes("GET", "/v1/networks"))
            self.assertEqual((bad.status, good.status), (400, 200))
            self.assertIn("is not JSON", bad.json()["error"])
            [big] = await self.ask(path, request_bytes("POST", "/v1/vms", b"[" * (MAX_BODY + 10)))
            self.assertEqual(big.status, 413)
            missing, wrong = await self.ask(path, request_bytes("GET", "/v1/nothing"),
                                            request_bytes("DELETE", "/v1/status"))
            self.assertEqual((missing.status, wrong.status), (404, 405))
            self.assertEqual(wrong.headers["allow"], "GET")
            [again] = await self.ask(path, request_bytes("GET", "/v1/status"))
            self.assertEqual(again.status, 200)

        return ensureDeferred(check())

    def test_event_stream(self):
        """An event reaches a client of /v1/events; its subscription goes when it disconnects."""
        node = self.node()
        service = self.service(node)

        async def check():
            client = await self.connect(str(service.path))
            client.transport.write(request_bytes("GET", "/v1/events?kinds=peer_discovered"))
            await client.wait(lambda data: b": subscribed to peer_discovered" in data)
            self.assertEqual(node.events.subscribers("peer_discovered"), 1)
            node.events.emit("peer_discovered", network=b"\x01" * 8, peer_id=b"\xab" * 16)
            data = await client.wait(lambda data: b"event: peer_discovered" in data)
            [response] = parse_responses(data)
            self.assertEqual(sse_events(response.body), [
                ("peer_discovered", {"network": "01" * 8, "peer_id": "ab" * 16})])
            [stream] = service.api.streams
            client.transport.loseConnection()
            await stream.closed.addTimeout(10, reactor)
            self.assertEqual(node.events.subscribers("peer_discovered"), 0)

        return ensureDeferred(check())

    def test_stop_ends_streams(self):
        """Stopping the service ends the event streams and closes their connections."""
        service = self.service(self.node())

        async def check():
            client = await self.connect(str(service.path))
            client.transport.write(request_bytes("GET", "/v1/events"))
            await client.wait(lambda data: b": subscribed" in data)
            await service.stopService()
            await client.lost.addTimeout(10, reactor)
            [response] = parse_responses(client.data)
            self.assertTrue(response.complete)

        return ensureDeferred(check())

    def test_other_uid_refused(self):
        """
        A request from another uid (nobody) gets 403 over a real socket.

        The service's own socket is 0600 in a 0700 directory, which nobody
        cannot even reach; so this test serves the same API (same site, same
        credential check) on a second socket it makes reachable: mode 0666
        in a directory of mode 0711.  What is tested is the check of the
        peer's credentials, which is the API's, not the socket's.
        """
        if os.getuid() != 0:
            raise unittest.SkipTest("needs root, to run a client as another user (nobody)")
        setpriv = shutil.which("setpriv")
        python = shutil.which("python3", path="/usr/bin:/bin")
        if setpriv is None or python is None:
            raise unittest.SkipTest("needs setpriv and /usr/bin/python3 to run a client as nobody")
        node = self.node()
        api = ControlAPI(node, clock=reactor)
        open_dir = tempfile.mkdtemp(prefix="omerta-ctl-open-")
        self.addCleanup(shutil.rmtree, open_dir, True)
        os.chmod(open_dir, 0o711)
        address = os.path.join(open_dir, "api.sock")
        site = ControlSite(api, reactor=reactor)
        port = reactor.listenUNIX(address, site, mode=0o666)
        self.addCleanup(site.close_connections)
        self.addCleanup(port.stopListening)
        client = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "s.sendall(b'GET /v1/status HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "data = b''\n"
            "while True:\n"
            "    chunk = s.recv(65536)\n"
            "    if not chunk: break\n"
            "    data += chunk\n"
            "sys.stdout.write(data.decode())\n"
        )

        async def check():
            out, err, code = await getProcessOutputAndValue(
                setpriv, ["--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-c",
                          client, address], env={}, path="/")
            self.assertEqual(code, 0, err)
            [response] = parse_responses(out)
            self.assertEqual(response.status, 403)
            self.assertIn(f"not uid {pwd.getpwnam('nobody').pw_uid}", response.json()["error"])

        return ensureDeferred(check())


class ServiceWiringTests(unittest.TestCase):
    def test_every_daemon_gets_it(self):
        """make_node_service adds the control API after the node; --no-control leaves it out."""
        from omerta.app import relay_tap
        from omerta.app.options import make_node_service
        from tests.test_tap import make_member_dir
        from omerta.testing.udp import MemoryUDPReactor

        data_dir, _ = make_member_dir(self)
        options = relay_tap.Options()
        options.parseOptions(["--data-dir", data_dir])
        top = make_node_service(options, reactor=MemoryUDPReactor())
        self.assertEqual([s.name for s in top], ["node", "tunnels", "control"])
        self.assertIs(top.getServiceNamed("control").node, top.getServiceNamed("node"))
        options = relay_tap.Options()
        options.parseOptions(["--data-dir", data_dir, "--no-control"])
        self.assertEqual([s.name for s in make_node_service(options)], ["node", "tunnels"])

    def test_listens_only_when_started(self):
        """Nothing listens until startService; then control.sock, mode 0600, with a lock."""
        from omerta.testing.udp import MemoryUDPReactor

        memory = MemoryUDPReactor()
        data_dir = tempfile.mkdtemp(prefix="omerta-ctl-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        node = NodeService(data_dir, reactor=memory)
        service = ControlService(node, reactor=memory)
        self.assertEqual(memory.unixServers, [])
        service.startService()
        [(address, site, _backlog, mode, want_pid)] = memory.unixServers
        self.assertEqual((address, mode, bool(want_pid)),
                         (str(control_socket_path(data_dir)), 0o600, True))
        self.assertIsInstance(site, ControlSite)
        return service.stopService()


class ModuleTests(unittest.TestCase):
    def test_error_statuses(self):
        """Each kind of mesh-side failure has its status."""
        self.assertEqual({kind.__name__: status for kind, status in control.ERROR_STATUS.items()},
                         {"NotFoundError": 404, "AmbiguousError": 400, "NotJoinedError": 503,
                          "NoPathError": 504, "RefusedError": 409, "BadAnswerError": 502})
