"""Checks of a shard directory against its meta.json, shared by `megapack inspect --verify` and the trainer.

Three costs, three functions: `check_present` (stat only: every file there with its recorded size),
`check_structure` (reads only the .idx files: they parse, follow the format and match meta.json's counts) and
`check_checksums` / `check_values` (read every byte). `fast_problems` is what the trainer's `data.verify: fast`
runs; `verify` is `megapack inspect --verify` (everything). Each returns problems as `name: reason` lines.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megapack.checksums import file_sha256
from megapack.data.packs.mmidx import MMIndex
from megapack.data.packs.shards import REAL_LENGTHS_SUFFIX, read_meta
from megapack.errors import MegapackError

VERIFY_LEVELS = ("full", "fast", "off")


def split_files(meta: dict, splits: list[str]) -> dict[str, str]:
    """Every file of the shards of `splits` -> its sha256 (as the top-level `sha256` records it), in meta.json order."""
    recorded = meta.get("sha256", {})
    return {name: recorded.get(name, sha) for split in splits for shard in meta["splits"][split]["shards"]
            for name, sha in shard["files"].items()}


def sha_mismatch(name: str, expected: str) -> str:
    """The problem line of a file whose sha256 is not the recorded one."""
    return f"{name}: sha256 mismatch (meta.json records {expected[:12]}…)"


def check_present(path: str | Path, meta: dict, names: list[str]) -> list[str]:
    """Each file exists, is a regular file and has the size meta.json records (`file_bytes`, when recorded)."""
    path, sizes, problems = Path(path), meta.get("file_bytes", {}), []
    for name in names:
        try:
            stat = (path / name).stat()
        except FileNotFoundError:
            problems.append(f"{name}: missing (meta.json lists it)")
            continue
        except OSError as exc:
            problems.append(f"{name}: cannot be read ({exc.strerror})")
            continue
        if not (path / name).is_file():
            problems.append(f"{name}: not a regular file")
        elif name in sizes and stat.st_size != int(sizes[name]):
            problems.append(f"{name}: {stat.st_size} bytes, meta.json records {sizes[name]}")
    return problems


def check_checksums(path: str | Path, files: dict[str, str]) -> list[str]:
    """Each file's sha256 equals the recorded one (reads every byte)."""
    path, problems = Path(path), []
    for name, sha in files.items():
        try:
            if file_sha256(path / name) != sha:
                problems.append(sha_mismatch(name, sha))
        except OSError as exc:
            problems.append(f"{name}: cannot be read ({exc.strerror})")
    return problems


def check_structure(path: str | Path, meta: dict, splits: list[str]) -> list[str]:
    """From the .idx files only: they parse, follow the format (lengths, pointers, document index, .bin sizes, the
    mask twin, pack and segment sizes) and their counts match meta.json's per shard and per split."""
    path, problems = Path(path), []
    L, K = meta["seq_length"], meta.get("pad_to_multiple", 1)
    for split in splits:
        info = meta["splits"][split]
        packs = tokens = 0
        for shard in info["shards"]:
            where = shard["prefix"]
            prefix = path / where
            try:
                tok, mask = MMIndex(Path(f"{prefix}.tokens")), MMIndex(Path(f"{prefix}.mask"))
            except MegapackError as exc:
                problems.append(str(exc).removeprefix(f"{path}/"))
                continue
            problems += _check_index(tok, where + ".tokens") + _check_index(mask, where + ".mask")
            same = (np.array_equal(tok.padded_lengths, mask.padded_lengths)
                    and np.array_equal(tok.doc_index, mask.doc_index))
            if not same:
                problems.append(f"{where}: mask index differs from token index")
                continue
            problems += _check_side_files(prefix, len(tok.padded_lengths), len(tok))
            cum = np.concatenate([[0], np.cumsum(tok.padded_lengths, dtype=np.int64)])
            pack_len = cum[tok.doc_index[1:]] - cum[tok.doc_index[:-1]]
            if np.any(pack_len > L) or np.any(pack_len <= 0):
                problems.append(f"{where}: a pack is empty or longer than seq_length {L}")
            if np.any(tok.padded_lengths % K):
                problems.append(f"{where}: a segment length is not a multiple of pad_to_multiple {K}")
            if len(tok) != shard["num_packs"] or int(cum[-1]) != shard["num_tokens"]:
                problems.append(f"{where}: {len(tok)} packs / {int(cum[-1])} tokens, meta.json says "
                                f"{shard['num_packs']} / {shard['num_tokens']}")
            packs += len(tok)
            tokens += int(cum[-1])
        expected = info["num_tokens"] + info["num_padding_tokens"]
        if packs != info["num_packs"] or tokens != expected:
            problems.append(f"split {split}: {packs} packs / {tokens} tokens on disk, meta.json says "
                            f"{info['num_packs']} / {expected}")
    return problems


def check_values(path: str | Path, meta: dict, splits: list[str]) -> list[str]:
    """Reads every .bin: mask values are 0/1, token ids lie in [0, vocab_size) and span the recorded range."""
    path, problems = Path(path), []
    vocab = meta.get("vocab_size")
    for split in splits:
        info, low, high = meta["splits"][split], None, None
        for shard in info["shards"]:
            where = shard["prefix"]
            tok, mask = MMIndex(path / f"{where}.tokens"), MMIndex(path / f"{where}.mask")
            if mask.dtype != np.uint8 or np.any(mask.bin > 1):
                problems.append(f"{where}.mask: values other than 0/1")
            if len(tok.bin):
                lo, hi = int(tok.bin.min()), int(tok.bin.max())
                low, high = (lo, hi) if low is None else (min(low, lo), max(high, hi))
                if vocab is not None and (hi >= vocab or lo < 0):
                    problems.append(f"{where}.tokens: ids outside [0, {vocab})")
        if "max_token_id" in info and (info["min_token_id"], info["max_token_id"]) != (low, high):
            problems.append(f"split {split}: token ids span [{low}, {high}], meta.json records "
                            f"[{info['min_token_id']}, {info['max_token_id']}]")
    return problems


def fast_problems(path: str | Path, meta: dict, splits: list[str]) -> list[str]:
    """`data.verify: fast`: every file present with its recorded size, then the index checks (no hashing)."""
    return check_present(path, meta, list(split_files(meta, splits))) or check_structure(path, meta, splits)


def verify(path: str | Path) -> list[str]:
    """Every problem found (empty = valid): files and sizes, checksums, index structure and counts, values."""
    meta = read_meta(path)
    splits = list(meta["splits"])
    files = split_files(meta, splits)
    problems = check_present(path, meta, list(files)) or check_checksums(path, files)
    if problems:
        return problems
    return check_structure(path, meta, splits) + check_values(path, meta, splits)


def token_range(meta: dict, splits: list[str]) -> tuple[int, int] | None:
    """The (smallest, largest) token id meta.json records over `splits`; None when a split does not record it
    (written before megapack recorded ranges)."""
    infos = [meta["splits"][s] for s in splits]
    if not infos or any("max_token_id" not in i for i in infos):
        return None
    lows = [i["min_token_id"] for i in infos if i["min_token_id"] is not None]
    highs = [i["max_token_id"] for i in infos if i["max_token_id"] is not None]
    return (min(lows), max(highs)) if highs else None


def _check_index(idx: MMIndex, where: str) -> list[str]:
    out = []
    d, n = idx.doc_index, len(idx.padded_lengths)
    if len(d) == 0 or d[0] != 0 or d[-1] != n or np.any(np.diff(d) <= 0):
        out.append(f"{where}.idx: document index is not 0 .. {n} strictly increasing")
    if np.any(idx.padded_lengths <= 0):
        out.append(f"{where}.idx: a segment has length <= 0")
    size = idx.dtype.itemsize
    expect = np.concatenate([[0], np.cumsum(idx.padded_lengths[:-1], dtype=np.int64)]) * size if n else idx.seq_pointers
    if not np.array_equal(idx.seq_pointers, expect):
        out.append(f"{where}.idx: sequence pointers do not follow the lengths")
    bin_bytes = Path(f"{idx.prefix}.bin").stat().st_size
    if bin_bytes != int(idx.padded_lengths.sum(dtype=np.int64)) * size:
        out.append(f"{where}.bin: {bin_bytes} bytes, index says {int(idx.padded_lengths.sum()) * size}")
    return out


def _check_side_files(prefix: Path, segments: int, packs: int) -> list[str]:
    """The real lengths hold one int32 per segment, the continuation flags (when present) one byte per pack."""
    out = []
    real = Path(f"{prefix}.{REAL_LENGTHS_SUFFIX}")
    if real.stat().st_size != 4 * segments:
        out.append(f"{real.name}: {real.stat().st_size} bytes, expected 4 per segment ({4 * segments})")
    cont = Path(f"{prefix}.continues.bin")
    if cont.is_file() and cont.stat().st_size != packs:
        out.append(f"{cont.name}: {cont.stat().st_size} bytes, expected 1 per pack ({packs})")
    return out
