"""The run plan: every check and every `auto` resolved once, before any process group exists.

`preflight(config)` reads the shard metadata (and checks the shard files as `data.verify` says), the model's
config.json and the checkpoint to resume from, checks that they fit together and fit the parallel layout and that
the output directories can be written, and returns a frozen `RunPlan`. The trainer is built from the
plan alone (plus the config's plain values); `megapack train --check` prints it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict

from megapack.atomic import write_text_atomic
from megapack.errors import MegapackError
from megapack.training.preflight.config import RunConfig
from megapack.training.preflight.identity import data_identity, export_tokenizer, same_tokenizer, tokenizer_identity

# the shards' pad_id fills every padding position the trainer adds (padding arm, sequence-parallel row rounding)
DEFAULT_PAD_ID = 0


class RunPlan(BaseModel):
    """What a run will actually do: layout, resolved choices, and the inputs they were derived from."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    world_size: int
    tp: int
    pp: int
    dp: int
    cp: int = 1  # context parallel: each row's segments padded to 2*cp and spread over cp ranks (CONTEXT_PARALLEL.md)
    micro_batch_size: int  # packs (padding arm: conversations) per micro-batch, on every DP rank
    global_batch_size: int  # packs per optimizer step
    num_microbatches: int  # micro-batches per step on each DP rank
    seq_length: int  # tokens per pack, as the shards were made (meta.json)
    row_length: int  # tokens in one THD micro-batch row at most (micro_batch_size packs of seq_length)
    packing: str
    padded: bool  # the padding arm: one conversation per pack, padded to the longest of the micro-batch
    pad_id: int
    row_multiple: int  # THD rows are padded to a multiple of this (TP with sequence parallelism, times 2*cp)
    precision: Literal["bf16", "fp32"]
    attention_backend: str
    async_save: bool
    peak_flops: float | None
    total_steps: int
    train_packs: int
    tokenizer_identity: str | None
    data_identity: dict  # what the packs are: digest of the shard checksums, packing, seq_length
    blend: list[dict] = []  # data.blend members: name, path, weight (normalised), train_packs; [] without a blend
    resume_from: str | None
    resume_step: int  # the step the resumed checkpoint was taken after (0 without one)
    reset_data_position: bool  # resume with the data position at the first pack (checkpoint.reset_data_position)
    # what this start changes against the resumed checkpoint, {key: [saved, new]}; applied from resume_step + 1
    resume_changes: dict[str, list] = {}
    hf_config: dict
    shard_meta: dict
    verify: Literal["full", "fast", "off"] = "off"  # data.verify; fast's checks already passed in preflight
    checksums: list[tuple[str, str, str]] = []  # (config key, file, sha256) that `full` hashes before step 1
    warnings: list[str] = []  # things the run will not do that a user may expect (printed at start, by --check)

    def summary(self) -> dict:
        """The plan without the bulky inputs (for logs, --check and config.yaml)."""
        return self.model_dump(exclude={"hf_config", "shard_meta", "checksums", "warnings"})


def _check_same_data(config: RunConfig, resume: Path, checkpoint_meta: dict, identity: dict) -> None:
    saved = checkpoint_meta.get("data_identity")
    if saved is None or saved == identity or config.checkpoint.reset_data_position:
        return  # checkpoints written before data identities were recorded are not compared
    differs = ", ".join(f"{k} {saved.get(k)!r} -> {identity[k]!r}" for k in identity if saved.get(k) != identity[k])
    if config.data.blend:
        from megapack.training.preflight.blend_members import identity_change

        raise MegapackError(f"data.blend: {resume} was trained on other data ({identity_change(saved, identity)}); "
                            f"blend the same shard directories in the same order (weights may change), or set "
                            f"checkpoint.reset_data_position=true to start the new mixture from its first packs")
    raise MegapackError(f"data.path: {config.data.path} holds other packs than {resume} was trained on ({differs}); "
                        f"point data.path at those shards, or set checkpoint.reset_data_position=true to continue "
                        f"on the new data from its first pack")


def world_size_from_env() -> int:
    """The launcher's world size (torchrun's WORLD_SIZE, Slurm's SLURM_NTASKS), else 1."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def batch_layout(config: RunConfig, world_size: int, seq_length: int) -> tuple[int, int, int]:
    """(dp, global batch in packs, micro-batches per step) or a one-line error naming the key."""
    par, tr = config.parallel, config.training
    if world_size % (par.tp * par.cp * par.pp):
        raise MegapackError(f"parallel.tp/parallel.cp/parallel.pp: world size {world_size} is not divisible by "
                            f"tp*cp*pp = {par.tp * par.cp * par.pp}")
    dp = world_size // (par.tp * par.cp * par.pp)
    if tr.global_batch_tokens is not None:
        if tr.global_batch_tokens % seq_length:
            raise MegapackError(f"training.global_batch_tokens: {tr.global_batch_tokens} is not a multiple of "
                                f"the shards' seq_length {seq_length}")
        gbs = tr.global_batch_tokens // seq_length
    else:
        gbs = tr.global_batch_size
    per_step = tr.micro_batch_size * dp
    if gbs % per_step:
        raise MegapackError(f"training.global_batch_size: {gbs} is not divisible by micro_batch_size*dp = "
                            f"{tr.micro_batch_size}*{dp}")
    return dp, gbs, gbs // per_step


def shard_seq_length(config: RunConfig, meta: dict | None) -> int:
    """The run's seq_length: what the shards were made with (meta.json). `data.seq_length` is needed only to plan a
    run whose shards do not exist yet (`megapack plan`); set with shards, it must agree with them."""
    data = config.data
    where = data.path or "the data.blend members"
    if meta is None or "seq_length" not in meta:
        if data.seq_length is None:
            raise MegapackError(f"data.seq_length: the shards in {where} are not there to say it; set data.seq_length "
                                f"to plan a run before preprocessing")
        return data.seq_length
    seq = int(meta["seq_length"])
    if data.seq_length is not None and data.seq_length != seq:
        raise MegapackError(f"data.seq_length: run uses {data.seq_length} but shards in {where} were made with "
                            f"{seq}; drop data.seq_length (the shards' value is used)")
    return seq


def planned_seq_length(config: RunConfig) -> int:
    """The seq_length a run of this config will have: its shards' when they exist, else data.seq_length."""
    from megapack.data.packs.shards import read_meta

    data = config.data
    folder = Path(data.path if data.path else data.blend[0].path)
    return shard_seq_length(config, read_meta(folder) if (folder / "meta.json").is_file() else None)


def _check_pad_multiple(config: RunConfig, meta: dict) -> None:
    data = config.data
    meta_pad = meta.get("pad_to_multiple")
    if data.pad_to_multiple is not None and meta_pad is not None and int(meta_pad) != data.pad_to_multiple:
        raise MegapackError(f"data.pad_to_multiple: run uses {data.pad_to_multiple} but shards in {data.path} were "
                            f"made with {meta_pad}")


def _check_tokenizer(config: RunConfig, shard_tok: str | None, checkpoint_meta: dict | None) -> None:
    if checkpoint_meta is None:
        return
    ckpt_tok = tokenizer_identity(checkpoint_meta)
    if same_tokenizer(ckpt_tok, shard_tok) is False:
        where = f"data.path: tokenizer identity {shard_tok} of the shards in {config.data.path}" if config.data.path \
            else f"data.blend: tokenizer identity {shard_tok} of the blend members"
        raise MegapackError(f"{where} differs from the checkpoint's {ckpt_tok}")


def _check_virtual_stages(config: RunConfig, hf_config: dict, num_microbatches: int, padded: bool,
                          seq: int) -> None:
    """Interleaved 1F1B needs pp*vpp equal model chunks and whole groups of pp micro-batches (megatron's rules), and
    rows that fit the fixed size its stages send (seq_length * micro_batch_size)."""
    from megapack.data.packs.padding import PADDED_ARM_MULTIPLE

    par, vpp = config.parallel, config.parallel.vpp or 1
    if vpp == 1:
        return
    if padded and seq % PADDED_ARM_MULTIPLE:
        raise MegapackError(f"parallel.vpp: padding shards are padded to multiples of {PADDED_ARM_MULTIPLE}, which "
                            f"the shards' seq_length {seq} is not; rows would outgrow the fixed size interleaving sends")
    if par.sequence_parallel and (seq * config.training.micro_batch_size) % par.tp:
        raise MegapackError(f"parallel.vpp: with sequence_parallel, seq_length * training.micro_batch_size "
                            f"({seq * config.training.micro_batch_size}) must be a multiple of parallel.tp {par.tp}")
    layers = int(hf_config["num_hidden_layers"])
    if layers % (par.pp * vpp):
        raise MegapackError(f"parallel.vpp: num_hidden_layers {layers} (config.json in {config.model.hf_dir}) is not "
                            f"divisible by pp*vpp = {par.pp}*{vpp}")
    if num_microbatches % par.pp:
        raise MegapackError(f"parallel.vpp: interleaving needs the micro-batches per step on each DP rank "
                            f"({num_microbatches}: training.global_batch_size / (micro_batch_size*dp)) to be a "
                            f"multiple of parallel.pp {par.pp}")


def _check_balance(config: RunConfig, packing: str) -> None:
    """training.balance: the padding arm keeps its micro-batches (their padding is the arm); re-packing segments
    needs whole conversations in isolated segments of one shard directory."""
    balance = config.training.balance
    if balance != "none" and packing == "padding":
        raise MegapackError(f"training.balance: {balance} would regroup the padding arm's conversations, whose "
                            f"micro-batch padding is what the arm measures; use none with padding shards")
    if balance != "segments":
        return
    for problem, present in (("random packing cuts rows to the token (nothing can move)", packing == "random"),
                             ("data.blend tags whole packs with their member", bool(config.data.blend)),
                             ("model.cross_sample_attention lets a pack's conversations see each other",
                              config.model.cross_sample_attention)):
        if present:
            raise MegapackError(f"training.balance: segments is not available here: {problem}; use packs")


def _total_steps(config: RunConfig, train_packs: int, global_batch_size: int) -> int:
    if config.training.train_steps is not None:
        return config.training.train_steps
    return max(1, math.ceil((config.training.epochs or 1.0) * train_packs / global_batch_size))


def _resume_point(config: RunConfig) -> Path | None:
    from megapack.training.preflight.resume import checkpoint_problem, resume_checkpoint

    ck = config.checkpoint
    resume = resume_checkpoint(ck.dir, ck.fallback) if ck.dir and ck.resume == "latest" else None
    if resume is None and ck.load:
        load = Path(ck.load)
        if load.name.startswith("iter_"):
            problem = checkpoint_problem(load)
            if problem is not None:
                raise MegapackError(f"checkpoint.load: {load} is incomplete ({problem})")
            return load
        resume = resume_checkpoint(load, ck.fallback, key="checkpoint.load")
        if resume is None:
            raise MegapackError(f"checkpoint.load: no complete checkpoint in {ck.load}")
    return resume


def preflight(config: RunConfig, world_size: int | None = None, *, cuda: bool | None = None) -> RunPlan:
    """Check shards, model, checkpoint and layout against each other and resolve every `auto` into a RunPlan."""
    import torch

    from megapack.data.packs.shards import read_meta
    from megapack.model.config import check_parallel_sizes, load_hf_config
    from megapack.model.spec import resolve_attention_backend
    from megapack.model.checkpoint import read_metadata as read_checkpoint_meta
    from megapack.training.preflight.inputs import check_outputs, check_token_range, shard_sets, verify_shards
    from megapack.training.preflight.layout_rules import context_parallel_rules
    from megapack.training.preflight.resume import check_resume_layout, checkpoint_problem, resume_changes
    from megapack.model.flops import device_peak_flops

    cuda = torch.cuda.is_available() if cuda is None else cuda
    world_size = world_size or world_size_from_env()
    par, tr = config.parallel, config.training
    if config.data.blend:
        from megapack.training.preflight.blend_members import blend_preflight

        meta, sets, identity, blend = blend_preflight(config)
    else:
        meta, blend = read_meta(config.data.path), []
        _check_pad_multiple(config, meta)
        sets = shard_sets(config, meta)
        identity = data_identity(meta)
    checksums = verify_shards(sets, config.data.verify)
    warnings = check_outputs(config)
    resume = _resume_point(config)
    ckpt_meta = None
    if resume is not None:
        ckpt_meta = read_checkpoint_meta(resume)
        check_resume_layout(resume, ckpt_meta, par.tp, par.pp, par.vpp or 1)
        _check_same_data(config, resume, ckpt_meta, identity)
    elif config.model.init == "megatron":
        ckpt_meta = read_checkpoint_meta(config.model.megatron_checkpoint)
        problem = checkpoint_problem(config.model.megatron_checkpoint)
        if problem is not None:
            raise MegapackError(f"model.megatron_checkpoint: {config.model.megatron_checkpoint} is incomplete "
                                f"({problem})")
    seq = shard_seq_length(config, meta)
    context_parallel_rules(config, seq, world_size, meta.get("pad_to_multiple"))  # one line naming parallel.cp
    dp, gbs, num_micro = batch_layout(config, world_size, seq)
    if par.sequence_parallel and par.tp == 1:
        raise MegapackError("parallel.sequence_parallel: needs parallel.tp > 1")
    hf_config = load_hf_config(config.model.hf_dir)
    check_parallel_sizes(hf_config, par.tp, par.pp, seq)
    _check_virtual_stages(config, hf_config, num_micro, meta.get("packing") == "padding", seq)
    _check_balance(config, str(meta.get("packing")))
    warnings += check_token_range(sets, int(hf_config["vocab_size"]), config.model.hf_dir)
    shard_tok = tokenizer_identity(meta)
    _check_tokenizer(config, shard_tok, ckpt_meta)
    if config.checkpoint.export_hf:  # the export at the end needs a complete tokenizer: refused now, not then
        export_tokenizer(config.model.hf_dir, meta)

    train_packs = int(meta["splits"][config.data.train_split]["num_packs"]) \
        if config.data.train_split in meta.get("splits", {}) else int(meta.get("num_packs", 0))
    if blend:  # one epoch of a blend: every member's train packs
        train_packs = sum(m["train_packs"] for m in blend)
    precision = tr.precision if tr.precision != "auto" else ("bf16" if cuda else "fp32")
    async_save = config.checkpoint.async_save if config.checkpoint.async_save != "auto" else cuda
    device_name = torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else None
    total_steps = _total_steps(config, train_packs, gbs)
    return RunPlan(
        world_size=world_size, tp=par.tp, pp=par.pp, dp=dp, cp=par.cp, micro_batch_size=tr.micro_batch_size,
        global_batch_size=gbs, num_microbatches=num_micro, seq_length=seq, row_length=seq * tr.micro_batch_size,
        packing=str(meta.get("packing", "unknown")), padded=meta.get("packing") == "padding",
        pad_id=int(meta.get("pad_id", DEFAULT_PAD_ID)),
        # interleaved pipelines send fixed-size rows (see loop.build_model_and_optimizer): pad each to the longest
        row_multiple=seq * tr.micro_batch_size if (par.vpp or 1) > 1
        else (par.tp if par.sequence_parallel else 1) * (2 * par.cp if par.cp > 1 else 1),
        precision=precision,
        attention_backend=resolve_attention_backend(config.model.attention_backend,
                                                    config.model.cross_sample_attention, precision == "bf16",
                                                    par.cp),
        async_save=bool(async_save), peak_flops=config.logging.peak_flops or device_peak_flops(device_name),
        total_steps=total_steps, train_packs=train_packs,
        tokenizer_identity=shard_tok, data_identity=identity, blend=blend,
        resume_from=str(resume) if resume is not None else None,
        resume_step=int(ckpt_meta.get("iteration") or 0) if resume is not None else 0,
        reset_data_position=resume is not None and config.checkpoint.reset_data_position,
        resume_changes=resume_changes(config, resume, ckpt_meta, total_steps) if resume is not None else {},
        hf_config=hf_config, shard_meta=meta, verify=config.data.verify, checksums=checksums, warnings=warnings,
    )


def resolved_config(config: RunConfig, plan: RunPlan) -> dict:
    """The config as it ran: every `auto` replaced by the plan's choice, the derived layout under `derived`."""
    data = config.to_dict()
    data["training"]["precision"] = plan.precision
    data["model"]["attention_backend"] = plan.attention_backend
    data["checkpoint"]["async_save"] = plan.async_save
    data["derived"] = {k: v for k, v in plan.summary().items()
                       if k not in ("precision", "attention_backend", "async_save", "verify")}
    return data


def save_resolved_config(config: RunConfig, plan: RunPlan, directory: str | os.PathLike) -> Path:
    """Write the resolved config (see `resolved_config`) as directory/config.yaml, atomically."""
    target = Path(directory) / "config.yaml"
    write_text_atomic(target, yaml.safe_dump(resolved_config(config, plan), sort_keys=False))
    return target
