"""
The one thread tunnel work runs on.

wireguard-go is started with PR_SET_PDEATHSIG so that it dies with the node
(L{omerta.tunnel.wgdevice}); Linux sends that signal when the I{thread} that
started it ends, so devices must be brought up on a thread that lives as
long as the node, never on a pool worker that may be retired.  Everything
else (UAPI, netlink, nft) runs there too, one call at a time, off the
reactor.

    worker = TunnelWorker(reactor)
    d = worker.run(device.up, ["100.64.7.1/24"])
"""

from __future__ import annotations

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool


class TunnelWorker:
    def __init__(self, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="omerta-tunnels")
        self.pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def run(self, f, *args, **kwargs):
        """C{f(*args, **kwargs)} on the tunnel thread; a Deferred of its result."""
        return threads.deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)

    def stop(self) -> None:
        if self.pool.started:
            self.pool.stop()


_shared: TunnelWorker | None = None


def shared_worker() -> TunnelWorker:
    """The process's tunnel thread (both roles of one process share it)."""
    global _shared
    if _shared is None or not _shared.pool.started:
        _shared = TunnelWorker()
    return _shared


def run(f, *args, **kwargs):
    return shared_worker().run(f, *args, **kwargs)
