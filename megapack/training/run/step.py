"""One optimizer step and one validation pass over THD micro-batches, with the time each phase took.

The forward step hands megatron's pipeline schedule per-token losses and a loss function returning
(sum of weighted token losses, loss denominator); with `calculate_per_token_loss` megatron divides the gradients
by the global denominator, so the loss is token-weighted across micro-batches and DP ranks (not a mean of means).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial

from megapack.training.run.batch import STAT_KEYS, Batch
from megapack.training.run.source import DataSource

# a data source's extra entries of one micro-batch's loss report (DataSource.loss_report)
LossReport = Callable[[object, Batch], dict]


def no_report(losses, batch: Batch) -> dict:
    """No entries beyond the loss."""
    return {}



def forward_step(data_iterator, model, *, stats_sink: list, report: LossReport = no_report):
    """One micro-batch forward; returns per-token losses and the loss function the schedule calls on them."""
    from megatron.core.packed_seq_params import PackedSeqParams

    batch: Batch = next(data_iterator)
    if batch.stats is not None:  # None: a later virtual-pipeline chunk's copy, counted by the first chunk
        stats_sink.append(batch.stats)
    cu, cu_padded, m = batch.cu_seqlens, batch.cu_seqlens_padded, batch.max_seqlen
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                             cu_seqlens_kv_padded=cu_padded, max_seqlen_q=m, max_seqlen_kv=m)
    output = model(input_ids=batch.tokens, position_ids=batch.positions, attention_mask=None,
                   labels=batch.targets, packed_seq_params=params)
    return output, partial(loss_func, batch, report=report)


def loss_func(batch: Batch, losses, *, report: LossReport = no_report):
    """(sum of weighted token losses, denominator, report): megatron divides by the global denominator."""
    import torch

    loss = (losses.float().reshape(-1) * batch.loss_weight.reshape(-1)).sum()
    count = torch.tensor(batch.loss_denominator, dtype=torch.int, device=loss.device)
    return loss, count, {"lm loss": torch.stack([loss.detach(), count.to(loss.dtype)])} | report(losses, batch)


def reduce_loss(outputs: list, device) -> float:
    """Token-weighted loss over all micro-batches, pipeline stages and DP x CP ranks (same value on every rank; CP
    ranks hold parts of each loss sum, and only CP rank 0 its denominator)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in outputs:
        total += item["lm loss"].to(torch.float64)
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())  # only the last stage is non-zero
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total[0]) / max(float(total[1]), 1.0)


def reduce_stats(stats: list[dict], device) -> dict[str, int]:
    """Per-step counters (tokens, conversations, packs...) summed over micro-batches and DP ranks (every CP rank
    holds its micro-batches' whole counts: not summed over CP)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t = torch.tensor([sum(s[k] for s in stats) for k in STAT_KEYS], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return {k: int(v) for k, v in zip(STAT_KEYS, t.tolist())}


class TimedIterator:
    """Wraps the micro-batch iterator and adds up the seconds spent waiting for the next batch."""

    def __init__(self, inner: Iterator[Batch]) -> None:
        self.inner, self.seconds = inner, 0.0

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        try:
            return next(self.inner)
        finally:
            self.seconds += time.perf_counter() - t0


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def chunk_iterators(batches: Iterator[Batch], chunks: int) -> Iterator[Batch] | list[Iterator[Batch]]:
    """The micro-batches as the schedule takes them: one iterator, or with virtual pipeline stages one per model
    chunk, each yielding every micro-batch (its cu_seqlens reach every virtual stage); only the first counts stats."""
    if chunks == 1:
        return batches
    import itertools

    first, *rest = itertools.tee(batches, chunks)  # lazy: holds only the micro-batches in flight
    return [first, *(map(lambda batch: replace(batch, stats=None), copy) for copy in rest)]


def run_schedule(model, batches: Iterator[Batch], num_microbatches: int, row_length: int, *,
                 forward_only: bool, stats: list, report: LossReport = no_report) -> list:
    """megatron's forward(-backward) schedule over THD rows (one row of `row_length` tokens per micro-batch).

    megatron's own micro_batch_size is 1 here: one THD row, which holds megapack's `micro_batch_size` packs.
    `model` is a module or the list of this rank's virtual-pipeline chunks (interleaved 1F1B).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megapack.model.builder import as_chunks

    chunks = as_chunks(model)
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, stats_sink=stats, report=report),
        data_iterator=chunk_iterators(batches, len(chunks)), model=chunks,
        num_microbatches=num_microbatches, seq_length=row_length, micro_batch_size=1, forward_only=forward_only)


def nonfinite_gradients(model, device) -> bool:
    """Whether any rank holds a NaN or infinite gradient (collective over the whole world)."""
    import torch
    import torch.distributed as dist

    from megapack.model.builder import as_chunks

    bad = torch.zeros(1, dtype=torch.float32, device=device)
    for buffer in (b for chunk in as_chunks(model) for b in chunk.buffers + chunk.expert_parallel_buffers):
        if not bool(torch.isfinite(buffer.grad_data).all()):
            bad.fill_(1.0)
            break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


def train_step(model, optimizer, scheduler, batches: Iterator[Batch], num_microbatches: int, row_length: int,
               device, source: DataSource | None = None) -> dict:
    """One optimizer step over this rank's micro-batches of a global batch; returns the step's metrics (the same on
    every rank), with the fields `source` adds from its loss reports (a blend's per-member numbers).

    A non-finite loss or gradient skips the optimizer and scheduler step (the weights stay as they were) and names
    itself in `nonfinite` ("loss" or "gradient"; None otherwise). `time_data_s` is the time spent waiting for
    micro-batches, `time_forward_backward_s` the schedule without it, `time_optimizer_s` the optimizer step.
    """
    import math

    from megapack.model.builder import as_chunks

    for chunk in as_chunks(model):
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    timed, stats = TimedIterator(batches), []
    t0 = time.perf_counter()
    outputs = run_schedule(model, timed, num_microbatches, row_length, forward_only=False, stats=stats,
                           report=source.loss_report if source is not None else no_report)
    loss = reduce_loss(outputs, device)
    nonfinite = "loss" if not math.isfinite(loss) else "gradient" if nonfinite_gradients(model, device) else None
    _sync()
    t1 = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    ok, grad_norm = False, None
    if nonfinite is None:
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
    _sync()
    t2 = time.perf_counter()
    record = {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else None, "lr": lr,
              "skipped": not ok, "nonfinite": nonfinite, "time_data_s": timed.seconds,
              "time_forward_backward_s": t1 - t0 - timed.seconds, "time_optimizer_s": t2 - t1}
    return record | reduce_stats(stats, device) | (source.step_report(outputs, device) if source is not None else {})


def padded_to_multiple(batches: Iterator[Batch], count: int, multiple: int) -> tuple[Iterator[Batch], int]:
    """The micro-batches followed by zero-weight copies of the last one up to a multiple of `multiple` (interleaved
    1F1B runs whole groups of pp micro-batches); they add nothing to the loss."""
    extra = -count % multiple
    if not extra:
        return batches, count

    def padded():
        last = None
        for last in batches:
            yield last
        for _ in range(extra):
            yield last.zeroed()

    return padded(), count + extra


def evaluate(model, batches: Iterator[Batch], num_microbatches: int, row_length: int, device) -> float:
    """Token-weighted (or conversation-weighted) loss over the given validation micro-batches."""
    import torch
    from megatron.core import parallel_state as ps

    from megapack.model.builder import as_chunks

    if len(as_chunks(model)) > 1:
        batches, num_microbatches = padded_to_multiple(batches, num_microbatches,
                                                       ps.get_pipeline_model_parallel_world_size())
    for chunk in as_chunks(model):
        chunk.eval()
    with torch.no_grad():
        outputs = run_schedule(model, batches, num_microbatches, row_length, forward_only=True, stats=[])
    for chunk in as_chunks(model):
        chunk.train()
    return reduce_loss(outputs, device)
