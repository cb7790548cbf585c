"""The config reference (megapack/training/CONFIG.md) and `megapack train --print-defaults` come from the pydantic models
of megapack/training/preflight/config.py: every key has a type, a default and a description, the committed page is
what the models generate, and the printed defaults load back as a config."""
from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from megapack.training.preflight.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "megapack" / "training" / "CONFIG.md"


def _sections() -> dict[str, type[BaseModel]]:
    found = {}
    for name, field in RunConfig.model_fields.items():
        todo = [field.annotation]
        while todo:
            kind = todo.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found[name] = kind
            todo.extend(typing.get_args(kind))
    return found


def test_every_key_has_a_description():
    from megapack.training.preflight.config import BlendMember, WandbConfig

    for name, model in [*_sections().items(), ("data.blend[]", BlendMember), ("logging.wandb", WandbConfig)]:
        assert model.__doc__ and model.__doc__.strip(), name
        for key, field in model.model_fields.items():
            assert field.description and len(field.description) > 8, f"{name}.{key} has no description"


def test_reference_page_is_generated_from_the_models():
    from megapack.training.preflight.reference import reference_markdown

    assert PAGE.is_file(), "megapack/training/CONFIG.md is missing: write reference_markdown() to it"
    assert PAGE.read_text(encoding="utf-8") == reference_markdown(), (
        "megapack/training/CONFIG.md is stale: regenerate it with python -c \"from megapack.training.preflight."
        "reference import write_reference; write_reference()\"")
    text = PAGE.read_text(encoding="utf-8")
    for section, model in _sections().items():
        for key in model.model_fields:
            assert f"`{section}.{key}`" in text, f"{section}.{key} is not in the reference"


def test_print_defaults_loads_back_as_a_config():
    out = subprocess.run([sys.executable, "-m", "megapack", "train", "--print-defaults"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    raw = yaml.safe_load(out.stdout)
    assert raw["model"]["hf_dir"] is None  # required: no default
    raw["model"]["hf_dir"] = "/models/Meta-Llama-3-8B"
    config = load_config(None, [], raw=raw)
    for section, model in _sections().items():
        defaults = {k: f.default for k, f in model.model_fields.items() if not f.is_required()}
        got = getattr(config, section)
        for key, default in defaults.items():
            if (section, key) not in (("data", "path"), ("training", "global_batch_size")):  # examples, no default
                assert getattr(got, key) == default, f"{section}.{key}: {getattr(got, key)!r} != {default!r}"
    assert "# " in out.stdout, "the printed YAML says what each key means"
