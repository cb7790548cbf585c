"""Shard verification benchmark: what `data.verify: full` (sha256 of every shard file) and `fast` (sizes and
indexes) cost, next to the time of one training step of the demo config.

Writes a shard directory of about --gb GB through megapack's writer (random LLaMA-3 token ids, int32, lognormal
conversation lengths, best-fit-decreasing packs of 4096 tokens), then times, in this one process: the sha256 of
every file (megapack.checksums.file_sha256, what each rank runs on its share), the fast checks and `megapack inspect
--verify`'s full pass (which also reads every value). The files were just written, so they are read from the page
cache: that measures hashing, not the disk. Then it trains the demo config (`megapack demo`'s bfd arm, 2 CPU
processes) for a few steps through bench_train.py, or reads an existing run with --run-dir, and prints the median
step time. A table, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from megapack.errors import MegapackError  # noqa: E402
from megapack.report.document import markdown_table  # noqa: E402

VOCAB = 128256
SEQ_LENGTH = 4096
BYTES_PER_TOKEN = 5  # int32 token + uint8 mask


def make_shards(out: Path, gb: float, seed: int = 0) -> dict:
    """A shard directory of about `gb` GB (tokens + loss masks) from random conversations, through the real writer."""
    from megapack.data.packs.shards import token_dtype
    from megapack.data.packs.writer import RecordStore, write_shard_dir

    dtype = token_dtype(VOCAB)  # the dtype the writer expects of intermediate token files (int32 for LLaMA-3)
    rng = np.random.default_rng(seed)
    total = int(gb * 1e9 / BYTES_PER_TOKEN)
    lengths = np.clip(rng.lognormal(np.log(700), 1.0, size=total // 400), 8, SEQ_LENGTH).astype(np.int64)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), total)) + 1]
    work = out.parent / (out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    tok_file, mask_file = work / "tokens.bin", work / "mask.bin"
    with open(tok_file, "wb") as tf, open(mask_file, "wb") as mf:
        left = int(lengths.sum())
        while left:
            n = min(left, 1 << 24)
            tf.write(rng.integers(0, VOCAB, size=n, dtype=dtype).tobytes())
            mf.write(rng.integers(0, 2, size=n, dtype=np.uint8).tobytes())
            left -= n
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    part = np.zeros(len(lengths), np.int32)
    store = RecordStore.from_files([(tok_file, mask_file)], dtype, part, offsets, lengths)
    meta = write_shard_dir(store, out, seq_length=SEQ_LENGTH, packing="bfd", vocab_size=VOCAB, pad_id=0)
    tok_file.unlink()
    mask_file.unlink()
    work.rmdir()
    return meta


def timed(fn, *args) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def measure(out: Path, meta: dict, repeats: int) -> list[tuple[str, float, float | None]]:
    """(what, median seconds, GB/s) of hashing every file, the fast checks (no GB/s: they read only the indexes)
    and inspect's full verification."""
    from megapack.checksums import file_sha256
    from megapack.data.packs.verify import fast_problems, verify

    files = list(meta["sha256"])
    gb = sum((out / name).stat().st_size for name in files) / 1e9
    splits = list(meta["splits"])

    def hash_all() -> list[str]:
        return [file_sha256(out / name) for name in files]

    rows = []
    def fast() -> list[str]:
        return fast_problems(out, meta, splits)

    for what, fn in (("sha256 of every file (data.verify full, 1 rank)", hash_all),
                     ("fast checks: sizes + indexes (data.verify fast)", fast),
                     ("megapack inspect --verify (sha256 + every value)", lambda: verify(out))):
        times = []
        for _ in range(repeats):
            seconds, result = timed(fn)
            if fn is not hash_all and result:
                raise MegapackError(f"{out}: verification found problems: {result[0]}")
            times.append(seconds)
        median = statistics.median(times)
        rows.append((what, median, gb / median if fn is not fast else None))
    return rows


def demo_step_time(run_dir: Path | None, steps: int, nproc: int) -> tuple[float, int]:
    """Median step time of the demo config without its checkpoint (step_time_s - time_checkpoint_s; trained here
    unless run_dir is given, the first step left out) and the number of steps counted."""
    from bench_train import step_records, train_demo

    with tempfile.TemporaryDirectory() as tmp:
        run = run_dir or train_demo(Path(tmp), steps, nproc)
        records = step_records(run / "metrics.jsonl", 1)
    return statistics.median(r["step_time_s"] - r["time_checkpoint_s"] for r in records), len(records)


def main() -> int:
    """Write the shards, time the checks, train the demo, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="size of the generated shard directory (GB, 1e9 bytes)")
    p.add_argument("--dir", type=Path, help="where to write it (default: a temporary directory, removed after)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each check (the median is shown)")
    p.add_argument("--run-dir", type=Path, help="a demo run's logging directory (metrics.jsonl); skips training")
    p.add_argument("--steps", type=int, default=6, help="demo training steps when training here")
    p.add_argument("--nproc", type=int, default=2, help="CPU processes of the demo training")
    args = p.parse_args()
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            out = Path(tmp) / "shards"
            t_write, meta = timed(make_shards, out, args.gb)
            rows = measure(out, meta, args.repeats)
            files = len(meta["sha256"])
            size = sum(meta["file_bytes"].values()) / 1e9
        step, counted = demo_step_time(args.run_dir, args.steps, args.nproc)
    except MegapackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"shard directory: {size:.3f} GB in {files} files, {meta['num_tokens'] + meta['num_padding_tokens']:,} "
          f"tokens, written in {t_write:.1f} s; median of {args.repeats} runs, page cache warm")
    cells = [[what, f"{seconds:.3f}", "-" if rate is None else f"{rate:.2f}", f"{seconds / step:.3f}"]
             for what, seconds, rate in rows]
    print("\n".join(markdown_table(["check", "median (s)", "GB/s", "in demo steps"], cells)))
    print(f"| demo training step without checkpoint (median of {counted}, {args.nproc} CPU processes) | {step:.3f} "
          f"| - | 1 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
