"""Context parallelism on real weights and long rows (issue 23's last proofs), in ONE 2-process launch, fp32, gloo,
through `megapack train`'s code path (the Trainer, as tests/test_train_cp.py):

- SmolLM2-135M-Instruct (real weights, `model.init: hf`) on real LLaMA-Factory demo chats rendered with its own chat
  template (`--template hf`), rows packing several conversations: CP 2 (DP 1) reproduces CP 1 (DP 2) per step, on
  the same packs per step (the sampler's global batch depends on neither DP nor CP: checked), token loss, 2 steps.
- 8,192-token rows of `megapack demo`'s tiny model (tiny_llama_config(), its seed and tokenizer): CP 2 reproduces
  CP 1. Its random attention is close to uniform, so the same row with cross-sample attention is run as well: it
  must move the loss and gradient norm far beyond the tolerance, or the CP comparison would prove little.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from train_helpers import base_config, launch, losses

pytestmark = pytest.mark.multiprocess

SMOL_SEQ, SMOL_STEPS, LONG_SEQ = 512, 2, 8192
# measured 2026-12-03: SmolLM2's CP 2 differs from CP 1 by <= 7.1e-8 relative on losses and <= 2.5e-7 on gradient
# norms (summation order over DP x CP); the demo model's 8K rows give identical numbers (difference 0)
# K/V not gathered (each rank's own keys in every slot): SmolLM2's loss 1.64 -> 3.20; the 8K rows' loss moves only
# 5.1e-7 (hence 2e-7 there) and their gradient norm 3.5%
# chunks misplaced (rank r keeps chunks 2r, 2r+1): SmolLM2's loss +23%; the 8K rows' loss 8.6e-7, gradient norm 8.8e-6
RTOL, RTOL_LONG = 1e-5, 2e-7
OPTIMIZER = {"lr": 1e-4, "warmup_steps": 0, "decay_style": "constant"}


def _preprocess(src, tokenizer, out, seq_length: int, template: list[str]):
    from megapack.cli import main

    rc = main(["preprocess", "--input", str(src), "--format", "alpaca", "--tokenizer-model", str(tokenizer),
               *template, "--seq-length", str(seq_length), "--packing", "bfd", "--val-fraction", "0",
               "--seed", "1", "--output-dir", str(out), "--no-progress", "--workers", "1"])
    assert rc == 0, f"preprocess failed ({rc})"
    return out


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, smollm2_dir, llama3_tokenizer_path, llamafactory_data_dir):
    """One torchrun of 2 processes: the demo model's 8K rows at CP 1, CP 2 and CP 1 with cross-sample attention;
    SmolLM2 at CP 1 (DP 2) and CP 2 (DP 1); global batch 2 rows."""
    from megapack.model.tiny_checkpoint import tiny_llama_config, write_tiny_checkpoint

    w = tmp_path_factory.mktemp("cpreal")
    demo = json.loads((llamafactory_data_dir / "alpaca_en_demo.json").read_text())
    (w / "smol.json").write_text(json.dumps(demo[:24]))
    (w / "long.json").write_text(json.dumps(demo[:160]))
    smol_shards = _preprocess(w / "smol.json", smollm2_dir, w / "smol_shards", SMOL_SEQ, ["--template", "hf"])
    long_shards = _preprocess(w / "long.json", llama3_tokenizer_path, w / "long_shards", LONG_SEQ, [])
    demo_hf = write_tiny_checkpoint(w / "tiny-llama3", tiny_llama_config(), seed=0,
                                    tokenizer_model=llama3_tokenizer_path)

    def job(name: str, hf, shards, steps: int, cp: int, **model) -> dict:
        cfg = base_config(hf, shards, w / name, optimizer=OPTIMIZER, parallel={"cp": cp},
                          training={"global_batch_size": 2, "train_steps": steps},
                          model=model)
        return {"config": cfg, "rank_pack_log": str(w / f"{name}.packs")}

    # the long rows first, in fresh processes (their attention masks and scores are the launch's memory peak)
    jobs = [job("long_cp1", demo_hf, long_shards, 1, 1), job("long_cp2", demo_hf, long_shards, 1, 2),
            job("long_cross", demo_hf, long_shards, 1, 1, cross_sample_attention=True),
            job("smol_cp1", smollm2_dir, smol_shards, SMOL_STEPS, 1), job("smol_cp2", smollm2_dir, smol_shards,
                                                                          SMOL_STEPS, 2)]
    launch(2, jobs, w, "CPREAL", timeout=1500)
    return w


def _per_step(run_dir, key: str, steps: int) -> list[float]:
    got = losses(run_dir, key=key)
    assert sorted(got) == list(range(1, steps + 1)), got
    return [got[s] for s in sorted(got)]


def _packs(w, name: str) -> list[list[int]]:
    """Per step, the sorted pack keys the run's 2 ranks trained (a key trained by both CP ranks counts once)."""
    per_rank = [[json.loads(line) for line in (w / f"{name}.packs.rank{r}").read_text().splitlines()] for r in (0, 1)]
    return [sorted({k for rank in step for micro in rank for k in micro}) for step in zip(*per_rank)]


def test_smollm2_cp2_reproduces_cp1(real_runs):
    """SmolLM2's real weights on packed real chats: CP 2 trains the same packs per step as CP 1 at DP 2 and gives
    the same per-step losses and gradient norms (fp32, rtol 1e-5)."""
    cp1, cp2 = real_runs / "smol_cp1", real_runs / "smol_cp2"
    steps = _packs(real_runs, cp1.name)
    assert steps == _packs(real_runs, cp2.name) and all(len(packs) == 2 for packs in steps)
    assert min(losses(cp1, key="conversations").values()) > 2  # several conversations per global batch of 2 rows
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(_per_step(cp2, key, SMOL_STEPS), _per_step(cp1, key, SMOL_STEPS), rtol=RTOL)
    assert losses(cp2, key="trained_tokens") == losses(cp1, key="trained_tokens")


def test_demo_model_8k_rows_cp2_reproduces_cp1(real_runs):
    """8,192-token rows of the demo model: CP 2 equals CP 1 (rtol 2e-7), while letting the packed conversations see
    each other changes the loss and gradient norm by far more (attention is not uniform enough to hide a mistake)."""
    cp1, cp2, cross = (real_runs / n for n in ("long_cp1", "long_cp2", "long_cross"))
    steps = _packs(real_runs, "long_cp1")
    assert steps == _packs(real_runs, "long_cp2") and len(steps[0]) == 2
    assert losses(cp1, key="real_tokens")[1] > 1.4 * LONG_SEQ  # 8K rows, mostly filled
    for key, factor in (("loss", 50), ("grad_norm", 1000)):  # cross-sample moved them 1.5e-4 and 1.5e-2
        ref = _per_step(cp1, key, 1)
        np.testing.assert_allclose(_per_step(cp2, key, 1), ref, rtol=RTOL_LONG)
        moved = abs(_per_step(cross, key, 1)[0] - ref[0]) / abs(ref[0])
        assert moved > factor * RTOL_LONG, (key, moved)
