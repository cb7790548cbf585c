"""The preprocessing work folder, in one place: which partition owns a record, and how a partition is written and
read back.

    OUT/.work/job.json                          fingerprint of what tokenization depends on
    OUT/.work/part-IIIII-of-PPPPP/tokens.bin    token ids of the partition's encoded records, back to back
                                 /mask.bin      their loss masks (uint8)
                                 /samples.npy   int64 [n, 2]: global record number, token count (the name
                                                predates "record"; kept so unfinished runs stay resumable)
                                 /part.json     statistics; its presence marks the partition finished

Records are numbered across all inputs in order, bad ones included; record r belongs to partition
(r // BLOCK) % P, so each partition can be tokenized on its own node. A partition is written under a temporary
folder of the writer's own (`.part-IIIII-of-PPPPP.<hex>.tmp`, megapack.atomic: two tasks of one partition never
share one) and renamed when complete: a finished partition is reusable, a killed one is redone.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from megapack.atomic import create_temp_dir
from megapack.data.packs.writer import RecordStore

WORK_DIR = ".work"
JOB_FILE = "job.json"
BLOCK = 256  # consecutive records per partition block
DONE_FILE = "part.json"
TOKENS_FILE, MASK_FILE, RECORDS_FILE = "tokens.bin", "mask.bin", "samples.npy"
# part.json keys renamed (old -> new); `finished_partition` renames them in partitions written before
RENAMED_PART_KEYS = {"samples": "conversations", "loss_tokens": "trained_tokens"}


def part_dir(work_dir: Path, index: int, num_parts: int) -> Path:
    """Folder of partition `index` of `num_parts`."""
    return Path(work_dir) / f"part-{index:05d}-of-{num_parts:05d}"


def owned_records(items: Iterable[Any], index: int, num_parts: int) -> Iterator[tuple[int, Any]]:
    """(record number, item) for the items of all inputs (in order) that partition `index` owns."""
    for record, item in enumerate(items):
        if (record // BLOCK) % num_parts == index:
            yield record, item


def owned_count(num_records: int, index: int, num_parts: int) -> int:
    """How many of `num_records` records partition `index` owns."""
    full_rounds, rest = divmod(num_records, BLOCK * num_parts)
    return full_rounds * BLOCK + min(max(rest - index * BLOCK, 0), BLOCK)


class PartitionWriter:
    """Writes one partition under a temporary folder of its own; `finish` renames it into place, `abort` removes
    it (and nothing another writer has)."""

    def __init__(self, work_dir: Path, index: int, num_parts: int) -> None:
        self.final = part_dir(work_dir, index, num_parts)
        self.tmp = create_temp_dir(self.final)
        self.tokens = open(self.tmp / TOKENS_FILE, "wb")
        self.mask = open(self.tmp / MASK_FILE, "wb")

    def write(self, tokens: bytes, loss_mask: bytes) -> None:
        """Append encoded records (token bytes in the shards' dtype, uint8 loss-mask bytes)."""
        self.tokens.write(tokens)
        self.mask.write(loss_mask)

    def finish(self, records: np.ndarray, lengths: np.ndarray, stats: dict) -> None:
        """Write the record table and part.json, then publish the folder."""
        self.tokens.close()
        self.mask.close()
        np.save(self.tmp / RECORDS_FILE, np.stack([records, lengths], axis=1))
        with open(self.tmp / DONE_FILE, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        """Remove the unfinished folder."""
        self.tokens.close()
        self.mask.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def finished_partition(work_dir: Path, index: int, num_parts: int) -> dict | None:
    """part.json of a finished partition (keys renamed since it was written: new names), or None."""
    try:
        with open(part_dir(work_dir, index, num_parts) / DONE_FILE, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    for old, new in RENAMED_PART_KEYS.items():
        if old in stats:
            stats.setdefault(new, stats.pop(old))
    return stats


def remove_work_dir(work_dir: Path) -> None:
    """Remove the work folder with job.json last, so a kill part-way leaves a folder that still names its job (a
    rerun of that job finishes the removal) or an empty one; never partitions without their fingerprint."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return
    for entry in work_dir.iterdir():
        if entry.name != JOB_FILE:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (work_dir / JOB_FILE).unlink(missing_ok=True)
    work_dir.rmdir()


def read_partitions(work_dir: Path, num_parts: int, dtype: np.dtype) -> RecordStore:
    """A RecordStore over every partition's files, records in global record order."""

    files, part, offset, lengths, record = [], [], [], [], []
    for i in range(num_parts):
        d = part_dir(work_dir, i, num_parts)
        table = np.load(d / RECORDS_FILE)
        files.append((d / TOKENS_FILE, d / MASK_FILE))
        record.append(table[:, 0])
        lengths.append(table[:, 1])
        offset.append(np.cumsum(table[:, 1]) - table[:, 1])
        part.append(np.full(len(table), i, dtype=np.int32))
    order = np.argsort(np.concatenate(record), kind="stable")
    cat = lambda xs: np.concatenate(xs)[order]  # noqa: E731
    return RecordStore.from_files(files, dtype, cat(part), cat(offset), cat(lengths))
