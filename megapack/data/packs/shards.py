"""Packed shards: Megatron MMIDIDX token files plus a uint8 loss-mask twin and the real length of every segment;
one sequence per segment, one document per pack (byte layout in FORMAT.md). `ShardWriter` streams packs into bounded
shard files, `ShardDataset` reads them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapack.atomic import temp_target
from megapack.data.packs.mmidx import HashingFile, MMIndex, write_idx
from megapack.errors import MegapackError, nested_too_deeply

FORMAT_VERSION = 2
META_NAME = "meta.json"
DEFAULT_MAX_SHARD_TOKENS = 1 << 30
REAL_LENGTHS_SUFFIX = "real_lengths.bin"  # int32 per segment: its tokens before the pad_to_multiple padding
SHARD_FILE_SUFFIXES = ("tokens.bin", "tokens.idx", "mask.bin", "mask.idx", REAL_LENGTHS_SUFFIX, "continues.bin")
SPLITS = ("train", "val")
# meta.json keys renamed within format_version 2 (old name -> new). Files written before use the old names;
# `read_meta` renames them, so no other code knows the old names.
RENAMED_META_KEYS = {"num_samples": "num_conversations", "num_loss_tokens": "num_trained_tokens"}


def is_shard_file(name: str) -> bool:
    """Whether a file name is one of a shard's files (or its temporary name while written: `.<name>.<hex>.tmp`, or
    `<name>.tmp` as versions before issue 21 named it)."""
    base = temp_target(name) or name.removesuffix(".tmp")
    split, _, rest = base.partition("-")
    return split in SPLITS and any(rest.endswith("." + suffix) for suffix in SHARD_FILE_SUFFIXES)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def shard_prefix(split: str, index: int) -> str:
    """File-name prefix of shard `index` of `split`, e.g. train-00000."""
    return f"{split}-{index:05d}"


class ShardWriter:
    """Streams packs of one split into shard files of at most `max_shard_tokens` tokens (a pack is never split)."""

    def __init__(self, out_dir: str | Path, split: str, dtype: np.dtype, max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
                 continuation: bool = False):
        self.out_dir, self.split, self.dtype = Path(out_dir), split, np.dtype(dtype)
        self.max_shard_tokens = max_shard_tokens
        self.continuation = continuation  # write <prefix>.continues.bin (one byte per pack), for `random` packing
        # per finished shard: prefix, num_packs, num_tokens, files {name: sha256}, file_bytes {name: size}
        self.shards: list[dict] = []
        self._open = False

    def _start(self) -> None:
        prefix = shard_prefix(self.split, len(self.shards))
        self._prefix = prefix
        self._tok = HashingFile(self.out_dir / f"{prefix}.tokens.bin")
        self._mask = HashingFile(self.out_dir / f"{prefix}.mask.bin")
        self._cont = HashingFile(self.out_dir / f"{prefix}.continues.bin") if self.continuation else None
        self._real = HashingFile(self.out_dir / f"{prefix}.{REAL_LENGTHS_SUFFIX}")
        self._padded_lengths: list[np.ndarray] = []
        self._doc_ends: list[int] = [0]
        self._num_seqs = 0
        self._tokens = 0
        self._open = True

    def add_packs(self, tokens: np.ndarray, loss_mask: np.ndarray, padded_lengths: np.ndarray,
                  segs_per_pack: np.ndarray, continues: np.ndarray | None = None,
                  real_lengths: np.ndarray | None = None) -> None:
        """Append several packs laid end to end; pack k has segs_per_pack[k] segments of padded_lengths whose
        first real_lengths tokens are the conversation and, with `continuation`, continues[k] says whether its first
        segment carries on the previous pack's last conversation."""
        if self.continuation and (continues is None or len(continues) != len(segs_per_pack)):
            raise ValueError("a continuation writer needs one `continues` flag per pack")
        padded_lengths = np.asarray(padded_lengths, dtype=np.int64)
        real_lengths = padded_lengths if real_lengths is None else np.asarray(real_lengths, dtype=np.int64)
        if (real_lengths.shape != padded_lengths.shape or np.any(real_lengths > padded_lengths)
                or np.any(real_lengths < 0)):
            raise ValueError("real segment lengths must be one per segment, between 0 and the padded length")
        seg_end = np.cumsum(segs_per_pack)
        seg_tok_end = np.concatenate([[0], np.cumsum(padded_lengths)])
        pack_tok_end = seg_tok_end[seg_end]
        if len(tokens) != len(loss_mask) or (len(seg_end) and pack_tok_end[-1] != len(tokens)):
            raise ValueError(f"{len(tokens)} tokens, {len(loss_mask)} loss-mask values, segments summing to "
                             f"{seg_tok_end[-1]}")
        if np.any(np.diff(np.concatenate([[0], pack_tok_end])) <= 0):
            raise ValueError("empty pack")
        k, t0 = 0, 0
        while k < len(seg_end):
            if not self._open:
                self._start()
            room = self.max_shard_tokens - self._tokens
            fit = int(np.searchsorted(pack_tok_end[k:], t0 + room, side="right"))
            if fit == 0 and self._tokens:
                self._finish()
                continue
            fit = max(fit, 1)  # a pack larger than a whole shard still gets a shard of its own
            s0 = int(seg_end[k - 1]) if k else 0
            s1 = int(seg_end[k + fit - 1])
            t1 = int(pack_tok_end[k + fit - 1])
            self._tok.write(np.ascontiguousarray(tokens[t0:t1], dtype=self.dtype.newbyteorder("<")).tobytes())
            self._mask.write(np.ascontiguousarray(loss_mask[t0:t1], dtype=np.uint8).tobytes())
            if self._cont is not None:
                self._cont.write(np.asarray(continues[k : k + fit], dtype=np.uint8).tobytes())
            self._real.write(real_lengths[s0:s1].astype("<i4").tobytes())
            self._padded_lengths.append(padded_lengths[s0:s1].astype(np.int32))
            self._doc_ends.extend((seg_end[k : k + fit] - s0 + self._num_seqs).tolist())
            self._num_seqs += s1 - s0
            self._tokens += t1 - t0
            k, t0 = k + fit, t1

    def _finish(self) -> None:
        lengths = np.concatenate(self._padded_lengths) if self._padded_lengths else np.zeros(0, np.int32)
        docs = np.asarray(self._doc_ends, dtype=np.int64)
        p = self._prefix
        written = {
            f"{p}.tokens.bin": (self._tok.commit(), self._tok.nbytes),
            f"{p}.mask.bin": (self._mask.commit(), self._mask.nbytes),
            f"{p}.tokens.idx": write_idx(self.out_dir / f"{p}.tokens.idx", self.dtype, lengths, docs),
            f"{p}.mask.idx": write_idx(self.out_dir / f"{p}.mask.idx", np.dtype(np.uint8), lengths, docs),
            f"{p}.{REAL_LENGTHS_SUFFIX}": (self._real.commit(), self._real.nbytes),
        }
        if self._cont is not None:
            written[f"{p}.continues.bin"] = (self._cont.commit(), self._cont.nbytes)
        self.shards.append({"prefix": p, "num_packs": len(docs) - 1, "num_tokens": self._tokens,
                            "files": {name: sha for name, (sha, _) in written.items()},
                            "file_bytes": {name: size for name, (_, size) in written.items()}})
        self._open = False

    def close(self) -> list[dict]:
        """Finish the last shard; returns the list of shards written."""
        if self._open:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary files)."""
        if self._open:
            self._tok.abort()
            self._mask.abort()
            self._real.abort()
            if self._cont is not None:
                self._cont.abort()
            self._open = False


@dataclass
class Pack:
    """One row of at most seq_length tokens: its segments' tokens, loss mask, real and padded lengths (as stored).

    Segment k occupies padded_lengths[k] tokens after the previous segments; its first real_lengths[k] tokens are the
    conversation, the rest `pad_id` padding (loss mask 0). The trainer sums the lengths of a micro-batch's packs once
    into Transformer Engine's THD `cu_seqlens` / `cu_seqlens_padded` (megapack.training.run.batch).
    """

    tokens: np.ndarray  # int64 [n] (n <= seq_length; segments padded to pad_to_multiple, the row is not)
    loss_mask: np.ndarray  # uint8 [n] (1 = token i is a trained target)
    real_lengths: np.ndarray  # int64 [num_segments]: each segment's tokens without its padding
    padded_lengths: np.ndarray  # int64 [num_segments]: each segment's tokens with its padding (sum: n)
    continues: bool = False  # `random` packing: the first segment is the rest of a conversation cut in the last pack

    @property
    def cu_seqlens(self) -> np.ndarray:
        """[0, l0, l0+l1, ...] of the real lengths (for display: `megapack inspect`)."""
        return np.concatenate([[0], np.cumsum(self.real_lengths)])

    @property
    def cu_seqlens_padded(self) -> np.ndarray:
        """Each segment's offset in the pack, ending at n (for display)."""
        return np.concatenate([[0], np.cumsum(self.padded_lengths)])


def read_meta(path: str | Path) -> dict:
    """The parsed meta.json of a shard directory (MegapackError if it is missing: the directory is incomplete)."""
    meta_path = Path(path) / META_NAME
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise MegapackError(f"{meta_path}: not found; {path} is not a finished megapack shard directory") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise MegapackError(f"{meta_path}: unreadable ({exc})") from None
    except RecursionError:
        raise nested_too_deeply(meta_path) from None
    version = meta.get("format_version")
    if version == 1:
        raise MegapackError(f"{meta_path}: format_version 1 shards do not record real segment lengths; rerun "
                            f"`megapack preprocess` with this version to write format_version {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise MegapackError(f"{meta_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    return normalise_meta(meta)


def normalise_meta(meta: dict) -> dict:
    """`meta` with the old names of RENAMED_META_KEYS replaced by the new ones, at the top level and per split."""
    for entry in [meta, *(meta.get("splits") or {}).values()]:
        for old, new in RENAMED_META_KEYS.items():
            if old in entry:
                value = entry.pop(old)
                entry.setdefault(new, value)
    return meta


class ShardDataset:
    """Random access to the packs of one split of a preprocess output directory."""

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.split = split
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise MegapackError(f"{self.path / META_NAME}: no split {split!r} (has: {', '.join(splits) or 'none'})")
        self._shards = [s["prefix"] for s in splits[split]["shards"]]
        counts = [int(s["num_packs"]) for s in splits[split]["shards"]]
        self._cum = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._open: dict[int, _OpenShard] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened in the receiving process
        return state

    def __len__(self) -> int:
        return int(self._cum[-1])

    def _shard(self, k: int) -> "_OpenShard":
        if k not in self._open:
            self._open[k] = _OpenShard(self.path / self._shards[k])
        return self._open[k]

    def pack_lengths(self, real: bool = False) -> np.ndarray:
        """Tokens of every pack of the split (with segment padding, or only `real` ones), from index files only."""
        out = []
        for k in range(len(self._shards)):
            shard = self._shard(k)
            lengths = shard.real_lengths if real else shard.tokens.padded_lengths
            cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            doc = shard.tokens.doc_index
            out.append(cum[doc[1:]] - cum[doc[:-1]])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def segment_lengths(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(real, padded) lengths of pack i's segments, from the index files only (no tokens read)."""
        k = int(np.searchsorted(self._cum, i, side="right")) - 1
        shard, j = self._shard(k), i - int(self._cum[k])
        a, b = int(shard.tokens.doc_index[j]), int(shard.tokens.doc_index[j + 1])
        return shard.real_lengths[a:b].astype(np.int64), np.asarray(shard.tokens.padded_lengths[a:b], np.int64)

    def __getitem__(self, i: int) -> Pack:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"pack {i} out of range for {n} packs")
        k = int(np.searchsorted(self._cum, i, side="right")) - 1
        shard = self._shard(k)
        j = i - int(self._cum[k])
        tokens, padded = shard.tokens.document(j)
        loss_mask, _ = shard.mask.document(j)
        a, b = int(shard.tokens.doc_index[j]), int(shard.tokens.doc_index[j + 1])
        return Pack(
            tokens=tokens.astype(np.int64),
            loss_mask=np.array(loss_mask, dtype=np.uint8),
            real_lengths=shard.real_lengths[a:b].astype(np.int64),
            padded_lengths=np.asarray(padded, np.int64),
            continues=bool(shard.continues[j]) if shard.continues is not None else False,
        )


class _OpenShard:
    """The files of one shard: token and mask indexes, real segment lengths, continuation flags (when present)."""

    def __init__(self, prefix: Path):
        self.tokens = MMIndex(Path(f"{prefix}.tokens"))
        self.mask = MMIndex(Path(f"{prefix}.mask"))
        self.tokens.bin, self.mask.bin  # noqa: B018 - a missing .bin: one line now, not a traceback at the first pack
        real_path = Path(f"{prefix}.{REAL_LENGTHS_SUFFIX}")
        try:
            self.real_lengths = np.fromfile(real_path, dtype="<i4")
        except OSError as exc:
            raise MegapackError(f"{real_path}: cannot read the real segment lengths ({exc})") from None
        if len(self.real_lengths) != len(self.tokens.padded_lengths):
            raise MegapackError(f"{real_path}: {len(self.real_lengths)} lengths for "
                                f"{len(self.tokens.padded_lengths)} segments in {prefix}.tokens.idx")
        cont_path = Path(f"{prefix}.continues.bin")
        self.continues = np.fromfile(cont_path, dtype=np.uint8) if cont_path.is_file() else None
