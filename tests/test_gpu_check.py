"""tools/gpu_check.sh --dry-run: the GPU check's whole path on the CPU (tiny shapes), and its report files; the
GPU check (tools/) stays outside the runtime package."""
from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_megapack_never_imports_tools():
    """tools/ may import megapack; megapack must not import tools/ (the GPU check, benchmarks, scripts)."""
    for path in sorted((ROOT / "megapack").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n == "tools" or n.startswith("tools.") for n in names), f"{path} imports {names}"


@pytest.mark.multiprocess  # the driver starts pytest, training and benchmark processes
def test_gpu_check_dry_run_reports_every_step(tmp_path):
    """Run as a user would: from a directory of their own, OUT relative to it, no PYTHON: the script finds the
    environment as the launchers do (here the interpreter's own, first on PATH, so the test's `megapack`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "out", "--dry-run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("[megapack] using "), proc.stdout[:300]
    out = tmp_path / "out"
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["finished"] and report["elapsed_s"] < report["budget_s"]
    assert "sdpa" in report["environment"]["attention_backends"]
    steps = report["steps"]

    tests = steps["backend_tests"]
    if not torch.cuda.is_available():  # the module skips itself without CUDA: 3 backends, each skipped
        assert tests["status"] == "skipped" and tests["counts"] == {"skipped": 3}
        assert any("need CUDA" in r for r in tests["skip_reasons"])

    cmp_ = steps["train_compare"]
    if cmp_["status"] == "skipped":  # only when the tokenizer / demo data cannot be fetched (no package index)
        assert "cannot download" in cmp_["reason"]
    else:
        assert cmp_["status"] == "passed", cmp_
        dev, ref = cmp_["device_run"], cmp_["reference_run"]
        assert list(dev["losses"]) == list(ref["losses"]) == ["1", "2", "3"]
        assert all(abs(v - math.log(128256)) < 0.5 for v in dev["losses"].values())  # ~ln(vocab) from random init
        assert 0 <= cmp_["max_rel_diff"] <= cmp_["tolerance"] == 1e-2
        assert dev["checkpoint_published"] and ref["checkpoint_published"]  # the bf16 run saved asynchronously

    bench = steps["benchmark"]
    assert bench["status"] == "passed" and "sdpa" in bench["backends"]
    sdpa = bench["backends"]["sdpa"]
    assert sdpa["layers"] == 2 and sdpa["settings"]["hidden_size"] == 64 and sdpa["settings"]["seq_length"] == 256
    packed, padded = sdpa["arms"]["packed"], sdpa["arms"]["padded"]
    for arm in (packed, padded):
        assert arm["timed_steps"] == 2 and len(arm["step_times_s"]) == 2 and arm["losses_finite"]
        assert arm["tokens_per_s"] > 0 and arm["epoch_time_est_s"] > 0 and arm["mfu"] is None  # no peak on CPU
    # the same conversations: packing needs fewer steps (8 packs vs 8 conversations per step) and pads nothing
    assert packed["steps_per_epoch"] < padded["steps_per_epoch"]
    assert packed["padding_fraction"] == 0 < padded["padding_fraction"] < 1
    ratio = sdpa["packed_over_padded_time"]
    assert math.isfinite(ratio) and ratio > 0
    assert math.isclose(ratio, packed["epoch_time_est_s"] / padded["epoch_time_est_s"])

    md = (out / "gpu_check.md").read_text()
    assert "| sdpa | packed |" in md and "| sdpa | padded |" in md and "## Step 1b" in md
    assert report["log"][-1].split("] ", 1)[1] in md  # everything printed is in both files
    assert (out / "logs" / "bench_sdpa.log").is_file()
