"""The README's launcher commands, run as a new user would: from a directory of their own, nothing activated."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bare_env() -> dict:
    """The caller's environment without any virtualenv on PATH (the launchers must find the checkout's .venv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    return env | {"OMP_NUM_THREADS": "1"}


def test_train_torchrun_from_another_directory_resolves_paths_there(tmp_path):
    repo_runs = sorted(p.name for p in (ROOT / "runs").glob("*")) if (ROOT / "runs").is_dir() else []
    cmd = ["bash", str(ROOT / "examples" / "train_torchrun.sh"), str(ROOT / "configs" / "tiny_cpu.yaml"),
           "training.train_steps=2", "training.eval_interval=null", "checkpoint.save_interval=null"]
    run = subprocess.run(cmd, cwd=tmp_path, env=_bare_env() | {"NPROC": "2"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"[megapack] using {ROOT / '.venv' / 'bin' / 'megapack'}" in run.stdout
    # the config's relative paths (runs/tiny-hf, runs/demo-shards, runs/tiny-train) landed where the user stands
    for rel in ("runs/tiny-hf/config.json", "runs/demo-shards/meta.json", "runs/tiny-train/summary.json",
                "runs/tiny-train/latest"):
        assert (tmp_path / rel).is_file(), rel
    assert "step 2/2 loss" in run.stdout
    after = sorted(p.name for p in (ROOT / "runs").glob("*")) if (ROOT / "runs").is_dir() else []
    assert after == repo_runs  # nothing written into the repository


def test_launchers_say_how_to_get_megapack_when_there_is_none(tmp_path):
    fake = tmp_path / "checkout"
    (fake / "examples").mkdir(parents=True)
    for name in ("train_torchrun.sh", "find_megapack.sh"):
        (fake / "examples" / name).write_text((ROOT / "examples" / name).read_text())
    run = subprocess.run(["bash", str(fake / "examples" / "train_torchrun.sh"), "x.yaml"], cwd=tmp_path,
                         env=_bare_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.strip().startswith(f"error: no megapack on PATH and no {fake}/.venv")
    assert "examples/quickstart.sh" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_quickstart_from_another_directory_writes_there(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), "--no-train", "--num-samples", "16",
                          "--packings", "greedy"], cwd=tmp_path, env=_bare_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "runs" / "demo" / "shards" / "greedy" / "meta.json").is_file()
    assert (tmp_path / "runs" / "demo" / "data" / "dataset_info.json").is_file()
