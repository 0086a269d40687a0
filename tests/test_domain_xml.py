"""
Tests for L{omerta.roles.domainxml}: the domain XML, pure functions.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

from twisted.trial import unittest

from omerta.roles import vm
from omerta.roles.domainxml import (
    OMERTA_NS,
    build_domain_xml,
    domain_name,
    metadata_element,
    parse_domain_metadata,
)
from omerta.roles.vmtypes import VMSpec

OWNER = "ab" * 32

GOLDEN_TEST = (
    '<domain xmlns:omerta="https://omerta.invalid/xmlns/libvirt-vm/1" type="test">'
    "<name>omerta-aaaaaaaaaaaaaaaa</name>"
    "<uuid>34728e0c-235e-5888-9b86-543aa3120655</uuid>"
    "<title>web</title>"
    '<memory unit="MiB">256</memory><currentMemory unit="MiB">256</currentMemory>'
    "<vcpu>2</vcpu>"
    '<metadata><omerta:vm id="aaaaaaaaaaaaaaaa" provider="p1" created="2.5">'
    "<omerta:owner>abababab</omerta:owner><omerta:name>web</omerta:name>"
    "<omerta:image>busybox</omerta:image><omerta:vcpus>2</omerta:vcpus>"
    "<omerta:memory_mb>256</omerta:memory_mb><omerta:disk_gb>1</omerta:disk_gb>"
    "</omerta:vm></metadata>"
    "<os><type>hvm</type></os>"
    '<devices><disk type="file" device="disk"><source file="/d/disk.raw" />'
    '<target dev="vda" bus="virtio" /></disk></devices>'
    "</domain>"
)
"""The test-driver domain of L{golden_spec}, as libvirt gets it."""


def spec(**kw) -> VMSpec:
    values = dict(vcpus=1, memory_mb=128, disk_gb=1, image="busybox", owner=OWNER, name="t")
    values.update(kw)
    return VMSpec(**values)


def golden_spec() -> VMSpec:
    return spec(vcpus=2, memory_mb=256, owner="ab" * 4, name="web")


class DomainXMLTests(unittest.TestCase):
    def test_golden_test_domain(self):
        """The test-driver domain XML is byte for byte what it always was."""
        xml = build_domain_xml("test", "aa" * 8, "p1", golden_spec(), 2.5, Path("/d/disk.raw"))
        self.assertEqual(xml, GOLDEN_TEST)

    def test_metadata_round_trip(self):
        """The omerta metadata written into domain XML parses back to the spec."""
        xml = build_domain_xml("test", "aa" * 8, "p1", spec(vcpus=3), 2.5, Path("/d"))
        meta = parse_domain_metadata(xml)
        self.assertEqual(
            (meta["vm_id"], meta["provider"], meta["owner"], meta["vcpus"], meta["created_at"]),
            ("aa" * 8, "p1", OWNER, "3", 2.5),
        )
        self.assertEqual(
            (meta["name"], meta["image"], meta["memory_mb"], meta["disk_gb"]),
            ("t", "busybox", "128", "1"),
        )

    def test_created_at_exact(self):
        """A creation time survives the round trip without rounding."""
        created = 1717171717.123456
        xml = build_domain_xml("test", "aa" * 8, "p1", spec(), created, Path("/d"))
        self.assertEqual(parse_domain_metadata(xml)["created_at"], created)

    def test_no_metadata(self):
        """A domain without omerta metadata is not ours."""
        self.assertIsNone(parse_domain_metadata("<domain type='test'><name>x</name></domain>"))
        self.assertIsNone(parse_domain_metadata("not xml"))

    def test_metadata_element(self):
        """The metadata element is in the omerta namespace and carries id, provider, creation time and spec."""
        tag = metadata_element("aa" * 8, "p1", spec(name="web"), 2.5)
        self.assertEqual(tag.tag, f"{{{OMERTA_NS}}}vm")
        self.assertEqual(dict(tag.attrib), {"id": "aa" * 8, "provider": "p1", "created": "2.5"})
        self.assertEqual(
            {child.tag.split("}")[1]: child.text for child in tag},
            {"owner": OWNER, "name": "web", "image": "busybox", "vcpus": "1",
             "memory_mb": "128", "disk_gb": "1"},
        )

    def test_domain_name_and_uuid(self):
        """The domain is named omerta-<vm_id>, with a UUID that depends only on the id."""
        self.assertEqual(domain_name("aa" * 8), "omerta-" + "aa" * 8)
        one = ET.fromstring(build_domain_xml("test", "aa" * 8, "p1", spec(), 1.0, Path("/d")))
        two = ET.fromstring(build_domain_xml("test", "aa" * 8, "p2", spec(vcpus=2), 9.0, Path("/e")))
        other = ET.fromstring(build_domain_xml("test", "bb" * 8, "p1", spec(), 1.0, Path("/d")))
        self.assertEqual(one.findtext("name"), domain_name("aa" * 8))
        self.assertEqual(one.findtext("uuid"), two.findtext("uuid"))
        self.assertNotEqual(one.findtext("uuid"), other.findtext("uuid"))

    def test_no_disk_no_title(self):
        """A spec without disk gets no disk device, and one without a name no title."""
        dom = ET.fromstring(build_domain_xml("test", "aa" * 8, "p", spec(disk_gb=0, name=""),
                                             1.0, Path("/d")))
        self.assertIsNone(dom.find("devices/disk"))
        self.assertIsNone(dom.find("title"))

    def test_unknown_kind(self):
        """Only the test and qemu kinds exist."""
        self.assertRaises(ValueError, build_domain_xml, "xen", "aa" * 8, "p", spec(), 1.0, Path("/d"))

    def test_qemu_xml(self):
        """The qemu domain boots the cached kernel and initrd under TCG with a serial log and a bridged NIC."""
        xml = build_domain_xml(
            "qemu", "aa" * 8, "p", spec(), 1.0, Path("/d/disk.raw"),
            image_dir=Path("/img/busybox"), serial_log=Path("/d/serial.log"), bridge="omerta0",
        )
        for needle in (
            "type=\"qemu\"",
            "<kernel>/img/busybox/vmlinuz</kernel>",
            "<initrd>/img/busybox/initrd.gz</initrd>",
            "console=ttyS0",
            "<source bridge=\"omerta0\" />",
            "<source path=\"/d/serial.log\" />",
            "<memory unit=\"MiB\">128</memory>",
            "<driver name=\"qemu\" type=\"raw\" />",
            "<on_poweroff>destroy</on_poweroff>",
        ):
            self.assertIn(needle, xml)

    def test_qemu_cmdline(self):
        """A qemu domain gets the given kernel command line, or the guest's default without network."""
        given = ET.fromstring(build_domain_xml(
            "qemu", "aa" * 8, "p", spec(), 1.0, Path("/d"), serial_log=Path("/s"),
            cmdline="console=ttyS0 omerta.vm=x omerta.ip=10.0.0.2/24",
        ))
        self.assertEqual(given.findtext("os/cmdline"), "console=ttyS0 omerta.vm=x omerta.ip=10.0.0.2/24")
        default = ET.fromstring(build_domain_xml(
            "qemu", "aa" * 8, "p", spec(), 1.0, Path("/d"), serial_log=Path("/s"),
        ))
        self.assertEqual(default.findtext("os/cmdline"), f"console=ttyS0 omerta.vm={'aa' * 8}")
        self.assertIsNone(default.find("devices/interface"))

    def test_ssh_key_not_in_metadata(self):
        """The consumer's SSH key reaches a domain only on its kernel command line: the metadata (and the golden domain) stay as they were."""
        key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMwfAW7KlGfgnaViiJPnjBeigDcz8iHUIppTqKRdYEmM a"
        keyed = dataclasses.replace(golden_spec(), ssh_key=key)
        xml = build_domain_xml("test", "a" * 16, "p1", keyed, 2.5, Path("/d/disk.raw"))
        self.assertEqual(xml, GOLDEN_TEST)
        self.assertNotIn("ssh_key", parse_domain_metadata(xml))

    def test_reexported(self):
        """omerta.roles.vm still offers the domain XML functions."""
        self.assertIs(vm.build_domain_xml, build_domain_xml)
        self.assertIs(vm.parse_domain_metadata, parse_domain_metadata)
        self.assertIs(vm.domain_name, domain_name)
