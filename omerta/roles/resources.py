"""
What this machine has to offer: cpu cores, memory, disk and GPUs, measured
from the running system, and what a provider announces (capacity minus what
its VMs already hold).

- cpu cores: the cores this process may run on (C{sched_getaffinity}), so a
  provider pinned to a cpuset announces the cpuset;
- memory: C{MemTotal} of C{/proc/meminfo} (a cgroup limit lower than that,
  from C{/sys/fs/cgroup/memory.max}, wins);
- disk: the free space of the filesystem holding the provider's data
  directory, where VM disks are created (measured at start);
- GPUs: PCI display controllers from NVIDIA (0x10de) or AMD (0x1002), and
  3D controllers (class 0x0302) of any vendor, read from C{/sys/bus/pci}.
  Emulated VGA adapters of a virtual machine (class 0x0300 from other
  vendors) are not GPUs.  GPUs are announced, not yet passed to VMs.

Reading the filesystem is synchronous and fast (a few small files); a
provider measures at start and when its VMs change.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

GPU_VENDORS = {"0x10de": "nvidia", "0x1002": "amd"}
DISPLAY_CLASS = "0x0300"
THREE_D_CLASS = "0x0302"


@dataclass(frozen=True)
class HostResources:
    cpu_cores: int
    memory_mb: int
    disk_gb: int
    gpus: tuple[str, ...] = ()
    """One entry per GPU: C{vendor:device pci-address}."""

    def as_announced(self) -> dict:
        return {"cpu_cores": self.cpu_cores, "memory_mb": self.memory_mb,
                "disk_gb": self.disk_gb, "gpus": len(self.gpus)}


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_mb(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    total = 0
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) // 1024  # kB
                break
    except (OSError, ValueError, IndexError):
        total = 0
    try:
        limit = (cgroup / "memory.max").read_text().strip()
    except OSError:
        limit = "max"
    if limit.isdigit():
        limited = int(limit) // (1024 * 1024)
        total = min(total, limited) if total else limited
    return total


def disk_gb(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free // (1024**3)


def gpus(pci: Path = Path("/sys/bus/pci/devices")) -> tuple[str, ...]:
    found = []
    try:
        devices = sorted(pci.iterdir())
    except OSError:
        return ()
    for device in devices:
        try:
            pci_class = (device / "class").read_text().strip()[:6]
            vendor = (device / "vendor").read_text().strip()
            product = (device / "device").read_text().strip()
        except OSError:
            continue
        if pci_class == THREE_D_CLASS or (pci_class == DISPLAY_CLASS and vendor in GPU_VENDORS):
            found.append(f"{GPU_VENDORS.get(vendor, vendor)}:{product} {device.name}")
    return tuple(found)


def measure(data_dir: Path) -> HostResources:
    """
    This machine's resources, with the disk of the filesystem of C{data_dir}.
    """
    return HostResources(cpu_cores(), memory_mb(), disk_gb(data_dir), gpus())


@dataclass(frozen=True)
class Capacity:
    """
    What a provider offers VMs in total: the host's resources, capped by
    the operator's quota (C{None}: the host's).
    """

    cpu_cores: int
    memory_mb: int
    disk_gb: int
    gpus: int

    @classmethod
    def of(cls, host: HostResources, quota) -> Capacity:
        def cap(measured, limit):
            return measured if limit is None else min(measured, limit)

        return cls(cap(host.cpu_cores, quota.cpu_cores), cap(host.memory_mb, quota.memory_mb),
                   cap(host.disk_gb, quota.disk_gb), len(host.gpus))

    def free(self, committed) -> dict:
        """
        What is left after C{committed} (an L{omerta.roles.vm.Resources}),
        in the announcement's terms.
        """
        return {
            "cpu_cores": max(0, self.cpu_cores - committed.cpu_cores),
            "memory_mb": max(0, self.memory_mb - committed.memory_mb),
            "disk_gb": max(0, self.disk_gb - committed.disk_gb),
            "gpus": self.gpus,
        }
