"""Topology-independent megatron torch_dist model checkpoints with megapack.json metadata beside them."""
from __future__ import annotations

import json
from pathlib import Path

from megapack.atomic import write_json_atomic
from megapack.errors import MegapackError, nested_too_deeply

MODEL_PREFIX = "model."
METADATA_FILE = "megapack.json"
FORMAT = "megapack-torch-dist-v1"


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict with every key under MODEL_PREFIX (vocab padding may differ on load)."""
    return model.sharded_state_dict(prefix=MODEL_PREFIX)


def write_metadata(ckpt_dir: str | Path, hf_config: dict, tokenizer_identity: str | None,
                   extra: dict | None = None) -> None:
    """Atomically write megapack.json (call on global rank 0 only)."""
    from megatron.core import parallel_state

    meta = {
        "format": FORMAT,
        "hf_config": hf_config,
        "tokenizer_identity": tokenizer_identity,
        "iteration": None,
        "saved_with": {
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        },
    }
    meta.update(extra or {})
    ckpt_dir = Path(ckpt_dir)
    write_json_atomic(ckpt_dir / METADATA_FILE, meta)


def read_metadata(ckpt_dir: str | Path) -> dict:
    """megapack.json of a checkpoint directory, checked for the format tag."""
    path = Path(ckpt_dir) / METADATA_FILE
    if not path.is_file():
        raise MegapackError(f"{path}: missing (expected a megapack torch_dist checkpoint directory)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MegapackError(f"{path}: unreadable ({exc}); expected a megapack checkpoint's JSON metadata") from None
    except RecursionError:
        raise nested_too_deeply(path) from None
    if not isinstance(meta, dict):
        raise MegapackError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise MegapackError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def save_model_checkpoint(model, ckpt_dir: str | Path, hf_config: dict, tokenizer_identity: str | None,
                          extra: dict | None = None) -> None:
    """Save the model (all ranks call this) as torch_dist into an empty ckpt_dir, then megapack.json (rank 0)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):  # checked on every rank so that all of them stop
        raise MegapackError(f"{ckpt_dir}: directory is not empty (refusing to overwrite a checkpoint)")
    dist.barrier()
    if dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model), str(ckpt_dir))
    if dist.get_rank() == 0:
        write_metadata(ckpt_dir, hf_config, tokenizer_identity, extra)
    dist.barrier()


def load_model_checkpoint(model, ckpt_dir: str | Path) -> dict:
    """Load only the model keys of a torch_dist checkpoint (saved at any TP/PP) into model; returns megapack.json.
    Every pickle in it is read through an allow-list (megapack.model.safe_pickle)."""
    from megapack.model.safe_pickle import dist_load

    meta = read_metadata(ckpt_dir)
    loaded = dist_load(model_sharded_state_dict(model), ckpt_dir)
    state = {key[len(MODEL_PREFIX):]: value for key, value in loaded.items() if key.startswith(MODEL_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise MegapackError(f"{ckpt_dir}: checkpoint does not match the model (missing {missing[:3]}, "
                            f"unexpected {list(unexpected)[:3]})")
    return meta
