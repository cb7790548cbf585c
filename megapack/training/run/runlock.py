"""One training per output directory: rank 0 holds megapack.dirlock's lock on checkpoint.dir and logging.dir for
the whole run; a refusal reaches every rank (broadcast), so all stop with the same one line instead of hanging."""
from __future__ import annotations

from megapack.dirlock import DirLock, lock_path
from megapack.errors import MegapackError


def run_dirs(config) -> list[tuple[str, str]]:
    """(key, directory) of the directories a run writes, each lock file once."""
    seen, dirs = set(), []
    for key, value in (("checkpoint.dir", config.checkpoint.dir), ("logging.dir", config.logging.dir)):
        if value and lock_path(value) not in seen:
            seen.add(lock_path(value))
            dirs.append((key, value))
    return dirs


def lock_run_dirs(config, rank: int) -> tuple[list[DirLock], list[str]]:
    """Collective: rank 0 takes the locks; returns (locks held, stale-lock warnings), or raises the same one-line
    MegapackError on every rank when another live run holds one of the directories (or a lock cannot be taken)."""
    import torch.distributed as dist

    locks, warnings, refusal = [], [], None
    if rank == 0:
        key, directory = "", ""
        try:
            for key, directory in run_dirs(config):
                locks.append(DirLock(directory, key))  # before acquire: one that fails half-way is released too
                warning = locks[-1].acquire()
                warnings += [warning] if warning else []
        except Exception as exc:  # any failure reaches every rank as one line (others would wait in the broadcast)
            release(locks)
            locks, refusal = [], (str(exc) if isinstance(exc, MegapackError) else
                                  f"{key} {directory}: cannot take its lock ({describe(exc)})")
    box = [refusal]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise MegapackError(box[0])
    return locks, warnings


def describe(exc: Exception) -> str:
    """An exception in a few words: an OSError's reason and file, else its type and message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def release(locks: list[DirLock]) -> None:
    """Release the locks lock_run_dirs took (each once; a released lock is left alone)."""
    for lock in locks:
        lock.release()
