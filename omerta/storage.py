"""
Crash-safe state files in a node's data directory.

Every state file is replaced atomically: the new content goes to a temporary
file in the same directory, is flushed and fsynced, renamed over the old file,
and the directory is fsynced so the rename itself survives a power cut.  A
reader therefore sees either the old file or the new one, never a torn write.

Readers never guess: a file that cannot be read or parsed raises
L{StateFileError} naming the file and what is wrong with it, and callers must
not overwrite such a file (the operator decides what to do with it).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class StateFileError(Exception):
    """
    A state file exists but cannot be used; the message names the file and
    says what an operator can do about it.
    """


def ensure_private_dir(path: Path) -> Path:
    """
    Create C{path} (and parents) with mode 0700 if it does not exist.

    An existing directory keeps its mode: the operator may have chosen it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    return path


def atomic_write(
    path: Path,
    data: bytes,
    mode: int = PRIVATE_FILE_MODE,
    *,
    _before_rename: Callable[[Path], None] | None = None,
) -> None:
    """
    Replace C{path} with C{data} atomically (temp file, fsync, rename, fsync
    of the directory).

    @param mode: permission bits of the new file, applied before any byte is
        written so a secret is never readable by others, even briefly.
    @param _before_rename: test hook called with the temporary path after the
        data is durable and before the rename (simulates a crash there).
    """
    path = Path(path)
    directory = path.parent
    remove_stale_temporaries(path)
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        if _before_rename is not None:
            _before_rename(tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """
    Delete the temporary files of C{path} that L{atomic_write} calls of
    processes no longer running left behind (killed between creating and
    renaming them).  Those of live processes (a write in progress) stay.

    @return: the files deleted.
    """
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):]
        if not (pid.isascii() and pid.isdigit()) or int(pid) <= 0 or int(pid) == os.getpid():
            continue
        if pid_alive(int(pid)):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_json(path: Path, document: Any, mode: int = PRIVATE_FILE_MODE) -> None:
    """
    Atomically write C{document} as indented JSON.
    """
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    atomic_write(path, text.encode("utf-8"), mode)


def read_json(path: Path, default: Callable[[], Any]) -> Any:
    """
    Read a JSON state file.

    @param default: called for the value of a file that does not exist yet.
    @raise StateFileError: the file exists but is unreadable or not JSON.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default()
    except OSError as e:
        raise StateFileError(f"cannot read {path}: {e.strerror}") from e
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(
            f"{path} is corrupt ({e}); it was left untouched: restore it from"
            f" a backup or move it aside to start afresh"
        ) from e


def pid_alive(pid: int) -> bool:
    """
    Whether the process a state file names (by pid) still runs.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is gone too
        fields = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return fields.rpartition(")")[2].split()[:1] != ["Z"]


def check_private(path: Path) -> None:
    """
    Refuse a secret file that users other than its owner can read or write.

    @raise StateFileError: with the C{chmod} command that fixes it.
    """
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise StateFileError(
            f"{path} has mode {mode:04o}: it holds a secret and must not be"
            f" accessible to other users; run 'chmod 600 {path}'"
        )
