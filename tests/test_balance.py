"""Ranks balanced by attention cost (megapack.training.run.balance and the sampler's use of it): every pack (or
segment) of a global batch trained exactly once, deterministically, balanced on known cases, pipeline slots aligned."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from megapack.training.run.balance import (CostModel, Piece, balance_packs, balance_segments, default_layout,
                                           max_over_mean, repacked_row)
from megapack.training.run.sampler import Balancing, RowOf, TrainSampler

QUADRATIC = CostModel(1.0, 1.0)  # a*s + b*s^2 with a = b = 1


def _flat(layout) -> list:
    return [item for rank in layout.rows for micro in rank for row in micro for item in (row if isinstance(row, tuple)
                                                                                          else [row])]


def test_cost_model_is_the_flop_formula():
    from megapack.model.flops import model_flops

    hf = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 128, "vocab_size": 1000}
    cost, lengths = CostModel.of_model(hf), np.array([3, 50, 7])
    assert cost.pack(lengths) == pytest.approx(model_flops(hf, int(lengths.sum()), int((lengths**2).sum())), rel=1e-12)


def test_default_layout_is_the_unbalanced_sampler():
    layout = default_layout(np.arange(12.0), dp=3, micro_batches=2, mbs=2)
    # pack j -> micro-batch j // (mbs*dp), rank (j % (mbs*dp)) // mbs
    assert layout.rows == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10, 11]]]
    assert layout.costs.tolist() == [[1, 13], [5, 17], [9, 21]]


def test_balance_packs_known_case_every_pack_once_deterministic():
    costs = [10, 9, 1, 2, 8, 7, 3, 4]  # 44 in total: two ranks of 22 are possible
    layout = balance_packs(costs, dp=2, micro_batches=2, mbs=2)
    assert sorted(_flat(layout)) == list(range(8))
    assert layout.rank_costs.tolist() == [22, 22] and layout.imbalance() == 1.0
    assert default_layout(costs, 2, 2, 2).imbalance() == pytest.approx(34 / 22)  # [10,9,8,7] vs [1,2,3,4]
    assert balance_packs(costs, 2, 2, 2).rows == layout.rows  # a pure function
    # each rank's micro-batches heaviest first: slot 0 holds every rank's heavier one
    assert all(list(row) == sorted(row, reverse=True) for row in layout.costs.tolist())


def test_balance_packs_pipeline_slots_are_balanced_across_ranks():
    rng = np.random.default_rng(0)
    costs = rng.lognormal(0, 1, 64)
    layout = balance_packs(costs, dp=4, micro_batches=8, mbs=2)
    assert sorted(_flat(layout)) == list(range(64))
    assert layout.imbalance() < 1.01
    # the heaviest pack (7.1) is over twice the mean micro-batch (3.2): its slot cannot be even; unbalanced 2.42
    assert default_layout(costs, 4, 8, 2).slot_imbalance() > 2.4
    assert layout.slot_imbalance() < 1.19


def test_balance_segments_trades_a_long_segment_for_shorter_ones():
    # two full rows of 100: whole packs leave 50^2+50^2 against 4 * 25^2; trading a 50 for two 25s balances them
    real = [np.array([50, 50]), np.array([25, 25, 25, 25])]
    layout = balance_segments(real, real, QUADRATIC, 100, dp=2, micro_batches=1, mbs=1)
    assert balance_packs([QUADRATIC.pack(r) for r in real], 2, 1, 1).imbalance() == pytest.approx(5100 / 3850)
    assert layout.repacked and layout.imbalance() == 1.0
    pieces = _flat(layout)
    assert sorted((p.pack, p.segment) for p in pieces) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
    rows = [sum(int(real[p.pack][p.segment]) for p in row) for rank in layout.rows for micro in rank for row in micro]
    assert rows == [100, 100]


def test_balance_segments_random_batches_keep_rows_and_segments():
    rng = np.random.default_rng(1)
    seq, packs = 512, []
    while len(packs) < 32:  # rows of random segments up to seq_length
        lengths = []
        while sum(lengths) < seq - 40:
            lengths.append(int(min(rng.lognormal(4, 1) + 8, seq - sum(lengths))))
        packs.append(np.array(lengths))
    padded = [x + (-x % 8) for x in packs]
    padded = [p if p.sum() <= seq else x for p, x in zip(padded, packs)]
    layout = balance_segments(packs, padded, QUADRATIC, seq, dp=4, micro_batches=4, mbs=2)
    again = balance_segments(packs, padded, QUADRATIC, seq, dp=4, micro_batches=4, mbs=2)
    assert layout.rows == again.rows
    seen = Counter((p.pack, p.segment) for p in _flat(layout))
    assert seen == Counter((p, s) for p, x in enumerate(packs) for s in range(len(x)))
    for rank in layout.rows:
        assert len(rank) == 4 and all(len(micro) == 2 for micro in rank)
        for micro in rank:
            assert all(sum(int(padded[p.pack][p.segment]) for p in row) <= seq for row in micro)
    whole = balance_packs([QUADRATIC.pack(x) for x in packs], 4, 4, 2)
    assert layout.imbalance() <= whole.imbalance()


def test_repacked_row_reads_as_a_pack():
    from megapack.data.packs.shards import Pack
    from megapack.training.run.batch import build_batch

    a = Pack(np.arange(10), np.ones(10, np.uint8), np.array([3, 5]), np.array([4, 6]))
    b = Pack(np.arange(100, 106), np.zeros(6, np.uint8), np.array([6]), np.array([6]), continues=True)
    row = repacked_row([(a, 1), (b, 0)])
    assert row.tokens.tolist() == [4, 5, 6, 7, 8, 9, 100, 101, 102, 103, 104, 105]
    assert row.real_lengths.tolist() == [5, 6] and row.padded_lengths.tolist() == [6, 6] and row.continues == 1
    batch = build_batch([row])
    assert batch.cu_seqlens.tolist() == [0, 5, 11] and batch.stats["conversations"] == 1


def _sampler(mode, dp_rank, dp, packs, consumed=0, seq=512):
    lengths = lambda k: (packs[k], packs[k])  # noqa: E731
    return TrainSampler(len(packs), 8, 1, dp_rank, dp, seed=5, consumed_packs=consumed,
                        balancing=Balancing(mode, QUADRATIC, seq, lengths))


@pytest.mark.parametrize("mode", ["none", "packs", "segments"])
def test_sampler_trains_the_same_global_batches_at_any_dp_and_after_resume(mode):
    rng = np.random.default_rng(2)
    packs = [np.array([int(x) for x in rng.integers(8, 120, 4)]) for _ in range(40)]

    def step_items(samplers):
        out = Counter()
        for s in samplers:
            for micro in s.next_step():
                for item in micro:
                    out.update([(k, i) for k, i in item.pieces] if isinstance(item, RowOf)
                               else [(item, i) for i in range(len(packs[item]))])
        return out

    reference = [step_items([_sampler("none", 0, 1, packs)]) for _ in range(1)]
    for dp in (1, 2, 4):
        samplers = [_sampler(mode, r, dp, packs) for r in range(dp)]
        steps = [step_items(samplers) for _ in range(3)]
        assert steps[0] == reference[0]  # the same segments, whoever trains them
        resumed = [_sampler(mode, r, dp, packs, consumed=16) for r in range(dp)]
        assert step_items(resumed) == steps[2]
        assert samplers[0].report()["dp_cost_max_mean"] >= 1.0
    one = [_sampler(mode, r, 4, packs) for r in range(4)]
    again = [_sampler(mode, r, 4, packs) for r in range(4)]
    assert [s.next_step() for s in one] == [s.next_step() for s in again]


def test_max_over_mean():
    assert max_over_mean(np.array([1.0, 3.0])) == 1.5 and max_over_mean(np.zeros(3)) == 1.0
    assert Piece(1, 2) == Piece(1, 2)


def test_report_shows_the_rank_balance(tmp_path):
    from pathlib import Path

    from megapack.report.document import balance_lines
    from megapack.report.runs import Run

    runs = [Run("bfd", Path("."), {}, train=[{"step": 1, "dp_cost_max_mean": 1.02}, {"step": 2,
                                                                                    "dp_cost_max_mean": 1.04}]),
            Run("old", Path("."), {}, train=[{"step": 1, "loss": 2.0}])]
    assert balance_lines(runs) == ["- `bfd`: 1.0300 on average, 1.0400 at worst over 2 logged steps",
                                   "- `old`: not logged"]


@pytest.mark.parametrize("balance,packing,extra,refused", [
    ("packs", "padding", {}, "padding arm"),
    ("segments", "random", {}, "random packing"),
    ("segments", "bfd", {"model": {"cross_sample_attention": True}}, "cross_sample_attention"),
    ("segments", "bfd", {"data": {"path": None, "blend": [{"path": "a", "weight": 1}]}}, "data.blend"),
    ("packs", "random", {}, None), ("segments", "greedy", {}, None), ("none", "padding", {}, None),
])
def test_preflight_refuses_balances_it_cannot_keep(balance, packing, extra, refused):
    from megapack.errors import MegapackError
    from megapack.training.preflight.config import load_config
    from megapack.training.preflight.plan import _check_balance

    raw = {"model": {"hf_dir": "hf"}, "data": {"path": "shards"},
           "training": {"global_batch_size": 8, "balance": balance}}
    for section, values in extra.items():
        raw[section].update(values)
    config = load_config(None, raw=raw)
    if refused is None:
        _check_balance(config, packing)
        return
    with pytest.raises(MegapackError, match=f"^training.balance: .*{refused}"):
        _check_balance(config, packing)


def test_floor_counts_the_rank_that_must_hold_two_long_segments():
    from megapack.training.run.balance_floor import lower_bound

    # 2 ranks x 2 rows of 100: three full-row segments, one row of ten 10s; some rank holds two 100s (pigeonhole):
    # 2 * 10100 over a mean of (3 * 10100 + 10 * 110) / 2 = 15700; the costliest segment alone says 10100 / 15700
    real = [np.array([100]), np.array([100]), np.array([100]), np.full(10, 10)]
    floor = lower_bound(real, real, QUADRATIC, 100, dp=2, rows_per_rank=2)
    assert floor == pytest.approx(20200 / 15700)
    layout = balance_segments(real, real, QUADRATIC, 100, dp=2, micro_batches=2, mbs=1)
    assert layout.imbalance() == pytest.approx(floor)  # no layout of whole segments does better: this one is optimal
    assert lower_bound([np.array([50, 50]), np.array([25] * 4)], [np.array([50, 50]), np.array([25] * 4)], QUADRATIC,
                       100, dp=2, rows_per_rank=1) == 1.0  # the trade test's case: 1.0 reached
