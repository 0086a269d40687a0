"""
The per-peer connection on its own: the state machine, the path values, one
send over whatever path is current.
"""

from __future__ import annotations

from twisted.trial import unittest

from omerta.mesh.peer import (DIRECT, PUNCHED, RELAYED, TRANSITIONS, BadTransition, Connections,
                              Input, Path, RelayRoute, State)

A = ("198.51.100.7", 7400)
B = ("203.0.113.9", 40001)
ROUTE = RelayRoute("198.51.100.1", 7400, b"\xf0\x4d\x01\x80" + bytes(8))
RELAY = bytes(range(16))
PEER = b"p" * 16


class PeerConnectionTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        self.sent = []
        self.table = Connections(lambda kind, **data: self.events.append((kind, data)),
                                 lambda frame, address: self.sent.append((frame, address)),
                                 limit=3)
        self.conn = self.table.open(PEER)

    def kinds(self):
        return [kind for kind, _ in self.events]

    def test_new_connection_has_no_path(self):
        self.assertIs(self.conn.state, State.OFFLINE)
        self.assertIsNone(self.conn.path)
        self.assertFalse(self.conn.send(b"x"))
        self.assertEqual(self.sent, [])

    def test_prove_then_suspect_then_heard(self):
        conn = self.conn
        conn.move(conn.path_to(A), now=1.0)
        self.assertIs(conn.state, State.UNPROVEN)
        conn.prove()
        self.assertIs(conn.state, State.ACTIVE)
        conn.suspect(5.0)
        self.assertIs(conn.state, State.SUSPECT)
        self.assertEqual(conn.suspected_at, 5.0)
        conn.heard()
        self.assertIs(conn.state, State.ACTIVE)
        self.assertIsNone(conn.suspected_at)
        self.assertEqual(self.kinds(), ["peer_suspected"])

    def test_unproven_suspect_returns_unproven(self):
        conn = self.conn
        conn.move(conn.path_to(A), now=1.0)
        conn.suspect(2.0)
        conn.heard()
        self.assertIs(conn.state, State.UNPROVEN)

    def test_every_path_change_emits_path_changed_and_sends_follow(self):
        conn = self.conn
        conn.move(conn.path_to(A), now=1.0, proven=True)
        self.assertTrue(conn.send(b"one"))
        conn.path_dead(3.0)
        self.assertIs(conn.state, State.FAILING_OVER)
        self.assertEqual(conn.failing_over_since, 3.0)
        conn.move(conn.path_to(ROUTE, RELAY), now=4.0)
        self.assertEqual(conn.path, Path(RELAYED, ROUTE, RELAY))
        self.assertEqual(conn.path.endpoint, ROUTE.relay_address)
        self.assertIsNone(conn.failing_over_since)
        self.assertTrue(conn.send(b"two"))
        conn.mark_punched(B, 5.0)
        conn.move(conn.path_to(B), now=5.0, proven=True)
        self.assertEqual(conn.path.kind, PUNCHED)
        self.assertTrue(conn.send(b"three"))
        self.assertEqual(self.sent, [(b"one", A), (b"two", ROUTE), (b"three", B)])
        changes = [data for kind, data in self.events if kind == "path_changed"]
        self.assertEqual([(c["old"], c["new"], c["path_kind"]) for c in changes],
                         [(A, ROUTE, RELAYED), (ROUTE, B, PUNCHED)])

    def test_punch_proves_current_direct_path_punched(self):
        conn = self.conn
        conn.move(conn.path_to(B), now=1.0)
        self.assertEqual(conn.path.kind, DIRECT)
        conn.mark_punched(B, 2.0)
        self.assertEqual(conn.path.kind, PUNCHED)
        conn.forget_punched(B)
        self.assertEqual(conn.path_to(B).kind, DIRECT)

    def test_failover_gives_up(self):
        conn = self.conn
        conn.move(conn.path_to(A), now=1.0, proven=True)
        conn.path_dead(2.0)
        conn.gave_up()
        self.assertIs(conn.state, State.ACTIVE)
        conn.suspect(3.0)
        conn.offline()
        self.assertIs(conn.state, State.OFFLINE)
        self.assertFalse(conn.send(b"x"))

    def test_unprove_on_new_run(self):
        conn = self.conn
        conn.move(conn.path_to(A), now=1.0, proven=True)
        conn.unprove()
        self.assertIs(conn.state, State.UNPROVEN)
        self.assertFalse(conn.proven)

    def test_bad_transition(self):
        self.assertRaises(BadTransition, self.conn.suspect, 1.0)  # offline: nothing to suspect
        self.assertNotIn((State.OFFLINE, Input.MISSED), TRANSITIONS)

    def test_table_bounded_offline_first(self):
        live = self.table.open(b"q" * 16)
        live.move(live.path_to(A), now=1.0)
        self.table.open(b"r" * 16)
        self.table.open(b"s" * 16)
        self.assertEqual(len(self.table), 3)
        self.assertIn(b"q" * 16, self.table, "a live connection was dropped before offline ones")
