"""Per-step metrics (throughput, padding, MFU), JSONL + TensorBoard sinks, and the end-of-run Table 3 summary."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from megapack.atomic import dumps_json
from megapack.model.flops import model_flops
from megapack.training.run.batch import STAT_KEYS

class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl, mirrored to TensorBoard and W&B (rank 0 only)."""

    def __init__(self, directory: str | os.PathLike | None, tensorboard: bool = True, wandb: dict | None = None,
                 run_config: dict | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if self.directory is not None:
            self._open_files(tensorboard)
        if wandb is not None:
            from megapack.training.run.wandb_sink import WandbSink

            try:
                self._wandb = WandbSink(wandb, self.directory, run_config)
            except BaseException:
                self.close()
                raise

    def _open_files(self, tensorboard: bool) -> None:
        """metrics.jsonl (appended to) and the TensorBoard writer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.directory / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.directory / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def write(self, record: dict) -> None:
        """Log one record (needs a `step` key)."""
        if self._jsonl is not None:
            self._jsonl.write(dumps_json(record) + "\n")
        if self._tb is not None and record.get("kind", "train") in ("train", "valid"):
            prefix = "valid/" if record.get("kind") == "valid" else "train/"
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(prefix + key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(record)

    def summarize(self, result: dict) -> None:
        """The run's summary (summary.json's numbers) into the W&B run's summary, as `summary/<key>`."""
        if self._wandb is not None:
            self._wandb.summarize(result)

    def close(self) -> None:
        """Flush and close the sinks (each one, also when closing another fails)."""
        try:
            if self._wandb is not None:
                sink, self._wandb = self._wandb, None
                sink.close()
        finally:
            if self._jsonl is not None:
                self._jsonl.close()
                self._jsonl = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None


def summary(*, epochs: float, steps: int, train_time_s: float, packs: int, conversations: int, tokens: int,
            trained_tokens: int, final_loss: float | None, final_valid_loss: float | None, packing: str) -> dict:
    """The paper's Table 3 columns (+ conversations/s and tokens/s) for the steps run in this process."""
    t = max(train_time_s, 1e-9)
    return {
        "packing": packing,
        "epochs": round(epochs, 4),
        "total_steps": steps,
        "total_training_time_s": round(train_time_s, 3),
        "steps_per_s": steps / t,
        "packs_per_s": packs / t,  # the paper's "samples/s": one sample is one pack
        "conversations_per_s": conversations / t,
        "tokens_per_s": tokens / t,
        "trained_tokens": trained_tokens,
        "final_loss": final_loss,
        "final_valid_loss": final_valid_loss,
    }


TABLE_COLUMNS = (
    ("packing", "packing", "{}"),
    ("epochs", "epochs", "{:.2f}"),
    ("total_steps", "steps", "{}"),
    ("total_training_time_s", "time (s)", "{:.1f}"),
    ("steps_per_s", "steps/s", "{:.3f}"),
    ("packs_per_s", "packs/s", "{:.2f}"),
    ("conversations_per_s", "conv/s", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("final_loss", "loss", "{:.4f}"),
)


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of one or more summaries (one row per run)."""
    header = [title for _, title, _ in TABLE_COLUMNS]
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _setting(value: object) -> str:
    """One value of the settings block: '-' for none, a mapping as `key value` pairs, a list joined by '; '."""
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_setting(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "; ".join(_setting(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_settings(settings: dict) -> str:
    """The run's settings (the plan's summary) as an indented block, one `key  value` per line, values aligned."""
    width = max((len(k) for k in settings), default=0)
    return "\n".join(f"  {key.ljust(width)}  {_setting(value)}" for key, value in settings.items())


def read_metrics(path: str | os.PathLike, kind: str = "train") -> dict[int, dict]:
    """step -> record from a metrics.jsonl (the last record of a step wins, e.g. after a resume)."""
    out: dict[int, dict] = {}
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("kind") == kind:
                out[rec["step"]] = rec
    return out


TOTAL_KEYS = ("train_time_s", *STAT_KEYS)


class RunMetrics:
    """The run's metrics schedule and sinks: per-step records, running totals, validation, the final summary.

    Every rank keeps the totals (they go into checkpoints); only the logger rank prints and writes files.
    `run_config` is the resolved config: W&B's run config, and its logging.wandb (when set) opens the W&B sink.
    """

    def __init__(self, directory: str | os.PathLike | None, *, is_logger: bool, interval: int, tensorboard: bool,
                 total_steps: int, hf_config: dict, peak_flops: float | None, world_size: int, packing: str,
                 totals: dict | None = None, run_config: dict | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.is_logger, self.interval, self.total_steps = is_logger, interval, total_steps
        self.hf_config, self.peak_flops, self.world_size, self.packing = hf_config, peak_flops, world_size, packing
        wandb = (run_config or {}).get("logging", {}).get("wandb")  # the resolved config's logging.wandb
        self.writer = MetricsWriter(self.directory if is_logger else None, tensorboard,
                                    wandb if is_logger else None, run_config)
        saved = dict(totals or {})
        if "target_tokens" in saved:  # checkpoints written before trained tokens had one name
            saved.setdefault("trained_tokens", saved.pop("target_tokens"))
        self.totals = {k: saved.get(k, 0) for k in TOTAL_KEYS}
        self.last_loss: float | None = None
        self.valid_loss: float | None = None
        self.started, self.first_step = time.perf_counter(), None
        self.bar = None  # a tqdm bar on a terminal (rank 0); plain lines otherwise (Slurm logs, files)

    def start(self, step: int) -> None:
        """The loop begins after `step` steps (0, or a resumed run's step): the clock for elapsed time and ETA."""
        import sys

        self.started, self.first_step = time.perf_counter(), step
        if self.is_logger and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True)

    def _clock(self, step: int) -> str:
        """Elapsed time of this process's steps and the time left at their average pace."""
        elapsed = time.perf_counter() - self.started
        done = step - (self.first_step or 0)
        left = elapsed / max(done, 1) * (self.total_steps - step)
        return f"elapsed {_hms(elapsed)} eta {_hms(left)}"

    def log(self, text: str) -> None:
        """Print a line on the logger rank (above the progress bar when there is one)."""
        if not self.is_logger:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def should_log(self, step: int) -> bool:
        """Whether step `step` is written (every `interval` steps and the last one)."""
        return step % self.interval == 0 or step == self.total_steps

    def record_step(self, step: int, rec: dict, epoch: float) -> dict:
        """Add a finished step to the totals; returns its record with throughput and MFU."""
        dt = rec["step_time_s"]
        self.last_loss = rec["loss"]
        self.totals["train_time_s"] += dt
        for k in TOTAL_KEYS[1:]:
            self.totals[k] += rec[k]
        rec = rec | {
            "tokens_per_s": rec["real_tokens"] / dt,
            "trained_tokens_per_s": rec["trained_tokens"] / dt,
            "conversations_per_s": rec["conversations"] / dt,
            "packs_per_s": rec["packs"] / dt,
            "padding_fraction": 1.0 - rec["real_tokens"] / max(rec["total_tokens"], 1),
            "epoch": epoch,
        }
        if self.peak_flops:
            flops = model_flops(self.hf_config, rec["real_tokens"], rec["seq_sq_sum"])
            rec["mfu"] = flops / (dt * self.world_size * self.peak_flops)
        if self.should_log(step):
            self._emit(step, rec)
        return rec

    def _emit(self, step: int, rec: dict) -> None:
        rec = {"kind": "train", "step": step} | {k: v for k, v in rec.items() if k != "seq_sq_sum"}
        self.writer.write(rec)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {rec['loss']:.4f} tok/s {rec['tokens_per_s']:.0f}", refresh=False)
            return
        mfu = f" mfu {rec['mfu']:.3f}" if "mfu" in rec else ""
        gn = f"{rec['grad_norm']:.3f}" if rec["grad_norm"] is not None else "-"
        self.log(f"step {step}/{self.total_steps} loss {rec['loss']:.6f} lr {rec['lr']:.3e} grad_norm {gn} "
                 f"conv {rec['conversations']} tok/s {rec['tokens_per_s']:.0f} conv/s {rec['conversations_per_s']:.2f} "
                 f"packs/s {rec['packs_per_s']:.2f} pad {rec['padding_fraction']:.3f}{mfu} {self._clock(step)}")

    def record_resume(self, step: int, source: str) -> None:
        """Log that this process resumed after `step` from the checkpoint `source` (the report marks it)."""
        self.writer.write({"kind": "resume", "step": step, "checkpoint": source})

    def record_validation(self, step: int, loss: float, fields: dict[str, float] | None = None) -> None:
        """Log a validation loss (and a source's extra fields: a blend's `dataset/<name>/valid_loss`)."""
        self.valid_loss = loss
        self.writer.write({"kind": "valid", "step": step, "valid_loss": loss} | dict(fields or {}))
        detail = "".join(f" {name} {value:.6f}" for name, value in (fields or {}).items())
        self.log(f"step {step} validation loss {loss:.6f}" + (f" ({detail.strip()})" if detail else ""))

    def finish(self, steps: int, epochs: float, interrupted: bool, extra: dict | None = None) -> dict:
        """The run summary (Table 3 columns, plus the source's `extra` fields: a blend's per-member numbers);
        printed and written as summary.json on the logger rank."""
        from megapack.atomic import write_json_atomic

        t = self.totals
        result = summary(epochs=epochs, steps=steps, train_time_s=t["train_time_s"], packs=t["packs"],
                         conversations=t["conversations"], tokens=t["real_tokens"], trained_tokens=t["trained_tokens"],
                         final_loss=self.last_loss, final_valid_loss=self.valid_loss, packing=self.packing)
        result["interrupted"] = interrupted
        result |= extra or {}
        if self.is_logger:
            print(format_table([result]), flush=True)
            if self.directory is not None:
                write_json_atomic(self.directory / "summary.json", result)
            self.writer.summarize(result)
        return result

    def close(self) -> None:
        """Close the sinks and the progress bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.writer.close()


def _hms(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
