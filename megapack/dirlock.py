"""One writer per output directory: an `fcntl.flock` on a lock file beside the directory.

The lock file is `<parent>/.<name>.megapack.lock`: beside the directory, not in it, so that removing a failed run's
directory never removes a lock another process holds, and the file never counts as one of the directory's files
(shards, checksums, cleanup). It is never deleted. The holder writes one line into it (host, pid, start time).
flock is released by the kernel when the holding process dies, so a lock file whose flock can be taken is stale by
definition: its old holder line is reported in a warning and the lock is taken over.

Relies on flock(2): local file systems, NFS (v4, or v3 with lockd) and Lustre mounted with `-o flock`.
Base layer: imports only megapack.errors and megapack.atomic.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from megapack.errors import MegapackError

SUFFIX = ".megapack.lock"


def lock_path(directory: str | os.PathLike) -> Path:
    d = Path(directory).absolute()
    return d.parent / f".{d.name}{SUFFIX}"


def _holder_line() -> str:
    return f"host {socket.gethostname()}, pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


class DirLock:
    """Exclusive (or shared, for parallel partition tasks of one job) lock on a directory; `acquire` raises a
    one-line MegapackError naming the directory and the holder when another live process holds it."""

    def __init__(self, directory: str | os.PathLike, what: str, shared: bool = False) -> None:
        self.directory = Path(directory)
        self.what = what
        self.shared = shared
        self.path = lock_path(directory)
        self.fd: int | None = None
        self.warning: str | None = None

    def refusal(self, holder: str) -> str:
        return (f"{self.what} {self.directory}: in use by another run ({holder or 'holder unknown'}; lock file "
                f"{self.path}); wait for it to finish or choose another directory")

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a stale lock (its holder gone) was taken over, else None."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise MegapackError(f"{self.what} {self.directory}: not writable (cannot create the lock file {self.path}: "
                                f"{exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise MegapackError(self.refusal(holder)) from None
        except OSError as exc:
            os.close(fd)
            raise MegapackError(f"{self.what} {self.directory}: cannot lock {self.path} ({exc.strerror or exc}; "
                                "the file system must support flock, e.g. Lustre mounted with -o flock)") from None
        self.fd = fd
        if self.shared:
            return None
        old = _read_holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_line() + "\n").encode(), 0)
        if old:
            return f"{self.what} {self.directory}: took over a stale lock (its holder is gone: {old})"
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if not self.shared:
                os.ftruncate(fd, 0)  # a cleanly released lock leaves no holder line: it is not stale
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> "DirLock":
        self.warning = self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(directory: str | os.PathLike, what: str) -> None:
    """Raise the one-line refusal when a live process holds `directory`'s lock (for --check); takes nothing."""
    path = lock_path(directory)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MegapackError(DirLock(directory, what).refusal(_read_holder(fd))) from None
        except OSError:
            return
    finally:
        os.close(fd)
