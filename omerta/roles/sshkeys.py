"""
The SSH side of a held VM: which key logs in, the guest's host key in a
known_hosts file of the consumer's own, and the ssh command line.

    identity = choose_identity(None, data_dir)   # ~/.ssh/id_ed25519, else made here
    ... request the VM with identity.public_line ...
    identity = identity.keep_for(vm_id)           # a made key is named after its VM
    remember_host_key(data_dir, "10.237.0.2", "ssh-ed25519 AAAA...")
    ssh_argv(data_dir, held)                      # ['ssh', '-i', ..., 'omerta@10.237.0.2']

Keys made here live in C{DATA_DIR/ssh/} (0700), private halves 0600, in
OpenSSH format; C{DATA_DIR/ssh/known_hosts} holds one line per guest
address, rewritten atomically when a guest reports its key.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption,
                                                          PrivateFormat, PublicFormat)

from omerta import storage
from omerta.roles.guest import SSH_KEY_TYPES as KEY_TYPES  # what the guest accepts

USER = "omerta"
_LINE = re.compile(r"(?P<type>[a-z0-9-]+) (?P<blob>[A-Za-z0-9+/]+={0,2})( [^\n]*)?")


class SshKeyError(Exception):
    """A key file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Identity:
    """A key pair to log into a guest with."""

    private_path: Path
    public_line: str
    made_here: bool = False

    def keep_for(self, data_dir: Path, vm_id: str) -> Identity:
        """A key made for a request takes its VM's name once granted."""
        if not self.made_here:
            return self
        target = ssh_dir(data_dir) / f"{vm_id}"
        os.replace(self.private_path, target)
        os.replace(f"{self.private_path}.pub", f"{target}.pub")
        return Identity(target, self.public_line, True)


def ssh_dir(data_dir: Path) -> Path:
    path = Path(data_dir) / "ssh"
    storage.ensure_private_dir(path)
    return path


def public_line(text: str) -> str:
    """
    The C{type base64 [comment]} line of a public key, checked.

    @raise SshKeyError: not one line of a key type guests accept.
    """
    line = text.strip()
    match = _LINE.fullmatch(line)
    if "\n" in line or match is None or match["type"] not in KEY_TYPES:
        raise SshKeyError(f"not an SSH public key line of a type the guest accepts"
                          f" ({', '.join(KEY_TYPES)})")
    return f"{match['type']} {match['blob']}"


def choose_identity(path: str | None, data_dir: Path, home: Path | None = None) -> Identity:
    """
    The key to log in with: C{path} (a private key or its C{.pub}), else
    C{~/.ssh/id_ed25519}, else a new ed25519 key made in C{DATA_DIR/ssh}.

    @raise SshKeyError: C{path} given but unusable.
    """
    if path is not None:
        given = Path(path).expanduser()
        private = given.with_suffix("") if given.suffix == ".pub" else given
        public = Path(f"{private}.pub")
        try:
            text = public.read_text()
        except OSError as e:
            raise SshKeyError(f"--ssh-key {path}: cannot read the public key {public}:"
                              f" {e.strerror}") from None
        try:
            return Identity(private.resolve(), public_line(text))
        except SshKeyError as e:
            raise SshKeyError(f"--ssh-key {path}: {public}: {e}") from None
    home = Path.home() if home is None else home
    default = home / ".ssh" / "id_ed25519"
    try:
        return Identity(default, public_line(Path(f"{default}.pub").read_text()))
    except (OSError, SshKeyError):
        return make_identity(data_dir)


def make_identity(data_dir: Path) -> Identity:
    """A new ed25519 key pair in C{DATA_DIR/ssh}, private half 0600."""
    key = Ed25519PrivateKey.generate()
    path = ssh_dir(data_dir) / f"pending-{secrets.token_hex(6)}"
    storage.atomic_write(path, key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH,
                                                 NoEncryption()))
    line = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    storage.atomic_write(Path(f"{path}.pub"), (line + " omerta\n").encode())
    return Identity(path, line, made_here=True)


def forget_identity(data_dir: Path, vm_id: str) -> None:
    """The key made for a VM goes with it."""
    for name in (vm_id, f"{vm_id}.pub"):
        try:
            (Path(data_dir) / "ssh" / name).unlink()
        except FileNotFoundError:
            pass


def known_hosts(data_dir: Path) -> Path:
    return Path(data_dir) / "ssh" / "known_hosts"


def remember_host_key(data_dir: Path, address: str, host_key: str) -> None:
    """The guest at C{address} has C{host_key}: the one line for it."""
    line = public_line(host_key)
    path = known_hosts(data_dir)
    ssh_dir(data_dir)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    kept = [entry for entry in lines if entry.split(" ", 1)[0] != address]
    storage.atomic_write(path, ("\n".join(kept + [f"{address} {line}"]) + "\n").encode())


def forget_host(data_dir: Path, address: str) -> None:
    path = known_hosts(data_dir)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    kept = [entry for entry in lines if entry.split(" ", 1)[0] != address]
    storage.atomic_write(path, "".join(f"{entry}\n" for entry in kept).encode())


def ssh_argv(data_dir: Path, address: str, key: str | None) -> list[str]:
    """The ssh command that logs into the guest at C{address}."""
    argv = ["ssh"]
    if key:
        argv += ["-i", key, "-o", "IdentitiesOnly=yes"]
    argv += ["-o", f"UserKnownHostsFile={known_hosts(data_dir)}",
             "-o", "StrictHostKeyChecking=yes", f"{USER}@{address}"]
    return argv
