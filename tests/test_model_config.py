"""HF config -> TransformerConfig mapping, its one-line errors, RoPE scaling and backend selection (in-process)."""
from __future__ import annotations

import json

import pytest
import torch

from megapack.errors import MegapackError
from megapack.model.builder import llama3_inv_freq, padded_vocab_size
from megapack.model.config import load_hf_config, transformer_config_from_hf
from megapack.model.spec import resolve_attention_backend
from megapack.model.tiny_checkpoint import tiny_llama_config


def test_padded_vocab_size():
    assert padded_vocab_size(128256, 1) == 128256
    assert padded_vocab_size(128256, 8) == 129024
    assert padded_vocab_size(300, 2) == 512
    assert padded_vocab_size(32000, 4) == 32256


def test_transformer_config_carries_the_llama_architecture():
    hf = tiny_llama_config(vocab_size=300, num_layers=4)
    cfg = transformer_config_from_hf(hf, tp=2, pp=2)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (4, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (4, 2, 16)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-5
    assert cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
    assert not cfg.add_bias_linear and not cfg.add_qkv_bias
    assert cfg.tensor_model_parallel_size == 2 and cfg.pipeline_model_parallel_size == 2
    assert cfg.params_dtype == torch.float32
    assert transformer_config_from_hf(hf, bf16=True).params_dtype == torch.bfloat16


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_llama_config(hidden_size=256, num_heads=2, num_kv_heads=1)  # head_dim 128 as in LLaMA-3
    config = transformers.LlamaConfig(**hf)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = llama3_inv_freq(128, 500000.0, hf["rope_scaling"])
    assert torch.allclose(ours, ref.float(), rtol=1e-6, atol=0)
    plain = llama3_inv_freq(128, 500000.0, None)
    assert not torch.allclose(ours, plain)  # the scaling really changes the low frequencies


@pytest.mark.parametrize(
    "change,tp,pp,message",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, 1, 1, "architecture"),
        ({"num_key_value_heads": 2}, 4, 1, "num_key_value_heads (2)"),
        ({}, 1, 3, "parallel.pp: 3 must divide num_hidden_layers (4)"),
        ({"hidden_act": "gelu"}, 1, 1, "hidden_act 'gelu'"),
        ({"attention_bias": True}, 1, 1, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 1, 1, "rope_scaling type 'yarn'"),
    ],
)
def test_unsupported_configs_raise_one_line_errors(change, tp, pp, message):
    hf = tiny_llama_config(num_layers=4) | change
    with pytest.raises(MegapackError) as info:
        transformer_config_from_hf(hf, tp=tp, pp=pp)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_rope_theta_is_never_defaulted(tmp_path):
    hf = tiny_llama_config()
    del hf["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(MegapackError, match="rope_theta"):
        load_hf_config(tmp_path)
    with pytest.raises(MegapackError, match="no such file"):
        load_hf_config(tmp_path / "nowhere")


def test_backend_selection_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU choice")
    assert resolve_attention_backend("auto") == "sdpa"
    assert resolve_attention_backend("auto", cross_sample_attention=True) == "sdpa"
    for name in ("te", "flash", "torch_varlen"):
        with pytest.raises(MegapackError, match="not available here"):
            resolve_attention_backend(name)
    with pytest.raises(MegapackError, match="expected one of"):
        resolve_attention_backend("xformers")


def test_mistral_architecture_maps_like_llama():
    hf = tiny_llama_config(num_layers=2) | {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                            "sliding_window": None, "rope_scaling": None, "rope_theta": 1e6}
    cfg = transformer_config_from_hf(hf)
    assert cfg.num_query_groups == 2 and cfg.kv_channels == 16


def test_half_precision_kernels_are_not_chosen_for_fp32(monkeypatch):
    """Seen on an H200: `auto` picked torch_varlen for an fp32 run, whose kernel computes in bf16/fp16 only."""
    import megapack.model.spec as spec

    monkeypatch.setattr(spec, "torch_varlen_available", lambda: True)
    monkeypatch.setattr(spec, "te_available", lambda: False)
    monkeypatch.setattr(spec, "flash_available", lambda: False)
    assert resolve_attention_backend("auto", bf16=True) == "torch_varlen"
    assert resolve_attention_backend("auto", bf16=False) == "sdpa"
    with pytest.raises(MegapackError) as info:
        resolve_attention_backend("torch_varlen", bf16=False)
    assert "bf16/fp16 only" in str(info.value) and "\n" not in str(info.value)
