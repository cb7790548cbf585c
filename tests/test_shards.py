"""Shards: megatron-core's IndexedDataset reads our token and loss-mask files; ShardDataset returns exactly the
assigned packs (tokens, loss mask, cu_seqlens) across shard boundaries; meta.json checksums match the files; meta.json
of older shards (old key names) still reads."""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest

from megapack.data.packs.writer import RecordStore, split_train_val, write_shard_dir
from megapack.data.packs.packing import assign_packs
from megapack.data.packs.shards import ShardDataset, read_meta
from megapack.errors import MegapackError

PAD = 7


def make_encoded(n: int, vocab: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss_mask) of n random conversations."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(40), 0.8, n)), 3, 200).astype(int)
    return [(rng.integers(0, vocab, k), (rng.random(k) < 0.5).astype(np.uint8)) for k in lengths]


def expected_packs(encoded, idx, L, packing, seed, K, drop_long=False):
    """Packs built straight from the assignment, one segment at a time (the slow obvious way)."""
    lengths = np.array([len(encoded[i][0]) for i in idx])
    a = assign_packs(lengths, L, packing, seed=seed, pad_to_multiple=K, drop_long=drop_long)
    for p in range(a.num_packs):
        toks, mask, segs, real = [], [], [], []
        for k in range(a.pack_offsets[p], a.pack_offsets[p + 1]):
            c, start, n, padded = (int(a.conversation[k]), int(a.start[k]), int(a.real_lengths[k]),
                                   int(a.padded_lengths[k]))
            ids, m = encoded[idx[c]]
            toks += list(ids[start : start + n]) + [PAD] * (padded - n)
            mask += list(m[start : start + n]) + [0] * (padded - n)
            segs.append(padded)
            real.append(n)
        yield np.array(toks), np.array(mask), segs, real


@pytest.mark.parametrize("packing", ["padding", "random", "greedy", "bfd"])
def test_round_trip_and_megatron_reader(tmp_path, packing):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    encoded = make_encoded(300, vocab=1000)
    L, K, seed = 128, 4 if packing != "padding" else 1, 11
    meta = write_shard_dir(
        RecordStore.from_encoded(encoded), tmp_path, seq_length=L, packing=packing, seed=seed,
        pad_to_multiple=K, val_fraction=0.1, vocab_size=1000, pad_id=PAD, max_shard_tokens=2000,
    )
    assert meta["dtype"] == "uint16" and meta["splits"]["val"]["num_conversations"] == 30
    train_idx, val_idx = split_train_val(300, 0.1, seed)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        ds = ShardDataset(tmp_path, split)
        want = list(expected_packs(encoded, idx, L, packing, seed, K))
        assert len(ds) == len(want) == meta["splits"][split]["num_packs"]
        shards = meta["splits"][split]["shards"]
        assert split == "val" or len(shards) > 1  # several shards of <= 2000 tokens
        assert all(s["num_tokens"] <= 2000 for s in shards)
        got_all = []
        for i, (toks, mask, segs, real) in enumerate(want):
            pack = ds[i]
            assert pack.tokens.dtype == np.int64 and pack.loss_mask.dtype == np.uint8 and pack.real_lengths.dtype == np.int64
            np.testing.assert_array_equal(pack.tokens, toks)
            np.testing.assert_array_equal(pack.loss_mask, mask)
            np.testing.assert_array_equal(pack.cu_seqlens_padded, np.concatenate([[0], np.cumsum(segs)]))
            np.testing.assert_array_equal(pack.cu_seqlens, np.concatenate([[0], np.cumsum(real)]))
            assert len(toks) <= L
            got_all.append((toks, mask, segs))
        padded_somewhere = any(sum(r) < sum(s) for *_, s, r in want)
        assert padded_somewhere == (K > 1)  # the real lengths are recorded, not the padded ones again
        np.testing.assert_array_equal(ds.pack_lengths(real=True), [sum(r) for *_, r in want])
        # megatron-core reads the same bytes: one sequence per segment, one document per pack.
        p = 0
        for shard in shards:
            for kind in ("tokens", "mask"):
                mds = IndexedDataset(str(tmp_path / f"{shard['prefix']}.{kind}"))
                assert len(mds.document_indices) - 1 == shard["num_packs"]
                for d in range(shard["num_packs"]):
                    toks, mask, segs = got_all[p + d]
                    a, b = mds.document_indices[d], mds.document_indices[d + 1]
                    assert list(mds.sequence_lengths[a:b]) == segs
                    got = np.concatenate([mds[j] for j in range(a, b)])
                    np.testing.assert_array_equal(got, toks if kind == "tokens" else mask)
            p += shard["num_packs"]
    # checksums in meta.json are the files' sha256; nothing temporary is left
    for name, sha in meta["sha256"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == sha
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "meta.json").read_text())["packing"] == packing


def test_int32_tokens_and_pickling(tmp_path):
    encoded = make_encoded(50, vocab=128256, seed=2)
    assert max(int(e[0].max()) for e in encoded) > 65535
    meta = write_shard_dir(RecordStore.from_encoded(encoded), tmp_path, seq_length=256, vocab_size=128256, pad_id=PAD)
    assert meta["dtype"] == "int32"
    ds = pickle.loads(pickle.dumps(ShardDataset(tmp_path)))
    flat = np.concatenate([ds[i].tokens for i in range(len(ds))])
    assert sorted(flat.tolist()) == sorted(np.concatenate([e[0] for e in encoded]).tolist())
    assert ds[-1].tokens.shape == ds[len(ds) - 1].tokens.shape
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_incomplete_directory_is_refused(tmp_path):
    with pytest.raises(MegapackError, match="meta.json: not found"):
        ShardDataset(tmp_path)
    write_shard_dir(RecordStore.from_encoded(make_encoded(5, 100)), tmp_path, seq_length=64, vocab_size=100, pad_id=0)
    with pytest.raises(MegapackError, match="no split 'val'"):
        ShardDataset(tmp_path, "val")


def test_format_version_1_is_refused_with_the_command_to_rerun(tmp_path):
    write_shard_dir(RecordStore.from_encoded(make_encoded(5, 100)), tmp_path, seq_length=64, vocab_size=100, pad_id=0)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps(dict(meta, format_version=1)))
    with pytest.raises(MegapackError) as info:
        ShardDataset(tmp_path)
    assert "format_version 1" in str(info.value) and "megapack preprocess" in str(info.value)
    assert "\n" not in str(info.value)


def test_meta_json_of_older_shards_reads_with_the_new_key_names(tmp_path):
    """Shards written before the rename record num_samples / num_loss_tokens; read_meta gives the new names only."""
    meta = write_shard_dir(RecordStore.from_encoded(make_encoded(40, 100)), tmp_path, seq_length=64, vocab_size=100,
                           pad_id=0, val_fraction=0.1)
    new = {"num_conversations": "num_samples", "num_trained_tokens": "num_loss_tokens"}
    old = json.loads((tmp_path / "meta.json").read_text())
    for entry in [old, *old["splits"].values()]:
        for key, old_key in new.items():
            entry[old_key] = entry.pop(key)
    (tmp_path / "meta.json").write_text(json.dumps(old))
    got = read_meta(tmp_path)
    for entry, want in [(got, meta), *((got["splits"][s], meta["splits"][s]) for s in ("train", "val"))]:
        assert {k: entry[k] for k in new} == {k: want[k] for k in new}
        assert not set(new.values()) & set(entry)
    assert got["num_conversations"] == 36 and got["splits"]["val"]["num_conversations"] == 4
    assert got["num_trained_tokens"] > 0
    assert ShardDataset(tmp_path, "val").meta["splits"]["val"]["num_trained_tokens"] == meta["splits"]["val"][
        "num_trained_tokens"]
