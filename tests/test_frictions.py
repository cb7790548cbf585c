"""The small frictions of a first day (issue 25): the version, switches' help, the run's settings block, `megapack plan`'s
"in flight" footnote, a Hub name as model.hf_dir, a typo in a command-line override. Cheap: no process groups."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import megapack
from megapack.errors import MegapackError
from megapack.training.preflight.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _megapack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megapack", *args], capture_output=True, text=True, timeout=120)


def test_version_is_printed_and_kept_in_one_place():
    out = _megapack("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"megapack {megapack.__version__}"
    assert importlib.metadata.version("megapack") == megapack.__version__
    setup = (ROOT / "setup.py").read_text()
    assert not re.search(r"version\s*=\s*[\"']\d", setup), "setup.py must read the version from megapack/__init__.py"


def test_switches_show_no_default_in_their_help():
    from megapack.cli import build_parser

    text = " ".join(_megapack("demo", "--help").stdout.split())
    assert "--no-train" in text and "(default: True)" not in text, text
    for action in build_parser()._actions:  # every subcommand's switches: (default: False/True) says nothing
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                helped = " ".join(sub.format_help().split())
                assert "(default: True)" not in helped and "(default: False)" not in helped, name


def test_run_settings_print_as_an_aligned_block():
    from megapack.training.run.metrics import format_settings

    text = format_settings({"world_size": 2, "tp": 1, "micro_batch_size": 1, "resume_from": None,
                            "data_identity": {"packing": "bfd", "seq_length": 512}, "blend": []})
    lines = text.splitlines()
    assert "{'" not in text and len(lines) == 6, text
    assert re.fullmatch(r"  world_size +2", lines[0]) and re.fullmatch(r"  tp +1", lines[1]), text
    assert len({line.index(line.split()[1]) for line in lines}) == 1, "the values start in one column"
    assert lines[3].split() == ["resume_from", "-"] and "packing bfd" in lines[4], text


def test_plan_explains_its_in_flight_column(monkeypatch):
    from megapack.training.memory.report import format_plan

    plan = {"total_parameters": 10, "vocab_padding_parameters": 0, "world_size": 1, "tp": 1, "cp": 1, "pp": 1,
            "vpp": None, "dp": 1, "micro_batch_size": 1, "seq_length": 8, "row_tokens": 8, "tokens_per_rank": 8,
            "num_microbatches": 1, "recompute": "none", "activation_bytes_per_value": 4, "device": "cpu", "fits": True,
            "worst": None,
            "ranks": [{"tp_rank": 0, "pp_rank": 0, "parameters": 10, "layers": 1, "weight_bytes": 1, "grad_bytes": 1,
                       "optimizer_bytes": 1, "microbatches_in_flight": 1, "gathered_kv_bytes": 0,
                       "activation_bytes": 1, "total_bytes": 4}]}
    import megapack.training.memory.report as report

    monkeypatch.setattr(report, "verdict", lambda plan: "fits")  # the verdict's inputs are not this test's subject
    lines = format_plan(plan).splitlines()
    assert any(line.startswith("in flight:") for line in lines), lines


def test_a_hub_name_as_hf_dir_says_how_to_download_it(tmp_path, monkeypatch):
    from megapack.model.config import load_hf_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(MegapackError) as err:
        load_hf_config("meta-llama/Meta-Llama-3-8B")
    message = str(err.value)
    assert "\n" not in message and "local folder" in message, message
    assert "huggingface-cli download meta-llama/Meta-Llama-3-8B --local-dir" in message, message
    (tmp_path / "runs").mkdir()  # a relative local path whose first folder exists is not a Hub name
    with pytest.raises(MegapackError, match="no such file") as err:
        load_hf_config("runs/tiny-hf")
    assert "huggingface-cli" not in str(err.value)


@pytest.mark.parametrize("override, expected", [
    ("training.trian_steps=3", "command line: training.trian_steps=3: unknown key (did you mean "
                               "'training.train_steps'?)"),
    ("trainig.train_steps=3", "command line: trainig.train_steps=3: unknown key (did you mean 'training'?)"),
    ("parallel.tp=two", "command line: parallel.tp=two: Input should be a valid integer"),
])
def test_an_override_typo_is_blamed_on_the_command_line(override, expected, tmp_path):
    import yaml

    with pytest.raises(MegapackError) as err:
        load_config(ROOT / "configs" / "tiny_cpu.yaml", [override])
    assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)
    raw = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    raw["training"]["trian_steps"] = 3  # the same typo written in the file is still the file's
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(MegapackError) as err:
        load_config(tmp_path / "run.yaml", ["training.train_steps=3"])
    assert str(err.value) == (f"{tmp_path / 'run.yaml'}: training.trian_steps: unknown key (did you mean "
                              f"'training.train_steps'?)")


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_license_and_changelog():
    """Apache-2.0 like Megatron-LM; the changelog's newest entry is the package's version."""
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8") if (ROOT / "LICENSE").is_file() else ""
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "Copyright" in license_text and "the megapack authors" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8") if (ROOT / "CHANGELOG.md").is_file() else ""
    versions = re.findall(r"^## \[?(\d+\.\d+\.\d+)", changelog, re.M)
    assert versions and versions[0] == megapack.__version__, f"CHANGELOG.md's newest entry is not {megapack.__version__}"


def test_readme_says_where_the_tokenizer_lives():
    """The quickstart's LLaMA-3 tokenizer: where it lives and a command that prints its path (a real asset name)."""
    from megapack.assets import ASSETS
    from megapack.model.gguf_import import HF_MODELS

    assert "`megapack assets fetch NAME` prints paths" in _readme()
    names = set(re.findall(r"`([\w-]+)`", _readme())) & {*ASSETS, *HF_MODELS}
    assert {"llama3-tokenizer", "smollm2-135m-instruct"} <= names, names
    assert "~/.cache/megapack" in _readme() and "MEGAPACK_CACHE_DIR" in _readme()


def test_readme_launcher_paths_are_relative_to_the_checkout():
    """Examples name `configs/…` and `examples/…` relative to the checkout: the README says so where it says the
    launchers run from any directory, and no example claims to run from any directory with a repo-relative path."""
    guide = _readme().split("## Guide", 1)[1]
    assert "checkout's root" in guide.split("### 1. Data", 1)[0], "say the examples are written from the checkout"
    for block in re.findall(r"```bash\n(.*?)```", _readme(), re.S):
        assert "from any directory" not in block, block


def test_readme_guide_walks_from_data_to_report():
    """The guide goes data -> train -> resume -> export -> generate -> report, each step with its command (whose
    flags tests/test_docs.py parses), in that order."""
    guide = _readme().split("## Guide", 1)[1].split("\n## ", 1)[0]
    steps = ["megapack preprocess --", "bash examples/train_torchrun.sh", "the same command resumes",
             "convert_checkpoint.py megatron-to-hf", "megapack generate --checkpoint", "megapack report runs/"]
    found = {step: guide.find(step) for step in steps}
    assert all(at >= 0 for at in found.values()), found
    assert list(found.values()) == sorted(found.values()), found
