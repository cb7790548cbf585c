"""Tokenize step: one partition of the input records -> flat token/loss-mask files plus (record, length) per
encoded record.

Which records a partition owns and how its folder is written live in `partitions`. Inside a partition, batches of
parsed records go to a process pool and come back in submission order, so the files are identical for any worker
count. The pool's processes come from a forkserver, not from fork: the caller may run threads (a forked child
inherits their locks in whatever state they were), so each worker builds its own encoder from the picklable
`EncodeSpec`.
"""
from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megapack.data.pipeline.partitions import PartitionWriter, owned_count, owned_records
from megapack.data.sources.conversation import BadRecord, SkipReport
from megapack.data.sources.limits import ReadLimits
from megapack.errors import MegapackError

BATCH = 256  # records per worker task
# what a pool worker imports to build its encoder: the forkserver imports it once, before it forks any worker
PRELOAD = ["megapack.data.pipeline.encode", "megapack.data.render.templates", "megapack.data.render.tokenizers",
           "tiktoken"]


@dataclass
class EncodeSpec:
    """Everything a worker needs to build the tokenizer and template (picklable)."""

    tokenizer_model: str
    tokenizer_type: str
    template: str
    options: dict = field(default_factory=dict)
    chat_template_from: str | None = None  # --template hf: the checkpoint folder (default: --tokenizer-model's)
    template_date: str | None = None  # --template hf: what strftime_now returns (YYYY-MM-DD)


def load_encoder(spec: EncodeSpec):
    """(tokenizer, template, options) for a spec."""
    from megapack.data.render.templates import TemplateOptions, get_template
    from megapack.data.render.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(spec.tokenizer_model, spec.tokenizer_type)
    if spec.template == "hf":
        from megapack.data.render.hf_jinja import parse_date
        from megapack.data.render.hf_template import HFChatTemplate

        template = HFChatTemplate.from_dir(spec.chat_template_from or spec.tokenizer_model,
                                           parse_date(spec.template_date))
    else:
        template = get_template(spec.template)
    return tokenizer, template, TemplateOptions(**spec.options)


_WORKER: dict = {}


def _init_worker(spec: EncodeSpec, dtype: str, encoder: tuple | None = None) -> None:
    """Set up this process's encoder: the caller's own when given (one process), else built from the spec."""
    if encoder is None and _WORKER.get("spec") != spec:
        encoder = load_encoder(spec)
    if encoder is not None:
        _WORKER["encoder"], _WORKER["spec"] = encoder, spec
    _WORKER["dtype"] = np.dtype(dtype)


def _init_pool_worker(spec: EncodeSpec, dtype: str) -> None:
    """A pool worker's initializer: builds its own encoder (loading the LLaMA-3 ranks takes ~0.5 s). A pool starts
    a new worker whenever one dies, and one whose initializer raised would die forever: its tasks fail instead."""
    try:
        _init_worker(spec, dtype)
    except Exception as exc:
        _WORKER["error"] = exc


def _encode_batch(records: list) -> tuple[bytes, bytes, np.ndarray, list[tuple[int, str, str]]]:
    """Encode parsed records; returns token bytes, loss-mask bytes, lengths, and (position, reason, detail) of
    failures."""
    if "error" in _WORKER:
        raise _WORKER["error"]
    tokenizer, template, options = _WORKER["encoder"]
    ids_out, loss_mask_out, lengths, bad = [], [], [], []
    for pos, record in enumerate(records):
        try:
            ids, loss_mask = template.encode(record, tokenizer, options)
        except MegapackError as exc:  # UnrenderableRecord carries its reason (tools, prefix stability, empty mask)
            bad.append((pos, getattr(exc, "reason", "template error"), str(exc)))
            continue
        if len(ids) == 0:
            bad.append((pos, "empty after tokenization", ""))
            continue
        if len(ids) != len(loss_mask):
            raise RuntimeError(f"template {type(template).__name__} returned {len(ids)} ids and {len(loss_mask)} "
                               "loss-mask values")
        ids_out.append(np.asarray(ids))
        loss_mask_out.append(np.asarray(loss_mask, dtype=np.uint8))
        lengths.append(len(ids))
    dtype = _WORKER["dtype"]
    toks = np.concatenate(ids_out).astype(dtype).tobytes() if ids_out else b""
    loss_masks = np.concatenate(loss_mask_out).tobytes() if loss_mask_out else b""
    return toks, loss_masks, np.array(lengths, dtype=np.int64), bad


def _owned_batches(specs: list, index: int, num_parts: int, on_error: str, report: SkipReport,
                   limits: ReadLimits) -> Iterator[tuple[list[int], list, int]]:
    """(record numbers, parsed records, records consumed) batches of this partition; bad records go to the policy."""
    from megapack.data.sources.formats import handle_bad_record, parse_records

    items = (item for spec in specs for item in parse_records(spec, limits))
    recs, batch, consumed = [], [], 0
    for record, item in owned_records(items, index, num_parts):
        consumed += 1
        if isinstance(item, BadRecord):
            handle_bad_record(item, on_error, report)
            continue
        recs.append(record)
        batch.append(item)
        if len(batch) == BATCH:
            yield recs, batch, consumed
            recs, batch, consumed = [], [], 0
    if batch or consumed:
        yield recs, batch, consumed


def tokenize_partition(
    specs: list,
    encode: EncodeSpec,
    dtype: np.dtype,
    work_dir: Path,
    index: int,
    num_parts: int,
    *,
    workers: int = 1,
    on_error: str = "skip",
    progress: bool = True,
    encoder: tuple | None = None,
    limits: ReadLimits = ReadLimits(),
) -> dict:
    """Tokenize partition `index` of `num_parts` into work_dir; returns its part.json statistics."""
    from megapack.data.sources.formats import handle_bad_record

    out = PartitionWriter(work_dir, index, num_parts)
    report = SkipReport()
    rec_chunks, len_chunks = [], []
    n_records = n_tokens = n_trained = 0
    t0 = time.perf_counter()
    bar = None
    pool = None
    try:
        _init_worker(encode, dtype.name, encoder)
        if workers > 1:  # forkserver: safe from a threaded caller; the spec and the batches are pickled
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)  # imported once, by the server (when this process starts it)
            pool = ctx.Pool(workers, initializer=_init_pool_worker, initargs=(encode, dtype.name))
        if progress:
            from tqdm import tqdm

            from megapack.data.sources.readers import count_records

            total = owned_count(sum(count_records(f, limits) for spec in specs for f in spec.files), index, num_parts)
            bar = tqdm(desc=f"tokenize part {index + 1}/{num_parts}", total=total, unit=" records", mininterval=1.0,
                       smoothing=0.1)
        pending: deque = deque()

        def drain_one() -> None:
            nonlocal n_tokens, n_trained
            recs, sources, result = pending.popleft()
            toks, loss_masks, lengths, bad = result.get() if pool is not None else result
            if bad:
                for p, reason, detail in bad:
                    handle_bad_record(BadRecord(sources[p] or f"record {recs[p]}", reason, detail), on_error, report)
                bad_pos = {p for p, _, _ in bad}
                recs = [r for p, r in enumerate(recs) if p not in bad_pos]
            out.write(toks, loss_masks)
            n_tokens += int(lengths.sum())
            n_trained += int(np.frombuffer(loss_masks, dtype=np.uint8).sum(dtype=np.int64))
            rec_chunks.append(np.array(recs, dtype=np.int64))
            len_chunks.append(lengths)
            if bar is not None:
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)

        for recs, batch, consumed in _owned_batches(specs, index, num_parts, on_error, report, limits):
            n_records += consumed
            if bar is not None:
                bar.update(consumed)
            if not batch:
                continue
            sources = [getattr(record, "source", "") for record in batch]
            if pool is not None:
                pending.append((recs, sources, pool.apply_async(_encode_batch, (batch,))))
                if len(pending) >= 4 * workers:
                    drain_one()
            else:
                pending.append((recs, sources, _encode_batch(batch)))
                drain_one()
        while pending:
            drain_one()
        records = np.concatenate(rec_chunks) if rec_chunks else np.zeros(0, np.int64)
        lengths = np.concatenate(len_chunks) if len_chunks else np.zeros(0, np.int64)
        stats = {
            "index": index,
            "num_partitions": num_parts,
            "records": n_records,
            "conversations": int(len(lengths)),
            "tokens": n_tokens,
            "trained_tokens": n_trained,
            "skipped": report.counts,
            "skipped_examples": report.examples,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        out.finish(records, lengths, stats)
        return stats
    except BaseException:
        out.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
