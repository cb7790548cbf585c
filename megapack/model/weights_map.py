"""The name and layout mapping between Hugging Face LLaMA tensors and megatron-core's (TP-sharded) parameters."""
from __future__ import annotations

import re
from dataclasses import dataclass

from megapack.errors import MegapackError
from megapack.model.config import head_dim, num_kv_heads

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron layer-local suffix -> (kind, HF suffixes under model.layers.{i}.)
_LAYER_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
    ),
    "self_attention.linear_proj.weight": ("cols", ("self_attn.o_proj.weight",)),
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("cols", ("mlp.down_proj.weight",)),
}


@dataclass(frozen=True)
class TensorMapping:
    """One megatron parameter: how it is laid out (`kind`) and which HF tensors it is made of."""

    kind: str  # replicated | vocab | qkv | fc1 | cols
    hf_names: tuple[str, ...]


def mapping_for(local_name: str, global_layer: int | None, hf_config: dict) -> TensorMapping:
    """The HF tensors behind a megatron parameter name (layer given as its global index)."""
    tied = bool(hf_config.get("tie_word_embeddings", False))
    if local_name == "embedding.word_embeddings.weight":
        return TensorMapping("vocab", ("model.embed_tokens.weight",))
    if local_name == "output_layer.weight":
        return TensorMapping("vocab", ("model.embed_tokens.weight",) if tied else ("lm_head.weight",))
    if local_name == "decoder.final_layernorm.weight":
        return TensorMapping("replicated", ("model.norm.weight",))
    match = _LAYER.match(local_name)
    if match and match.group(2) in _LAYER_MAP and global_layer is not None:
        kind, suffixes = _LAYER_MAP[match.group(2)]
        return TensorMapping(kind, tuple(f"model.layers.{global_layer}.{s}" for s in suffixes))
    raise MegapackError(f"megatron parameter {local_name!r} has no Hugging Face LLaMA counterpart")


def full_hf_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor suffix kind (by the last two name parts) for shape checks."""
    h, ffn, vocab = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["vocab_size"]
    d = head_dim(hf_config)
    q, kv = hf_config["num_attention_heads"] * d, num_kv_heads(hf_config) * d
    return {
        "embed_tokens.weight": (vocab, h),
        "lm_head.weight": (vocab, h),
        "norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (q, h),
        "k_proj.weight": (kv, h),
        "v_proj.weight": (kv, h),
        "o_proj.weight": (h, q),
        "gate_proj.weight": (ffn, h),
        "up_proj.weight": (ffn, h),
        "down_proj.weight": (h, ffn),
    }


def expected_shape(hf_name: str, hf_config: dict) -> tuple[int, ...]:
    """The shape a HF tensor must have for this config."""
    key = ".".join(hf_name.split(".")[-2:])
    return full_hf_shapes(hf_config)[key]


def layer_offsets(model) -> dict[int, int]:
    """Local layer index -> global layer index for this pipeline stage's decoder."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


def named_mappings(model, hf_config: dict):
    """Yield (local name, parameter, TensorMapping, global layer) for every parameter of this rank's model."""
    offsets = layer_offsets(model) if hasattr(model, "decoder") else {}
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        layer = offsets[int(match.group(1))] if match else None
        yield name, param, mapping_for(name, layer, hf_config), layer
