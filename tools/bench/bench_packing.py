"""Packing benchmark: 1.2M long-tailed lengths (lognormal, log-mean ln 700, sigma 1, clipped to [8, 16384]),
L = 4096; time and packs / lower bound for every algorithm. Prints a table (not a test)."""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from megapack.data.packs.packing import PACKINGS, assign_packs, lower_bound


def main() -> None:
    """Run every packing on the generated lengths and print one row per algorithm."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1_200_000)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="report the median of R runs")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(np.exp(rng.normal(np.log(700), 1.0, args.n)), 8, 16384).astype(np.int64)
    L = args.seq_length
    print(f"{args.n:,} lengths, mean {lengths.mean():.0f}, {int((lengths > L).sum()):,} longer than L={L}; median of {args.repeat} runs")
    print("| packing | median time (s) | packs | lower bound | packs / LB | efficiency | truncated |")
    print("|---|---|---|---|---|---|---|")
    for packing in PACKINGS:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            assignment = assign_packs(lengths, L, packing, seed=1)
            times.append(time.perf_counter() - t)
        lb = lower_bound(assignment.padded_lengths, L)  # random keeps every token; the others truncate to L
        eff = assignment.real_lengths.sum() / (assignment.num_packs * L)
        print(f"| {packing} | {statistics.median(times):.3f} | {assignment.num_packs:,} | {lb:,} | "
              f"{assignment.num_packs / lb:.5f} | {eff:.4%} | {assignment.truncated:,} |")


if __name__ == "__main__":
    main()
