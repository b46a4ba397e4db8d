"""An exclusive lock on a run directory, so two processes never write one run at once.

``RUN/.lock`` is held with ``fcntl.flock`` (released by the kernel when the process ends,
however it ends) and records the holder's pid, host and start time. A lock file left behind
by a crashed process is not locked any more: the next writer takes it over and reports the
stale holder (:attr:`RunLock.stale`).

    with RunLock(run_dir):      # RunDirLockedError if another process holds it
        ...write the run...
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK", "RunDirLockedError", "RunLock", "live_holder"]

LOCK = ".lock"


class RunDirLockedError(FileExistsError):
    """Another live process is writing this run directory."""


class RunLock:
    """Exclusive, non-blocking lock on ``run_dir`` (created if missing)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.stale: str | None = None  # what a crashed holder left in the lock file
        self._fd: int | None = None
        self._stale_noted = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def stale_note(self) -> str | None:
        """The note to print when this lock was taken over from a process that ended
        without unlocking, the first time it is asked for; None afterwards and when there
        was no stale holder (the lock may be acquired, or checked, more than once per run)."""
        if self.stale is None or self._stale_noted:
            return None
        self._stale_noted = True
        return (f"{self.run_dir} was left locked by a process that ended without unlocking "
                f"({self.stale}); taking it over")

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            return self._acquire_exclusive_create()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(fd)
                os.close(fd)
                raise RunDirLockedError(self._busy_message(holder)) from None
            try:  # the holder before us may have removed the file between open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.stale = _read(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_line().encode(), 0)
        self._fd = fd
        return self

    def _acquire_exclusive_create(self) -> RunLock:  # pragma: no cover - non-POSIX fallback
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = self.path.read_text(errors="replace").strip()
            raise RunDirLockedError(self._busy_message(holder) + f" (if that process is gone, "
                                    f"delete {self.path})") from None
        os.write(fd, _holder_line().encode())
        self._fd = fd
        return self

    def _busy_message(self, holder: str) -> str:
        who = f" ({holder})" if holder else ""
        return (f"run directory {self.run_dir} is being written by another moelab process"
                f"{who}; wait for it to finish, or stop it (SIGINT/SIGTERM saves a checkpoint) "
                f"and then `moelab train --resume {self.run_dir}`")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still holding it: a waiting opener re-checks the inode
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closes -> unlocks
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # the kernel drops the lock; the file stays (stale, harmless)


def live_holder(run_dir: str | Path) -> str | None:
    """Who holds ``run_dir``'s lock right now (its pid line), or None when no live process
    does (no lock file, a stale one, or no flock here). Takes nothing: a shared lock is tried
    and dropped at once."""
    path = Path(run_dir) / LOCK
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read(fd) or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _holder_line() -> str:
    started = _dt.datetime.now().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n"
