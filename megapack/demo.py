"""The quickstart's main job: real tokenizer and demo data, a tiny LLaMA-3-architecture model, four packings,
Table 3 (`megapack.demo_quality`: the same on real weights, with Table 1)."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from megapack.data.packs.packing import PACKINGS
from megapack.demo_runs import launch, write_run_config
from megapack.errors import MegapackError


@dataclass
class DemoConfig:
    """Embedded defaults of `megapack demo` (every field is a flag)."""

    workdir: str = "runs/demo"
    dataset: str = "alpaca_en_demo"
    num_samples: int = 128
    seq_length: int = 512
    packings: tuple[str, ...] = PACKINGS
    nproc: int = 2
    tp: int = 1  # 1: data parallel over nproc; 2: tensor parallel
    global_batch_size: int = 8
    lr: float = 3e-3
    epochs: float = 1.0
    train: bool = True


def prepare_inputs(cfg: DemoConfig, workdir: Path) -> tuple[Path, Path, Path]:
    """Fetch the real tokenizer and data, write a registry for a subset, build the tiny HF checkpoint."""
    from megapack.assets import fetch
    from megapack.model.tiny_checkpoint import tiny_llama_config, write_tiny_checkpoint

    tokenizer = fetch("llama3-tokenizer")
    data_dir = fetch("llamafactory-data")
    registry = json.loads((data_dir / "dataset_info.json").read_text())
    if cfg.dataset not in registry:
        raise MegapackError(f"--dataset {cfg.dataset!r}: not in {data_dir / 'dataset_info.json'}")
    entry = dict(registry[cfg.dataset], file_name=str(data_dir / registry[cfg.dataset]["file_name"]))
    entry["num_samples"] = cfg.num_samples
    demo_data = workdir / "data"
    demo_data.mkdir(parents=True, exist_ok=True)
    (demo_data / "dataset_info.json").write_text(json.dumps({cfg.dataset: entry}, indent=2) + "\n")
    hf_dir = workdir / "tiny-llama3"
    if not (hf_dir / "config.json").exists():
        write_tiny_checkpoint(hf_dir, tiny_llama_config(), seed=0, tokenizer_model=tokenizer)
    return tokenizer, demo_data, hf_dir


def preprocess_all(cfg: DemoConfig, workdir: Path, tokenizer: Path, data_dir: Path) -> dict[str, dict]:
    """Run `megapack preprocess` once per packing; returns each meta.json."""
    from megapack.data.packs.shards import META_NAME, read_meta
    from megapack.data.pipeline.preprocess import PreprocessConfig, run_preprocess

    metas = {}
    for packing in cfg.packings:
        out = workdir / "shards" / packing
        if (out / META_NAME).exists():
            metas[packing] = read_meta(out)
            continue
        pre = PreprocessConfig(
            output_dir=str(out), tokenizer_model=str(tokenizer), datasets=[cfg.dataset], dataset_dir=str(data_dir),
            seq_length=cfg.seq_length, packing=packing, val_fraction=0.05, workers=1, overwrite=True, progress=False,
        )
        metas[packing] = run_preprocess(pre)
    return metas


def train_config(cfg: DemoConfig, workdir: Path, hf_dir: Path, packing: str) -> dict:
    """The run config for one packing arm (same model, optimizer and number of conversations per epoch)."""
    run_dir = workdir / "train" / packing
    return {
        "model": {"hf_dir": str(hf_dir), "init": "hf"},
        "data": {"path": str(workdir / "shards" / packing)},
        "parallel": {"tp": cfg.tp, "pp": 1},
        "optimizer": {"lr": cfg.lr, "min_lr": cfg.lr / 10, "warmup_steps": 2, "decay_style": "cosine"},
        "training": {
            # a packed micro-batch is one pack (THD); the padding arm pads 4 conversations to the longest
            "micro_batch_size": 1 if packing != "padding" else 4,
            "global_batch_size": cfg.global_batch_size,
            "epochs": cfg.epochs,
            "eval_max_batches": 4,
        },
        "checkpoint": {"dir": str(run_dir / "checkpoints"), "resume": "never"},
        "logging": {"dir": str(run_dir), "tensorboard": False},
    }


def train_all(cfg: DemoConfig, workdir: Path, hf_dir: Path) -> list[dict]:
    """Train every arm in one torchrun launch on nproc CPU processes (one process start and import for all);
    returns their summary.json files."""
    paths = [write_run_config(train_config(cfg, workdir, hf_dir, packing)) for packing in cfg.packings]
    return launch(paths, cfg.nproc, workdir / "train" / "train.log")


def verdict(results: list[dict]) -> str | None:
    """The table's conclusion in one line: how much faster the fastest packing trained the same conversations than
    padding (conversations per second), and why its loss column differs; None without a padding arm."""
    padding = next((r for r in results if r["packing"] == "padding"), None)
    packed = [r for r in results if r["packing"] != "padding" and r.get("conversations_per_s")]
    if padding is None or not packed or not padding.get("conversations_per_s"):
        return None
    best = max(packed, key=lambda r: r["conversations_per_s"])
    ratio = best["conversations_per_s"] / padding["conversations_per_s"]
    speed = f"{ratio:.1f}x faster than" if ratio >= 1 else f"at {ratio:.1f}x the speed of"
    return (f"packing ({best['packing']}) trained the same conversations {speed} padding; its loss "
            f"differs because it took fewer optimizer steps ({best['total_steps']} against {padding['total_steps']}),"
            " each holding more conversations")


def run_demo(cfg: DemoConfig) -> list[dict]:
    """Preprocess with every packing, train each arm briefly, print and save the Table 3 comparison and a report."""
    from megapack.data.packs.summary import table
    from megapack.atomic import write_json_atomic
    from megapack.report.document import write_report
    from megapack.training.run.metrics import format_table

    workdir = Path(cfg.workdir)
    tokenizer, data_dir, hf_dir = prepare_inputs(cfg, workdir)
    metas = preprocess_all(cfg, workdir, tokenizer, data_dir)
    print(f"\n{cfg.dataset}: first {cfg.num_samples} records, LLaMA-3 tokenizer, seq_length {cfg.seq_length}")
    rows = [("train split", "conversations  packs  lower bound  efficiency  truncated")]
    for packing, meta in metas.items():
        s = meta["splits"]["train"]
        rows.append((packing, f"{s['num_conversations']:13d}  {s['num_packs']:5d}  {s['lower_bound_packs']:11d}  "
                              f"{s['packing_efficiency']:10.1%}  {s['truncated']:9d}"))
    print(table(rows))
    if not cfg.train:
        return []
    print(f"training {', '.join(cfg.packings)} one after another on {cfg.nproc} processes (tp={cfg.tp}), "
          f"log {workdir / 'train' / 'train.log'}", flush=True)
    results = train_all(cfg, workdir, hf_dir)
    print("\nTable 3 (the Packing Analysis paper's columns), tiny model on CPU:")
    print(format_table(results))
    line = verdict(results)
    if line:
        print(line)
    write_json_atomic(workdir / "table3.json", {"runs": results})
    print(f"saved {workdir / 'table3.json'}")
    runs = [workdir / "train" / packing for packing in cfg.packings]
    if importlib.util.find_spec("matplotlib") is None:
        print(f"no report: matplotlib is not installed (pip install 'megapack[plot]', then "
              f"`megapack report {workdir / 'train'}`)")
        return results
    report = write_report(runs, workdir / "report")
    print(f"report (loss, throughput and padding figures): {report.path}")
    return results
