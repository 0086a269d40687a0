"""
The twistd plugins: option validation, service assembly, discoverability.
"""

import os
import sys
import time
from unittest import mock

from twisted.application.service import IServiceMaker, MultiService
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial import unittest

from omerta.app import provider_tap, relay_tap
from omerta.app.options import JSON_LOGGER, make_node_service
from omerta.crypto.identity import IDENTITY_FILE, load_or_create_identity
from omerta.networks import NetworkStore
from omerta.testing.udp import MemoryUDPReactor
from omerta.wire.messages import Capability


def make_member_dir(testcase):
    data_dir = testcase.mktemp()
    identity = load_or_create_identity(data_dir)
    membership = NetworkStore(data_dir).create(
        identity, "lab", "127.0.0.1:7400", now=time.time()
    )
    return data_dir, membership


class OptionsTests(unittest.TestCase):
    def setUp(self):
        self.data_dir, self.membership = make_member_dir(self)

    def parse(self, options, *args):
        options.parseOptions(["--data-dir", self.data_dir, *args])
        return options

    def test_defaults(self):
        """Relay and provider have distinct default ports and roles."""
        relay = self.parse(relay_tap.Options())
        provider = self.parse(provider_tap.Options())
        self.assertEqual((relay["port"], provider["port"]), (7400, 7401))
        self.assertEqual(relay.capabilities(), Capability.RELAY | Capability.STUN)
        self.assertEqual(provider.capabilities(), Capability.PROVIDER)
        self.assertTrue(relay.serves_stun())
        self.assertFalse(provider.serves_stun())

    def test_provider_refuses_without_tunnel_support(self):
        """A provider that cannot carry tunnels says what is missing and names --no-tunnels."""
        from omerta.tunnel import provider_side

        def missing():
            raise provider_side.TunnelsUnavailable("wireguard-go is not installed")

        self.patch(provider_side.ProviderTunnels, "check", staticmethod(missing))
        error = self.assertRaises(UsageError, self.parse, provider_tap.Options())
        self.assertIn("wireguard-go is not installed", str(error))
        self.assertIn("--no-tunnels", str(error))
        self.assertTrue(self.parse(provider_tap.Options(), "--no-tunnels")["no-tunnels"])

    def test_provider_refuses_without_libvirt_python(self):
        """Without libvirt-python the provider role does not start; the message names the extra."""
        with mock.patch.dict(sys.modules, {"libvirt": None}):  # import libvirt fails
            error = self.assertRaises(UsageError, self.parse, provider_tap.Options(),
                                      "--no-tunnels")
        self.assertIn("omerta[libvirt]", str(error))

    def test_provider_with_relay(self):
        """omerta-provider --relay plays both roles in one process, STUN included."""
        options = self.parse(provider_tap.Options(), "--relay")
        self.assertEqual(
            options.capabilities(), Capability.PROVIDER | Capability.RELAY | Capability.STUN
        )

    def test_relay_without_stun(self):
        """omerta-relay --no-stun-server stops answering STUN."""
        options = self.parse(relay_tap.Options(), "--no-stun-server")
        self.assertEqual(options.capabilities(), Capability.RELAY)

    def test_stun_alternate(self):
        """--stun-alternate takes IP[:PORT], defaulting the port to --port + 1."""
        options = self.parse(
            relay_tap.Options(), "--interface", "127.0.0.10", "--stun-alternate", "127.0.0.11"
        )
        self.assertEqual(options["stun-alternate"], ("127.0.0.11", 7401))
        options = self.parse(
            relay_tap.Options(), "--interface", "127.0.0.10",
            "--stun-alternate", "127.0.0.11:4000",
        )
        self.assertEqual(options["stun-alternate"], ("127.0.0.11", 4000))

    def test_stun_alternate_errors(self):
        """--stun-alternate needs a specific interface, a fixed port and a different address."""
        cases = [
            (["--stun-alternate", "127.0.0.11"], "--interface"),
            (["--interface", "127.0.0.10", "--port", "0", "--stun-alternate", "127.0.0.11"],
             "fixed --port"),
            (["--interface", "127.0.0.10", "--stun-alternate", "127.0.0.10:9"], "differ"),
            (["--interface", "127.0.0.10", "--stun-alternate", "nonsense"], "IP[:PORT]"),
        ]
        for args, fragment in cases:
            error = self.assertRaises(UsageError, self.parse, relay_tap.Options(), *args)
            self.assertIn(fragment, str(error), args)
        error = self.assertRaises(
            UsageError, self.parse, provider_tap.Options(),
            "--interface", "127.0.0.10", "--stun-alternate", "127.0.0.11",
        )
        self.assertIn("serve STUN", str(error))

    def test_odd_values_get_messages(self):
        """Values that used to end in tracebacks are refused with a message that says why."""
        cases = [
            (("--port", "²"), "is not a number"),
            (("--nat-interval", "nan"), "--nat-interval takes 0"),
            (("--nat-interval", "inf"), "--nat-interval takes 0"),
            (("--nat-interval", "1e-9"), "--nat-interval takes 0"),
            (("--interface", "203.0.113.9"), "not an address of this host"),
            (("--invite", "00" * 32), "bare network key"),
        ]
        for args, fragment in cases:
            error = self.assertRaises(UsageError, self.parse, relay_tap.Options(), *args)
            self.assertIn(fragment, str(error), args)
        self.assertEqual(self.parse(relay_tap.Options(), "--nat-interval", "0")["nat-interval"], 0)

    def test_stun_servers(self):
        """--stun takes IP:PORT (repeatable) and refuses host names."""
        options = self.parse(relay_tap.Options(), "--stun", "198.51.100.10:3478", "--stun", "[::1]:3478")
        self.assertEqual(options["stun"], [("198.51.100.10", 3478), ("::1", 3478)])
        self.assertRaises(UsageError, self.parse, relay_tap.Options(), "--stun", "stun.example.org:3478")

    def test_bootstrap_repeatable(self):
        """--bootstrap may be given several times and is parsed at once."""
        options = self.parse(
            relay_tap.Options(), "--bootstrap", "a@127.0.0.1:1", "--bootstrap", "b@[::1]:2"
        )
        self.assertEqual([s.name for s in options["bootstrap"]], ["a", "b"])

    def test_errors(self):
        """Bad values give usage errors that name the option and the fix."""
        cases = [
            (["--port", "99999"], "--port"),
            (["--port", "abc"], "--port"),
            (["--interface", "eth0"], "not an IP address"),
            (["--name", "bad name"], "--name"),
            (["--bootstrap", "127.0.0.1:7400"], "ID_OR_NAME@HOST:PORT"),
            (["--log-format", "xml"], "text, json"),
            (["--invite", "omerta://join/AAAA"], "--invite"),
        ]
        for args, fragment in cases:
            error = self.assertRaises(UsageError, self.parse, relay_tap.Options(), *args)
            self.assertIn(fragment, str(error), args)

    def test_world_readable_key(self):
        """A key file other users can read stops the node before it starts."""
        os.chmod(os.path.join(self.data_dir, IDENTITY_FILE), 0o644)
        error = self.assertRaises(UsageError, self.parse, relay_tap.Options())
        self.assertIn("chmod 600", str(error))

    def test_corrupt_networks_file(self):
        """A corrupt networks.json is reported, not overwritten."""
        path = os.path.join(self.data_dir, "networks.json")
        with open(path, "w") as f:
            f.write("{")
        self.assertRaises(UsageError, self.parse, relay_tap.Options())
        with open(path) as f:
            self.assertEqual(f.read(), "{")

    def test_no_network(self):
        """A node in no network is told how to create or join one."""
        options = relay_tap.Options()
        error = self.assertRaises(UsageError, options.parseOptions, ["--data-dir", self.mktemp()])
        self.assertIn("network create", str(error))

    def test_invite_accepted(self):
        """A valid invite makes a fresh data dir acceptable."""
        options = relay_tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--invite", self.membership.invite])
        self.assertEqual(options["invite"], [self.membership.invite])

    def test_json_logs_set_twistd_logger(self):
        """--log-format json installs the JSON observer through twistd's --logger."""
        options = relay_tap.Options()
        options.parent = {"logfile": None, "logger": None}
        self.parse(options, "--log-format", "json")
        self.assertEqual(options.parent["logger"], JSON_LOGGER)

    def test_json_logs_with_logfile_refused(self):
        """JSON logs go to stdout, so twistd --logfile with them is an error."""
        options = relay_tap.Options()
        options.parent = {"logfile": "x.log", "logger": None}
        self.assertRaises(UsageError, self.parse, options, "--log-format", "json")


class MakeServiceTests(unittest.TestCase):
    def test_assembles_without_binding(self):
        """makeService builds a MultiService; the socket is bound only by startService."""
        data_dir, membership = make_member_dir(self)
        options = relay_tap.Options()
        options.parseOptions(["--data-dir", data_dir, "--port", "7400", "--interface", "127.0.0.1"])
        reactor = MemoryUDPReactor()
        top = make_node_service(options, reactor=reactor)
        self.assertIsInstance(top, MultiService)
        self.assertEqual(reactor.udpPorts, {})
        self.assertEqual(reactor.getDelayedCalls(), [])
        top.startService()
        self.assertEqual(list(reactor.udpPorts), [("127.0.0.1", 7400)])
        top.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_relay_tap_make_service(self):
        """The relay tap's makeService returns the node under the name 'node'."""
        data_dir, _ = make_member_dir(self)
        options = relay_tap.Options()
        options.parseOptions(["--data-dir", data_dir])
        service = relay_tap.makeService(options)
        self.assertEqual(
            service.getServiceNamed("node").capabilities, Capability.RELAY | Capability.STUN
        )


class PluginTests(unittest.TestCase):
    def test_discoverable(self):
        """Both twistd plugins are found by Twisted's plugin system."""
        names = {p.tapname for p in getPlugins(IServiceMaker)}
        self.assertTrue({"omerta-relay", "omerta-provider"} <= names, names)
