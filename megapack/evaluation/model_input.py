"""What `megapack eval` evaluates: a Hugging Face folder as it is, or a megapack checkpoint (one iter_XXXXXXX
folder, a `convert hf-to-megatron` output, or a run's checkpoints/ folder and its `latest`) exported first to a
temporary Hugging Face folder by `megapack convert megatron-to-hf` (the one export path), in its own process."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megapack.errors import MegapackError

RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml")  # what marks a run's checkpoints/ (logging) folder


@dataclass(frozen=True)
class ModelInput:
    """The model as given (`given`), its kind ("hf" or "megatron"), the checkpoint folder evaluated (megatron),
    its iteration, and the run folder whose report should show the scores (megatron runs; else None)."""

    given: Path
    kind: str
    checkpoint: Path | None = None
    iteration: int | None = None
    run_dir: Path | None = None

    def describe(self) -> str:
        """One line: what was evaluated."""
        if self.kind == "hf":
            return f"Hugging Face folder {self.given}"
        it = f" (iteration {self.iteration})" if self.iteration is not None else ""
        return f"megatron checkpoint {self.checkpoint}{it}"


def resolve_input(path: str | Path) -> ModelInput:
    """The model at `path`, refused in one line when it is neither an HF folder nor a megapack checkpoint."""
    from megapack.training.preflight.resume import ITER_RE, find_model

    found = find_model(path, key="MODEL")
    if found.kind == "hf":
        return ModelInput(Path(path), "hf")
    run_dir = _run_dir(found.path) if ITER_RE.match(found.path.name) else None
    return ModelInput(Path(path), "megatron", found.path, found.iteration, run_dir)


def _run_dir(checkpoint: Path) -> Path | None:
    """Where the checkpoint's run logs (its config.yaml's logging.dir, else checkpoint.dir): `megapack report` reads
    that folder; None when the checkpoint is not beside a run's files."""
    from megapack.training.preflight.resume import saved_run_config

    logging = saved_run_config(checkpoint).get("logging")
    logged = logging.get("dir") if isinstance(logging, dict) else None
    if isinstance(logged, str) and Path(logged).is_dir():
        return Path(logged)
    return checkpoint.parent if any((checkpoint.parent / f).is_file() for f in RUN_FILES) else None


def export_to(model: ModelInput, out_dir: Path) -> Path:
    """Export a megatron checkpoint to `out_dir` with `megapack convert megatron-to-hf` (its tokenizer and chat
    template travel with it); its error line, if any, becomes ours."""
    cmd = [sys.executable, "-m", "megapack", "convert", "megatron-to-hf", "--checkpoint-dir", str(model.checkpoint),
           "--output-dir", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")] or proc.stderr.splitlines()[-1:]
        reason = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
        raise MegapackError(f"MODEL {model.given}: export to a Hugging Face folder failed: {reason}")
    return out_dir
