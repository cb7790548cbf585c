"""Before the pack step: the shards' size on disk (for a full disk's message) and the trained-token check."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from megapack.data.packs.packing import kept_lengths, round_up
from megapack.data.packs.writer import RecordStore, split_train_val
from megapack.errors import MegapackError



class PackSettings(Protocol):
    """What these checks read of a PreprocessConfig (megapack.data.pipeline.preprocess)."""

    output_dir: str
    seq_length: int
    packing: str
    drop_long: bool
    pad_to_multiple: int
    val_fraction: float
    seed: int


def shard_bytes(lengths: np.ndarray, cfg: PackSettings, itemsize: int) -> int:
    """About how many bytes the shards of these conversations take (tokens, loss masks and both .idx files)."""
    kept = kept_lengths(lengths, cfg.seq_length, cfg.packing, cfg.drop_long)
    kept = kept[kept > 0]
    tokens = int(round_up(kept, cfg.pad_to_multiple).sum())
    packs = len(kept) if cfg.packing == "padding" else -(-tokens // cfg.seq_length)
    segments = len(kept) + (packs if cfg.packing == "random" else 0)
    return tokens * (itemsize + 1) + segments * 24 + packs * 17 + 4096


def check_trained_tokens(store: RecordStore, cfg: PackSettings, trained_tokens: int) -> None:
    """Refuse, before any shard is written, a train split whose packs would hold no trained token (every response
    cut off at --seq-length or dropped by --drop-long). Reads loss masks only until a trained token is found."""
    train, _ = split_train_val(len(store.lengths), cfg.val_fraction, cfg.seed)
    lengths = store.lengths[train]
    kept = kept_lengths(lengths, cfg.seq_length, cfg.packing, cfg.drop_long)
    todo = np.flatnonzero(kept) if trained_tokens else np.zeros(0, np.int64)
    ends = np.cumsum(kept[todo])
    pos, budget = 0, 1 << 12  # the first few conversations decide in the usual case; then batches of up to 4M tokens
    dtype = store.file_dtype or store.tokens[0].dtype
    while pos < len(todo):
        stop = max(pos + 1, int(np.searchsorted(ends, (ends[pos - 1] if pos else 0) + budget, side="right")))
        batch, n = train[todo[pos:stop]], kept[todo[pos:stop]]
        tokens, loss_mask = np.empty(int(n.sum()), dtype=dtype), np.zeros(int(n.sum()), dtype=np.uint8)
        store.gather_into(batch, np.zeros(len(batch), np.int64), n, tokens, loss_mask, np.cumsum(n) - n)
        if loss_mask.any():
            return
        pos, budget = stop, min(budget * 8, 1 << 22)
    cut, dropped = int(((kept > 0) & (kept < lengths)).sum()), int((kept == 0).sum())
    raise MegapackError(
        f"{cfg.output_dir}: the train split has no trained tokens (num_trained_tokens 0): {len(train)} conversations, "
        f"{cut} cut at --seq-length {cfg.seq_length}, {dropped} dropped by --drop-long; expected at least one "
        "response token within --seq-length (raise --seq-length, or check --mask-history and the data)"
    )
