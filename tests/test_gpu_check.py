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

from types import SimpleNamespace

import pytest
import torch

from tools.gpu.breakdown import PHASES, attribute, breakdown_table, shares

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
    packed, padded, mb2 = sdpa["arms"]["packed"], sdpa["arms"]["padded"], sdpa["arms"]["packed_mb2"]
    for arm in (packed, padded, mb2):
        assert arm["timed_steps"] == 2 and len(arm["step_times_s"]) == 2 and arm["losses_finite"]
        assert arm["tokens_per_s"] > 0 and arm["epoch_time_est_s"] > 0 and arm["mfu"] is None  # no peak on CPU
    # the same conversations: packing needs fewer steps (8 packs vs 8 conversations per step) and pads nothing
    assert packed["steps_per_epoch"] < padded["steps_per_epoch"]
    assert packed["padding_fraction"] == 0 < padded["padding_fraction"] < 1
    ratio = sdpa["packed_over_padded_time"]
    assert math.isfinite(ratio) and ratio > 0
    assert math.isclose(ratio, packed["epoch_time_est_s"] / padded["epoch_time_est_s"])

    # the micro-batch choice: the same 8 packs per step as 8 micro-batches of 1 pack or 4 of 2
    assert packed["packs_per_micro_batch"] == 1 and mb2["packs_per_micro_batch"] == 2
    assert packed["micro_batches_per_step"] == 8 and mb2["micro_batches_per_step"] == 4
    assert mb2["steps_per_epoch"] == packed["steps_per_epoch"] and mb2["padding_fraction"] == 0
    choice = sdpa["micro_batch_choice"]
    assert set(choice) == {"1", "2"} and choice["1"]["tokens_per_s"] == packed["tokens_per_s"]
    assert choice["2"]["tokens_per_s"] == mb2["tokens_per_s"] > 0
    # where one packed step's time goes: every phase, summing to the step, the model's phases really attributed
    bd = sdpa["breakdown"]
    assert "error" not in bd and bd["primary"] == "cpu" and "device" not in bd and bd["events"] > 1000
    cpu = bd["cpu"]
    assert list(cpu["phase_pct"]) == list(PHASES) == list(cpu["phase_ms"])
    assert math.isclose(sum(cpu["phase_pct"].values()), 100.0, abs_tol=1e-6)
    assert math.isclose(sum(cpu["phase_ms"].values()), cpu["step_ms"], rel_tol=1e-9)
    assert cpu["step_ms"] >= bd["wall_ms"] * 0.999
    for phase in ("attention", "attention_proj", "mlp", "norms_rope_elementwise", "loss", "optimizer"):
        assert cpu["phase_pct"][phase] > 0.5, (phase, cpu["phase_pct"])
    assert cpu["phase_pct"]["other"] < 50, cpu["phase_pct"]  # the rules claim most of the step
    assert "| attention (core attention kernels) |" in proc.stdout and "| MLP (fc1, fc2, SwiGLU) |" in proc.stdout

    md = (out / "gpu_check.md").read_text()
    assert "| sdpa | packed |" in md and "| sdpa | padded |" in md and "## Step 1b" in md
    assert "| sdpa | packed_mb2 |" in md and "### Micro-batch choice (packed arm)" in md and "| sdpa | 2 | 4 |" in md
    assert "### Where one packed step's time goes: sdpa" in md
    assert "\n".join(breakdown_table(bd)) in md
    assert report["log"][-1].split("] ", 1)[1] in md  # everything printed is in both files
    assert (out / "logs" / "bench_sdpa.log").is_file()


def _events(specs: list[tuple]) -> list[SimpleNamespace]:
    """Fake profiler events from (name, parent index or None, sequence_nr, self microseconds)."""
    events = []
    for k, (name, parent, seq, self_us) in enumerate(specs):
        events.append(SimpleNamespace(name=name, cpu_parent=events[parent] if parent is not None else None,
                                      sequence_nr=seq, thread=1, fwd_thread=1, time_range=SimpleNamespace(start=k),
                                      self_cpu_time_total=self_us, self_device_time_total=0))
    return events


def test_breakdown_attributes_frames_backward_nodes_and_collectives():
    """Forward ops take their innermost component frame; backward ops their forward op's phase (by sequence
    number); collectives outside the model are DP communication, inside the loss they stay loss."""
    events = _events([
        ("megapack/training/run/step.py(27): forward_step", None, -1, 5),                       # 0
        ("megatron/core/transformer/transformer_layer.py(400): forward", 0, -1, 1),            # 1
        ("megatron/core/transformer/mlp.py(120): forward", 1, -1, 2),                           # 2
        ("aten::mm", 2, 7, 30),                                                                 # 3
        ("megapack/model/attention.py(110): forward", 1, -1, 1),                               # 4
        ("aten::_scaled_dot_product_attention", 4, 8, 20),                                      # 5
        ("aten::add", 1, 9, 4),                                                                 # 6 residual
        ("megapack/model/chunked_loss.py(60): forward", 0, -1, 3),                              # 7
        ("gloo:all_reduce", 7, -1, 6),                                                          # 8 TP reduce
        ("autograd::engine::evaluate_function: MmBackward0", None, 7, 2),                      # 9
        ("aten::mm", 9, -1, 60),                                                                # 10
        ("autograd::engine::evaluate_function: ScaledDotProductAttentionBackward", None, 8, 1),  # 11
        ("aten::_sdpa_backward", 11, -1, 40),                                                   # 12
        ("megapack/training/run/step.py(51): reduce_loss", None, -1, 1),                        # 13
        ("torch/distributed/distributed_c10d.py(2900): all_reduce", 13, -1, 2),               # 14
        ("gloo:all_reduce", 14, -1, 9),                                                         # 15
        ("megatron/core/optimizer/distrib_optimizer.py(2000): step", None, -1, 3),             # 16
        ("aten::_foreach_add_", 16, -1, 12),                                                    # 17
        ("aten::embedding", 0, 3, 7),                                                           # 18
    ])
    phases = attribute(events)
    assert phases[3] == phases[10] == "mlp" and phases[5] == phases[12] == "attention"
    assert phases[6] == "norms_rope_elementwise" and phases[8] == "loss"
    assert phases[14] == phases[15] == "dp_comm" and phases[17] == "optimizer" and phases[18] == "other"
    cpu = shares(events, phases, wall_us=300.0, device=False)
    assert cpu["phase_ms"]["mlp"] * 1000 == 2 + 30 + 2 + 60 and cpu["phase_ms"]["attention"] * 1000 == 1 + 20 + 1 + 40
    assert cpu["phase_ms"]["dp_comm"] * 1000 == 2 + 9 and cpu["step_ms"] == 0.3  # wall above the events' total
    assert math.isclose(sum(cpu["phase_pct"].values()), 100.0) and list(cpu["phase_pct"]) == list(PHASES)
    assert len(breakdown_table({"cpu": cpu, "phases": list(PHASES)})) == len(PHASES) + 3
