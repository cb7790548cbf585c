"""The shipped configs load and fit the layouts they are written for; the example shell scripts are valid bash."""
from __future__ import annotations

import re
import os
import subprocess
from pathlib import Path

import pytest

from megapack.training.preflight.config import load_config
from megapack.training.preflight.plan import batch_layout, planned_seq_length

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SCRIPTS = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".sh", ".sbatch"))
# world size each config is written for (its header comment): tiny_cpu 2 CPU processes, 8B one 8-GPU node,
# 70B four 8-GPU nodes
WORLD_SIZE = {"tiny_cpu.yaml": 2, "llama3_8b_packed_sft.yaml": 8, "llama3_70b_packed_sft.yaml": 32}
# LLaMA-3 architectures (Meta's config.json): layers, attention heads, key/value heads
ARCH = {"llama3_8b_packed_sft.yaml": (32, 32, 8), "llama3_70b_packed_sft.yaml": (80, 64, 8)}


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


def test_eval_sbatch_maps_array_tasks_to_the_paper_runs(tmp_path):
    """examples/eval.sbatch: task i evaluates the i-th configs/paper run (name order) at its checkpoint.dir; an index
    past the grid is one line."""
    import yaml

    configs = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
    script = str(ROOT / "examples" / "eval.sbatch")
    for task in (0, 7, len(configs) - 1):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "EVAL_DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(ROOT)}
        out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True).stdout.split()
        run_dir = yaml.safe_load(configs[task].read_text())["checkpoint"]["dir"]
        assert out[:3] == ["megapack", "eval", run_dir], out
        assert out[3:6] == ["--suite", "paper", "--allow-code-eval"] and out[-1] == f"eval/paper/{configs[task].stem}"
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(len(configs)), "EVAL_DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(ROOT)}
    bad = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: array index {len(configs)}: configs/paper holds {len(configs)} runs (use --array=0-{len(configs) - 1})"]
