"""Which checkpoint a run resumes from, whether it can (complete on disk, saved at a layout this run can load), and
what the run changes against it.

Everything here reads files only (no process group), so `preflight` and `megapack train --check` refuse a bad
resume before any rank starts.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from megapack.errors import MegapackError
from megapack.training.preflight.config import RunConfig

# Distributed-optimizer state layouts (megatron-core names): "dp_reshardable" = each rank writes its own flat shard
# in parallel, loadable at another DP size only; "fully_reshardable" = per-parameter state gathered on DP rank 0,
# loadable at any TP / PP / DP.
DEFAULT_OPTIMIZER_SHARDING = "dp_reshardable"


def same_model_parallel(meta: dict, tp: int, pp: int, vpp: int = 1) -> bool:
    """Whether a checkpoint (its megapack.json) was saved at this tensor- and (virtual) pipeline-parallel size."""
    saved = meta.get("saved_with") or {}
    return saved.get("tp", tp) == tp and saved.get("pp", pp) == pp and saved.get("vpp", 1) == vpp


ITER_RE = re.compile(r"^iter_(\d{7})$")  # a published checkpoint directory


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    """Directory of the checkpoint taken after `iteration` optimizer steps."""
    return Path(root) / f"iter_{iteration:07d}"


def check_resume_layout(path: Path, meta: dict, tp: int, pp: int, vpp: int = 1) -> None:
    """Refuse (one line) to resume a dp_reshardable optimizer state at another TP, PP or VPP; it re-slices only over
    DP."""
    if meta.get("optimizer_sharding", DEFAULT_OPTIMIZER_SHARDING) == "dp_reshardable" \
            and not same_model_parallel(meta, tp, pp, vpp):
        saved = meta.get("saved_with") or {}
        if saved.get("tp", tp) == tp and saved.get("pp", pp) == pp:  # only the virtual stages differ
            raise MegapackError(
                f"parallel.vpp: {path} was saved at vpp={saved.get('vpp', 1)} with a dp_reshardable optimizer state, "
                f"which resumes only at that vpp; save with checkpoint.optimizer_sharding=fully_reshardable, or start "
                f"a new run from its weights (model.init=megatron)")
        raise MegapackError(
            f"parallel.tp/parallel.pp: {path} was saved at tp={saved.get('tp')} pp={saved.get('pp')} with a "
            f"dp_reshardable optimizer state, which resumes only at that tp/pp (any DP size); save with "
            f"checkpoint.optimizer_sharding=fully_reshardable, or start a new run from its weights "
            f"(model.init=megatron)")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a published checkpoint cannot be loaded (a file missing or cut short), or None when it is complete.

    Reads torch_dist's own index (`.metadata`) for the byte ranges every shard file must hold, and `common.pt`; no
    process group. Both are pickles read through allow-lists (megapack.model.safe_pickle): a checkpoint that holds
    anything else is refused with a MegapackError naming the file (not reported as incomplete, so no fallback
    skips it quietly). The loaders read the same way, so a file swapped after this check is refused there too.
    """
    from megapack.model.safe_pickle import load_common, read_torch_metadata

    path = Path(path)
    for name in ("megapack.json", "common.pt", ".metadata"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        storage = read_torch_metadata(path / ".metadata").storage_data
    except MegapackError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable index means the same to the user
        return f".metadata is unreadable ({type(exc).__name__})"
    try:
        load_common(path)
    except MegapackError:
        raise
    except Exception as exc:  # noqa: BLE001 - likewise for megatron's common state
        return f"common.pt is unreadable ({type(exc).__name__})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} is cut short ({file.stat().st_size} of {size} bytes)"
    return None


def _published(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("iter_*") if ITER_RE.match(p.name))


def resume_checkpoint(root: str | os.PathLike, fallback: str = "refuse", key: str = "checkpoint.dir") -> Path | None:
    """The checkpoint to resume from under root: the one `latest` names (else the newest published one), checked
    complete. An incomplete one is refused in one line, or with fallback="previous" the newest complete older one
    is used (said on stderr)."""
    root = Path(root)
    marker = root / "latest"
    candidates = _published(root)
    if marker.is_file():
        named = root / marker.read_text().strip()
        candidates = [p for p in candidates if p.name < named.name] + [named]
    if not candidates:
        return None
    newest = candidates[-1]
    problem = checkpoint_problem(newest) if newest.is_dir() else "the directory is missing"
    if problem is None:
        return newest
    older = next((p for p in reversed(candidates[:-1]) if checkpoint_problem(p) is None), None)
    if fallback == "previous" and older is not None:
        print(f"warning: {newest} is incomplete ({problem}); resuming from {older} (checkpoint.fallback=previous)",
              file=sys.stderr, flush=True)
        return older
    hint = f"set checkpoint.fallback=previous to resume from {older.name}" if older is not None \
        else "no older complete checkpoint exists"
    raise MegapackError(f"{key}: {newest} is incomplete ({problem}); {hint}")


@dataclass(frozen=True)
class FoundModel:
    """A model folder found from what a user gave: its kind ("megatron" or "hf"), the folder to load, its
    megapack.json ({} for an HF folder), its iteration, and whether it came from a run's checkpoints/ folder."""

    kind: str
    path: Path
    meta: dict
    iteration: int | None = None
    via_latest: bool = False


def find_model(path: str | os.PathLike, key: str) -> FoundModel:
    """The model at `path`: a megatron checkpoint folder, an HF folder, or a run's checkpoints/ folder (its `latest`,
    else the newest iter_); refused in one line naming `key` (the flag or argument that gave it)."""
    from megapack.model.checkpoint import METADATA_FILE, read_metadata
    from megapack.model.hf_import import is_hf_folder

    path = Path(path)
    if not path.is_dir():
        raise MegapackError(f"{key} {path}: no such directory (expected a megatron checkpoint folder, a run's "
                            f"checkpoints/ folder, or a Hugging Face folder)")

    def iteration(folder: Path, meta: dict) -> int | None:
        match = ITER_RE.match(folder.name)
        return meta["iteration"] if meta.get("iteration") is not None else int(match.group(1)) if match else None

    if (path / METADATA_FILE).is_file():
        meta = read_metadata(path)
        return FoundModel("megatron", path, meta, iteration(path, meta))
    if is_hf_folder(path):
        return FoundModel("hf", path, {})
    found = resume_checkpoint(path, key=key)
    if found is None:
        raise MegapackError(f"{key} {path}: holds no megapack.json, no `latest`, no iter_XXXXXXX folder and no "
                            f"config.json + safetensors (expected a megatron checkpoint or a Hugging Face folder)")
    meta = read_metadata(found)
    return FoundModel("megatron", found, meta, iteration(found, meta), via_latest=True)


def saved_optimizer(resume: Path, meta: dict) -> dict | None:
    """The optimizer settings a checkpoint was trained with: its megapack.json's `optimizer`, else (checkpoints
    written before it was recorded) the `optimizer` section of the config.yaml beside it; None when neither says."""
    import yaml

    if isinstance(meta.get("optimizer"), dict):
        return meta["optimizer"]
    path = resume.parent / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    section = saved.get("optimizer") if isinstance(saved, dict) else None
    return section if isinstance(section, dict) else None


def resume_changes(config: RunConfig, resume: Path, meta: dict, total_steps: int) -> dict[str, list]:
    """What this start changes against the checkpoint it resumes, as {key: [saved, new]}: optimizer settings and
    the run's length (`training.train_steps`, or `total_steps` when `training.epochs` sets it). They apply from the
    resumed step on (the rule of README "Train": the config in force is what runs)."""
    changes: dict[str, list] = {}
    saved = saved_optimizer(resume, meta) or {}
    for key, new in config.optimizer.model_dump(mode="json").items():
        if key in saved and saved[key] != new:
            changes[f"optimizer.{key}"] = [saved[key], new]
    old_total = (meta.get("plan") or {}).get("total_steps")
    if old_total is not None and int(old_total) != total_steps:
        key = "training.train_steps" if config.training.train_steps is not None else "total_steps"
        changes[key] = [int(old_total), total_steps]
    return changes


def saved_run_config(ckpt_dir: str | os.PathLike) -> dict:
    """The config.yaml a run saved beside its checkpoint folders ({} when there is none or it is unreadable)."""
    import yaml

    path = Path(ckpt_dir).parent / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def trained_model_dir(ckpt_dir: str | os.PathLike, meta: dict) -> str | None:
    """The model folder a training checkpoint's run started from: megapack.json `hf_dir`, else (older checkpoints)
    `model.hf_dir` of the run's config.yaml; None when neither says."""
    model = saved_run_config(ckpt_dir).get("model")
    return meta.get("hf_dir") or (model.get("hf_dir") if isinstance(model, dict) else None)
