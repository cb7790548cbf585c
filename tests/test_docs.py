"""The README and the files it names agree with the code: commands and flags parse, configs load and fit their
intended layouts, example shell scripts are valid bash. Cheap (no process groups, no data)."""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from megapack.cli import build_parser
from megapack.training.preflight.config import RunConfig, load_config
from megapack.training.preflight.plan import batch_layout, planned_seq_length

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SCRIPTS = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".sh", ".sbatch"))

# world size each config is written for (its header comment): tiny_cpu 2 CPU processes, 8B one 8-GPU node,
# 70B four 8-GPU nodes
WORLD_SIZE = {"tiny_cpu.yaml": 2, "llama3_8b_packed_sft.yaml": 8, "llama3_70b_packed_sft.yaml": 32}
# LLaMA-3 architectures (Meta's config.json): layers, attention heads, key/value heads
ARCH = {"llama3_8b_packed_sft.yaml": (32, 32, 8), "llama3_70b_packed_sft.yaml": (80, 64, 8)}
# flags of other tools that the README names in prose
FOREIGN_FLAGS = {"--load", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time",  # Slurm's
                 "--signal", "--open-mode", "--array", "--dependency", "--export", "--kill-on-bad-exit"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings of a parser and of all its nested subparsers."""
    found = {s for a in parser._actions for s in a.option_strings}
    for sub in _subparsers(parser).values():
        found |= _options(sub)
    return found


def _tool_command(script: str) -> str:
    """The megapack subcommand a tools/*.py wrapper runs (`main(["preprocess", ...])`)."""
    text = (ROOT / script).read_text()
    match = re.search(r'main\(\["(\w+)"', text)
    assert match, f"{script}: expected a wrapper around megapack.cli.main"
    return match.group(1)


def _bash_commands() -> list[list[str]]:
    """Each command of the README's ```bash blocks as argv (continuations joined, comments, `&&` and VAR= dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in filter(None, (p.strip() for p in line.split("&&"))):
                argv = shlex.split(part)
                while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                    argv.pop(0)
                if argv:
                    commands.append(argv)
    return commands


def _own_script(argv: list[str]) -> str | None:
    """The tools/ script a `bash tools/x.sh ...` or `python tools/x.py ...` command runs, unless it wraps megapack."""
    if len(argv) < 2 or argv[0] not in ("bash", "python") or not argv[1].startswith("tools/"):
        return None
    path = ROOT / argv[1]
    return argv[1] if path.is_file() and not re.search(r'main\(\["\w+"', path.read_text()) else None


def _check_script_flags(argv: list[str], script: str) -> None:
    """Every --flag given to one of our scripts appears in its source (argparse option or shell test)."""
    text = (ROOT / script).read_text()
    for word in argv:
        for flag in re.findall(r"^--[a-z][a-z0-9-]*", word):
            assert flag in text, f"README `{' '.join(argv)}`: {script} has no {flag}"


def _megapack_argv(argv: list[str]) -> list[str] | None:
    if argv[0] == "megapack":
        return argv[1:]
    if argv[0] == "python" and len(argv) > 1 and argv[1].startswith("tools/") and "bench" not in argv[1]:
        return [_tool_command(argv[1]), *argv[2:]]
    return None


COMMANDS = _bash_commands()


def test_readme_has_commands():
    assert any(_megapack_argv(c) for c in COMMANDS) and any(c[0] in ("bash", "sbatch") for c in COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv, monkeypatch):
    """megapack / tools commands parse with the real parser; train overrides are real keys; scripts exist."""
    mp = _megapack_argv(argv)
    if mp is not None:
        try:
            args = build_parser().parse_args(mp)
        except SystemExit as exc:
            pytest.fail(f"{' '.join(argv)}: argparse refused it (exit {exc.code})")
        if args.command == "train":
            for config in args.config:
                load_config(ROOT / config, args.overrides)
        return
    if argv[0] in ("bash", "sbatch"):
        script = next(a for a in argv[1:] if not a.startswith("-"))
        assert (ROOT / script).is_file(), script
        if _own_script(argv):
            _check_script_flags(argv, script)
        rest = argv[argv.index(script) + 1:]
        if rest and rest[0].endswith(".yaml"):  # the launchers take CONFIG [key.sub=value ...]
            load_config(ROOT / rest[0], rest[1:])
        return
    if argv[0] == "python":
        assert (ROOT / argv[1]).is_file(), argv[1]
        if _own_script(argv):
            _check_script_flags(argv, argv[1])


def test_readme_inline_flags_exist():
    """Every `--flag` quoted inline exists in the subcommand named with it, else in some megapack parser."""
    parser = build_parser()
    subs = _subparsers(parser)
    every = _options(parser)
    for span in re.findall(r"`([^`\n]*--[^`\n]*)`", README):
        words = span.split()
        if _own_script(words):  # `bash tools/gpu_check.sh OUT --budget-s 300`: flags of our own scripts
            _check_script_flags(words, words[1])
            continue
        scope = _options(subs[words[1]]) if words[0] == "megapack" and words[1] in subs else every
        for word in words:
            for flag in re.findall(r"--[a-z][a-z0-9-]*", word):
                assert flag in scope or flag in FOREIGN_FLAGS, f"README `{span}`: {flag} is not a megapack flag"
    for name in re.findall(r"`megapack (\w+)", README):
        assert name in subs, f"README: `megapack {name}` is not a subcommand"


def test_readme_paths_exist():
    for path in set(re.findall(r"\b((?:examples|configs|tools|tests|megapack)/[\w./-]+\.(?:sh|sbatch|yaml|py|md))",
                               README)):
        assert (ROOT / path).is_file(), f"README names {path}, which does not exist"


def test_readme_config_keys_exist():
    """Keys in the README's section table and `section.key` mentions are fields of the pydantic config."""
    sections = {name: field.annotation for name, field in RunConfig.model_fields.items()}
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", README, re.M)
    assert {r[0] for r in rows} >= set(sections), "README: the section table misses a section"
    for section, keys in rows:
        if section not in sections:
            continue
        while re.search(r"\([^()]*\)", keys):
            keys = re.sub(r"\([^()]*\)", "", keys)  # parenthesised text holds values and remarks, not keys
        for key in re.findall(r"`([\w/]+)`", keys):
            names = [key] if "/" not in key else [key.split("/")[0], key.split("/")[0][:-1] + key.split("/")[1]]
            for name in names:
                assert name in sections[section].model_fields, f"README table: {section}.{name} is not a config key"
    for section, key in re.findall(r"`(\w+)\.(\w+)", README):
        if section in sections:
            assert key in sections[section].model_fields, f"README: `{section}.{key}` is not a config key"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_fits_its_layout(path):
    """Each shipped config loads and resolves at the world size it is written for, with matching stub shards."""
    assert path.name in WORLD_SIZE, f"{path.name}: add its intended world size to WORLD_SIZE"
    config = load_config(path)
    if config.data.seq_length is None:  # seq_length comes from the shards, which the launcher makes
        launcher = (ROOT / "examples" / "train_torchrun.sh").read_text()
        seq_length = int(re.search(r"--seq-length (\d+)", launcher).group(1))
    else:
        seq_length = planned_seq_length(config)
    _dp, _gbs, num_microbatches = batch_layout(config, WORLD_SIZE[path.name], seq_length)
    assert num_microbatches >= 1
    if path.name in ARCH:  # the 8B / 70B GPU configs
        layers, heads, kv_heads = ARCH[path.name]
        par = config.parallel
        assert par.tp <= 8 and 8 % par.tp == 0, "tensor parallel stays inside one 8-GPU node"
        assert heads % par.tp == 0 and kv_heads % par.tp == 0 and layers % par.pp == 0
        assert par.sequence_parallel == (par.tp > 1)
        assert config.data.seq_length in (4096, 8192)
        assert config.training.precision in ("auto", "bf16")
        if par.pp > 1:  # enough micro-batches to fill the pipeline
            assert num_microbatches >= par.pp
        ck = config.checkpoint
        assert ck.dir and ck.save_interval and ck.resume == "latest"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_example_script_is_valid_bash(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
