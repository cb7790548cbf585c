"""Checks and views of a shard directory: verify checksums and structure, render a pack, plot distributions."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megapack import seeds
from megapack.checksums import file_sha256
from megapack.data.packs.shards import MMIndex, ShardDataset, read_meta
from megapack.data.packs.stats import padded_micro_batches


def verify(path: str | Path) -> list[str]:
    """Every problem found (empty = valid): checksums, index/bin consistency, mask twin, pack sizes, meta counts."""
    path = Path(path)
    meta = read_meta(path)
    problems: list[str] = []
    for name, sha in meta.get("sha256", {}).items():
        f = path / name
        if not f.exists():
            problems.append(f"{name}: missing")
        elif file_sha256(f) != sha:
            problems.append(f"{name}: sha256 differs from meta.json")
    if problems:
        return problems
    L, K, vocab = meta["seq_length"], meta.get("pad_to_multiple", 1), meta.get("vocab_size")
    for split, info in meta["splits"].items():
        packs = tokens = 0
        for shard in info["shards"]:
            prefix = path / shard["prefix"]
            tok, mask = MMIndex(Path(f"{prefix}.tokens")), MMIndex(Path(f"{prefix}.mask"))
            where = shard["prefix"]
            problems += _check_index(tok, where + ".tokens")
            problems += _check_index(mask, where + ".mask")
            if not (np.array_equal(tok.seq_lengths, mask.seq_lengths) and np.array_equal(tok.doc_index, mask.doc_index)):
                problems.append(f"{where}: mask index differs from token index")
                continue
            if mask.dtype != np.uint8 or np.any(mask.bin > 1):
                problems.append(f"{where}.mask: values other than 0/1")
            if vocab is not None and len(tok.bin) and (int(tok.bin.max()) >= vocab or int(tok.bin.min()) < 0):
                problems.append(f"{where}.tokens: ids outside [0, {vocab})")
            cum = np.concatenate([[0], np.cumsum(tok.seq_lengths, dtype=np.int64)])
            pack_len = cum[tok.doc_index[1:]] - cum[tok.doc_index[:-1]]
            if np.any(pack_len > L) or np.any(pack_len <= 0):
                problems.append(f"{where}: a pack is empty or longer than seq_length {L}")
            if np.any(tok.seq_lengths % K):
                problems.append(f"{where}: a segment length is not a multiple of pad_to_multiple {K}")
            if len(tok) != shard["num_packs"] or int(cum[-1]) != shard["num_tokens"]:
                problems.append(f"{where}: {len(tok)} packs / {int(cum[-1])} tokens, meta.json says "
                                f"{shard['num_packs']} / {shard['num_tokens']}")
            packs += len(tok)
            tokens += int(cum[-1])
        if packs != info["num_packs"] or tokens != info["num_tokens"] + info["num_padding_tokens"]:
            problems.append(f"split {split}: {packs} packs / {tokens} tokens on disk, meta.json says "
                            f"{info['num_packs']} / {info['num_tokens'] + info['num_padding_tokens']}")
    return problems


def _check_index(idx: MMIndex, where: str) -> list[str]:
    out = []
    d, n = idx.doc_index, len(idx.seq_lengths)
    if len(d) == 0 or d[0] != 0 or d[-1] != n or np.any(np.diff(d) <= 0):
        out.append(f"{where}.idx: document index is not 0 .. {n} strictly increasing")
    if np.any(idx.seq_lengths <= 0):
        out.append(f"{where}.idx: a segment has length <= 0")
    size = idx.dtype.itemsize
    expect = np.concatenate([[0], np.cumsum(idx.seq_lengths[:-1], dtype=np.int64)]) * size if n else idx.seq_pointers
    if not np.array_equal(idx.seq_pointers, expect):
        out.append(f"{where}.idx: sequence pointers do not follow the lengths")
    bin_bytes = Path(f"{idx.prefix}.bin").stat().st_size
    if bin_bytes != int(idx.seq_lengths.sum(dtype=np.int64)) * size:
        out.append(f"{where}.bin: {bin_bytes} bytes, index says {int(idx.seq_lengths.sum()) * size}")
    return out


def render_pack(ds: ShardDataset, i: int, tokenizer=None, start: str = "\u00ab", end: str = "\u00bb") -> str:
    """Pack i as text, one block per segment, trained (loss) spans wrapped in start/end markers."""
    pack = ds[i]
    lines = [f"pack {i}: {len(pack.tokens)} tokens, {len(pack.cu_seqlens) - 1} segments, "
             f"{int(pack.loss_mask.sum())} trained, cu_seqlens={pack.cu_seqlens.tolist()}"]
    for k in range(len(pack.cu_seqlens) - 1):
        a, b = int(pack.cu_seqlens[k]), int(pack.cu_seqlens[k + 1])
        ids, mask = pack.tokens[a:b], pack.loss_mask[a:b]
        spans = np.flatnonzero(np.diff(np.concatenate([[-1], mask, [-1]]))) if b > a else []
        text = []
        for s, e in zip(spans[:-1], spans[1:]):
            piece = tokenizer.decode(ids[s:e].tolist()) if tokenizer is not None else " ".join(map(str, ids[s:e]))
            text.append(f"{start}{piece}{end}" if mask[s] else piece)
        lines.append(f"--- segment {k} [{a}:{b}] ---\n" + "".join(text))
    return "\n".join(lines)


def pack_fill(ds: ShardDataset) -> np.ndarray:
    """Tokens per pack / seq_length, for every pack of the split (from the index only)."""
    return ds.pack_lengths() / ds.meta["seq_length"]


def micro_batch_fill(ds: ShardDataset, micro_batch_size: int, train_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(real, computed) tokens of each micro-batch the trainer builds from a `padding` split: the train split in
    epoch 0's order under `train_seed` (training.seed), the val split in shard order."""
    n = len(ds)
    order = seeds.epoch_order(n, train_seed, 0) if ds.split == "train" else np.arange(n)
    return padded_micro_batches(ds.pack_lengths(real=True), order, micro_batch_size)


def plot_numbers(ds: ShardDataset, micro_batch_size: int = 1, train_seed: int = 1234) -> dict:
    """The numbers `plot` prints on its figure: the split's packing statistics, plus the trainer's padding for
    `padding` shards."""
    s = ds.meta["splits"][ds.split]
    out = {"packing": ds.meta["packing"], "seq_length": ds.meta["seq_length"], "split": ds.split,
           "num_samples": s["num_samples"], "truncated": s["truncated"], "num_packs": s["num_packs"],
           "lower_bound_packs": s["lower_bound_packs"], "packing_efficiency": s["packing_efficiency"]}
    if ds.meta["packing"] == "padding":
        real, computed = micro_batch_fill(ds, micro_batch_size, train_seed)
        out |= {"micro_batch_size": micro_batch_size, "train_seed": train_seed, "micro_batches": len(real),
                "real_tokens": int(real.sum()), "computed_tokens": int(computed.sum()),
                "padding_fraction": 1.0 - int(real.sum()) / max(int(computed.sum()), 1)}
    return out


def _caption(n: dict) -> str:
    lines = [f"{n['num_samples']:,} samples ({n['truncated']:,} truncated to seq_length {n['seq_length']:,})  ·  "
             f"{n['num_packs']:,} packs (lower bound {n['lower_bound_packs']:,})  ·  "
             f"packing efficiency {n['packing_efficiency']:.1%} of packs × seq_length"]
    if "padding_fraction" in n:
        order = f"epoch-0 order, training.seed {n['train_seed']}" if n["split"] == "train" else "shard order"
        lines.append(f"trainer at micro_batch_size {n['micro_batch_size']} ({order}): {n['micro_batches']:,} "
                     f"micro-batches, {n['computed_tokens']:,} tokens computed for {n['real_tokens']:,} real: "
                     f"{n['padding_fraction']:.1%} padding")
    return "\n".join(lines)


def plot(ds: ShardDataset, out: str | Path, micro_batch_size: int = 1, train_seed: int = 1234) -> dict:
    """Sample-length histogram and pack fill (`padding` shards: the fill of the trainer's padded micro-batches),
    saved as an image with the split's numbers written on it; returns those numbers and the `caption` drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = plot_numbers(ds, micro_batch_size, train_seed)
    hist = ds.meta["splits"][ds.split]["sample_length_histogram"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.6))
    edges = np.array(hist["bin_edges"])
    a.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge")
    a.axvline(ds.meta["seq_length"], color="red", linestyle="--", label=f"seq_length {ds.meta['seq_length']:,}")
    a.set(title="sample lengths", xlabel="sample length (tokens)", ylabel="samples")
    a.legend()
    if "padding_fraction" in numbers:
        real, computed = micro_batch_fill(ds, micro_batch_size, train_seed)
        b.hist(real / np.maximum(computed, 1), bins=50, range=(0, 1))
        b.set(title=f"padded micro-batches (micro_batch_size {micro_batch_size})",
              xlabel="micro-batch fill (real tokens / tokens computed)", ylabel="micro-batches")
    else:
        b.hist(pack_fill(ds), bins=50, range=(0, 1))
        b.set(title="pack fill", xlabel="pack fill (tokens / seq_length)", ylabel="packs")
    fig.suptitle(f"{ds.path.name} ({numbers['packing']} packing, {ds.split} split)", fontweight="bold")
    numbers["caption"] = _caption(numbers)
    fig.text(0.5, 0.91, numbers["caption"], ha="center", va="top", fontsize=9,
             bbox={"boxstyle": "round", "facecolor": "#f3f3f3", "edgecolor": "#999999"})
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.76 if "padding_fraction" in numbers else 0.79,
                        wspace=0.2)
    tmp = Path(out).with_name(Path(out).name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return numbers
