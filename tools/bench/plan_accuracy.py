"""How close `megapack plan` comes to measured memory; prints two tables (not a test).

1. CPU: the trainer's second training step of a tiny model (hidden 256, 2 layers, vocabulary 8192, SDPA) at
   512 and 2048 tokens without and with recompute, fp32 and bf16: the allocator's peak (profiler memory events, plus every tensor
   alive before the step; tests/memory_helpers.py) against the planner's total for device "cpu".
2. GPU: the planner's total for the GPU check's step-2 model (tools/README.md: 8 layers of LLaMA-3-8B, one GPU, bf16,
   distributed AdamW; packed arm one 4096-token pack per micro-batch, padded arm 2 conversations of at most 4096)
   against the peak `torch.cuda.max_memory_allocated` that run reported (H200, 2026-11-26).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

GIB = 2**30
# tools/README.md "GPU check", step 2 (torch_varlen): peak GiB per arm, and that arm's tokens per micro-batch at most
GPU_CHECK_PEAK_GIB = {"packed (bfd)": (57.4, 1), "padded (2 per micro-batch)": (62.3, 2)}


def main() -> None:
    """Measure the CPU cases in this process, then plan the GPU check's model; print both comparisons."""
    import memory_helpers

    from megapack.model.config import load_hf_config
    from megapack.training.memory.estimate import plan_memory

    measured = memory_helpers.measure_steps()
    print("| tokens | recompute | precision | measured MB | planned MB | planned / measured |")
    print("|---:|---|---|---:|---:|---:|")
    for key, got in measured["peak_bytes"].items():
        tokens, recompute, precision = key.split("/")
        est = measured["estimate_bytes"][key]
        print(f"| {tokens} | {recompute} | {precision} | {got / 1e6:.1f} | {est / 1e6:.1f} | {est / got:.3f} |")
    hf = load_hf_config(ROOT / "configs/models/Meta-Llama-3-8B") | {"num_hidden_layers": 8}
    print()
    print("| GPU check arm | measured peak GiB (H200) | planned GiB | planned / measured |")
    print("|---|---:|---:|---:|")
    for arm, (peak, mbs) in GPU_CHECK_PEAK_GIB.items():
        # that run (2026-11-26) computed megatron's loss over the full logits: plan it so (loss_chunk_tokens=0)
        plan = plan_memory(hf, world_size=1, seq_length=4096, micro_batch_size=mbs, num_microbatches=8,
                           loss_chunk_tokens=0)
        est = plan["ranks"][0]["total_bytes"] / GIB
        print(f"| {arm} | {peak} | {est:.1f} | {est / peak:.3f} |")


if __name__ == "__main__":
    main()
