"""
The SSH manhole: option checks, host key, key checker and namespace in
process; then a real twistd relay and the OpenSSH client.
"""

import io
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import manhole_ssh
from twisted.conch.ssh import keys
from twisted.cred.credentials import ISSHPrivateKey, SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import capturedLogs
from twisted.python.usage import UsageError
from twisted.trial import unittest

from omerta import storage
from omerta.app import manhole, provider_tap, relay_tap
from omerta.app.options import make_node_service
from omerta.crypto.identity import load_or_create_identity
from omerta.mesh.network import MeshNetwork
from omerta.mesh.service import NodeService
from omerta.networks import NetworkStore
from omerta.testing.udp import MemoryUDPReactor
from tests.integration import (
    TWISTD, Daemon, environment, free_udp_port, require_program, wait_for,
)


def new_key() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def public_line(key: keys.Key, comment: str = "someone@example") -> bytes:
    return key.public().toString("openssh") + b" " + comment.encode() + b"\n"


def member_dir(testcase) -> tuple[str, object, int]:
    """
    A data dir (absolute) that created network "mh" with a relay on
    127.0.0.1:PORT, and the membership.
    """
    data_dir = os.path.abspath(testcase.mktemp())
    identity = load_or_create_identity(data_dir)
    port = free_udp_port()
    membership = NetworkStore(data_dir).create(identity, "mh", f"127.0.0.1:{port}", now=time.time())
    return data_dir, membership, port


def write_keys_file(testcase, *lines: bytes) -> str:
    path = os.path.abspath(testcase.mktemp())
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    os.chmod(path, 0o644)
    return path


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OptionTests(unittest.TestCase):
    def setUp(self):
        self.data_dir, _, _ = member_dir(self)
        self.key = new_key()
        self.keys_file = write_keys_file(self, b"# operators\n", public_line(self.key))

    def parse(self, *args, options=None):
        options = options or relay_tap.Options()
        options.parseOptions(["--data-dir", self.data_dir, "--manhole-keys", self.keys_file, *args])
        return options

    def refused(self, *args) -> str:
        with self.assertRaises(UsageError) as raised:
            self.parse(*args)
        return str(raised.exception)

    def test_loopback_accepted(self):
        """IPv4 loopback (any of 127/8) and ::1 endpoints are accepted on both plugins."""
        for endpoint in ("tcp:7422:interface=127.0.0.1", "tcp:0:interface=127.0.0.53",
                         r"tcp:7422:interface=\:\:1"):
            options = self.parse("--manhole", endpoint)
            self.assertEqual(options["manhole"], endpoint)
            self.assertEqual(options["manhole-keys"], Path(self.keys_file))
        self.parse("--manhole", "tcp:7422:interface=127.0.0.1", options=provider_tap.Options())

    def test_all_interfaces_refused(self):
        """No interface, or 0.0.0.0 / ::, is refused with why and how to fix it."""
        for endpoint in ("tcp:7422", "tcp:7422:interface=0.0.0.0", r"tcp:7422:interface=\:\:"):
            message = self.refused("--manhole", endpoint)
            self.assertIn("all interfaces", message)
            self.assertIn(manhole.REMOTE_EXPLANATION, message)
            self.assertIn("gives full control of the node", message)

    def test_remote_address_refused(self):
        """A specific non-loopback address or a host name is refused with the explanation."""
        for endpoint in ("tcp:7422:interface=192.0.2.10", "tcp:7422:interface=localhost"):
            message = self.refused("--manhole", endpoint)
            self.assertIn("--manhole-allow-remote", message)
            self.assertIn("tcp:7422:interface=127.0.0.1", message)

    def test_allow_remote(self):
        """--manhole-allow-remote accepts an endpoint on every or any interface."""
        for endpoint in ("tcp:7422", "tcp:7422:interface=0.0.0.0", "tcp:7422:interface=192.0.2.10"):
            options = self.parse("--manhole", endpoint, "--manhole-allow-remote")
            self.assertTrue(options["manhole-allow-remote"])

    def test_unix_accepted(self):
        """A unix: socket endpoint is local by nature and accepted."""
        self.parse("--manhole", f"unix:{self.data_dir}/manhole.sock")
        self.assertIn("unix:PATH", self.refused("--manhole", "unix:"))

    def test_other_kinds_refused(self):
        """Endpoint kinds other than tcp: and unix: (ssl, stdio, systemd, ...) are refused."""
        for endpoint in ("ssl:7422", "stdio:", "systemd:domain=INET:index=0", "telnet:7422"):
            self.assertIn("tcp:PORT:interface=127.0.0.1 or unix:PATH",
                          self.refused("--manhole", endpoint))
        message = self.refused("--manhole", "tcp:x:interface=127.0.0.1")
        self.assertIn("'tcp:x:interface=127.0.0.1': expected tcp:PORT", message)

    def test_missing_keys_file_refused(self):
        """A keys file that does not exist is a usage error naming it."""
        self.keys_file = os.path.abspath(self.mktemp())
        message = self.refused("--manhole", "tcp:7422:interface=127.0.0.1")
        self.assertIn(self.keys_file, message)
        self.assertIn("No such file", message)

    def test_default_keys_file(self):
        """Without --manhole-keys the invoking user's ~/.ssh/authorized_keys is used."""
        home = os.path.abspath(self.mktemp())
        self.patch(os, "environ", dict(os.environ, HOME=home))
        options = relay_tap.Options()
        with self.assertRaises(UsageError) as raised:
            options.parseOptions(["--data-dir", self.data_dir, "--manhole",
                                  "tcp:7422:interface=127.0.0.1"])
        self.assertIn(f"{home}/.ssh/authorized_keys", str(raised.exception))
        self.assertIn("--manhole-keys PATH", str(raised.exception))
        os.makedirs(f"{home}/.ssh")
        Path(f"{home}/.ssh/authorized_keys").write_bytes(public_line(self.key))
        options = relay_tap.Options()
        options.parseOptions(["--data-dir", self.data_dir, "--manhole",
                              "tcp:7422:interface=127.0.0.1"])
        self.assertEqual(options["manhole-keys"], Path(f"{home}/.ssh/authorized_keys"))

    def test_no_usable_key_refused(self):
        """An empty keys file, or one with only comments, junk and option lines, is refused."""
        self.keys_file = write_keys_file(self)
        self.assertIn("no usable public key", self.refused("--manhole", "tcp:7422:interface=127.0.0.1"))
        secret = public_line(self.key).split()[1]
        self.keys_file = write_keys_file(
            self, b"# comment\n\n", b"not a key\n", b'from="10.0.0.1" ' + public_line(self.key)
        )
        with capturedLogs() as events:
            message = self.refused("--manhole", "tcp:7422:interface=127.0.0.1")
        self.assertIn("no usable public key", message)
        warnings = [e for e in events if "Manhole keys" in e.get("log_format", "")]
        self.assertEqual([e["line"] for e in warnings], [3, 4])
        self.assertNotIn(secret.decode(), repr(events))

    def test_group_writable_keys_refused(self):
        """A keys file other users can write to is refused, as sshd does."""
        os.chmod(self.keys_file, 0o664)
        message = self.refused("--manhole", "tcp:7422:interface=127.0.0.1")
        self.assertIn(f"chmod go-w {self.keys_file}", message)

    def test_world_readable_host_key_refused(self):
        """An existing host key that others can read stops option parsing."""
        manhole.load_or_create_host_key(self.data_dir)
        os.chmod(f"{self.data_dir}/{manhole.HOST_KEY_FILE}", 0o640)
        self.assertIn("chmod 600", self.refused("--manhole", "tcp:7422:interface=127.0.0.1"))

    def test_off_by_default(self):
        """Without --manhole the node has no manhole service."""
        top = make_node_service(self.parse())
        self.assertEqual([s.name for s in top], ["node", "tunnels", "control"])
        top = make_node_service(self.parse("--manhole", "tcp:7422:interface=127.0.0.1"))
        self.assertIsInstance(top.getServiceNamed("manhole"), manhole.ManholeService)


class HostKeyTests(unittest.TestCase):
    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())

    def test_created_once_private(self):
        """The host key is an Ed25519 private key created 0600 once and reused afterwards."""
        first = manhole.load_or_create_host_key(self.data_dir)
        path = Path(self.data_dir) / manhole.HOST_KEY_FILE
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(first.sshType(), b"ssh-ed25519")
        self.assertFalse(first.isPublic())
        again = manhole.load_or_create_host_key(self.data_dir)
        self.assertEqual(again, first)

    def test_unsafe_or_corrupt_refused(self):
        """A world-readable or corrupt host key raises StateFileError instead of being replaced."""
        manhole.load_or_create_host_key(self.data_dir)
        path = Path(self.data_dir) / manhole.HOST_KEY_FILE
        os.chmod(path, 0o644)
        self.assertRaises(storage.StateFileError, manhole.load_or_create_host_key, self.data_dir)
        storage.atomic_write(path, b"garbage")
        with self.assertRaises(storage.StateFileError) as raised:
            manhole.load_or_create_host_key(self.data_dir)
        self.assertIn("move it aside", str(raised.exception))
        self.assertEqual(path.read_bytes(), b"garbage")

    def test_service_listens_only_when_started(self):
        """makeService creates nothing; startService makes the key and listens on the endpoint."""
        memory = MemoryUDPReactor()
        keys_file = write_keys_file(self, public_line(new_key()))
        service = manhole.ManholeService(
            "tcp:7422:interface=127.0.0.1", keys_file, self.data_dir, dict, reactor=memory
        )
        self.assertFalse(os.path.exists(self.data_dir))
        self.assertEqual(memory.tcpServers, [])
        service.startService()
        [(port, factory, _backlog, interface)] = memory.tcpServers
        self.assertEqual((port, interface), (7422, "127.0.0.1"))
        self.assertIsInstance(factory, manhole.server_classes().Factory)
        host_key = manhole.load_or_create_host_key(self.data_dir)
        self.assertEqual(factory.privateKeys, {b"ssh-ed25519": host_key})
        self.assertEqual(factory.publicKeys, {b"ssh-ed25519": host_key.public()})
        # conch's ConchFactory keeps these dicts on the class: they stay empty.
        self.assertEqual(manhole_ssh.ConchFactory.privateKeys, {})
        return service.stopService()


class CheckerTests(unittest.TestCase):
    def setUp(self):
        self.key = new_key()
        self.other = new_key()
        self.keys_file = write_keys_file(self, public_line(self.key))
        memory = MemoryUDPReactor()
        service = manhole.ManholeService(
            "tcp:7422:interface=127.0.0.1", self.keys_file, self.mktemp(), dict, reactor=memory
        )
        self.factory = service.build_factory(new_key())
        self.portal = self.factory.portal

    def login(self, key, sign=True):
        data = b"session data"
        credentials = SSHPrivateKey(
            b"operator", b"ssh-ed25519", key.public().blob(), data,
            key.sign(data) if sign else None,
        )
        [checker] = self.portal.checkers.values()
        return checker.requestAvatarId(credentials)

    def test_public_key_only(self):
        """The portal accepts SSH keys and nothing else: no password, no anonymous login."""
        self.assertEqual(self.portal.listCredentialsInterfaces(), [ISSHPrivateKey])

    def test_right_key(self):
        """A signature by an authorized key logs in and is logged by fingerprint only."""
        with capturedLogs() as events:
            avatar_id = self.successResultOf(self.login(self.key))
        self.assertEqual(avatar_id, b"operator")
        [login] = [e for e in events if "Manhole login as" in e.get("log_format", "")]
        self.assertEqual(login["fingerprint"], manhole.fingerprint(self.key))
        self.assertTrue(login["fingerprint"].startswith("SHA256:"))
        blob_text = public_line(self.key).split()[1].decode()
        self.assertNotIn(blob_text, repr(events))

    def test_wrong_key(self):
        """A key missing from the file is refused, and the refusal is logged with its fingerprint."""
        with capturedLogs() as events:
            self.failureResultOf(self.login(self.other), UnauthorizedLogin)
        [refusal] = [e for e in events if "refused" in e.get("log_format", "")]
        self.assertEqual(refusal["fingerprint"], manhole.fingerprint(self.other))

    def test_keys_file_reread(self):
        """Adding or removing a key in the file applies at the next login, without restart."""
        self.failureResultOf(self.login(self.other), UnauthorizedLogin)
        with open(self.keys_file, "ab") as f:
            f.write(public_line(self.other))
        self.successResultOf(self.login(self.other))
        Path(self.keys_file).write_bytes(public_line(self.other))
        self.failureResultOf(self.login(self.key), UnauthorizedLogin)
        os.unlink(self.keys_file)
        with capturedLogs():
            self.failureResultOf(self.login(self.other), UnauthorizedLogin)


class NamespaceTests(unittest.TestCase):
    def setUp(self):
        data_dir, _, port = member_dir(self)
        self.reactor = MemoryUDPReactor()
        self.service = NodeService(data_dir, port=port, interface="127.0.0.1", reactor=self.reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.namespace = manhole.make_namespace(self.service)

    def output_of(self, function, *args) -> str:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        function(*args)
        return out.getvalue()

    def test_live_objects(self):
        """The namespace holds the live node, its parts, the clock and placeholders for roles."""
        ns = self.namespace
        self.assertIsInstance(ns["node"], MeshNetwork)
        self.assertEqual(ns["node"].peer_id, self.service.node.identity.peer_id_text)
        self.assertIs(ns["service"], self.service)
        self.assertIs(ns["mesh"], self.service.node)
        self.assertIs(ns["registry"], self.service.node.overlay().registry)
        self.assertIs(ns["metrics"], self.service.metrics)
        self.assertIs(ns["events"], self.service.events)
        self.assertIs(ns["stun"], self.service.stun)
        self.assertIs(ns["clock"], self.reactor)
        self.assertIs(ns["relay"], self.service.node.relay)
        self.assertIsNone(ns["provider"])
        self.assertEqual(ns["status"]()["peer_id"], ns["node"].peer_id)

    def test_provider_role(self):
        """In a provider process, provider is the ProviderService next to the node."""
        from twisted.application.service import MultiService, Service

        top = MultiService()
        self.service.setServiceParent(top)
        provider = Service()
        provider.setName("provider")
        provider.setServiceParent(top)
        self.assertIs(manhole.make_namespace(self.service)["provider"], provider)

    def test_show_lists_names(self):
        """show() and help() print every name of the namespace with a description."""
        for helper in ("show", "help"):
            text = self.output_of(self.namespace[helper])
            for name in ("node", "service", "mesh", "registry", "metrics", "events", "clock",
                         "relay", "provider", "status()", "show()"):
                self.assertIn(f"  {name} ", text)
        for name in self.namespace:
            self.assertIn(name, {n.rstrip("()") for n, _ in manhole.NAMES} | {"help"})

    def test_help_of_object(self):
        """help(obj) prints obj's documentation instead of starting Python's blocking pager."""
        text = self.output_of(self.namespace["help"], MeshNetwork)
        self.assertIn("class MeshNetwork", text)

    def test_fresh_per_session(self):
        """Each session gets its own namespace: names one operator sets do not leak to another."""
        self.namespace["mine"] = 1
        self.assertNotIn("mine", manhole.make_namespace(self.service))


class ProcessTests(unittest.TestCase):
    """
    Checks that need a separate Python or twistd process but no SSH client.
    """

    timeout = 120

    def test_import_leaves_reactor_alone(self):
        """Importing the manhole module does not install the global reactor (conch's would)."""
        code = ("import sys, omerta.app.manhole;"
                " print('twisted.internet.reactor' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=environment(), timeout=60)
        self.assertEqual(result.stdout.strip(), "False", result.stderr)

    def test_non_loopback_refused(self):
        """twistd refuses a manhole on all interfaces and says why."""
        relay_dir, _, _ = member_dir(self)
        keys_file = write_keys_file(self, public_line(new_key()))
        result = subprocess.run(
            [str(TWISTD), "-n", "--pidfile=", "omerta-relay", "--data-dir", relay_dir,
             "--manhole", f"tcp:{free_tcp_port()}", "--manhole-keys", keys_file],
            capture_output=True, text=True, env=environment(), timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(manhole.REMOTE_EXPLANATION, result.stdout + result.stderr)


class SSHClient(ProcessProtocol):
    """
    An OpenSSH client process; C{output} is stdout and stderr together.
    """

    def __init__(self):
        self.output = b""
        self.exit_code = None
        self.ended = Deferred()

    def childDataReceived(self, fd, data):
        self.output += data

    def processEnded(self, reason):
        self.exit_code = reason.value.exitCode
        self.ended.callback(self.exit_code)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


class ManholeDaemonTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.ssh = require_program("ssh", "openssh-client")
        self.base = os.path.abspath(self.mktemp())
        self.relay_dir, membership, self.udp_port = member_dir(self)
        self.peer_id = load_or_create_identity(self.relay_dir).peer_id_text
        os.makedirs(self.base)
        self.key, self.other = new_key(), new_key()
        self.key_path = self.private_key_file("client", self.key)
        self.other_path = self.private_key_file("other", self.other)
        self.keys_file = f"{self.base}/authorized_keys"
        Path(self.keys_file).write_bytes(b"# manhole operators\n" + public_line(self.key))
        self.tcp_port = free_tcp_port()

    def private_key_file(self, name: str, key: keys.Key) -> str:
        path = f"{self.base}/{name}"
        storage.atomic_write(Path(path), key.toString("openssh"))
        return path

    def start_relay(self, *manhole_args):
        self.relay = Daemon(
            self, "omerta-relay", self.relay_dir,
            "--name", "relay", "--interface", "127.0.0.1", "--port", str(self.udp_port),
            "--manhole", f"tcp:{self.tcp_port}:interface=127.0.0.1",
            "--manhole-keys", self.keys_file, *manhole_args,
        )
        return wait_for(lambda: "SSH manhole listening" in self.relay.output(), 30,
                        "the manhole to listen", describe=self.relay.output)

    def spawn_ssh(self, key_path: str, *options: str) -> SSHClient:
        client = SSHClient()
        argv = [
            self.ssh, "-F", "/dev/null", "-e", "none", "-tt",
            "-i", key_path, "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20",
            "-p", str(self.tcp_port), *options, "operator@127.0.0.1",
        ]
        env = {k: v for k, v in environment().items() if k != "SSH_AUTH_SOCK"}
        reactor.spawnProcess(client, self.ssh, argv, env=env)

        def kill():
            if client.exit_code is None:
                client.transport.signalProcess("KILL")
                return client.ended

        self.addCleanup(kill)
        return client

    async def refused(self, *options: str, key_path=None) -> SSHClient:
        client = self.spawn_ssh(key_path or self.key_path, *options)
        await wait_for(lambda: client.exit_code is not None, 30, "ssh to give up",
                       describe=client.text)
        self.assertEqual(client.exit_code, 255, client.text())
        self.assertIn("Permission denied (publickey)", client.text())
        return client

    def test_right_key_reads_peer_id(self):
        """ssh with an authorized key gets a Python prompt where node.peer_id is the node's id."""

        async def check():
            await self.start_relay()
            client = self.spawn_ssh(self.key_path)
            await wait_for(lambda: b">>> " in client.output, 30, "the Python prompt",
                           describe=client.text)
            client.transport.write(b"node.peer_id\r")
            await wait_for(lambda: f"'{self.peer_id}'" in client.text(), 30,
                           "the peer id in the manhole", describe=client.text)
            client.transport.write(b"\x04")
            await wait_for(lambda: client.exit_code is not None, 30, "ssh to exit on Ctrl-D",
                           describe=client.text)
            self.assertEqual(client.exit_code, 0, client.text())
            log = self.relay.output()
            self.assertIn(f"Manhole login as operator with key {manhole.fingerprint(self.key)}", log)
            self.assertNotIn(public_line(self.key).split()[1].decode(), log)
            host_key = Path(self.relay_dir) / manhole.HOST_KEY_FILE
            self.assertEqual(stat.S_IMODE(host_key.stat().st_mode), 0o600)

        return ensureDeferred(check())

    def test_wrong_key_refused(self):
        """A key that is not in the keys file is refused, and the refusal is logged."""

        async def check():
            await self.start_relay()
            await self.refused(key_path=self.other_path)
            await wait_for(lambda: manhole.fingerprint(self.other) in self.relay.output(), 30,
                           "the refusal in the log", describe=self.relay.output)
            self.assertIn("is not authorized", self.relay.output())

        return ensureDeferred(check())

    def test_no_password_auth(self):
        """Password and keyboard-interactive logins are not offered at all."""

        async def check():
            await self.start_relay()
            await self.refused(
                "-o", "PreferredAuthentications=password,keyboard-interactive",
                "-o", "NumberOfPasswordPrompts=0",
            )

        return ensureDeferred(check())
