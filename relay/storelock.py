"""One store, one running relay: an exclusive lock on ``<store path>.lock``.

``relay serve`` takes the lock in the parent before any worker starts and holds it for
the life of the process (workers inherit the open file, so the lock lasts while any of
them runs; with PR_SET_PDEATHSIG they die with the parent). A second ``relay serve`` on
the same store would requeue the live one's in-flight rows and deliver them a second
time, so it is refused with the PID written in the lock file.

flock(2) locks belong to the open file description and vanish when the last process
holding it exits, even by kill -9: a stale lock file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from relay.errors import StartupError


class StoreLocked(StartupError):
    """Another running relay holds the store."""

    def __init__(self, store: Path, pid: int | None) -> None:
        self.store = store
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"store {store} is in use by another relay ({holder})")


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class StoreLock:
    """The exclusive lock on one store, held until release() or process exit."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = lock_path(store)
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        """Take the lock and write our PID in it; raise StoreLocked naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"cannot create lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise StoreLocked(self.store, pid) from None
        except OSError as exc:
            os.close(fd)
            raise StartupError(f"cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor drops the flock


__all__ = ["StoreLock", "StoreLocked", "lock_path"]
