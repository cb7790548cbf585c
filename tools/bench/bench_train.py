"""Training-step breakdown: the median share of each part of a step (waiting for data, forward+backward, optimizer,
checkpoint) from a run's metrics.jsonl, whose per-step records carry `time_data_s`, `time_forward_backward_s`,
`time_optimizer_s`, `time_checkpoint_s` and `step_time_s`.

Without --run-dir it first trains the demo config (`megapack demo`'s bfd arm: tiny LLaMA-3-architecture model, real
tokenizer and demo data, 2 CPU processes) for a few steps with a checkpoint midway, through `megapack train` under
torchrun. Prints a table (not a test).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from megapack.errors import MegapackError  # noqa: E402
from megapack.report.document import markdown_table  # noqa: E402

PARTS = (("data", "time_data_s"), ("forward+backward", "time_forward_backward_s"),
         ("optimizer", "time_optimizer_s"), ("checkpoint", "time_checkpoint_s"))


def step_records(metrics: Path, skip_first: int) -> list[dict]:
    """Train records of metrics.jsonl in step order, the first `skip_first` steps (warm-up) left out."""
    from megapack.training.run.metrics import read_metrics

    if not metrics.is_file():
        raise MegapackError(f"{metrics}: no such file (expected a run's metrics.jsonl)")
    records = [rec for _, rec in sorted(read_metrics(metrics).items())][skip_first:]
    if not records:
        raise MegapackError(f"{metrics}: no training steps after skipping the first {skip_first}")
    for rec in records:
        for key in (*(k for _, k in PARTS), "step_time_s"):
            if not isinstance(rec.get(key), (int, float)):
                raise MegapackError(f"{metrics}: step {rec['step']} has no {key!r} (the trainer does not record it)")
    return records


def breakdown(records: list[dict]) -> list[tuple[str, float, float, float]]:
    """(part, median seconds, median share of the step, mean share) per part, then the rest and the whole step."""
    rows = []
    rest = [r["step_time_s"] - sum(r[k] for _, k in PARTS) for r in records]
    columns = [(f"{name} (`{key}`)", [r[key] for r in records]) for name, key in PARTS]
    columns.append(("rest (step time minus the parts)", rest))
    steps = [r["step_time_s"] for r in records]
    for name, values in columns:
        shares = [v / s for v, s in zip(values, steps)]
        rows.append((name, statistics.median(values), statistics.median(shares), statistics.fmean(shares)))
    rows.append(("step (`step_time_s`)", statistics.median(steps), 1.0, 1.0))
    return rows


def train_demo(workdir: Path, steps: int, nproc: int) -> Path:
    """Train the demo's bfd arm for `steps` steps (a checkpoint at the middle step); returns its log directory."""
    import yaml

    from megapack.demo import DemoConfig, preprocess_all, prepare_inputs, train_config

    cfg = DemoConfig(workdir=str(workdir), packings=("bfd",), nproc=nproc)
    tokenizer, data_dir, hf_dir = prepare_inputs(cfg, workdir)
    preprocess_all(cfg, workdir, tokenizer, data_dir)
    config = train_config(cfg, workdir, hf_dir, "bfd")
    config["training"].pop("epochs")
    config["training"]["train_steps"] = steps
    config["checkpoint"]["save_interval"] = max(1, steps // 2)
    run_dir = Path(config["logging"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "megapack", "train", "--config", str(run_dir / "config.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        raise MegapackError(f"training failed (exit {proc.returncode}): {tail[0]}")
    return run_dir


def main() -> int:
    """Train (unless --run-dir), then print the breakdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, help="a run's logging directory (holds metrics.jsonl); skips training")
    p.add_argument("--steps", type=int, default=12, help="training steps when training here")
    p.add_argument("--nproc", type=int, default=2, help="CPU processes when training here")
    p.add_argument("--skip-first", type=int, default=1, help="leave out the first steps (warm-up)")
    args = p.parse_args()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = args.run_dir or train_demo(Path(tmp), args.steps, args.nproc)
            records = step_records(run_dir / "metrics.jsonl", args.skip_first)
    except MegapackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(records)} steps of {run_dir if args.run_dir else 'the demo config (bfd, CPU)'}, "
          f"first {args.skip_first} left out")
    rows = [[name, f"{median:.4f}", f"{share:.1%}", f"{mean:.1%}"] for name, median, share, mean in breakdown(records)]
    print("\n".join(markdown_table(["part", "median (s)", "median share", "mean share"], rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
