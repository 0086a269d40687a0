"""
Measuring what a provider offers (omerta.roles.resources): memory from a
fake /proc and cgroup, GPUs from a fake /sys/bus/pci tree (real GPUs
counted, emulated VGA not), cores from the affinity mask, disk from the
data directory's filesystem, and the capacity a quota leaves and what the
committed VMs leave free of it.
"""

import collections
from pathlib import Path
from types import SimpleNamespace

from twisted.trial import unittest

from omerta.roles import resources
from omerta.roles.resources import (
    Capacity,
    HostResources,
    cpu_cores,
    disk_gb,
    gpus,
    measure,
    memory_mb,
)
from omerta.roles.vm import Quota
from omerta.roles.vm import Resources as Committed

GIB = 1024**3

MEMINFO = """\
MemTotal:       16384000 kB
MemFree:         1234567 kB
MemAvailable:    8000000 kB
"""


class MemoryTests(unittest.TestCase):
    def setUp(self):
        root = Path(self.mktemp())
        self.proc = root / "proc"
        self.cgroup = root / "cgroup"
        self.proc.mkdir(parents=True)
        self.cgroup.mkdir()

    def measure(self, meminfo=None, limit=None):
        if meminfo is not None:
            (self.proc / "meminfo").write_text(meminfo)
        if limit is not None:
            (self.cgroup / "memory.max").write_text(limit)
        return memory_mb(self.proc, self.cgroup)

    def test_mem_total(self):
        """Without a cgroup limit, memory is MemTotal in MiB."""
        self.assertEqual(self.measure(MEMINFO), 16000)

    def test_cgroup_unlimited(self):
        """A memory.max of 'max' leaves MemTotal."""
        self.assertEqual(self.measure(MEMINFO, "max\n"), 16000)

    def test_cgroup_lower(self):
        """A cgroup limit below MemTotal wins."""
        self.assertEqual(self.measure(MEMINFO, f"{4 * GIB}\n"), 4096)

    def test_cgroup_higher(self):
        """A cgroup limit above MemTotal does not add memory."""
        self.assertEqual(self.measure(MEMINFO, f"{64 * GIB}\n"), 16000)

    def test_only_cgroup(self):
        """Without a readable meminfo the cgroup limit is the memory."""
        self.assertEqual(self.measure(None, f"{2 * GIB}"), 2048)

    def test_nothing_readable(self):
        """With neither file, memory is 0."""
        self.assertEqual(self.measure(), 0)

    def test_damaged_meminfo(self):
        """A MemTotal line that is not a number counts as unknown (0)."""
        self.assertEqual(self.measure("MemTotal: lots kB\n"), 0)
        self.assertEqual(self.measure("MemTotal:\n"), 0)
        self.assertEqual(self.measure("MemFree: 10 kB\n"), 0)


class GpuTests(unittest.TestCase):
    def setUp(self):
        self.pci = Path(self.mktemp())
        self.pci.mkdir()

    def device(self, address, pci_class, vendor, device="0x1234"):
        path = self.pci / address
        path.mkdir()
        for name, value in (("class", pci_class), ("vendor", vendor), ("device", device)):
            if value is not None:
                (path / name).write_text(value + "\n")

    def test_real_gpus(self):
        """NVIDIA and AMD display controllers and any 3D controller are GPUs, sorted by address."""
        self.device("0000:03:00.0", "0x030000", "0x1002", "0x73bf")  # AMD VGA
        self.device("0000:01:00.0", "0x030000", "0x10de", "0x2204")  # NVIDIA VGA
        self.device("0000:02:00.0", "0x030200", "0x10de", "0x20b0")  # NVIDIA 3D (A100)
        self.device("0000:04:00.0", "0x030200", "0x8086", "0x0bd5")  # Intel 3D (Max)
        self.assertEqual(gpus(self.pci), (
            "nvidia:0x2204 0000:01:00.0",
            "nvidia:0x20b0 0000:02:00.0",
            "amd:0x73bf 0000:03:00.0",
            "0x8086:0x0bd5 0000:04:00.0",
        ))

    def test_emulated_vga_is_not_a_gpu(self):
        """VGA from QEMU, virtio, VMware, Cirrus or Intel is not a GPU."""
        for address, vendor in (("0000:00:01.0", "0x1234"), ("0000:00:02.0", "0x1af4"),
                                ("0000:00:03.0", "0x15ad"), ("0000:00:04.0", "0x1013"),
                                ("0000:00:05.0", "0x8086")):
            self.device(address, "0x030000", vendor)
        self.assertEqual(gpus(self.pci), ())

    def test_other_classes(self):
        """Network, storage and other display classes are not GPUs, whatever the vendor."""
        self.device("0000:00:01.0", "0x020000", "0x10de")  # ethernet
        self.device("0000:00:02.0", "0x010802", "0x1002")  # NVMe
        self.device("0000:00:03.0", "0x038000", "0x10de")  # other display controller
        self.device("0000:00:04.0", "0x040300", "0x10de")  # HD audio on a GPU card
        self.assertEqual(gpus(self.pci), ())

    def test_unreadable_device_skipped(self):
        """A device missing one of its files is skipped; the others are still found."""
        self.device("0000:00:01.0", "0x030200", None)
        self.device("0000:00:02.0", None, "0x10de")
        self.device("0000:01:00.0", "0x030000", "0x10de", "0x2204")
        self.assertEqual(gpus(self.pci), ("nvidia:0x2204 0000:01:00.0",))

    def test_no_pci_tree(self):
        """Without a PCI tree there are no GPUs."""
        self.assertEqual(gpus(self.pci / "missing"), ())


class CpuTests(unittest.TestCase):
    def test_affinity(self):
        """The cores are those this process may run on."""
        self.patch(resources.os, "sched_getaffinity", lambda pid: {0, 2, 5})
        self.assertEqual(cpu_cores(), 3)

    def test_no_affinity(self):
        """Where there is no affinity call, the cpu count (or 1) is used."""
        self.patch(resources, "os", SimpleNamespace(cpu_count=lambda: 6))
        self.assertEqual(cpu_cores(), 6)
        self.patch(resources, "os", SimpleNamespace(cpu_count=lambda: None))
        self.assertEqual(cpu_cores(), 1)


class DiskTests(unittest.TestCase):
    def setUp(self):
        self.asked = []
        self.patch(resources.shutil, "disk_usage", self.disk_usage)

    def disk_usage(self, path):
        self.asked.append(Path(path))
        return collections.namedtuple("usage", "total used free")(
            1000 * GIB, 900 * GIB, 100 * GIB + GIB - 1)

    def test_free_gib(self):
        """Disk is the free space in whole GiB, rounded down."""
        data_dir = Path(self.mktemp())
        data_dir.mkdir()
        self.assertEqual(disk_gb(data_dir), 100)
        self.assertEqual(self.asked, [data_dir])

    def test_data_dir_not_yet_made(self):
        """A data directory that does not exist yet is measured at its nearest existing parent."""
        parent = Path(self.mktemp())
        parent.mkdir()
        self.assertEqual(disk_gb(parent / "a" / "b"), 100)
        self.assertEqual(self.asked, [parent])


class MeasureTests(unittest.TestCase):
    def test_measure(self):
        """measure() puts cores, memory, the data dir's disk and GPUs together."""
        self.patch(resources, "cpu_cores", lambda: 4)
        self.patch(resources, "memory_mb", lambda: 8192)
        self.patch(resources, "disk_gb", lambda path: len(str(path)))
        self.patch(resources, "gpus", lambda: ("nvidia:0x2204 0000:01:00.0",))
        self.assertEqual(measure(Path("/data")), HostResources(
            4, 8192, len("/data"), ("nvidia:0x2204 0000:01:00.0",)))

    def test_announced(self):
        """The announcement counts GPUs rather than naming them."""
        host = HostResources(4, 8192, 100, ("a", "b"))
        self.assertEqual(host.as_announced(),
                         {"cpu_cores": 4, "memory_mb": 8192, "disk_gb": 100, "gpus": 2})


class CapacityTests(unittest.TestCase):
    HOST = HostResources(cpu_cores=8, memory_mb=16000, disk_gb=500, gpus=("g",))

    def test_no_quota(self):
        """Without a quota the capacity is the host."""
        self.assertEqual(Capacity.of(self.HOST, Quota()), Capacity(8, 16000, 500, 1))

    def test_quota_caps(self):
        """A quota below the host caps each resource; one above it does not add any."""
        quota = Quota(max_vms=3, cpu_cores=4, memory_mb=32000, disk_gb=100)
        self.assertEqual(Capacity.of(self.HOST, quota), Capacity(4, 16000, 100, 1))

    def test_free(self):
        """Free is capacity minus what VMs hold, GPUs (not given to VMs) all free."""
        capacity = Capacity(8, 16000, 500, 1)
        self.assertEqual(capacity.free(Committed(vms=2, cpu_cores=3, memory_mb=4096, disk_gb=20)),
                         {"cpu_cores": 5, "memory_mb": 11904, "disk_gb": 480, "gpus": 1})

    def test_free_never_negative(self):
        """Committing more than the capacity (a quota lowered later) leaves 0, not less."""
        capacity = Capacity(2, 1000, 10, 0)
        self.assertEqual(capacity.free(Committed(vms=5, cpu_cores=9, memory_mb=9999, disk_gb=99)),
                         {"cpu_cores": 0, "memory_mb": 0, "disk_gb": 0, "gpus": 0})
