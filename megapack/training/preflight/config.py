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

    hf_dir: str  # HF checkpoint directory: config.json always, weights when init == "hf"
    init: Literal["hf", "megatron", "random"] = "hf"
    megatron_checkpoint: str | None = None  # torch_dist directory when init == "megatron"
    attention_backend: str = "auto"
    cross_sample_attention: bool = False  # ablation: packed samples attend to each other
    # the loss over the vocabulary runs this many tokens at a time and never holds a row's full logits (0: megatron's
    # own loss over the full logits; the same losses and gradients either way)
    loss_chunk_tokens: int = Field(default=DEFAULT_LOSS_CHUNK_TOKENS, ge=0)

    @model_validator(mode="after")
    def _init_source(self) -> "ModelConfig":
        if self.init == "megatron" and not self.megatron_checkpoint:
            raise ValueError("model.megatron_checkpoint: required when model.init is 'megatron'")
        return self


class BlendMember(_Strict):
    """One shard directory of a weighted mixture (`data.blend`)."""

    path: str  # shard directory (made by `megapack preprocess`); its val split validates this member
    weight: float = Field(gt=0)  # share of the trained tokens (weights are normalised to sum to 1)
    name: str | None = None  # in metrics and summary.json; defaults to the directory's name

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("name") is None and isinstance(raw.get("path"), str):
            return dict(raw, name=Path(raw["path"]).name)
        return raw


class DataConfig(_Strict):
    """Shard directories and the sequence layout the run expects them to have."""

    path: str | None = None  # shard directory (made by `megapack preprocess`); or data.blend
    # weighted mixture of shard directories sampled at training time (README "Dataset mixtures"); set it or path
    blend: list[BlendMember] | None = None
    train_split: str = "train"
    valid_path: str | None = None  # defaults to `path`
    valid_split: str | None = "val"  # None: no validation
    # the shards' seq_length (meta.json) is the run's; set this only to plan a run before its shards exist
    # (`megapack plan`), or as a guard that must agree with the shards
    seq_length: int | None = Field(None, gt=0)
    pad_to_multiple: int | None = Field(None, gt=0)  # None: accept what the shards say
    # fast: every shard file there with its recorded size, every index sound (preflight); full: fast + the sha256
    # of every file, hashed across the ranks before the first step; off: no file checks (README "Train")
    verify: Literal["full", "fast", "off"] = "full"

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
    """Model-parallel layout; the data-parallel size is world size / (tp * pp)."""

    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    sequence_parallel: bool = False  # requires tp > 1
    # virtual pipeline stages per pipeline rank (interleaved 1F1B); None: no interleaving. Needs pp > 1 and
    # num_hidden_layers divisible by pp * vpp
    vpp: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _vpp_needs_pp(self) -> "ParallelConfig":
        if self.vpp is not None and self.vpp > 1 and self.pp < 2:
            raise ValueError(f"parallel.vpp: {self.vpp} virtual stages need parallel.pp > 1 (got pp={self.pp})")
        return self


class OptimizerConfig(_Strict):
    """AdamW, gradient clipping and the learning-rate schedule."""

    lr: float = Field(1e-5, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = Field(1.0, ge=0)  # 0 disables clipping
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, le=1)
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"

    @model_validator(mode="after")
    def _one_warmup(self) -> "OptimizerConfig":
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("optimizer.warmup_steps/warmup_ratio: set at most one of them")
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr: {self.min_lr} is larger than optimizer.lr {self.lr}")
        return self


class TrainingConfig(_Strict):
    """Batch sizes, duration, loss reduction, precision and seeds."""

    micro_batch_size: int = Field(1, ge=1)  # packs (or padded conversations) per micro-batch
    global_batch_size: int | None = Field(None, ge=1)  # sequences per optimizer step
    global_batch_tokens: int | None = Field(None, ge=1)  # alternative: tokens per step (multiple of seq_length)
    train_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)  # used when train_steps is not set
    loss_reduction: Literal["token", "sample"] = "token"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # activation recompute: none; selective (megatron-core's core_attn recompute: the attention's inner products);
    # full (each layer's input is kept, the layer is recomputed in backward: uniform method over all layers)
    recompute: Literal["none", "selective", "full"] = "none"
    seed: int = Field(1234, ge=0, lt=2**64)
    # a NaN/inf loss or gradient: stop before the optimizer step (exit 1, no checkpoint of that state), or skip the
    # step's update and go on, stopping after max_nonfinite_skips consecutive skipped steps
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = Field(3, ge=1)
    eval_interval: int | None = Field(None, ge=1)  # steps between validations (also run at the end)
    eval_max_batches: int | None = Field(None, ge=1)  # cap on validation micro-batches per DP rank

    @model_validator(mode="after")
    def _batch(self) -> "TrainingConfig":
        if (self.global_batch_size is None) == (self.global_batch_tokens is None):
            raise ValueError("training.global_batch_size/global_batch_tokens: set exactly one of them")
        return self


class CheckpointConfig(_Strict):
    """Where and how often torch_dist checkpoints are written, and whether to resume."""

    dir: str | None = None
    save_interval: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    # write in a background process per rank while training continues; auto: on GPU (the writer uses idle host
    # cores), not on CPU-only runs (there it competes with training for the cores: tools/bench/bench_checkpoint.py)
    async_save: bool | Literal["auto"] = "auto"
    # dp_reshardable: parallel writes, resume at another DP size; fully_reshardable: resume at any TP/PP/DP
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    resume: Literal["latest", "never"] = "latest"  # latest: continue from dir/latest when it exists
    load: str | None = None  # resume from this checkpoint (iter_ dir or a checkpoint dir) while dir has none
    # resuming with other shards than the checkpoint was trained on is refused; true continues on the new data from
    # its first pack (weights, optimizer and step count kept)
    reset_data_position: bool = False
    # the newest checkpoint is incomplete or corrupt: refuse (one line), or resume from the newest complete older one
    fallback: Literal["refuse", "previous"] = "refuse"
    export_hf: str | None = None  # write HF safetensors here at the end


class LoggingConfig(_Strict):
    """Per-step metrics sinks."""

    dir: str | None = None  # JSONL + TensorBoard + summary JSON; defaults to checkpoint.dir
    interval: int = Field(1, ge=1)
    tensorboard: bool = True
    peak_flops: float | None = Field(None, gt=0)  # per-device peak FLOP/s for MFU; default: bf16 peak of the GPU


class RunConfig(_Strict):
    """The whole run."""

    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = ParallelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    training: TrainingConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

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
