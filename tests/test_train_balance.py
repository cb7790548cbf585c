"""Proof of issue 23's balancing on CPU/gloo (2 processes, DP2, the tiny model on real demo shards): laying a global
batch out by cost (`training.balance` packs or segments) changes which rank trains which pack or segment, not the
per-step losses (up to summation order), and a resumed run continues with the same sequence."""
from __future__ import annotations

import pytest

from train_helpers import base_config, launch, losses, make_demo_shards, make_tiny_hf

pytestmark = pytest.mark.multiprocess

STEPS = 4
TOLERANCE = 1e-5  # relative, fp32: the same tokens, summed in another order over other ranks and micro-batches


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama3_tokenizer_path, llamafactory_data_dir):
    """One launch of 2 processes: DP2 unbalanced | packs | segments to step 2 (checkpoint) | segments resumed from
    it to STEPS, on the demo conversations packed greedily into 1024-token rows (8 packs, one half full: room to move
    segments)."""
    w = tmp_path_factory.mktemp("balance")
    hf = make_tiny_hf(w / "hf")
    greedy = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, w / "greedy", "greedy", seq_length=1024)

    def cfg(name: str, balance: str, steps: int = STEPS, ck: str | None = None) -> dict:
        return {"config": base_config(hf, greedy, w / name, training={
            "global_batch_size": 4, "train_steps": steps, "balance": balance},
            data={"valid_split": None}, checkpoint={"dir": str(w / ck) if ck else None, "async_save": False})}

    launch(2, [cfg("none", "none"), cfg("packs", "packs"), cfg("segments", "segments", steps=2, ck="ck_segments"),
               cfg("resumed", "segments", ck="ck_segments")], w, "balance")
    return w


def _records(run_dir) -> dict[int, dict]:
    from megapack.training.run.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def test_balanced_runs_train_the_same_losses_and_resume_the_same_sequence(runs):
    ref = losses(runs / "none")
    assert sorted(ref) == list(range(1, STEPS + 1)) and ref[STEPS] < ref[1]
    # segments: steps 1-2, then a process resumed from its step-2 checkpoint: steps 3-4 (the same sequence, or they
    # would differ from the unbalanced run's)
    segments = losses(runs / "segments") | losses(runs / "resumed")
    assert sorted(losses(runs / "resumed")) == [3, 4]
    for name, other in (("packs", losses(runs / "packs")), ("segments", segments)):
        assert sorted(other) == sorted(ref), name
        worst = max(abs(other[s] - ref[s]) / abs(ref[s]) for s in ref)
        assert worst <= TOLERANCE, f"{name}: relative loss difference {worst:.2e} ({other} against {ref})"
    # the same tokens and conversations each step; the cost balance logged every step, balanced no worse
    rec = {name: _records(runs / name) for name in ("none", "packs")}
    rec["segments"] = _records(runs / "segments") | _records(runs / "resumed")
    for s in ref:
        assert len({(r[s]["trained_tokens"], r[s]["conversations"]) for r in rec.values()}) == 1
        assert rec["packs"][s]["dp_cost_max_mean"] <= rec["none"][s]["dp_cost_max_mean"] + 1e-12
        assert rec["segments"][s]["dp_cost_max_mean"] <= rec["packs"][s]["dp_cost_max_mean"] + 1e-12
    for better, worse in (("packs", "none"), ("segments", "packs")):  # else the proof would be vacuous
        assert any(rec[better][s]["dp_cost_max_mean"] < rec[worse][s]["dp_cost_max_mean"] - 1e-3 for s in ref), \
            f"{better} balanced no step better than {worse}"
