"""Checkpoint benchmark: how long training is blocked per checkpoint, synchronous vs async (`checkpoint.async_save`).

Trains a tiny LLaMA-3-architecture model (real 128,256 vocabulary, so the checkpoint with AdamW state is ~260 MB)
on the real demo data with 2 processes (DP2, gloo on CPU), saving after every step, once with synchronous and once
with async saves, both runs in one torchrun launch. Prints the median blocked time per mode and the ratio (the
first save of each run, which also plans the checkpoint layout, is reported separately) and the median step time
(the async writer shares the CPU with training). A table, not a test.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

BLOCKED = re.compile(r"^checkpoint of step (\d+): training blocked ([0-9.]+) s$")
RUN_START = re.compile(r"^training \d+ steps on ")


def run_config(hf_dir: Path, shards: Path, run_dir: Path, steps: int, async_save: bool) -> dict:
    """A run config saving after every step."""
    return {
        "model": {"hf_dir": str(hf_dir), "init": "hf"},
        "data": {"path": str(shards), "seq_length": 512, "valid_split": None},
        "optimizer": {"lr": 1e-3, "warmup_steps": 0, "decay_style": "constant"},
        "training": {"global_batch_size": 2, "train_steps": steps, "precision": "fp32"},
        "checkpoint": {"dir": str(run_dir / "checkpoints"), "save_interval": 1, "keep_last": 2,
                       "async_save": async_save},
        "logging": {"dir": str(run_dir), "tensorboard": False},
    }


def blocked_times(log: str) -> list[list[float]]:
    """Per run (in launch order), the blocked seconds of each checkpoint."""
    runs: list[list[float]] = []
    for line in log.splitlines():
        if RUN_START.match(line):
            runs.append([])
        elif (m := BLOCKED.match(line)) and runs:
            runs[-1].append(float(m.group(2)))
    return runs


def main() -> None:
    """Prepare inputs, run both modes in one launch, print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12, help="training steps per mode (one checkpoint each)")
    args = parser.parse_args()
    from megapack.assets import fetch
    from megapack.data.pipeline.preprocess import PreprocessConfig, run_preprocess
    from megapack.model.tiny_checkpoint import write_tiny_checkpoint
    from megapack.training.run.metrics import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf_dir = write_tiny_checkpoint(work / "hf")
        shards = work / "shards"
        run_preprocess(PreprocessConfig(
            output_dir=str(shards), tokenizer_model=str(fetch("llama3-tokenizer")), datasets=["alpaca_en_demo"],
            dataset_dir=str(fetch("llamafactory-data")), seq_length=512, packing="bfd", workers=1, progress=False))
        configs = []
        for mode, async_save in (("sync", False), ("async", True)):
            path = work / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(run_config(hf_dir, shards, work / mode, args.steps, async_save)))
            configs += ["--config", str(path)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "megapack",
               "train", *configs]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        latest = work / "sync" / "checkpoints" / (work / "sync" / "checkpoints" / "latest").read_text().strip()
        size = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
        step_s = {mode: statistics.median(r["step_time_s"] for r in read_metrics(work / mode / "metrics.jsonl").values())
                  for mode in ("sync", "async")}
    sync, async_ = blocked_times(proc.stdout)
    print(f"checkpoint size {size / 2**20:.0f} MiB (model + AdamW state), DP2 on CPU, {args.steps} saves per mode")
    print("| mode | saves | first save blocks (s) | later saves block, median (s) | step, median (s) | step + save (s) |")
    print("|---|---|---|---|---|---|")
    for name, times in (("sync", sync), ("async", async_)):
        rest = statistics.median(times[1:])
        print(f"| {name} | {len(times)} | {times[0]:.2f} | {rest:.3f} | {step_s[name]:.3f} | {step_s[name] + rest:.3f} |")
    print(f"\nasync blocks training {statistics.median(sync[1:]) / statistics.median(async_[1:]):.1f}x less per "
          "checkpoint (median, same launch)")


if __name__ == "__main__":
    main()
