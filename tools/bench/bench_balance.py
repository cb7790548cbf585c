"""Rank balance benchmark: max/mean per-DP-rank cost (the 8B model's training FLOPs, a*s + b*s^2 per segment) of
global batches of 128 packs, laid out at random (the unbalanced sampler), by whole packs (`training.balance packs`)
and re-packed by segments (`segments`), at DP 8 / 32 / 64 for 4K and 32K rows, on two length mixes packed with bfd:

- bench: the 1.2M bench lengths of bench_packing.py (lognormal, log-mean ln 700, sigma 1, clipped to [8, 16384]);
- long: a long-document mix (lognormal, log-mean ln 4000, sigma 1, clipped to [8, 32768]).

Prints a Markdown table: the mean over the steps and the worst step of each; `floor` is a lower bound for any
layout of whole segments (`balance_floor.lower_bound`: pigeonhole over the costliest segments, plus the
tokens the other ranks have no room for); the worst slot is the worst micro-batch slot's max/mean across ranks
(pipeline parallelism). Not a test.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from megapack.data.packs.packing import assign_packs
from megapack.training.run.balance import CostModel, balance_packs, balance_segments, default_layout
from megapack.training.run.balance_floor import lower_bound

ROOT = Path(__file__).resolve().parents[2]
MIXES = {"bench": (700.0, 16384), "long": (4000.0, 32768)}


def packs_of(lengths: np.ndarray, seq_length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(real, padded) segment lengths of every pack of a bfd packing (in the packing's shuffled pack order)."""
    a = assign_packs(lengths, seq_length, "bfd", seed=1)
    cuts = a.pack_offsets[1:-1]
    return np.split(a.real_lengths, cuts), np.split(a.padded_lengths, cuts)


def measure(real: list, padded: list, cost: CostModel, seq_length: int, dp: int, gbs: int, steps: int,
            seed: int) -> dict[str, list[float]]:
    """max/mean per step of each layout over `steps` random global batches of `gbs` packs."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {"random": [], "packs": [], "segments": [], "bound": [], "packs_slot": [],
                                   "segments_slot": [], "seconds": []}
    micro = gbs // dp
    for _ in range(steps):
        batch = rng.choice(len(real), gbs, replace=False)
        r, p = [real[i] for i in batch], [padded[i] for i in batch]
        costs = [cost.pack(x) for x in r]
        out["random"].append(default_layout(costs, dp, micro, 1).imbalance())
        out["bound"].append(lower_bound(r, p, cost, seq_length, dp, micro))
        out["packs"].append(balance_packs(costs, dp, micro, 1).imbalance())
        t = time.perf_counter()
        layout = balance_segments(r, p, cost, seq_length, dp, micro, 1)
        out["seconds"].append(time.perf_counter() - t)
        out["segments"].append(layout.imbalance())
        out["segments_slot"].append(layout.slot_imbalance())
        out["packs_slot"].append(balance_packs(costs, dp, micro, 1).slot_imbalance())
    return out


def main() -> None:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1_200_000, help="conversation lengths per mix")
    p.add_argument("--steps", type=int, default=50, help="global batches per cell")
    p.add_argument("--global-batch", type=int, default=128, help="packs per global batch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    hf = json.loads((ROOT / "configs/models/Meta-Llama-3-8B/config.json").read_text())
    cost = CostModel.of_model(hf)
    print(f"8B cost per segment of s tokens: {cost.linear:.4g}*s + {cost.quadratic:.4g}*s^2; global batch "
          f"{args.global_batch} packs, mbs 1; {args.steps} random global batches per cell; mean (worst) max/mean")
    print("| mix | rows | DP | packs/rank | random | packs | segments | floor | worst slot: "
          "packs | worst slot: segments | segments: s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mix, (median, cap) in MIXES.items():
        rng = np.random.default_rng(args.seed)
        lengths = np.clip(np.exp(rng.normal(np.log(median), 1.0, args.n)), 8, cap).astype(np.int64)
        for seq_length in (4096, 32768):
            real, padded = packs_of(lengths, seq_length)
            for dp in (8, 32, 64):
                m = measure(real, padded, cost, seq_length, dp, args.global_batch, args.steps, args.seed)
                cell = {k: f"{np.mean(v):.4f} ({np.max(v):.4f})" for k, v in m.items() if k != "seconds"}
                print(f"| {mix} | {seq_length // 1024}K | {dp} | {args.global_batch // dp} | {cell['random']} | "
                      f"{cell['packs']} | {cell['segments']} | {cell['bound']} | {cell['packs_slot']} | "
                      f"{cell['segments_slot']} | "
                      f"{np.mean(m['seconds']):.3f} |", flush=True)


if __name__ == "__main__":
    main()
