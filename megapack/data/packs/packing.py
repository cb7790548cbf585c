"""Packing algorithms: pure functions from conversation lengths to a pack assignment (deterministic for a seed).

A `PackAssignment` lists, for every pack, the segments it holds as (conversation, start, real length, padded
length): `real length` tokens taken from `conversation` beginning at token `start`, padded with pad tokens up to the
`padded length` (a multiple of `pad_to_multiple`). Each segment becomes one entry of the pack's `cu_seqlens`.
Which tokens of a conversation go into packs at all is the keep rule, `kept_lengths`. Only `random` splits
conversations.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from megapack import seeds
from megapack.errors import MegapackError

PACKINGS = ("padding", "random", "greedy", "bfd")


@dataclass
class PackAssignment:
    """Which segments of which conversations go into each pack, plus what was truncated or dropped."""

    pack_offsets: np.ndarray  # int64 [num_packs + 1]: segments of pack p are [pack_offsets[p], pack_offsets[p+1])
    conversation: np.ndarray  # int64 [num_segments]: conversation index of each segment
    start: np.ndarray  # int64 [num_segments]: first token of the segment within its conversation
    real_lengths: np.ndarray  # int64 [num_segments]: real tokens in the segment
    padded_lengths: np.ndarray  # int64 [num_segments]: segment length incl. padding to pad_to_multiple
    truncated: int = 0  # conversations cut to seq_length (padding, greedy, bfd)
    truncated_tokens: int = 0
    dropped: int = 0  # conversations longer than seq_length left out (drop_long)
    dropped_tokens: int = 0

    @property
    def num_packs(self) -> int:
        """Number of packs."""
        return len(self.pack_offsets) - 1

    def pack_lengths(self) -> np.ndarray:
        """Total padded length (tokens incl. padding) of every pack."""
        sums = np.concatenate([[0], np.cumsum(self.padded_lengths)])
        return sums[self.pack_offsets[1:]] - sums[self.pack_offsets[:-1]]


def round_up(lengths: np.ndarray, multiple: int) -> np.ndarray:
    """Each length rounded up to a multiple of `multiple`."""
    return -(-lengths // multiple) * multiple


def lower_bound(padded_lengths: np.ndarray, seq_length: int) -> int:
    """ceil(sum of padded segment lengths / seq_length): no packing can use fewer packs."""
    return int(-(-int(np.sum(padded_lengths, dtype=np.int64)) // seq_length))


def kept_lengths(lengths: np.ndarray, seq_length: int, packing: str, drop_long: bool) -> np.ndarray:
    """The keep rule: how many tokens of each conversation go into packs. `random` keeps all of them (it cuts
    conversations across packs), the others the first seq_length (truncation); with `drop_long` a conversation
    longer than seq_length keeps none (dropped)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    kept = lengths.copy() if packing == "random" else np.minimum(lengths, seq_length)
    if drop_long:
        kept[lengths > seq_length] = 0
    return kept


def _keep_counts(lengths: np.ndarray, kept: np.ndarray) -> dict:
    """Conversations (and their tokens) the keep rule truncated and dropped."""
    cut, dropped = (kept > 0) & (kept < lengths), kept == 0
    return dict(truncated=int(cut.sum()), truncated_tokens=int((lengths - kept)[cut].sum()),
                dropped=int(dropped.sum()), dropped_tokens=int(lengths[dropped].sum()))


def assign_packs(
    lengths: np.ndarray,
    seq_length: int,
    packing: str = "bfd",
    *,
    seed: int = 0,
    pad_to_multiple: int = 1,
    drop_long: bool = False,
) -> PackAssignment:
    """Assign conversations with the given token lengths to packs (see the module docstring)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if packing not in PACKINGS:
        raise MegapackError(f"--packing {packing!r}: expected one of {', '.join(PACKINGS)}")
    if seq_length <= 0:
        raise MegapackError(f"--seq-length {seq_length}: expected a positive integer")
    if pad_to_multiple <= 0 or seq_length % pad_to_multiple:
        raise MegapackError(f"--pad-to-multiple {pad_to_multiple}: expected a positive divisor of "
                            f"--seq-length {seq_length}")
    if lengths.ndim != 1 or (lengths.size and lengths.min() <= 0):
        raise MegapackError("conversation lengths: expected a 1-D array of positive integers")
    seeds.check_seed(seed, "--seed")
    kept_len = kept_lengths(lengths, seq_length, packing, drop_long)
    counts = _keep_counts(lengths, kept_len)
    if packing == "random":
        return _random(kept_len, seq_length, pad_to_multiple, seeds.rng(seed, "packing"), counts)

    kept = np.flatnonzero(kept_len)  # every conversation but the dropped ones
    real = kept_len[kept]
    padded = round_up(real, pad_to_multiple)
    if packing == "padding":
        bins = np.arange(len(kept), dtype=np.int64)
        placement = np.arange(len(kept), dtype=np.int64)
    else:
        placement = _stable_argsort(seq_length - padded)  # decreasing length, ties by conversation index
        fit = _first_fit if packing == "greedy" else _best_fit
        bins = fit(padded[placement], seq_length)
        # Shuffle pack order so training does not see packs sorted by length (a stream of its own: the trainer's
        # epoch order must not undo it).
        bins = seeds.rng(seed, "pack_order").permutation(int(bins.max()) + 1 if bins.size else 0)[bins]
    return _assignment_from_bins(kept, real, padded, placement, bins, counts)


def _assignment_from_bins(
    kept: np.ndarray, real: np.ndarray, padded: np.ndarray, placement: np.ndarray, bins: np.ndarray, counts: dict
) -> PackAssignment:
    """Group placed items by bin; within a bin, segments keep their placement order."""
    order = placement[_stable_argsort(bins)]
    per_bin = np.bincount(bins, minlength=int(bins.max()) + 1 if bins.size else 0)
    offsets = np.concatenate([[0], np.cumsum(per_bin)]).astype(np.int64)
    return PackAssignment(
        pack_offsets=offsets,
        conversation=kept[order].astype(np.int64),
        start=np.zeros(len(order), dtype=np.int64),
        real_lengths=real[order].astype(np.int64),
        padded_lengths=padded[order].astype(np.int64),
        **counts,
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


def _random(kept: np.ndarray, seq_length: int, multiple: int, rng: np.random.Generator, counts: dict) -> PackAssignment:
    """Seeded order, concatenate, cut into exact seq_length rows (the last row may be shorter); nothing is
    truncated; conversations the keep rule dropped (kept 0 tokens) are left out."""
    order = rng.permutation(len(kept))
    order = order[kept[order] > 0]
    padded = round_up(kept[order], multiple)
    ends = np.cumsum(padded)
    begins = ends - padded
    first_row = begins // seq_length
    last_row = (ends - 1) // seq_length
    nsegments = last_row - first_row + 1
    owner = np.repeat(np.arange(len(order)), nsegments)  # position in `order` of each segment
    # segment number within its conversation
    k = np.arange(len(owner)) - np.repeat(np.cumsum(nsegments) - nsegments, nsegments)
    row = first_row[owner] + k
    segment_begin = np.maximum(begins[owner], row * seq_length)
    segment_end = np.minimum(ends[owner], (row + 1) * seq_length)
    start = segment_begin - begins[owner]
    padded_len = segment_end - segment_begin
    real_len = np.clip(kept[order][owner] - start, 0, padded_len)
    per_row = np.bincount(row, minlength=int(row.max()) + 1 if row.size else 0)
    return PackAssignment(
        pack_offsets=np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64),
        conversation=order[owner].astype(np.int64),
        start=start.astype(np.int64),
        real_lengths=real_len.astype(np.int64),
        padded_lengths=padded_len.astype(np.int64),
        **counts,
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
