"""A run's file checks: the shards it reads (`data.verify`), their token ids against the model's vocabulary, the
directories it writes; and, at the start of training, the sha256 of every shard file hashed across the ranks.

Everything here but `verify_checksums` runs in preflight, before any process group, on every rank alike; a problem
is one MegapackError line naming the config key and the file.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from megapack.data.packs.shards import is_shard_file, read_meta
from megapack.data.packs.verify import fast_problems, sha_mismatch, split_files, token_range
from megapack.dirlock import check_free
from megapack.errors import MegapackError
from megapack.training.preflight.config import RunConfig

ShardSet = tuple[str, Path, dict, list[str]]  # config key, directory, its meta.json, the splits the run reads


def shard_sets(config: RunConfig, meta: dict) -> list[ShardSet]:
    """Every shard directory and split the run reads: the train split of data.path (`meta`), and the validation
    split where its directory has one (the trainer runs without validation when it has none)."""
    data = config.data
    train_path = Path(data.path)
    sets = [("data.path", train_path, meta, [data.train_split] if data.train_split in meta.get("splits", {}) else [])]
    if data.valid_split:
        if data.valid_path and Path(data.valid_path) != train_path:
            try:
                valid_meta = read_meta(data.valid_path)
            except MegapackError:
                return sets
            if data.valid_split in valid_meta.get("splits", {}):
                sets.append(("data.valid_path", Path(data.valid_path), valid_meta, [data.valid_split]))
        elif data.valid_split in meta.get("splits", {}) and data.valid_split not in sets[0][3]:
            sets[0][3].append(data.valid_split)
    return sets


def problem_line(key: str, path: Path, problems: list[str]) -> str:
    """The first problem as one line: `key: DIR/FILE: reason` (or `key: DIR: reason`), counting the others."""
    name, _, reason = problems[0].partition(": ")
    where = f"{path / name}: {reason}" if is_shard_file(name) else f"{path}: {problems[0]}"
    more = ""
    if len(problems) > 1:
        more = f" (and {len(problems) - 1} more; `megapack inspect {path} --verify` lists them)"
    return f"{key}: {where}{more}"


def verify_shards(sets: list[ShardSet], level: str) -> list[tuple[str, str, str]]:
    """`fast` and `full`: every file present with its recorded size, every index sound and matching meta.json (a
    one-line MegapackError otherwise). Returns what `full` hashes at the start of training: (key, file, sha256)."""
    if level == "off":
        return []
    checksums = []
    for key, path, meta, splits in sets:
        problems = fast_problems(path, meta, splits)
        if problems:
            raise MegapackError(problem_line(key, path, problems))
        if level == "full":
            checksums += [(key, str(path / name), sha) for name, sha in split_files(meta, splits).items()]
    return checksums


def check_token_range(sets: list[ShardSet], vocab_size: int, hf_dir: str) -> list[str]:
    """Refuse shards whose recorded token ids (or pad id) do not fit the model's vocabulary; returns a warning for
    shards that record no range and whose tokenizer is larger than the model's vocabulary."""
    warnings = []
    where = f"vocab_size {vocab_size} in {Path(hf_dir) / 'config.json'}"
    for key, path, meta, splits in sets:
        if not splits:  # no such split: the trainer says so when it opens the shards
            continue
        span = token_range(meta, splits)
        if span is None:
            tokenizer_vocab = meta.get("vocab_size")
            if tokenizer_vocab is None or int(tokenizer_vocab) > vocab_size:
                warnings.append(f"{key}: {path / 'meta.json'} records no token-id range (written before megapack "
                                f"recorded one) and its tokenizer has {tokenizer_vocab} ids, the model {vocab_size}: "
                                f"token ids are not checked; rerun `megapack preprocess` to record the range")
        elif span[1] >= vocab_size or span[0] < 0:
            raise MegapackError(f"{key}: {path} holds token ids in [{span[0]}, {span[1]}] (meta.json min_token_id/"
                                f"max_token_id), outside the model's vocabulary [0, {vocab_size}) ({where}); "
                                f"preprocess with the model's tokenizer")
        pad_id = meta.get("pad_id")
        if pad_id is not None and not 0 <= int(pad_id) < vocab_size:
            raise MegapackError(f"{key}: {path} pads with id {pad_id} (meta.json pad_id), outside the model's "
                                f"vocabulary [0, {vocab_size}) ({where}); preprocess with the model's tokenizer")
    return warnings


def check_writable_dir(key: str, value: str) -> None:
    """One-line MegapackError unless `value` is a writable directory or can be created as one."""
    path = Path(value)
    try:
        probe = path
        while not probe.exists() and not probe.is_symlink():
            probe = probe.parent
        if probe.is_symlink() and not probe.exists():
            raise MegapackError(f"{key}: {value} cannot be created: {probe} is a broken symbolic link")
        if not probe.is_dir():
            raise MegapackError(f"{key}: {value} is a file, expected a directory" if probe == path else
                                f"{key}: {value} cannot be created: {probe} is a file, not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise MegapackError(f"{key}: {value} is not writable" if probe == path else
                                f"{key}: {value} cannot be created: {probe} is not writable")
    except OSError as exc:  # e.g. a name too long
        raise MegapackError(f"{key}: {value}: {exc.strerror}") from None


def check_wandb(config: RunConfig) -> None:
    """logging.wandb needs the wandb package (the optional extra megapack[wandb])."""
    import importlib.util

    if config.logging.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise MegapackError("logging.wandb: the wandb package is not installed: pip install 'megapack[wandb]' "
                            "(or set logging.wandb=null)")


def check_outputs(config: RunConfig) -> list[str]:
    """Every directory the run writes can be written; returns the warning of a run that writes no checkpoints."""
    ck, logging = config.checkpoint, config.logging
    check_wandb(config)
    outputs = {"checkpoint.dir": ck.dir, "logging.dir": logging.dir, "checkpoint.export_hf": ck.export_hf}
    for key, value in outputs.items():
        if value:
            check_writable_dir(key, value)
            if key != "checkpoint.export_hf":  # another live run writing there: refused here and by rank 0's lock
                check_free(value, key)
    if ck.dir:
        return []
    files = "" if logging.dir else " and, with logging.dir null too, no metrics files (metrics.jsonl, summary.json)"
    return [f"checkpoint.dir is null: no checkpoints will be written{files}"]


def _shares(sizes: list[int], world_size: int) -> list[list[int]]:
    """File indices per rank, largest file first to the least loaded rank (the same on every rank)."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += sizes[i]
    return shares


def verify_checksums(files: list[tuple[str, str, str]], rank: int, world_size: int, device) -> tuple[int, float]:
    """`data.verify: full`: each rank hashes its share of the (key, file, sha256) list; an all-reduce of the first
    bad file makes every rank raise the same one-line MegapackError. Returns (bytes hashed here, seconds)."""
    import torch
    import torch.distributed as dist

    from megapack.checksums import file_sha256

    t0 = time.perf_counter()
    sizes = []
    for _, name, _ in files:
        try:
            sizes.append(os.stat(name).st_size)
        except OSError:
            sizes.append(0)
    first, hashed = 2 * len(files) * world_size, 0  # code (index * 2 + kind) * world_size + rank; kind 1: unreadable
    for i in sorted(_shares(sizes, world_size)[rank]):
        key, name, sha = files[i]
        try:
            bad = file_sha256(name) != sha
            kind = 0
        except OSError:
            bad, kind = True, 1
        hashed += sizes[i]
        if bad:
            first = (2 * i + kind) * world_size + rank
            break
    flag = torch.tensor([first], dtype=torch.int64, device=device)
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    code = int(flag.item())
    if code < 2 * len(files) * world_size:
        index, kind, where = code // world_size // 2, code // world_size % 2, code % world_size
        key, name, sha = files[index]
        reason = sha_mismatch(name, sha) if kind == 0 else f"{name}: cannot be read (on rank {where})"
        raise MegapackError(f"{key}: {reason}")
    return hashed, time.perf_counter() - t0
