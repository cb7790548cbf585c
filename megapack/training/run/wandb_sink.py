"""The Weights & Biases sink (logging.wandb): rank 0 logs the records metrics.jsonl gets, and the resolved config."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from megapack.errors import MegapackError

PREFIX = {"train": "train/", "valid": "valid/"}  # as TensorBoard names them; other kinds (resume) are not scalars


def scalars(record: dict) -> dict[str, float]:
    """A metrics record's numbers under its kind's prefix (`train/loss`, `valid/valid_loss`); {} for other kinds."""
    prefix = PREFIX.get(record.get("kind", "train"))
    if prefix is None:
        return {}
    return {prefix + key: value for key, value in record.items()
            if key not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool)}


class WandbSink:
    """One W&B run per training process (rank 0): `log` per record at its step, `close` finishes the run."""

    def __init__(self, settings: dict, directory: Path | None, run_config: dict | None) -> None:
        try:
            import wandb
        except ImportError:
            raise MegapackError("logging.wandb: the wandb package is not installed: pip install 'megapack[wandb]'"
                                ) from None
        where = os.environ.get("WANDB_DIR") or (str(directory) if directory is not None else None)
        try:
            self.run = wandb.init(project=settings["project"], entity=settings.get("entity"),
                                  name=settings.get("name") or (directory.name if directory is not None else None),
                                  mode=settings.get("mode"), dir=where, config=run_config or {},
                                  reinit="finish_previous")
        except Exception as exc:  # wandb's own errors (not logged in, no network): one line, naming the key
            raise MegapackError(f"logging.wandb: wandb.init failed ({str(exc).splitlines()[0] if str(exc) else exc!r})"
                                ) from None

    def log(self, record: dict) -> None:
        """Log one train or validation record at its step (a step's validation joins its train record)."""
        values = scalars(record)
        if values and self.run is not None:
            self.run.log(values, step=int(record["step"]))

    def summarize(self, result: dict) -> None:
        """The run summary's numbers (summary.json) as `summary/<key>` in the W&B run's summary."""
        if self.run is not None:
            self.run.summary.update({f"summary/{key}": value for key, value in result.items()
                                     if isinstance(value, (int, float)) and not isinstance(value, bool)})

    def close(self) -> None:
        """Finish the W&B run (exit code 1 while an exception is on its way out, so W&B marks the run failed)."""
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
