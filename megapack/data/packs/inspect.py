"""Checks and views of a shard directory: verify checksums and structure, render a pack, plot distributions."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megapack.checksums import file_sha256
from megapack.data.packs.shards import MMIndex, ShardDataset, read_meta


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
