"""Weighted dataset mixtures (`data.blend`): token shares, per-member positions, DP-size-independent resume and
per-member numbers, with real demo shards and real training runs.

One launch (module fixture `runs`, 2 procs): a blend of two demo slices (A 0.7, B 0.3) at DP2, checkpoints every
2 steps, validation at 3 and 6 | the same blend resumed at TP2 x DP1 from the DP2 run's step-2 checkpoint (the
members' ids travel in the TP broadcast) | A alone and B alone, validated (no training) from the DP2 run's final
checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from megapack import seeds
from megapack.errors import MegapackError
from megapack.training.preflight.config import load_config
from train_helpers import base_config, launch, losses, make_demo_shards, make_tiny_hf

STEPS = 6
WEIGHTS = {"A": 0.7, "B": 0.3}


def _schedule(lengths, weights, seed=3, state=None):
    from megapack.training.run.blend import BlendSchedule

    return BlendSchedule([np.asarray(x) for x in lengths], weights, seed, state)


# ------------------------------------------------------------------------------------------ config and sampler

def test_blend_config_is_a_list_of_weighted_shard_directories():
    raw = {"model": {"hf_dir": "m"}, "training": {"global_batch_size": 2},
           "data": {"blend": [{"path": "/d/alpaca", "weight": 0.7}, {"path": "/e/glaive", "weight": 0.3, "name": "g"}]}}
    cfg = load_config(None, raw=raw)
    assert cfg.data.path is None
    assert [(m.name, m.path, m.weight) for m in cfg.data.blend] == [("alpaca", "/d/alpaca", 0.7),
                                                                   ("g", "/e/glaive", 0.3)]
    for data, message in [
        ({"path": "/d", "blend": [{"path": "/d", "weight": 1}]}, "data.path/data.blend: set exactly one of them"),
        ({"blend": [{"path": "/a/x", "weight": 1}, {"path": "/b/x", "weight": 1}]}, "member name 'x' is used twice"),
        ({"blend": [{"path": "/a", "weight": -1}]}, "data.blend.0.weight: Input should be greater than 0"),
        ({"blend": [{"path": "/a", "weight": 1}], "valid_path": "/v"}, "data.valid_path: not used with data.blend"),
    ]:
        with pytest.raises(MegapackError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, raw=raw | {"data": data})


def _check_shares(lengths, weights, packs: int) -> float:
    """Run the schedule for `packs` packs; assert the deficit bound at every pack; returns the worst share error
    once T >= 100 * (M-1) * L (where the bound guarantees 1%)."""
    s = _schedule(lengths, weights)
    w = np.asarray(weights) / sum(weights)
    longest, m = max(int(np.max(x)) for x in lengths), len(lengths)
    tokens, worst = np.zeros(m), 0.0
    for _ in range(packs):
        member, pack = s.next()
        tokens[member] += lengths[member][pack]
        deficit = w * tokens.sum() - tokens
        assert deficit.min() >= -longest - 1e-6 and deficit.max() <= (m - 1) * longest + 1e-6, (deficit, longest)
        if tokens.sum() >= 100 * (m - 1) * longest:
            worst = max(worst, float(np.abs(tokens / tokens.sum() - w).max()))
    assert s.tokens == tokens.astype(int).tolist()
    return worst


def test_realised_token_shares_are_within_one_percent_of_the_weights():
    rng = np.random.default_rng(0)
    # members whose packs hold very different token counts: nearly full packs, short ones, one-conversation packs
    full = rng.integers(3800, 4097, 900)
    short = rng.integers(200, 1200, 300)
    conv = rng.integers(30, 4097, 2000)
    worst = _check_shares([full, short, conv], [0.7, 0.2, 0.1], 60_000)
    assert worst <= 0.01, worst
    assert _check_shares([full, short], [0.5, 0.5], 20_000) <= 0.01
    # the pack shares are not the weights (weights are token shares): short packs are taken more often
    s = _schedule([full, short], [0.5, 0.5])
    members = [s.next()[0] for _ in range(20_000)]
    assert np.mean(np.asarray(members) == 1) > 0.7


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 1.0), st.integers(1, 40), st.integers(1, 512)), min_size=1, max_size=4),
       st.integers(0, 2**32))
def test_deficits_stay_within_the_bound_for_any_weights_and_lengths(members, seed):
    rng = np.random.default_rng(seed)
    lengths = [rng.integers(1, top + 1, n) for _, n, top in members]
    _check_shares(lengths, [w for w, _, _ in members], 400)


def test_each_member_walks_its_own_seeded_epochs():
    s = _schedule([np.full(5, 10), np.full(3, 10)], [0.5, 0.5], seed=11)
    seen = {0: [], 1: []}
    for _ in range(16):
        m, p = s.next()
        seen[m].append(p)
    assert len(seen[0]) == len(seen[1]) == 8

    def order(member: int, epoch: int) -> np.ndarray:
        return seeds.epoch_order(len(s.lengths[member]), 11, epoch, member=member)

    b = seen[1]  # 3 packs: epochs 0, 1 complete and epoch 2 begun, each a permutation in its own seeded order
    assert sorted(b[0:3]) == sorted(b[3:6]) == [0, 1, 2]
    assert b[:3] == order(1, 0).tolist() and b[3:6] == order(1, 1).tolist() and b[6:] == order(1, 2)[:2].tolist()
    assert seen[0][:5] == order(0, 0).tolist() and seen[0][5:] == order(0, 1)[:3].tolist()
    assert order(0, 0).tolist() != order(0, 1).tolist() or order(0, 1).tolist() != order(0, 2).tolist()
    assert s.packs == [8, 8]


def _global_steps(dp: int, steps: int, state=None, consumed: int = 0, weights=(0.7, 0.3)):
    from megapack.training.run.blend import BlendSampler

    lengths = [np.arange(1, 14) * 7, np.arange(1, 6) * 19]
    samplers = [BlendSampler(_schedule(lengths, weights, state=state), ["A", "B"], 8, 2, r, dp, seed=3,
                             consumed_packs=consumed) for r in range(dp)]
    out = []
    for _ in range(steps):
        per_rank = [s.next_step() for s in samplers]
        # slot j of the global batch is micro-batch j // (mbs*dp) of rank (j % (mbs*dp)) // mbs
        slots = [per_rank[(j % (2 * dp)) // 2][j // (2 * dp)][j % 2] for j in range(8)]
        assert slots == samplers[0].step_packs
        out.append(slots)
    return out, samplers[0]


def test_blend_sequence_does_not_depend_on_dp_and_resumes_at_another_dp():
    one, s1 = _global_steps(1, 6)
    two, _ = _global_steps(2, 6)
    four, _ = _global_steps(4, 6)
    assert one == two == four
    _, at3 = _global_steps(2, 3)
    state = json.loads(json.dumps(at3.state_dict()))  # as a checkpoint stores it
    resumed, _ = _global_steps(1, 3, state=state, consumed=at3.consumed_packs)
    assert resumed == one[3:]
    assert sum(s1.schedule.packs) == 48


def test_new_weights_on_resume_continue_every_member_where_it_was():
    lengths = [np.full(7, 50), np.full(5, 50)]
    s = _schedule(lengths, [0.5, 0.5])
    for _ in range(9):
        s.next()
    state = s.state_dict()
    again = _schedule(lengths, [0.5, 0.5], state=state)
    assert not again.reweighted and [again.next() for _ in range(20)] == [s.next() for _ in range(20)]
    new = _schedule(lengths, [0.9, 0.1], state=state)
    assert new.reweighted and new.packs == state["packs"]
    taken = [new.next()[0] for _ in range(100)]
    assert taken.count(0) == 90  # the shares count from the resume point, not over the whole history


def test_micro_batch_carries_each_real_tokens_member():
    from megapack.data.packs.shards import Pack
    from megapack.training.run.batch import build_batch

    def pack(real, padded):
        return Pack(tokens=np.arange(sum(padded)) + 5, loss_mask=np.ones(sum(padded), np.uint8),
                    real_lengths=np.array(real), padded_lengths=np.array(padded))

    b = build_batch([pack([3, 2], [4, 4]), pack([5], [8])], members=[1, 0], row_multiple=24)
    assert b.member.tolist() == [1, 1, 1, -1, 1, 1, -1, -1] + [0] * 5 + [-1] * 3 + [-1] * 8
    assert b.zeroed().member is b.member and b.zeroed().loss_weight.sum() == 0 < b.loss_weight.sum()
    assert build_batch([pack([3], [4])]).member is None


# ------------------------------------------------------------------------------------------ real shards and runs

def _slice_shards(data_dir: Path, tokenizer: Path, out: Path, first: int, count: int, seed: int) -> Path:
    """Greedy shards (seq 256) of demo conversations [first, first+count)."""
    from megapack.cli import main

    if (out / "meta.json").is_file():
        return out
    src = out.parent / f"alpaca_{first}_{count}.json"
    src.write_text(json.dumps(json.loads((data_dir / "alpaca_en_demo.json").read_text())[first : first + count]))
    rc = main(["preprocess", "--input", str(src), "--format", "alpaca", "--tokenizer-model", str(tokenizer),
               "--seq-length", "256", "--packing", "greedy", "--val-fraction", "0.15", "--seed", str(seed),
               "--output-dir", str(out), "--no-progress", "--workers", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, llama3_tokenizer_path, llamafactory_data_dir):
    """The tiny model and two members: demo conversations 0-19 (A) and 48-95 (B), greedy-packed at 256."""
    w = tmp_path_factory.mktemp("blend")
    hf = make_tiny_hf(w / "hf")
    a = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, w / "A", "greedy", records=20,
                         val_fraction=0.15)
    b = _slice_shards(llamafactory_data_dir, llama3_tokenizer_path, w / "B", 48, 48, seed=2)

    def cfg(name: str, data: dict, **sections):
        merged = {"training": {"global_batch_size": 4, "train_steps": STEPS, "eval_interval": 3}}
        for k, v in sections.items():
            merged.setdefault(k, {}).update(v)
        c = base_config(hf, a, w / name, **merged)
        c["data"] = {"seq_length": 256} | data
        return c

    blend = {"blend": [{"path": str(a), "weight": WEIGHTS["A"]}, {"path": str(b), "weight": WEIGHTS["B"]}]}
    return {"dir": w, "hf": hf, "A": a, "B": b, "cfg": cfg, "blend": blend}


def test_members_must_share_seq_length_padding_and_tokenizer(inputs, tmp_path):
    from megapack.training.preflight.plan import preflight

    w, blend = inputs["dir"], inputs["blend"]
    plan = preflight(load_config(None, raw=inputs["cfg"]("plan", blend)), world_size=1)
    assert [m["name"] for m in plan.blend] == ["A", "B"] and plan.blend[0]["weight"] == pytest.approx(0.7)
    assert plan.train_packs == sum(m["train_packs"] for m in plan.blend)
    assert plan.total_steps == STEPS
    # a checkpoint's data identity: other weights are the same data; other members (or order) are not
    from megapack.training.preflight.blend_members import blend_preflight
    from megapack.training.preflight.plan import _check_same_data

    def identity(members):
        config = load_config(None, raw=inputs["cfg"]("plan", {"blend": members}))
        return config, blend_preflight(config)[2]

    saved = {"data_identity": plan.data_identity}
    reweighted = [dict(m, weight=1.0) for m in blend["blend"]]
    _check_same_data(*identity(reweighted)[:1], Path("ck"), saved, identity(reweighted)[1])
    swapped, swapped_identity = identity(blend["blend"][::-1])
    refused = r"^data\.blend: ck was trained on other data \(members A, B -> B, A\); blend the same"
    with pytest.raises(MegapackError, match=refused):
        _check_same_data(swapped, Path("ck"), saved, swapped_identity)
    for key, value, shown in [("seq_length", 128, "seq_length 128, but data.blend[0].path"),
                              ("pad_to_multiple", 16, "pad_to_multiple 16, but data.blend[0].path"),
                              ("tokenizer_identity", "vocab:" + "0" * 64, "tokenizer identity 'vocab:000")]:
        bad = tmp_path / key
        shutil.copytree(inputs["B"], bad)
        meta = json.loads((bad / "meta.json").read_text())
        (bad / "meta.json").write_text(json.dumps(meta | {key: value}))
        data = {"blend": [blend["blend"][0], {"path": str(bad), "weight": 0.3}]}
        with pytest.raises(MegapackError) as err:
            preflight(load_config(None, raw=inputs["cfg"]("plan", data)), world_size=1)
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"data.blend[1].path: {bad} has ") and shown in line, line


def test_token_shares_on_the_demo_members(inputs):
    from megapack.data.packs.shards import ShardDataset

    lengths = [ShardDataset(inputs[m]).pack_lengths(real=True) for m in "AB"]
    assert _check_shares(lengths, [0.7, 0.3], 5_000) <= 0.01
    assert _check_shares(lengths, [0.05, 0.95], 5_000) <= 0.01


@pytest.fixture(scope="module")
def runs(inputs):
    """One launch (2 procs): the blend at DP2 | resumed from its step-2 checkpoint at TP2, i.e. DP1 | A alone and B
    alone, validated (no training) from the DP2 run's final checkpoint."""
    w, cfg, blend = inputs["dir"], inputs["cfg"], inputs["blend"]
    saving = {"save_interval": 2, "keep_last": 3, "async_save": False, "optimizer_sharding": "fully_reshardable"}
    from_final = {"init": "megatron", "megatron_checkpoint": str(w / "ck_dp2" / f"iter_{STEPS:07d}")}
    launch(2, [
        {"config": cfg("dp2", blend, checkpoint={"dir": str(w / "ck_dp2"), **saving}, logging={"tensorboard": True}),
         "pack_log": str(w / "dp2_packs.jsonl")},
        {"config": cfg("dp1_resumed", blend, parallel={"tp": 2},
                       checkpoint={"dir": str(w / "ck_dp1"), "load": str(w / "ck_dp2" / "iter_0000002")}),
         "pack_log": str(w / "dp1_packs.jsonl")},
        {"config": cfg("alone_A", {"path": str(inputs["A"])}, model=from_final), "validate_only": True},
        {"config": cfg("alone_B", {"path": str(inputs["B"])}, model=from_final), "validate_only": True},
    ], w, "blend")
    return w


def _packs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.multiprocess
def test_resume_at_another_dp_reproduces_the_pack_sequence_and_losses(inputs, runs):
    w = runs
    full, resumed = _packs(w / "dp2_packs.jsonl"), _packs(w / "dp1_packs.jsonl")
    assert [r["consumed"] for r in full] == [4 * s for s in range(STEPS)]
    assert resumed == full[2:]  # the same (member, pack) pairs from step 3 on
    sizes = {m: len(__import__("megapack.data.packs.shards", fromlist=["x"]).ShardDataset(inputs[m])) for m in "AB"}
    taken_a = [p for r in full for m, p in r["packs"] if m == 0]
    assert len(taken_a) > sizes["A"] > 8  # A ran out during the run and began its next epoch; the resume at
    assert sorted(taken_a[: sizes["A"]]) == list(range(sizes["A"]))  # step 2 (8 packs) was mid-epoch
    a, b = losses(w / "dp2"), losses(w / "dp1_resumed")
    assert sorted(b) == list(range(3, STEPS + 1))
    for s in b:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])
        for m in "AB":
            ka = losses(w / "dp2", key=f"dataset/{m}/loss")[s]
            assert abs(ka - losses(w / "dp1_resumed", key=f"dataset/{m}/loss")[s]) <= 1e-5 * ka
    for m in "AB":
        va, vb = (losses(d, "valid", f"dataset/{m}/valid_loss") for d in (w / "dp2", w / "dp1_resumed"))
        assert sorted(va) == [3, STEPS] and abs(va[STEPS] - vb[STEPS]) <= 1e-5 * va[STEPS]


@pytest.mark.multiprocess
def test_per_member_numbers_in_metrics_tensorboard_and_summary(inputs, runs):
    from megapack.training.run.metrics import read_metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = runs
    records = read_metrics(w / "dp2" / "metrics.jsonl")
    packs = _packs(w / "dp2_packs.jsonl")
    from megapack.data.packs.shards import ShardDataset

    real = {m: ShardDataset(inputs[k]).pack_lengths(real=True) for m, k in enumerate("AB")}
    for step, rec in records.items():
        batch = packs[step - 1]["packs"]
        for m, name in enumerate("AB"):
            assert rec[f"dataset/{name}/tokens"] == sum(int(real[m][p]) for k, p in batch if k == m)
        assert rec["dataset/A/trained_tokens"] + rec["dataset/B/trained_tokens"] == rec["trained_tokens"]
        la, lb = rec["dataset/A/loss"], rec["dataset/B/loss"]
        ta, tb = rec["dataset/A/trained_tokens"], rec["dataset/B/trained_tokens"]
        if la is not None and lb is not None:  # the step loss is the token-weighted mean of the members'
            assert abs((la * ta + lb * tb) / (ta + tb) - rec["loss"]) <= 1e-5 * rec["loss"]
    summary = json.loads((w / "dp2" / "summary.json").read_text())
    assert summary["dataset/A/packs"] + summary["dataset/B/packs"] == 4 * STEPS
    assert summary["dataset/A/epochs"] == summary["dataset/A/packs"] / len(ShardDataset(inputs["A"])) > 1
    assert summary["dataset/A/tokens"] == sum(r["dataset/A/tokens"] for r in records.values())
    assert summary["dataset/A/final_valid_loss"] == losses(w / "dp2", "valid", "dataset/A/valid_loss")[STEPS]
    assert abs(summary["dataset/A/token_share"] - 0.7) < 0.1 and summary["dataset/A/weight"] == pytest.approx(0.7)
    # `megapack report` puts them in its per-dataset table
    from megapack.report.runs import dataset_numbers, load_run

    numbers = dataset_numbers(load_run(w / "dp2"))
    assert numbers["B"]["trained_tokens"] == summary["dataset/B/trained_tokens"]
    assert numbers["B"]["final_valid_loss"] == summary["dataset/B/final_valid_loss"]
    events = EventAccumulator(str(w / "dp2" / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/dataset/A/loss", "train/dataset/B/trained_tokens", "valid/dataset/B/valid_loss"} <= set(tags)
    # the checkpoint's data position covers every member
    meta = json.loads((w / "ck_dp2" / "iter_0000002" / "megapack.json").read_text())
    position = meta["train_state"]["blend"]
    assert position["names"] == ["A", "B"] and sum(position["packs"]) == 8 == meta["train_state"]["consumed_packs"]


@pytest.mark.multiprocess
def test_member_validation_losses_equal_single_member_runs(runs):
    w = runs
    for m in "AB":
        blended = losses(w / "dp2", "valid", f"dataset/{m}/valid_loss")[STEPS]
        alone = losses(w / f"alone_{m}", "valid", "valid_loss")[0]
        assert abs(blended - alone) <= 1e-6 * alone, (m, blended, alone)
    record = losses(w / "dp2", "valid", "valid_loss")[STEPS]
    va, vb = (losses(w / "dp2", "valid", f"dataset/{m}/valid_loss")[STEPS] for m in "AB")
    assert record == pytest.approx(0.7 * va + 0.3 * vb, rel=1e-12)
