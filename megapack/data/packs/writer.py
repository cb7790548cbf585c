"""Turn tokenized samples plus a packing plan into shard files, streaming in bounded chunks.

Samples live in flat per-part token/mask sequences (the tokenize step's files, or in-memory arrays); a
`SampleStore` locates sample i as (part, offset, length). Packs are written in chunks of about CHUNK_TOKENS tokens:
each piece is read straight into the chunk buffer (one positioned read per piece from files, one vectorized index
per part from arrays), so memory is bounded by the chunk, not by the dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapack import seeds
from megapack.atomic import write_json_atomic
from megapack.data.packs.packing import PackPlan
from megapack.data.packs.shards import DEFAULT_MAX_SHARD_TOKENS, ShardWriter

CHUNK_TOKENS = 1 << 22  # tokens gathered per write step (bounds memory)


@dataclass
class SampleStore:
    """Tokenized samples: flat per-part arrays and, per sample, its part, offset and length."""

    tokens: list[np.ndarray]  # per part, flat token ids (empty when `files` is set)
    masks: list[np.ndarray]  # per part, flat uint8 loss mask (empty when `files` is set)
    part: np.ndarray  # int32 [num_samples]
    offset: np.ndarray  # int64 [num_samples]
    length: np.ndarray  # int64 [num_samples]
    files: list[tuple[Path, Path]] | None = None  # per part (tokens, mask) files to read from instead
    file_dtype: np.dtype | None = None  # token dtype of those files

    @classmethod
    def from_samples(cls, samples: list[tuple[np.ndarray, np.ndarray]]) -> "SampleStore":
        """A store over in-memory (ids, mask) pairs (tests, small jobs)."""
        lengths = np.array([len(ids) for ids, _ in samples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(samples) else lengths
        cat = lambda xs, dt: np.concatenate([np.asarray(x, dtype=dt) for x in xs]) if xs else np.zeros(0, dt)  # noqa: E731
        return cls(
            tokens=[cat([s[0] for s in samples], np.int64)],
            masks=[cat([s[1] for s in samples], np.uint8)],
            part=np.zeros(len(samples), dtype=np.int32),
            offset=offsets,
            length=lengths,
        )

    @classmethod
    def from_files(cls, files: list[tuple[Path, Path]], dtype: np.dtype, part, offset, length) -> "SampleStore":
        """A store over per-part token and mask files, read with positioned reads (no memory maps: resident
        memory stays bounded by the chunk being written, whatever the file sizes)."""
        return cls([], [], part, offset, length, files, np.dtype(dtype))

    def subset(self, indices: np.ndarray) -> "SampleStore":
        """The samples at `indices`, renumbered 0..len-1 (shares the part arrays)."""
        return SampleStore(
            self.tokens, self.masks, self.part[indices], self.offset[indices], self.length[indices], self.files,
            self.file_dtype,
        )

    def gather_into(self, sample, start, length, tokens: np.ndarray, mask: np.ndarray, out_start) -> None:
        """Copy `length[k]` tokens and mask values of sample[k] from token start[k] to out_start[k] in the outputs."""
        parts = self.part[sample]
        src_start = self.offset[sample] + start
        if self.files is None:
            for p in np.unique(parts).tolist():
                sel = parts == p
                src = _ranges(src_start[sel], length[sel])
                dst = _ranges(out_start[sel], length[sel])
                tokens[dst] = self.tokens[p][src]
                mask[dst] = self.masks[p][src]
            return
        if tokens.dtype != self.file_dtype:
            raise ValueError(f"token buffer dtype {tokens.dtype} differs from the files' {self.file_dtype}")
        size = self.file_dtype.itemsize
        tok_view, mask_view = memoryview(tokens).cast("B"), memoryview(mask).cast("B")
        fds = [(os.open(t, os.O_RDONLY), os.open(m, os.O_RDONLY)) for t, m in self.files]
        try:
            for p, src, n, dst in zip(parts.tolist(), src_start.tolist(), length.tolist(), out_start.tolist()):
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


def write_plan(
    store: SampleStore,
    plan: PackPlan,
    out_dir: str | Path,
    split: str,
    dtype: np.dtype,
    pad_id: int,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
    progress=None,
) -> dict:
    """Write the packs of `plan` (pack order) as shards of `split`; returns shard list and token statistics
    (trained tokens, the smallest and largest token id written, padding included; None without tokens)."""
    splits_samples = bool(np.any(plan.start > 0))  # only `random` cuts samples
    writer = ShardWriter(out_dir, split, dtype, max_shard_tokens, continuation=splits_samples)
    continues = plan.start[plan.pack_offsets[:-1]] > 0 if splits_samples else None
    pack_len = plan.pack_lengths()
    pack_end_tok = np.cumsum(pack_len)
    loss_tokens = 0
    low: int | None = None
    high: int | None = None
    try:
        p0 = 0
        while p0 < plan.num_packs:
            base = int(pack_end_tok[p0 - 1]) if p0 else 0
            p1 = max(p0 + 1, int(np.searchsorted(pack_end_tok, base + CHUNK_TOKENS, side="right")))
            p1 = min(p1, plan.num_packs)
            a, b = int(plan.pack_offsets[p0]), int(plan.pack_offsets[p1])
            tokens, mask = _gather(store, plan, a, b, pad_id, dtype)
            loss_tokens += int(mask.sum(dtype=np.int64))
            if len(tokens):  # the id range, chunk by chunk (memory stays bounded by the chunk)
                lo, hi = int(tokens.min()), int(tokens.max())
                low, high = (lo, hi) if low is None else (min(low, lo), max(high, hi))
            writer.add_packs(tokens, mask, plan.seg_length[a:b], np.diff(plan.pack_offsets[p0 : p1 + 1]),
                             continues[p0:p1] if continues is not None else None, real_lengths=plan.length[a:b])
            if progress is not None:
                progress.update(p1 - p0)
            p0 = p1
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"shards": shards, "num_loss_tokens": loss_tokens, "min_token_id": low, "max_token_id": high}


def _gather(
    store: SampleStore, plan: PackPlan, a: int, b: int, pad_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and mask of pieces a..b laid end to end, each piece padded to its segment length."""
    sample, start = plan.sample[a:b], plan.start[a:b]
    length, seg = plan.length[a:b], plan.seg_length[a:b]
    total = int(seg.sum())
    tokens = np.full(total, pad_id, dtype=dtype)
    mask = np.zeros(total, dtype=np.uint8)
    out_start = np.cumsum(seg) - seg
    store.gather_into(sample, start, length, tokens, mask, out_start)
    return tokens, mask


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from byte `offset` of `fd`."""
    while len(buf):
        got = os.preadv(fd, [buf], offset)
        if got <= 0:
            raise OSError(f"unexpected end of an intermediate file (fd {fd}) at byte {offset}")
        buf, offset = buf[got:], offset + got


def split_train_val(num_samples: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and val sample indices; the val set is a seeded random round(val_fraction * n) samples."""
    n_val = int(round(val_fraction * num_samples))
    if val_fraction > 0 and n_val == 0 and num_samples >= 2:
        n_val = 1
    n_val = min(n_val, num_samples - 1) if num_samples else 0
    perm = seeds.rng(seed, "val_split").permutation(num_samples)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def pack_split(
    store: SampleStore,
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
    """Plan and write one split; returns its statistics and shard list (the `splits.<split>` entry of meta.json)."""
    from megapack.data.packs.packing import lower_bound, plan_packs

    plan = plan_packs(
        store.length, seq_length, packing, seed=seed, pad_to_multiple=pad_to_multiple, drop_long=drop_long
    )
    bar = progress_factory(total=plan.num_packs, desc=f"write {split}", unit="pack") if progress_factory else None
    try:
        written = write_plan(store, plan, out_dir, split, dtype, pad_id, max_shard_tokens, bar)
    finally:
        if bar is not None:
            bar.close()
    sample_tokens = int(plan.length.sum())
    counts, edges = np.histogram(store.length, bins=min(64, max(1, len(store.length))))
    padded_tokens = int(plan.seg_length.sum())
    return {
        "num_samples": int(len(store.length)) - plan.dropped,
        "num_tokens": sample_tokens,
        "num_padding_tokens": padded_tokens - sample_tokens,
        "num_loss_tokens": written["num_loss_tokens"],
        "num_packs": plan.num_packs,
        "num_segments": int(len(plan.sample)),
        "lower_bound_packs": lower_bound(plan.seg_length, seq_length),
        "packing_efficiency": sample_tokens / (plan.num_packs * seq_length) if plan.num_packs else 0.0,
        "max_pack_tokens": int(plan.pack_lengths().max(initial=0)),
        "truncated": plan.truncated,
        "truncated_tokens": plan.truncated_tokens,
        "dropped": plan.dropped,
        "dropped_tokens": plan.dropped_tokens,
        "min_token_id": written["min_token_id"],
        "max_token_id": written["max_token_id"],
        "sample_length_histogram": {"bin_edges": edges.round(2).tolist(), "counts": counts.tolist()},
        "shards": written["shards"],
    }


def write_shard_dir(
    store: SampleStore,
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
    from megapack.data.packs.shards import FORMAT_VERSION, META_NAME, token_dtype

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    train_idx, val_idx = split_train_val(len(store.length), val_fraction, seed)
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
        **{k: train[k] for k in ("num_samples", "num_tokens", "num_loss_tokens", "num_packs")},
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
