"""The memory planner's test work, run in ONE child interpreter (`python tests/memory_helpers.py spec.json out.json`).

The planner installs megapack's CPU compatibility layer and a fake process group, and the measurement a gloo one:
neither may leak into the pytest process, and one child pays the megatron import once.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"Meta-Llama-3-8B": 8_030_261_248, "Meta-Llama-3-70B": 70_553_706_496, "Mistral-7B-v0.1": 7_241_732_096,
          "Llama-3.2-1B": 1_235_814_400}
LAYOUTS = [(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 4)]
# the measured model: on the CPU, hidden 256, 2 layers, GQA, a vocabulary large enough for the loss to matter
MEASURED = dict(vocab_size=8192, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512)
# fp32 at two lengths x three recompute settings; bf16 (bf16 weights, fp32 main grads, master and moments) twice
MEASURED_CASES = [(s, r, "fp32") for s in (512, 2048) for r in ("none", "selective", "full")] + \
    [(512, "none", "bf16"), (2048, "full", "bf16")]


def parameter_sums() -> dict:
    """Per model and layout: the meta-built positions' parameter sums; plus the TP-symmetry proof case."""
    from megapack.model.config import load_hf_config
    from megapack.training.memory.meta_build import build_position, build_positions
    from megapack.training.memory.estimate import plan_memory

    out: dict = {"models": {}, "seconds": {}}
    t0 = time.perf_counter()
    # the proof that every TP rank of a stage holds the same tensors: all 32 positions of the tied 1B at TP8 x PP4
    hf1 = load_hf_config(ROOT / "configs/models/Llama-3.2-1B")
    full = build_positions(hf1, 8, 4, sequence_parallel=True)
    out["symmetry"] = {str(p): [list(q.param_numels) == list(full[p * 8].param_numels) for q in full[p * 8:p * 8 + 8]]
                       for p in range(4)}
    out["full_1b_tp8_pp4"] = {"parameters": sum(q.parameters for q in full),
                              "total_parameters": plan_memory(hf1, world_size=32, tp=8, pp=4,
                                                              sequence_parallel=True)["total_parameters"]}
    out["seconds"]["symmetry"] = time.perf_counter() - t0
    for name in MODELS:
        hf = load_hf_config(ROOT / "configs/models" / name)
        rows = {}
        t0 = time.perf_counter()
        for tp, pp in LAYOUTS:
            # TP rank 0 of every stage, times TP (the symmetry above)
            stage = [build_position(hf, tp, pp, 0, p, sequence_parallel=tp > 1) for p in range(pp)]
            rows[f"{tp}x{pp}"] = {"parameters": tp * sum(q.parameters for q in stage)}
        rows["1x1"]["total_parameters"] = plan_memory(hf, world_size=1)["total_parameters"]
        out["models"][name] = rows
        out["seconds"][name] = time.perf_counter() - t0
    return out


def schedule_in_flight() -> list:
    """(ours, megatron's) in-flight chunk-micro-batches per (pp, rank, vpp, micro-batches): megatron's own warmup
    count (schedules.get_pp_rank_microbatches) plus the one in steady state, capped by the total."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    from megapack.training.memory.estimate import microbatches_in_flight

    rows = []
    for pp in (2, 4, 8):
        for vpp in (None, 2, 4):
            for micro in (1, 3, pp, 4 * pp):
                if vpp and micro % pp:
                    continue  # megatron's interleaved schedule needs micro-batches in multiples of pp
                for rank in range(pp):
                    group = SimpleNamespace(size=lambda pp=pp: pp, rank=lambda rank=rank: rank)
                    comm = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp)
                    total, _all, warmup, _rest = get_pp_rank_microbatches(micro, vpp or 1, pp, p2p_communicator=comm)
                    theirs = min(warmup + 1, total) / (vpp or 1)
                    rows.append([pp, rank, vpp, micro, microbatches_in_flight(pp, rank, micro, vpp), theirs])
    return rows


def grid_plans() -> dict:
    """`plan_config` of each configs/paper run at 32 GPUs of 80 GiB (model.hf_dir -> configs/models)."""
    from megapack.training.preflight.config import load_config
    from megapack.training.memory.estimate import plan_config

    sys.path.insert(0, str(ROOT / "tools"))
    import paper_grid

    plans = {}
    for path in sorted((ROOT / "configs/paper").glob("*.yaml")):
        model = path.stem.split("_")[0]
        config = load_config(path, [f"model.hf_dir={ROOT / paper_grid.MODELS[model]['planner_config']}"])
        plan = plan_config(config, paper_grid.WORLD_SIZE, 80.0)
        plans[path.stem] = {"fits": plan["fits"], "worst": plan["worst"], "limit_bytes": plan["limit_bytes"],
                            "layout": [plan["tp"], plan["pp"], plan["dp"]]}
    return plans


def cli_runs(spec: dict) -> dict:
    """`megapack plan` (JSON, a table that fits, one that does not) and `megapack train --check` in this process."""
    from megapack.cli import main

    runs = {}
    for key, argv in spec.get("cli", {}).items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        runs[key] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
    return runs


def context_parallel_plans() -> dict:
    """LLaMA-3.1-8B at 128K tokens on 32 GPUs at CP 1, 4 and 8 (TP1 and TP2 with SP, no recompute), and the
    parameters of a CP rank > 0 against CP 1's (CP shards activations, never parameters)."""
    from megapack.model.config import load_hf_config
    from megapack.training.memory.estimate import plan_memory
    from megapack.training.memory.meta_build import build_position

    hf = load_hf_config(ROOT / "configs/models/Meta-Llama-3.1-8B")
    plans = {f"tp{tp}/cp{cp}": plan_memory(hf, world_size=32, tp=tp, cp=cp, sequence_parallel=tp > 1,
                                           seq_length=131072, num_microbatches=4)
             for tp in (1, 2) for cp in (1, 4, 8)}
    cp1, cp4 = build_position(hf, 2, 2, 1, 1), build_position(hf, 2, 2, 1, 1, cp=4, cp_rank=3)
    return {"plans": plans, "same_parameters": list(cp1.param_numels) == list(cp4.param_numels),
            "parameters": [cp1.parameters, cp4.parameters]}


def _live_bytes() -> int:
    """Bytes of every distinct CPU tensor storage alive (the state before a step: weights, grads, Adam moments)."""
    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _peak_during(fn) -> int:
    """Peak of the bytes the CPU allocator handed out during fn() above what was allocated before.

    Why this method: torch's CPU allocator keeps no statistics, and tracemalloc does not see it; but c10 reports
    every CPU allocation and free with its size to the profiler (`profile_memory=True`, the `[memory]` events).
    Summing those in time order gives the exact running total of bytes allocated since the start, whatever
    allocated them (autograd's saved tensors, kernels' workspaces, the optimizer), and its maximum is the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def _batch(tokens: int, vocab: int, segments: int = 4):
    import torch

    from megapack.training.run.batch import Batch

    seg = tokens // segments
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    cu = torch.arange(0, tokens + 1, seg, dtype=torch.int32)
    return Batch(tokens=ids, positions=(torch.arange(tokens) % seg)[None], targets=torch.roll(ids, -1, 1),
                 loss_weight=torch.ones(1, tokens), cu_seqlens=cu, cu_seqlens_padded=cu, max_seqlen=seg,
                 loss_denominator=tokens)


def measure_steps() -> dict:
    """Peak bytes of the trainer's second training step (weights, grads, optimizer state, activations) per case."""
    import torch

    from megapack.model.tiny_checkpoint import tiny_llama_config
    from megapack.training.preflight.config import OptimizerConfig
    from megapack.training.run.distributed import destroy_distributed, init_distributed
    from megapack.training.run.loop import build_model_and_optimizer
    from megapack.training.run.step import train_step

    torch.set_num_threads(1)
    hf = tiny_llama_config(**MEASURED)
    env = init_distributed()
    results = {}
    try:
        for tokens, recompute, precision in MEASURED_CASES:
            gc.collect()
            leftover = _live_bytes()  # what earlier cases left (megatron keeps some of their objects reachable)
            parts = build_model_and_optimizer(hf, OptimizerConfig(), attention_backend="sdpa", precision=precision,
                                              row_length=tokens, total_steps=10, recompute=recompute)
            batch = _batch(tokens, MEASURED["vocab_size"])

            def step(parts=parts, batch=batch, tokens=tokens):
                train_step(parts.model, parts.optimizer, parts.scheduler, iter([batch]), 1, tokens, env.device)

            step()  # the first step creates the Adam moments
            del parts
            gc.collect()
            before = _live_bytes() - leftover
            results[f"{tokens}/{recompute}/{precision}"] = before + _peak_during(step)
            del step
            gc.collect()
    finally:
        destroy_distributed()
    from megapack.training.memory.estimate import plan_memory

    estimates = {f"{tokens}/{recompute}/{precision}": plan_memory(
        hf, world_size=1, seq_length=tokens, recompute=recompute, precision=precision, device="cpu",
    )["ranks"][0]["total_bytes"] for tokens, recompute, precision in MEASURED_CASES}
    return {"hf_config": hf, "peak_bytes": results, "estimate_bytes": estimates}


def main(spec_path: str, out_path: str) -> None:
    """Run the parts the spec asks for and write their results as JSON."""
    from megapack.quiet import quiet_warnings

    quiet_warnings()
    spec = json.loads(Path(spec_path).read_text())
    out, seconds = {}, {}
    for part, fn in (("parameters", parameter_sums), ("schedule", schedule_in_flight), ("grid", grid_plans),
                     ("context", context_parallel_plans), ("cli", lambda: cli_runs(spec)), ("measured", measure_steps)):
        if part in spec["parts"]:
            t0 = time.perf_counter()
            out[part] = fn()
            seconds[part] = round(time.perf_counter() - t0, 2)
    out["seconds"] = seconds
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
