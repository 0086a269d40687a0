"""
What a consumer remembers between commands: the VMs it holds (with what
reaching each takes: tunnel addresses, the provider's WireGuard key, the
guest's SSH host key, the SSH key to log in with) and how each provider
served it.  The tunnels' private keys are kept apart, one per provider
(L{omerta.tunnel.consumer_side.tunnel_key}).

Everything lives in C{<data-dir>/consumer.json}, mode 0600, rewritten
atomically; a read-modify-write holds an
exclusive lock on C{consumer.lock}, so two C{omerta vm} commands running at
once never lose each other's VMs.

Provider outcomes (a VM granted, refused, or no answer, and how long it
took) are folded into a per-provider reputation with the registry's own rule
(L{omerta.mesh.registry.PeerRegistry.record_outcome});
L{omerta.roles.consumer_client.ConsumerClient.find_provider} (C{omerta vm
request --find}) seeds the registry with them, so the best-served providers
rank first.  This module is only the store; the client that talks to
providers is L{omerta.roles.consumer_client}.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from omerta import storage

STATE_FILE = "consumer.json"
LOCK_FILE = "consumer.lock"
VERSION = 2
_DROPPED_IN_2 = ("wg_private_key", "provider_endpoint")
"""Version 1 kept a WireGuard key per VM and the provider's endpoint."""


class ConsumerStateError(storage.StateFileError):
    pass


@dataclass
class HeldVM:
    vm_id: str
    provider: str
    """The provider's peer id, hex."""
    provider_name: str
    network: str
    created_at: float
    vcpus: int
    memory_mb: int
    disk_gb: int
    image: str
    name: str
    state: str
    address: str | None
    wg_public_key: str
    """This consumer's WireGuard public key for the provider."""
    provider_wg_key: str
    path_kind: str
    tunnel_address: str | None = None
    """This consumer's address in the provider's tunnel subnet."""
    provider_tunnel_address: str | None = None
    tunnel_prefix: int = 0
    host_key: str | None = None
    """The guest's SSH host key line, as the guest reported it."""
    ssh_key: str | None = None
    """The private key file to log in with."""

    def public(self) -> dict:
        """What is printed (nothing here is secret: the key files stay on disk)."""
        return asdict(self)


@dataclass
class ProviderScore:
    reputation: float
    successes: int = 0
    failures: int = 0
    last_latency_s: float | None = None
    last_outcome_at: float | None = None


@dataclass
class ConsumerState:
    vms: dict[str, HeldVM] = field(default_factory=dict)
    providers: dict[str, ProviderScore] = field(default_factory=dict)

    def find(self, ref: str) -> HeldVM:
        """
        A held VM by id or unique id prefix.

        @raise LookupError: none, or more than one.
        """
        ref = ref.strip().lower()
        if ref in self.vms:
            return self.vms[ref]
        matches = [v for v in self.vms.values() if v.vm_id.startswith(ref)] if ref else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            held = ", ".join(sorted(self.vms)) or "none"
            raise LookupError(f"no VM {ref!r} held here (held: {held}); 'omerta vm list' shows them")
        raise LookupError(f"{ref!r} matches {len(matches)} VMs: give more of the id")

    def record_outcome(self, provider: str, success: bool, latency: float | None,
                       now: float, reputation: float | None) -> None:
        """
        Note how a provider served us; C{reputation} is the registry's new
        score (None: keep the stored one).
        """
        score = self.providers.setdefault(provider, ProviderScore(reputation=0.5))
        if success:
            score.successes += 1
        else:
            score.failures += 1
        score.last_latency_s = None if latency is None else round(latency, 3)
        score.last_outcome_at = now
        if reputation is not None:
            score.reputation = round(reputation, 4)

    def as_document(self) -> dict:
        return {
            "version": VERSION,
            "vms": {k: asdict(v) for k, v in self.vms.items()},
            "providers": {k: asdict(v) for k, v in self.providers.items()},
        }

    @classmethod
    def from_document(cls, document: dict, path: Path) -> ConsumerState:
        if not isinstance(document, dict):
            raise ConsumerStateError(f"{path} is not a consumer state file (not a JSON"
                                     f" object); it was left untouched")
        if not document:
            return cls()
        if document.get("version") == 1:
            document = _from_version_1(document)
        if document.get("version") != VERSION:
            raise ConsumerStateError(
                f"{path} has version {document.get('version')!r}; this omerta reads"
                f" version {VERSION}. It was left untouched.")
        try:
            return cls(
                vms={k: HeldVM(**v) for k, v in document.get("vms", {}).items()},
                providers={k: ProviderScore(**v)
                           for k, v in document.get("providers", {}).items()},
            )
        except (TypeError, AttributeError) as e:  # a field of the wrong kind
            raise ConsumerStateError(f"{path} is not a consumer state file ({e});"
                                     f" it was left untouched") from None


def _from_version_1(document: dict) -> dict:
    vms = {}
    for vm_id, vm in (document.get("vms") or {}).items():
        if isinstance(vm, dict):
            vm = {k: v for k, v in vm.items() if k not in _DROPPED_IN_2}
        vms[vm_id] = vm
    return dict(document, version=VERSION, vms=vms)


class ConsumerStore:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / STATE_FILE

    def load(self) -> ConsumerState:
        if self.path.exists():
            storage.check_private(self.path)
        return ConsumerState.from_document(storage.read_json(self.path, dict), self.path)

    @contextlib.contextmanager
    def update(self) -> Iterator[ConsumerState]:
        """
        Load, let the caller change, and save atomically, under the lock.
        Nothing is saved if the caller raises.
        """
        storage.ensure_private_dir(self.data_dir)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self.load()
            yield state
            storage.write_json(self.path, state.as_document())
        finally:
            os.close(fd)  # releases the lock
