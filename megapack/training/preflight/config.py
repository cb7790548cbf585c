"""Typed training configuration: YAML file + dotted `key.sub=value` overrides, validated before any process group."""
from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megapack.errors import MegapackError
from megapack.model.config import DEFAULT_LOSS_CHUNK_TOKENS


class _Strict(BaseModel):
    """Base: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Strict):
    """Which model to train and where its starting weights come from."""

    hf_dir: str = Field(description="local Hugging Face model folder: its config.json always, its weights when "
                                    "init is hf")
    init: Literal["hf", "megatron", "random"] = Field("hf", description="starting weights: hf (hf_dir's "
                                                      "safetensors), megatron (megatron_checkpoint) or random")
    megatron_checkpoint: str | None = Field(None, description="torch_dist checkpoint folder when init is megatron")
    attention_backend: str = Field("auto", description="te, flash, torch_varlen, sdpa, or auto (the first available)")
    cross_sample_attention: bool = Field(False, description="ablation: packed conversations attend to each other")
    loss_chunk_tokens: int = Field(DEFAULT_LOSS_CHUNK_TOKENS, ge=0, description=(
        "the loss over the vocabulary runs this many tokens at a time and never holds a row's full logits (0, or a "
        "row no longer than this: megatron's own loss over the full logits; the same losses and gradients either way)"))

    @model_validator(mode="after")
    def _init_source(self) -> "ModelConfig":
        if self.init == "megatron" and not self.megatron_checkpoint:
            raise ValueError("model.megatron_checkpoint: required when model.init is 'megatron'")
        return self


class BlendMember(_Strict):
    """One shard directory of a weighted mixture (`data.blend`)."""

    path: str = Field(description="shard folder (a `megapack preprocess` output); its val split validates it")
    weight: float = Field(gt=0, description="share of the trained tokens (weights are normalised to sum to 1)")
    name: str | None = Field(None, description="its name in metrics and summary.json; default: the folder's name")

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("name") is None and isinstance(raw.get("path"), str):
            return dict(raw, name=Path(raw["path"]).name)
        return raw


class DataConfig(_Strict):
    """Shard directories and the sequence layout the run expects them to have."""

    path: str | None = Field(None, description="shard folder (a `megapack preprocess` output); set it or blend")
    blend: list[BlendMember] | None = Field(None, description=(
        "weighted mixture of shard folders sampled at training time, a list of {path, weight, name}; set it or path"))
    train_split: str = Field("train", description="the shards' split to train on")
    valid_path: str | None = Field(None, description="shard folder to validate on; default: path")
    valid_split: str | None = Field("val", description="the split to validate on; null: no validation")
    seq_length: int | None = Field(None, gt=0, description=(
        "the shards' seq_length (meta.json) is the run's; set this only to plan a run before its shards exist "
        "(`megapack plan`), or as a guard that must agree with the shards"))
    pad_to_multiple: int | None = Field(None, gt=0, description="a guard the shards must agree with; null: accept "
                                                                "what the shards say")
    verify: Literal["full", "fast", "off"] = Field("full", description=(
        "fast: every shard file there with its recorded size, every index sound (preflight); full: fast + the sha256 "
        "of every file, hashed across the ranks before the first step; off: no file checks"))

    @field_validator("verify", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _path_or_blend(self) -> "DataConfig":
        if (self.path is None) == (self.blend is None):
            raise ValueError("data.path/data.blend: set exactly one of them")
        if self.blend is not None:
            if not self.blend:
                raise ValueError("data.blend: expected at least one {path, weight} member")
            names = [m.name for m in self.blend]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"data.blend: member name {twice[0]!r} is used twice; give the members distinct "
                                 f"`name`s")
            if self.valid_path is not None:
                raise ValueError("data.valid_path: not used with data.blend (each member validates on its own "
                                 "data.valid_split)")
        return self


class ParallelConfig(_Strict):
    """Model-parallel layout; the data-parallel size is world size / (tp * cp * pp)."""

    tp: int = Field(1, ge=1, description="tensor-parallel size (divides the attention and key/value heads)")
    pp: int = Field(1, ge=1, description="pipeline-parallel size (divides the layers)")
    cp: int = Field(1, ge=1, description=(
        "context-parallel size: each pack's segments are cut into 2*cp chunks spread over cp ranks, which all-gather "
        "keys and values"))
    sequence_parallel: bool = Field(False, description="megatron's sequence parallelism; needs tp > 1")
    vpp: int | None = Field(None, ge=1, description=(
        "virtual pipeline stages per pipeline rank (interleaved 1F1B); null: no interleaving. Needs pp > 1 and "
        "num_hidden_layers divisible by pp * vpp"))

    @model_validator(mode="after")
    def _vpp_needs_pp(self) -> "ParallelConfig":
        if self.vpp is not None and self.vpp > 1 and self.pp < 2:
            raise ValueError(f"parallel.vpp: {self.vpp} virtual stages need parallel.pp > 1 (got pp={self.pp})")
        return self


class OptimizerConfig(_Strict):
    """AdamW, gradient clipping and the learning-rate schedule."""

    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    min_lr: float = Field(0.0, ge=0, description="learning rate the decay ends at")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    beta1: float = Field(0.9, description="AdamW beta1")
    beta2: float = Field(0.95, description="AdamW beta2")
    eps: float = Field(1e-8, description="AdamW epsilon")
    clip_grad: float = Field(1.0, ge=0, description="gradient-norm clipping threshold; 0 disables clipping")
    warmup_steps: int | None = Field(None, ge=0, description=(
        "W warmup steps: step k uses lr*k/(W+1), so the first step already trains; set it or warmup_ratio"))
    warmup_ratio: float | None = Field(None, ge=0, le=1, description="warmup as a share of the run's steps")
    decay_style: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after the warmup, "
                                                                                       "from lr to min_lr")

    @model_validator(mode="after")
    def _one_warmup(self) -> "OptimizerConfig":
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("optimizer.warmup_steps/warmup_ratio: set at most one of them")
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr: {self.min_lr} is larger than optimizer.lr {self.lr}")
        return self


class TrainingConfig(_Strict):
    """Batch sizes, duration, loss reduction, precision and seeds."""

    micro_batch_size: int = Field(1, ge=1, description="packs (padding arm: conversations) per micro-batch")
    global_batch_size: int | None = Field(None, ge=1, description=(
        "sequences (packs, or conversations in the padding arm) per optimizer step; set it or global_batch_tokens"))
    global_batch_tokens: int | None = Field(None, ge=1, description="tokens per optimizer step (a multiple of "
                                                                    "seq_length)")
    train_steps: int | None = Field(None, ge=1, description="optimizer steps; set it or epochs")
    epochs: float | None = Field(None, gt=0, description="passes over the train split when train_steps is not set "
                                                         "(neither: one epoch)")
    loss_reduction: Literal["token", "sample"] = Field("token", description=(
        "token: every trained token weighs the same; sample: every conversation weighs the same"))
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    recompute: Literal["none", "selective", "full"] = Field("none", description=(
        "activation recompute: none; selective (the attention's inner products); full (each layer is recomputed "
        "in backward from its kept input)"))
    seed: int = Field(1234, ge=0, lt=2**64, description="the seed every random stream of the run derives from")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description=(
        "a NaN/inf loss or gradient: stop before the optimizer step (exit 1, no checkpoint of that state), or skip "
        "the step's update and go on"))
    max_nonfinite_skips: int = Field(3, ge=1, description="with on_nonfinite skip: stop after this many "
                                                          "consecutive skipped steps")
    balance: Literal["none", "packs", "segments"] = Field("none", description=(
        "which DP rank and micro-batch trains which pack of a global batch: none (in order); packs (whole packs by "
        "attention cost, a*len + b*len^2 per segment); segments (the global batch's segments re-packed by cost into "
        "the ranks' rows; not with padding or random shards, data.blend or cross_sample_attention). The global "
        "batch and the losses stay the same; metrics.jsonl logs dp_cost_max_mean either way"))
    eval_interval: int | None = Field(None, ge=1, description="steps between validations (also run at the end)")
    eval_at_start: bool = Field(False, description=(
        "also validate before the first step (step 0 in metrics.jsonl: the starting model's validation loss, the "
        "baseline a fine-tuning curve is read against); not on a resumed run"))
    eval_max_batches: int | None = Field(None, ge=1, description="cap on validation micro-batches per DP rank")

    @model_validator(mode="after")
    def _batch(self) -> "TrainingConfig":
        if (self.global_batch_size is None) == (self.global_batch_tokens is None):
            raise ValueError("training.global_batch_size/global_batch_tokens: set exactly one of them")
        return self


class CheckpointConfig(_Strict):
    """Where and how often torch_dist checkpoints are written, and whether to resume."""

    dir: str | None = Field(None, description="checkpoint folder (iter_XXXXXXX folders and `latest`); null: none")
    save_interval: int | None = Field(None, ge=1, description="steps between checkpoints (also one at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are removed")
    async_save: bool | Literal["auto"] = Field("auto", description=(
        "write in a background process per rank while training continues; auto: on GPU, off on CPU-only runs "
        "(there it competes with training for the cores)"))
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = Field("dp_reshardable", description=(
        "dp_reshardable: parallel writes, resume at another DP size; fully_reshardable: resume at any TP/PP/DP"))
    resume: Literal["latest", "never"] = Field("latest", description="latest: continue from dir/latest when it "
                                                                     "exists; never: always start fresh")
    load: str | None = Field(None, description="resume from this checkpoint (an iter_ folder or a checkpoint "
                                               "folder) while dir has none")
    reset_data_position: bool = Field(False, description=(
        "resuming on other shards than the checkpoint's is refused; true continues on the new data from its first "
        "pack (weights, optimizer and step count kept)"))
    fallback: Literal["refuse", "previous"] = Field("refuse", description=(
        "the newest checkpoint is incomplete or corrupt: refuse (one line), or resume from the newest complete one"))
    export_hf: str | None = Field(None, description="write a Hugging Face folder (safetensors) here at the end")


class WandbConfig(_Strict):
    """Weights & Biases: rank 0 logs what metrics.jsonl holds and the resolved config (`pip install megapack[wandb]`)."""

    project: str = Field(min_length=1, description="the W&B project the run is logged to")
    entity: str | None = Field(None, description="the W&B team or user; default: your W&B default entity")
    name: str | None = Field(None, description="the run's name in W&B; default: the logging directory's name")
    mode: Literal["online", "offline", "disabled"] | None = Field(None, description=(
        "online (needs `wandb login`), offline (files under WANDB_DIR, else the logging directory; `wandb sync` "
        "uploads them) or disabled; default: WANDB_MODE, else online"))


class LoggingConfig(_Strict):
    """Per-step metrics sinks."""

    dir: str | None = Field(None, description="metrics.jsonl, TensorBoard and summary.json; default: checkpoint.dir")
    interval: int = Field(1, ge=1, description="steps between logged steps (the last one is always logged)")
    tensorboard: bool = Field(True, description="also write TensorBoard event files")
    peak_flops: float | None = Field(None, gt=0, description="per-device peak FLOP/s for MFU; default: the GPU's "
                                                             "bf16 peak by name")
    wandb: WandbConfig | None = Field(None, description="also log to Weights & Biases ({project, entity, name, "
                                                        "mode}); null: off")


class RunConfig(_Strict):
    """The whole run: one section per concern."""

    model: ModelConfig = Field(description="which model to train and where its starting weights come from")
    data: DataConfig = Field(description="the shards to train and validate on")
    parallel: ParallelConfig = Field(ParallelConfig(), description="the model-parallel layout")
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="AdamW and the learning-rate schedule")
    training: TrainingConfig = Field(description="batch sizes, duration, loss, precision, seeds, validation")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="checkpoints, resume and the HF export")
    logging: LoggingConfig = Field(LoggingConfig(), description="where and how often metrics are written")

    def to_dict(self) -> dict:
        """Plain dict (YAML/JSON serialisable)."""
        return self.model_dump(mode="json")


def _parse_value(text: str) -> Any:
    """YAML scalar parsing for override values (`3` -> int, `1e-5` -> float, `null` -> None, `[1,2]` -> list)."""
    value = yaml.safe_load(text) if text != "" else ""
    # YAML 1.1 reads "1e-5" as a string; accept it as a float the way a user means it
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a nested dict (a missing section is created; validation comes later)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise MegapackError(f"override {item!r}: expected key.sub=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MegapackError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return raw


def _known_keys(loc: tuple) -> list[str]:
    """The keys a config may have at `loc` (a pydantic error location without its last part); [] when unknown."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue  # a list member (data.blend.0): its model is the list's item type
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        todo, model = [field.annotation], None
        while todo and model is None:  # the model class inside `X | None`, `list[X] | None`
            kind = todo.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                model = kind
            else:
                todo.extend(typing.get_args(kind))
        if model is None:
            return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _override_at(loc: tuple, kind: str, overrides: list[str]) -> str | None:
    """The command-line override an error at `loc` comes from (the last that set that key, a key inside it, or, for
    an unknown key, a key under it), else None: the file is to blame."""
    where = [str(p) for p in loc]
    for item in reversed(overrides):
        keys = item.partition("=")[0].split(".")
        if where[:len(keys)] == keys or (kind == "extra_forbidden" and keys[:len(where)] == where):
            return item
    return None


def _format_error(err: ValidationError, source: str, overrides: list[str] = ()) -> str:
    errors = err.errors()
    # an unknown key first: a misspelt section also makes the real one "Field required"
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
        parent, key = first["loc"][:-1], str(first["loc"][-1])
        close = difflib.get_close_matches(key, _known_keys(parent), n=1)
        if close:
            msg += f" (did you mean {'.'.join([*map(str, parent), close[0]])!r}?)"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    msg = msg.removeprefix("Value error, ")
    if loc and msg.startswith(loc + "."):  # a section validator already names its key
        loc = ""
    override = _override_at(first["loc"], first["type"], list(overrides)) if loc else None
    if override is not None:
        return f"command line: {override}: {msg}"
    return f"{source}: {loc + ': ' if loc else ''}{msg}"


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), *, raw: dict | None = None) -> RunConfig:
    """Read a YAML config (or a dict), apply overrides, validate; errors are one-line MegapackErrors."""
    source = str(path) if path is not None else "config"
    if raw is None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise MegapackError(f"{source}: config file not found") from None
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise MegapackError(f"{source}:{where} invalid YAML") from None
    if not isinstance(raw, dict):
        raise MegapackError(f"{source}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, list(overrides))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise MegapackError(_format_error(err, source, list(overrides))) from None
