"""
The provider protocol: VM requests and their replies, carried as the
payload of mesh request/response messages on the C{vm} channel (so inside
a per-pair session: only the provider can read a request, and the sender
the provider sees is the authenticated consumer).

    request  = version (1) | op (1) | body of the op
    reply    = version (1) | status (1) | detail (text) | vms (count 1, VmRecord...)

Ops:

    CREATE   vcpus (2), memory MiB (4), disk GiB (4), image (text),
             name (text), the consumer's WireGuard public key (32),
             the consumer's SSH public key (long text: length 2, UTF-8)
    RELEASE  vm id (8)
    LIST     (nothing): the caller's VMs
    STATUS   vm id (8)

A reply lists the VMs the op concerns (the new one, the released one, the
caller's, the one asked about) with what the consumer needs to reach each:
its address on the provider's side, the provider's WireGuard public key,
the tunnel's addresses (the consumer's, the provider's, their prefix) and
state, the guest's SSH host key, and the path kind as the provider's mesh
sees the consumer.  Errors carry a L{VmStatus} and a detail a person can act on.
"""

from __future__ import annotations

import enum

import construct as c

from omerta.wire.codec import SHORT_TEXT, build, hex_id, parse_exact

VERSION = 2
CHANNEL = "vm"
NO_KEY = bytes(32)


class VmOp(enum.IntEnum):
    CREATE = 1
    RELEASE = 2
    LIST = 3
    STATUS = 4


class VmStatus(enum.IntEnum):
    OK = 0
    NO_CAPACITY = 1
    BAD_REQUEST = 2
    UNKNOWN_VM = 3
    NOT_YOURS = 4
    FAILED = 5
    """The provider tried and its hypervisor failed (detail says how)."""
    UNAVAILABLE = 6
    """The provider offers no VMs (not a provider, or its backend is down)."""


VM_ID = c.Bytes(8)
LONG_TEXT = c.PascalString(c.Int16ub, "utf8")
"""An SSH public key line: up to a few kB."""

_Create = c.Struct(
    "vcpus" / c.Int16ub,
    "memory_mb" / c.Int32ub,
    "disk_gb" / c.Int32ub,
    "image" / SHORT_TEXT,
    "name" / SHORT_TEXT,
    "wg_public_key" / c.Bytes(32),
    "ssh_key" / LONG_TEXT,
)

VmRequest = c.Struct(
    "version" / c.Const(VERSION, c.Int8ub),
    "op" / c.Int8ub,
    "body" / c.Switch(
        c.this.op,
        {
            VmOp.CREATE: _Create,
            VmOp.RELEASE: c.Struct("vm_id" / VM_ID),
            VmOp.LIST: c.Struct(),
            VmOp.STATUS: c.Struct("vm_id" / VM_ID),
        },
        default=c.Error,
    ),
)

VmRecord = c.Struct(
    "vm_id" / VM_ID,
    "name" / SHORT_TEXT,
    "state" / SHORT_TEXT,
    "vcpus" / c.Int16ub,
    "memory_mb" / c.Int32ub,
    "disk_gb" / c.Int32ub,
    "image" / SHORT_TEXT,
    "created_ms" / c.Int64ub,
    # the VM's address on the provider's VM bridge; empty when it has none
    # (libvirt's test driver runs no guest)
    "address" / SHORT_TEXT,
    # the provider's WireGuard public key and the path kind as the
    # provider's mesh reaches the consumer
    "wg_public_key" / c.Bytes(32),
    "path_kind" / SHORT_TEXT,
    # the tunnel: the consumer's and the provider's addresses in it (empty
    # when the provider carries no tunnels), their prefix length, its
    # state ("ready", or why not), and the guest's SSH host key (empty
    # until the guest reported it, or when there is no guest)
    "tunnel_address" / SHORT_TEXT,
    "provider_tunnel_address" / SHORT_TEXT,
    "tunnel_prefix" / c.Int8ub,
    "tunnel_state" / SHORT_TEXT,
    "host_key" / LONG_TEXT,
)

VmReply = c.Struct(
    "version" / c.Const(VERSION, c.Int8ub),
    "status" / c.Int8ub,
    "detail" / c.PascalString(c.Int16ub, "utf8"),
    "vms" / c.PrefixedArray(c.Int8ub, VmRecord),
)

MAX_VMS_PER_REPLY = 255


def build_request(op: VmOp, **body) -> bytes:
    if op == VmOp.CREATE:
        body.setdefault("ssh_key", "")  # none: the guest accepts no login
    return build(VmRequest, {"version": VERSION, "op": int(op), "body": body}, "vm request")


def parse_request(data: bytes):
    """
    @raise omerta.wire.ParseError: not a VM request (the op is checked too).
    """
    return parse_exact(VmRequest, data, "vm request")


def build_reply(status: VmStatus, detail: str = "", vms=()) -> bytes:
    return build(VmReply, {"version": VERSION, "status": int(status), "detail": detail,
                           "vms": list(vms)}, "vm reply")


def parse_reply(data: bytes):
    return parse_exact(VmReply, data, "vm reply")


def vm_id_bytes(vm_id: str) -> bytes:
    """
    A VM id as the provider prints it (16 hex digits) to its wire form.

    @raise ValueError: not 16 hex digits.
    """
    return hex_id(vm_id, "VM")
