"""Export a TP/PP-sharded GPTModel to a Hugging Face directory: config.json, safetensors (+ index), the tokenizer."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megapack.atomic import chmod_default
from megapack.errors import MegapackError
from megapack.model.config import head_dim, num_kv_heads
from megapack.model.hf_tokenizer import TokenizerExport, write_tokenizer
from megapack.model.weights_map import named_mappings

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (  # what a model directory holds beside the weights that its exports carry
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
    "generation_config.json", "original/tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _gather_tp(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """Every TP rank's piece of a local tensor, in TP rank order, on TP rank 0 only (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [tensor]
    first = parallel_state.get_tensor_model_parallel_rank() == 0
    parts = [torch.empty_like(tensor) for _ in range(tp)] if first else None
    dist.gather(tensor.contiguous(), parts, dst=parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group())
    return parts


def _to_hf(kind: str, names: tuple[str, ...], parts: list[torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Inverse of the import layout: full HF tensors from all TP parts of one megatron parameter."""
    if kind == "replicated":
        return {names[0]: parts[0]}
    if kind == "vocab":
        return {names[0]: torch.cat(parts, dim=0)[: hf_config["vocab_size"]]}
    if kind == "cols":
        return {names[0]: torch.cat(parts, dim=1)}
    if kind == "fc1":
        halves = [p.chunk(2, dim=0) for p in parts]
        return {names[0]: torch.cat([g for g, _ in halves]), names[1]: torch.cat([u for _, u in halves])}
    if kind == "qkv":
        d, groups = head_dim(hf_config), num_kv_heads(hf_config)
        per_group = hf_config["num_attention_heads"] // groups
        full = torch.cat(parts, dim=0)
        hidden = full.shape[1]
        q, k, v = full.view(groups, (per_group + 2) * d, hidden).split([per_group * d, d, d], dim=1)
        return {names[0]: q.reshape(-1, hidden), names[1]: k.reshape(-1, hidden), names[2]: v.reshape(-1, hidden)}
    raise AssertionError(kind)


def _stage_tensors(model, hf_config: dict) -> dict[str, torch.Tensor]:
    """Full HF tensors of this pipeline stage (all its virtual-stage chunks) on its TP rank 0 (other TP ranks join
    the gathers, return {})."""
    from megapack.model.builder import as_chunks

    tied = bool(hf_config.get("tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    mappings = (m for chunk in as_chunks(model) for m in named_mappings(chunk, hf_config))
    for name, param, mapping, _layer in mappings:
        parts = _gather_tp(param.detach())
        if parts is None or (tied and name == "output_layer.weight"):
            continue  # the last stage's copy of the tied embedding
        for hf_name, tensor in _to_hf(mapping.kind, mapping.hf_names, parts, hf_config).items():
            out[hf_name] = tensor.detach().to("cpu").contiguous().clone()
    return out


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards if shards[-1] else []


def _hf_config_out(hf_config: dict, dtype: torch.dtype) -> dict:
    config = dict(hf_config)
    name = _DTYPE_NAMES.get(dtype, "float32")
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    return config


def export_hf(model, hf_config: dict, output_dir: str | Path, tokenizer: TokenizerExport | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Gather TP/PP shards and write a transformers-loadable directory (all ranks call this; written atomically).

    `model` is this rank's GPTModel or the list of its virtual-pipeline chunks; `tokenizer` comes from
    `hf_tokenizer.prepare_tokenizer` (None: weights and config.json only). Returns the tokenizer files written (on
    global rank 0; [] elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors.torch import save_file

    from megapack.model.builder import as_chunks

    output_dir = Path(output_dir)
    rank = dist.get_rank()
    staging = output_dir.parent / f".{output_dir.name}.partial"
    if output_dir.exists() and any(output_dir.iterdir()):  # checked on every rank so that all of them stop
        raise MegapackError(f"{output_dir}: directory is not empty (refusing to overwrite)")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    tensors = _stage_tensors(model, hf_config)
    writer = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    plan = _plan_shards(tensors, max_shard_bytes) if writer else []
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    plans: list = [None] * dist.get_world_size()
    dist.all_gather_object(plans, (pp_rank, [len(s) for s in plan]) if writer else None)
    counts = sorted(p for p in plans if p is not None)
    total = sum(len(c) for _, c in counts)
    first = sum(len(c) for stage, c in counts if stage < pp_rank)

    def file_name(i: int) -> str:
        return "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"

    weight_map: dict[str, str] = {}
    copied: list[str] = []
    if writer:
        for i, names in enumerate(plan):
            name = file_name(first + i)
            save_file({n: tensors[n] for n in names}, str(staging / name), metadata={"format": "pt"})
            chmod_default(staging / name)  # safetensors writes 0600 whatever the umask
            weight_map.update({n: name for n in names})
    sizes = sum(t.numel() * t.element_size() for t in tensors.values()) if writer else 0
    maps: list = [None] * dist.get_world_size()
    dist.all_gather_object(maps, (weight_map, sizes))
    if rank == 0:
        dtype = next(as_chunks(model)[0].parameters()).dtype
        (staging / "config.json").write_text(json.dumps(_hf_config_out(hf_config, dtype), indent=2) + "\n")
        if total > 1:
            full_map = {k: v for m, _ in maps for k, v in m.items()}
            index = {"metadata": {"total_size": sum(s for _, s in maps)}, "weight_map": dict(sorted(full_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            copied = write_tokenizer(tokenizer, staging)
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    dist.barrier()
    return copied


def copy_tokenizer_files(tokenizer_dir: str | Path, output_dir: str | Path) -> list[str]:
    """Copy the tokenizer files that exist in tokenizer_dir (HF and original/ tiktoken) into output_dir."""
    src, dst = Path(tokenizer_dir), Path(output_dir)
    if not src.is_dir():
        raise MegapackError(f"{src}: tokenizer directory does not exist")
    copied = []
    for rel in TOKENIZER_FILES:
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dst / rel)
            copied.append(rel)
    if not copied:
        raise MegapackError(f"{src}: no tokenizer files found (expected one of {', '.join(TOKENIZER_FILES)})")
    return copied
