"""The config reference, generated from the pydantic models of config.py: a markdown page (megapack/training/CONFIG.md)
and the default YAML `megapack train --print-defaults` prints. Regenerate the page with
`python -m megapack.training.preflight.reference` (tests/test_config_reference.py checks it is current)."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from megapack.training.preflight.config import BlendMember, RunConfig, WandbConfig

PAGE = "megapack/training/CONFIG.md"
# keys without a default of their own that a run needs (one of a pair): the value --print-defaults shows instead
EXAMPLES = {("data", "path"): "shards/alpaca-4k", ("training", "global_batch_size"): 64}
REQUIRED_NOTE = {("data", "path"): "required: it or data.blend", ("data", "blend"): "instead of data.path",
                 ("training", "global_batch_size"): "required: it or global_batch_tokens",
                 ("training", "global_batch_tokens"): "instead of global_batch_size"}


def _type_name(kind: Any) -> str:
    """A field's type as the reference writes it: `a` or `b` for choices, `X or null`, list of {keys}."""
    if typing.get_origin(kind) is Literal:
        return " or ".join(f"`{v}`" for v in typing.get_args(kind))
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return "{" + ", ".join(kind.model_fields) + "}"
    if typing.get_origin(kind) is list:
        return "list of " + _type_name(typing.get_args(kind)[0])
    args = typing.get_args(kind)
    if args:  # a union: `X | None`, `bool | Literal["auto"]`
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    return getattr(kind, "__name__", str(kind))


def _scalar(value: Any) -> str:
    """A value as YAML writes it (floats keep a dot and a signed exponent, so YAML 1.1 reads them back as floats)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _default(section: str, key: str, field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    note = REQUIRED_NOTE.get((section, key))
    return f"{_scalar(field.default)} ({note})" if note else _scalar(field.default)


def sections() -> dict[str, type[BaseModel]]:
    """Section name -> its *Config class, in RunConfig's order."""
    return {name: field.annotation for name, field in RunConfig.model_fields.items()}


def _table(prefix: str, model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, field in model.model_fields.items():
        cells = [f"`{prefix}.{key}`", _type_name(field.annotation), f"`{_default(prefix, key, field)}`",
                 field.description or ""]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def reference_markdown() -> str:
    """The whole page: one table per section (key, type, default, meaning), one for data.blend's members, one for
    logging.wandb's keys."""
    lines = ["# Config reference", "",
             "Every key of a run config (`megapack train --config run.yaml`), generated from the pydantic models in",
             "`megapack/training/preflight/config.py` by `python -m megapack.training.preflight.reference`. A run is",
             "one YAML file plus `key.sub=value` overrides; unknown keys and wrong types are refused in one line.",
             "`megapack train --print-defaults` prints every key at its default as YAML.", ""]
    for name, model in sections().items():
        lines += [f"## `{name}`", "", (model.__doc__ or "").strip(), "", *_table(name, model), ""]
        if name == "data":
            lines += ["Each member of `data.blend` (`- {path: shards/a, weight: 0.7}`):", "",
                      *_table("data.blend[]", BlendMember), ""]
        if name == "logging":
            lines += ["`logging.wandb` (`{project: my-project, mode: offline}`):", "",
                      *_table("logging.wandb", WandbConfig), ""]
    return "\n".join(lines)


def default_yaml() -> str:
    """Every key at its default as a commented YAML config; a required key without a default is null or an example."""
    lines = ["# megapack run config: every key at its default (`megapack train --print-defaults`); meanings and types:",
             f"# {PAGE}. model.hf_dir has no default; data.path and training.global_batch_size show examples."]
    for name, model in sections().items():
        lines.append(f"{name}:")
        for key, field in model.model_fields.items():
            value = EXAMPLES.get((name, key), None if field.is_required() else field.default)
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            note = "required; " if field.is_required() else "example; " if (name, key) in EXAMPLES else ""
            lines.append(f"  {key}: {_scalar(value)}  # {note}{field.description}")
    return "\n".join(lines) + "\n"


def write_reference(root: str | Path = ".") -> Path:
    """Write the page under the checkout `root`; returns its path."""
    path = Path(root) / PAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reference_markdown(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_reference())
