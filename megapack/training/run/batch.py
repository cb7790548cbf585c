"""The typed micro-batch: packs laid out as one THD row, and everything that moves it (device, TP group, zeroing).

`Batch` is the only owner of its fields: it is built from packs on the host (numpy), moved to a device or broadcast
inside the tensor-parallel group as torch tensors, and zeroed for a micro-batch that must run but not count. A new
field (a later parallelism's metadata) is one line in the dataclass: its `kind` says how it travels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from megapack.data.packs.padding import PADDED_ARM_MULTIPLE, padded_length

# Per-micro-batch counters, in this order (summed over micro-batches and DP ranks for metrics).
STAT_KEYS = ("real_tokens", "total_tokens", "trained_tokens", "conversations", "packs", "seq_sq_sum")

_DTYPES = {"int64": (np.int64, "int64"), "int32": (np.int32, "int32"), "float32": (np.float32, "float32")}


def _per_token(dtype: str) -> Any:
    return field(metadata={"kind": "token", "dtype": dtype})


def _per_boundary(dtype: str) -> Any:
    return field(metadata={"kind": "boundary", "dtype": dtype})


@dataclass
class Batch:
    """One micro-batch in THD form: a single row of `len(tokens)` tokens holding padded segments.

    Segment k occupies tokens[cu_seqlens_padded[k]:cu_seqlens_padded[k+1]] and its first
    cu_seqlens[k+1] - cu_seqlens[k] tokens are real (Transformer Engine's THD convention). Arrays are numpy on the
    host, torch tensors after `to` / `broadcast` (per-token fields shaped [1, t], as the model takes them). A
    context-parallel rank's share (`context_parallel_share`) holds its own tokens in the per-token fields and the
    whole row's boundaries, as Transformer Engine and megatron's THD RoPE expect under CP.
    """

    tokens: Any = _per_token("int64")
    positions: Any = _per_token("int64")  # restarting at 0 on every segment
    targets: Any = _per_token("int64")  # the next token within the segment, 0 where there is none
    loss_weight: Any = _per_token("float32")  # per target: 1 (token reduction) or 1/targets-in-segment, 0 untrained
    cu_seqlens: Any = _per_boundary("int32")  # [segments+1], real tokens
    cu_seqlens_padded: Any = _per_boundary("int32")  # [segments+1], offsets in the row (ends at t)
    max_seqlen: int = 0  # longest padded segment
    loss_denominator: int = 0  # trained targets (token reduction) or segments with a target (sample reduction)
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))
    member: Any = field(default=None, metadata={"kind": "token", "dtype": "int64"})  # a blend's member per real
    # token, -1 on padding; None without a blend

    def zeroed(self) -> "Batch":
        """The same rows contributing nothing: zero loss weights, no denominator, no counts (uneven validation
        splits, interleaved pipelines' whole groups)."""
        return replace(self, loss_weight=self.loss_weight * 0, loss_denominator=0, stats=dict.fromkeys(STAT_KEYS, 0))

    def to(self, device) -> "Batch":
        """This host batch as torch tensors on `device`."""
        import torch

        moved = {}
        for f in _array_fields():
            value = getattr(self, f.name)
            if value is not None:
                tensor = torch.as_tensor(np.asarray(value), dtype=getattr(torch, f.metadata["dtype"]), device=device)
                moved[f.name] = tensor[None] if f.metadata["kind"] == "token" else tensor
        return replace(self, **moved, stats=dict(self.stats))

    @staticmethod
    def broadcast(batch: "Batch | None", src: int, group, device) -> "Batch":
        """Send the host batch of the TP source rank to the rest of its TP group; every rank returns tensors."""
        import torch
        import torch.distributed as dist

        if group is None or dist.get_world_size(group) == 1:
            return batch.to(device)
        arrays = _array_fields()
        is_src = dist.get_rank() == src
        # header: the scalars, the counters, then each array field's length (-1: None)
        header = torch.zeros(2 + len(STAT_KEYS) + len(arrays), dtype=torch.int64, device=device)
        if is_src:
            lengths = [-1 if getattr(batch, f.name) is None else len(getattr(batch, f.name)) for f in arrays]
            header.copy_(torch.tensor([batch.max_seqlen, batch.loss_denominator,
                                       *(batch.stats[k] for k in STAT_KEYS), *lengths]))
        dist.broadcast(header, src=src, group=group)
        values = [int(v) for v in header.tolist()]
        lengths = dict(zip((f.name for f in arrays), values[2 + len(STAT_KEYS):]))
        out: dict[str, Any] = {"max_seqlen": values[0], "loss_denominator": values[1],
                               "stats": dict(zip(STAT_KEYS, values[2:2 + len(STAT_KEYS)]))}
        for wire in ("int64", "float32"):  # one message per wire type; int32 fields travel as int64
            group_fields = [f for f in arrays if _wire(f) == wire and lengths[f.name] >= 0]
            if not group_fields:
                continue
            flat = torch.empty(sum(lengths[f.name] for f in group_fields), dtype=getattr(torch, wire), device=device)
            if is_src:
                flat.copy_(torch.from_numpy(np.concatenate(
                    [np.asarray(getattr(batch, f.name)).astype(wire) for f in group_fields])))
            dist.broadcast(flat, src=src, group=group)
            for f, part in zip(group_fields, flat.split([lengths[f.name] for f in group_fields])):
                part = part.to(getattr(torch, f.metadata["dtype"]))
                out[f.name] = part[None] if f.metadata["kind"] == "token" else part
        return Batch(**out)


def _array_fields() -> list:
    return [f for f in fields(Batch) if "kind" in f.metadata]


def _wire(f) -> str:
    return "float32" if f.metadata["dtype"] == "float32" else "int64"


def _cumulative(lengths: Sequence[int]) -> np.ndarray:
    cu = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(np.asarray(lengths, np.int64), out=cu[1:])
    return cu


def build_batch(
    packs: Sequence, *, padded: bool = False, pad_multiple: int = PADDED_ARM_MULTIPLE, reduction: str = "token",
    pad_id: int = 0, row_multiple: int = 1, members: Sequence[int] | None = None, segment_multiple: int = 1,
) -> Batch:
    """Concatenate packs into one THD row; `padded` pads each pack (one conversation) to the longest, rounded up.

    Real and padded segment lengths come from the shards (format v2) and are summed once into `cu_seqlens` and
    `cu_seqlens_padded`; `segment_multiple` pads every segment further, to a multiple (2*cp: context parallelism
    cuts each segment into 2*cp chunks). `row_multiple` pads the row's total length to a multiple with one extra
    segment of padding (sequence parallelism splits the row over TP ranks). Targets are shifted within each segment:
    position i predicts token i+1 of the same segment and is trained when that token's loss mask is 1; the last
    position of every segment has no target. `members` (a blend) gives each pack's member.
    """
    token_parts, mask_parts, real_lengths, padded_lengths, seg_pack = [], [], [], [], []
    if padded:
        # one conversation per pack: each becomes one segment padded to the micro-batch's longest, rounded up
        lengths = [int(p.real_lengths.sum()) for p in packs]
        row = padded_length(lengths, pad_multiple)
        for p, n in zip(packs, lengths):
            t = np.full(row, pad_id, np.int64)
            m = np.zeros(row, np.uint8)
            t[:n], m[:n] = p.tokens[:n], p.loss_mask[:n]
            token_parts.append(t)
            mask_parts.append(m)
            real_lengths.append(n)
            padded_lengths.append(row)
        seg_pack = list(range(len(packs)))
    else:
        for i, p in enumerate(packs):
            token_parts.append(np.asarray(p.tokens, np.int64))
            mask_parts.append(np.asarray(p.loss_mask, np.uint8))
            real_lengths.extend(p.real_lengths.tolist())
            padded_lengths.extend(p.padded_lengths.tolist())
            seg_pack.extend([i] * len(p.padded_lengths))
    tokens, loss_mask = np.concatenate(token_parts), np.concatenate(mask_parts)
    if segment_multiple > 1:
        tokens, loss_mask, padded_lengths = _pad_segments(tokens, loss_mask, padded_lengths, segment_multiple, pad_id)
    extra = -sum(padded_lengths) % row_multiple
    if extra:
        tokens = np.concatenate([tokens, np.full(extra, pad_id, np.int64)])
        loss_mask = np.concatenate([loss_mask, np.zeros(extra, np.uint8)])
        real_lengths.append(0)
        padded_lengths.append(extra)
        seg_pack.append(len(packs))

    cu_seqlens, cu_padded = _cumulative(real_lengths), _cumulative(padded_lengths)
    real, width = np.asarray(real_lengths, np.int64), np.asarray(padded_lengths, np.int64)
    segment = np.repeat(np.arange(len(width)), width)
    positions = np.arange(len(tokens), dtype=np.int64) - np.repeat(cu_padded[:-1], width)
    targets = np.zeros_like(tokens)
    trained = np.zeros(len(tokens), np.float32)  # 1 where the target is a trained token
    targets[:-1], trained[:-1] = tokens[1:], loss_mask[1:]
    last = cu_padded[1:] - 1
    targets[last], trained[last] = 0, 0

    if reduction == "sample":
        per_segment = np.bincount(segment, weights=trained, minlength=len(width))
        loss_weight = (trained / np.where(per_segment > 0, per_segment, 1.0)[segment]).astype(np.float32)
        denominator = int((per_segment > 0).sum())
    elif reduction == "token":
        loss_weight, denominator = trained, int(trained.sum())
    else:
        raise ValueError(f"unknown loss reduction {reduction!r}")

    member = None
    if members is not None:  # the blend member of each pack, on its real tokens (per-member loss and tokens)
        of_segment = np.asarray([*members, -1], np.int64)[np.asarray(seg_pack, np.int64)]
        member = np.where(positions < real[segment], of_segment[segment], -1)
    # a segment that carries on a conversation cut at the end of the previous pack (`random`) is not a new one
    continued = 0 if padded else sum(int(p.continues) for p in packs)
    stats = {
        "real_tokens": int(real.sum()),
        "total_tokens": len(tokens),
        "trained_tokens": int(trained.sum()),
        "conversations": int((real > 0).sum()) - continued,
        "packs": len(packs),
        # useful attention work for MFU: squared real segment lengths (padding is computed but not counted)
        "seq_sq_sum": int((real**2).sum()),
    }
    return Batch(tokens=tokens, positions=positions, targets=targets, loss_weight=loss_weight,
                 cu_seqlens=cu_seqlens.astype(np.int32), cu_seqlens_padded=cu_padded.astype(np.int32),
                 max_seqlen=int(width.max()), loss_denominator=denominator, stats=stats, member=member)


def _pad_segments(tokens: np.ndarray, loss_mask: np.ndarray, widths: Sequence[int], multiple: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The row with every segment's padding extended to a multiple of `multiple` (pad_id, loss mask 0)."""
    old = np.asarray(widths, np.int64)
    new = -(-old // multiple) * multiple
    if (new == old).all():
        return tokens, loss_mask, list(widths)
    starts = np.repeat(_cumulative(new)[:-1] - _cumulative(old)[:-1], old) + np.arange(int(old.sum()))
    out_tokens, out_mask = np.full(int(new.sum()), pad_id, np.int64), np.zeros(int(new.sum()), np.uint8)
    out_tokens[starts], out_mask[starts] = tokens, loss_mask
    return out_tokens, out_mask, new.tolist()


def context_parallel_share(batch: Batch, rank: int, size: int) -> Batch:
    """CP rank `rank`'s share of a host batch: chunks rank and 2*size-1-rank of every segment
    (megapack.model.context_parallel); per-token fields sliced, boundaries and max_seqlen those of the whole row.

    The loss denominator (the micro-batch's trained tokens or conversations) is carried by CP rank 0 alone, so the
    sum over DP x CP counts each once; the counters (`stats`) stay whole on every CP rank, for metrics summed over
    DP only.
    """
    if size == 1:
        return batch
    from megapack.model.context_parallel import cp_row_index

    index = cp_row_index(batch.cu_seqlens_padded, rank, size)
    sliced = {f.name: np.asarray(getattr(batch, f.name))[index] for f in _array_fields()
              if f.metadata["kind"] == "token" and getattr(batch, f.name) is not None}
    return replace(batch, **sliced, loss_denominator=batch.loss_denominator if rank == 0 else 0,
                   stats=dict(batch.stats))
