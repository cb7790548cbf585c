"""Packed (THD) core attention for megatron-core's local layer spec: flash-attn, torch varlen, or SDPA backends.

megatron-core's local DotProductAttention rejects `packed_seq_params`. This module takes its place in the
ModuleSpec. In THD mode megatron has already squeezed the batch dimension and restarted RoPE per sub-sequence,
so q is `[t, heads, dim]`, k/v are `[t, kv_heads, dim]`, and the result must be `[t, heads, dim]`. Without
packed_seq_params (padded micro-batches) q is `[s, b, heads, dim]` and the result is `[s, b, heads * dim]`; under
megatron's KV cache (megapack.model.generate) k/v hold every cached position and q the last s of them.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Any

import numpy as np
import torch
from megatron.core.transformer.module import MegatronModule

from megapack.errors import MegapackError

BACKENDS = ("flash", "torch_varlen", "sdpa")


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Segment index of each of `total` packed tokens."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def block_causal_mask(cu_seqlens: torch.Tensor | None, total: int, device: torch.device) -> torch.Tensor:
    """Bool `[total, total]` mask, True where a query may attend a key: causal and (given cu_seqlens) same segment."""
    allowed = torch.ones(total, total, dtype=torch.bool, device=device).tril_()
    if cu_seqlens is not None:
        seg = segment_ids(cu_seqlens.to(device), total)
        allowed &= seg[:, None] == seg[None, :]
    return allowed


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[b, h, s, d]`, k/v `[b, g, s, d]`, allowed `[s, s]` or `[b, 1, s, s]` -> `[b, h, s, d]`."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _varlen_kwargs() -> dict[str, Any]:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def cuda_kernel_available(module: str, attribute: str | None = None) -> bool:
    """Whether CUDA is present and `module` (and its `attribute`, when given) imports."""
    if not torch.cuda.is_available():
        return False
    try:
        found = importlib.import_module(module)
    except ImportError:
        return False
    return attribute is None or hasattr(found, attribute)


def flash_available() -> bool:
    """Whether flash-attn imports and CUDA is present."""
    return cuda_kernel_available("flash_attn")


def torch_varlen_available() -> bool:
    """Whether `torch.nn.attention.varlen.varlen_attn` exists and CUDA is present."""
    return cuda_kernel_available("torch.nn.attention.varlen", "varlen_attn")


def cp_attention_inputs(params, group, local_tokens: int, backend: str, device: torch.device):
    """What CP attention needs from a micro-batch's PackedSeqParams (the whole row's padded cu_seqlens), computed
    once per micro-batch and kept on it: the `[local, gathered]` mask (sdpa), or (cu_q, cu_k, key index, max_q,
    max_k) over the local chunks and their key prefixes (varlen kernels)."""
    import torch.distributed as dist

    from megapack.model.context_parallel import CPLayout

    key = ("_megapack_cp", backend == "sdpa", dist.get_rank(group), dist.get_world_size(group))
    cached = getattr(params, "_megapack_cp_inputs", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    cu_padded = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
    cu = cu_padded.detach().cpu().numpy()
    layout = CPLayout.of(cu, key[2], key[3])
    if len(layout.local) != local_tokens:
        raise MegapackError(f"parallel.cp: this rank holds {local_tokens} tokens but the row's cu_seqlens_padded "
                            f"give it {len(layout.local)} (pass the whole row's padded boundaries)")
    if backend == "sdpa":
        inputs = torch.from_numpy(layout.mask(cu)).to(device)
    else:
        cu_q, cu_k, index = layout.chunk_prefixes(cu)
        inputs = (torch.from_numpy(cu_q).to(device, torch.int32), torch.from_numpy(cu_k).to(device, torch.int32),
                  torch.from_numpy(index).to(device), int(np.diff(cu_q).max()), int(np.diff(cu_k).max()))
    params._megapack_cp_inputs = (key, inputs)
    return inputs


class PackedCoreAttention(MegatronModule):
    """Causal core attention that keeps packed sequences apart (or not, for the cross-sample ablation)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: str = "sdpa",
        cross_sample_attention: bool = False,
    ) -> None:
        super().__init__(config=config)
        if backend not in BACKENDS:
            raise MegapackError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.cp_group = None
        if config.context_parallel_size > 1:
            if cross_sample_attention:
                raise MegapackError("model.cross_sample_attention is not available with parallel.cp > 1")
            from megatron.core import parallel_state

            self.cp_group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
        self.backend = backend
        self.cross_sample_attention = cross_sample_attention
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self._varlen_kwargs = _varlen_kwargs() if backend == "torch_varlen" else None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Attention over packed `[t, h, d]` (with packed_seq_params) or padded `[s, b, h, d]` inputs."""
        if attention_bias is not None:
            raise MegapackError("attention_bias is not supported by megapack's packed core attention")
        if self.training and self.dropout_p > 0:
            raise MegapackError("attention dropout is not supported by megapack's packed core attention")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params)
        return self._padded(query, key, value, attention_mask)

    def _varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                max_q: int, max_k: int) -> torch.Tensor:
        """flash-attn or torch varlen over `[t, h, d]`; causal aligned to each key sequence's end (bottom right)."""
        if self.backend == "flash":
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func(
                q, k, v, cu_q.int(), cu_k.int(), int(max_q), int(max_k),
                dropout_p=0.0, softmax_scale=self.softmax_scale, causal=True,
            )
        from torch.nn.attention.varlen import varlen_attn

        if "enable_gqa" not in self._varlen_kwargs and k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(
            q, k, v, cu_q.int(), cu_k.int(), int(max_q), int(max_k), scale=self.softmax_scale, **self._varlen_kwargs,
        )

    def _packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params) -> torch.Tensor:
        if self.cp_group is not None:
            return self._packed_cp(q, k, v, params)
        total = q.shape[0]
        # segments are laid out at their padded offsets; padding sits after each segment's real tokens, so causal
        # attention over the padded segment leaves the real tokens exact
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        max_q, max_k = params.max_seqlen_q, params.max_seqlen_kv
        if self.cross_sample_attention:
            cu_q = cu_k = torch.tensor([0, total], dtype=torch.int32, device=q.device)
            max_q = max_k = total
        elif int(cu_q[-1]) != total:
            raise MegapackError(f"packed attention: cu_seqlens end at {int(cu_q[-1])} but the row holds {total} "
                                f"tokens (pass cu_seqlens_q_padded covering the whole row)")
        if self.backend != "sdpa":
            return self._varlen(q, k, v, cu_q, cu_k, max_q, max_k)
        allowed = block_causal_mask(None if self.cross_sample_attention else cu_q, total, q.device)
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
        out = _sdpa(q, k, v, allowed, self.softmax_scale)
        return out[0].transpose(0, 1).contiguous()

    def _packed_cp(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params) -> torch.Tensor:
        """This CP rank's queries against the keys and values all-gathered over the CP group
        (megapack.model.context_parallel): an explicit mask (sdpa) or per-chunk cu_seqlens (flash, torch_varlen)."""
        from megapack.model.context_parallel import gather_context_parallel

        inputs = cp_attention_inputs(params, self.cp_group, q.shape[0], self.backend, q.device)
        k, v = gather_context_parallel(k, self.cp_group), gather_context_parallel(v, self.cp_group)
        if self.backend != "sdpa":
            cu_q, cu_k, index, max_q, max_k = inputs
            return self._varlen(q, k[index], v[index], cu_q, cu_k, max_q, max_k)
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
        out = _sdpa(q, k, v, inputs, self.softmax_scale)
        return out[0].transpose(0, 1).contiguous()

    def _padded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None):
        s, b, h, d = q.shape
        if self.backend == "flash" and attention_mask is None:  # causal=True aligns to the keys' end as well
            from flash_attn import flash_attn_func

            out = flash_attn_func(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                dropout_p=0.0, softmax_scale=self.softmax_scale, causal=True,
            )
            return out.transpose(0, 1).reshape(s, b, h * d)
        allowed = block_causal_mask(None, s, q.device)
        if k.shape[0] != s:  # generation with a KV cache: the queries are the LAST s of the keys' positions
            allowed = torch.ones(s, k.shape[0], dtype=torch.bool, device=q.device).tril_(k.shape[0] - s)
        if attention_mask is not None:
            # megatron's convention: True marks positions that must NOT be attended
            allowed = allowed[None, None] & ~attention_mask.to(torch.bool)
        out = _sdpa(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), allowed, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
