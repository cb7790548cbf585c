"""Hugging Face LLaMA `config.json` -> megatron-core TransformerConfig, with the checks that make the mapping exact."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from megapack.errors import MegapackError, nested_too_deeply

# Tokens per chunk of the training loss (megapack.model.chunked_loss): 1,024 × 128,256 fp32 logits are 0.5 GB at TP1
# (a 4,096-token row's are 2.1 GB).
DEFAULT_LOSS_CHUNK_TOKENS = 1024

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
ATTENTION_BACKENDS = ("auto", "te", "flash", "torch_varlen", "sdpa")
# sanity bounds of a config.json (the largest published LLaMA, 405B: vocab 128256, hidden 16384, FFN 53248, 126 layers,
# 128 heads): a value beyond them is a typo or a corrupt file that would pass preflight and fail allocating
SIZE_LIMITS = {"vocab_size": 2**24, "hidden_size": 2**20, "intermediate_size": 2**22, "num_hidden_layers": 4096,
               "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 2**16}
MAX_EMBEDDING_PARAMETERS = 2**36  # vocab_size × hidden_size: 32 × the 405B's (128 GiB in bf16, input table alone)


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the Hugging Face Hub spells a model


def hub_name_hint(given: str | Path) -> None:
    """Refuse (one line: megapack reads local folders, and how to download one) a model folder that does not exist
    and reads as a Hub name `org/name` whose `org` is no local folder either."""
    text = str(given)
    if HUB_NAME.fullmatch(text) and not Path(text).exists() and not Path(text.split("/")[0]).exists():
        name = text.split("/")[1]
        raise MegapackError(f"{text}: no such local folder; megapack reads models from local folders, not from the "
                            f"Hugging Face Hub: download it with `huggingface-cli download {text} --local-dir "
                            f"/models/{name}` and give /models/{name}")


def load_hf_config(hf_dir_or_config_json: str | Path) -> dict:
    """Read a Hugging Face `config.json` (given the file or its directory) and check the architecture is supported."""
    path = Path(hf_dir_or_config_json)
    if path.is_dir() or path.suffix != ".json":
        path = path / "config.json"
    if not path.is_file():
        hub_name_hint(hf_dir_or_config_json)
        raise MegapackError(f"{path}: no such file (expected a Hugging Face config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MegapackError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise nested_too_deeply(path) from None
    validate_hf_config(config, source=str(path))
    return config


def head_dim(hf_config: dict) -> int:
    """Per-head dimension (`head_dim` when given, else hidden_size / num_attention_heads)."""
    return int(hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"])


def num_kv_heads(hf_config: dict) -> int:
    """Number of key/value heads (query groups); equals the head count without GQA."""
    return int(hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"])


def rope_parameters(hf_config: dict) -> tuple[float, dict | None]:
    """(rope_theta, llama3 rope_scaling dict or None) read from the config; rope_theta is never defaulted."""
    params = hf_config.get("rope_parameters") or {}
    theta = hf_config.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise MegapackError("config.json: key 'rope_theta' is missing (refusing to default it)")
    scaling = hf_config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
        elif kind != "llama3":
            raise MegapackError(f"config.json: rope_scaling type {kind!r} is not supported (expected 'llama3' or none)")
    return float(theta), scaling


def validate_hf_config(config: dict, source: str = "config.json") -> None:
    """Raise MegapackError naming the key when the config describes something the LLaMA mapping does not cover."""
    archs = config.get("architectures") or []
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
        raise MegapackError(
            f"{source}: architecture {archs or config.get('model_type')!r} is not supported "
            f"(expected one of {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise MegapackError(f"{source}: key {key!r} = {config.get(key)!r}, expected a positive integer")
    for key, limit in SIZE_LIMITS.items():
        value = config.get(key)
        if isinstance(value, int) and value > limit:
            raise MegapackError(f"{source}: key {key!r} = {value:,}, expected at most {limit:,}")
    embedding = config["vocab_size"] * config["hidden_size"]
    if embedding > MAX_EMBEDDING_PARAMETERS:
        raise MegapackError(f"{source}: vocab_size × hidden_size = {embedding:,} embedding parameters, expected at "
                            f"most {MAX_EMBEDDING_PARAMETERS:,}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise MegapackError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise MegapackError(f"{source}: {key}=true is not supported (LLaMA layers have no biases)")
    if config["num_attention_heads"] % num_kv_heads(config):
        raise MegapackError(
            f"{source}: num_attention_heads {config['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads {num_kv_heads(config)}"
        )
    rope_parameters(config)


def check_parallel_sizes(hf_config: dict, tp: int, pp: int, seq_length: int | None = None) -> None:
    """Raise (naming parallel.tp / parallel.pp) when TP does not divide heads, KV groups or the FFN, PP does not
    divide the layers, or the model uses sliding-window attention shorter than `seq_length`."""
    heads, groups = hf_config["num_attention_heads"], num_kv_heads(hf_config)
    if heads % tp or groups % tp:
        raise MegapackError(f"parallel.tp: {tp} must divide num_attention_heads ({heads}) and "
                            f"num_key_value_heads ({groups}) of the model")
    if hf_config["intermediate_size"] % tp:
        raise MegapackError(f"parallel.tp: {tp} must divide intermediate_size ({hf_config['intermediate_size']})")
    if hf_config["num_hidden_layers"] % pp:
        raise MegapackError(f"parallel.pp: {pp} must divide num_hidden_layers ({hf_config['num_hidden_layers']})")
    window = hf_config.get("sliding_window")
    if seq_length and window is not None and hf_config.get("use_sliding_window", True) and int(window) < seq_length:
        raise MegapackError(f"config.json: sliding_window {window} < seq_length {seq_length}; sliding-window "
                            f"attention is not supported")


RECOMPUTE_CHOICES = ("none", "selective", "full")


def recompute_settings(recompute: str) -> dict[str, Any]:
    """TransformerConfig keys for `training.recompute`: selective = core attention, full = every layer (uniform, 1)."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise MegapackError(f"training.recompute {recompute!r}: expected one of {', '.join(RECOMPUTE_CHOICES)}")


def transformer_config_from_hf(
    hf_config: dict,
    *,
    attention_backend: str = "auto",
    bf16: bool = False,
    sequence_parallel: bool = False,
    tp: int = 1,
    pp: int = 1,
    recompute: str = "none",
    **overrides: Any,
):
    """A megatron TransformerConfig for this LLaMA config (CPU-safe fusions off when CUDA is absent)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_hf_config(hf_config)
    check_parallel_sizes(hf_config, tp, pp)
    if attention_backend not in ATTENTION_BACKENDS:
        raise MegapackError(
            f"attention_backend {attention_backend!r}: expected one of {', '.join(ATTENTION_BACKENDS)}"
        )
    dtype = torch.bfloat16 if bf16 else torch.float32
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=hf_config["num_attention_heads"],
        num_query_groups=num_kv_heads(hf_config),
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_interleaved=False,
        init_method_std=float(hf_config.get("initializer_range", 0.02)),
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        attention_backend=AttnBackend.auto if attention_backend in ("auto", "te") else AttnBackend.local,
        use_cpu_initialization=not cuda,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=cuda,
        bias_dropout_fusion=cuda,
        bias_activation_fusion=cuda,
        apply_rope_fusion=False,
        persist_layer_norm=cuda,
    )
    kwargs.update(recompute_settings(recompute))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
