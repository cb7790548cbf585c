"""`megapack plan --config C [key=value ...] --world-size N`: will the run fit in GPU memory? (no GPU, no shards)"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `megapack plan`."""
    parser.add_argument("--config", required=True, help="run config (YAML); only its model's config.json is read")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    parser.add_argument("--world-size", type=int, required=True, help="number of GPUs (processes) of the run")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="memory of one GPU in GiB; 10%% of it and 1 GiB (CUDA context, NCCL) are kept back")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Print the per-rank memory plan; exit 0 when every rank fits, 2 when one does not."""
    import json

    from megapack.errors import MegapackError
    from megapack.training.preflight.config import load_config
    from megapack.training.memory.estimate import check_gpu_memory_gb, plan_config
    from megapack.training.memory.report import format_plan

    if args.world_size < 1:
        raise MegapackError(f"--world-size {args.world_size}: expected a positive number")
    check_gpu_memory_gb(args.gpu_memory_gb)
    plan = plan_config(load_config(args.config, args.overrides), args.world_size, args.gpu_memory_gb)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0 if plan["fits"] else 2
