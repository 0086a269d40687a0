"""
The libvirt domain XML of the provider's VMs: pure functions, no libvirt.

Each domain is named C{omerta-<vm_id>} (L{domain_name}) and carries an
C{<omerta:vm>} element in its C{<metadata>} (L{metadata_element}) with the
provider id, the owner and the spec, so a restarted provider recognises its
own domains even on a shared hypervisor (L{parse_domain_metadata}).
L{build_domain_xml} writes the whole domain for libvirt's test driver or for
a QEMU guest under TCG.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from omerta.roles import guest
from omerta.roles.vmtypes import VMSpec

OMERTA_NS = "https://omerta.invalid/xmlns/libvirt-vm/1"
OMERTA_PREFIX = "omerta"
DOMAIN_PREFIX = "omerta-"

_SPEC_FIELDS = ("owner", "name", "image", "vcpus", "memory_mb", "disk_gb")


def domain_name(vm_id: str) -> str:
    """
    The libvirt name of VM C{vm_id}'s domain.
    """
    return DOMAIN_PREFIX + vm_id


def metadata_element(vm_id: str, provider: str, spec: VMSpec, created_at: float) -> ET.Element:
    """
    The C{<omerta:vm>} element that tags a domain as VM C{vm_id} of
    C{provider}.
    """
    tag = ET.Element(
        f"{{{OMERTA_NS}}}vm",
        {"id": vm_id, "provider": provider, "created": repr(created_at)},
    )
    for key in _SPEC_FIELDS:
        ET.SubElement(tag, f"{{{OMERTA_NS}}}{key}").text = str(getattr(spec, key))
    return tag


def build_domain_xml(
    kind: str,
    vm_id: str,
    provider: str,
    spec: VMSpec,
    created_at: float,
    disk_path: Path,
    image_dir: Path | None = None,
    serial_log: Path | None = None,
    bridge: str | None = None,
    cmdline: str | None = None,
) -> str:
    """
    The libvirt domain XML for a VM.

    @param kind: C{"test"} for libvirt's test driver, C{"qemu"} for QEMU
        with TCG (kernel C{vmlinuz} and C{initrd.gz} from C{image_dir}, serial
        console to C{serial_log}, a virtio NIC on C{bridge} when given).
    @param cmdline: the kernel command line of a C{qemu} domain; default
        L{guest.kernel_cmdline} without network configuration.
    """
    if kind not in ("test", "qemu"):
        raise ValueError(f"unknown domain kind {kind!r}")
    ET.register_namespace(OMERTA_PREFIX, OMERTA_NS)
    dom = ET.Element("domain", type=kind)
    ET.SubElement(dom, "name").text = domain_name(vm_id)
    ET.SubElement(dom, "uuid").text = str(uuid.uuid5(uuid.NAMESPACE_URL, OMERTA_NS + vm_id))
    if spec.name:
        ET.SubElement(dom, "title").text = spec.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    ET.SubElement(dom, "metadata").append(metadata_element(vm_id, provider, spec, created_at))
    os_ = ET.SubElement(dom, "os")
    if kind == "qemu":
        ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
        image_dir = Path(image_dir) if image_dir is not None else Path(".")
        ET.SubElement(os_, "kernel").text = str(image_dir / "vmlinuz")
        ET.SubElement(os_, "initrd").text = str(image_dir / "initrd.gz")
        ET.SubElement(os_, "cmdline").text = cmdline or guest.kernel_cmdline(vm_id)
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "destroy"
        ET.SubElement(dom, "on_crash").text = "destroy"
    else:
        ET.SubElement(os_, "type").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    if spec.disk_gb > 0:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        if kind == "qemu":
            ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=str(disk_path))
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if kind == "qemu":
        if bridge:
            nic = ET.SubElement(devices, "interface", type="bridge")
            ET.SubElement(nic, "source", bridge=bridge)
            ET.SubElement(nic, "model", type="virtio")
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(serial_log))
        ET.SubElement(serial, "target", port="0")
        ET.SubElement(devices, "console", type="file").append(
            ET.Element("target", type="serial", port="0")
        )
    return ET.tostring(dom, encoding="unicode")


def parse_domain_metadata(xml: str) -> dict[str, Any] | None:
    """
    The C{<omerta:vm>} metadata of a domain's XML, or C{None} if it has none.

    @return: C{vm_id}, C{provider} and C{created_at} (a float), and the spec's
        fields as strings.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    tag = root.find(f"metadata/{{{OMERTA_NS}}}vm")
    if tag is None:
        return None
    out: dict[str, Any] = {
        "vm_id": tag.get("id", ""),
        "provider": tag.get("provider", ""),
        "created_at": float(tag.get("created") or 0),
    }
    for child in tag:
        key = child.tag.split("}", 1)[-1]
        out[key] = child.text or ""
    return out
