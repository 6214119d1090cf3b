"""File operations every part shares: atomic writes, JSONL appends, an exclusive lock.

A file is written to a temporary name beside it, synced and renamed over the real name, so a
crash leaves either the old file or the new one, never half of one. JSONL records are
appended, flushed and synced one call at a time.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], object], *, durable: bool = True) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    With ``durable`` the file and the rename are synced to disk first (not every filesystem
    lets a directory be synced; there the rename is left to the kernel). A file that can be
    rebuilt (an image cache) skips it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _sync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` atomically; a private file is created 0600 (others: the umask's)."""

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str, *, private: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), private=private)


def append_jsonl(path: str | Path, records: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
    """Append one record, or several, as JSON lines; flushed and synced before returning."""
    rows = [records] if isinstance(records, Mapping) else list(records)
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, default=str) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LockHeld(RuntimeError):
    """The lock is held by another live process (``holder``: its process id, or '?')."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by process {holder}")
        self.path, self.holder = path, holder


class ExclusiveLock:
    """An exclusive ``flock`` on ``path``, which records the holder's process id.

    The kernel drops the lock when its holder dies, so a killed process never blocks the
    next. ``wait_s`` is how long to wait for a holder that is on its way out.
    """

    def __init__(self, path: Path, wait_s: float = 0.0) -> None:
        self.path, self.wait_s = path, wait_s
        self._fd: int | None = None

    def __enter__(self) -> ExclusiveLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise LockHeld(self.path, holder) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
