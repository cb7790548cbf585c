"""Which packs each rank reads: the epoch-shuffled training stream, the validation split, and the TP-group feed."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from megapack import seeds
from megapack.training.run.batch import Batch, build_batch, context_parallel_share


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
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    def _pack(self, k: int) -> Any:
        epoch, pos = divmod(k, self.n)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = seeds.epoch_order(self.n, self.seed, epoch), epoch
        return int(self._order[pos])

    def next_step(self) -> list[list[Any]]:
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


class BatchFeed:
    """Builds the micro-batches of given pack indices on the TP source rank and broadcasts them to its TP group
    (only that rank reads shards). With context parallelism every CP rank's TP source reads the same packs, builds
    the whole row and keeps its own share (`cp_rank` of `cp_size`)."""

    def __init__(self, *, padded: bool, reduction: str, pad_id: int, row_multiple: int, tp_src: int, tp_group,
                 is_tp_src: bool, device, cp_rank: int = 0, cp_size: int = 1) -> None:
        self.padded, self.reduction, self.pad_id, self.row_multiple = padded, reduction, pad_id, row_multiple
        self.tp_src, self.tp_group, self.is_tp_src, self.device = tp_src, tp_group, is_tp_src, device
        self.cp_rank, self.cp_size = cp_rank, cp_size

    def build(self, packs: Sequence, members: Sequence[int] | None = None) -> Batch:
        """This rank's host batch of these packs, laid out as this run lays out every micro-batch."""
        batch = build_batch(packs, padded=self.padded, reduction=self.reduction, pad_id=self.pad_id,
                            row_multiple=self.row_multiple, members=members,
                            segment_multiple=2 * self.cp_size if self.cp_size > 1 else 1)
        return context_parallel_share(batch, self.cp_rank, self.cp_size)

    def batches(self, read: Callable[[Any], Any], index_lists: Sequence[list | None],
                members: Callable[[list], Sequence[int]] | None = None) -> Iterator[Batch]:
        """Device batches of the given index lists (`read` turns an index into a pack); a None entry (this rank has
        no validation pack left) repeats a batch with zero weight."""
        last = None
        for idx in index_lists:
            batch = None
            if self.is_tp_src:
                if idx is None:
                    batch = (last if last is not None else self.build([read(0)])).zeroed()
                else:
                    batch = last = self.build([read(i) for i in idx], members(idx) if members else None)
            yield Batch.broadcast(batch, self.tp_src, self.tp_group, self.device)
