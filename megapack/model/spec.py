"""Layer specs: Transformer Engine when usable, else megatron's local spec with megapack's packed core attention."""
from __future__ import annotations

import functools

import torch

from megapack.errors import MegapackError
from megapack.model.attention import PackedCoreAttention, cuda_kernel_available, flash_available, torch_varlen_available
from megapack.model.config import ATTENTION_BACKENDS

CONCRETE_BACKENDS = tuple(name for name in ATTENTION_BACKENDS if name != "auto")


def te_available() -> bool:
    """Whether transformer_engine imports and CUDA is present."""
    return cuda_kernel_available("transformer_engine")


# flash-attn and torch's varlen kernels compute in fp16/bf16 only
HALF_PRECISION_BACKENDS = ("flash", "torch_varlen")


def resolve_attention_backend(attention_backend: str = "auto", cross_sample_attention: bool = False,
                              bf16: bool = True, cp: int = 1) -> str:
    """The concrete backend ('te', 'flash', 'torch_varlen' or 'sdpa'); `auto` picks the fastest available for the
    precision (`bf16` False: an fp32 model, which the half-precision kernels cannot run). With context parallelism
    (`cp` > 1) megapack's own all-gather attention runs: `te` is refused and `auto` skips it."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise MegapackError(f"attention_backend {attention_backend!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    if cp > 1 and cross_sample_attention:
        raise MegapackError(f"parallel.cp: {cp} does not work with model.cross_sample_attention; use parallel.cp 1")
    if cp > 1 and attention_backend == "te":
        raise MegapackError(f"parallel.cp: {cp} with model.attention_backend 'te' is not supported; use flash, "
                            f"torch_varlen or sdpa (megapack's all-gather context parallelism), or auto")
    checks = {
        "te": (te_available, "needs transformer_engine and a CUDA GPU (pip install 'megapack[gpu]')"),
        "flash": (flash_available, "needs flash-attn and a CUDA GPU (pip install flash-attn)"),
        "torch_varlen": (torch_varlen_available, "needs torch.nn.attention.varlen (torch >= 2.10) and a CUDA GPU"),
        "sdpa": (lambda: True, ""),
    }
    if attention_backend == "auto":
        order = ("flash", "torch_varlen", "sdpa") if cross_sample_attention or cp > 1 \
            else ("te", "flash", "torch_varlen", "sdpa")
        return next(name for name in order if checks[name][0]() and (bf16 or name not in HALF_PRECISION_BACKENDS))
    if attention_backend == "te" and cross_sample_attention:
        raise MegapackError("cross_sample_attention is not available with attention_backend 'te'; use flash or sdpa")
    available, why = checks[attention_backend]
    if not available():
        raise MegapackError(f"attention_backend {attention_backend!r} is not available here: it {why}")
    if not bf16 and attention_backend in HALF_PRECISION_BACKENDS:
        raise MegapackError(f"attention_backend {attention_backend!r} computes in bf16/fp16 only; use "
                            f"training.precision bf16, or attention_backend sdpa (or te) for fp32")
    return attention_backend


class MegapackRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm that, unlike megatron's WrappedTorchNorm, allows sequence parallelism.

    Under sequence parallelism each TP rank sees a different slice of the sequence, so the norm weight's gradient
    must be summed over TP; megatron's finalize_model_grads does that for parameters marked `sequence_parallel`.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm") -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def gpt_block_spec(config, backend: str, cross_sample_attention: bool = False, vp_stage: int | None = None):
    """Layer spec (TE) or block submodules (local: our core attention and SP-capable RMSNorm, final norm too)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = gpt_layer_spec(backend, cross_sample_attention)
    if backend == "te":
        return spec
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=MegapackRMSNorm
    )


def gpt_layer_spec(backend: str, cross_sample_attention: bool = False):
    """The ModuleSpec of one LLaMA decoder layer for a resolved backend."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if backend == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = MegapackRMSNorm
    spec.submodules.pre_mlp_layernorm = MegapackRMSNorm
    # megatron calls submodules.core_attention(config=..., ...) directly, so a partial (not a ModuleSpec) goes here
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        PackedCoreAttention, backend=backend, cross_sample_attention=cross_sample_attention
    )
    return spec
