"""The preprocess job: read -> template -> tokenize (partitions, worker pool) -> pack -> shards + meta.json.

Output directory life cycle: intermediate files live in `<out>/.work/` (a job.json fingerprint and one folder per
finished partition). Shards are written under temporary names and renamed; meta.json is written last, atomically,
and only then is `.work/` removed (job.json last). A directory without meta.json is never complete; rerunning the
same command reuses the finished partitions, or, killed while `.work/` was being removed, finishes that removal.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megapack.atomic import describe_os_error, free_bytes, temp_target, write_json_atomic
from megapack.data.packs.packing import PACKINGS
from megapack.data.packs.shards import DEFAULT_MAX_SHARD_TOKENS, META_NAME, is_shard_file, read_meta, token_dtype
from megapack.data.packs.writer import write_shard_dir
from megapack.data.pipeline.partitions import (
    BLOCK, JOB_FILE, WORK_DIR, finished_partition, part_dir, read_partitions, remove_work_dir,
)
from megapack.data.pipeline.sizes import check_trained_tokens, shard_bytes
from megapack.data.sources.formats import ON_ERROR
from megapack.data.sources.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_DEPTH, ReadLimits
from megapack.dirlock import DirLock
from megapack.errors import MegapackError
from megapack.seeds import SEED_LIMIT

MIN_SEQ_LENGTH = 16  # shorter packs hold little more than a chat template's header tokens


@dataclass
class PreprocessConfig:
    """Arguments of `megapack preprocess` (see its --help)."""

    output_dir: str
    tokenizer_model: str
    inputs: list[str] | None = None
    datasets: list[str] | None = None
    dataset_dir: str | None = None
    format: str = "auto"
    tokenizer_type: str = "auto"
    template: str = "llama3"
    chat_template_from: str | None = None
    template_date: str | None = None
    train_on_prompt: bool = False
    mask_history: bool = False
    system: str | None = None
    seq_length: int = 4096
    packing: str = "bfd"
    pad_to_multiple: int = 1
    drop_long: bool = False
    seed: int = 1234
    val_fraction: float = 0.0
    workers: int = 1
    on_error: str = "skip"
    max_record_depth: int = DEFAULT_MAX_DEPTH
    max_record_bytes: int = DEFAULT_MAX_BYTES
    overwrite: bool = False
    num_partitions: int = 1
    partition_index: int | None = None
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS
    progress: bool = True


def validate(cfg: PreprocessConfig) -> None:
    """Check the numeric and choice arguments (no file system access)."""
    checks = [
        (cfg.seq_length >= MIN_SEQ_LENGTH, f"--seq-length {cfg.seq_length}: expected an integer >= {MIN_SEQ_LENGTH}"),
        (cfg.workers > 0, f"--workers {cfg.workers}: expected a positive integer"),
        (cfg.packing in PACKINGS, f"--packing {cfg.packing!r}: expected one of {', '.join(PACKINGS)}"),
        (cfg.pad_to_multiple > 0, f"--pad-to-multiple {cfg.pad_to_multiple}: expected a positive integer"),
        (cfg.pad_to_multiple <= 0 or cfg.seq_length % cfg.pad_to_multiple == 0,
         f"--pad-to-multiple {cfg.pad_to_multiple}: expected a divisor of --seq-length {cfg.seq_length}"),
        (0.0 <= cfg.val_fraction < 1.0, f"--val-fraction {cfg.val_fraction}: expected a number in [0, 1)"),
        (cfg.on_error in ON_ERROR, f"--on-error {cfg.on_error!r}: expected one of {', '.join(ON_ERROR)}"),
        (cfg.max_record_depth > 0, f"--max-record-depth {cfg.max_record_depth}: expected a positive integer"),
        (cfg.max_record_bytes > 0, f"--max-record-bytes {cfg.max_record_bytes}: expected a positive integer"),
        (cfg.num_partitions > 0, f"--num-partitions {cfg.num_partitions}: expected a positive integer"),
        (cfg.partition_index is None or 0 <= cfg.partition_index < cfg.num_partitions,
         f"--partition-index {cfg.partition_index}: expected 0 <= index < --num-partitions {cfg.num_partitions}"),
        (isinstance(cfg.seed, int) and 0 <= cfg.seed < SEED_LIMIT, f"--seed {cfg.seed}: expected an integer in [0, 2**64)"),
        (cfg.max_shard_tokens > 0, f"max_shard_tokens {cfg.max_shard_tokens}: expected a positive integer"),
        (cfg.template == "hf" or (cfg.chat_template_from is None and cfg.template_date is None),
         f"--chat-template-from / --template-date apply to --template hf, not --template {cfg.template}"),
    ]
    for ok, message in checks:
        if not ok:
            raise MegapackError(message)
    if cfg.template_date is not None:
        from megapack.data.render.hf_jinja import parse_date

        parse_date(cfg.template_date)


def _fingerprint(cfg: PreprocessConfig, specs: list, tokenizer_file_sha256: str, template_identity: str) -> dict:
    """What the tokenized partitions depend on; a rerun reuses them only if this is unchanged.

    The tokenizer counts by its file's sha256, not its vocabulary identity: changed SentencePiece scores keep the
    vocabulary but change how text is split.
    """

    files = []
    for spec in specs:
        for f in spec.files:
            st = os.stat(f)
            files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return {
        "datasets": [repr(s) for s in specs],
        "files": files,
        "tokenizer_file_sha256": tokenizer_file_sha256,
        "template": template_identity,
        "on_error": cfg.on_error,
        "record_limits": [cfg.max_record_depth, cfg.max_record_bytes],
        "num_partitions": cfg.num_partitions,
        "partition_block": BLOCK,
    }


def _ours(path: Path) -> bool:
    """Whether a directory entry is something preprocess writes."""
    n = path.name
    shard = is_shard_file(n)
    atomic_tmp = temp_target(n) == META_NAME  # megapack.atomic's temporary name
    return n in (META_NAME, META_NAME + ".tmp", WORK_DIR) or shard or atomic_tmp


def _clear_ours(out: Path) -> None:
    (out / META_NAME).unlink(missing_ok=True)  # first: a directory being cleared must stop looking complete
    for entry in out.iterdir():
        if _ours(entry):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def prepare_output(cfg: PreprocessConfig, job: dict) -> bool:
    """Create or check the output directory; returns True when this call created it. Refuses to clobber."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise MegapackError(f"--output-dir {out}: exists and is not a directory")
    created = not out.exists()
    if not created:
        entries = list(out.iterdir())
        job_path = out / WORK_DIR / JOB_FILE
        same_job = job_path.exists() and _read_json(job_path) == job
        if (out / META_NAME).exists() and not cfg.overwrite:
            raise MegapackError(f"--output-dir {out}: already holds finished shards (meta.json); pass --overwrite to replace them")
        if job_path.exists() and not same_job and not cfg.overwrite:
            raise MegapackError(f"--output-dir {out}: holds an unfinished run with other inputs or settings; "
                                "rerun that command to resume it, or pass --overwrite to start over")
        fresh = all(e.name == WORK_DIR for e in entries) and not job_path.exists()  # a parallel task just created it
        if entries and not same_job and not fresh and not cfg.overwrite:
            raise MegapackError(f"--output-dir {out}: not empty; pass --overwrite to replace its contents, or choose an empty directory")
        if cfg.overwrite and not (same_job and not (out / META_NAME).exists()):
            _clear_ours(out)
    try:
        (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / WORK_DIR / f".probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MegapackError(f"--output-dir {out}: not writable ({exc.strerror or exc})") from None
    job_path = out / WORK_DIR / JOB_FILE
    if not job_path.exists():
        write_json_atomic(job_path, job, indent=1)
    return created


def finish_interrupted_cleanup(cfg: PreprocessConfig, job: dict) -> dict | None:
    """meta.json of a finished run of this very job that was killed while removing its work folder, once the removal
    is finished; None otherwise (prepare_output then decides: an empty leftover folder is removed first)."""
    out = Path(cfg.output_dir)
    work = out / WORK_DIR
    if cfg.overwrite or cfg.partition_index is not None or not (out / META_NAME).is_file() or not work.is_dir():
        return None
    if not any(work.iterdir()):  # killed between removing job.json and the folder itself
        work.rmdir()
        return None
    try:
        meta = read_meta(out)
    except MegapackError:
        return None
    if _read_json(work / JOB_FILE) != job:
        return None
    remove_work_dir(work)
    return meta


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole job (or one partition of it) holding the output directory's lock (megapack.dirlock: one
    writer; parallel partition tasks of one job share it); returns meta.json's content (or the partition's stats)."""
    with DirLock(cfg.output_dir, "--output-dir", shared=cfg.partition_index is not None) as lock:
        if lock.warning:
            print(f"warning: {lock.warning}", file=sys.stderr)
        return _run_locked(cfg)


def _run_locked(cfg: PreprocessConfig) -> dict:
    from megapack.data.pipeline.encode import EncodeSpec, load_encoder, tokenize_partition
    from megapack.data.sources.registry import resolve_datasets

    t_start = time.perf_counter()
    validate(cfg)
    specs = resolve_datasets(cfg.inputs, cfg.datasets, cfg.dataset_dir, cfg.format)
    options = {"train_on_prompt": cfg.train_on_prompt, "mask_history": cfg.mask_history, "default_system": cfg.system}
    encode = EncodeSpec(cfg.tokenizer_model, cfg.tokenizer_type, cfg.template, options, cfg.chat_template_from,
                        cfg.template_date)
    tokenizer, template, template_options = load_encoder(encode)
    template_identity = template.identity(template_options)
    dtype = token_dtype(tokenizer.vocab_size)
    job = _fingerprint(cfg, specs, tokenizer.file_sha256, template_identity)
    out = Path(cfg.output_dir)
    work = out / WORK_DIR
    existed = out.exists()
    finished = finish_interrupted_cleanup(cfg, job)
    if finished is not None:
        return finished | {"wall_seconds": time.perf_counter() - t_start}
    try:
        created = prepare_output(cfg, job)
    except OSError as exc:  # e.g. a full disk while writing job.json
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise MegapackError(describe_os_error(exc, work / JOB_FILE, "while creating the output directory")) from None
    at: dict = {}  # what is being written, for an OSError's message
    try:
        wanted = range(cfg.num_partitions) if cfg.partition_index is None else [cfg.partition_index]
        parts: dict[int, dict] = {}
        for i in wanted:
            at = {"path": part_dir(work, i, cfg.num_partitions), "doing": f"while tokenizing partition {i + 1}/"
                  f"{cfg.num_partitions}", "free": free_bytes(out)}
            done = finished_partition(work, i, cfg.num_partitions)
            parts[i] = done or tokenize_partition(
                specs, encode, dtype, work, i, cfg.num_partitions,
                workers=cfg.workers, on_error=cfg.on_error, progress=cfg.progress,
                encoder=(tokenizer, template, template_options),
                limits=ReadLimits(cfg.max_record_depth, cfg.max_record_bytes),
            )
            parts[i]["reused"] = done is not None
        if cfg.partition_index is not None:
            return parts[cfg.partition_index]

        at = {"path": work, "doing": "while reading the tokenized partitions"}
        store = read_partitions(work, cfg.num_partitions, dtype)
        skipped: dict[str, int] = {}
        for p in parts.values():
            for reason, n in p["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        if len(store.lengths) == 0:
            first = next((e for i in sorted(parts) for e in parts[i]["skipped_examples"]), None)
            raise MegapackError(
                f"no conversations left to pack: {sum(p['records'] for p in parts.values())} records read, "
                f"skipped: {json.dumps(skipped) if skipped else 'none'}{f' (first: {first})' if first else ''} (check "
                f"--format and the input files)")
        check_trained_tokens(store, cfg, sum(p["trained_tokens"] for p in parts.values()))
        for entry in out.iterdir():  # leftovers of a killed pack step
            if entry.name != WORK_DIR and _ours(entry):
                entry.unlink()
        info = {
            "num_records": sum(p["records"] for p in parts.values()),
            "skipped": skipped,
            "skipped_examples": [e for p in parts.values() for e in p["skipped_examples"]][:10],
            "tokenizer_identity": tokenizer.identity,
            "tokenizer_model": str(cfg.tokenizer_model),
            "template": {"name": cfg.template, "identity": template_identity, "options": options}
            | ({"chat_template_from": str(getattr(template, "origin", "")), "date": cfg.template_date}
               if cfg.template == "hf" else {}),
            "inputs": [{"name": s.name, "path": str(s.path), "formatting": s.formatting} for s in specs],
            "num_partitions": cfg.num_partitions,
        }
        at = {"path": out, "doing": "while writing the shards", "free": free_bytes(out),
              "needed": shard_bytes(store.lengths, cfg, dtype.itemsize)}
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else tokenizer.eos_id
        factory = None
        if cfg.progress:
            from tqdm import tqdm as factory
        meta = write_shard_dir(
            store, out, seq_length=cfg.seq_length, packing=cfg.packing, seed=cfg.seed,
            pad_to_multiple=cfg.pad_to_multiple, drop_long=cfg.drop_long, val_fraction=cfg.val_fraction,
            vocab_size=tokenizer.vocab_size, pad_id=int(pad_id), info=info,
            max_shard_tokens=cfg.max_shard_tokens, progress_factory=factory,
        )
        del store
        try:
            remove_work_dir(work)
        except OSError:  # the shards are published; a rerun of the same command removes the rest
            pass
        meta["wall_seconds"] = time.perf_counter() - t_start
        meta["reused_partitions"] = sum(p["reused"] for p in parts.values())
        return meta
    except MegapackError:
        # a user error: leave nothing half-written (a killed process keeps its partitions for a rerun)
        if cfg.partition_index is None:
            shutil.rmtree(out, ignore_errors=True) if created else _clear_ours(out)
        else:
            shutil.rmtree(part_dir(work, cfg.partition_index, cfg.num_partitions), ignore_errors=True)
        raise
    except OSError as exc:  # a full disk, a quota, an I/O error: one line, nothing that looks complete
        try:
            kept = _discard_after_os_error(out, created, cfg.partition_index is None, cfg.num_partitions)
        except OSError:  # the file system fails even to list or remove: report the first error
            kept = False
        tail = (f"; the tokenized partitions are kept in {work}: free some space and rerun the same command"
                if kept else "")
        message = describe_os_error(exc, at.get("path", out), at.get("doing", "while preprocessing"),
                                    at.get("needed"), at.get("free"))
        raise MegapackError(message + tail) from None


def _discard_after_os_error(out: Path, created: bool, whole_job: bool, num_parts: int) -> bool:
    """Remove what a failed run wrote except finished partitions; returns whether any partition was kept."""

    if not whole_job:  # one partition of a Slurm array: tokenize_partition removed its temporary folder
        return False
    (out / META_NAME).unlink(missing_ok=True)
    for entry in out.iterdir():
        if entry.name != WORK_DIR and _ours(entry):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    if any(finished_partition(out / WORK_DIR, i, num_parts) for i in range(num_parts)):
        return True
    shutil.rmtree(out, ignore_errors=True) if created else _clear_ours(out)
    return False
