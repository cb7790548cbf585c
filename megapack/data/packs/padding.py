"""The padding arm's micro-batch rule, in one place: a micro-batch of conversations is padded to its longest,
rounded up to PADDED_ARM_MULTIPLE tokens. The trainer builds its padded micro-batches with `padded_length`;
`megapack inspect --plot` shows the same padding without training (`padded_micro_batches`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megapack.data.packs.packing import round_up

PADDED_ARM_MULTIPLE = 8


def _round_up(longest: np.ndarray | int, multiple: int) -> np.ndarray | int:
    """The rule itself: the longest real length rounded up to a multiple of `multiple`."""
    if multiple < 1:
        raise ValueError(f"multiple {multiple}: expected at least 1")
    return round_up(longest, multiple)


def padded_length(real_lengths: Sequence[int] | np.ndarray, multiple: int = PADDED_ARM_MULTIPLE) -> int:
    """Tokens each conversation of one padding-arm micro-batch takes: the longest real length, rounded up."""
    if len(real_lengths) == 0:
        raise ValueError("a padded micro-batch needs at least one conversation")
    return int(_round_up(int(max(real_lengths)), multiple))


def padded_micro_batches(real_lengths: np.ndarray, order: np.ndarray, micro_batch_size: int,
                         multiple: int = PADDED_ARM_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """(real, computed) tokens of each padding-arm micro-batch: consecutive runs of `micro_batch_size`
    conversations in `order`, each padded to `padded_length` of its run (the last run may be shorter)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size {micro_batch_size}: expected at least 1")
    lengths = np.asarray(real_lengths, np.int64)[np.asarray(order, np.int64)]
    starts = np.arange(0, len(lengths), micro_batch_size)
    if not len(starts):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    real = np.add.reduceat(lengths, starts)
    longest = np.maximum.reduceat(lengths, starts)
    count = np.diff(np.append(starts, len(lengths)))
    return real, count * _round_up(longest, multiple)
