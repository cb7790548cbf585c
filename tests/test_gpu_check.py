"""tools/gpu_check.sh --dry-run: the GPU check's whole path on the CPU (tiny shapes), and its report files."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_reports_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "tools/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
