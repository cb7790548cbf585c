"""Context parallelism in one process: the row layout over CP ranks, RoPE positions under megatron's THD code, and
CP attention (explicit mask, and the per-chunk varlen inputs through an SDPA emulation of varlen) against the
whole row's attention. The multi-process proofs (CP 2/4 reproduce CP 1 in training) are in test_train_cp.py."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megapack.errors import MegapackError
from megapack.model.attention import block_causal_mask, cp_attention_inputs
from megapack.model.context_parallel import CPLayout, cp_row_index
from megapack.training.run.batch import build_batch, context_parallel_share

# odd lengths, segments shorter than 2*cp, one longer than a rank's share, an untrained one
LENGTHS = [3, 29, 1, 7, 50]
MASKS = [[0, 1, 1], [0] * 14 + [1] * 15, [0], [0, 0, 1, 1, 1, 1, 1], [0, 1, 1] + [0] * 47]


def _pack(lengths=LENGTHS, masks=MASKS, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([rng.integers(10, 1000, n) for n in lengths])
    return SimpleNamespace(tokens=tokens, loss_mask=np.concatenate([np.asarray(m, np.uint8) for m in masks]),
                           real_lengths=np.asarray(lengths), padded_lengths=np.asarray(lengths), continues=False)


@pytest.mark.parametrize("cp", [2, 4])
def test_shares_cover_the_row_once_with_segment_positions(cp):
    whole = build_batch([_pack()], segment_multiple=2 * cp, row_multiple=2 * cp * 2)
    assert (np.diff(whole.cu_seqlens_padded) % (2 * cp) == 0).all()
    shares = [context_parallel_share(whole, r, cp) for r in range(cp)]
    index = np.concatenate([cp_row_index(whole.cu_seqlens_padded, r, cp) for r in range(cp)])
    assert sorted(index.tolist()) == list(range(len(whole.tokens)))
    for r, share in enumerate(shares):
        idx = cp_row_index(whole.cu_seqlens_padded, r, cp)
        assert np.array_equal(share.tokens, whole.tokens[idx])
        assert np.array_equal(share.positions, whole.positions[idx])  # place in its own segment, not local index
        assert share.stats == whole.stats and np.array_equal(share.cu_seqlens_padded, whole.cu_seqlens_padded)
        assert share.loss_denominator == (whole.loss_denominator if r == 0 else 0)
        # chunks r and 2cp-1-r of the first segment, in that order
        c = int(whole.cu_seqlens_padded[1]) // (2 * cp)
        assert idx[:2 * c].tolist() == [*range(r * c, (r + 1) * c), *range((2 * cp - 1 - r) * c, (2 * cp - r) * c)]
    # every trained target of the whole row is trained on exactly one rank, with the same weight
    assert sum(float(s.loss_weight.sum()) for s in shares) == pytest.approx(float(whole.loss_weight.sum()))
    # CP padding adds no trained target and keeps every real token
    plain = build_batch([_pack()])
    assert whole.loss_denominator == plain.loss_denominator and whole.stats["real_tokens"] == sum(LENGTHS)


def test_a_share_with_no_trained_token():
    """The 50-token segment trains positions 1-2 only: at CP 4, ranks 1-3 hold no trained target of it."""
    whole = build_batch([_pack([50], [MASKS[-1]])], segment_multiple=8)
    weights = [float(context_parallel_share(whole, r, 4).loss_weight.sum()) for r in range(4)]
    assert weights[0] == 2 and weights[1:] == [0, 0, 0]


@pytest.mark.parametrize("cp", [2, 4])
def test_megatron_thd_rope_gives_each_token_its_segment_position(cp):
    """megatron's `_apply_rotary_pos_emb_thd` on a CP rank's share (whole-row padded cu_seqlens) equals RoPE at the
    batch's positions: each token's place in its own segment (Megatron-LM #5243 gave later documents document 0's)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd, _apply_rotary_pos_emb_thd

    whole = build_batch([_pack()], segment_multiple=2 * cp)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angles = torch.outer(torch.arange(int(whole.max_seqlen), dtype=torch.float64), inv_freq)
    freqs = torch.cat([angles, angles], -1)[:, None, None, :]  # megatron's RotaryEmbedding layout [s, 1, 1, d]
    cu = torch.as_tensor(whole.cu_seqlens_padded)
    for r in range(cp):
        share = context_parallel_share(whole, r, cp)
        x = torch.randn(len(share.tokens), 2, 8, dtype=torch.float64)
        got = _apply_rotary_pos_emb_thd(x, cu, freqs.double(), cp_group=SimpleNamespace(size=lambda: cp,
                                                                                        rank=lambda: r))
        want = _apply_rotary_pos_emb_bshd(x[:, None], freqs.double()[torch.as_tensor(share.positions)])[:, 0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_uneven_segments_are_refused():
    with pytest.raises(MegapackError, match="parallel.cp"):
        cp_row_index(np.array([0, 6, 10]), 0, 2)


def _varlen_emulation(q, k, v, cu_q, cu_k, scale):
    """flash-attn / torch varlen semantics with SDPA: per sequence, causal aligned to the keys' end."""
    out = []
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        nq, nk = int(b - a), int(d - c)
        allowed = torch.ones(nq, nk, dtype=torch.bool).tril_(nk - nq)
        groups = q.shape[1] // k.shape[1]
        kk, vv = (x[c:d].repeat_interleave(groups, 1).transpose(0, 1) for x in (k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), kk, vv, attn_mask=allowed, scale=scale).transpose(0, 1))
    return torch.cat(out)


class _Group:
    """What cp_attention_inputs asks of a process group, for one simulated rank."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_equals_the_whole_rows(cp, monkeypatch):
    """Each rank's queries against the gathered keys (mask for sdpa; per-chunk cu_seqlens for the varlen kernels,
    run here through an SDPA emulation of varlen) give the whole row's block-causal attention at its tokens."""
    import torch.distributed as dist

    whole = build_batch([_pack(), _pack([9, 40], [[1] * 9, [1] * 40], seed=1)], segment_multiple=2 * cp)
    total, heads, groups, dim, scale = len(whole.tokens), 4, 2, 8, 0.3
    torch.manual_seed(0)
    q, k, v = torch.randn(total, heads, dim), torch.randn(total, groups, dim), torch.randn(total, groups, dim)
    cu = torch.as_tensor(whole.cu_seqlens_padded)
    allowed = block_causal_mask(cu, total, q.device)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=allowed, scale=scale).transpose(0, 1)
    monkeypatch.setattr(dist, "get_rank", lambda group: group.rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group: group.size)
    for r in range(cp):
        layout = CPLayout.of(whole.cu_seqlens_padded, r, cp)
        ql, kg, vg = q[layout.local], k[layout.gathered], v[layout.gathered]  # what the all-gather returns
        params = SimpleNamespace(cu_seqlens_q_padded=cu, cu_seqlens_q=None)
        mask = cp_attention_inputs(params, _Group(r, cp), len(layout.local), "sdpa", q.device)
        got = torch.nn.functional.scaled_dot_product_attention(
            ql.transpose(0, 1), kg.repeat_interleave(2, 1).transpose(0, 1), vg.repeat_interleave(2, 1).transpose(0, 1),
            attn_mask=mask, scale=scale).transpose(0, 1)
        torch.testing.assert_close(got, reference[layout.local], rtol=1e-5, atol=1e-6)
        params = SimpleNamespace(cu_seqlens_q_padded=cu, cu_seqlens_q=None)
        cu_q, cu_k, index, max_q, max_k = cp_attention_inputs(params, _Group(r, cp), len(layout.local), "flash",
                                                              q.device)
        assert max_q == int(torch.diff(cu_q).max()) and max_k == int(torch.diff(cu_k).max())
        got = _varlen_emulation(ql, kg[index], vg[index], cu_q, cu_k, scale)
        torch.testing.assert_close(got, reference[layout.local], rtol=1e-5, atol=1e-6)
