"""File checksums shared by every stage (shard verification, pinned assets)."""
from __future__ import annotations

import hashlib
import os

BLOCK_BYTES = 1 << 22  # read size: large enough for disk throughput, small enough to keep memory flat


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
