"""Expected wall-clock of the paper grid's 24 runs (configs/paper) from the FLOP count at a stated MFU; prints a table.

The study's datasets are not here, so each dataset is its size in conversations with bench_packing's long-tailed
lengths (lognormal, log-mean ln 700, sigma 1, clipped to [8, 16384]); 10% are held out for validation as in the
study (`split_train_val`, as preprocessing holds them out). Each arm's train split is packed with megapack's own
packing (`assign_packs`, 4096 tokens): the packed arms compute their packs' tokens; the padding arm computes
micro-batches of the config's micro_batch_size conversations in a shuffled order, each padded to the longest
rounded up to 8 (`padded_micro_batches`, the trainer's padded micro-batches). The FLOPs are
`metrics.model_flops` (6 N per token plus causal attention over each segment, the formula behind the logged MFU)
over the tokens computed, padding included: time = epochs x FLOPs / (GPUs x peak x MFU), with a third more for the
runs under full recompute (each layer's forward runs twice: 8 N instead of 6 N per token; MFU does not count it).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import paper_grid  # noqa: E402

from megapack.data.packs.packing import assign_packs  # noqa: E402
from megapack.data.packs.padding import padded_micro_batches  # noqa: E402
from megapack.data.packs.writer import split_train_val  # noqa: E402
from megapack.model.config import load_hf_config  # noqa: E402
from megapack.model.flops import BF16_PEAK_FLOPS, model_flops  # noqa: E402

SEQ = 4096


def lengths_of(n: int, seed: int) -> np.ndarray:
    """bench_packing's long-tailed conversation lengths (tokens)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(np.log(700), 1.0, n)), 8, 16384).astype(np.int64)


def epoch_work(lengths: np.ndarray, packing: str, micro_batch_size: int, seed: int) -> tuple[int, int, int]:
    """(sequences per epoch, tokens computed, sum of squared segment lengths) of one arm's train split."""
    assignment = assign_packs(lengths, SEQ, packing, seed=seed)
    if packing != "padding":
        padded = assignment.padded_lengths.astype(np.float64)
        return assignment.num_packs, int(padded.sum()), int((padded * padded).sum())
    order = np.random.default_rng(seed).permutation(len(assignment.real_lengths))
    _, computed = padded_micro_batches(assignment.real_lengths, order, micro_batch_size)
    count = np.minimum(micro_batch_size, len(order) - micro_batch_size * np.arange(len(computed)))
    width = (computed // count).astype(np.float64)  # every conversation of a micro-batch is this wide
    return assignment.num_packs, int(computed.sum()), int((width * width * count).sum())


def main() -> None:
    """One row per run: sequences, steps, tokens computed, FLOPs and hours; packed over padding speedups."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mfu", type=float, default=0.40,
                   help="model FLOPs utilisation (tools/README.md, GPU check: 41%% on H200)")
    p.add_argument("--gpu", default="H100", choices=sorted(BF16_PEAK_FLOPS), help="bf16 peak of this GPU")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    peak, gpus = BF16_PEAK_FLOPS[args.gpu], paper_grid.WORLD_SIZE
    print(f"{gpus} x {args.gpu} ({peak / 1e12:.0f} TFLOP/s bf16) at {args.mfu:.0%} MFU; lengths: lognormal "
          f"(ln 700, 1), 90% train; seq_length {SEQ}")
    print("| model | dataset | arm | sequences/epoch | steps | tokens computed/epoch | FLOPs | hours | x padding |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for dataset, (label, n) in paper_grid.DATASETS.items():
        lengths = lengths_of(n, args.seed)
        train = lengths[split_train_val(n, 0.1, args.seed)[0]]
        for model, m in paper_grid.MODELS.items():
            hf = load_hf_config(ROOT / m["planner_config"])
            hours = {}
            for packing in ("padding", "random", "greedy"):
                mbs = m["padding" if packing == "padding" else "packed"]["micro_batch_size"]
                sequences, tokens, seq_sq = epoch_work(train, packing, mbs, args.seed)
                flops = m["epochs"] * model_flops(hf, tokens, seq_sq)
                recompute = m["padding" if packing == "padding" else "packed"]["recompute"]
                executed = flops * (4 / 3 if recompute == "full" else 1.0)
                hours[packing] = executed / (gpus * peak * args.mfu) / 3600
                steps = m["epochs"] * math.ceil(sequences / m["global_batch_size"])
                ratio = hours["padding"] / hours[packing]
                print(f"| {model} | {label} | {packing} | {sequences:,} | {steps:,} | {tokens / 1e9:.3f} B | "
                      f"{flops:.3e} | {hours[packing]:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
