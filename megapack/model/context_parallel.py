"""Context parallelism for packed (THD) rows: which tokens a CP rank holds, and the masks and per-chunk
`cu_seqlens` its attention needs (LLaMA 3's design: queries stay local, keys and values are all-gathered).

Every segment of a row is padded to a multiple of 2*cp and cut into 2*cp equal chunks; CP rank r keeps chunks r and
2*cp-1-r of every segment, in segment order (Transformer Engine's THD layout, which megatron's THD RoPE assumes), so
each rank does the same causal work. A token's position is its place in its own segment, never its local index.
Pure numpy index arithmetic (host side: the batch builder slices with it) plus the K/V gather (torch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megapack.errors import MegapackError


def cp_row_index(cu_seqlens_padded, rank: int, size: int) -> np.ndarray:
    """The row positions (indices into the whole THD row) CP rank `rank` of `size` holds, in its local order."""
    cu = np.asarray(cu_seqlens_padded, np.int64)
    lengths = np.diff(cu)
    if size == 1:
        return np.arange(int(cu[-1]), dtype=np.int64)
    if (lengths % (2 * size)).any():
        bad = int(lengths[(lengths % (2 * size)) > 0][0])
        raise MegapackError(f"parallel.cp: a segment of {bad} padded tokens is not a multiple of 2*cp = {2 * size} "
                            f"(the batch builder pads every segment to one)")
    chunk = lengths // (2 * size)
    begins = np.stack([cu[:-1] + rank * chunk, cu[:-1] + (2 * size - 1 - rank) * chunk], axis=1).reshape(-1)
    widths = np.repeat(chunk, 2)
    offsets = np.arange(int(widths.sum()), dtype=np.int64) - np.repeat(np.cumsum(widths) - widths, widths)
    return np.repeat(begins, widths) + offsets


def segment_and_position(cu_seqlens_padded, row_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment, position within the segment) of each given row position."""
    cu = np.asarray(cu_seqlens_padded, np.int64)
    segment = np.searchsorted(cu[1:], row_index, side="right")
    return segment, row_index - cu[segment]


@dataclass(frozen=True)
class CPLayout:
    """One row's layout over a CP group, seen from one rank (host arrays)."""

    local: np.ndarray  # row positions of this rank's tokens, in local order
    gathered: np.ndarray  # row positions of the all-gathered keys (rank 0's tokens, then rank 1's, ...)

    @staticmethod
    def of(cu_seqlens_padded, rank: int, size: int) -> "CPLayout":
        """The layout of a row with these padded boundaries for CP rank `rank` of `size`."""
        gathered = np.concatenate([cp_row_index(cu_seqlens_padded, r, size) for r in range(size)])
        return CPLayout(local=cp_row_index(cu_seqlens_padded, rank, size), gathered=gathered)

    def mask(self, cu_seqlens_padded) -> np.ndarray:
        """Bool `[local, gathered]`: True where a local query may attend a gathered key (same segment, key position
        at or before the query's)."""
        seg_q, pos_q = segment_and_position(cu_seqlens_padded, self.local)
        seg_k, pos_k = segment_and_position(cu_seqlens_padded, self.gathered)
        return (seg_q[:, None] == seg_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])

    def chunk_prefixes(self, cu_seqlens_padded) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-chunk varlen inputs: (cu_seqlens_q over the local chunks, cu_seqlens_k over each chunk's key prefix,
        the gathered keys' indices laid out prefix after prefix). A local chunk is queries [p, p + c) of a segment;
        its keys are that segment's positions [0, p + c), so bottom-right-aligned causal attention is exact."""
        cu = np.asarray(cu_seqlens_padded, np.int64)
        size = len(self.gathered) // max(len(self.local), 1)
        chunk = np.repeat(np.diff(cu) // (2 * size), 2)  # two local chunks per segment
        starts = self.local[np.cumsum(chunk) - chunk]  # first row position of each local chunk
        segment = np.repeat(np.arange(len(cu) - 1), 2)
        prefix_end = starts + chunk  # row position just past each chunk
        prefix = prefix_end - cu[segment]
        where = np.empty(int(cu[-1]), np.int64)
        where[self.gathered] = np.arange(len(self.gathered))  # row position -> index in the gathered keys
        rows = np.repeat(cu[segment], prefix) + (np.arange(int(prefix.sum())) - np.repeat(np.cumsum(prefix) - prefix,
                                                                                             prefix))
        cu_q = np.concatenate([[0], np.cumsum(chunk)])
        cu_k = np.concatenate([[0], np.cumsum(prefix)])
        return cu_q, cu_k, where[rows]


def gather_context_parallel(x, group):
    """All-gather `x` (`[t, heads, dim]`) over the CP group along tokens; the backward reduce-scatters its gradient
    (megatron's sequence-parallel gather, on the CP group)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
