"""Views of a shard directory: render a pack, plot distributions (its checks are in verify.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megapack.data.packs.shards import ShardDataset


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


def plot(ds: ShardDataset, out: str | Path) -> None:
    """Sample-length histogram and pack-fill distribution, saved as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = ds.meta["splits"][ds.split]["sample_length_histogram"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    edges = np.array(hist["bin_edges"])
    a.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge")
    a.axvline(ds.meta["seq_length"], color="red", linestyle="--", label="seq_length")
    a.set(title=f"sample lengths ({ds.split})", xlabel="tokens", ylabel="samples")
    a.legend()
    b.hist(pack_fill(ds), bins=50, range=(0, 1))
    b.set(title=f"pack fill ({ds.meta['packing']})", xlabel="tokens / seq_length", ylabel="packs")
    fig.tight_layout()
    tmp = Path(out).with_name(Path(out).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
