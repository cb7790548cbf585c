"""Megatron's MMIDIDX index files (`.idx` + `.bin`, as `megatron.core.datasets.indexed_dataset` reads them):
writing one atomically, and a memory-mapped read-only view (byte layout in FORMAT.md). Shard files are written
through `HashingFile`: a temporary name of the writer's own (megapack.atomic), hashed as it goes, renamed into
place on commit.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from megapack.atomic import create_temp
from megapack.errors import MegapackError

MMIDIDX_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron.core.datasets.indexed_dataset.DType).
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4, np.dtype(np.uint16): 8}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class HashingFile:
    """A binary file written under a temporary name of its own (`.<name>.<hex>.tmp`: never another writer's), hashed
    as it goes, renamed into place on commit."""

    def __init__(self, path: Path):
        self.path = path
        fd, self.tmp = create_temp(path)
        self.file = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes (and hash them)."""
        self.file.write(data)
        self.sha.update(data)
        self.nbytes += len(data)

    def commit(self) -> str:
        """fsync, close and rename into place; returns the file's sha256."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.sha.hexdigest()

    def abort(self) -> None:
        """Close and remove this writer's temporary file."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_idx(path: Path, dtype: np.dtype, padded_lengths: np.ndarray, doc_index: np.ndarray) -> tuple[str, int]:
    """Write one MMIDIDX .idx file atomically (its sequence lengths are the segments' padded lengths); returns its
    sha256 and byte size."""
    out = HashingFile(path)
    try:
        pointers = np.zeros(len(padded_lengths), dtype=np.int64)
        if len(padded_lengths) > 1:
            np.cumsum(padded_lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
        out.write(MMIDIDX_HEADER + struct.pack("<QB", 1, DTYPE_CODES[dtype]))
        out.write(struct.pack("<QQ", len(padded_lengths), len(doc_index)))
        out.write(np.ascontiguousarray(padded_lengths, dtype="<i4").tobytes())
        out.write(pointers.astype("<i8").tobytes())
        out.write(np.ascontiguousarray(doc_index, dtype="<i8").tobytes())
        return out.commit(), out.nbytes
    except BaseException:
        out.abort()
        raise


class MMIndex:
    """A read-only view of one MMIDIDX .idx file and its .bin (memory-mapped, opened lazily)."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        idx_path = Path(f"{prefix}.idx")
        try:
            raw = np.memmap(idx_path, mode="r", dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise MegapackError(f"{idx_path}: cannot read the shard index ({exc})") from None
        if len(raw) < 34 or bytes(raw[:9]) != MMIDIDX_HEADER:
            raise MegapackError(f"{idx_path}: not a MMIDIDX index file (bad header)")
        version, code = struct.unpack("<QB", bytes(raw[9:18]))
        nseq, ndoc = struct.unpack("<QQ", bytes(raw[18:34]))
        if version != 1 or code not in CODE_DTYPES:
            raise MegapackError(f"{idx_path}: unsupported MMIDIDX version {version} or dtype code {code}")
        self.dtype = CODE_DTYPES[code]
        off = 34
        need = off + nseq * 4 + nseq * 8 + ndoc * 8
        if len(raw) < need:
            raise MegapackError(f"{idx_path}: truncated ({len(raw)} bytes, expected at least {need})")
        # the .idx "sequence lengths": one per segment, its padded length
        self.padded_lengths = np.frombuffer(raw, dtype="<i4", count=nseq, offset=off)
        self.seq_pointers = np.frombuffer(raw, dtype="<i8", count=nseq, offset=off + 4 * nseq)
        self.doc_index = np.frombuffer(raw, dtype="<i8", count=ndoc, offset=off + 12 * nseq)
        self._bin = None

    @property
    def bin(self) -> np.ndarray:
        """The .bin file as a flat array of this index's dtype."""
        if self._bin is None:
            path = Path(f"{self.prefix}.bin")
            try:
                empty = not path.stat().st_size
                self._bin = np.zeros(0, self.dtype) if empty else np.memmap(path, mode="r", dtype=self.dtype)
            except OSError as exc:
                raise MegapackError(f"{path}: cannot read the shard data ({exc.strerror or exc})") from None
        return self._bin

    def __len__(self) -> int:
        return len(self.doc_index) - 1

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, padded segment lengths) of document i (one pack)."""
        a, b = int(self.doc_index[i]), int(self.doc_index[i + 1])
        lengths = self.padded_lengths[a:b]
        if a == b:
            return self.bin[0:0], lengths
        start = int(self.seq_pointers[a]) // self.dtype.itemsize
        return self.bin[start : start + int(lengths.sum())], lengths
