"""Packing algorithms: pure functions from a sample-lengths array to a plan of packs (deterministic for a seed).

A plan lists, for every pack, the pieces it holds as (sample, start, length, segment length): `length` real tokens
taken from `sample` beginning at token `start`, padded with pad tokens up to `segment length` (a multiple of
`pad_to_multiple`). Each piece becomes one segment of the pack's `cu_seqlens`. Only `random` splits samples.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from megapack import seeds
from megapack.errors import MegapackError

PACKINGS = ("padding", "random", "greedy", "bfd")


@dataclass
class PackPlan:
    """Which pieces of which samples go into each pack, plus what was truncated or dropped."""

    pack_offsets: np.ndarray  # int64 [num_packs + 1]: pieces of pack p are [pack_offsets[p], pack_offsets[p+1])
    sample: np.ndarray  # int64 [num_pieces]: sample index of each piece
    start: np.ndarray  # int64 [num_pieces]: first token of the piece within its sample
    length: np.ndarray  # int64 [num_pieces]: real tokens in the piece
    seg_length: np.ndarray  # int64 [num_pieces]: segment length incl. padding to pad_to_multiple
    truncated: int = 0  # samples cut to seq_length (padding, greedy, bfd)
    truncated_tokens: int = 0
    dropped: int = 0  # samples longer than seq_length left out (drop_long)
    dropped_tokens: int = 0

    @property
    def num_packs(self) -> int:
        """Number of packs."""
        return len(self.pack_offsets) - 1

    def pack_lengths(self) -> np.ndarray:
        """Total segment length (tokens incl. padding) of every pack."""
        sums = np.concatenate([[0], np.cumsum(self.seg_length)])
        return sums[self.pack_offsets[1:]] - sums[self.pack_offsets[:-1]]

    def pieces(self, p: int) -> list[tuple[int, int, int, int]]:
        """The (sample, start, length, seg_length) pieces of pack p."""
        a, b = int(self.pack_offsets[p]), int(self.pack_offsets[p + 1])
        return [
            (int(s), int(st), int(n), int(sl))
            for s, st, n, sl in zip(self.sample[a:b], self.start[a:b], self.length[a:b], self.seg_length[a:b])
        ]


def round_up(lengths: np.ndarray, multiple: int) -> np.ndarray:
    """Each length rounded up to a multiple of `multiple`."""
    return -(-lengths // multiple) * multiple


def lower_bound(seg_lengths: np.ndarray, seq_length: int) -> int:
    """ceil(sum of segment lengths / seq_length): no packing can use fewer packs."""
    return int(-(-int(np.sum(seg_lengths, dtype=np.int64)) // seq_length))


def plan_packs(
    lengths: np.ndarray,
    seq_length: int,
    packing: str = "bfd",
    *,
    seed: int = 0,
    pad_to_multiple: int = 1,
    drop_long: bool = False,
) -> PackPlan:
    """Plan the packs of samples with the given token lengths (see the module docstring)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if packing not in PACKINGS:
        raise MegapackError(f"--packing {packing!r}: expected one of {', '.join(PACKINGS)}")
    if seq_length <= 0:
        raise MegapackError(f"--seq-length {seq_length}: expected a positive integer")
    if pad_to_multiple <= 0 or seq_length % pad_to_multiple:
        raise MegapackError(f"--pad-to-multiple {pad_to_multiple}: expected a positive divisor of --seq-length {seq_length}")
    if lengths.ndim != 1 or (lengths.size and lengths.min() <= 0):
        raise MegapackError("sample lengths: expected a 1-D array of positive integers")
    seeds.check_seed(seed, "--seed")
    if packing == "random":
        return _random(lengths, seq_length, pad_to_multiple, seeds.rng(seed, "packing"), drop_long)

    long = lengths > seq_length
    kept = np.flatnonzero(~long) if drop_long else np.arange(len(lengths))
    real = np.minimum(lengths[kept], seq_length)
    seg = round_up(real, pad_to_multiple)
    stats = dict(
        truncated=0 if drop_long else int(long.sum()),
        truncated_tokens=0 if drop_long else int((lengths[long] - seq_length).sum()),
        dropped=int(long.sum()) if drop_long else 0,
        dropped_tokens=int(lengths[long].sum()) if drop_long else 0,
    )
    if packing == "padding":
        bins = np.arange(len(kept), dtype=np.int64)
        placement = np.arange(len(kept), dtype=np.int64)
    else:
        placement = _stable_argsort(seq_length - seg)  # decreasing length, ties by sample index
        fit = _first_fit if packing == "greedy" else _best_fit
        bins = fit(seg[placement], seq_length)
        # Shuffle pack order so training does not see packs sorted by length (a stream of its own: the trainer's
        # epoch order must not undo it).
        bins = seeds.rng(seed, "pack_order").permutation(int(bins.max()) + 1 if bins.size else 0)[bins]
    return _plan_from_bins(kept, real, seg, placement, bins, stats)


def _plan_from_bins(
    kept: np.ndarray, real: np.ndarray, seg: np.ndarray, placement: np.ndarray, bins: np.ndarray, stats: dict
) -> PackPlan:
    """Group placed items by bin; within a bin, pieces keep their placement order."""
    order = placement[_stable_argsort(bins)]
    counts = np.bincount(bins, minlength=int(bins.max()) + 1 if bins.size else 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return PackPlan(
        pack_offsets=offsets,
        sample=kept[order].astype(np.int64),
        start=np.zeros(len(order), dtype=np.int64),
        length=real[order].astype(np.int64),
        seg_length=seg[order].astype(np.int64),
        **stats,
    )


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integer keys < 2**32, as one or two 16-bit radix passes (numpy radix-sorts
    16-bit keys in O(n); its generic stable sort is several times slower)."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    keys = keys.astype(np.uint32)
    if int(keys.max()) < 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    low = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    return low[np.argsort((keys[low] >> 16).astype(np.uint16), kind="stable")]


def _random(lengths: np.ndarray, seq_length: int, multiple: int, rng: np.random.Generator, drop_long: bool) -> PackPlan:
    """Seeded order, concatenate, cut into exact seq_length rows (the last row may be shorter); nothing is
    truncated; with drop_long, samples longer than seq_length are left out."""
    order = rng.permutation(len(lengths))
    long = lengths[order] > seq_length
    if drop_long:
        order = order[~long]
    seg = round_up(lengths[order], multiple)
    ends = np.cumsum(seg)
    begins = ends - seg
    first_row = begins // seq_length
    last_row = (ends - 1) // seq_length
    npieces = last_row - first_row + 1
    owner = np.repeat(np.arange(len(order)), npieces)  # position in `order` of each piece
    k = np.arange(len(owner)) - np.repeat(np.cumsum(npieces) - npieces, npieces)  # piece number within its sample
    row = first_row[owner] + k
    piece_begin = np.maximum(begins[owner], row * seq_length)
    piece_end = np.minimum(ends[owner], (row + 1) * seq_length)
    start = piece_begin - begins[owner]
    seg_len = piece_end - piece_begin
    real_len = np.clip(lengths[order][owner] - start, 0, seg_len)
    counts = np.bincount(row, minlength=int(row.max()) + 1 if row.size else 0)
    return PackPlan(
        pack_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        sample=order[owner].astype(np.int64),
        start=start.astype(np.int64),
        length=real_len.astype(np.int64),
        seg_length=seg_len.astype(np.int64),
        dropped=int(long.sum()) if drop_long else 0,
        dropped_tokens=int(lengths[lengths > seq_length].sum()) if drop_long else 0,
    )


def _groups(sizes: np.ndarray):
    """(size, begin, end) runs of equal values in a non-increasing array."""
    if sizes.size == 0:
        return
    change = np.flatnonzero(np.diff(sizes)) + 1
    begins = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(sizes)]])
    for b, e in zip(begins.tolist(), ends.tolist()):
        yield int(sizes[b]), b, e


def _best_fit(sizes: np.ndarray, cap: int) -> np.ndarray:
    """Best-fit on non-increasing sizes; returns the bin of each item.

    Bins are kept in buckets by remaining capacity, with the non-empty capacities in a sorted list (bisect: O(log L)).
    Items of equal size are placed in batches: best fit puts an item of size s into the smallest capacity c >= s,
    and that bin then keeps receiving items of size s until its capacity drops below s (no bin lies between),
    so a whole bucket takes floor(c/s) items per bin at once. This is exactly item-by-item best-fit.
    """
    item_bin = np.empty(len(sizes), dtype=np.int64)
    buckets: dict[int, list[int]] = {}
    caps: list[int] = []  # sorted non-empty capacities
    nbins = 0

    def put(c: int, ids: list[int]) -> None:
        if c <= 0 or not ids:
            return
        if c not in buckets:
            buckets[c] = []
            bisect.insort(caps, c)
        buckets[c].extend(ids)

    for s, b, e in _groups(sizes):
        pos, k = b, e - b
        while k:
            i = bisect.bisect_left(caps, s)
            if i == len(caps):  # open new bins
                q = cap // s
                nb = -(-k // q)
                ids = np.arange(nbins, nbins + nb)
                item_bin[pos : pos + k] = np.repeat(ids, q)[:k]
                rem = k - (nb - 1) * q
                put(cap - q * s, ids[:-1].tolist())
                put(cap - rem * s, [nbins + nb - 1])
                nbins += nb
                break
            c = caps[i]
            bucket = buckets[c]
            q = c // s
            t = min(-(-k // q), len(bucket))
            taken = bucket[:t]
            del bucket[:t]
            if not bucket:
                del buckets[c]
                caps.pop(i)
            n = min(k, t * q)
            item_bin[pos : pos + n] = np.repeat(np.asarray(taken, dtype=np.int64), q)[:n]
            rem = n - (t - 1) * q
            put(c - q * s, taken[:-1])
            put(c - rem * s, taken[-1:])
            pos += n
            k -= n
    return item_bin


def _first_fit(sizes: np.ndarray, cap: int) -> np.ndarray:
    """First-fit on non-increasing sizes; returns the bin of each item.

    Items of equal size are placed per group: first fit sends them to the lowest-numbered bins with room, each bin
    taking floor(room/s) before the next is used (placing items in one bin changes no other bin), which is exactly
    item-by-item first fit. Each group is one vectorized pass over the bins that still have room.
    """
    item_bin = np.empty(len(sizes), dtype=np.int64)
    room = np.zeros(0, dtype=np.int64)  # remaining capacity of every bin, by bin number
    smallest = int(sizes[-1]) if sizes.size else 0
    live = np.zeros(0, dtype=np.int64)  # bins that can still take the smallest item, ascending
    for s, b, e in _groups(sizes):
        k = e - b
        if 2 * s <= cap and live.size:
            cand = live[room[live] >= s]
            if cand.size:
                take = room[cand] // s
                cum = np.cumsum(take)
                t = int(np.searchsorted(cum, k))  # bins cand[:t+1] suffice
                t = min(t, len(cand) - 1)
                used, take = cand[: t + 1], take[: t + 1].copy()
                n = min(k, int(cum[t]))
                take[-1] -= int(cum[t]) - n
                item_bin[b : b + n] = np.repeat(used, take)
                room[used] -= take * s
                b, k = b + n, k - n
                live = live[room[live] >= smallest]
        if k:  # open new bins, each filled with floor(cap/s) items
            q = cap // s
            nb = -(-k // q)
            ids = np.arange(len(room), len(room) + nb)
            item_bin[b:e] = np.repeat(ids, q)[:k]
            fills = np.full(nb, q, dtype=np.int64)
            fills[-1] = k - (nb - 1) * q
            room = np.concatenate([room, cap - fills * s])
            live = np.concatenate([live, ids[room[ids] >= smallest]])
    return item_bin
