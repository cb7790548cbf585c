"""Independent random streams: one per purpose, derived from the user's seed with numpy's SeedSequence.

numpy pads a short seed with zero words, so `default_rng(s)` and `default_rng([s, 0])` are the same stream: before
this module, preprocessing's pack-order shuffle (`default_rng(seed)`) and the trainer's epoch-0 order
(`default_rng([seed, 0])`) were one permutation, and epoch 0 visited the packs in the order the packer made them.
Here every purpose has its own code in the SeedSequence spawn key, so streams for different purposes (or keys)
differ for every seed. The codes are part of the output format: changing one changes the shards a seed gives.
"""
from __future__ import annotations

import numpy as np

from megapack.errors import MegapackError

# Purpose codes (never reuse or renumber one; add new purposes with new codes).
PACK_ORDER = 1  # order of the packs in the shards (greedy, bfd)
PACKING = 2  # `random` packing's conversation order before concatenation
VAL_SPLIT = 3  # which samples are held out as the val split
EPOCH_ORDER = 4  # the trainer's per-epoch pack order (key: the epoch)
TINY_CHECKPOINT = 5  # weights of the tiny random checkpoint (demo, tests)
BLEND_ORDER = 6  # a data.blend member's per-epoch pack order (keys: the member's index, its epoch)

PURPOSES: dict[str, int] = {
    "pack_order": PACK_ORDER,
    "packing": PACKING,
    "val_split": VAL_SPLIT,
    "epoch_order": EPOCH_ORDER,
    "tiny_checkpoint": TINY_CHECKPOINT,
    "blend_order": BLEND_ORDER,
}
SEED_LIMIT = 1 << 64  # seeds are 0 <= seed < 2**64 (fits SeedSequence's 4-word pool: never collides with a key)


def check_seed(seed: int, what: str = "seed") -> int:
    """The seed as an int; MegapackError naming `what` unless it is an integer in [0, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        raise MegapackError(f"{what} {seed!r}: expected an integer in [0, 2**64)")
    return int(seed)


def seed_sequence(seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence of `purpose` (a PURPOSES name) and non-negative `keys` (e.g. the epoch) under `seed`."""
    if purpose not in PURPOSES:
        raise ValueError(f"random stream purpose {purpose!r}: expected one of {', '.join(PURPOSES)}")
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 for k in keys):
        raise ValueError(f"random stream keys {keys!r}: expected non-negative integers")
    return np.random.SeedSequence(entropy=check_seed(seed), spawn_key=(PURPOSES[purpose], *map(int, keys)))


def rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy Generator for `purpose` (and keys) under `seed`, independent of every other purpose's stream."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, *keys)))


def epoch_order(num_packs: int, seed: int, epoch: int, member: int | None = None) -> np.ndarray:
    """The trainer's pack order in `epoch` (`training.seed`): the same on every rank and for every parallel layout.

    A data.blend member walks its own packs in its own order (`member`: its index in the blend)."""
    if member is None:
        return rng(seed, "epoch_order", epoch).permutation(num_packs)
    return rng(seed, "blend_order", member, epoch).permutation(num_packs)
