"""
STUN interoperability on loopback (127.0.0.1 and 127.0.0.2 give a server two
addresses without namespaces): our client against coturn and against our own
relay must agree; Debian's classic 'stun' client and aioice's client get
correct answers from our relay.
"""

import asyncio
import json
import os
import subprocess
import time

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from omerta.crypto.identity import load_or_create_identity
from omerta.networks import NetworkStore
from tests.integration import Daemon, free_udp_port_pair, require_program, run_cli, wait_for


class Coturn:
    def __init__(self, testcase, port):
        binary = require_program("turnserver", "coturn")
        self.process = subprocess.Popen(
            [binary, "-n", "-L", "127.0.0.1", "-L", "127.0.0.2", f"--listening-port={port}",
             "--stun-only", "--no-cli", "--no-auth", "--no-tls", "--no-dtls",
             "--log-file=stdout", "--simple-log",
             f"--pidfile={os.path.abspath(testcase.mktemp())}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        testcase.addCleanup(self.stop)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


def nat_check(port):
    result = run_cli("--output", "json", "nat", "check", "--stun", f"127.0.0.1:{port}")
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)


class InteropTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.ours = free_udp_port_pair()
        data_dir = os.path.abspath(self.mktemp())
        NetworkStore(data_dir).create(load_or_create_identity(data_dir), "interop", now=time.time())
        self.relay = Daemon(
            self, "omerta-relay", data_dir, "--interface", "127.0.0.1", "--port", str(self.ours),
            "--stun-alternate", f"127.0.0.2:{self.ours + 1}", "--nat-interval", "0",
        )

    async def answered(self, port):
        return await wait_for(lambda: nat_check(port), 30, f"a STUN answer on port {port}",
                              interval=0.3, describe=self.relay.output)

    def test_our_client_agrees_with_coturn(self):
        """omerta nat check gives the same verdict against coturn and against our relay."""
        theirs = free_udp_port_pair()
        Coturn(self, theirs)

        async def check():
            ours = await self.answered(self.ours)
            reference = await self.answered(theirs)
            for key in ("mapping", "filtering", "nat_type", "rfc5780", "hairpin"):
                self.assertEqual(ours[key], reference[key], key)
            self.assertEqual(
                (ours["mapping"], ours["filtering"], ours["nat_type"], ours["rfc5780"]),
                ("no-nat", "endpoint-independent", "public", True),
            )

        return ensureDeferred(check())

    def test_debian_stun_client(self):
        """Debian's classic RFC 3489 'stun' client gets the same answer from us as from coturn."""
        stun = require_program("stun", "stun-client")
        theirs = free_udp_port_pair()
        Coturn(self, theirs)

        def classify(port):
            result = subprocess.run([stun, f"127.0.0.1:{port}", "-v"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, timeout=60)
            verdict = [line for line in result.stdout.splitlines() if line.startswith("Primary:")]
            return result.returncode, verdict, result.stdout

        async def check():
            await self.answered(self.ours)
            await self.answered(theirs)
            ours, reference = classify(self.ours), classify(theirs)
            self.assertEqual(ours[:2], reference[:2], ours[2])
            self.assertEqual(ours[1], ["Primary: Open\t"])
            self.assertIn(f"ChangedAddress = 127.0.0.2:{self.ours + 1}", ours[2])

        return ensureDeferred(check())

    def test_aioice_client(self):
        """aioice's STUN client learns its server-reflexive address from our relay."""
        try:
            from aioice import ice
            from aioice.candidate import Candidate
        except ImportError:
            raise unittest.SkipTest("aioice not installed (test extra)") from None

        async def gather():
            loop = asyncio.get_running_loop()
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: ice.StunProtocol(None), local_addr=("127.0.0.1", 0)
            )
            host, port = transport.get_extra_info("sockname")
            protocol.local_candidate = Candidate(
                foundation="1", component=1, transport="udp", priority=1,
                host=host, port=port, type="host",
            )
            try:
                candidate, _ = await asyncio.wait_for(
                    ice.server_reflexive_candidate(protocol, ("127.0.0.1", self.ours)), 20
                )
                return candidate, (host, port)
            finally:
                transport.close()

        async def check():
            await self.answered(self.ours)
            # aioice runs on asyncio: give it its own loop until it is done.
            loop = asyncio.new_event_loop()
            try:
                candidate, local = loop.run_until_complete(gather())
            finally:
                loop.close()
            self.assertEqual((candidate.host, candidate.port), local)
            self.assertEqual(candidate.type, "srflx")

        return ensureDeferred(check())
