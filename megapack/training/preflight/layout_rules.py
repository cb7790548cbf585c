"""Context parallelism's layout rules (`parallel.cp`), shared by `preflight()` and `megapack plan`.

With CP each segment of a pack is padded to a multiple of 2*cp (2*cp*tp with sequence parallelism) and cut into
2*cp chunks, CP rank r keeping chunks r and 2*cp-1-r: a rank holds row/cp tokens, and its attention all-gathers the
keys and values of the whole row. A row may therefore outgrow `seq_length` by the CP padding; its budget is
`seq_length + multiple * segments` (less than `multiple` tokens per segment; nothing when the shards were packed with
`--pad-to-multiple` a multiple of it). The rules: world size divisible by tp*cp*pp, `seq_length` by the chunk
multiple, and no interleaved pipelines (their stages send fixed-size rows, which CP padding does not keep). Heads and KV heads by
TP are `megapack.model.config.check_parallel_sizes`' rule (CP gathers whole K/V heads: it adds none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from megapack.errors import MegapackError
from megapack.training.preflight.config import RunConfig


@dataclass(frozen=True)
class ContextLayout:
    """How context parallelism cuts a run's rows: the CP size, the multiple each segment is padded to, DP size."""

    cp: int
    multiple: int  # segments padded to a multiple of this: 2*cp (x tp with sequence parallelism); 1 without CP
    dp: int  # world / (tp * cp * pp)
    pad_to_multiple: int  # the shards' segment multiple (meta.json; 1 when unknown)

    @property
    def pads_segments(self) -> bool:
        """Whether the batch builder adds CP padding to the shards' segments (their multiple is not one of ours)."""
        return self.cp > 1 and self.pad_to_multiple % self.multiple != 0

    def row_budget(self, row_tokens: int, segments: int) -> int:
        """Tokens a row of `row_tokens` shard tokens and `segments` segments may reach once CP-padded."""
        return row_tokens + (self.multiple * segments if self.pads_segments else 0)


def chunk_multiple(cp: int, tp: int, sequence_parallel: bool) -> int:
    """The multiple every segment is padded to under CP: 2*cp, times tp with sequence parallelism; 1 without CP."""
    if cp == 1:
        return 1
    return 2 * cp * (tp if sequence_parallel and tp > 1 else 1)


def context_parallel_rules(config: RunConfig, seq_length: int, world_size: int,
                           pad_to_multiple: int | None = None) -> ContextLayout:
    """Check `parallel.cp` against the world size, `seq_length` and the shards (one line naming it) -> the layout."""
    par = config.parallel
    cp, tp, pp = par.cp, par.tp, par.pp
    sp = par.sequence_parallel and tp > 1
    multiple = chunk_multiple(cp, tp, sp)
    shard_multiple = int(pad_to_multiple or 1)
    if cp == 1:
        return ContextLayout(cp=1, multiple=1, dp=max(1, world_size // (tp * pp)), pad_to_multiple=shard_multiple)
    if world_size % (tp * cp * pp):
        raise MegapackError(f"parallel.cp: world size {world_size} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = "
                            f"{tp * cp * pp} (data-parallel size = world / (tp*cp*pp))")
    what = f"2*cp*tp = 2*{cp}*{tp}" if sp else f"2*cp = 2*{cp}"
    if seq_length % multiple:
        raise MegapackError(f"parallel.cp: seq_length {seq_length} is not a multiple of {what} = {multiple} (each "
                            f"row is cut into 2*cp chunks{', each split over tp' if sp else ''}); choose a cp or "
                            f"seq_length for which it is")
    if (par.vpp or 1) > 1:
        raise MegapackError(f"parallel.cp: {cp} with parallel.vpp {par.vpp} is not supported: interleaved pipelines "
                            f"send fixed-size rows, which CP padding does not keep; use parallel.vpp null")
    return ContextLayout(cp=cp, multiple=multiple, dp=world_size // (tp * cp * pp), pad_to_multiple=shard_multiple)


def shard_segments_per_pack(config: RunConfig) -> tuple[int, int | None]:
    """(segments per pack rounded up, the shards' pad_to_multiple) from the train split's meta.json; (1, None)
    before the shards exist (a long-context row holds one document, or a few)."""
    from megapack.data.packs.shards import read_meta

    data = config.data
    folder = Path(data.path if data.path else data.blend[0].path)
    if not (folder / "meta.json").is_file():
        return 1, None
    meta = read_meta(folder)
    split = meta.get("splits", {}).get(data.train_split) or meta
    packs, segments = int(split.get("num_packs") or 0), int(split.get("num_segments") or 0)
    per_pack = math.ceil(segments / packs) if packs and segments else 1
    return per_pack, meta.get("pad_to_multiple")

