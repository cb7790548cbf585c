"""Shard packs -> THD micro-batches, deterministic epoch-shuffled distributed sampling, TP-group broadcast."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# Per-micro-batch counters, in this order, carried next to the tensors (summed over DP ranks for metrics).
STAT_KEYS = ("real_tokens", "total_tokens", "target_tokens", "conversations", "packs", "seq_sq_sum")


@dataclass
class MicroBatch:
    """One micro-batch in THD form (a single row of `total_tokens` tokens with segment boundaries)."""

    tokens: np.ndarray  # int64 [t]
    labels: np.ndarray  # int64 [t]; the next token within the segment, 0 where there is no target
    loss_weight: np.ndarray  # float32 [t]; 1 per trained target (token reduction) or 1/targets-in-segment (sample)
    position_ids: np.ndarray  # int64 [t], restarting at 0 on every segment
    cu_seqlens: np.ndarray  # int32 [segments+1]
    max_seqlen: int
    num_targets: int  # loss denominator: trained targets (token) or segments with a target (sample)
    stats: dict[str, int]


def _segments(pack) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, loss_mask, cu_seqlens) of a pack; tokens past cu_seqlens[-1] become one padding segment."""
    tokens = np.asarray(pack.tokens, dtype=np.int64)
    mask = np.asarray(pack.loss_mask, dtype=np.uint8)
    cu = np.asarray(pack.cu_seqlens, dtype=np.int64)
    if cu[-1] < len(tokens):
        cu = np.append(cu, len(tokens))
    return tokens, mask, cu


def real_lengths(tokens: np.ndarray, mask: np.ndarray, cu: np.ndarray, pad_id: int | None) -> np.ndarray:
    """Per segment, its length without the trailing padding (pad_id tokens outside the loss) shards may add."""
    lengths = np.diff(cu)
    if pad_id is None:
        return lengths
    is_pad = (tokens == pad_id) & (mask == 0)
    out = lengths.copy()
    for k in range(len(lengths)):
        seg = is_pad[cu[k] : cu[k + 1]]
        keep = np.flatnonzero(~seg)
        out[k] = keep[-1] + 1 if len(keep) else 0
    return out


def build_micro_batch(
    packs: Sequence, *, padded: bool = False, pad_multiple: int = 8, reduction: str = "token",
    pad_id: int | None = None, row_multiple: int = 1,
) -> MicroBatch:
    """Concatenate packs into one THD row; `padded` pads each pack (one conversation) to the longest, rounded up.

    `row_multiple` pads the row's total length to a multiple (one extra padding segment).
    `pad_id` (the shards' padding token) lets trailing per-segment padding be counted as padding, not data.
    Labels are shifted within each segment: position i predicts token i+1 of the same segment and is trained when
    that token's loss_mask is 1; the last position of every segment has no target.
    """
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # tokens, mask, cu, real lengths
    for p in packs:
        toks, mask, cu = _segments(p)
        pieces.append((toks, mask, cu, real_lengths(toks, mask, cu, pad_id)))
    if padded:
        # one conversation per pack: pad each to the longest real length of the micro-batch, rounded up
        longest = max(int(r.sum()) for *_, r in pieces)
        width = -(-longest // pad_multiple) * pad_multiple
        padded_pieces = []
        for toks, mask, _cu, real in pieces:
            n = int(real.sum())
            t = np.full(width, pad_id if pad_id is not None else 0, np.int64)
            m = np.zeros(width, np.uint8)
            t[:n], m[:n] = toks[:n], mask[:n]
            # the padded row is one segment: pads sit after the conversation, so causal attention keeps it exact
            padded_pieces.append((t, m, np.array([0, width], np.int64), np.array([n])))
        pieces = padded_pieces
    extra = -sum(len(t) for t, *_ in pieces) % row_multiple
    if extra:  # e.g. sequence parallelism splits the row over TP ranks: pad it with one masked segment
        fill = pad_id if pad_id is not None else 0
        pieces.append((np.full(extra, fill, np.int64), np.zeros(extra, np.uint8), np.array([0, extra], np.int64),
                       np.array([0])))

    tokens = np.concatenate([t for t, _, _, _ in pieces])
    mask = np.concatenate([m for _, m, _, _ in pieces])
    cu_list, offset = [0], 0
    # a segment that carries on a conversation cut at the end of the previous pack (`random`) is not a new one
    continued = sum(int(p.continues) for p in packs) if not padded else 0
    conversations = -continued
    for toks, _m, cu, real in pieces:
        cu_list.extend(int(c) + offset for c in cu[1:])
        conversations += int((real > 0).sum())
        offset += len(toks)
    cu_seqlens = np.asarray(cu_list, np.int64)
    seg_len = np.diff(cu_seqlens)
    seg_id = np.repeat(np.arange(len(seg_len)), seg_len)
    starts = cu_seqlens[:-1]

    position_ids = np.arange(len(tokens), dtype=np.int64) - np.repeat(starts, seg_len)
    labels = np.zeros_like(tokens)
    target_mask = np.zeros(len(tokens), np.float32)
    labels[:-1] = tokens[1:]
    target_mask[:-1] = mask[1:]
    last = cu_seqlens[1:] - 1
    labels[last] = 0
    target_mask[last] = 0

    if reduction == "sample":
        per_seg = np.bincount(seg_id, weights=target_mask, minlength=len(seg_len))
        denom = np.where(per_seg > 0, per_seg, 1.0)
        loss_weight = (target_mask / denom[seg_id]).astype(np.float32)
        num_targets = int((per_seg > 0).sum())
    elif reduction == "token":
        loss_weight = target_mask
        num_targets = int(target_mask.sum())
    else:
        raise ValueError(f"unknown loss reduction {reduction!r}")

    real = int(sum(int(r.sum()) for *_, r in pieces))
    stats = {
        "real_tokens": real,
        "total_tokens": len(tokens),
        "target_tokens": int(target_mask.sum()),
        "conversations": conversations,
        "packs": len(packs),
        # useful attention work for MFU: squared real segment lengths (padding is computed but not counted)
        "seq_sq_sum": int(sum(int((r.astype(np.int64) ** 2).sum()) for *_, r in pieces)),
    }
    return MicroBatch(
        tokens=tokens,
        labels=labels,
        loss_weight=loss_weight,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens.astype(np.int32),
        max_seqlen=int(seg_len.max()),
        num_targets=num_targets,
        stats=stats,
    )


def zero_weight(batch: MicroBatch) -> MicroBatch:
    """The same micro-batch contributing nothing to the loss (fills uneven validation splits)."""
    stats = dict.fromkeys(STAT_KEYS, 0)
    return MicroBatch(
        batch.tokens, batch.labels, np.zeros_like(batch.loss_weight), batch.position_ids, batch.cu_seqlens,
        batch.max_seqlen, 0, stats,
    )


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch (same on every rank and for every parallel layout)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class TrainSampler:
    """Global-batch sampler over an endless sequence of shuffled epochs; its position is `consumed_samples`.

    Global batch j-th sample goes to micro-batch j // (mbs*dp) of DP rank (j % (mbs*dp)) // mbs, so a step trains
    the same set of samples whatever the DP size (and resuming on a different DP size continues the same stream).
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_samples: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError("empty dataset")
        self.n, self.gbs, self.mbs = num_samples, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_samples = consumed_samples
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def _sample(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.n, self.seed, epoch), epoch
        return int(self._perm[pos])

    def next_step(self) -> list[list[int]]:
        """This DP rank's micro-batches (lists of sample indices) for the next step; advances the position."""
        start, per_mb = self.consumed_samples, self.mbs * self.dp_size
        out = []
        for m in range(self.gbs // per_mb):
            base = start + m * per_mb + self.dp_rank * self.mbs
            out.append([self._sample(base + k) for k in range(self.mbs)])
        self.consumed_samples += self.gbs
        return out

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed."""
        return self.consumed_samples / self.n


def validation_batches(num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                       max_batches: int | None = None) -> list[list[int] | None]:
    """Strided, unshuffled validation micro-batches of this DP rank; None entries pad ranks to equal counts."""
    per_mb = micro_batch_size * dp_size
    count = -(-num_samples // per_mb)
    if max_batches is not None:
        count = min(count, max_batches)
    out: list[list[int] | None] = []
    for m in range(count):
        base = m * per_mb + dp_rank * micro_batch_size
        idx = [i for i in range(base, base + micro_batch_size) if i < num_samples]
        out.append(idx or None)
    return out


# ---------------------------------------------------------------------------------------------- torch side


def to_tensors(batch: MicroBatch, device) -> dict:
    """Tensors the forward step needs, shaped [1, t] like the model expects."""
    import torch

    def t(a, dtype):
        return torch.as_tensor(a, dtype=dtype, device=device)

    return {
        "tokens": t(batch.tokens, torch.int64).unsqueeze(0),
        "labels": t(batch.labels, torch.int64).unsqueeze(0),
        "loss_weight": t(batch.loss_weight, torch.float32).unsqueeze(0),
        "position_ids": t(batch.position_ids, torch.int64).unsqueeze(0),
        "cu_seqlens": t(batch.cu_seqlens, torch.int32),
        "max_seqlen": int(batch.max_seqlen),
        "num_targets": int(batch.num_targets),
        "stats": dict(batch.stats),
    }


def broadcast_batch(batch: MicroBatch | None, src: int, group, device) -> dict:
    """Send the micro-batch from the TP source rank to the rest of its TP group; every rank returns tensors."""
    import torch
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return to_tensors(batch, device)
    is_src = dist.get_rank() == src
    header = torch.zeros(4 + len(STAT_KEYS), dtype=torch.int64, device=device)
    if is_src:
        header[:4] = torch.tensor([len(batch.tokens), len(batch.cu_seqlens), batch.max_seqlen, batch.num_targets])
        header[4:] = torch.tensor([batch.stats[k] for k in STAT_KEYS])
    dist.broadcast(header, src=src, group=group)
    t, ncu, max_seqlen, num_targets = (int(v) for v in header[:4].tolist())
    ints = torch.empty(3 * t + ncu, dtype=torch.int64, device=device)
    weights = torch.empty(t, dtype=torch.float32, device=device)
    if is_src:
        flat = np.concatenate([batch.tokens, batch.labels, batch.position_ids, batch.cu_seqlens.astype(np.int64)])
        ints.copy_(torch.from_numpy(flat))
        weights.copy_(torch.from_numpy(batch.loss_weight))
    dist.broadcast(ints, src=src, group=group)
    dist.broadcast(weights, src=src, group=group)
    return {
        "tokens": ints[:t].unsqueeze(0),
        "labels": ints[t : 2 * t].unsqueeze(0),
        "position_ids": ints[2 * t : 3 * t].unsqueeze(0),
        "cu_seqlens": ints[3 * t :].to(torch.int32),
        "loss_weight": weights.unsqueeze(0),
        "max_seqlen": max_seqlen,
        "num_targets": num_targets,
        "stats": dict(zip(STAT_KEYS, (int(v) for v in header[4:].tolist()))),
    }


def micro_batch_iterator(dataset, index_lists: Sequence[list[int] | None], *, padded: bool, reduction: str,
                         pad_multiple: int, pad_id: int | None, is_src: bool, src: int, group,
                         device, row_multiple: int = 1) -> Iterator[dict]:
    """Yield broadcast tensor dicts for the given micro-batches (only the TP source rank reads the shards)."""
    last = None
    for idx in index_lists:
        batch = None
        if is_src:
            if idx is None:
                batch = zero_weight(last if last is not None else build_micro_batch(
                    [dataset[0]], padded=padded, pad_multiple=pad_multiple, reduction=reduction, pad_id=pad_id,
                    row_multiple=row_multiple))
            else:
                batch = build_micro_batch([dataset[i] for i in idx], padded=padded, pad_multiple=pad_multiple,
                                          reduction=reduction, pad_id=pad_id, row_multiple=row_multiple)
                last = batch
        yield broadcast_batch(batch, src, group, device)
