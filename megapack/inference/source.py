"""What `megapack generate` loads: a megatron checkpoint (a run's checkpoints/ folder or one iter_XXXXXXX folder, or a
`megapack convert hf-to-megatron` output) or a Hugging Face folder; its tokenizer and the chat template it learnt.

Files only, no process group: every problem is one line naming the path or the flag before any model is built.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megapack.errors import MegapackError

DEFAULT_TEMPLATE = "llama3"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its kind ("megatron" or "hf"), folder, iteration (megatron runs) and config/metadata."""

    kind: str
    path: Path
    hf_config: dict
    meta: dict  # megapack.json of a megatron checkpoint ({} for an HF folder)
    iteration: int | None = None
    via_latest: bool = False  # resolved from a run's checkpoints/ folder (its `latest` marker or newest iter_)

    def describe(self) -> str:
        """One line for the user: which checkpoint was loaded (and which iteration)."""
        if self.kind == "hf":
            return f"Hugging Face checkpoint {self.path}"
        if self.iteration is None:
            return f"megatron checkpoint {self.path}"
        how = ", the latest of its run" if self.via_latest else ""
        return f"megatron checkpoint {self.path} (iteration {self.iteration}{how})"


def resolve_model(path: str | Path) -> ModelSource:
    """The model at `path`: an HF folder, a megatron checkpoint folder, or a run's checkpoints/ folder (`latest`)."""
    from megapack.model.config import load_hf_config
    from megapack.training.preflight.resume import find_model

    found = find_model(path, key="--checkpoint")
    hf_config = found.meta["hf_config"] if found.kind == "megatron" else load_hf_config(found.path)
    return ModelSource(found.kind, found.path, hf_config, found.meta, found.iteration, found.via_latest)


def tokenizer_path(source: ModelSource, given: str | None) -> Path:
    """--tokenizer-model, else the HF folder, the checkpoint's tokenizer/ folder, or the model folder the run
    trained (megapack.json `hf_dir`, else `model.hf_dir` of the run's config.yaml)."""
    if given is not None:
        return Path(given)
    if source.kind == "hf":
        return source.path
    from megapack.training.preflight.resume import trained_model_dir

    if (source.path / "tokenizer").is_dir():
        return source.path / "tokenizer"
    recorded = trained_model_dir(source.path, source.meta)
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    where = f"its model folder {recorded} (model.hf_dir) is gone" if recorded else "it records no model folder"
    raise MegapackError(f"--checkpoint {source.path}: {where}; give --tokenizer-model (a tokenizer file or a "
                        f"model folder)")


def trained_template(source: ModelSource) -> dict | None:
    """The shards' template record ({"name", "identity", "options", ...}) the run trained with, if known: its
    megapack.json `template`, else the meta.json of the run's data.path (older checkpoints)."""
    from megapack.training.preflight.resume import saved_run_config

    recorded = source.meta.get("template")
    if isinstance(recorded, dict) and recorded.get("name"):
        return recorded
    data = saved_run_config(source.path).get("data") if source.kind == "megatron" else None
    data_path = data.get("path") if isinstance(data, dict) else None
    meta_json = Path(data_path) / "meta.json" if isinstance(data_path, str) else None
    try:
        shard_meta = json.loads(meta_json.read_text(encoding="utf-8")) if meta_json and meta_json.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return None
    template = shard_meta.get("template") if isinstance(shard_meta, dict) else None
    return template if isinstance(template, dict) and template.get("name") else None


def choose_template(source: ModelSource, given: str | None) -> tuple[str, dict | None, str]:
    """(template name, the trained record or None, why: "--template", "trained with" or "default")."""
    recorded = trained_template(source)
    if given is not None:
        return given, recorded, "--template"
    if recorded is not None:
        return str(recorded["name"]), recorded, "trained with"
    return DEFAULT_TEMPLATE, None, "default"


def stop_ids(hf_config: dict, extra: list[int], vocab_size: int) -> list[int]:
    """Stop token ids: the template's end-of-turn and EOS ids given, plus config.json's eos_token_id (an id or a
    list), each once and inside the vocabulary."""
    from_config = hf_config.get("eos_token_id")
    ids = list(extra) + (from_config if isinstance(from_config, list) else [from_config])
    return sorted({int(i) for i in ids if isinstance(i, int) and 0 <= i < vocab_size})
