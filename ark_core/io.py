"""File operations every part shares: an exclusive lock on a directory's lock file."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


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
