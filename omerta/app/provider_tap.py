"""
C{twistd omerta-provider}: a node that offers VMs; with C{--relay} it also
plays the relay role in the same process.

The VMs live on libvirt (C{--libvirt-uri}, default C{test:///default}:
libvirt's embedded test driver, which defines and "runs" domains in memory
without a hypervisor, so a provider runs anywhere; C{qemu:///system} for
real guests).  What it offers is what the machine has (measured), capped by
the C{--vm-*} quotas; see docs/provider.md.

Consumers reach their VMs over WireGuard carried by the mesh
(docs/tunnel.md): the provider starts only where it can terminate those
tunnels (wireguard-go, root, nftables, IPv4 forwarding), unless
C{--no-tunnels}, and only with libvirt-python installed.
"""

from __future__ import annotations

from twisted.python import usage

from omerta.app.options import NodeOptions, make_node_service
from omerta.wire.messages import Capability

#: Memory kept for the host (the provider process, libvirt, QEMU's own
#: overhead) when --vm-memory is not given.
HOST_MEMORY_RESERVE_MB = 1024


class Options(NodeOptions):
    default_port = 7401
    longdesc = "Run an omerta provider node (add --relay to also serve as a relay)."
    optFlags = [
        ["relay", None, "Also run the relay role in this process (serves STUN too)."],
        ["stun-server", None, "Answer STUN requests (implied by --relay)."],
        ["jobs-network", None, "Give jobs that ask for it the host's network (default: only"
         " loopback)."],
        ["no-tunnels", None, "Carry no WireGuard tunnels to consumers (they cannot reach"
                             " their VMs); for hosts without root or wireguard-go."],
    ]
    optParameters = [
        ["libvirt-uri", None, "test:///default",
         "libvirt connection for VMs: test:///default (embedded test driver, no"
         " guests run) or qemu:///system (real guests, QEMU TCG)."],
        ["max-vms", None, "16", "Most VMs at once."],
        ["vms-per-consumer", None, "4", "Most VMs one consumer may hold."],
        ["jobs", None, "sandbox", "Compute jobs: 'sandbox' (each in bubblewrap with cgroup"
         " limits; needs root and bubblewrap), 'vm' (each in a fresh QEMU guest; needs"
         " --libvirt-uri qemu:///system, docs/jobs-vm.md) or 'none' (docs/jobs.md)."],
        ["jobs-per-consumer", None, "8", "Most jobs one consumer may have staging, queued or"
         " running."],
        ["job-retention", None, "86400", "Seconds an ended job's output is kept."],
        ["vm-cpus", None, None, "Most cpu cores committed to VMs (default: the host's)."],
        ["vm-memory", None, None,
         f"Most MiB of memory committed to VMs (default: the host's less"
         f" {HOST_MEMORY_RESERVE_MB})."],
        ["vm-disk", None, None,
         "Most GiB of VM disk (default: the free space of the data directory's filesystem)."],
        ["vm-bridge", None, "omerta-br0", "Linux bridge for real guests' NICs (qemu only)."],
        ["vm-bridge-address", None, "10.237.0.1/24",
         "The bridge's address; guests get the others of its subnet (qemu only)."],
        ["vm-images", None, None,
         "Guest image cache (default: DATA_DIR/images; build ahead with"
         " 'python -m omerta.roles.guest DIR')."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["jobs"] not in ("sandbox", "vm", "none"):
            raise usage.UsageError(f"--jobs takes 'sandbox', 'vm' or 'none', not"
                                   f" {self['jobs']!r}")
        for key, minimum in (("max-vms", 1), ("vms-per-consumer", 1), ("vm-cpus", 1),
                             ("vm-memory", 16), ("vm-disk", 0), ("jobs-per-consumer", 1),
                             ("job-retention", 60)):
            if self[key] is None:
                continue
            try:
                self[key] = int(self[key])
                if self[key] < minimum:
                    raise ValueError
            except (TypeError, ValueError):
                raise usage.UsageError(f"--{key} takes a whole number >= {minimum}") from None
        from omerta.roles.bridge import AddressPool, BridgeError

        try:
            AddressPool(self["vm-bridge-address"])
        except BridgeError as e:
            raise usage.UsageError(f"--vm-bridge-address: {e}") from None
        uri = self["libvirt-uri"]
        if not uri or ":" not in uri:
            raise usage.UsageError(
                f"--libvirt-uri {uri!r} is not a libvirt URI; try test:///default or"
                f" qemu:///system")
        try:
            import libvirt  # noqa: F401
        except ImportError:
            raise usage.UsageError(
                "the provider role needs libvirt-python: pip install 'omerta[libvirt]'"
                " (it builds against Debian's libvirt-dev and pkg-config)") from None
        if not self["no-tunnels"]:
            from omerta.tunnel.provider_side import ProviderTunnels, TunnelsUnavailable

            try:
                ProviderTunnels.check()
            except TunnelsUnavailable as e:
                raise usage.UsageError(
                    f"cannot carry consumers' tunnels: {e}. Fix that, or start with"
                    f" --no-tunnels (consumers then cannot reach their VMs)") from None

    def _check_state(self, data_dir) -> None:
        """
        Also the provider's own state files: its WireGuard key (private,
        a key) and its tunnel records, so a damaged one stops the provider
        before it binds its port instead of half-starting it.
        """
        super()._check_state(data_dir)
        from omerta import storage
        from omerta.crypto.wireguard import load_or_create_key
        from omerta.roles.provider import TUNNELS_FILE, WIREGUARD_KEY_FILE, read_tunnel_records

        key_file = data_dir / WIREGUARD_KEY_FILE
        try:
            if key_file.exists():
                storage.check_private(key_file)
                try:
                    load_or_create_key(key_file)
                except storage.StateFileError as e:
                    raise storage.StateFileError(
                        f"{e}; it was left untouched: restore it from a backup, or move it"
                        f" aside for a new key (consumers' existing tunnels to this provider"
                        f" then stop working until they create new VMs)") from None
            read_tunnel_records(data_dir / TUNNELS_FILE)
        except storage.StateFileError as e:
            raise usage.UsageError(str(e)) from None

    def serves_stun(self) -> bool:
        return bool(self["relay"] or self["stun-server"])

    def relay_role(self) -> bool:
        return bool(self["relay"])

    def capabilities(self) -> Capability:
        flags = Capability.PROVIDER
        if self["relay"]:
            flags |= Capability.RELAY
        if self.serves_stun():
            flags |= Capability.STUN
        return flags


def makeService(options: Options, reactor=None):
    from pathlib import Path

    from omerta.roles.provider import ProviderService
    from omerta.roles.resources import measure
    from omerta.roles.vm import LibvirtBackend, Quota

    top = make_node_service(options, reactor=reactor)
    node = top.getServiceNamed("node")
    data_dir = Path(options["data-dir"])
    host = measure(data_dir)
    memory = options["vm-memory"]
    if memory is None:
        memory = max(0, host.memory_mb - HOST_MEMORY_RESERVE_MB)
    quota = Quota(max_vms=options["max-vms"], cpu_cores=options["vm-cpus"] or host.cpu_cores,
                  memory_mb=memory,
                  disk_gb=host.disk_gb if options["vm-disk"] is None else options["vm-disk"])
    backend = LibvirtBackend(data_dir, reactor=reactor, uri=options["libvirt-uri"], quota=quota,
                             metrics=node.metrics, bridge=options["vm-bridge"],
                             bridge_address=options["vm-bridge-address"],
                             images_dir=None if options["vm-images"] is None
                             else Path(options["vm-images"]))
    backend.setName("vms")
    backend.setServiceParent(top)
    tunnels = None
    if not options["no-tunnels"]:
        from omerta.tunnel.provider_side import ProviderTunnels

        bridge = options["vm-bridge"] if options["libvirt-uri"].startswith("qemu") else None

        def tunnels(key):
            return ProviderTunnels(node.node, key, data_dir / "tunnels", bridge)

    provider = ProviderService(node, backend, host, data_dir,
                               max_per_consumer=options["vms-per-consumer"], tunnels=tunnels)
    provider.setName("provider")
    provider.setServiceParent(top)
    jobs = _jobs(options, provider, backend, data_dir, reactor)
    jobs.setName("jobs")
    jobs.setServiceParent(top)
    return top


def sandbox_dir(data_dir) -> "Path":
    """
    Where the sandbox mounts the jobs' work directories: under /run (the
    job's user must be able to reach them, which a data directory under a
    0700 home does not let it), one directory per data directory, so a
    restarted provider finds what its jobs left.
    """
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return Path("/run/omerta-jobs") / digest


def _jobs(options: Options, provider, backend, data_dir, reactor):
    """The job service of C{--jobs} (its runner, or why there is none)."""
    from twisted.logger import Logger

    from omerta.jobs.provider import JobService

    if reactor is None:
        from twisted.internet import reactor
    runner, problem = None, None
    if options["jobs"] == "sandbox":
        from omerta.jobs.sandbox import SandboxRunner, sandbox_problem

        problem = sandbox_problem()
        if problem is None:
            runner = SandboxRunner(reactor, sandbox_dir(data_dir),
                                   allow_network=options["jobs-network"])
        else:
            Logger().warn("Compute jobs are refused: {problem}", problem=problem)
    elif options["jobs"] == "vm":
        from pathlib import Path

        from omerta.jobs.vmrunner import VmRunner, vm_problem

        problem = vm_problem(backend)
        if problem is None:
            runner = VmRunner(reactor, backend, Path(data_dir) / "jobs-vm")
        else:
            Logger().warn("Compute jobs are refused: {problem}", problem=problem)
    else:
        problem = "this provider runs no jobs (--jobs none)"
    jobs = JobService(provider.mesh, runner, data_dir, reactor, provider.capacity,
                      committed=backend.committed, on_change=provider.announce_free,
                      problem=problem, max_per_consumer=options["jobs-per-consumer"],
                      retention=float(options["job-retention"]),
                      allow_network=options["jobs-network"])
    provider.jobs = jobs
    return jobs
