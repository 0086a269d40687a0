"""
Freshness: finding a peer whose endpoint went stale, and telling others when
a path failed.

- Recent contacts: for each peer heard from directly, when and at which
  address (at most C{contacts_kept}, for C{contact_max_age} seconds).  A few
  travel piggybacked on every ping and pong.
- A query ("who heard from X within max age?") goes to C{query_fanout}
  active peers.  A peer that heard from X recently answers; one that did not
  forwards the query to C{forward_fanout} of its own active peers while the
  hop count stays under C{query_hop_limit}.  Answers travel back along the
  path the query came (each hop remembers where a query came from, briefly).
  Queries are de-duplicated by (origin, query id) and each node forwards at
  most C{query_rate} queries per second (a token bucket), so a query never
  storms the mesh.
- The origin collects answers for C{query_timeout} seconds, tries the
  freshest endpoint, and on success the peer is back.
- PATH_FAILED: when this node gives up on a peer at an address, it tells its
  active peers, which drop that address from their recent contacts so they
  stop offering it.

L{Freshness} is built with L{Basics} and callables for what it asks of
others (targets, a ping, a candidate address), so it can be built alone on a
C{Clock}; the wiring is in L{omerta.mesh.overlay.Overlay}.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.logger import Logger

from omerta.crypto.identity import format_peer_id
from omerta.mesh.context import Basics
from omerta.wire.messages import MessageType, PathKind

NO_PEER = bytes(16)


@dataclass
class Contact:
    peer_id: bytes
    address: tuple
    heard: float


@dataclass
class Answer:
    responder: tuple
    heard_ago: float
    address: tuple


@dataclass
class _Query:
    target: bytes
    deferred: Deferred
    answers: list[Answer] = field(default_factory=list)
    call: object = None


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Freshness:
    log = Logger()

    def __init__(
        self,
        basics: Basics,
        *,
        targets: Callable[[int, random.Random], list[tuple[bytes, Any]]],
        ping: Callable[[bytes, tuple], Any],
        candidate: Callable[[bytes, tuple, float], None],
        rng: random.Random | None = None,
    ):
        """
        @param targets: C{targets(count, rng)}, up to C{count} random proven
            healthy active peers as (peer id, address).
        @param ping: C{ping(peer_id, address)}, try a peer at an address.
        @param candidate: C{candidate(peer_id, address, heard)}, a fresher
            address heard of for a known peer.
        @param rng: what picks the targets.
        """
        self.basics = basics
        self.config = basics.config
        self.clock = basics.clock
        self._targets = targets
        self._ping = ping
        self._candidate = candidate
        self.rng = rng or random.Random()
        self.contacts: OrderedDict[bytes, Contact] = OrderedDict()
        self._stale: dict[bytes, list[Deferred]] = {}  # peer -> callers waiting
        self._queries: dict[int, _Query] = {}
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._back: OrderedDict[int, tuple] = OrderedDict()
        self._bucket = TokenBucket(self.config.query_rate, self.config.query_rate * 2,
                                   self.clock.seconds())
        self._failed_reported: OrderedDict[tuple, float] = OrderedDict()

    # recent contacts

    def heard(self, peer_id: bytes, address: tuple, now: float) -> None:
        self.contacts[peer_id] = Contact(peer_id, address, now)
        self.contacts.move_to_end(peer_id)
        while len(self.contacts) > self.config.contacts_kept:
            self.contacts.popitem(last=False)

    def recent(self, peer_id: bytes, max_age: float, now: float) -> Contact | None:
        contact = self.contacts.get(peer_id)
        if contact is None or now - contact.heard > max_age:
            return None
        return contact

    def contacts_for(self, recipient: bytes) -> list[dict]:
        """
        A few recent contacts to piggyback on a ping or pong.
        """
        now = self.clock.seconds()
        out = []
        for contact in reversed(self.contacts.values()):
            if len(out) >= self.config.piggyback_contacts:
                break
            age = now - contact.heard
            if contact.peer_id != recipient and age <= self.config.contact_max_age:
                out.append({"peer_id": contact.peer_id, "endpoint": contact.address,
                            "age_ms": int(age * 1000)})
        return out

    def learn_contacts(self, contacts) -> None:
        """
        Piggybacked contacts: a fresher address for a known peer we are not
        in touch with becomes its candidate address.
        """
        now = self.clock.seconds()
        for contact in contacts:
            if contact.peer_id == self.basics.peer_id:
                continue
            heard = now - contact.age_ms / 1000
            mine = self.contacts.get(contact.peer_id)
            if mine is None or mine.heard < heard:
                self._candidate(contact.peer_id, tuple(contact.endpoint), heard)

    # queries

    def peer_stale(self, peer_id: bytes, address: tuple) -> Deferred:
        """
        The endpoint of C{peer_id} stopped answering: ask the mesh, and try
        the freshest answer.  While a query for the peer is out, another
        call waits for its answer instead of asking again.
        """
        waiting = self._stale.get(peer_id)
        if waiting is not None:
            follower = Deferred()
            waiting.append(follower)
            return follower
        waiting = self._stale[peer_id] = []
        d = self.query(peer_id, self.config.contact_max_age)

        def answered(answers: list[Answer]):
            fresher = [a for a in answers if a.address != address]
            if not fresher:
                return None
            best = min(fresher, key=lambda a: a.heard_ago)
            self.basics.metrics.inc("freshness_recoveries_tried")
            self._ping(peer_id, best.address)
            return best

        def done(result):
            for follower in self._stale.pop(peer_id, []):
                if isinstance(result, Failure):
                    follower.errback(result)
                else:
                    follower.callback(result)
            return result

        return d.addCallback(answered).addBoth(done)

    def query(self, target: bytes, max_age: float) -> Deferred:
        basics = self.basics
        query_id = int.from_bytes(os.urandom(8), "big")
        d = Deferred()
        query = _Query(target, d)
        self._queries[query_id] = query
        self._remember(basics.peer_id, query_id, None)
        targets = self._targets(self.config.query_fanout, self.rng)
        targets = [t for t in targets if t[0] != target]
        for _, address in targets:
            basics.send(address, MessageType.FRESHNESS_QUERY, query_id=query_id,
                        origin=basics.peer_id, target=target,
                        max_age_s=int(max_age), hops=0)
        basics.metrics.inc("freshness_queries", role="origin")
        query.call = self.clock.callLater(self.config.query_timeout, self._finish, query_id)
        return d

    def _finish(self, query_id: int) -> None:
        query = self._queries.pop(query_id, None)
        if query is not None:
            query.deferred.callback(sorted(query.answers, key=lambda a: a.heard_ago))

    def _remember(self, origin: bytes, query_id: int, came_from) -> bool:
        """
        Note a query (and the hop it came from, for answers going back);
        False if it was seen before.
        """
        key = (origin, query_id)
        if key in self._seen:
            return False
        self._seen[key] = None
        if came_from is not None:
            self._back[query_id] = came_from
        for table in (self._seen, self._back):
            while len(table) > self.config.query_memory:
                table.popitem(last=False)
        return True

    def on_query(self, frame, addr, message) -> None:
        basics = self.basics
        now = self.clock.seconds()
        if not self._remember(message.origin, message.query_id, addr):
            basics.metrics.inc("freshness_duplicates")
            return
        contact = self.recent(message.target, message.max_age_s, now)
        if contact is not None:
            basics.send(addr, MessageType.FRESHNESS_ANSWER, query_id=message.query_id,
                        target=message.target, heard_ago_ms=int((now - contact.heard) * 1000),
                        path={"kind": PathKind.DIRECT, "endpoint": contact.address,
                              "via": NO_PEER})
            basics.metrics.inc("freshness_answers", role="answered")
            return
        if message.hops + 1 >= self.config.query_hop_limit:
            return
        if not self._bucket.take(now):
            basics.metrics.inc("drops", reason="query_rate")
            return
        targets = self._targets(self.config.forward_fanout + 1, self.rng)
        sent = 0
        for peer_id, address in targets:
            if address == addr or peer_id in (message.target, message.origin):
                continue
            if sent == self.config.forward_fanout:
                break
            basics.send(address, MessageType.FRESHNESS_QUERY, query_id=message.query_id,
                        origin=message.origin, target=message.target,
                        max_age_s=message.max_age_s, hops=message.hops + 1)
            sent += 1
        basics.metrics.inc("freshness_queries", role="forwarded")

    def on_answer(self, frame, addr, message) -> None:
        query = self._queries.get(message.query_id)
        if query is not None:
            if message.target == query.target:
                query.answers.append(Answer(addr, message.heard_ago_ms / 1000,
                                            tuple(message.path.endpoint)))
            return
        back = self._back.get(message.query_id)
        if back is not None:
            self.basics.send(back, MessageType.FRESHNESS_ANSWER, query_id=message.query_id,
                             target=message.target, heard_ago_ms=message.heard_ago_ms,
                             path=dict(message.path))

    # failed paths

    def path_failed(self, peer_id: bytes, address: tuple) -> None:
        contact = self.contacts.get(peer_id)
        if contact is not None and contact.address == address:
            del self.contacts[peer_id]
        key = (peer_id, address)
        if key in self._failed_reported:
            return
        self._failed_reported[key] = self.clock.seconds()
        while len(self._failed_reported) > self.config.query_memory:
            self._failed_reported.popitem(last=False)
        for _, target in self._targets(self.config.query_fanout, self.rng):
            self.basics.send(target, MessageType.PATH_FAILED, target=peer_id,
                             path={"kind": PathKind.DIRECT, "endpoint": address, "via": NO_PEER})

    def on_path_failed(self, frame, addr, message) -> None:
        contact = self.contacts.get(message.target)
        if contact is not None and contact.address == tuple(message.path.endpoint):
            # Only believe it if we have not heard from that address since.
            if self.clock.seconds() - contact.heard > self.config.keepalive:
                del self.contacts[message.target]
                self.basics.metrics.inc("freshness_paths_forgotten")
                self.log.debug("Forgot {peer} at {address}: reported failed",
                               peer=format_peer_id(message.target), address=contact.address)

    def stop(self) -> None:
        """
        Leaving: queries in flight end with no answers (whoever waits on one
        is not left waiting, and nothing is tried on an answer now).
        """
        for query_id in list(self._queries):
            query = self._queries.pop(query_id)
            if query.call is not None and query.call.active():
                query.call.cancel()
            if not query.deferred.called:
                query.deferred.callback([])
