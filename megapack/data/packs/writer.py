"""Turn tokenized records plus a pack assignment into shard files, streaming in bounded chunks.

Records live in flat per-part token/loss-mask sequences (the tokenize step's files, or in-memory arrays); a
`RecordStore` locates record i as (part, offset, length). Packs are written in chunks of about CHUNK_TOKENS tokens:
each segment is read straight into the chunk buffer (one positioned read per segment from files, one vectorized
index per part from arrays), so memory is bounded by the chunk, not by the dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapack import seeds
from megapack.atomic import write_json_atomic
from megapack.data.packs.packing import PackAssignment, assign_packs, lower_bound
from megapack.data.packs.shards import DEFAULT_MAX_SHARD_TOKENS, FORMAT_VERSION, META_NAME, ShardWriter, token_dtype

CHUNK_TOKENS = 1 << 22  # tokens gathered per write step (bounds memory)


@dataclass
class RecordStore:
    """Tokenized records: flat per-part arrays and, per record, its part, offset and length (all its tokens)."""

    tokens: list[np.ndarray]  # per part, flat token ids (empty when `files` is set)
    loss_masks: list[np.ndarray]  # per part, flat uint8 loss mask (empty when `files` is set)
    part: np.ndarray  # int32 [num_records]
    offset: np.ndarray  # int64 [num_records]
    lengths: np.ndarray  # int64 [num_records]
    files: list[tuple[Path, Path]] | None = None  # per part (tokens, loss mask) files to read from instead
    file_dtype: np.dtype | None = None  # token dtype of those files

    @classmethod
    def from_encoded(cls, encoded: list[tuple[np.ndarray, np.ndarray]]) -> "RecordStore":
        """A store over in-memory (ids, loss_mask) pairs (tests, small jobs)."""
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(encoded) else lengths
        cat = lambda xs, dt: np.concatenate([np.asarray(x, dtype=dt) for x in xs]) if xs else np.zeros(0, dt)  # noqa: E731
        return cls(
            tokens=[cat([e[0] for e in encoded], np.int64)],
            loss_masks=[cat([e[1] for e in encoded], np.uint8)],
            part=np.zeros(len(encoded), dtype=np.int32),
            offset=offsets,
            lengths=lengths,
        )

    @classmethod
    def from_files(cls, files: list[tuple[Path, Path]], dtype: np.dtype, part, offset, lengths) -> "RecordStore":
        """A store over per-part token and loss-mask files, read with positioned reads (no memory maps: resident
        memory stays bounded by the chunk being written, whatever the file sizes)."""
        return cls([], [], part, offset, lengths, files, np.dtype(dtype))

    def subset(self, indices: np.ndarray) -> "RecordStore":
        """The records at `indices`, renumbered 0..len-1 (shares the part arrays)."""
        return RecordStore(
            self.tokens, self.loss_masks, self.part[indices], self.offset[indices], self.lengths[indices],
            self.files, self.file_dtype,
        )

    def gather_into(self, records: np.ndarray, start: np.ndarray, lengths: np.ndarray, tokens: np.ndarray,
                    loss_mask: np.ndarray, out_start: np.ndarray) -> None:
        """Copy `lengths[k]` tokens and loss-mask values of records[k] from token start[k] to out_start[k] in the
        outputs."""
        parts = self.part[records]
        src_start = self.offset[records] + start
        if self.files is None:
            for p in np.unique(parts).tolist():
                sel = parts == p
                src = _ranges(src_start[sel], lengths[sel])
                dst = _ranges(out_start[sel], lengths[sel])
                tokens[dst] = self.tokens[p][src]
                loss_mask[dst] = self.loss_masks[p][src]
            return
        if tokens.dtype != self.file_dtype:
            raise ValueError(f"token buffer dtype {tokens.dtype} differs from the files' {self.file_dtype}")
        size = self.file_dtype.itemsize
        tok_view, mask_view = memoryview(tokens).cast("B"), memoryview(loss_mask).cast("B")
        fds = [(os.open(t, os.O_RDONLY), os.open(m, os.O_RDONLY)) for t, m in self.files]
        try:
            for p, src, n, dst in zip(parts.tolist(), src_start.tolist(), lengths.tolist(), out_start.tolist()):
                if n:
                    ftok, fmask = fds[p]
                    _pread_exact(ftok, tok_view[dst * size : (dst + n) * size], src * size)
                    _pread_exact(fmask, mask_view[dst : dst + n], src)
        finally:
            for a, b in fds:
                os.close(a)
                os.close(b)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c)."""
    counts = counts.astype(np.int64)
    shift = starts.astype(np.int64) - (np.cumsum(counts) - counts)
    return np.repeat(shift, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def write_assignment(
    store: RecordStore,
    assignment: PackAssignment,
    out_dir: str | Path,
    split: str,
    dtype: np.dtype,
    pad_id: int,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
    progress=None,
) -> dict:
    """Write the packs of `assignment` (pack order) as shards of `split`; returns shard list and token statistics
    (trained tokens, the smallest and largest token id written, padding included; None without tokens)."""
    a = assignment
    cuts_conversations = bool(np.any(a.start > 0))  # only `random` cuts conversations
    writer = ShardWriter(out_dir, split, dtype, max_shard_tokens, continuation=cuts_conversations)
    continues = a.start[a.pack_offsets[:-1]] > 0 if cuts_conversations else None
    pack_end_tok = np.cumsum(a.pack_lengths())
    trained_tokens = 0
    low: int | None = None
    high: int | None = None
    try:
        p0 = 0
        while p0 < a.num_packs:
            base = int(pack_end_tok[p0 - 1]) if p0 else 0
            p1 = max(p0 + 1, int(np.searchsorted(pack_end_tok, base + CHUNK_TOKENS, side="right")))
            p1 = min(p1, a.num_packs)
            s0, s1 = int(a.pack_offsets[p0]), int(a.pack_offsets[p1])
            tokens, loss_mask = _gather(store, a, s0, s1, pad_id, dtype)
            trained_tokens += int(loss_mask.sum(dtype=np.int64))
            if len(tokens):  # the id range, chunk by chunk (memory stays bounded by the chunk)
                lo, hi = int(tokens.min()), int(tokens.max())
                low, high = (lo, hi) if low is None else (min(low, lo), max(high, hi))
            writer.add_packs(tokens, loss_mask, a.padded_lengths[s0:s1], np.diff(a.pack_offsets[p0 : p1 + 1]),
                             continues[p0:p1] if continues is not None else None, real_lengths=a.real_lengths[s0:s1])
            if progress is not None:
                progress.update(p1 - p0)
            p0 = p1
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"shards": shards, "num_trained_tokens": trained_tokens, "min_token_id": low, "max_token_id": high}


def _gather(
    store: RecordStore, a: PackAssignment, s0: int, s1: int, pad_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and loss mask of segments s0..s1 laid end to end, each segment padded to its padded length."""
    padded = a.padded_lengths[s0:s1]
    total = int(padded.sum())
    tokens = np.full(total, pad_id, dtype=dtype)
    loss_mask = np.zeros(total, dtype=np.uint8)
    out_start = np.cumsum(padded) - padded
    store.gather_into(a.conversation[s0:s1], a.start[s0:s1], a.real_lengths[s0:s1], tokens, loss_mask, out_start)
    return tokens, loss_mask


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from byte `offset` of `fd`."""
    while len(buf):
        got = os.preadv(fd, [buf], offset)
        if got <= 0:
            raise OSError(f"unexpected end of an intermediate file (fd {fd}) at byte {offset}")
        buf, offset = buf[got:], offset + got


def split_train_val(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and val indices of `count` conversations; the val set is a seeded random
    round(val_fraction * count) of them (at least one when val_fraction > 0 and count >= 2; never all)."""
    n_val = int(round(val_fraction * count))
    if val_fraction > 0 and n_val == 0 and count >= 2:
        n_val = 1
    n_val = min(n_val, count - 1) if count else 0
    perm = seeds.rng(seed, "val_split").permutation(count)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def pack_split(
    store: RecordStore,
    out_dir: str | Path,
    split: str,
    *,
    seq_length: int,
    packing: str,
    seed: int,
    pad_to_multiple: int,
    drop_long: bool,
    dtype: np.dtype,
    pad_id: int,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
    progress_factory=None,
) -> dict:
    """Assign and write one split; returns its statistics and shard list (the `splits.<split>` entry of meta.json)."""
    assignment = assign_packs(
        store.lengths, seq_length, packing, seed=seed, pad_to_multiple=pad_to_multiple, drop_long=drop_long
    )
    num_packs = assignment.num_packs
    bar = progress_factory(total=num_packs, desc=f"write {split}", unit="pack") if progress_factory else None
    try:
        written = write_assignment(store, assignment, out_dir, split, dtype, pad_id, max_shard_tokens, bar)
    finally:
        if bar is not None:
            bar.close()
    real_tokens = int(assignment.real_lengths.sum())
    counts, edges = np.histogram(store.lengths, bins=min(64, max(1, len(store.lengths))))
    padded_tokens = int(assignment.padded_lengths.sum())
    return {
        "num_conversations": int(len(store.lengths)) - assignment.dropped,
        "num_tokens": real_tokens,
        "num_padding_tokens": padded_tokens - real_tokens,
        "num_trained_tokens": written["num_trained_tokens"],
        "num_packs": num_packs,
        "num_segments": int(len(assignment.conversation)),
        "lower_bound_packs": lower_bound(assignment.padded_lengths, seq_length),
        "packing_efficiency": real_tokens / (num_packs * seq_length) if num_packs else 0.0,
        "max_pack_tokens": int(assignment.pack_lengths().max(initial=0)),
        "truncated": assignment.truncated,
        "truncated_tokens": assignment.truncated_tokens,
        "dropped": assignment.dropped,
        "dropped_tokens": assignment.dropped_tokens,
        "min_token_id": written["min_token_id"],
        "max_token_id": written["max_token_id"],
        "sample_length_histogram": {"bin_edges": edges.round(2).tolist(), "counts": counts.tolist()},
        "shards": written["shards"],
    }


def write_shard_dir(
    store: RecordStore,
    out_dir: str | Path,
    *,
    seq_length: int,
    packing: str = "bfd",
    seed: int = 0,
    pad_to_multiple: int = 1,
    drop_long: bool = False,
    val_fraction: float = 0.0,
    vocab_size: int,
    pad_id: int,
    info: dict | None = None,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
    progress_factory=None,
) -> dict:
    """Pack `store` into train (and val) shard sets in `out_dir` and write meta.json last; returns the meta dict.

    `info` adds keys to meta.json (tokenizer, template, skipped, inputs, ...). Top-level statistics describe the
    train split; `splits` holds every split's statistics and shard list.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    train_idx, val_idx = split_train_val(len(store.lengths), val_fraction, seed)
    common = dict(
        seq_length=seq_length, packing=packing, seed=seed, pad_to_multiple=pad_to_multiple, drop_long=drop_long,
        dtype=dtype, pad_id=pad_id, max_shard_tokens=max_shard_tokens, progress_factory=progress_factory,
    )
    splits = {"train": pack_split(store.subset(train_idx), out_dir, "train", **common)}
    if len(val_idx):
        splits["val"] = pack_split(store.subset(val_idx), out_dir, "val", **common)
    train = splits["train"]
    shards = [shard for s in splits.values() for shard in s["shards"]]
    lows = [s["min_token_id"] for s in splits.values() if s["min_token_id"] is not None]
    highs = [s["max_token_id"] for s in splits.values() if s["max_token_id"] is not None]
    meta = {
        "format_version": FORMAT_VERSION,
        **{k: train[k] for k in ("num_conversations", "num_tokens", "num_trained_tokens", "num_packs")},
        "seq_length": seq_length,
        "packing": packing,
        "seed": seed,
        "pad_to_multiple": pad_to_multiple,
        "drop_long": drop_long,
        "val_fraction": val_fraction,
        **{k: train[k] for k in ("lower_bound_packs", "packing_efficiency", "truncated", "truncated_tokens",
                                 "dropped", "dropped_tokens", "num_padding_tokens", "num_segments")},
        "skipped": {},
        "vocab_size": vocab_size,
        "pad_id": pad_id,
        "dtype": dtype.name,
        **(info or {}),
        "min_token_id": min(lows) if lows else None,
        "max_token_id": max(highs) if highs else None,
        "splits": splits,
        "sha256": {name: sha for shard in shards for name, sha in shard["files"].items()},
        "file_bytes": {name: size for shard in shards for name, size in shard["file_bytes"].items()},
    }
    write_json_atomic(out_dir / META_NAME, meta)
    return meta
