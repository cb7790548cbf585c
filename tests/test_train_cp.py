"""Multi-process proofs of context parallelism (parallel.cp) on CPU/gloo, fp32, in ONE 4-process launch: CP 2 and
CP 4 reproduce CP 1's per-step losses and gradient norms (token and sample loss; TP2 x CP2 with sequence
parallelism, PP2 x CP2), and checkpoints resume across CP (CP2 -> CP1, CP1 -> CP2) to the uninterrupted losses.

The shards are made for it: odd lengths, segments shorter than 2*cp, segments longer than a rank's share, a pack
whose only trained targets sit in CP rank 0's chunks (the other ranks' shares train nothing), an untrained record.
"""
from __future__ import annotations

import numpy as np
import pytest

from train_helpers import base_config, launch, losses

pytestmark = pytest.mark.multiprocess

STEPS, SEQ = 4, 64
# measured: CP runs differ from CP 1 by <= 1.3e-7 relative on losses and <= 1.5e-6 on gradient norms (summation
# order over DP x CP); a missing K/V gather, chunks placed where megatron's RoPE does not expect them, or a per-shard
# denominator (0.5 at CP 2) move them far beyond 1e-5
RTOL = 1e-5
OPTIMIZER = {"lr": 3e-3, "warmup_steps": 0, "decay_style": "constant"}


def _records(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in [3, 5, 7, 13, 29, 45, 31, 3, 9, 21, 17, 11, 37, 5, 25, 19, 41, 15, 7, 33, 27, 3, 23, 35, 1, 47, 39]:
        mask = (rng.random(n) < 0.6).astype(np.uint8)
        mask[0] = 0
        out.append((rng.integers(1000, 120000, n).astype(np.int64), mask))
    lonely = np.zeros(62, np.uint8)  # alone in its pack (62 + 3 > 64); trained targets in chunk 0 only
    lonely[1:4] = 1
    out.append((rng.integers(1000, 120000, 62).astype(np.int64), lonely))
    out.append((rng.integers(1000, 120000, 9).astype(np.int64), np.zeros(9, np.uint8)))  # nothing trained
    return out


def _tiny_hf(out):
    """The tiny LLaMA model with RoPE base 100 and sharper random attention (initializer_range 0.1), so that a token
    at the wrong position changes the losses well beyond the tolerance."""
    import torch
    import transformers

    from megapack.model.tiny_checkpoint import tiny_llama_config

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**tiny_llama_config(rope_theta=100.0) | {"initializer_range": 0.1})
    transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    """One torchrun of 4 processes: every CP layout, the references and the cross-CP resumptions."""
    from megapack.data.packs.writer import RecordStore, write_shard_dir

    w = tmp_path_factory.mktemp("cp")
    hf = _tiny_hf(w / "hf")
    shards = w / "shards"
    write_shard_dir(RecordStore.from_encoded(_records()), shards, seq_length=SEQ, packing="bfd", vocab_size=128256,
                    pad_id=0)

    def job(name: str, cp: int = 1, tp: int = 1, pp: int = 1, sp: bool = False, reduction: str = "token",
            ck: str | None = None, sharding: str = "dp_reshardable", **extra) -> dict:
        cfg = base_config(hf, shards, w / name, optimizer=OPTIMIZER,
                          parallel={"tp": tp, "pp": pp, "cp": cp, "sequence_parallel": sp},
                          training={"global_batch_size": 4, "train_steps": STEPS, "loss_reduction": reduction},
                          checkpoint={"dir": str(w / ck) if ck else None, "save_interval": 100,
                                      "optimizer_sharding": sharding})
        return {"config": cfg, **extra}

    jobs = [
        job("ref"), job("cp2", cp=2), job("cp4", cp=4), job("tp2cp2sp", cp=2, tp=2, sp=True),
        job("pp2cp2", cp=2, pp=2),
        job("ref_sample", reduction="sample"), job("cp4_sample", cp=4, reduction="sample"),
        job("tp2cp2sp_sample", cp=2, tp=2, sp=True, reduction="sample"),
        # stopped after step 2 (SIGUSR1: checkpoint and exit), resumed at the other CP size: DP2 x CP2 -> TP2 x DP2
        # (the optimizer's DP x CP shards go from 4 ranks to 2), DP4 -> DP2 x CP2 (the data stream at another DP)
        job("cp2_then_cp1", cp=2, ck="ck_a", sharding="fully_reshardable", signal_at_step=2),
        job("cp2_then_cp1", tp=2, ck="ck_a", sharding="fully_reshardable"),
        job("cp1_then_cp2", ck="ck_b", signal_at_step=2), job("cp1_then_cp2", cp=2, ck="ck_b"),
    ]
    launch(4, jobs, w, "CP", timeout=600)
    return w


def _records_of(run_dir, key: str) -> list[float]:
    got = losses(run_dir, key=key)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    return [got[s] for s in sorted(got)]


@pytest.mark.parametrize("run,ref", [("cp2", "ref"), ("cp4", "ref"), ("tp2cp2sp", "ref"), ("pp2cp2", "ref"),
                                     ("cp4_sample", "ref_sample"), ("tp2cp2sp_sample", "ref_sample")])
def test_context_parallel_reproduces_cp1(cp_runs, run, ref):
    """Per-step losses and gradient norms of a CP layout equal CP 1's (fp32, rtol 1e-5)."""
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(_records_of(cp_runs / run, key), _records_of(cp_runs / ref, key), rtol=RTOL)
    # the counters are the global batch's, not multiplied by CP
    for key in ("trained_tokens", "conversations", "real_tokens"):
        assert losses(cp_runs / run, key=key) == losses(cp_runs / ref, key=key)


@pytest.mark.parametrize("run", ["cp2_then_cp1", "cp1_then_cp2"])
def test_resume_across_cp_sizes(cp_runs, run):
    """A checkpoint of step 2 resumed at the other CP size continues with the uninterrupted run's losses."""
    np.testing.assert_allclose(_records_of(cp_runs / run, "loss"), _records_of(cp_runs / "ref", "loss"), rtol=RTOL)
    if run == "cp2_then_cp1":
        from megapack.model.checkpoint import read_metadata

        assert read_metadata(cp_runs / "ck_a" / "iter_0000002")["saved_with"] == {"tp": 1, "pp": 1, "dp": 2, "cp": 2}
