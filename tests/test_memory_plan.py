"""`megapack plan`: real parameter counts from meta-built models, memory estimates against a measured CPU step,
the paper grid's 24 configs on 80 GB GPUs, and `train --check`'s refusal (the work runs in one child process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memory_helpers import LAYOUTS, MEASURED, MEASURED_CASES, MODELS

pytestmark = pytest.mark.multiprocess  # two child interpreters side by side

ROOT = Path(__file__).resolve().parents[1]
PAPER_8B = ROOT / "configs/paper/llama3-8b_wildchat_gpt4_69k_greedy.yaml"
PAPER_70B = ROOT / "configs/paper/llama3-70b_opensource_1m_random.yaml"

# ShareGPT records as the study's files hold them (LLaMA-Factory's column mapping in configs/paper/dataset_info.json)
CONVERSATIONS = [
    {"conversations": [{"from": "human", "value": "Name a prime number."}, {"from": "gpt", "value": "Seven."}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                       {"from": "gpt", "value": "4"}, {"from": "human", "value": "And 3+3?"},
                       {"from": "gpt", "value": "6"}]},
] * 10


def _paper_shards(tmp: Path, tokenizer: Path) -> Path:
    """20 conversations through configs/paper/dataset_info.json's wildchat_gpt4_69k entry, greedy-packed at 4096."""
    from megapack.cli import main

    data = tmp / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text((ROOT / "configs/paper/dataset_info.json").read_text())
    (data / "wildchat_gpt4_69k.json").write_text(json.dumps(CONVERSATIONS))
    out = tmp / "shards"
    rc = main(["preprocess", "--dataset", "wildchat_gpt4_69k", "--dataset-dir", str(data), "--tokenizer-model",
               str(tokenizer), "--template", "llama3", "--seq-length", "4096", "--packing", "greedy",
               "--val-fraction", "0.1", "--seed", "1", "--output-dir", str(out), "--no-progress", "--workers", "1"])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())  # every record read through the registry's column mapping
    assert (meta["num_records"], meta["skipped"], meta["inputs"][0]["formatting"]) == (20, {}, "sharegpt")
    assert sum(split["num_conversations"] for split in meta["splits"].values()) == 20
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory, llama3_tokenizer_path) -> dict:
    """Everything the tests check, computed in one child interpreter (see tests/memory_helpers.py)."""
    tmp = tmp_path_factory.mktemp("memory_plan")
    shards = _paper_shards(tmp, llama3_tokenizer_path)
    check = ["train", "--config", str(PAPER_8B), f"model.hf_dir={ROOT / 'configs/models/Meta-Llama-3-8B'}",
             f"data.path={shards}", f"checkpoint.dir={tmp / 'run'}", "--check", "--world-size", "32"]
    spec = {"parts": ["parameters", "schedule", "grid", "cli", "measured"], "cli": {
        "plan_json": ["plan", "--config", str(PAPER_70B), f"model.hf_dir={ROOT / 'configs/models/Meta-Llama-3-70B'}",
                      "--world-size", "32", "--json"],
        "plan_no_fit": ["plan", "--config", str(ROOT / "configs/llama3_8b_packed_sft.yaml"),
                        f"model.hf_dir={ROOT / 'configs/models/Meta-Llama-3-8B'}", "parallel.tp=1",
                        "parallel.sequence_parallel=false", "--world-size", "8"],
        "check_80": check + ["--gpu-memory-gb", "80"],
        "check_40": check + ["--gpu-memory-gb", "40"],
        "check_cpu": check,
    }}
    # two children side by side (about 20 s each): the measured steps, and everything else
    children = {}
    for name, parts in (("measured", ["measured"]), ("rest", ["parameters", "schedule", "grid", "cli"])):
        (tmp / f"spec_{name}.json").write_text(json.dumps({**spec, "parts": parts}))
        children[name] = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/memory_helpers.py"), str(tmp / f"spec_{name}.json"),
             str(tmp / f"out_{name}.json")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    out: dict = {"seconds": {}}
    for name, proc in children.items():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, stderr[-3000:])
        part = json.loads((tmp / f"out_{name}.json").read_text())
        out["seconds"].update(part.pop("seconds"))
        out.update(part)
    print("child seconds:", out["seconds"], out["parameters"]["seconds"])
    return out


def _expected_sum(hf: dict, published: int, tp: int, pp: int) -> int:
    """Published count + vocabulary padding + the norms each extra TP rank replicates + the tied output copy of the
    last stage (PP > 1), derived from config.json alone."""
    h, layers, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
    padded = -(-vocab // (128 * tp)) * 128 * tp  # megatron pads the vocabulary to a multiple of 128 x TP
    tied = bool(hf.get("tie_word_embeddings"))
    padding = (padded - vocab) * h * (1 if tied else 2)
    norms = (tp - 1) * (2 * layers + 1) * h
    tied_copy = padded * h if tied and pp > 1 else 0
    return published + padding + norms + tied_copy


def test_parameter_totals_are_the_published_counts(results):
    """From the shipped config.json files, to the parameter (Llama-3.2-1B tied: vocabulary padding excluded)."""
    models = results["parameters"]["models"]
    for name, published in MODELS.items():
        assert models[name]["1x1"]["total_parameters"] == published, name
    assert results["parameters"]["full_1b_tp8_pp4"]["total_parameters"] == MODELS["Llama-3.2-1B"]


def test_rank_parameters_sum_to_the_total_for_every_layout(results):
    """TP 1/2/4/8 x PP 1/2/4 for all four models (every layout is legal: heads, 8 KV heads, FFN and layers divide)."""
    from megapack.model.config import load_hf_config

    parts = results["parameters"]
    # TP ranks of a stage are identical (proved on all 32 positions of the tied 1B), so TP rank 0 x TP stands for them
    assert all(all(same) for same in parts["symmetry"].values()), parts["symmetry"]
    hf1 = load_hf_config(ROOT / "configs/models/Llama-3.2-1B")
    assert parts["full_1b_tp8_pp4"]["parameters"] == _expected_sum(hf1, MODELS["Llama-3.2-1B"], 8, 4)
    for name, published in MODELS.items():
        hf = load_hf_config(ROOT / "configs/models" / name)
        for tp, pp in LAYOUTS:
            got = parts["models"][name][f"{tp}x{pp}"]["parameters"]
            assert got == _expected_sum(hf, published, tp, pp), (name, tp, pp, got)


def test_microbatches_in_flight_follow_megatrons_schedule(results):
    """1F1B keeps pp - rank micro-batches; interleaved 1F1B megatron's warmup + 1 chunks (each 1/vpp of the stage),
    from megatron's own get_pp_rank_microbatches for PP 2/4/8, VPP none/2/4 and 1 to 4 x PP micro-batches."""
    rows = results["schedule"]
    assert len(rows) > 50
    assert [r for r in rows if abs(r[4] - r[5]) > 1e-9] == []
    assert [r[4] for r in rows if r[:4] == [4, 0, 2, 16]] == [5.5]  # megatron's penalty: pp x (1 + (pp-1)/(pp*vpp))


def test_memory_estimate_matches_a_measured_training_step(results):
    """The planner's total (weights, grads, Adam state, activations) is within 15% of the allocator's peak over the
    trainer's second step, at 512 and 2048 tokens, without and with (selective, full) recompute, fp32 and bf16."""
    measured, estimates = results["measured"]["peak_bytes"], results["measured"]["estimate_bytes"]
    assert results["measured"]["hf_config"]["hidden_size"] == MEASURED["hidden_size"]
    assert len(measured) == len(MEASURED_CASES) == 8
    for key, got in measured.items():
        assert abs(estimates[key] - got) / got <= 0.15, (key, estimates[key], got)
    # recompute really frees memory, and an estimate that ignored it would miss by more than the tolerance
    assert measured["2048/full/fp32"] < 0.7 * measured["2048/none/fp32"]
    assert abs(estimates["2048/none/fp32"] - measured["2048/full/fp32"]) / measured["2048/full/fp32"] > 0.15


def test_paper_grid_fits_80gb_gpus_at_32(results):
    """All 24 runs of configs/paper pass the planner on 80 GiB GPUs; they share one layout per model."""
    grid = results["grid"]
    assert len(grid) == 24
    assert [name for name, plan in grid.items() if not plan["fits"]] == []
    assert {tuple(plan["layout"]) for plan in grid.values()} == {(2, 1, 16), (8, 4, 1)}


def test_plan_cli_json_and_verdict(results):
    """--json carries the totals and every position; the table ends with the verdict and the lever to pull."""
    runs = results["cli"]
    js = runs["plan_json"]
    assert js["rc"] == 0
    plan = json.loads(js["stdout"])
    assert plan["total_parameters"] == MODELS["Meta-Llama-3-70B"] and plan["fits"] is True
    assert len(plan["ranks"]) == 32
    keys = {"tp_rank", "pp_rank", "parameters", "weight_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
            "total_bytes"}
    assert all(keys <= set(rank) for rank in plan["ranks"])
    assert {(r["tp_rank"], r["pp_rank"]) for r in plan["ranks"]} == {(t, p) for t in range(8) for p in range(4)}
    assert all(r["total_bytes"] == r["weight_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] + r["activation_bytes"]
               for r in plan["ranks"])
    no_fit = runs["plan_no_fit"]
    assert no_fit["rc"] == 2
    last = no_fit["stdout"].strip().splitlines()[-1]
    assert last.startswith("does not fit: rank position tp=0 pp=0 needs ") and "parallel.tp=2" in last
    assert "training.recompute=full" in last


def test_train_check_refuses_a_layout_that_does_not_fit(results):
    """With the shards present, `train --check` plans memory: passes at 80 GiB, refuses at 40 GiB in one line; on a
    CPU machine without --gpu-memory-gb there is nothing to compare with and it says so (memory: null)."""
    runs = results["cli"]
    ok = runs["check_80"]
    assert ok["rc"] == 0, ok["stderr"]
    assert json.loads(ok["stdout"].splitlines()[-1])["memory"]["fits"] is True
    refused = runs["check_40"]
    assert refused["rc"] == 1
    line = refused["stderr"].strip()
    assert "\n" not in line and line.startswith("error: parallel: does not fit: rank position tp=")
    assert "GiB (" in line and "bytes), over the limit 35.0 GiB" in line
    assert json.loads(runs["check_cpu"]["stdout"].splitlines()[-1])["memory"] is None
