"""
The checks and the flows of the VM tunnel's end-to-end tests (docs/tunnel.md,
docs/natlab.md), run in an L{omerta.testing.e2e.E2ELab}; the lab, its nodes
and the command line (C{python -m omerta.testing.e2e}) are in
L{omerta.testing.e2e}.

 - checks: L{check_hostname} (ssh into a guest prints its hostname),
   L{wg_transfer} (a WireGuard interface's byte counters),
   L{check_released} (a release leaves nothing behind);
 - the flows (L{FLOWS}), the scripts in C{scripts/e2e/} and the tests in
   C{tests/test_tunnel_e2e.py}: L{flow_provision}, L{flow_nat},
   L{flow_relay}, L{flow_failover}, L{flow_isolation}, and a compute job
   over a relayed path, L{flow_job_relay}.  Each returns a
   L{FlowResult} (its figures, printed as it goes) or raises L{E2EError}
   with what differed and the logs of the nodes involved;
 - L{rogue_main}, C{python -m omerta.testing.e2e rogue}: the member without a
   VM that L{flow_isolation} runs to send tunnel frames the provider drops.

Everything waits on conditions with deadlines; sleeps are only the polling
intervals inside those loops.  Needs root.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from omerta.jobs.sandbox import sandbox_problem
from omerta.testing import natlab
from omerta.testing.e2e import (
    DIRECT_KINDS,
    NODE_PORT,
    POLL,
    REPO,
    SSH_TIMEOUT,
    Consumer,
    E2EError,
    E2ELab,
    FlowResult,
    Provider,
    environment,
    links,
    wait,
)
from omerta.testing.natlab import Lab


# -- checks ------------------------------------------------------------------------


def check_hostname(consumer: Consumer, vm: dict, via_json: bool = False) -> float:
    """
    C{hostname} in the guest through the tunnel prints C{omerta-<8 hex>}:
    with C{omerta vm ssh}, or with the request's C{ssh_command}.

    @return: the seconds it took.
    """
    import shlex

    started = time.monotonic()
    expected = f"omerta-{vm['vm_id'][:8]}"
    if via_json:
        argv = [*shlex.split(vm["ssh_command"]), "-o", "BatchMode=yes", "-o",
                "ConnectTimeout=10", "hostname"]
        result = consumer.e2e.lab.run(consumer.host, argv, timeout=SSH_TIMEOUT)
        how = f"{vm['ssh_command']} hostname"
    else:
        result = consumer.ssh(vm["vm_id"], "hostname", check=False)
        how = f"omerta vm ssh {vm['vm_id']} -- hostname"
    if result.returncode != 0 or result.stdout.strip() != expected:
        raise E2EError(f"{consumer.name}: {how} gave exit {result.returncode},"
                       f" {result.stdout.strip()!r} (expected {expected!r}):"
                       f" {result.stderr.strip()}")
    took = time.monotonic() - started
    consumer.e2e.log(f"{consumer.name}: {how} -> {expected} ({took:.2f} s)")
    return took


def wg_transfer(lab: Lab, node: natlab.Node, interface: str) -> dict[str, tuple[int, int]]:
    """Peer public key -> (received, sent) bytes of a WireGuard interface."""
    result = lab.run(node, ["wg", "show", interface, "transfer"], check=True)
    transfer = {}
    for line in result.stdout.splitlines():
        key, rx, tx = line.split()
        transfer[key] = (int(rx), int(tx))
    return transfer


def check_released(e2e: E2ELab, consumer: Consumer, provider: Provider, vm: dict,
                   timeout: float = 30.0) -> float:
    """
    After C{vm release}: no libvirt domain, no disk, no address in the
    provider's ledger, no WireGuard peer on its interface, no firewall
    pair, no consumer interface.

    @return: the seconds until all of that held.
    """
    vm_id = vm["vm_id"]
    started = time.monotonic()

    def left() -> list[str]:
        found = []
        if f"omerta-{vm_id}" in provider.libvirt.domain_names():
            found.append(f"libvirt domain omerta-{vm_id}")
        if (provider.data_dir / "vms" / vm_id).exists():
            found.append(f"disk directory {provider.data_dir / 'vms' / vm_id}")
        ledger = provider.ledger()
        if vm_id in ledger or any(e.get("address") == vm["address"] for e in ledger.values()):
            found.append(f"{vm['address']} in the ledger {provider.data_dir / 'vms.json'}")
        peers = provider.wg_peers()
        if vm["wg_public_key"] in peers:
            found.append(f"WireGuard peer {vm['wg_public_key']} on {provider.interface()}")
        pairs = [p for p in provider.firewall_pairs() if vm["address"] in p]
        if pairs:
            found.append(f"firewall pairs {pairs}")
        if consumer.interfaces():
            found.append(f"consumer interfaces {sorted(consumer.interfaces())}")
        return found

    remaining: list[str] = []

    def clean() -> bool:
        remaining[:] = left()
        return not remaining

    wait(clean, timeout, f"the release of {vm_id} to leave nothing behind",
         lambda: "still there: " + "; ".join(remaining) + "\n"
         + e2e.logs(consumer, provider))
    took = time.monotonic() - started
    e2e.log(f"{consumer.name}: {vm_id} released; on {provider.name} no domain, disk, ledger"
            f" address, WireGuard peer or firewall pair, on {consumer.name} no omc interface"
            f" ({took:.2f} s)")
    return took


def _flow(name: str, e2e: E2ELab, body: Callable[[FlowResult], None], *nodes) -> FlowResult:
    result = FlowResult(name)
    started = time.monotonic()
    try:
        body(result)
    except E2EError as e:
        raise E2EError(f"{name}: {e}\n" + e2e.logs(*[n for n in nodes if n is not None])
                       ) from None
    result.seconds = time.monotonic() - started
    result.ok = True
    e2e.log(result.summary())
    for note in result.notes:
        e2e.log(f"  {note}")
    return result


def _request(e2e: E2ELab, consumer: Consumer, provider: Provider, result: FlowResult) -> dict:
    started = time.monotonic()
    vm = consumer.request(provider.name)
    result.figures["request_s"] = round(time.monotonic() - started, 1)
    e2e.log(f"{consumer.name}: vm {vm['vm_id']} at {vm['ssh_address']} from {provider.name}"
            f" in {result.figures['request_s']} s; tunnel {vm['tunnel']['interface']}"
            f" {vm['tunnel']['state']} over a {vm['tunnel'].get('path_kind')} path")
    if vm["tunnel"]["state"] != "up":
        raise E2EError(f"the tunnel is {vm['tunnel']['state']!r} after the request: {vm}")
    if vm["tunnel"]["interface"] not in consumer.interfaces():
        raise E2EError(f"{vm['tunnel']['interface']} is not in {consumer.name}'s namespace")
    return vm


def _path(consumer: Consumer, provider: Provider) -> dict:
    return consumer.peer(provider.name).get("path") or {}


# -- the flows ---------------------------------------------------------------------


def flow_provision(e2e: E2ELab) -> FlowResult:
    """
    Relay, provider and consumer public: request, ssh hostname (both ways),
    release, and nothing is left on either side.
    """
    provider = e2e.provider("public")
    consumer = e2e.consumer("c_prov")

    def body(result: FlowResult) -> None:
        vm = _request(e2e, consumer, provider, result)
        interface = vm["tunnel"]["interface"]
        before = wg_transfer(e2e.lab, consumer.host, interface)
        result.figures["ssh_s"] = round(check_hostname(consumer, vm), 2)
        check_hostname(consumer, vm, via_json=True)
        after = wg_transfer(e2e.lab, consumer.host, interface)
        key = vm["wireguard"]["provider_public_key"]
        if not after.get(key, (0, 0))[0] > before.get(key, (0, 0))[0]:
            raise E2EError(f"ssh worked but {interface} received nothing: {before} -> {after}")
        result.notes.append(f"ssh omerta@{vm['ssh_address']} hostname printed"
                            f" omerta-{vm['vm_id'][:8]} (omerta vm ssh and the JSON's"
                            f" ssh_command); {interface} received"
                            f" {after[key][0] - before.get(key, (0, 0))[0]} bytes meanwhile")
        released = consumer.release_all()
        if vm["vm_id"] not in released.get("released", []):
            raise E2EError(f"vm release --all did not release {vm['vm_id']}: {released}")
        result.figures["release_clean_s"] = round(check_released(e2e, consumer, provider, vm), 2)

    return _flow("vm-provision", e2e, body, consumer, provider)


def flow_nat(e2e: E2ELab, deadline: float = 30.0) -> FlowResult:
    """
    Consumer behind a port-restricted NAT, provider behind a restricted
    cone: the tunnel's path is punched (or direct) and ssh works.
    """
    provider = e2e.provider("restricted-cone")
    consumer = e2e.consumer("c_nat", "port-restricted")

    def body(result: FlowResult) -> None:
        vm = _request(e2e, consumer, provider, result)
        path = wait(lambda: _path(consumer, provider).get("kind") in DIRECT_KINDS
                    and _path(consumer, provider), deadline,
                    f"a punched or direct path from {consumer.name} to {provider.name}",
                    lambda: f"path now: {_path(consumer, provider)}")
        result.figures["path"] = path["kind"]
        result.figures["ssh_s"] = round(check_hostname(consumer, vm), 2)
        kind = _path(consumer, provider).get("kind")
        if kind not in DIRECT_KINDS:
            raise E2EError(f"the path fell back to {kind!r} during ssh")
        result.notes.append(f"path {path['kind']} to {path['endpoint']} (the request saw"
                            f" {vm['tunnel'].get('path_kind')}); ssh hostname ok")
        consumer.release_all()
        check_released(e2e, consumer, provider, vm)

    return _flow("vm-nat", e2e, body, consumer, provider)


def flow_relay(e2e: E2ELab) -> FlowResult:
    """
    Consumer and provider behind symmetric NATs: the path is relayed and ssh
    works.
    """
    provider = e2e.provider("symmetric")
    consumer = e2e.consumer("c_relay", "symmetric")

    def body(result: FlowResult) -> None:
        vm = _request(e2e, consumer, provider, result)
        result.figures["ssh_s"] = round(check_hostname(consumer, vm), 2)
        path = _path(consumer, provider)
        if path.get("kind") != "relayed":
            raise E2EError(f"expected a relayed path between two symmetric NATs, got {path}")
        result.figures["path"] = f"relayed via {e2e.relay_name(path.get('endpoint'))}"
        consumer.release_all()
        check_released(e2e, consumer, provider, vm)

    return _flow("vm-relay", e2e, body, consumer, provider)


class _Transfer:
    """
    C{data} into C{omerta vm ssh VM -- sha256sum} in chunks from a thread,
    with the time each chunk was taken by the pipe (TCP's back pressure
    makes the writes stall while the path is broken).
    """

    CHUNK = 64 * 1024

    def __init__(self, proc: subprocess.Popen, data: bytes):
        self.proc = proc
        self.data = data
        self.progress: list[tuple[float, int]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, daemon=True, name="e2e-transfer")

    def start(self) -> None:
        self.progress.append((time.monotonic(), 0))
        self.thread.start()

    def _write(self) -> None:
        try:
            view = memoryview(self.data)
            for offset in range(0, len(view), self.CHUNK):
                self.proc.stdin.write(view[offset:offset + self.CHUNK])
                self.proc.stdin.flush()
                self.progress.append((time.monotonic(), offset + len(view[offset:offset
                                                                          + self.CHUNK])))
            self.proc.stdin.close()
        except BaseException as e:
            self.error = e

    @property
    def written(self) -> int:
        return self.progress[-1][1]

    def longest_gap(self, after: float | None = None) -> tuple[float, float]:
        """(gap seconds, time it ended) of the longest pause between two chunks."""
        best = (0.0, 0.0)
        for (t0, _), (t1, _) in zip(self.progress, self.progress[1:]):
            if after is not None and t1 < after:
                continue
            if t1 - t0 > best[0]:
                best = (t1 - t0, t1)
        return best


class _Watch:
    """
    Samples, every L{POLL} seconds from a thread, the consumer's path to the
    provider and its WireGuard interface (index, up flag) and wireguard-go pids.
    """

    def __init__(self, consumer: Consumer, provider: Provider, interface: str):
        self.consumer = consumer
        self.provider = provider
        self.interface = interface
        self.samples: list[tuple[float, dict, dict | None, list[int]]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="e2e-watch")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                path = _path(self.consumer, self.provider)
                link = links(self.consumer.ns).get(self.interface)
                link = None if link is None else {"ifindex": link["ifindex"],
                                                  "up": "UP" in link.get("flags", [])}
                self.samples.append((time.monotonic(), path, link,
                                     self.consumer.wireguard_pids()))
            except Exception as e:  # recorded, the flow judges
                self.samples.append((time.monotonic(), {"error": str(e)}, None, []))
            self.stopping.wait(POLL)


def flow_failover(e2e: E2ELab, size_mb: int = 20, kill_at: float = 0.2,
                  transfer_deadline: float = 240.0) -> FlowResult:
    """
    Consumer and provider behind symmetric NATs (relayed, two relays):
    while C{size_mb} MB of random data go through the tunnel into the guest
    (C{cat | omerta vm ssh VM -- sha256sum}), kill -9 the relay in use.  The
    copy completes intact, the consumer's WireGuard interface stays (same
    index, same wireguard-go), and the stall is measured next to the path's
    recovery.  The killed relay is started again afterwards.
    """
    provider = e2e.provider("symmetric")
    consumer = e2e.consumer("c_fail", "symmetric")

    def body(result: FlowResult) -> None:
        vm = _request(e2e, consumer, provider, result)
        check_hostname(consumer, vm)
        interface = vm["tunnel"]["interface"]
        path = _path(consumer, provider)
        if path.get("kind") != "relayed":
            raise E2EError(f"expected a relayed path between two symmetric NATs, got {path}")
        relay = e2e.relay_name(path.get("endpoint"))
        if relay is None:
            raise E2EError(f"the relayed path's endpoint {path.get('endpoint')} is no relay's")
        link_before = links(consumer.ns)[interface]["ifindex"]
        pids_before = consumer.wireguard_pids()
        data = os.urandom(size_mb << 20)
        digest = hashlib.sha256(data).hexdigest()
        proc = consumer.ssh_popen(vm["vm_id"], "sha256sum", stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        transfer = _Transfer(proc, data)
        watch = _Watch(consumer, provider, interface)
        watch.start()
        transfer.start()
        try:
            wait(lambda: transfer.written >= kill_at * len(data) or transfer.error
                 or not transfer.thread.is_alive(), 120.0,
                 f"{kill_at:.0%} of the data to go through",
                 lambda: f"{transfer.written} bytes written")
            if transfer.error is not None or not transfer.thread.is_alive():
                raise E2EError(f"the transfer ended before the kill ({transfer.written} bytes):"
                               f" {transfer.error}; ssh said"
                               f" {proc.stderr.read().decode(errors='replace')[-500:]}")
            written_at_kill = transfer.written
            e2e.relays[relay].kill()
            killed = time.monotonic()
            killed_relays.append(relay)
            e2e.log(f"killed {relay} (kill -9) after {written_at_kill >> 20} MiB")
            # (communicate() would close stdin under the writing thread)
            transfer.thread.join(timeout=transfer_deadline)
            try:
                if transfer.thread.is_alive():
                    raise subprocess.TimeoutExpired(proc.args, transfer_deadline)
                proc.stdin = None  # closed by the writing thread
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                raise E2EError(f"the copy did not finish within {transfer_deadline:g} s of the"
                               f" kill ({transfer.written} of {len(data)} bytes written); ssh"
                               f" said {err.decode(errors='replace')[-500:]}") from None
            finished = time.monotonic()
        finally:
            watch.stop()
        if transfer.error is not None:
            raise E2EError(f"writing into ssh failed after {transfer.written} bytes:"
                           f" {transfer.error}; ssh said {err.decode(errors='replace')}")
        got = out.decode(errors="replace").split()
        if proc.returncode != 0 or not got or got[0] != digest:
            raise E2EError(f"the copy is not intact: exit {proc.returncode}, guest sha256"
                           f" {got[:1]}, sent {digest}; ssh said {err.decode(errors='replace')}")
        # the interface never went away
        gone = [(round(t - killed, 2), link) for t, _, link, _ in watch.samples
                if link is None or link["ifindex"] != link_before or not link["up"]]
        if gone:
            raise E2EError(f"{interface} (index {link_before}) went down or changed: {gone[:5]}")
        link_after = links(consumer.ns).get(interface, {}).get("ifindex")
        pids_after = consumer.wireguard_pids()
        if link_after != link_before or pids_after != pids_before:
            raise E2EError(f"{interface}: index {link_before} -> {link_after}, wireguard-go"
                           f" {pids_before} -> {pids_after}")
        pid_changes = [(round(t - killed, 2), pids) for t, _, _, pids in watch.samples
                       if pids != pids_before]
        if pid_changes:
            raise E2EError(f"wireguard-go changed during the copy: {pid_changes[:5]}")
        # the path recovered: first sample after the kill on another path
        killed_endpoint = path.get("endpoint")
        recovered = next(((t, p) for t, p, _, _ in watch.samples
                          if t > killed and p.get("endpoint") not in (None, killed_endpoint)),
                         None)
        gap, gap_end = transfer.longest_gap()
        resumed = next((t for t, n in transfer.progress if t > killed and n > written_at_kill),
                       None)
        result.figures.update({
            "size_mb": size_mb,
            "relay_killed": relay,
            "copy_s": round(finished - transfer.progress[0][0], 1),
            "longest_stall_s": round(gap, 2),
            "stall_ended_after_kill_s": round(gap_end - killed, 2),
            "first_progress_after_kill_s": None if resumed is None else round(resumed - killed, 2),
            "path_recovery_s": None if recovered is None else round(recovered[0] - killed, 2),
            "path_after": None if recovered is None else
            f"{recovered[1].get('kind')} {recovered[1].get('endpoint')}"
            f" ({e2e.relay_name(recovered[1].get('endpoint')) or 'no relay'})",
        })
        result.notes.append(
            f"{size_mb} MiB into the guest's sha256sum intact ({digest[:16]}...);"
            f" {interface} kept index {link_before}, wireguard-go {pids_before}")
        if recovered is None:
            raise E2EError(f"the consumer's node never showed a path off {killed_endpoint}"
                           f" after the kill (samples: {[p for _, p, _, _ in watch.samples][-5:]})")
        consumer.release_all()
        check_released(e2e, consumer, provider, vm)

    killed_relays: list[str] = []
    try:
        return _flow("failover", e2e, body, consumer, provider)
    finally:
        for name in killed_relays:
            e2e.restart_relay(name)


_PROBE = r"""
import socket, subprocess, sys
kind, address, arg, device = sys.argv[1:5]
if kind == "tcp":
    s = socket.socket()
    s.settimeout(float(arg))
    if device:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    try:
        s.connect((address, 22))
        print("open")
    except OSError as e:
        print(f"closed: {e}")
else:
    argv = ["ping", "-n", "-c", arg, "-i", "0.2", "-W", "1", address]
    if device:
        argv[1:1] = ["-I", device]
    r = subprocess.run(argv, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines() or [r.stderr.strip()]
    print("open" if r.returncode == 0 else "closed: " + lines[-1])
"""


def _reach(consumer: Consumer, kind: str, address: str, arg: str,
           device: str = "") -> tuple[bool, str]:
    """
    Whether C{address} answers ping (kind "ping", C{arg} pings) or opens
    port 22 ("tcp", C{arg} seconds), sent out of C{device} when given
    (SO_BINDTODEVICE: through the tunnel even where the lab routes the
    address elsewhere).
    """
    result = consumer.e2e.lab.run(consumer.host, [sys.executable, "-c", _PROBE, kind, address,
                                                  arg, device], timeout=30)
    line = (result.stdout.strip() or result.stderr.strip()).splitlines()[-1:] or [""]
    return line[0] == "open", line[0]


def rogue_main(argv: Sequence[str]) -> int:
    """
    C{python -m omerta.testing.e2e rogue --data-dir D --invite L --bootstrap S
    --provider-id HEX [--count N]}: a member node that holds no VM at the
    provider sends C{N} datagrams into a tunnel endpoint of its own for the
    provider, as if it had a WireGuard interface there; its node seals them
    as TUNNEL_DATA frames to the provider, which has no endpoint for it.
    Prints one JSON line: frames sent, datagrams still waiting.
    """
    import argparse
    import socket

    from twisted.internet import reactor, task

    from omerta.app import node_tap
    from omerta.wire.tunnel import TO_CONSUMER

    parser = argparse.ArgumentParser(prog="e2e rogue")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--invite", required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--provider-id", required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    options = node_tap.Options()
    node_argv = ["--data-dir", args.data_dir, "--port", str(NODE_PORT), "--name", "rogue",
                 "--invite", args.invite, "--no-control"]
    for spec in args.bootstrap:
        node_argv += ["--bootstrap", spec]
    options.parseOptions(node_argv)
    top = node_tap.makeService(options)
    provider_id = bytes.fromhex(args.provider_id)
    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg.bind(("127.0.0.1", 0))
    outcome: dict[str, Any] = {"sent": 0}

    async def run() -> None:
        node = top.getServiceNamed("node").node
        deadline = reactor.seconds() + args.timeout
        while node.tunnels is None or not node.overlays:
            if reactor.seconds() > deadline:
                raise RuntimeError("the node never attached its socket")
            await task.deferLater(reactor, POLL, lambda: None)
        network_id = next(iter(node.overlays))
        endpoint = node.tunnels.open(network_id, provider_id, TO_CONSUMER,
                                     wg_port=wg.getsockname()[1])
        while outcome["sent"] < args.count or endpoint.waiting:
            if reactor.seconds() > deadline:
                break
            if outcome["sent"] < args.count:
                # a WireGuard handshake initiation is 148 bytes
                wg.sendto(b"\x01\x00\x00\x00" + os.urandom(144), endpoint.address)
                outcome["sent"] += 1
            await task.deferLater(reactor, 0.2, lambda: None)
        outcome.update(frames_out=endpoint.frames_out, waiting=len(endpoint.waiting))

    def finish(result) -> None:
        if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
            outcome["error"] = str(getattr(result, "value", result))
        print(json.dumps(outcome), flush=True)
        top.stopService().addBoth(lambda _: reactor.stop())

    def begin() -> None:
        top.startService()
        from twisted.internet import defer

        defer.ensureDeferred(run()).addBoth(finish)

    reactor.callWhenRunning(begin)
    reactor.run()
    return 0 if "error" not in outcome else 1


def flow_isolation(e2e: E2ELab) -> FlowResult:
    """
    Two consumers with a VM each from the same provider: each reaches its
    own VM; the second, even after opening its own WireGuard side to
    everything (AllowedIPs and routes, as a hostile consumer may), reaches
    neither the first's VM nor the provider's bridge or lab address through
    the tunnel, though its packets get there.  A member holding no VM there
    sends tunnel frames: the provider drops them (tunnel_no_endpoint).
    """
    provider = e2e.provider("public")
    first = e2e.consumer("c_iso_a")
    second = e2e.consumer("c_iso_b")

    def body(result: FlowResult) -> None:
        vms: dict[str, dict] = {}
        errors: list[BaseException] = []

        def request(consumer: Consumer) -> None:
            try:
                vms[consumer.name] = consumer.request(provider.name)
            except BaseException as e:
                errors.append(e)

        started = time.monotonic()
        threads = [threading.Thread(target=request, args=(c,)) for c in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        result.figures["two_requests_s"] = round(time.monotonic() - started, 1)
        vm_a, vm_b = vms[first.name], vms[second.name]
        if vm_a["tunnel_address"] == vm_b["tunnel_address"]:
            raise E2EError(f"both consumers were given tunnel address {vm_a['tunnel_address']}"
                           f" by {provider.name} (their requests were in flight together)")
        check_hostname(first, vm_a)
        check_hostname(second, vm_b)
        interface = vm_b["tunnel"]["interface"]
        provider_key = vm_b["wireguard"]["provider_public_key"]
        bridge_address = provider.bridge_address.split("/")[0]
        lab_address = provider.host.address
        # the second consumer opens its side of the tunnel to everything
        # (probes go out of its interface: the lab address must stay routed
        # through the lab, which carries the tunnel itself)
        targets = [vm_a["address"], bridge_address, lab_address]
        allowed = [f"{vm_b['provider_tunnel_address']}/32", f"{vm_b['address']}/32",
                   *[f"{a}/32" for a in targets]]
        e2e.lab.run(second.host, ["wg", "set", interface, "peer", provider_key,
                                  "allowed-ips", ",".join(allowed)], check=True)
        checks = {}
        ok, line = _reach(second, "ping", vm_b["provider_tunnel_address"], "2", interface)
        checks["ping provider tunnel address (allowed)"] = ok
        ok_own, line_own = _reach(second, "tcp", vm_b["address"], "5", interface)
        checks["own VM port 22 (allowed)"] = ok_own
        if not (ok and ok_own):
            raise E2EError(f"{second.name} cannot reach what it may: {checks}"
                           f" ({line}; {line_own})")
        before = wg_transfer(e2e.lab, provider.host, provider.interface())
        key_b = vm_b["wg_public_key"]
        denied = {}
        for address, what in ((vm_a["address"], "the first consumer's VM"),
                              (bridge_address, "the provider's bridge address"),
                              (lab_address, "the provider's lab address")):
            reached, line = _reach(second, "ping", address, "3", interface)
            denied[f"ping {what} {address}"] = (reached, line)
            reached, line = _reach(second, "tcp", address, "3", interface)
            denied[f"tcp {what} {address}:22"] = (reached, line)
        after = wg_transfer(e2e.lab, provider.host, provider.interface())
        leaks = {k: v for k, v in denied.items() if v[0]}
        if leaks:
            raise E2EError(f"{second.name} reached through the tunnel: {leaks}")
        got = after.get(key_b, (0, 0))[0] - before.get(key_b, (0, 0))[0]
        if got <= 0:
            raise E2EError(f"the probes never reached the provider's interface ({before} ->"
                           f" {after}): isolation was not tested")
        result.notes.append(f"{second.name} (its AllowedIPs opened, probes bound to"
                            f" {interface}) could not reach:"
                            f" {', '.join(denied)}; the provider's interface received"
                            f" {got} bytes of those probes from it")
        # the first consumer still reaches its own VM
        check_hostname(first, vm_a)
        # a member that is not a consumer here sends tunnel frames
        drops_before = provider.metrics_drops().get("tunnel_no_endpoint", 0)
        rogue = e2e.lab.add_host("rogue")
        rogue_dir = e2e.base / "rogue"
        rogue_dir.mkdir(mode=0o700, exist_ok=True)
        argv = [sys.executable, "-m", "omerta.testing.e2e", "rogue", "--data-dir",
                str(rogue_dir), "--invite", e2e.invite, "--provider-id",
                provider.daemon.status()["peer_id"], "--count", "20"]
        for spec in e2e.bootstrap:
            argv += ["--bootstrap", spec]
        out = e2e.lab.run(rogue, argv, env=environment(), cwd=REPO, timeout=90)
        try:
            sent = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise E2EError(f"the rogue member failed: {out.stdout}\n{out.stderr[-2000:]}"
                           ) from None
        if sent.get("error") or not sent.get("frames_out"):
            raise E2EError(f"the rogue member sent no tunnel frames: {sent}"
                           f"\n{out.stderr[-2000:]}")
        drops = wait(lambda: (provider.metrics_drops().get("tunnel_no_endpoint", 0)
                              - drops_before >= sent["frames_out"]) and provider.metrics_drops(),
                     10.0, "the provider to count the rogue's frames as tunnel_no_endpoint",
                     lambda: f"drops now {provider.metrics_drops()}, before"
                             f" {drops_before}, rogue {sent}")
        result.figures["rogue_frames"] = sent["frames_out"]
        result.figures["tunnel_no_endpoint"] = (
            f"{drops_before} -> {drops.get('tunnel_no_endpoint')}")
        check_hostname(second, vm_b)
        for consumer, vm in ((first, vm_a), (second, vm_b)):
            consumer.release_all()
            check_released(e2e, consumer, provider, vm)

    return _flow("isolation", e2e, body, first, second, provider)


def flow_job_relay(e2e: E2ELab) -> FlowResult:
    """
    Consumer and a provider running jobs (its sandbox, no guests) behind
    symmetric NATs: omerta job submit --wait -- python3 -c 'print(6*7)'
    prints 42 and exits 0 over a relayed path.
    """
    problem = sandbox_problem()
    if problem is not None:
        raise E2EError(f"job-relay: the job sandbox cannot run here: {problem}")
    provider = e2e.provider("jobs")
    consumer = e2e.consumer("c_job", "symmetric")

    def body(result: FlowResult) -> None:
        args = ["job", "submit", "--peer", provider.name, "--mesh-timeout", "30", "--wait"]
        for spec in e2e.bootstrap:
            args += ["--bootstrap", spec]
        started = time.monotonic()
        out = consumer.cli(*args, "--", "python3", "-c", "print(6*7)", check=False)
        result.figures["submit_s"] = round(time.monotonic() - started, 1)
        if (out.returncode, out.stdout) != (0, "42\n"):
            raise E2EError(f"omerta job submit --wait gave exit {out.returncode}, stdout"
                           f" {out.stdout!r} (expected 0, '42\\n'): {out.stderr.strip()}")
        # the command runs a node of its own (<data-dir>/cli): what it said
        # ("submitting to ... over a relayed path") and its status at its stop
        said = [line for line in out.stderr.splitlines() if "submitting to" in line]
        try:
            status = json.loads((consumer.data_dir / "cli" / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        path = next((p.get("path") or {} for p in status.get("peers", [])
                     if p.get("name") == provider.name), {})
        if not said or not said[0].endswith(" over a relayed path") or path.get(
                "kind") != "relayed":
            raise E2EError(f"expected a relayed path between two symmetric NATs: the command"
                           f" said {said or out.stderr.strip()!r}, its node's path {path}")
        result.figures["path"] = f"relayed via {e2e.relay_name(path.get('endpoint'))}"
        result.notes.append(f"{said[0].removeprefix('omerta: ')}; stdout 42, exit 0")

    return _flow("job-relay", e2e, body, consumer, provider)


FLOWS = {
    "vm-provision": flow_provision,
    "vm-nat": flow_nat,
    "vm-relay": flow_relay,
    "failover": flow_failover,
    "isolation": flow_isolation,
    "job-relay": flow_job_relay,
}
