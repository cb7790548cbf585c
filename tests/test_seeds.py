"""Random streams for different purposes are independent, also for the same seed: preprocessing's pack-order
shuffle must not be the trainer's epoch order (nor its inverse, which would train epoch 0 on packs sorted by length)."""
from __future__ import annotations

import numpy as np
import pytest

from megapack import seeds
from megapack.data.packs.writer import split_train_val
from megapack.data.packs.packing import assign_packs
from megapack.errors import MegapackError

PREPROCESS_DEFAULT_SEED = 1234  # megapack preprocess --seed default (cli/preprocess.py, PreprocessConfig)
TRAIN_DEFAULT_SEED = 1234  # training.seed default (training/preflight/config.py)
SEEDS = sorted({PREPROCESS_DEFAULT_SEED, TRAIN_DEFAULT_SEED, 0, *np.random.default_rng(7).integers(0, 2**31, 20).tolist()})
L = 64


def _pack_order(seed: int, n: int, packing: str) -> np.ndarray:
    """Conversation index of each pack when every conversation fills a pack: the permutation preprocessing applied."""
    assignment = assign_packs(np.full(n, L), L, packing, seed=seed)
    assert assignment.num_packs == n and (np.diff(assignment.pack_offsets) == 1).all()
    return assignment.conversation


def test_numpy_trailing_zero_seed_words_collide():
    """Why purposes need their own key: numpy pads a short seed with zero words, so these are one stream."""
    for s in SEEDS[:5]:
        assert (np.random.default_rng(s).permutation(100) == np.random.default_rng([s, 0]).permutation(100)).all()


@pytest.mark.parametrize("packing", ["bfd", "greedy", "random"])
@pytest.mark.parametrize("n", [50, 1000])
def test_pack_order_is_not_the_trainers_epoch_order(packing, n):
    for seed in SEEDS:
        order = _pack_order(seed, n, packing)
        inverse = np.argsort(order)
        # the trainer's epoch-0 order over the n packs: today's function and the seeds stream it should use
        for epoch0 in (seeds.epoch_order(n, seed, 0), seeds.rng(seed, "epoch_order", 0).permutation(n)):
            assert not (epoch0 == order).all(), (seed, packing)
            assert not (epoch0 == inverse).all(), (seed, packing)
            assert (epoch0 == order).mean() < 0.2 and (epoch0 == inverse).mean() < 0.2  # not even largely


def test_streams_differ_per_purpose_and_key():
    n = 200
    for seed in SEEDS:
        perms = {(p,): seeds.rng(seed, p).permutation(n).tobytes() for p in seeds.PURPOSES}
        perms |= {("epoch_order", e): seeds.rng(seed, "epoch_order", e).permutation(n).tobytes() for e in range(4)}
        perms[("default_rng",)] = np.random.default_rng(seed).permutation(n).tobytes()
        assert len(set(perms.values())) == len(perms), seed
    assert len(set(seeds.PURPOSES.values())) == len(seeds.PURPOSES)
    # deterministic: the same seed, purpose and keys give the same stream
    assert (seeds.rng(5, "epoch_order", 3).random(4) == seeds.rng(5, "epoch_order", 3).random(4)).all()


def test_val_split_uses_its_own_stream():
    train, val = split_train_val(100, 0.1, PREPROCESS_DEFAULT_SEED)
    perm = seeds.rng(PREPROCESS_DEFAULT_SEED, "val_split").permutation(100)
    assert (val == np.sort(perm[:10])).all() and len(train) == 90


def test_bad_seeds_and_purposes():
    with pytest.raises(MegapackError, match=r"--seed -1: expected an integer in \[0, 2\*\*64\)"):
        assign_packs(np.full(4, 8), 8, "bfd", seed=-1)
    with pytest.raises(MegapackError, match=r"seed 18446744073709551616"):
        seeds.rng(2**64, "pack_order")
    with pytest.raises(ValueError, match="purpose 'shuffle'"):
        seeds.rng(1, "shuffle")
    with pytest.raises(ValueError, match="keys"):
        seeds.rng(1, "epoch_order", -1)
