"""Atomic file writes shared by every stage: a temporary name in the same folder, fsync, then rename.

The temporary file is created with mode 0o666 and the kernel applies the umask (and a default ACL) as for open(),
so the renamed file gets the permissions any other file written by the same process gets (0644 under umask 022).
`tempfile.mkstemp` would create it 0600, and reading the umask to chmod afterwards is racy in threaded programs.

Every temporary name is `.<name>.<random hex>.tmp`, created exclusively: two processes writing the same file (on two
hosts of a shared file system, perhaps with the same pid) never share one, and a writer that fails removes only its
own. `temp_target` tells which final name a leftover temporary name stands for, for the cleanups that remove them.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_UMASK_LOCK = threading.Lock()
_TEMP_RE = re.compile(r"\.(.+)\.[0-9a-f]+\.tmp")


def current_umask() -> int:
    """The process umask, read from /proc without changing it (Linux), else set and restored under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it: other threads may create files meanwhile
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def chmod_default(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file a library created 0600 (safetensors' save_file), or a directory mkdtemp created 0700, the mode
    open()/mkdir() give: 0o666 (directories 0o777) minus the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh random temporary name beside `path`: `.<name>.<16 hex digits>.tmp` (not created)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def temp_target(name: str) -> str | None:
    """The final file name a temporary name of this module stands for (`.NAME.<hex>.tmp` -> NAME), else None."""
    match = _TEMP_RE.fullmatch(name)
    return match[1] if match else None


def create_temp(path: str | os.PathLike) -> tuple[int, Path]:
    """Create a new hidden temporary file beside `path` (mode 0o666 minus the umask); returns (fd, temp path)."""
    path = Path(path)
    for _ in range(100):
        tmp = temp_name(path)
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def create_temp_dir(path: str | os.PathLike) -> Path:
    """Create a new hidden temporary folder beside `path` (mode 0o777 minus the umask, parents made); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = temp_name(path)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def write_atomic(path: str | os.PathLike, produce: Callable[[BinaryIO], object]) -> None:
    """Write a file so that readers see the old one or the whole new one: `produce(fh)` writes the bytes into a
    temporary file of this writer's own (create_temp), fsynced and renamed into place, or removed on any failure."""
    path = Path(path)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            produce(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write()/fsync() names no file: name the one being written
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def json_safe(obj):
    """obj with every non-finite float (NaN, ±inf: not JSON) replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj, indent: int | None = None) -> str:
    """Strict JSON text of obj (non-finite floats become null; never NaN or Infinity)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: dict, indent: int = 2) -> None:
    """Write obj as strict JSON (plus a final newline) atomically."""
    write_text_atomic(path, dumps_json(obj, indent=indent) + "\n")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes available to this user on the file system holding `path` (None when it cannot be told)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def describe_os_error(exc: OSError, path: str | os.PathLike, doing: str, needed: int | None = None,
                      free: int | None = None) -> str:
    """One line for a failed file operation: the file (exc.filename, else `path`), the system's reason, what was
    being done and, for a full disk, the bytes needed and free where known."""
    where = exc.filename if exc.filename is not None else path
    line = f"{where}: {exc.strerror or exc} {doing}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        sizes = ([f"about {needed:,} bytes needed"] if needed is not None else []) + (
            [f"{free:,} bytes were free"] if free is not None else [])
        line += f" ({', '.join(sizes)})" if sizes else ""
    return line
