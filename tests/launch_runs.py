"""The launcher tests' shared reference: the README's CPU command line of examples/train_torchrun.sh, run once per
test session from a fresh directory; the Slurm and multi-node runs train the same config there and must match it."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
README_LINE = f"bash examples/train_torchrun.sh configs/tiny_cpu.yaml training.train_steps={STEPS}"


def launcher_env(**extra: str) -> dict:
    """A user's environment: no virtualenv on PATH (the launchers find the checkout's .venv), one thread per process.
    PYTHONPATH stays when set (a worktree testing its own code through a shared .venv)."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    return env | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"} | extra


def readme_argv() -> list[str]:
    """The README's CPU command line with the checkout's examples/ and configs/ made absolute."""
    readme = (ROOT / "README.md").read_text()
    assert README_LINE in readme, f"README.md no longer shows `{README_LINE}`"
    return [str(ROOT / a) if a.startswith(("examples/", "configs/")) else a for a in shlex.split(README_LINE)]


def torchrun_reference(base: Path) -> Path:
    """Run the README line once under base/launchers (the work directory of every launcher test); returns it."""
    work = base / "launchers"
    if (work / "runs" / "tiny-train" / "summary.json").is_file():
        return work
    work.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(readme_argv(), cwd=work, env=launcher_env(NPROC="2"), capture_output=True, text=True,
                         timeout=600)
    (work / "torchrun.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work
