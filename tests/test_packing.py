"""Packing invariants: every token exactly once (or counted as truncated/dropped), no pack over L, no split except
random, determinism per seed, and greedy/bfd bin counts equal item-by-item reference FFD/BFD and near the bound."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megapack.data.packs.packing import PACKINGS, assign_packs, kept_lengths, lower_bound, round_up
from megapack.errors import MegapackError


def reference_fit(sizes: list[int], cap: int, best: bool) -> list[int]:
    """Item-by-item first fit / best fit (quadratic; the textbook definition)."""
    room: list[int] = []
    loads = []
    for s in sizes:
        fits = [j for j, r in enumerate(room) if r >= s]
        if not fits:
            room.append(cap - s)
            continue
        j = min(fits, key=lambda j: (room[j], j)) if best else fits[0]
        room[j] -= s
    loads = sorted(cap - r for r in room)
    return loads


def check_assignment(lengths: np.ndarray, L: int, packing: str, K: int, drop_long: bool, seed: int = 0):
    asg = assign_packs(lengths, L, packing, seed=seed, pad_to_multiple=K, drop_long=drop_long)
    n = len(lengths)
    pack_len = asg.pack_lengths()
    assert (pack_len <= L).all() and (pack_len > 0).all()
    assert (asg.padded_lengths % K == 0).all() and (asg.padded_lengths >= asg.real_lengths).all()
    assert (asg.padded_lengths - asg.real_lengths < K).all()
    # Every token of every conversation appears exactly once, or is counted as truncated / dropped.
    covered = [np.zeros(int(x), dtype=np.int64) for x in lengths]
    for s, st_, ln in zip(asg.conversation, asg.start, asg.real_lengths):
        covered[s][st_ : st_ + ln] += 1
    assert all(((c == 0) | (c == 1)).all() for c in covered)
    missing = sum(int((c == 0).sum()) for c in covered)
    assert missing == asg.truncated_tokens + asg.dropped_tokens
    if packing == "random":
        long = lengths > L
        assert missing == (int(lengths[long].sum()) if drop_long else 0) == asg.dropped_tokens
        assert asg.dropped == (long.sum() if drop_long else 0) and asg.truncated == 0
        # exact-L rows except the last; a conversation is split only across consecutive rows
        assert (pack_len[:-1] == L).all()
    else:
        counts = np.bincount(asg.conversation, minlength=n)
        assert counts.max(initial=0) <= 1, "a conversation was split"
        assert (asg.start == 0).all()
        long = lengths > L
        if drop_long:
            assert (counts[long] == 0).all() and (counts[~long] == 1).all()
            assert asg.dropped == long.sum() and asg.truncated == 0
        else:
            assert (counts == 1).all()
            assert asg.truncated == long.sum()
            assert asg.truncated_tokens == int((lengths[long] - L).sum())
    if packing == "padding":
        assert asg.num_packs == len(asg.conversation)
    return asg


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 90), min_size=0, max_size=60),
    L=st.sampled_from([16, 32, 64]),
    K=st.sampled_from([1, 2, 8]),
    packing=st.sampled_from(PACKINGS),
    drop_long=st.booleans(),
)
def test_invariants(lengths, L, K, packing, drop_long):
    check_assignment(np.array(lengths, dtype=np.int64), L, packing, K, drop_long)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=80), L=st.sampled_from([64, 100]))
def test_greedy_and_bfd_equal_itemwise_reference(lengths, L):
    x = np.array(lengths, dtype=np.int64)
    sizes = sorted(lengths, reverse=True)
    for packing, best in (("greedy", False), ("bfd", True)):
        asg = assign_packs(x, L, packing, seed=3)
        assert sorted(asg.pack_lengths().tolist()) == reference_fit(sizes, L, best)


def test_deterministic_per_seed_and_shuffled():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 500, 2000)
    for packing in PACKINGS:
        a, b = assign_packs(x, 512, packing, seed=7), assign_packs(x, 512, packing, seed=7)
        fields = ("pack_offsets", "conversation", "start", "real_lengths")
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)
        if packing != "padding":
            c = assign_packs(x, 512, packing, seed=8)
            assert not np.array_equal(a.conversation, c.conversation)
    # bfd pack order is not sorted by the length of the first segment
    first = assign_packs(x, 512, "bfd", seed=7).real_lengths[assign_packs(x, 512, "bfd", seed=7).pack_offsets[:-1]]
    assert not (np.diff(first) <= 0).all()


def test_near_lower_bound_on_long_tailed_lengths():
    rng = np.random.default_rng(1)
    x = np.clip(np.exp(rng.normal(np.log(700), 1.0, 20000)), 8, 16384).astype(np.int64)
    L = 4096
    lb = lower_bound(np.minimum(x, L), L)
    greedy, bfd = assign_packs(x, L, "greedy"), assign_packs(x, L, "bfd")
    assert greedy.num_packs <= 1.001 * lb and bfd.num_packs <= 1.001 * lb, (greedy.num_packs, bfd.num_packs, lb)
    rand = assign_packs(x, L, "random")
    assert rand.num_packs == lower_bound(x, L)
    padded = assign_packs(x, L, "bfd", pad_to_multiple=64)
    assert padded.num_packs >= lower_bound(round_up(np.minimum(x, L), 64), L)


def test_the_keep_rule():
    lengths = np.array([5, 16, 17, 40])
    assert kept_lengths(lengths, 16, "bfd", drop_long=False).tolist() == [5, 16, 16, 16]  # truncated
    assert kept_lengths(lengths, 16, "padding", drop_long=True).tolist() == [5, 16, 0, 0]  # dropped
    assert kept_lengths(lengths, 16, "random", drop_long=False).tolist() == [5, 16, 17, 40]  # cut across packs
    assert kept_lengths(lengths, 16, "random", drop_long=True).tolist() == [5, 16, 0, 0]
    for packing in PACKINGS:  # the assignment keeps exactly those tokens
        for drop_long in (False, True):
            asg = assign_packs(lengths, 16, packing, drop_long=drop_long)
            kept = kept_lengths(lengths, 16, packing, drop_long)
            per_conversation = np.bincount(asg.conversation, weights=asg.real_lengths, minlength=len(lengths))
            assert per_conversation.tolist() == kept.tolist()
            assert asg.dropped == int((kept == 0).sum()) and asg.truncated == int(((kept > 0) & (kept < lengths)).sum())


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(seq_length=0), "--seq-length 0"),
        (dict(packing="knapsack"), "--packing 'knapsack'"),
        (dict(pad_to_multiple=3), "--pad-to-multiple 3"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    args = dict(seq_length=64, packing="bfd", pad_to_multiple=1) | kwargs
    with pytest.raises(MegapackError, match=fragment.replace("'", ".")):
        assign_packs(np.array([3, 4]), **args)


def test_padded_length_is_the_padding_arms_rule():
    from megapack.data.packs.padding import PADDED_ARM_MULTIPLE, padded_length, padded_micro_batches

    assert PADDED_ARM_MULTIPLE == 8
    assert padded_length([5, 17]) == 24 and padded_length([16]) == 16 and padded_length(np.array([1])) == 8
    assert padded_length([5, 17], multiple=1) == 17 and padded_length([30, 3], multiple=64) == 64
    with pytest.raises(ValueError):
        padded_length([])
    # every micro-batch `padded_micro_batches` counts is one padded_length wide per conversation
    lengths, order = np.array([5, 17, 9, 30, 3, 64, 65]), np.array([6, 0, 3, 1, 5, 2, 4])
    for size in (1, 2, 3, 7):
        real, computed = padded_micro_batches(lengths, order, size)
        runs = [lengths[order[i : i + size]] for i in range(0, len(order), size)]
        assert real.tolist() == [int(r.sum()) for r in runs]
        assert computed.tolist() == [len(r) * padded_length(r) for r in runs]
