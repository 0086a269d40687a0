"""
Endpoint and bootstrap spec parsing.
"""

from twisted.trial import unittest

from omerta.addressing import AddressError, Endpoint, parse_bootstrap, parse_endpoint

PEER = "0123456789abcdef0123456789abcdef"


class EndpointTests(unittest.TestCase):
    def test_forms(self):
        """IPv4, bracketed IPv6 and host names parse; str() gives them back."""
        for text, host, port in [
            ("127.0.0.1:7400", "127.0.0.1", 7400),
            ("[::1]:7400", "::1", 7400),
            ("[2001:DB8::1]:1", "2001:db8::1", 1),
            ("relay.example.org:65535", "relay.example.org", 65535),
        ]:
            endpoint = parse_endpoint(text)
            self.assertEqual((endpoint.host, endpoint.port), (host, port))
            self.assertEqual(parse_endpoint(str(endpoint)), endpoint)

    def test_errors(self):
        """Bad endpoints give messages that say what is expected."""
        cases = {
            "127.0.0.1": "HOST:PORT",
            "::1:7400": "brackets",
            "[::1]7400": "HOST:PORT",
            "[1.2.3.4]:5": "not an IPv6",
            "host:0": "out of range",
            "host:70000": "out of range",
            "host:http": "not a number",
            "bad_host:1": "host name",
            ":7400": "HOST:PORT",
        }
        for text, fragment in cases.items():
            error = self.assertRaises(AddressError, parse_endpoint, text)
            self.assertIn(fragment, str(error), text)

    def test_family(self):
        """Endpoints know their address family."""
        self.assertEqual(Endpoint("::1", 1).family, 6)
        self.assertEqual(Endpoint("10.0.0.1", 1).family, 4)
        self.assertEqual(Endpoint("example.org", 1).family, 0)


class BootstrapTests(unittest.TestCase):
    def test_id(self):
        """A 32-hex-digit left side is a peer id to verify."""
        spec = parse_bootstrap(f"{PEER.upper()}@[::1]:7400")
        self.assertEqual((spec.peer_id, spec.name), (PEER, None))
        self.assertEqual(str(spec), f"{PEER}@[::1]:7400")

    def test_name(self):
        """Anything else valid as a name is a name."""
        spec = parse_bootstrap("relay-1@relay.example.org:7400")
        self.assertEqual((spec.peer_id, spec.name), (None, "relay-1"))

    def test_errors(self):
        """Missing parts and bad names are explained."""
        for text, fragment in [
            ("127.0.0.1:7400", "ID_OR_NAME@HOST:PORT"),
            ("@127.0.0.1:7400", "ID_OR_NAME@HOST:PORT"),
            ("bad name@127.0.0.1:7400", "not a valid name"),
            ("relay@nowhere", "HOST:PORT"),
        ]:
            error = self.assertRaises(AddressError, parse_bootstrap, text)
            self.assertIn(fragment, str(error), text)
