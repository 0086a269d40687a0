"""
The VM ledger: which VMs this provider created, what they hold, and where
it is recorded (C{<data_dir>/vms.json}).

L{VMLedger} is plain bookkeeping, used only on the reactor thread, so it
needs no lock: it reserves a VM (quota check, guest address, entry in state
C{defining}) in one step, so two concurrent requests can never both fit in
one slot or get one address; it marks entries defined, forgets them, adds up
what they commit, and decides what a reconcile must change given the
domains libvirt has.  Timestamps come from the clock it is given
(C{IReactorTime.seconds}), never from the wall clock directly.

The file is written atomically (L{omerta.storage.write_json}).  Writing
fsyncs, so the ledger hands out a L{LedgerSnapshot}, a copy of its state
that whichever thread does the blocking work writes (the VM backend's
worker); the ledger itself is never touched off the reactor thread.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection

from twisted.internet.interfaces import IReactorTime

from omerta.roles import bridge as bridges
from omerta.roles.vmtypes import (
    Quota,
    QuotaExceeded,
    Resources,
    UnknownVM,
    VMError,
    VMInfo,
    VMSpec,
)
from omerta.storage import read_json, write_json

LEDGER_NAME = "vms.json"
LEDGER_VERSION = 1


@dataclass(frozen=True)
class LedgerSnapshot:
    """
    The ledger's document at one moment, to be written to C{path}.
    """

    path: Path
    document: dict[str, Any]

    def write(self) -> None:
        """
        Replace the ledger file atomically.  Blocks (fsync): call it off the
        reactor thread.
        """
        write_json(self.path, self.document)


def read_ledger(path: Path) -> dict[str, Any]:
    """
    The ledger document stored at C{path}, C{{}} if there is none yet.
    Blocks: call it off the reactor thread.

    @raise omerta.storage.StateFileError: the file is unreadable or corrupt.
    """
    return read_json(path, dict)


@dataclass
class Settlement:
    """
    What L{VMLedger.settle} changed and what is left to do in libvirt.
    """

    lost: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Entries whose domain was gone, by VM id, now forgotten; their disks
    remain to be deleted."""
    completed: list[str] = field(default_factory=list)
    """Ids of entries recorded as C{defining} whose domain existed; now
    C{defined}."""
    orphans: list[str] = field(default_factory=list)
    """Ids of tagged domains with no entry; they remain to be destroyed."""


class VMLedger:
    """
    The VMs this provider created.  Reactor thread only.

    @param path: where the ledger is stored (see L{snapshot}).
    @param clock: gives the creation time of new entries.
    @param quota: what L{reserve} enforces.
    @param addresses: guest addresses handed out by L{reserve}; C{None} for
        VMs without a network.
    @param uri: the libvirt URI, recorded in the document.
    @param provider_id: the id tagging this provider's domains; C{None}
        takes the one stored in the ledger, or a new random one.
    """

    def __init__(
        self,
        path: Path,
        clock: IReactorTime,
        quota: Quota = Quota(),
        addresses: bridges.AddressPool | None = None,
        uri: str = "",
        provider_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.quota = quota
        self.addresses = addresses
        self.uri = uri
        self.provider_id = provider_id
        self._clock = clock
        self._vms: dict[str, dict[str, Any]] = {}

    # -- persistence -------------------------------------------------------

    def load(self, document: dict[str, Any]) -> None:
        """
        Take the entries (and, unless given, the provider id) of a stored
        ledger document; C{{}} is an empty ledger.

        @raise VMError: the document has a version this code does not know.
        """
        if document and document.get("version") != LEDGER_VERSION:
            raise VMError(
                f"{self.path} has version {document.get('version')!r},"
                f" this omerta understands {LEDGER_VERSION}"
            )
        if self.provider_id is None:
            self.provider_id = document.get("provider") or secrets.token_hex(8)
        self._vms = {k: dict(v) for k, v in document.get("vms", {}).items()}

    def snapshot(self) -> LedgerSnapshot:
        """
        A copy of the ledger as it is now, ready to be written.
        """
        return LedgerSnapshot(
            self.path,
            {
                "version": LEDGER_VERSION,
                "provider": self.provider_id,
                "uri": self.uri,
                "vms": {k: dict(v) for k, v in self._vms.items()},
            },
        )

    # -- reading -----------------------------------------------------------

    def __contains__(self, vm_id: str) -> bool:
        return vm_id in self._vms

    def __len__(self) -> int:
        return len(self._vms)

    def entry(self, vm_id: str) -> dict[str, Any]:
        """
        A copy of VM C{vm_id}'s entry.

        @raise UnknownVM: there is none.
        """
        try:
            return dict(self._vms[vm_id])
        except KeyError:
            raise UnknownVM(f"no VM {vm_id!r} on this provider")

    def ids(self) -> list[str]:
        """
        Every VM id, oldest first.
        """
        return sorted(self._vms, key=lambda v: (self._vms[v]["created_at"], v))

    def info(self, vm_id: str, state: str) -> VMInfo:
        """
        The L{VMInfo} of VM C{vm_id} in libvirt state C{state}.

        @raise UnknownVM: there is no such entry.
        """
        e = self.entry(vm_id)
        return VMInfo(
            vm_id=vm_id,
            name=e["name"],
            state=state,
            vcpus=e["vcpus"],
            memory_mb=e["memory_mb"],
            disk_gb=e["disk_gb"],
            owner=e["owner"],
            created_at=e["created_at"],
            address=e.get("address"),
            image=e.get("image", ""),
            host_key=e.get("host_key"),
        )

    def committed(self) -> Resources:
        vms = self._vms.values()
        return Resources(
            vms=len(vms),
            cpu_cores=sum(v["vcpus"] for v in vms),
            memory_mb=sum(v["memory_mb"] for v in vms),
            disk_gb=sum(v["disk_gb"] for v in vms),
        )

    # -- changes -----------------------------------------------------------

    def check_quota(self, spec: VMSpec) -> None:
        """
        @raise QuotaExceeded: C{spec} does not fit in what is left.
        """
        q, c = self.quota, self.committed()
        checks = (
            ("max_vms", q.max_vms, c.vms, 1, "VMs"),
            ("cpu", q.cpu_cores, c.cpu_cores, spec.vcpus, "cpu cores"),
            ("memory", q.memory_mb, c.memory_mb, spec.memory_mb, "MiB of memory"),
            ("disk", q.disk_gb, c.disk_gb, spec.disk_gb, "GiB of disk"),
        )
        for reason, limit, used, wanted, unit in checks:
            if limit is not None and used + wanted > limit:
                raise QuotaExceeded(
                    reason,
                    f"asked for {wanted} {unit}, {max(limit - used, 0)} of"
                    f" {limit} free",
                )

    def reserve(self, vm_id: str, spec: VMSpec) -> dict[str, Any]:
        """
        Record VM C{vm_id} in state C{defining}, created now, with the lowest
        free guest address, if it fits in the quota.

        @return: a copy of the new entry.
        @raise QuotaExceeded: it does not fit (C{reason} C{addresses} when no
            guest address is left); nothing is recorded.
        """
        self.check_quota(spec)
        address = None
        if self.addresses is not None:
            try:
                address = self.addresses.allocate(v.get("address") for v in self._vms.values())
            except bridges.AddressesExhausted as e:
                raise QuotaExceeded("addresses", str(e))
        self._vms[vm_id] = {
            "vm_id": vm_id,
            "state": "defining",
            "created_at": self._clock.seconds(),
            "address": address,
            **asdict(spec),
        }
        return dict(self._vms[vm_id])

    def mark_defined(self, vm_id: str) -> None:
        """
        VM C{vm_id}'s domain is defined.

        @raise UnknownVM: there is no such entry.
        """
        if vm_id not in self._vms:
            raise UnknownVM(f"no VM {vm_id!r} on this provider")
        self._vms[vm_id]["state"] = "defined"

    def set_host_key(self, vm_id: str, host_key: str | None) -> bool:
        """
        Record the SSH host key VM C{vm_id}'s guest reported (C{None}: none
        known, as after a stop or a new boot).

        @return: whether the entry changed (and so the file needs writing).
        @raise UnknownVM: there is no such entry.
        """
        if vm_id not in self._vms:
            raise UnknownVM(f"no VM {vm_id!r} on this provider")
        entry = self._vms[vm_id]
        if entry.get("host_key") == host_key:
            return False
        if host_key is None:
            del entry["host_key"]
        else:
            entry["host_key"] = host_key
        return True

    def remove(self, vm_id: str) -> dict[str, Any] | None:
        """
        Forget VM C{vm_id}, freeing what it held (its address included).

        @return: its entry, or C{None} if there was none.
        """
        return self._vms.pop(vm_id, None)

    def settle(self, tagged: Collection[str], busy: Collection[str] = ()) -> Settlement:
        """
        Make the ledger agree with the domains libvirt has: forget entries
        whose domain is gone, mark C{defining} entries whose domain exists
        as defined, and name the tagged domains nobody recorded.

        @param tagged: the VM ids of the domains tagged with this provider's
            id, in the order the orphans are to be named.
        @param busy: ids being created right now, left alone.
        """
        out = Settlement()
        present = set(tagged)
        for vm_id in list(self._vms):
            if vm_id in busy:
                continue
            entry = self._vms[vm_id]
            if vm_id not in present:
                out.lost[vm_id] = self._vms.pop(vm_id)
            elif entry.get("state") == "defining":
                entry["state"] = "defined"
                out.completed.append(vm_id)
        out.orphans = [vm_id for vm_id in tagged if vm_id not in self._vms]
        return out
