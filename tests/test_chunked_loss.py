"""The chunked vocabulary-parallel loss equals megatron's full-logits loss: losses and every gradient, fp32.

One spawned 2-process gloo job builds the tiny model at TP1 (DP2) and TP2 (with and without sequence parallelism),
tied and untied, with and without cross-sample attention, and runs forward + backward of a packed THD row with token
and per-conversation (sample) loss weights, once with `loss_chunk_tokens: 0` (megatron's loss over the full logits)
and once with chunks of 5 tokens (not a divisor of the row; the vocabulary of 300 is padded to 384 / 512, so the
padded columns are masked on the last shard). Measured differences are ~1e-7 relative; the tests allow 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from model_helpers import make_hf_checkpoint, packed_example, run_workers

pytestmark = pytest.mark.multiprocess

CASES = [  # (tp, sequence_parallel, tied, cross_sample_attention)
    (1, False, False, False), (1, False, True, True), (2, False, False, False), (2, True, False, True),
    (2, False, True, False),
]
TOLERANCE = 1e-5


def _weights(cu: torch.Tensor, per_sample: bool, gen: torch.Generator) -> torch.Tensor:
    """Loss weights [1, t]: random 0/1 token masks, or 1/trained-tokens of each conversation (sample loss)."""
    mask = (torch.rand(int(cu[-1]), generator=gen) > 0.3).float()
    if not per_sample:
        return mask[None]
    out = mask.clone()
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[a:b] /= max(float(mask[a:b].sum()), 1.0)
    return out[None]


def loss_job(untied: str, tied: str) -> dict:
    """Runs in each rank: {case: (max relative loss diff, max relative grad diff, loss)} from the rank's view."""
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from megapack.model.builder import build_model
    from megapack.model.config import load_hf_config
    from megapack.model.hf_import import load_hf_weights
    from megapack.training.run.distributed import destroy_distributed, init_distributed

    _, tokens, positions, cu = packed_example(lengths=(7, 12, 9, 4))
    tokens, positions = tokens.repeat(1, 2), torch.cat([positions, positions + 0], dim=1)  # 64 tokens, 8 segments
    cu = torch.cat([cu, cu[1:] + cu[-1]]).to(torch.int32)
    labels = tokens.roll(-1, dims=1)
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                             max_seqlen_kv=longest)
    out: dict = {}
    for tp, sp, is_tied, cross in CASES:
        init_distributed(tp=tp, pp=1)
        hf_dir = tied if is_tied else untied
        results = {}
        for chunk in (0, 5):
            model = build_model(load_hf_config(hf_dir), seq_length=64, sequence_parallel=sp,
                                cross_sample_attention=cross, loss_chunk_tokens=chunk)
            load_hf_weights(model, hf_dir)
            gen = torch.Generator().manual_seed(7)
            for per_sample in (False, True):
                model.zero_grad(set_to_none=True)
                losses = model(input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels,
                               packed_seq_params=params)
                (losses * _weights(cu, per_sample, gen)).sum().backward()
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
                results[(chunk, per_sample)] = (losses.detach().clone(), grads)
        for per_sample in (False, True):
            (full, g_full), (chunked, g_chunked) = results[(0, per_sample)], results[(5, per_sample)]
            loss_diff = float((full - chunked).abs().max() / full.abs().max())
            grad_diff = max(float((g_full[n] - g_chunked[n]).abs().max() / g_full[n].abs().max().clamp_min(1e-30))
                            for n in g_full)
            out[f"tp{tp}/sp{int(sp)}/tied{int(is_tied)}/cross{int(cross)}/sample{int(per_sample)}"] = (
                loss_diff, grad_diff, float(full.mean()), len(g_full))
        ps.destroy_model_parallel()
    out |= _training_steps(untied, tied)
    destroy_distributed()
    return out


def _training_steps(untied: str, tied: str) -> dict:
    """Per-step losses of 3 training steps at DP2 and PP2 (megatron's DDP, distributed AdamW, fp32) with the full and the
    chunked loss: the chunked one adds into DDP's fp32 main gradient (untied) or returns the gradient (tied)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megapack.model.config import load_hf_config
    from megapack.model.hf_import import load_hf_weights
    from megapack.training.preflight.config import OptimizerConfig
    from megapack.training.run.batch import Batch
    from megapack.training.run.distributed import init_distributed
    from megapack.training.run.loop import build_model_and_optimizer
    from megapack.training.run.step import train_step

    out = {}
    for name, hf_dir, pp in (("untied", untied, 1), ("tied", tied, 1), ("untied_pp2", untied, 2)):
        env = init_distributed(pp=pp)
        gen = torch.Generator().manual_seed(dist.get_rank() if pp == 1 else 0)  # DP ranks: own rows; PP: one row
        tokens = torch.randint(3, 300, (1, 48), generator=gen)
        cu = torch.tensor([0, 20, 31, 48], dtype=torch.int32)
        positions = torch.cat([torch.arange(int(b - a)) for a, b in zip(cu[:-1], cu[1:])])[None]
        batch = Batch(tokens=tokens, positions=positions, targets=tokens.roll(-1, dims=1),
                      loss_weight=(torch.rand(1, 48, generator=gen) > 0.3).float(), cu_seqlens=cu,
                      cu_seqlens_padded=cu, max_seqlen=20, loss_denominator=40)
        losses = {}
        for chunk in (0, 5):
            parts = build_model_and_optimizer(load_hf_config(hf_dir), OptimizerConfig(lr=1e-2), attention_backend="sdpa",
                                              precision="fp32", row_length=48, total_steps=10, loss_chunk_tokens=chunk,
                                              pp=pp, init_weights=lambda model, d=hf_dir: load_hf_weights(model, d))
            losses[chunk] = [train_step(parts.model, parts.optimizer, parts.scheduler, iter([batch]), 1, 48,
                                        env.device)["loss"] for _ in range(3)]
        out[f"train/{name}"] = losses
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked_loss")
    untied = make_hf_checkpoint(root / "untied", tied=False, seed=0)
    tied = make_hf_checkpoint(root / "tied", tied=True, seed=1)
    return run_workers(loss_job, 2, timeout_s=600, untied=str(untied), tied=str(tied))


def test_chunked_loss_equals_megatron_loss_and_gradients(job):
    cases = {k: v for rank in job for k, v in rank.items() if not k.startswith("train/")}
    assert len(cases) == 2 * len(CASES)
    for case, (loss_diff, grad_diff, mean_loss, n_params) in cases.items():
        assert loss_diff <= TOLERANCE and grad_diff <= TOLERANCE, (case, loss_diff, grad_diff)
        assert 4.0 < mean_loss < 12.0 and n_params >= 20, (case, mean_loss, n_params)  # a real loss, all weights


def test_ranks_agree_on_the_loss(job):
    """Both TP ranks see the whole loss (the reductions over the vocabulary shards happened)."""
    first, second = job
    for case in first:
        if case.startswith("tp2"):
            assert abs(first[case][2] - second[case][2]) <= 1e-6, case


def test_training_steps_through_ddp_are_the_same(job):
    """Three optimizer steps at DP2 (DDP's fp32 main gradient, distributed AdamW) and at PP2 (the loss on the last
    stage): the chunked loss trains exactly as megatron's (untied: its weight gradient goes into main_grad; tied:
    through the embedding's gradient)."""
    for name in ("untied", "tied", "untied_pp2"):
        losses = job[0][f"train/{name}"]
        assert losses[0][0] > 4.0 and losses[0][2] < losses[0][0] - 0.05, (name, losses)  # it trains
        for full, chunked in zip(losses[0], losses[5]):
            assert abs(full - chunked) <= 1e-5 * abs(full), (name, losses)
