"""Which packs each rank reads: the epoch-shuffled training stream, the validation split, and the TP-group feed."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megapack import seeds
from megapack.training.run.balance import (CostModel, Layout, balance_packs, balance_segments, default_layout,
                                           repacked_row)
from megapack.training.run.batch import Batch, build_batch, context_parallel_share


@dataclass(frozen=True)
class Balancing:
    """How a global batch is laid out on the ranks (`training.balance`): the mode, the cost model, the rows' length
    and `lengths(key)` -> (real, padded) segment lengths of a pack (index files only)."""

    mode: str
    cost: CostModel
    seq_length: int
    lengths: Callable[[Any], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class RowOf:
    """A re-packed row: segments of the global batch's packs, as (pack key, segment index) pairs."""

    pieces: tuple[tuple[Any, int], ...]


class TrainSampler:
    """Global-batch sampler over an endless sequence of shuffled epochs; its position is `consumed_packs`.

    Without balancing the j-th pack of a global batch goes to micro-batch j // (mbs*dp) of DP rank
    (j % (mbs*dp)) // mbs; with it (`Balancing`) the same global batch is laid out by cost
    (megapack.training.run.balance). Either way a step trains the same packs whatever the DP size (and resuming at
    another DP size continues the same stream); the layout is a pure function of the global batch.
    """

    def __init__(self, num_packs: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_packs: int = 0, balancing: Balancing | None = None) -> None:
        if num_packs <= 0:
            raise ValueError("empty dataset")
        self.n, self.gbs, self.mbs = num_packs, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_packs = consumed_packs
        self.balancing, self.last_layout = balancing, None
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    def _pack(self, k: int) -> Any:
        epoch, pos = divmod(k, self.n)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = seeds.epoch_order(self.n, self.seed, epoch), epoch
        return int(self._order[pos])

    def next_step(self) -> list[list[Any]]:
        """This DP rank's micro-batches for the next step (lists of pack keys, or of `RowOf` re-packed rows);
        advances the position."""
        keys = [self._pack(self.consumed_packs + j) for j in range(self.gbs)]
        self.consumed_packs += self.gbs
        self.last_layout = layout = self.layout(keys)
        return [[RowOf(tuple((keys[p.pack], p.segment) for p in row)) if layout.repacked else keys[row]
                 for row in micro] for micro in layout.rows[self.dp_rank]]

    def layout(self, keys: Sequence[Any]) -> Layout:
        """The global batch of these pack keys on every DP rank (every rank computes the same one)."""
        micro_batches = self.gbs // (self.mbs * self.dp_size)
        b = self.balancing
        if b is None:
            return default_layout(np.zeros(len(keys)), self.dp_size, micro_batches, self.mbs)
        lengths = [b.lengths(k) for k in keys]
        costs = [b.cost.pack(real) for real, _ in lengths]
        if b.mode == "segments":
            return balance_segments([r for r, _ in lengths], [p for _, p in lengths], b.cost, b.seq_length,
                                    self.dp_size, micro_batches, self.mbs)
        if b.mode == "packs":
            return balance_packs(costs, self.dp_size, micro_batches, self.mbs)
        return default_layout(costs, self.dp_size, micro_batches, self.mbs)

    def reader(self, read: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """`read` (a pack key -> its pack) extended to re-packed rows (each pack read once per call of reader)."""
        cache: dict = {}

        def pack(key):
            if key not in cache:
                cache[key] = read(key)
            return cache[key]

        return lambda item: repacked_row([(pack(k), s) for k, s in item.pieces]) if isinstance(item, RowOf) \
            else read(item)

    def report(self) -> dict:
        """The last step's balance: max/mean of the DP ranks' costs (`dp_cost_max_mean`)."""
        return {} if self.last_layout is None or self.balancing is None else \
            {"dp_cost_max_mean": self.last_layout.imbalance()}

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
