"""
Test infrastructure: fakes and the simulated network.

- L{omerta.testing.udp}: L{FakeDatagramPort}, a UDP port that records what a
  protocol writes, and L{MemoryUDPReactor}, a
  L{twisted.internet.testing.MemoryReactorClock} that can C{listenUDP}.
  For protocol tests with one node and a L{twisted.internet.task.Clock}.
- L{omerta.testing.simnet}: L{SimNetwork}, an in-memory IP network with
  latency, loss, duplication, reordering, partitions and NAT models, driven
  by one clock, so that many nodes run their real protocol code in one
  process.
- L{omerta.testing.natlab}: the NAT lab: real network namespaces and
  nftables NAT routers of each type (needs root).

Nothing in C{udp} and C{simnet} opens a socket or imports the global reactor,
and no module outside the tests, benchmarks and lab scripts imports this
package.
"""
