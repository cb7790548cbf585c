"""Write a small randomly initialised LLaMA-architecture checkpoint in Hugging Face layout (demo and tests)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from megapack import seeds
from megapack.atomic import chmod_default


def tiny_llama_config(
    *,
    vocab_size: int = 128256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    rope_theta: float = 500000.0,
    max_position_embeddings: int = 8192,
    tie_word_embeddings: bool = False,
) -> dict:
    """A Hugging Face `config.json` dict for a LLaMA-3-architecture model of the given (small) size."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 128000,
        "eos_token_id": 128009,
        "torch_dtype": "float32",
    }


def random_llama_weights(config: dict, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """Random fp32 weights under Hugging Face LlamaForCausalLM names (norms initialised to one)."""
    rng = seeds.rng(seed, "tiny_checkpoint")
    h, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(q_out, h),
            p + "self_attn.k_proj.weight": normal(kv_out, h),
            p + "self_attn.v_proj.weight": normal(kv_out, h),
            p + "self_attn.o_proj.weight": normal(h, q_out),
            p + "mlp.gate_proj.weight": normal(ffn, h),
            p + "mlp.up_proj.weight": normal(ffn, h),
            p + "mlp.down_proj.weight": normal(h, ffn),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        }
    if not config.get("tie_word_embeddings", False):
        weights["lm_head.weight"] = normal(vocab, h)
    return weights


def write_tiny_checkpoint(
    output_dir: str | Path, config: dict | None = None, *, seed: int = 0, tokenizer_model: str | Path | None = None
) -> Path:
    """Write config.json + model.safetensors (+ original/tokenizer.model when given) atomically into output_dir."""
    from safetensors.numpy import save_file

    config = config or tiny_llama_config()
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output_dir.name + ".tmp-", dir=output_dir.parent))
    try:
        chmod_default(tmp, directory=True)  # mkdtemp makes it 0700
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(random_llama_weights(config, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        chmod_default(tmp / "model.safetensors")  # safetensors writes 0600 whatever the umask
        if tokenizer_model is not None:
            (tmp / "original").mkdir()
            shutil.copyfile(tokenizer_model, tmp / "original" / "tokenizer.model")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir
