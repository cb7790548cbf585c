"""Ranks balanced by attention cost: which DP rank and micro-batch trains which pack of a global batch (`packs`), or
which of its segments (`segments`, re-packed into rows), from the segment lengths alone.

A segment of s real tokens costs a*s + b*s^2 (`CostModel`: the model's FLOPs, `megapack.model.flops`), a pack the sum
over its segments. Every layout here is a pure function of the global batch (its packs' lengths, in order) and the
layout sizes (DP ranks D, micro-batches per rank M, packs per micro-batch m): every rank computes the same one, a
resumed run the same one again, and the global batch itself (which packs a step trains) never depends on it.

`packs`: LPT (costliest first, to the lightest) into the D*M micro-batches, dealt slot by slot (the D heaviest left,
one to each rank, the heaviest to the rank with the lowest total), so rank totals even out and every micro-batch slot
holds micro-batches of similar cost (a pipeline stage waits on the slowest one). `segments`: rows built afresh by cost
(long segments to the lightest rank, short ones best fit) when they all fit, else the shards' own rows as `packs`
lays them out; then a local search moves, swaps and trades segments between the heaviest rank and lighter ones, and
between the micro-batches of each rank; each rank's micro-batches run heaviest first. verl's `seqlen_balancing`
(Karmarkar-Karp over DP ranks) and Megatron-LM's hybrid-CP scheduler were the references; both leave pipeline
parallelism out.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LARGE = 32  # a segment longer than seq_length / LARGE is placed for balance, a shorter one to fill rows
SET_ITEMS = 4  # the heaviest bin's costliest segments offered for sets of shorter ones
SET_ROW_ITEMS = 48  # a row's segments (the first ones) a set is drawn from


@dataclass(frozen=True)
class CostModel:
    """Cost of a segment of s real tokens: linear*s + quadratic*s^2 (training FLOPs)."""

    linear: float
    quadratic: float

    @classmethod
    def of_model(cls, hf_config: dict) -> "CostModel":
        """The model's FLOP coefficients (per-token matmuls, causal attention) from its config.json."""
        from megapack.model.flops import flop_coefficients

        return cls(*flop_coefficients(hf_config))

    def segments(self, real_lengths: np.ndarray) -> np.ndarray:
        """The cost of each segment."""
        s = np.asarray(real_lengths, np.float64)
        return self.linear * s + self.quadratic * s * s

    def pack(self, real_lengths: np.ndarray) -> float:
        """The cost of a pack (or any row): the sum over its segments."""
        return float(self.segments(real_lengths).sum())


@dataclass(frozen=True)
class Piece:
    """Segment `segment` of the global batch's pack at position `pack`."""

    pack: int
    segment: int


@dataclass
class Layout:
    """A global batch on D ranks x M micro-batches x m rows: rows[r][k] lists rank r's micro-batch k, each row a pack
    position of the global batch (whole packs) or a tuple of `Piece`s (re-packed segments)."""

    rows: list[list[list]]
    costs: np.ndarray  # float64 [D, M]: the cost of each rank's micro-batches
    repacked: bool = False

    @property
    def rank_costs(self) -> np.ndarray:
        """Each DP rank's cost of the step."""
        return self.costs.sum(axis=1)

    def imbalance(self) -> float:
        """max / mean of the DP ranks' costs (1.0: perfectly balanced)."""
        return max_over_mean(self.rank_costs)

    def slot_imbalance(self) -> float:
        """The worst micro-batch slot's max / mean across DP ranks (pipeline parallelism)."""
        return max(max_over_mean(column) for column in self.costs.T)


def max_over_mean(values: np.ndarray) -> float:
    """max / mean (1.0 for all zeros)."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    return float(values.max()) / mean if mean > 0 else 1.0


def default_layout(pack_costs: Sequence[float], dp: int, micro_batches: int, mbs: int) -> Layout:
    """The unbalanced layout: pack j goes to micro-batch j // (mbs*dp) of rank (j % (mbs*dp)) // mbs."""
    costs = np.asarray(pack_costs, np.float64)
    rows = [[[k * mbs * dp + r * mbs + i for i in range(mbs)] for k in range(micro_batches)] for r in range(dp)]
    return Layout(rows, np.array([[costs[micro].sum() for micro in rank] for rank in rows]))


def _lpt(costs: np.ndarray, sizes: np.ndarray, capacity: int, dp: int, micro_batches: int,
         mbs: int) -> tuple[list, np.ndarray] | None:
    """Items in decreasing cost (ties: lower index first) to the lightest rank with room, its lightest micro-batch
    with room, the fullest row that fits; ([rank][micro][row] -> item indices, costs [D, M]) or None when an item
    fits nowhere."""
    free = np.full((dp, micro_batches, mbs), capacity, np.int64)
    micro_cost = np.zeros((dp, micro_batches), np.float64)
    contents: list = [[[[] for _ in range(mbs)] for _ in range(micro_batches)] for _ in range(dp)]
    for i in np.lexsort((np.arange(len(costs)), -costs)):
        fits = free >= sizes[i]
        rank_room = fits.any(axis=(1, 2))
        if not rank_room.any():
            return None
        r = int(np.argmin(np.where(rank_room, micro_cost.sum(axis=1), np.inf)))
        k = int(np.argmin(np.where(fits[r].any(axis=1), micro_cost[r], np.inf)))
        j = int(np.argmin(np.where(fits[r, k], free[r, k], np.iinfo(np.int64).max)))
        free[r, k, j] -= sizes[i]
        micro_cost[r, k] += costs[i]
        contents[r][k][j].append(int(i))
    return contents, micro_cost


def _heaviest_first(contents: list, micro_cost: np.ndarray) -> tuple[list, np.ndarray]:
    """Each rank's micro-batches ordered by decreasing cost (stable): slot k holds every rank's k-th heaviest."""
    order = np.argsort(-micro_cost, axis=1, kind="stable")
    return ([[contents[r][k] for k in order[r]] for r in range(len(contents))],
            np.take_along_axis(micro_cost, order, axis=1))


def balance_packs(pack_costs: Sequence[float], dp: int, micro_batches: int, mbs: int) -> Layout:
    """Whole packs to ranks and micro-batches by cost: LPT into dp*micro_batches micro-batches of mbs packs, then
    slot by slot (heaviest micro-batches first, dp of them per slot) each to the rank with the lowest total so far,
    so every slot holds micro-batches of similar cost and the ranks' totals even out."""
    costs = np.asarray(pack_costs, np.float64)
    if len(costs) != dp * micro_batches * mbs:
        raise ValueError(f"{len(costs)} packs for {dp} ranks x {micro_batches} micro-batches x {mbs}")
    placed = _lpt(costs, np.ones(len(costs), np.int64), 1, dp * micro_batches, 1, mbs)
    assert placed is not None  # one pack per row, as many rows as packs
    contents, bin_cost = placed[0], placed[1][:, 0]
    order = np.lexsort((np.arange(len(bin_cost)), -bin_cost))
    rows: list = [[None] * micro_batches for _ in range(dp)]
    micro_cost, rank_total = np.zeros((dp, micro_batches)), np.zeros(dp)
    for k in range(micro_batches):
        ranks = np.lexsort((np.arange(dp), rank_total))
        for r, b in zip(ranks, order[k * dp:(k + 1) * dp]):
            rows[r][k] = [row[0] for row in contents[b][0]]
            micro_cost[r, k] = bin_cost[b]
            rank_total[r] += bin_cost[b]
    return Layout(rows, micro_cost)


def balance_segments(real_lengths: Sequence[np.ndarray], padded_lengths: Sequence[np.ndarray], cost: CostModel,
                     seq_length: int, dp: int, micro_batches: int, mbs: int) -> Layout:
    """The global batch's segments re-packed by cost into dp*micro_batches*mbs rows of at most seq_length tokens
    (padded lengths), mbs rows per micro-batch.

    Starts from rows built by cost (`_construct`) or, when those leave a segment without room, from the whole packs
    balanced by `balance_packs` (the shards' own rows always fit); then lowers the heaviest rank by transfers with
    lighter ones while every row keeps within seq_length (`_improve`); then the same between the micro-batches of each
    rank (pipeline slots; the rank's total unchanged), and orders each rank's micro-batches heaviest first.
    """
    if len(real_lengths) != dp * micro_batches * mbs:
        raise ValueError(f"{len(real_lengths)} packs for {dp} ranks x {micro_batches} micro-batches x {mbs}")
    counts = [len(x) for x in real_lengths]
    pack_of = np.repeat(np.arange(len(counts)), counts)
    segment_of = np.concatenate([np.arange(n) for n in counts]).astype(np.int64)
    real = np.concatenate([np.asarray(x, np.int64) for x in real_lengths])
    size = np.concatenate([np.asarray(x, np.int64) for x in padded_lengths])
    seg_cost = cost.segments(real)
    first = np.concatenate([[0], np.cumsum(counts)])
    rows_per_rank = micro_batches * mbs
    row = _construct(seg_cost, size, seq_length, dp, micro_batches, mbs)
    if row is None:  # the shards' own rows, whole packs balanced, as the start
        start = balance_packs([seg_cost[a:b].sum() for a, b in zip(first[:-1], first[1:])], dp, micro_batches, mbs)
        row = np.empty(len(real), np.int64)  # row index: (rank * micro_batches + micro) * mbs + j
        for r, rank in enumerate(start.rows):
            for k, micro in enumerate(rank):
                for j, p in enumerate(micro):
                    row[first[p]:first[p + 1]] = (r * micro_batches + k) * mbs + j
    free = seq_length - np.bincount(row, weights=size, minlength=dp * rows_per_rank).astype(np.int64)
    _improve(seg_cost, size, row, free, np.arange(dp * rows_per_rank) // rows_per_rank)
    for r in range(dp):  # the micro-batches of each rank: whole pipeline slots, the rank's total unchanged
        mine = np.flatnonzero(row // rows_per_rank == r)
        local = row[mine] - r * rows_per_rank
        _improve(seg_cost[mine], size[mine], local, free[r * rows_per_rank:(r + 1) * rows_per_rank],
                 np.arange(rows_per_rank) // mbs)
        row[mine] = local + r * rows_per_rank
    micro_cost = np.bincount(row // mbs, weights=seg_cost, minlength=dp * micro_batches).reshape(dp, micro_batches)
    contents: list = [[[[] for _ in range(mbs)] for _ in range(micro_batches)] for _ in range(dp)]
    for i in np.lexsort((segment_of, pack_of)):  # within a row: the global batch's order
        r, rest = divmod(int(row[i]), rows_per_rank)
        contents[r][rest // mbs][rest % mbs].append(Piece(int(pack_of[i]), int(segment_of[i])))
    contents, micro_cost = _heaviest_first(contents, micro_cost)
    return Layout([[[tuple(x) for x in micro] for micro in rank] for rank in contents], micro_cost, repacked=True)


def _construct(cost: np.ndarray, size: np.ndarray, seq_length: int, dp: int, micro_batches: int,
               mbs: int) -> np.ndarray | None:
    """Each segment's row, built in decreasing cost: a long segment (over seq_length / LARGE) goes to the lightest
    rank with room, its lightest micro-batch with room, the fullest row there it fits; a short one to the fullest row
    of all that it fits (best fit, which fills the rows to the token as the shards' bfd packing did). None when a
    segment finds no room."""
    rows_per_rank = micro_batches * mbs
    free = np.full(dp * rows_per_rank, seq_length, np.int64)
    micro_cost = np.zeros(dp * micro_batches, np.float64)
    micro_of_row, rank_of_micro = np.arange(len(free)) // mbs, np.arange(len(micro_cost)) // micro_batches
    row = np.empty(len(cost), np.int64)
    never = np.iinfo(np.int64).max
    for i in np.lexsort((np.arange(len(cost)), -cost)):
        fits = free >= size[i]
        if not fits.any():
            return None
        if size[i] * LARGE > seq_length:
            micro_room = np.bincount(micro_of_row, weights=fits, minlength=len(micro_cost)) > 0
            rank_cost = np.bincount(rank_of_micro, weights=micro_cost, minlength=dp)
            rank_room = np.bincount(rank_of_micro, weights=micro_room, minlength=dp) > 0
            r = int(np.argmin(np.where(rank_room, rank_cost, np.inf)))
            mine = slice(r * micro_batches, (r + 1) * micro_batches)
            k = r * micro_batches + int(np.argmin(np.where(micro_room[mine], micro_cost[mine], np.inf)))
            rows = np.arange(k * mbs, (k + 1) * mbs)
            j = int(rows[np.argmin(np.where(fits[rows], free[rows], never))])
        else:
            j = int(np.argmin(np.where(fits, free, never)))
        row[i] = j
        free[j] -= size[i]
        micro_cost[micro_of_row[j]] += cost[i]
    return row


def _improve(cost: np.ndarray, size: np.ndarray, row: np.ndarray, free: np.ndarray, bin_of_row: np.ndarray,
             candidates: int = 4, max_rounds: int | None = None) -> None:
    """Local search in place: lower the heaviest bin (a group of rows) by a transfer with a lighter bin: move one of
    its items to a row there where it fits, swap it with an item there, or trade one of its costliest items for a
    set of shorter items of one row there that fill its place (`_subset_sum`); the transfer leaving the lowest max
    of the two wins, among the `candidates` lightest bins (or the first lighter one offering any). Stops when no
    transfer lowers the heaviest bin. `row` and `free` (room per row) are updated."""
    bins = int(bin_of_row.max()) + 1
    total = np.bincount(bin_of_row[row], weights=cost, minlength=bins)
    for _ in range(max_rounds or 2 * len(cost) + 16):
        heavy = int(np.argmax(total))
        xs = np.flatnonzero(bin_of_row[row] == heavy)
        best = (total[heavy] * (1 - 1e-12), None)
        for n, light in enumerate(np.argsort(total, kind="stable")):
            light = int(light)
            if light == heavy or (n >= candidates and best[1] is not None):
                break  # the `candidates` lightest bins, then the next ones until one offers a transfer
            rows_l = np.flatnonzero(bin_of_row == light)
            ys = np.flatnonzero(bin_of_row[row] == light)
            # moves: x into the row of `light` with the least room that holds it
            room = free[rows_l]
            fits = size[xs][:, None] <= room[None, :]
            score = np.maximum(total[heavy] - cost[xs], total[light] + cost[xs])
            score = np.where(fits.any(axis=1), score, np.inf)
            if len(xs) and score.min() < best[0]:
                a = int(np.argmin(score))
                target = rows_l[int(np.argmin(np.where(fits[a], room, np.iinfo(np.int64).max)))]
                best = (float(score[a]), ("move", xs[a], target))
            if len(ys):  # swaps: x and y trade rows
                d = cost[xs][:, None] - cost[ys][None, :]
                ok = ((free[row[xs]][:, None] + size[xs][:, None] - size[ys][None, :] >= 0)
                      & (free[row[ys]][None, :] + size[ys][None, :] - size[xs][:, None] >= 0) & (d > 0))
                score = np.where(ok, np.maximum(total[heavy] - d, total[light] + d), np.inf)
                if score.min() < best[0]:
                    a, b = np.unravel_index(int(np.argmin(score)), score.shape)
                    best = (float(score[a, b]), ("swap", xs[a], ys[b]))
            for x in xs[np.argsort(-cost[xs], kind="stable")[:SET_ITEMS]]:
                # one of heavy's costliest segments for shorter ones of a row of `light` that take its room exactly:
                # with rows full to the token, this is what moves the quadratic part
                for r in rows_l:
                    ys_r = ys[(row[ys] == r) & (size[ys] < size[x])][:SET_ROW_ITEMS]
                    taken = _subset_sum(size[ys_r], int(size[x] - free[r]), int(size[x] + free[row[x]]))
                    if taken is None:
                        continue
                    d = cost[x] - cost[ys_r[taken]].sum()
                    score = max(total[heavy] - d, total[light] + d)
                    if d > 0 and score < best[0]:
                        best = (float(score), ("set", x, ys_r[taken]))
        if best[1] is None:
            return
        kind, x, other = best[1]
        if kind == "move":
            _place(x, other, cost, size, row, free, total, bin_of_row)
        elif kind == "swap":
            rx, ry = row[x], row[other]
            _place(x, ry, cost, size, row, free, total, bin_of_row)
            _place(other, rx, cost, size, row, free, total, bin_of_row)
        else:  # x for a set of items of one row
            rx, ry = row[x], row[other[0]]
            _place(x, ry, cost, size, row, free, total, bin_of_row)
            for y in other:
                _place(y, rx, cost, size, row, free, total, bin_of_row)


def _subset_sum(sizes: np.ndarray, low: int, high: int) -> np.ndarray | None:
    """Indices of items whose sizes sum to a value in [low, high] (the largest such sum), or None (subset-sum
    table over the sums up to high)."""
    low = max(low, 1)
    if high < low or not len(sizes):
        return None
    reach = np.zeros((len(sizes) + 1, high + 1), bool)
    reach[0, 0] = True
    for i, s in enumerate(sizes.tolist()):
        reach[i + 1] = reach[i]
        if s <= high:
            reach[i + 1, s:] |= reach[i, :high + 1 - s]
    hits = np.flatnonzero(reach[-1, low:])
    if not len(hits):
        return None
    target, taken = low + int(hits[-1]), []
    for i in range(len(sizes), 0, -1):  # walk back: item i-1 was taken when the sum is not reachable without it
        if not reach[i - 1, target]:
            taken.append(i - 1)
            target -= int(sizes[i - 1])
    return np.asarray(taken[::-1], np.int64)


def _place(i: int, target: int, cost: np.ndarray, size: np.ndarray, row: np.ndarray, free: np.ndarray,
           total: np.ndarray, bin_of_row: np.ndarray) -> None:
    """Move item i to row `target`, keeping the rows' room and the bins' totals."""
    free[row[i]] += size[i]
    total[bin_of_row[row[i]]] -= cost[i]
    row[i] = target
    free[target] -= size[i]
    total[bin_of_row[target]] += cost[i]


@dataclass
class RepackedRow:
    """A row of segments taken from several packs; it reads as a `Pack` to `build_batch` (tokens, loss_mask,
    real_lengths, padded_lengths, continues: here the count of segments that carry on a cut conversation)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    real_lengths: np.ndarray
    padded_lengths: np.ndarray
    continues: int = 0


def repacked_row(pieces: Sequence[tuple[object, int]]) -> RepackedRow:
    """The row of (pack, segment index) pieces, in order: each segment's padded tokens and loss mask as stored."""
    tokens, mask, real, padded, continues = [], [], [], [], 0
    for pack, s in pieces:
        start = int(np.sum(pack.padded_lengths[:s]))
        width = int(pack.padded_lengths[s])
        tokens.append(np.asarray(pack.tokens[start:start + width], np.int64))
        mask.append(np.asarray(pack.loss_mask[start:start + width], np.uint8))
        real.append(int(pack.real_lengths[s]))
        padded.append(width)
        continues += int(s == 0 and bool(pack.continues))
    return RepackedRow(np.concatenate(tokens), np.concatenate(mask), np.asarray(real, np.int64),
                       np.asarray(padded, np.int64), continues)
