"""Packed shards: Megatron MMIDIDX token files plus a uint8 loss-mask twin and the real length of every segment;
one sequence per segment, one document per pack (byte layout in FORMAT.md). `ShardWriter` streams packs into bounded
shard files, `ShardDataset` reads them.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapack.errors import MegapackError

FORMAT_VERSION = 2
META_NAME = "meta.json"
MMIDIDX_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron.core.datasets.indexed_dataset.DType).
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4, np.dtype(np.uint16): 8}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
DEFAULT_MAX_SHARD_TOKENS = 1 << 30
REAL_LENGTHS_SUFFIX = "real_lengths.bin"  # int32 per segment: its tokens before the pad_to_multiple padding
SHARD_FILE_SUFFIXES = ("tokens.bin", "tokens.idx", "mask.bin", "mask.idx", REAL_LENGTHS_SUFFIX, "continues.bin")
SPLITS = ("train", "val")


def is_shard_file(name: str) -> bool:
    """Whether a file name is one of a shard's files (or its temporary name while written)."""
    base = name.removesuffix(".tmp")
    split, _, rest = base.partition("-")
    return split in SPLITS and any(rest.endswith("." + suffix) for suffix in SHARD_FILE_SUFFIXES)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def shard_prefix(split: str, index: int) -> str:
    """File-name prefix of shard `index` of `split`, e.g. train-00000."""
    return f"{split}-{index:05d}"


class _HashingFile:
    """A binary file written under a temporary name, hashed as it goes, renamed into place on commit."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.nbytes += len(data)

    def commit(self) -> str:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.sha.hexdigest()

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _write_idx(path: Path, dtype: np.dtype, seq_lengths: np.ndarray, doc_index: np.ndarray) -> tuple[str, int]:
    """Write one MMIDIDX .idx file atomically; returns its sha256 and byte size."""
    out = _HashingFile(path)
    try:
        pointers = np.zeros(len(seq_lengths), dtype=np.int64)
        if len(seq_lengths) > 1:
            np.cumsum(seq_lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
        out.write(MMIDIDX_HEADER + struct.pack("<QB", 1, DTYPE_CODES[dtype]))
        out.write(struct.pack("<QQ", len(seq_lengths), len(doc_index)))
        out.write(np.ascontiguousarray(seq_lengths, dtype="<i4").tobytes())
        out.write(pointers.astype("<i8").tobytes())
        out.write(np.ascontiguousarray(doc_index, dtype="<i8").tobytes())
        return out.commit(), out.nbytes
    except BaseException:
        out.abort()
        raise


class ShardWriter:
    """Streams packs of one split into shard files of at most `max_shard_tokens` tokens (a pack is never split)."""

    def __init__(self, out_dir: str | Path, split: str, dtype: np.dtype, max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
                 continuation: bool = False):
        self.out_dir, self.split, self.dtype = Path(out_dir), split, np.dtype(dtype)
        self.max_shard_tokens = max_shard_tokens
        self.continuation = continuation  # write <prefix>.continues.bin (one byte per pack), for `random` packing
        # per finished shard: prefix, num_packs, num_tokens, files {name: sha256}, file_bytes {name: size}
        self.shards: list[dict] = []
        self._open = False

    def _start(self) -> None:
        prefix = shard_prefix(self.split, len(self.shards))
        self._prefix = prefix
        self._tok = _HashingFile(self.out_dir / f"{prefix}.tokens.bin")
        self._mask = _HashingFile(self.out_dir / f"{prefix}.mask.bin")
        self._cont = _HashingFile(self.out_dir / f"{prefix}.continues.bin") if self.continuation else None
        self._real = _HashingFile(self.out_dir / f"{prefix}.{REAL_LENGTHS_SUFFIX}")
        self._seq_lengths: list[np.ndarray] = []
        self._doc_ends: list[int] = [0]
        self._num_seqs = 0
        self._tokens = 0
        self._open = True

    def add_pack(self, tokens: np.ndarray, mask: np.ndarray, seg_lengths: np.ndarray,
                 real_lengths: np.ndarray | None = None) -> None:
        """Append one pack: its tokens, loss mask (same length), padded segment lengths (summing to that length)
        and real segment lengths (default: no padding)."""
        self.add_packs(tokens, mask, seg_lengths, np.array([len(seg_lengths)]), real_lengths=real_lengths)

    def add_packs(self, tokens: np.ndarray, mask: np.ndarray, seg_lengths: np.ndarray, segs_per_pack: np.ndarray,
                  continues: np.ndarray | None = None, real_lengths: np.ndarray | None = None) -> None:
        """Append several packs laid end to end; pack k has segs_per_pack[k] segments of seg_lengths (padded) whose
        first real_lengths tokens are the conversation and, with `continuation`, continues[k] says whether its first
        segment carries on the previous pack's last conversation."""
        if self.continuation and (continues is None or len(continues) != len(segs_per_pack)):
            raise ValueError("a continuation writer needs one `continues` flag per pack")
        seg_lengths = np.asarray(seg_lengths, dtype=np.int64)
        real_lengths = seg_lengths if real_lengths is None else np.asarray(real_lengths, dtype=np.int64)
        if real_lengths.shape != seg_lengths.shape or np.any(real_lengths > seg_lengths) or np.any(real_lengths < 0):
            raise ValueError("real segment lengths must be one per segment, between 0 and the padded length")
        seg_end = np.cumsum(segs_per_pack)
        seg_tok_end = np.concatenate([[0], np.cumsum(seg_lengths)])
        pack_tok_end = seg_tok_end[seg_end]
        if len(tokens) != len(mask) or (len(seg_end) and pack_tok_end[-1] != len(tokens)):
            raise ValueError(f"{len(tokens)} tokens, {len(mask)} mask values, segments summing to {seg_tok_end[-1]}")
        if np.any(np.diff(np.concatenate([[0], pack_tok_end])) <= 0):
            raise ValueError("empty pack")
        k, t0 = 0, 0
        while k < len(seg_end):
            if not self._open:
                self._start()
            room = self.max_shard_tokens - self._tokens
            fit = int(np.searchsorted(pack_tok_end[k:], t0 + room, side="right"))
            if fit == 0 and self._tokens:
                self._finish()
                continue
            fit = max(fit, 1)  # a pack larger than a whole shard still gets a shard of its own
            s0 = int(seg_end[k - 1]) if k else 0
            s1 = int(seg_end[k + fit - 1])
            t1 = int(pack_tok_end[k + fit - 1])
            self._tok.write(np.ascontiguousarray(tokens[t0:t1], dtype=self.dtype.newbyteorder("<")).tobytes())
            self._mask.write(np.ascontiguousarray(mask[t0:t1], dtype=np.uint8).tobytes())
            if self._cont is not None:
                self._cont.write(np.asarray(continues[k : k + fit], dtype=np.uint8).tobytes())
            self._real.write(real_lengths[s0:s1].astype("<i4").tobytes())
            self._seq_lengths.append(seg_lengths[s0:s1].astype(np.int32))
            self._doc_ends.extend((seg_end[k : k + fit] - s0 + self._num_seqs).tolist())
            self._num_seqs += s1 - s0
            self._tokens += t1 - t0
            k, t0 = k + fit, t1

    def _finish(self) -> None:
        lengths = np.concatenate(self._seq_lengths) if self._seq_lengths else np.zeros(0, np.int32)
        docs = np.asarray(self._doc_ends, dtype=np.int64)
        p = self._prefix
        written = {
            f"{p}.tokens.bin": (self._tok.commit(), self._tok.nbytes),
            f"{p}.mask.bin": (self._mask.commit(), self._mask.nbytes),
            f"{p}.tokens.idx": _write_idx(self.out_dir / f"{p}.tokens.idx", self.dtype, lengths, docs),
            f"{p}.mask.idx": _write_idx(self.out_dir / f"{p}.mask.idx", np.dtype(np.uint8), lengths, docs),
            f"{p}.{REAL_LENGTHS_SUFFIX}": (self._real.commit(), self._real.nbytes),
        }
        if self._cont is not None:
            written[f"{p}.continues.bin"] = (self._cont.commit(), self._cont.nbytes)
        self.shards.append({"prefix": p, "num_packs": len(docs) - 1, "num_tokens": self._tokens,
                            "files": {name: sha for name, (sha, _) in written.items()},
                            "file_bytes": {name: size for name, (_, size) in written.items()}})
        self._open = False

    def close(self) -> list[dict]:
        """Finish the last shard; returns the list of shards written."""
        if self._open:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary files)."""
        if self._open:
            self._tok.abort()
            self._mask.abort()
            self._real.abort()
            if self._cont is not None:
                self._cont.abort()
            self._open = False


@dataclass
class Pack:
    """One row of at most seq_length tokens: its segments' tokens, loss mask, real and padded boundaries.

    Segment k occupies tokens[cu_seqlens_padded[k]:cu_seqlens_padded[k+1]]; its first
    cu_seqlens[k+1] - cu_seqlens[k] tokens are the conversation, the rest `pad_id` padding (loss mask 0).
    This is Transformer Engine's THD convention: cu_seqlens counts real tokens, cu_seqlens_padded locates them.
    """

    tokens: np.ndarray  # int64 [n] (n <= seq_length; segments padded to pad_to_multiple, the row is not)
    loss_mask: np.ndarray  # uint8 [n] (1 = token i is a trained target)
    cu_seqlens: np.ndarray  # int32 [num_segments + 1]: cumulative real segment lengths
    cu_seqlens_padded: np.ndarray  # int32 [num_segments + 1]: cumulative padded lengths, ends at n
    continues: bool = False  # `random` packing: the first segment is the rest of a conversation cut in the last pack

    @property
    def real_lengths(self) -> np.ndarray:
        """Tokens of each segment without its padding."""
        return np.diff(self.cu_seqlens)

    @property
    def padded_lengths(self) -> np.ndarray:
        """Tokens of each segment with its padding."""
        return np.diff(self.cu_seqlens_padded)


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
        self.seq_lengths = np.frombuffer(raw, dtype="<i4", count=nseq, offset=off)
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
        """(values, segment lengths) of document i."""
        a, b = int(self.doc_index[i]), int(self.doc_index[i + 1])
        lengths = self.seq_lengths[a:b]
        if a == b:
            return self.bin[0:0], lengths
        start = int(self.seq_pointers[a]) // self.dtype.itemsize
        return self.bin[start : start + int(lengths.sum())], lengths


def read_meta(path: str | Path) -> dict:
    """The parsed meta.json of a shard directory (MegapackError if it is missing: the directory is incomplete)."""
    meta_path = Path(path) / META_NAME
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise MegapackError(f"{meta_path}: not found; {path} is not a finished megapack shard directory") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise MegapackError(f"{meta_path}: unreadable ({exc})") from None
    version = meta.get("format_version")
    if version == 1:
        raise MegapackError(f"{meta_path}: format_version 1 shards do not record real segment lengths; rerun "
                            f"`megapack preprocess` with this version to write format_version {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise MegapackError(f"{meta_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    return meta


class ShardDataset:
    """Random access to the packs of one split of a preprocess output directory."""

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.split = split
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise MegapackError(f"{self.path / META_NAME}: no split {split!r} (has: {', '.join(splits) or 'none'})")
        self._shards = [s["prefix"] for s in splits[split]["shards"]]
        counts = [int(s["num_packs"]) for s in splits[split]["shards"]]
        self._cum = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._open: dict[int, _OpenShard] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened in the receiving process
        return state

    def __len__(self) -> int:
        return int(self._cum[-1])

    def _shard(self, k: int) -> "_OpenShard":
        if k not in self._open:
            self._open[k] = _OpenShard(self.path / self._shards[k])
        return self._open[k]

    def pack_lengths(self, real: bool = False) -> np.ndarray:
        """Tokens of every pack of the split (with segment padding, or only `real` ones), from index files only."""
        out = []
        for k in range(len(self._shards)):
            shard = self._shard(k)
            lengths = shard.real_lengths if real else shard.tokens.seq_lengths
            cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            doc = shard.tokens.doc_index
            out.append(cum[doc[1:]] - cum[doc[:-1]])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def __getitem__(self, i: int) -> Pack:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"pack {i} out of range for {n} packs")
        k = int(np.searchsorted(self._cum, i, side="right")) - 1
        shard = self._shard(k)
        j = i - int(self._cum[k])
        tokens, padded = shard.tokens.document(j)
        mask, _ = shard.mask.document(j)
        a, b = int(shard.tokens.doc_index[j]), int(shard.tokens.doc_index[j + 1])
        return Pack(
            tokens=tokens.astype(np.int64),
            loss_mask=np.array(mask, dtype=np.uint8),
            cu_seqlens=_cumulative(shard.real_lengths[a:b]),
            cu_seqlens_padded=_cumulative(padded),
            continues=bool(shard.continues[j]) if shard.continues is not None else False,
        )


def _cumulative(lengths: np.ndarray) -> np.ndarray:
    """[0, l0, l0+l1, ...] as int32."""
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return cu


class _OpenShard:
    """The files of one shard: token and mask indexes, real segment lengths, continuation flags (when present)."""

    def __init__(self, prefix: Path):
        self.tokens = MMIndex(Path(f"{prefix}.tokens"))
        self.mask = MMIndex(Path(f"{prefix}.mask"))
        self.tokens.bin, self.mask.bin  # noqa: B018 - a missing .bin: one line now, not a traceback at the first pack
        real_path = Path(f"{prefix}.{REAL_LENGTHS_SUFFIX}")
        try:
            self.real_lengths = np.fromfile(real_path, dtype="<i4")
        except OSError as exc:
            raise MegapackError(f"{real_path}: cannot read the real segment lengths ({exc})") from None
        if len(self.real_lengths) != len(self.tokens.seq_lengths):
            raise MegapackError(f"{real_path}: {len(self.real_lengths)} lengths for "
                                f"{len(self.tokens.seq_lengths)} segments in {prefix}.tokens.idx")
        cont_path = Path(f"{prefix}.continues.bin")
        self.continues = np.fromfile(cont_path, dtype=np.uint8) if cont_path.is_file() else None
