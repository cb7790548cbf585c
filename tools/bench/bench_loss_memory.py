"""Peak memory of a training step with megatron's full-logits loss against megapack's chunked loss (CPU).

The model has LLaMA-3's vocabulary (128,256 entries) on a small body (hidden 256, one layer), so the output layer and
the loss are most of a step, as they are for the last pipeline stage of a large model. For each row length and
precision, the trainer's second step runs with `model.loss_chunk_tokens` 0 (megatron's loss over the full logits) and
with chunks of 1,024 and 256 tokens; the peak is what the CPU allocator handed out during the step (profiler memory
events, tests/memory_helpers.py) plus every tensor alive before it. Also prints `megapack plan`'s estimate for each
case and the loss of the step (the same up to summation order). A table, not a test.

    python tools/bench/bench_loss_memory.py [--tokens 1024 4096] [--precision fp32 bf16]
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))

MODEL = dict(vocab_size=128256, hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=512)
CHUNKS = (0, 1024, 256)


def planned(tokens: int, precision: str, chunk: int) -> int:
    """`megapack plan`'s bytes for the case (before torch.distributed starts: the planner has its own group)."""
    from megapack.model.tiny_checkpoint import tiny_llama_config
    from megapack.training.memory.estimate import plan_memory

    return plan_memory(tiny_llama_config(**MODEL), world_size=1, seq_length=tokens, precision=precision, device="cpu",
                       loss_chunk_tokens=chunk)["ranks"][0]["total_bytes"]


def measure(tokens: int, precision: str, chunk: int, env) -> tuple[int, float]:
    """(measured peak bytes, loss) of the trainer's second step."""
    import memory_helpers
    import torch

    from megapack.model.tiny_checkpoint import tiny_llama_config
    from megapack.training.preflight.config import OptimizerConfig
    from megapack.training.run.loop import build_model_and_optimizer
    from megapack.training.run.step import train_step

    hf = tiny_llama_config(**MODEL)
    gc.collect()
    leftover = memory_helpers._live_bytes()
    torch.manual_seed(0)  # the same initial weights in every case
    parts = build_model_and_optimizer(hf, OptimizerConfig(), attention_backend="sdpa", precision=precision,
                                      row_length=tokens, total_steps=10, loss_chunk_tokens=chunk)
    batch = memory_helpers._batch(tokens, MODEL["vocab_size"])
    losses = []

    def step() -> None:
        losses.append(train_step(parts.model, parts.optimizer, parts.scheduler, iter([batch]), 1, tokens,
                                 env.device)["loss"])

    step()  # the first step creates the Adam moments
    gc.collect()
    before = memory_helpers._live_bytes() - leftover
    peak = before + memory_helpers._peak_during(step)
    del parts
    gc.collect()
    return peak, losses[-1]


def main() -> None:
    """Measure every case in this process and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    import torch

    from megapack.quiet import quiet_warnings
    from megapack.training.run.distributed import destroy_distributed, init_distributed

    quiet_warnings()
    torch.set_num_threads(2)
    cases = [(t, p, c) for t in args.tokens for p in args.precision for c in CHUNKS]
    plans = {case: planned(*case) for case in cases}
    env = init_distributed()
    print("| tokens | precision | loss_chunk_tokens | peak MB | vs full logits | planned MB | planned / measured | loss |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    try:
        full = 0
        for tokens, precision, chunk in cases:
            peak, loss = measure(tokens, precision, chunk, env)
            full = peak if chunk == 0 else full
            plan = plans[(tokens, precision, chunk)]
            print(f"| {tokens} | {precision} | {chunk or 'full'} | {peak / 1e6:.0f} | {peak / full:.2f} | "
                  f"{plan / 1e6:.0f} | {plan / peak:.3f} | {loss:.6f} |", flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
