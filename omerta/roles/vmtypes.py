"""
The vocabulary of the provider's VM backend: L{IVMBackend}, the values it
takes and returns (L{VMSpec}, L{VMInfo}, L{Quota}, L{Resources},
L{ReconcileReport}) and its errors.

Pure values, no I/O; L{omerta.roles.vm} re-exports every name, so callers
import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface

from omerta.roles.guest import check_ssh_key

DEFAULT_URI = "test:///default"


class VMError(Exception):
    """
    A VM operation failed; the message says why.
    """


class QuotaExceeded(VMError):
    """
    A request does not fit in what the provider's quota leaves free.

    @ivar reason: a short machine-readable word (C{max_vms}, C{cpu},
        C{memory}, C{disk}, C{addresses}).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownVM(VMError):
    """
    No VM with this id was created by this provider.
    """


class BadSpec(VMError):
    """
    A L{VMSpec} asks for something impossible (zero memory, bad image name).
    """


@dataclass(frozen=True)
class VMSpec:
    """
    What a consumer asks for.
    """

    vcpus: int
    memory_mb: int
    disk_gb: int
    image: str
    owner: str
    """The requesting peer id, hex."""
    name: str = ""
    """A label chosen by the consumer; the domain name is always
    C{omerta-<vm_id>}."""
    ssh_key: str = ""
    """The consumer's OpenSSH public key line, installed in a QEMU guest for
    the user C{omerta}; empty for none.  See
    L{omerta.roles.guest.check_ssh_key}."""

    def validate(self) -> None:
        if self.vcpus < 1 or self.memory_mb < 16 or self.disk_gb < 0:
            raise BadSpec(
                f"need vcpus >= 1, memory_mb >= 16 and disk_gb >= 0, got"
                f" vcpus={self.vcpus} memory_mb={self.memory_mb}"
                f" disk_gb={self.disk_gb}"
            )
        if not self.image or "/" in self.image or self.image.startswith("."):
            raise BadSpec(f"bad image name {self.image!r}")
        try:
            bytes.fromhex(self.owner)
        except ValueError:
            raise BadSpec(f"owner must be a hex peer id, got {self.owner!r}")
        if self.ssh_key:
            try:
                check_ssh_key(self.ssh_key)
            except ValueError as e:
                raise BadSpec(str(e)) from None


@dataclass(frozen=True)
class VMInfo:
    """
    What the provider knows about one of its VMs.
    """

    vm_id: str
    name: str
    state: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    owner: str
    created_at: float
    address: str | None = None
    image: str = ""
    host_key: str | None = None
    """The guest's SSH host public key (C{ssh-ed25519 AAAA...}) as it
    reported it on its serial console this boot; C{None} before that, and
    always on the test driver."""


@dataclass(frozen=True)
class Quota:
    """
    The most this provider commits to VMs; C{None} means unlimited.
    """

    max_vms: int | None = None
    cpu_cores: int | None = None
    memory_mb: int | None = None
    disk_gb: int | None = None


@dataclass(frozen=True)
class Resources:
    """
    Resources committed to (or free for) VMs.
    """

    vms: int = 0
    cpu_cores: int = 0
    memory_mb: int = 0
    disk_gb: int = 0


@dataclass
class ReconcileReport:
    """
    What L{omerta.roles.vm.LibvirtBackend.reconcile} changed.
    """

    lost: list[str] = field(default_factory=list)
    """Ledger entries whose domain was gone; removed."""
    orphans_destroyed: list[str] = field(default_factory=list)
    """Domain names tagged as ours but not in the ledger; destroyed."""
    completed: list[str] = field(default_factory=list)
    """Entries recorded as C{defining} whose domain existed; kept."""


class IVMBackend(Interface):
    """
    Creates and manages VMs for consumers.  Every method returns a Deferred.
    """

    quota = Attribute("The L{Quota} enforced by L{create}.")

    def create(spec):
        """
        Define a VM (not started) from a L{VMSpec}.

        @return: Deferred firing with its L{VMInfo}; fails with
            L{QuotaExceeded} or L{BadSpec}.
        """

    def start(vm_id):
        """
        Boot a defined VM.  @return: Deferred firing with its L{VMInfo}.
        """

    def stop(vm_id):
        """
        Power a VM off (it stays defined).  @return: Deferred of L{VMInfo}.
        """

    def destroy(vm_id):
        """
        Stop, undefine and delete the disk of a VM, and forget it.
        @return: Deferred firing with C{None}.
        """

    def wait_ready(vm_id, timeout):
        """
        Wait until the VM's guest is up (for a real guest: its SSH server
        listens and its host key is known).

        @param timeout: seconds.
        @return: Deferred firing with the L{VMInfo} (C{host_key} filled in
            for a real guest); fails with L{UnknownVM}, or L{VMError} when
            the guest fails, is not running or is not up in time.
        """

    def list():
        """
        @return: Deferred firing with a list of L{VMInfo}, one per VM this
            provider created.
        """

    def info(vm_id):
        """
        @return: Deferred firing with the L{VMInfo}; fails with L{UnknownVM}.
        """

    def committed():
        """
        @return: the L{Resources} committed to VMs (synchronous: it reads the
            ledger in memory).
        """
