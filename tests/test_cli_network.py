"""
Tests for the C{omerta network ...} commands and the C{omerta} entry point.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from omerta.app import cli
from omerta.app.cli_network import parse_duration
from omerta.app.paths import default_data_dir
from omerta.crypto.identity import Identity, load_or_create_identity
from omerta.crypto.invite import make_invite, parse_invite
from omerta.crypto.network import NetworkKey
from omerta.networks import NETWORKS_FILE, NetworkStore

NOW = 1_700_000_000.25
KEY = NetworkKey(bytes(range(32)))
BOB = Identity(Ed25519PrivateKey.from_private_bytes(b"\x02" * 32))


class CommandTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.data_dir = Path(self.mktemp())
        self.now = NOW

    def run_cli(self, *argv: str, data_dir: bool = True) -> tuple[int, str, str]:
        """
        Run C{omerta argv...} against the test data directory; return the
        exit status, stdout and stderr.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        args = list(argv)
        if data_dir:
            args = ["--data-dir", str(self.data_dir)] + args
        status = cli.main(args, stdout=stdout, stderr=stderr, clock=lambda: self.now)
        return status, stdout.getvalue(), stderr.getvalue()

    def run_json(self, *argv: str) -> object:
        status, out, err = self.run_cli("--output", "json", *argv)
        self.assertEqual((status, err), (0, ""))
        return json.loads(out)

    def run_error(self, *argv: str) -> str:
        """
        Run a command that must fail as a user error; return its message.
        """
        status, out, err = self.run_cli(*argv)
        self.assertEqual(status, 2)
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("omerta: error: "), err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(err.count("\n"), 1)
        return err[len("omerta: error: ") :].strip()


class NetworkCommandTests(CommandTestCase):
    """
    The commands' output, exit codes and effects.
    """

    def test_createJson(self) -> None:
        """
        create prints one JSON document with the id and a working invite.
        """
        document = self.run_json(
            "network", "create", "--name", "lab", "--endpoint", "192.0.2.7:7400"
        )
        identity = load_or_create_identity(self.data_dir)
        self.assertEqual(document["name"], "lab")
        self.assertTrue(document["created_by_me"])
        self.assertEqual(document["creator_peer_id"], identity.peer_id_text)
        self.assertEqual(document["bootstrap"], [f"{identity.peer_id_text}@192.0.2.7:7400"])
        self.assertEqual(document["created_at"], int(NOW))
        self.assertIsNone(document["expires_at"])
        self.assertNotIn("key", document)
        invite = parse_invite(document["invite"], NOW)
        self.assertEqual(invite.network_id_text, document["network_id"])

    def test_createText(self) -> None:
        """
        create in text mode prints the id and the invite link.
        """
        status, out, err = self.run_cli("network", "create", "--name", "lab")
        self.assertEqual((status, err), (0, ""))
        [m] = NetworkStore(self.data_dir).list()
        self.assertIn(f"created network lab ({m.network_id})", out)
        self.assertIn(f"invite: {m.invite}", out)
        self.assertIn("--endpoint", out)

    def test_createExpires(self) -> None:
        """
        --expires sets the invite's expiry relative to now.
        """
        document = self.run_json("network", "create", "--name", "lab", "--expires", "7d")
        self.assertEqual(document["expires_at"], int(NOW) + 7 * 86400)
        parse_invite(document["invite"], NOW + 7 * 86400 - 1)

    def test_createBadExpires(self) -> None:
        """
        A malformed --expires is a usage error (status 2) naming the option.
        """
        status, out, err = self.run_cli(
            "network", "create", "--name", "lab", "--expires", "soon"
        )
        self.assertEqual(status, 2)
        self.assertIn("argument --expires", err)
        self.assertIn("7d", err)

    def test_createBadEndpoint(self) -> None:
        """
        A bad endpoint is an error that shows the expected form.
        """
        message = self.run_error("network", "create", "--name", "lab", "--endpoint", "nope")
        self.assertIn("expected HOST:PORT", message)
        self.assertFalse((self.data_dir / NETWORKS_FILE).exists())

    def test_createBadPort(self) -> None:
        """
        An endpoint with a port out of range is refused.
        """
        message = self.run_error(
            "network", "create", "--name", "lab", "--endpoint", "192.0.2.7:70000"
        )
        self.assertIn("out of range", message)

    def test_createBadName(self) -> None:
        """
        An invalid network name is refused with the naming rule.
        """
        message = self.run_error("network", "create", "--name", "two words")
        self.assertIn("not a valid name", message)

    def test_joinInvite(self) -> None:
        """
        join with an invite link reports 'joined' and the network's details.
        """
        link = make_invite(BOB, KEY, "bobnet", [f"{BOB.peer_id_text}@192.0.2.9:7400"], NOW - 10)
        document = self.run_json("network", "join", "--key", link)
        self.assertEqual(document["action"], "joined")
        self.assertEqual(document["network_id"], KEY.network_id_text)
        self.assertEqual(document["name"], "bobnet")
        self.assertEqual(document["creator_peer_id"], BOB.peer_id_text)
        self.assertEqual(document["bootstrap"], [f"{BOB.peer_id_text}@192.0.2.9:7400"])
        self.assertNotIn("invite", document)
        self.assertNotIn("key", document)

    def test_joinNewerInvite(self) -> None:
        """
        join with a newer invite to a joined network reports 'updated'.
        """
        self.run_json("network", "join", "--key", make_invite(BOB, KEY, "bobnet", [], NOW - 10))
        newer = make_invite(BOB, KEY, "bobnet", ["relay-1@192.0.2.1:7400"], NOW - 5)
        status, out, err = self.run_cli("network", "join", "--key", newer)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("updated network bobnet", out)

    def test_joinBareKey(self) -> None:
        """
        join with a bare key and a name works; the text output says so.
        """
        status, out, err = self.run_cli(
            "network", "join", "--key", KEY.to_text(), "--name", "k"
        )
        self.assertEqual((status, err), (0, ""))
        self.assertIn(f"joined network k ({KEY.network_id_text})", out)

    def test_joinBareKeyWithoutName(self) -> None:
        """
        join with a bare key and no name asks for --name.
        """
        self.assertIn("--name", self.run_error("network", "join", "--key", KEY.to_text()))

    def test_joinBadKey(self) -> None:
        """
        join with text that is no key says what a key looks like.
        """
        message = self.run_error("network", "join", "--key", "not-a-key", "--name", "x")
        self.assertIn("a network key is 32 bytes", message)

    def test_joinExpired(self) -> None:
        """
        join with an expired invite says when it expired and what to do.
        """
        link = make_invite(BOB, KEY, "bobnet", [], NOW - 100, NOW - 1)
        message = self.run_error("network", "join", "--key", link)
        self.assertIn("this invite expired on 2023-11-14 22:13:19 UTC", message)
        self.assertIn("ask the network's creator for a new one", message)

    def test_joinWrongLink(self) -> None:
        """
        join with a link that is not an omerta invite says so.
        """
        message = self.run_error("network", "join", "--key", "https://example.com/x")
        self.assertIn("not an omerta invite link", message)

    def test_listJson(self) -> None:
        """
        list --output json gives id, name, created-by-me and peer count of
        every network.
        """
        self.run_json("network", "create", "--name", "mine", "--endpoint", "192.0.2.7:1")
        self.run_json("network", "join", "--key", KEY.to_text(), "--name", "k")
        document = self.run_json("network", "list")
        self.assertEqual(
            [(n["name"], n["created_by_me"], n["bootstrap_count"]) for n in document["networks"]],
            [("mine", True, 1), ("k", False, 0)],
        )
        self.assertEqual(document["networks"][1]["network_id"], KEY.network_id_text)

    def test_listText(self) -> None:
        """
        list prints a table with a header and one row per network.
        """
        self.run_json("network", "join", "--key", KEY.to_text(), "--name", "k")
        status, out, err = self.run_cli("network", "list")
        self.assertEqual(status, 0)
        header, row = out.splitlines()
        self.assertEqual(header.split(), ["ID", "NAME", "CREATED-BY-ME", "BOOTSTRAP"])
        self.assertEqual(row.split(), [KEY.network_id_text, "k", "no", "0"])

    def test_listEmpty(self) -> None:
        """
        list with no network says how to create or join one.
        """
        status, out, err = self.run_cli("network", "list")
        self.assertEqual(status, 0)
        self.assertIn("omerta network create", out)
        self.assertEqual(self.run_json("network", "list"), {"networks": []})

    def test_showHidesKey(self) -> None:
        """
        show prints every field and the invite but not the raw key.
        """
        created = self.run_json("network", "create", "--name", "lab")
        [m] = NetworkStore(self.data_dir).list()
        document = self.run_json("network", "show", "--id", "lab")
        self.assertEqual(document["invite"], created["invite"])
        self.assertNotIn("key", document)
        status, out, err = self.run_cli("network", "show", "--id", m.network_id[:5])
        self.assertEqual(status, 0)
        self.assertIn(m.network_id, out)
        self.assertIn(created["invite"], out)
        self.assertNotIn("\nkey:", out)
        self.assertNotIn(m.key.to_text(), out)

    def test_showKey(self) -> None:
        """
        show --show-key adds the raw key.
        """
        self.run_json("network", "join", "--key", KEY.to_text(), "--name", "k")
        document = self.run_json("network", "show", "--id", "k", "--show-key")
        self.assertEqual(document["key"], KEY.to_text())
        self.assertIsNone(document["invite"])
        status, out, err = self.run_cli("network", "show", "--id", "k", "--show-key")
        self.assertIn(KEY.to_text(), out)

    def test_showUnknown(self) -> None:
        """
        show with an unknown id is an error pointing at 'omerta network list'.
        """
        message = self.run_error("network", "show", "--id", "deadbeef")
        self.assertIn("no network matches 'deadbeef'", message)
        self.assertIn("omerta network list", message)

    def test_leave(self) -> None:
        """
        leave removes a joined network.
        """
        self.run_json("network", "join", "--key", KEY.to_text(), "--name", "k")
        document = self.run_json("network", "leave", "--id", "k")
        self.assertEqual(
            document,
            {"action": "left", "network_id": KEY.network_id_text, "name": "k"},
        )
        self.assertEqual(NetworkStore(self.data_dir).list(), [])

    def test_leaveCreatedNeedsForce(self) -> None:
        """
        leave refuses a network this node created until --force is given.
        """
        self.run_json("network", "create", "--name", "lab")
        message = self.run_error("network", "leave", "--id", "lab")
        self.assertIn("pass --force", message)
        status, out, err = self.run_cli("network", "leave", "--id", "lab", "--force")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("left network lab", out)

    def test_corruptFile(self) -> None:
        """
        A corrupt networks.json is reported by name and left untouched.
        """
        self.data_dir.mkdir(mode=0o700)
        path = self.data_dir / NETWORKS_FILE
        path.write_bytes(b"{not json")
        path.chmod(0o600)
        for argv in (
            ("network", "list"),
            ("network", "create", "--name", "lab"),
            ("network", "join", "--key", KEY.to_text(), "--name", "k"),
        ):
            message = self.run_error(*argv)
            self.assertIn(str(path), message)
            self.assertIn("corrupt", message)
        self.assertEqual(path.read_bytes(), b"{not json")

    def test_dataDirIsAFile(self) -> None:
        """
        A --data-dir that is a regular file gives an error, not a traceback.
        """
        self.data_dir.write_bytes(b"")
        message = self.run_error("network", "create", "--name", "lab")
        self.assertIn(str(self.data_dir), message)


class GlobalOptionTests(CommandTestCase):
    """
    Options shared by every command and the entry point's behaviour.
    """

    def test_optionsAfterCommand(self) -> None:
        """
        --data-dir and --output work after the command as well as before it.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        status = cli.main(
            [
                "network", "join", "--key", KEY.to_text(), "--name", "k",
                "--data-dir", str(self.data_dir), "--output", "json",
            ],
            stdout=stdout,
            stderr=stderr,
            clock=lambda: NOW,
        )
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(stdout.getvalue())["name"], "k")
        self.assertEqual(len(NetworkStore(self.data_dir).list()), 1)

    def test_laterOptionWins(self) -> None:
        """
        An option given after the command overrides the one before it, and
        one given only before it is kept.
        """
        status, out, err = self.run_cli("--output", "json", "network", "list", "--output", "text")
        self.assertIn("no network", out)
        status, out, err = self.run_cli("--output", "json", "network", "list")
        self.assertEqual(json.loads(out), {"networks": []})

    def test_defaultDataDir(self) -> None:
        """
        Without --data-dir the data directory comes from $OMERTA_DATA_DIR.
        """
        self.patch(os, "environ", {**os.environ, "OMERTA_DATA_DIR": str(self.data_dir)})
        status, out, err = self.run_cli(
            "network", "join", "--key", KEY.to_text(), "--name", "k", data_dir=False
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(len(NetworkStore(self.data_dir).list()), 1)

    def test_noCommand(self) -> None:
        """
        Running without a command is a usage error with status 2.
        """
        status, out, err = self.run_cli()
        self.assertEqual(status, 2)
        self.assertIn("usage: omerta", err)

    def test_help(self) -> None:
        """
        --help prints usage on stdout and exits 0.
        """
        status, out, err = self.run_cli("network", "create", "--help")
        self.assertEqual(status, 0)
        self.assertIn("--endpoint", out)
        self.assertIn("--data-dir", out)

    def test_badOutput(self) -> None:
        """
        An unknown --output value is a usage error.
        """
        status, out, err = self.run_cli("--output", "yaml", "network", "list")
        self.assertEqual(status, 2)
        self.assertIn("invalid choice", err)


class DurationTests(SynchronousTestCase):
    """
    L{parse_duration}.
    """

    def test_units(self) -> None:
        """
        Seconds, minutes, hours, days, weeks and bare numbers are understood.
        """
        for text, seconds in [
            ("3600s", 3600), ("30m", 1800), ("12h", 43200), ("7d", 604800),
            ("2w", 1209600), ("90", 90), ("1D", 86400),
        ]:
            self.assertEqual(parse_duration(text), seconds)

    def test_bad(self) -> None:
        """
        Zero, negative, fractional and unit-less words are refused.
        """
        for text in ["0d", "-1h", "1.5h", "soon", "", "7 days"]:
            self.assertRaises(argparse.ArgumentTypeError, parse_duration, text)


class DataDirTests(SynchronousTestCase):
    """
    L{default_data_dir}.
    """

    def test_explicit(self) -> None:
        """
        $OMERTA_DATA_DIR wins over everything else.
        """
        self.assertEqual(
            default_data_dir({"OMERTA_DATA_DIR": "/srv/omerta", "XDG_DATA_HOME": "/x", "HOME": "/h"}),
            Path("/srv/omerta"),
        )

    def test_xdg(self) -> None:
        """
        An absolute $XDG_DATA_HOME is used; a relative one is ignored.
        """
        self.assertEqual(
            default_data_dir({"XDG_DATA_HOME": "/x", "HOME": "/h"}), Path("/x/omerta")
        )
        self.assertEqual(
            default_data_dir({"XDG_DATA_HOME": "rel", "HOME": "/h"}),
            Path("/h/.local/share/omerta"),
        )

    def test_home(self) -> None:
        """
        Without either variable the directory is ~/.local/share/omerta.
        """
        self.assertEqual(default_data_dir({"HOME": "/h"}), Path("/h/.local/share/omerta"))
        self.assertEqual(
            default_data_dir({"OMERTA_DATA_DIR": ""}),
            Path.home() / ".local" / "share" / "omerta",
        )
