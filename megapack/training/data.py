"""Shard packs -> THD micro-batches, deterministic epoch-shuffled distributed sampling, TP-group broadcast."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from megapack import seeds
from megapack.data.packs.padding import PADDED_ARM_MULTIPLE, padded_length

# Per-micro-batch counters, in this order, carried next to the tensors (summed over DP ranks for metrics).
STAT_KEYS = ("real_tokens", "total_tokens", "target_tokens", "conversations", "packs", "seq_sq_sum")


@dataclass
class MicroBatch:
    """One micro-batch in THD form: a single row of `total_tokens` tokens holding padded segments.

    Segment k occupies tokens[cu_seqlens_padded[k]:cu_seqlens_padded[k+1]] and its first
    cu_seqlens[k+1] - cu_seqlens[k] tokens are real (Transformer Engine's THD convention).
    """

    tokens: np.ndarray  # int64 [t]
    labels: np.ndarray  # int64 [t]; the next token within the segment, 0 where there is no target
    loss_weight: np.ndarray  # float32 [t]; per target (after the shift): 1 (token reduction) or 1/targets-in-segment
    position_ids: np.ndarray  # int64 [t], restarting at 0 on every segment
    cu_seqlens: np.ndarray  # int32 [segments+1], real tokens
    cu_seqlens_padded: np.ndarray  # int32 [segments+1], offsets in the row (ends at t)
    max_seqlen: int  # longest padded segment
    loss_denominator: int  # trained targets (token reduction) or segments with a target (sample reduction)
    stats: dict[str, int]
    member: np.ndarray | None = None  # int64 [t]: data.blend member of each real token, -1 on padding; no blend: None
    num_members: int = 0


def _cumulative(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))]).astype(np.int64)


def build_micro_batch(
    packs: Sequence, *, padded: bool = False, pad_multiple: int = PADDED_ARM_MULTIPLE, reduction: str = "token",
    pad_id: int = 0, row_multiple: int = 1, members: Sequence[int] | None = None, num_members: int = 0,
) -> MicroBatch:
    """Concatenate packs into one THD row; `padded` pads each pack (one conversation) to the longest, rounded up.

    Real and padded segment lengths come from the shards (format v2). `row_multiple` pads the row's total length
    to a multiple with one extra segment of padding (sequence parallelism splits the row over TP ranks). Labels are
    shifted within each segment: position i predicts token i+1 of the same segment and is trained when that token's
    loss mask is 1; the last position of every segment has no target.
    """
    tokens_parts, mask_parts, real, width = [], [], [], []
    if padded:
        # one conversation per pack: each becomes one segment padded to the micro-batch's longest, rounded up
        lengths = [int(p.real_lengths.sum()) for p in packs]
        row = padded_length(lengths, pad_multiple)
        for p, n in zip(packs, lengths):
            t = np.full(row, pad_id, np.int64)
            m = np.zeros(row, np.uint8)
            t[:n], m[:n] = p.tokens[:n], p.loss_mask[:n]
            tokens_parts.append(t)
            mask_parts.append(m)
            real.append(n)
            width.append(row)
    else:
        for p in packs:
            tokens_parts.append(np.asarray(p.tokens, np.int64))
            mask_parts.append(np.asarray(p.loss_mask, np.uint8))
            real.extend(p.real_lengths.tolist())
            width.extend(p.padded_lengths.tolist())
    extra = -sum(width) % row_multiple
    if extra:
        tokens_parts.append(np.full(extra, pad_id, np.int64))
        mask_parts.append(np.zeros(extra, np.uint8))
        real.append(0)
        width.append(extra)

    tokens, mask = np.concatenate(tokens_parts), np.concatenate(mask_parts)
    cu_padded, seg_len = _cumulative(width), np.asarray(width, np.int64)
    seg_id = np.repeat(np.arange(len(seg_len)), seg_len)
    position_ids = np.arange(len(tokens), dtype=np.int64) - np.repeat(cu_padded[:-1], seg_len)
    labels = np.zeros_like(tokens)
    target = np.zeros(len(tokens), np.float32)
    labels[:-1], target[:-1] = tokens[1:], mask[1:]
    last = cu_padded[1:] - 1
    labels[last], target[last] = 0, 0

    if reduction == "sample":
        per_seg = np.bincount(seg_id, weights=target, minlength=len(seg_len))
        loss_weight = (target / np.where(per_seg > 0, per_seg, 1.0)[seg_id]).astype(np.float32)
        denominator = int((per_seg > 0).sum())
    elif reduction == "token":
        loss_weight, denominator = target, int(target.sum())
    else:
        raise ValueError(f"unknown loss reduction {reduction!r}")

    real_arr = np.asarray(real, np.int64)
    member = None
    if members is not None:  # the blend member of each pack, on its real tokens (per-member loss and tokens)
        of_pack = np.repeat(np.asarray([*members, -1], np.int64)[:len(tokens_parts)],
                            [len(part) for part in tokens_parts])
        member = np.where(position_ids < real_arr[seg_id], of_pack, -1)
    # a segment that carries on a conversation cut at the end of the previous pack (`random`) is not a new one
    continued = 0 if padded else sum(int(p.continues) for p in packs)
    stats = {
        "real_tokens": int(real_arr.sum()),
        "total_tokens": len(tokens),
        "target_tokens": int(target.sum()),
        "conversations": int((real_arr > 0).sum()) - continued,
        "packs": len(packs),
        # useful attention work for MFU: squared real segment lengths (padding is computed but not counted)
        "seq_sq_sum": int((real_arr**2).sum()),
    }
    return MicroBatch(
        tokens=tokens, labels=labels, loss_weight=loss_weight, position_ids=position_ids,
        cu_seqlens=_cumulative(real).astype(np.int32), cu_seqlens_padded=cu_padded.astype(np.int32),
        max_seqlen=int(seg_len.max()), loss_denominator=denominator, stats=stats, member=member,
        num_members=num_members if member is not None else 0,
    )


def zero_weight(batch: MicroBatch) -> MicroBatch:
    """The same micro-batch contributing nothing to the loss (fills uneven validation splits)."""
    stats = dict.fromkeys(STAT_KEYS, 0)
    return MicroBatch(
        batch.tokens, batch.labels, np.zeros_like(batch.loss_weight), batch.position_ids, batch.cu_seqlens,
        batch.cu_seqlens_padded, batch.max_seqlen, 0, stats, batch.member, batch.num_members,
    )


def epoch_permutation(num_packs: int, seed: int, epoch: int) -> np.ndarray:
    """The pack order of one epoch (same on every rank and for every parallel layout)."""
    return seeds.epoch_order(num_packs, seed, epoch)


class TrainSampler:
    """Global-batch sampler over an endless sequence of shuffled epochs; its position is `consumed_packs`.

    The j-th pack of a global batch goes to micro-batch j // (mbs*dp) of DP rank (j % (mbs*dp)) // mbs, so a step
    trains the same packs whatever the DP size (and resuming at another DP size continues the same stream).
    """

    def __init__(self, num_packs: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_packs: int = 0) -> None:
        if num_packs <= 0:
            raise ValueError("empty dataset")
        self.n, self.gbs, self.mbs = num_packs, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_packs = consumed_packs
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def _pack(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.n, self.seed, epoch), epoch
        return int(self._perm[pos])

    def next_step(self) -> list[list[int]]:
        """This DP rank's micro-batches (lists of pack indices) for the next step; advances the position."""
        start, per_mb = self.consumed_packs, self.mbs * self.dp_size
        out = []
        for m in range(self.gbs // per_mb):
            base = start + m * per_mb + self.dp_rank * self.mbs
            out.append([self._pack(base + k) for k in range(self.mbs)])
        self.consumed_packs += self.gbs
        return out

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed."""
        return self.consumed_packs / self.n


def validation_batches(num_packs: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                       max_batches: int | None = None) -> list[list[int] | None]:
    """Strided, unshuffled validation micro-batches of this DP rank; None entries pad ranks to equal counts."""
    per_mb = micro_batch_size * dp_size
    count = -(-num_packs // per_mb)
    if max_batches is not None:
        count = min(count, max_batches)
    out: list[list[int] | None] = []
    for m in range(count):
        base = m * per_mb + dp_rank * micro_batch_size
        idx = [i for i in range(base, base + micro_batch_size) if i < num_packs]
        out.append(idx or None)
    return out


# ---------------------------------------------------------------------------------------------- torch side

_INT_FIELDS = ("tokens", "labels", "position_ids")


def to_tensors(batch: MicroBatch, device) -> dict:
    """Tensors the forward step needs, shaped [1, t] like the model expects."""
    import torch

    out = {k: torch.as_tensor(getattr(batch, k), dtype=torch.int64, device=device)[None] for k in _INT_FIELDS}
    return out | {
        "loss_weight": torch.as_tensor(batch.loss_weight, dtype=torch.float32, device=device)[None],
        "cu_seqlens": torch.as_tensor(batch.cu_seqlens, dtype=torch.int32, device=device),
        "cu_seqlens_padded": torch.as_tensor(batch.cu_seqlens_padded, dtype=torch.int32, device=device),
        "max_seqlen": int(batch.max_seqlen),
        "loss_denominator": int(batch.loss_denominator),
        "stats": dict(batch.stats),
        "member": None if batch.member is None else torch.as_tensor(batch.member, dtype=torch.int64, device=device),
        "num_members": int(batch.num_members),
    }


def broadcast_batch(batch: MicroBatch | None, src: int, group, device) -> dict:
    """Send the micro-batch from the TP source rank to the rest of its TP group; every rank returns tensors."""
    import torch
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return to_tensors(batch, device)
    is_src = dist.get_rank() == src
    header = torch.zeros(5 + len(STAT_KEYS), dtype=torch.int64, device=device)
    if is_src:
        header[:5] = torch.tensor([len(batch.tokens), len(batch.cu_seqlens), batch.max_seqlen,
                                   batch.loss_denominator, batch.num_members])
        header[5:] = torch.tensor([batch.stats[k] for k in STAT_KEYS])
    dist.broadcast(header, src=src, group=group)
    t, ncu, max_seqlen, denominator, num_members = (int(v) for v in header[:5].tolist())
    ints = torch.empty(3 * t + 2 * ncu + (t if num_members else 0), dtype=torch.int64, device=device)
    weights = torch.empty(t, dtype=torch.float32, device=device)
    if is_src:
        flat = np.concatenate([*(getattr(batch, k) for k in _INT_FIELDS), batch.cu_seqlens.astype(np.int64),
                               batch.cu_seqlens_padded.astype(np.int64),
                               *([batch.member] if num_members else [])])
        ints.copy_(torch.from_numpy(flat))
        weights.copy_(torch.from_numpy(batch.loss_weight))
    dist.broadcast(ints, src=src, group=group)
    dist.broadcast(weights, src=src, group=group)
    out = {k: ints[i * t : (i + 1) * t][None] for i, k in enumerate(_INT_FIELDS)}
    return out | {
        "cu_seqlens": ints[3 * t : 3 * t + ncu].to(torch.int32),
        "cu_seqlens_padded": ints[3 * t + ncu : 3 * t + 2 * ncu].to(torch.int32),
        "loss_weight": weights[None],
        "max_seqlen": max_seqlen,
        "loss_denominator": denominator,
        "stats": dict(zip(STAT_KEYS, (int(v) for v in header[5:].tolist()))),
        "member": ints[3 * t + 2 * ncu :] if num_members else None,
        "num_members": num_members,
    }


def micro_batch_iterator(dataset, index_lists: Sequence[list[int] | None], *, padded: bool, reduction: str,
                         pad_id: int, is_src: bool, src: int, group, device, row_multiple: int = 1) -> Iterator[dict]:
    """Yield broadcast tensor dicts for the given micro-batches (only the TP source rank reads the shards)."""
    last = None
    for idx in index_lists:
        batch = None
        if is_src:
            build = partial(build_micro_batch, padded=padded, reduction=reduction, pad_id=pad_id,
                            row_multiple=row_multiple)
            if idx is None:  # this rank has no validation pack left: repeat one with zero weight
                batch = zero_weight(last if last is not None else build([dataset[0]]))
            elif getattr(dataset, "num_members", 0):  # a blend: indices are (member, pack)
                batch = last = build([dataset[i] for i in idx], members=[m for m, _ in idx],
                                     num_members=dataset.num_members)
            else:
                batch = last = build([dataset[i] for i in idx])
        yield broadcast_batch(batch, src, group, device)


class PackBatches:
    """The packs this rank trains and validates on: the sampler's position and the TP-broadcast micro-batches.

    Only the TP source rank reads shards; the other ranks of its TP group receive the tensors.
    """

    def __init__(self, train, valid, sampler: TrainSampler, *, padded: bool, reduction: str, pad_id: int,
                 row_multiple: int, tp_src: int, tp_group, is_tp_src: bool, device) -> None:
        self.train, self.valid, self.sampler = train, valid, sampler
        self._batches = partial(micro_batch_iterator, padded=padded, reduction=reduction, pad_id=pad_id,
                                is_src=is_tp_src, src=tp_src, group=tp_group, device=device,
                                row_multiple=row_multiple)

    def next_step(self) -> tuple[Iterator[dict], int]:
        """(micro-batch iterator, number of micro-batches) of the next training step; advances the sampler."""
        index_lists = self.sampler.next_step()
        return self._batches(self.train, index_lists), len(index_lists)

    def validation(self, micro_batch_size: int, max_batches: int | None) -> tuple[Iterator[dict], int] | None:
        """(iterator, count) over the validation split, or None without one."""
        if self.valid is None or len(self.valid) == 0:
            return None
        index_lists = validation_batches(len(self.valid), micro_batch_size, self.sampler.dp_rank,
                                         self.sampler.dp_size, max_batches)
        return self._batches(self.valid, index_lists), len(index_lists)
