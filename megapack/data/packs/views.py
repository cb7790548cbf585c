"""Views of a shard directory: render a pack, plot distributions (its checks are in verify.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megapack import seeds
from megapack.atomic import write_atomic
from megapack.data.packs.shards import ShardDataset
from megapack.data.packs.padding import padded_micro_batches


def render_pack(ds: ShardDataset, i: int, tokenizer=None, start: str = "\u00ab", end: str = "\u00bb") -> str:
    """Pack i as text, one block per segment, trained (loss) spans wrapped in start/end markers."""
    pack = ds[i]
    lines = [f"pack {i}: {len(pack.tokens)} tokens, {len(pack.cu_seqlens) - 1} segments, "
             f"{int(pack.loss_mask.sum())} trained, cu_seqlens={pack.cu_seqlens.tolist()}, "
             f"cu_seqlens_padded={pack.cu_seqlens_padded.tolist()}"]
    for k, real_length in enumerate(pack.real_lengths.tolist()):
        a = int(pack.cu_seqlens_padded[k])  # the segment's place in the pack; its real tokens come first
        b = a + real_length
        ids, loss_mask = pack.tokens[a:b], pack.loss_mask[a:b]
        spans = np.flatnonzero(np.diff(np.concatenate([[-1], loss_mask, [-1]]))) if b > a else []
        text = []
        for s, e in zip(spans[:-1], spans[1:]):
            span = tokenizer.decode(ids[s:e].tolist()) if tokenizer is not None else " ".join(map(str, ids[s:e]))
            text.append(f"{start}{span}{end}" if loss_mask[s] else span)
        padding = int(pack.padded_lengths[k]) - real_length
        lines.append(f"--- segment {k} [{a}:{b}]{f' + {padding} padding' if padding else ''} ---\n" + "".join(text))
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
           "num_conversations": s["num_conversations"], "truncated": s["truncated"], "num_packs": s["num_packs"],
           "lower_bound_packs": s["lower_bound_packs"], "packing_efficiency": s["packing_efficiency"]}
    if ds.meta["packing"] == "padding":
        real, computed = micro_batch_fill(ds, micro_batch_size, train_seed)
        out |= {"micro_batch_size": micro_batch_size, "train_seed": train_seed, "micro_batches": len(real),
                "real_tokens": int(real.sum()), "computed_tokens": int(computed.sum()),
                "padding_fraction": 1.0 - int(real.sum()) / max(int(computed.sum()), 1)}
    return out


def _caption(n: dict) -> str:
    lines = [f"{n['num_conversations']:,} conversations ({n['truncated']:,} truncated to seq_length "
             f"{n['seq_length']:,})  ·  "
             f"{n['num_packs']:,} packs (lower bound {n['lower_bound_packs']:,})  ·  "
             f"packing efficiency {n['packing_efficiency']:.1%} of packs × seq_length"]
    if "padding_fraction" in n:
        order = f"epoch-0 order, training.seed {n['train_seed']}" if n["split"] == "train" else "shard order"
        lines.append(f"trainer at micro_batch_size {n['micro_batch_size']} ({order}): {n['micro_batches']:,} "
                     f"micro-batches, {n['computed_tokens']:,} tokens computed for {n['real_tokens']:,} real: "
                     f"{n['padding_fraction']:.1%} padding")
    return "\n".join(lines)


def plot(ds: ShardDataset, out: str | Path, micro_batch_size: int = 1, train_seed: int = 1234) -> dict:
    """Conversation-length histogram and pack fill (`padding` shards: the fill of the trainer's padded micro-batches),
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
    a.set(title="conversation lengths", xlabel="conversation length (tokens)", ylabel="conversations")
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
    try:  # PNG whatever the name, as before; under a temporary name of this writer's own
        write_atomic(out, lambda fh: fig.savefig(fh, format="png", dpi=100))
    finally:
        plt.close(fig)
    return numbers
