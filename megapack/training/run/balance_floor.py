"""A floor under the DP ranks' max/mean cost for any layout of a global batch's whole segments (`balance.py`): what
no balancing that keeps conversations whole can beat, so the benchmark can tell a weak layout from an impossible one."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megapack.training.run.balance import CostModel


def lower_bound(real_lengths: Sequence[np.ndarray], padded_lengths: Sequence[np.ndarray], cost: CostModel,
                seq_length: int, dp: int, rows_per_rank: int) -> float:
    """max/mean floor: for every k, some rank holds k+1 of the k*dp+1 costliest segments (pigeonhole), at least the
    k+1 cheapest of them, and at least the tokens the other ranks' rows have no room for, each costing `linear`."""
    real = np.concatenate([np.asarray(x, np.int64) for x in real_lengths])
    padded = np.concatenate([np.asarray(x, np.int64) for x in padded_lengths])
    costs = cost.segments(real)
    order = np.lexsort((np.arange(len(costs)), -costs))
    costs, sizes = costs[order], padded[order]
    mean = float(costs.sum()) / dp
    if mean <= 0:
        return 1.0
    least_tokens = int(padded.sum()) - (dp - 1) * rows_per_rank * seq_length  # every rank holds at least these
    best = 0.0
    for k in range((len(costs) - 1) // dp + 1):
        held = slice(k * dp - k, k * dp + 1)  # the k+1 cheapest of the k*dp+1 costliest
        best = max(best, float(costs[held].sum()) + cost.linear * max(least_tokens - int(sizes[held].sum()), 0))
    return max(1.0, best / mean)
