"""
C{--config PATH}: daemon options from a TOML file, overridden by flags.
"""

import json
import os
import time

from twisted.python.usage import UsageError
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from omerta.app import provider_tap, relay_tap
from omerta.app.config import OptionSchema, apply_config_file
from omerta.app.logs import json_stdout_observer
from omerta.crypto.identity import load_or_create_identity
from omerta.networks import NetworkStore
from omerta.wire.messages import Capability


def toml_string(text):
    """
    C{text} as a TOML basic string (JSON's escapes are TOML's).
    """
    return json.dumps(text)


class ConfigTestCase(unittest.TestCase):
    def setUp(self):
        self.data_dir = self.mktemp()
        self.membership = NetworkStore(self.data_dir).create(
            load_or_create_identity(self.data_dir), "ops", now=time.time()
        )

    def write(self, text, data_dir=True):
        """
        A config file holding C{text}, after a data-dir line unless told not to.
        """
        path = self.mktemp() + ".toml"
        with open(path, "w", encoding="utf-8") as f:
            if data_dir:
                f.write(f"data-dir = {toml_string(self.data_dir)}\n")
            f.write(text)
        return path

    def parse(self, options, text, *args, data_dir=True):
        options.parseOptions(["--config", self.write(text, data_dir), *args])
        return options

    def error(self, options, text, *args, data_dir=True):
        error = self.assertRaises(UsageError, self.parse, options, text, *args, data_dir=data_dir)
        return str(error)


class ValueTests(ConfigTestCase):
    def test_parameters(self):
        """Integers, floats and strings set parameters, checked as flags are."""
        options = self.parse(
            relay_tap.Options(),
            'port = 7500\ninterface = "127.0.0.1"\nname = "relay-1"\n'
            'nat-interval = 12.5\nlog-format = "text"\nstun-alternate = "127.0.0.2"\n',
        )
        self.assertEqual(options["port"], 7500)
        self.assertEqual(options["interface"], "127.0.0.1")
        self.assertEqual(options["name"], "relay-1")
        self.assertEqual(options["nat-interval"], 12.5)
        self.assertEqual(options["stun-alternate"], ("127.0.0.2", 7501))
        self.assertEqual(str(options["data-dir"]), self.data_dir)

    def test_endpoint_parameters(self):
        """The manhole and metrics parameters are set from the file as text."""
        options = relay_tap.Options()
        path = self.write(
            'metrics = "tcp:9400:interface=127.0.0.1"\n'
            'manhole = "tcp:7422:interface=127.0.0.1"\n'
            'manhole-keys = "/etc/omerta/manhole_authorized_keys"\n'
            "manhole-allow-remote = false\n"
        )
        apply_config_file(options, path)
        self.assertEqual(options["metrics"], "tcp:9400:interface=127.0.0.1")
        self.assertEqual(options["manhole"], "tcp:7422:interface=127.0.0.1")
        self.assertEqual(options["manhole-keys"], "/etc/omerta/manhole_authorized_keys")
        self.assertEqual(options["manhole-allow-remote"], 0)

    def test_flags(self):
        """Booleans set flags."""
        relay = self.parse(relay_tap.Options(), "no-stun-server = true\n")
        self.assertEqual(relay.capabilities(), Capability.RELAY)
        provider = self.parse(provider_tap.Options(), "stun-server = true\n")
        self.assertEqual(provider.capabilities(), Capability.PROVIDER | Capability.STUN)
        provider = self.parse(provider_tap.Options(), "relay = true\n")
        self.assertEqual(
            provider.capabilities(), Capability.PROVIDER | Capability.RELAY | Capability.STUN
        )
        provider = self.parse(provider_tap.Options(), "relay = false\nstun-server = false\n")
        self.assertEqual(provider.capabilities(), Capability.PROVIDER)

    def test_repeatables(self):
        """Arrays set repeatable options, each element through the option's own method."""
        options = self.parse(
            relay_tap.Options(),
            'bootstrap = ["a@127.0.0.1:1", "b@[::1]:2"]\n'
            'stun = ["198.51.100.10:3478", "[::1]:3478"]\n'
            f"invite = [{toml_string(self.membership.invite)}]\n",
        )
        self.assertEqual([s.name for s in options["bootstrap"]], ["a", "b"])
        self.assertEqual(options["stun"], [("198.51.100.10", 3478), ("::1", 3478)])
        self.assertEqual(options["invite"], [self.membership.invite])

    def test_single_string_for_repeatable(self):
        """A string for a repeatable option is a list of one."""
        options = self.parse(relay_tap.Options(), 'bootstrap = "a@127.0.0.1:1"\n')
        self.assertEqual([s.name for s in options["bootstrap"]], ["a"])

    def test_underscore_spelling(self):
        """data_dir is accepted for data-dir, and so for every key."""
        options = self.parse(
            relay_tap.Options(),
            f"data_dir = {toml_string(self.data_dir)}\nno_stun_server = true\n",
            data_dir=False,
        )
        self.assertEqual(str(options["data-dir"]), self.data_dir)
        self.assertTrue(options["no-stun-server"])

    def test_both_spellings_refused(self):
        """A key given as data-dir and data_dir is an error naming both."""
        message = self.error(relay_tap.Options(), f"data_dir = {toml_string(self.data_dir)}\n")
        self.assertIn("'data-dir' and 'data_dir'", message)

    def test_every_option_has_a_key(self):
        """Every option of both plugins but --config, --help and --version is a key."""
        for options in (relay_tap.Options(), provider_tap.Options()):
            names = {name.rstrip("=") for name in options.longOpt}
            self.assertEqual(
                set(OptionSchema(options).known()), names - {"config", "help", "version"}
            )


class PrecedenceTests(ConfigTestCase):
    def test_flag_overrides_file(self):
        """The file sets port 7500; --port 7600 on the command line wins."""
        options = self.parse(relay_tap.Options(), "port = 7500\n", "--port", "7600")
        self.assertEqual(options["port"], 7600)
        options = self.parse(relay_tap.Options(), "port = 7500\n", "-p", "7600")
        self.assertEqual(options["port"], 7600)

    def test_flag_overrides_file_before_config(self):
        """The command line wins wherever --config stands in it."""
        options = relay_tap.Options()
        options.parseOptions(["--port", "7600", "-c", self.write("port = 7500\n")])
        self.assertEqual(options["port"], 7600)

    def test_file_overrides_default(self):
        """A file value replaces the option's default."""
        options = self.parse(relay_tap.Options(), 'name = "from-file"\nport = 7500\n')
        self.assertEqual((options["name"], options["port"]), ("from-file", 7500))

    def test_bootstrap_replaced(self):
        """--bootstrap on the command line replaces the file's bootstrap list."""
        options = self.parse(
            relay_tap.Options(),
            'bootstrap = ["a@127.0.0.1:1", "b@127.0.0.1:2"]\n',
            "--bootstrap", "c@127.0.0.1:3", "--bootstrap", "d@127.0.0.1:4",
        )
        self.assertEqual([s.name for s in options["bootstrap"]], ["c", "d"])

    def test_bootstrap_kept(self):
        """Without --bootstrap on the command line the file's list stands."""
        options = self.parse(
            relay_tap.Options(), 'bootstrap = ["a@127.0.0.1:1"]\n', "--stun", "198.51.100.1:3478"
        )
        self.assertEqual([s.name for s in options["bootstrap"]], ["a"])
        self.assertEqual(options["stun"], [("198.51.100.1", 3478)])

    def test_each_repeatable_replaced_on_its_own(self):
        """--stun replaces the file's stun list and leaves its bootstrap list."""
        options = self.parse(
            relay_tap.Options(),
            'bootstrap = ["a@127.0.0.1:1"]\nstun = ["198.51.100.1:3478"]\n',
            "--stun", "198.51.100.2:3478",
        )
        self.assertEqual([s.name for s in options["bootstrap"]], ["a"])
        self.assertEqual(options["stun"], [("198.51.100.2", 3478)])

    def test_flag_added_to_file(self):
        """A flag on the command line turns on what the file left off."""
        options = self.parse(relay_tap.Options(), "no-stun-server = false\n", "--no-stun-server")
        self.assertTrue(options["no-stun-server"])


class ErrorTests(ConfigTestCase):
    def test_unknown_key(self):
        """An unknown key is an error naming the file, the key and the known keys."""
        path = self.write("prot = 7500\n")
        error = self.assertRaises(
            UsageError, relay_tap.Options().parseOptions, ["--config", path]
        )
        self.assertIn(f"{path}: unknown key 'prot'", str(error))
        self.assertIn("known keys: bootstrap, dashboard, dashboard-allow-remote, data-dir,",
                      str(error))

    def test_other_plugins_key(self):
        """relay (a provider flag) in an omerta-relay config is an unknown key, with a hint."""
        message = self.error(relay_tap.Options(), "relay = true\n")
        self.assertIn("unknown key 'relay'", message)
        self.assertIn("[provider] table", message)
        message = self.error(provider_tap.Options(), "no-stun-server = true\n")
        self.assertIn("unknown key 'no-stun-server'", message)

    def test_config_key(self):
        """A config file cannot name another config file."""
        message = self.error(relay_tap.Options(), 'config = "other.toml"\n')
        self.assertIn("'config'", message)

    def test_help_is_not_a_key(self):
        """help and version are command-line actions, not keys."""
        self.assertIn("unknown key 'help'", self.error(relay_tap.Options(), "help = true\n"))

    def test_wrong_types(self):
        """A value of the wrong type is an error naming the file and the key."""
        cases = [
            ('no-stun-server = "yes"\n', "'no-stun-server' is a flag: give true or false"),
            ("no-stun-server = 1\n", "'no-stun-server' is a flag"),
            ("port = [7500]\n", "'port' takes a string or a number, not an array"),
            ("port = true\n", "'port' takes a string or a number, not a boolean"),
            ("name = 1979-05-27\n", "'name' takes a string or a number, not a date"),
            ('bootstrap = ["a@127.0.0.1:1", 2]\n',
             "'bootstrap' takes an array of strings; element 2 is an integer (2)"),
            ("bootstrap = {a = 1}\n", "'bootstrap' takes an array of strings, not a table"),
        ]
        for text, fragment in cases:
            path = self.write(text)
            error = self.assertRaises(
                UsageError, relay_tap.Options().parseOptions, ["--config", path]
            )
            self.assertIn(f"{path}: key {fragment}", str(error), text)

    def test_syntax_error(self):
        """Invalid TOML is an error naming the file and the line."""
        path = self.write('name = "a"\nport = \n', data_dir=False)
        error = self.assertRaises(
            UsageError, relay_tap.Options().parseOptions, ["--config", path]
        )
        self.assertIn(f"{path}: invalid TOML:", str(error))
        self.assertIn("line 2", str(error))

    def test_not_utf8(self):
        """A file that is not UTF-8 is an error naming it."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b'name = "\xff"\n')
        error = self.assertRaises(
            UsageError, relay_tap.Options().parseOptions, ["--config", path]
        )
        self.assertIn(f"{path}: not UTF-8", str(error))

    def test_missing_file(self):
        """A missing file is an error naming it."""
        path = self.mktemp()
        error = self.assertRaises(
            UsageError, relay_tap.Options().parseOptions, ["--config", path]
        )
        self.assertIn(f"--config {path}: cannot read it", str(error))

    def test_directory(self):
        """A directory given as the config file is an error naming it."""
        path = self.mktemp()
        os.mkdir(path)
        error = self.assertRaises(
            UsageError, relay_tap.Options().parseOptions, ["--config", path]
        )
        self.assertIn(f"--config {path}: cannot read it", str(error))


class ValidationTests(ConfigTestCase):
    def test_bad_port(self):
        """A bad port in the file gives the --port usage error."""
        from_file = self.error(relay_tap.Options(), "port = 99999\n")
        from_flag = str(
            self.assertRaises(
                UsageError, relay_tap.Options().parseOptions,
                ["--data-dir", self.data_dir, "--port", "99999"],
            )
        )
        self.assertEqual(from_file, from_flag)
        self.assertIn("--port", from_file)

    def test_same_checks_as_flags(self):
        """Each file value meets the check its flag meets."""
        cases = [
            ('port = "abc"\n', "--port"),
            ("port = -1\n", "--port"),
            ('interface = "eth0"\n', "not an IP address"),
            ('name = "bad name"\n', "--name"),
            ('log-format = "xml"\n', "text, json"),
            ("nat-interval = -5\n", "--nat-interval"),
            ('invite = ["omerta://join/AAAA"]\n', "--invite"),
            ('stun-alternate = "127.0.0.2"\n', "--interface"),
        ]
        for text, fragment in cases:
            self.assertIn(fragment, self.error(relay_tap.Options(), text), text)

    def test_repeatable_errors_name_file_and_key(self):
        """A bad bootstrap or stun element gives the flag's error, prefixed by file and key."""
        path = self.write('bootstrap = ["127.0.0.1:7400"]\n')
        error = str(self.assertRaises(
            UsageError, relay_tap.Options().parseOptions, ["--config", path]
        ))
        self.assertIn(f"{path}: key 'bootstrap':", error)
        self.assertIn("ID_OR_NAME@HOST:PORT", error)
        message = self.error(relay_tap.Options(), 'stun = ["stun.example.org:3478"]\n')
        self.assertIn("key 'stun': --stun stun.example.org:3478: give an IP address", message)


class RoleTableTests(ConfigTestCase):
    COMBINED = (
        'name = "shared"\n'
        "[relay]\n"
        "port = 7500\n"
        "no-stun-server = true\n"
        "[provider]\n"
        "port = 7501\n"
        "relay = true\n"
        'bootstrap = ["relay@127.0.0.1:7500"]\n'
    )

    def test_each_plugin_takes_its_table(self):
        """[relay] applies to omerta-relay only and [provider] to omerta-provider only."""
        relay = self.parse(relay_tap.Options(), self.COMBINED)
        provider = self.parse(provider_tap.Options(), self.COMBINED)
        self.assertEqual((relay["port"], provider["port"]), (7500, 7501))
        self.assertEqual(relay.capabilities(), Capability.RELAY)
        self.assertEqual(
            provider.capabilities(), Capability.PROVIDER | Capability.RELAY | Capability.STUN
        )
        self.assertEqual(relay["bootstrap"], [])
        self.assertEqual([s.name for s in provider["bootstrap"]], ["relay"])
        self.assertEqual((relay["name"], provider["name"]), ("shared", "shared"))

    def test_table_overrides_top_level(self):
        """A key in the role table overrides the same top-level key."""
        text = (
            'name = "top"\nbootstrap = ["a@127.0.0.1:1"]\n'
            '[relay]\nname = "table"\nbootstrap = ["b@127.0.0.1:2"]\n'
        )
        options = self.parse(relay_tap.Options(), text)
        self.assertEqual(options["name"], "table")
        self.assertEqual([s.name for s in options["bootstrap"]], ["b"])

    def test_flags_override_tables(self):
        """The command line overrides a role table too."""
        options = self.parse(relay_tap.Options(), self.COMBINED, "--port", "7600")
        self.assertEqual(options["port"], 7600)

    def test_other_table_checked(self):
        """A mistake in [provider] is reported by omerta-relay too, with the table named."""
        message = self.error(relay_tap.Options(), "[provider]\nrelai = true\n")
        self.assertIn("unknown key 'provider.relai'", message)
        message = self.error(relay_tap.Options(), '[provider]\nrelay = "yes"\n')
        self.assertIn("key 'provider.relay' is a flag", message)

    def test_table_key_of_other_plugin(self):
        """A provider-only key in [relay] is an unknown key."""
        message = self.error(relay_tap.Options(), "[relay]\nstun-server = true\n")
        self.assertIn("unknown key 'relay.stun-server'", message)

    def test_unknown_table(self):
        """A table other than [relay] or [provider] is an unknown key."""
        message = self.error(relay_tap.Options(), "[stats]\nport = 9400\n")
        self.assertIn("unknown key 'stats'", message)
        message = self.error(relay_tap.Options(), "[port]\nx = 1\n")
        self.assertIn("'port' takes a string or a number, not a table", message)


class TwistdTests(ConfigTestCase):
    def test_through_twistd(self):
        """twistd omerta-relay --config applies the file, JSON logs included."""
        config = ServerOptions()
        path = self.write('port = 7500\nlog-format = "json"\n')
        config.parseOptions(["-n", "omerta-relay", "--config", path, "--name", "r1"])
        self.assertEqual(config.subOptions["port"], 7500)
        self.assertEqual(config.subOptions["name"], "r1")
        self.assertIs(config["logger"], json_stdout_observer)


class DocumentationTests(unittest.TestCase):
    def test_operations_examples(self):
        """The TOML examples of docs/operations.md use only keys and types both plugins take."""
        path = os.path.join(os.path.dirname(__file__), "..", "docs", "operations.md")
        with open(path, encoding="utf-8") as f:
            blocks = f.read().split("```toml\n")[1:]
        self.assertEqual(len(blocks), 3)
        for block in blocks:
            example = self.mktemp()
            with open(example, "w", encoding="utf-8") as f:
                f.write(block.split("```")[0])
            for options in (relay_tap.Options(), provider_tap.Options()):
                apply_config_file(options, example)
