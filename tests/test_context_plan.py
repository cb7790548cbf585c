"""`megapack plan` and `train --check` with context parallelism (`parallel.cp`): LLaMA-3.1-8B's activations per rank
at 128K tokens and CP 1/4/8 on real sizes, the gathered K/V term, the optimizer sharded over DP x CP, the rules' one-line
errors, and the shipped 32K/128K configs fitting 80 GB (the planner's work runs in one child interpreter)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "configs/models/Meta-Llama-3.1-8B"
LONG_128K = ROOT / "configs/llama31_8b_long_128k.yaml"
LONG_32K = ROOT / "configs/llama31_8b_long_32k.yaml"
ROW = 131072
CONVERSATIONS = [{"messages": [{"role": "user", "content": f"Count to {n}."},
                               {"role": "assistant", "content": " ".join(str(i) for i in range(n))}]}
                 for n in range(5, 65)]


def _shards(tmp: Path, tokenizer: Path) -> Path:
    """60 chats best-fit-packed at 4096 tokens (llama3 template), a tenth held out as `val`."""
    from megapack.cli import main

    data = tmp / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    out = tmp / "shards"
    rc = main(["preprocess", "--input", str(data), "--tokenizer-model", str(tokenizer), "--template", "llama3",
               "--seq-length", "4096", "--packing", "bfd", "--val-fraction", "0.1", "--seed", "1",
               "--output-dir", str(out), "--no-progress", "--workers", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory, llama3_tokenizer_path) -> dict:
    """The child's plans and command lines (tests/memory_helpers.py, parts `context` and `cli`)."""
    tmp = tmp_path_factory.mktemp("context_plan")
    shards = _shards(tmp, llama3_tokenizer_path)
    model = f"model.hf_dir={HF}"
    check = ["train", "--config", str(LONG_128K), model, f"data.path={shards}", "data.seq_length=null",
             f"checkpoint.dir={tmp / 'run'}"]
    flags = ["--check", "--gpu-memory-gb", "80", "--world-size"]
    cli = {
        "plan_128k": ["plan", "--config", str(LONG_128K), model, "--world-size", "32", "--gpu-memory-gb", "80"],
        "plan_128k_json": ["plan", "--config", str(LONG_128K), model, "--world-size", "32", "--json"],
        "plan_32k_json": ["plan", "--config", str(LONG_32K), model, "--world-size", "32", "--json"],
        "plan_128k_selective": ["plan", "--config", str(LONG_128K), model, "training.recompute=selective",
                                "--world-size", "32"],
        "plan_shards_json": ["plan", "--config", str(LONG_128K), model, f"data.path={shards}", "data.seq_length=null",
                             "parallel.tp=1", "parallel.cp=2", "parallel.sequence_parallel=false",
                             "--world-size", "4", "--json"],
        "plan_bad_world": ["plan", "--config", str(LONG_128K), model, "--world-size", "24"],
        "plan_bad_seq": ["plan", "--config", str(LONG_128K), model, "parallel.cp=3", "--world-size", "24"],
        "check_bad_seq": check + ["parallel.cp=3", "parallel.tp=1", "parallel.sequence_parallel=false", *flags, "6"],
        "check_bad_world": check + [*flags, "24"],
        "check_bad_vpp": check + ["parallel.pp=2", "parallel.vpp=2", *flags, "64"],
        "check_bad_tp": check + ["parallel.tp=16", "parallel.cp=1", *flags, "16"],
    }
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"parts": ["context", "cli"], "cli": cli}))
    proc = subprocess.run([sys.executable, str(ROOT / "tests/memory_helpers.py"), str(spec), str(tmp / "out.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp / "out.json").read_text())
    out["shards"] = json.loads((shards / "meta.json").read_text())
    print("child seconds:", out["seconds"])
    return out


def _gathered_kv(hf: dict, tp: int, row: int) -> int:
    """Keys and values of the whole row, all layers, bf16, from config.json: 2 x KV heads/TP x head dim x row x 2 B."""
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    return hf["num_hidden_layers"] * 2 * (hf["num_key_value_heads"] // tp) * head_dim * row * 2


def test_activations_per_rank_divide_by_cp_plus_the_gathered_kv(results):
    """8B at 128K: everything a micro-batch keeps shrinks exactly by CP except the whole row's K/V, which every CP rank
    keeps (16 GiB at TP1, 8 GiB at TP2); the optimizer state is sharded over DP x CP (same bytes at CP1 x DP32 and
    CP8 x DP4), weights and gradients are not sharded by CP."""
    hf = json.loads((HF / "config.json").read_text())
    plans = results["context"]["plans"]
    for tp in (1, 2):
        kv = _gathered_kv(hf, tp, ROW)
        base = plans[f"tp{tp}/cp1"]["ranks"][0]
        assert base["gathered_kv_bytes"] == 0
        for cp in (4, 8):
            plan = plans[f"tp{tp}/cp{cp}"]
            rank = plan["ranks"][0]
            assert (plan["cp"], plan["dp"], plan["tokens_per_rank"]) == (cp, 32 // (tp * cp), ROW // cp)
            assert rank["gathered_kv_bytes"] == kv, (tp, cp)
            # the ratio: (CP1's micro-batch - its own K/V share) is exactly cp x (CP's micro-batch - the gathered K/V)
            local_kv_cp1 = kv  # at CP 1 the rank's own K/V is the whole row's
            assert base["activation_bytes_per_microbatch"] - local_kv_cp1 == \
                cp * (rank["activation_bytes_per_microbatch"] - kv), (tp, cp)
            assert (rank["weight_bytes"], rank["grad_bytes"]) == (base["weight_bytes"], base["grad_bytes"])
            assert rank["optimizer_bytes"] == base["optimizer_bytes"]  # DP x CP = 32 shards either way
    assert plans["tp1/cp8"]["ranks"][0]["gathered_kv_bytes"] == 16 * 2**30
    # at 128K without recompute a TP1 rank keeps ~627 GiB of activations at CP1, ~93 GiB at CP8
    act = {cp: plans[f"tp1/cp{cp}"]["ranks"][0]["activation_bytes"] for cp in (1, 4, 8)}
    assert act[1] > 600 * 2**30 and act[8] < 100 * 2**30
    assert 6.5 < act[1] / act[8] < 8 and 3.5 < act[1] / act[4] < 4  # divided by CP, less the K/V every rank keeps
    assert results["context"]["same_parameters"], results["context"]["parameters"]


def test_the_128k_example_fits_80gb(results):
    """configs/llama31_8b_long_128k.yaml (TP2 x CP8 x DP2, SP, full recompute) fits 80 GB; so does the 32K one
    (TP2 x CP4 x DP4, selective). Selective recompute at 128K does not, and the table says why (K/V, activations)."""
    cli = results["cli"]
    run = cli["plan_128k"]
    assert run["rc"] == 0, run["stderr"]
    lines = run["stdout"].strip().splitlines()
    assert lines[-1].startswith("fits: the fullest, rank position tp=0 pp=0, needs ")
    assert "world 32 = TP 2 x CP 8 x PP 1 x DP 2" in lines[0] and "16,388 per CP rank" in lines[0]
    assert lines[1].split()[:3] == ["tp", "cp", "pp"] and lines[2].split()[1] == "0-7"
    for key, layout in (("plan_128k_json", (2, 8, 1, 2)), ("plan_32k_json", (2, 4, 1, 4))):
        plan = json.loads(cli[key]["stdout"])
        assert plan["fits"] is True and (plan["tp"], plan["cp"], plan["pp"], plan["dp"]) == layout, key
        assert plan["worst"]["total_bytes"] < plan["limit_bytes"] == int(80 * 2**30 * 0.9 - 2**30)
    selective = cli["plan_128k_selective"]
    assert selective["rc"] == 2
    last = selective["stdout"].strip().splitlines()[-1]
    assert last.startswith("does not fit: rank position tp=0 pp=0") and "training.recompute=full, parallel.cp=16" in last


def test_row_budget_adds_cp_padding_per_segment(results):
    """With shards, each row is planned at seq_length + 2*cp x (segments per pack, rounded up) tokens."""
    split = results["shards"]["splits"]["train"]
    plan = json.loads(results["cli"]["plan_shards_json"]["stdout"])
    segments = math.ceil(split["num_segments"] / split["num_packs"])
    assert segments > 1
    assert (plan["row_tokens"], plan["tokens_per_rank"]) == (4096 + 4 * segments, (4096 + 4 * segments + 1) // 2)


def test_rules_fail_in_one_line_naming_parallel_cp(results):
    """World size not divisible by tp*cp*pp, seq_length not a multiple of 2*cp(*tp with SP), and interleaved pipelines
    (refused with CP): one `error: parallel.cp: ...` line, in `megapack plan` and `train --check`;
    heads not divisible by TP still name parallel.tp."""
    cli = results["cli"]
    expected = {
        "plan_bad_world": "error: parallel.cp: world size 24 is not divisible by tp*cp*pp = 2*8*1 = 16",
        "check_bad_world": "error: parallel.cp: world size 24 is not divisible by tp*cp*pp = 2*8*1 = 16",
        "plan_bad_seq": "error: parallel.cp: seq_length 131072 is not a multiple of 2*cp*tp = 2*3*2 = 12",
        "check_bad_seq": "error: parallel.cp: seq_length 4096 is not a multiple of 2*cp = 2*3 = 6",
        "check_bad_vpp": "error: parallel.cp: 8 with parallel.vpp 2 is not supported",
        "check_bad_tp": "error: parallel.tp: 16 must divide num_attention_heads (32)",
    }
    for key, start in expected.items():
        run = cli[key]
        line = run["stderr"].strip()
        assert run["rc"] == 1 and "\n" not in line and line.startswith(start), (key, run)
