"""`megapack train --config run.yaml [key.sub=value ...]`: packed SFT with megatron-core (launch with torchrun/srun)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `megapack train`."""
    parser.add_argument("--config", action="append",
                        help="run config (YAML), see configs/; repeat it to train several runs one after another in "
                             "one launch (one process start and import, e.g. comparing packings)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values (every run)")
    parser.add_argument("--check", action="store_true",
                        help="validate config, shards (data.verify fast: files, sizes, indexes; token ids against the "
                             "vocabulary), checkpoint, layout and output directories; print the plan and its warnings "
                             "as JSON (a line per config) and exit (no GPU)")
    parser.add_argument("--print-defaults", action="store_true",
                        help="print every config key at its default as YAML (with what each means) and exit; the "
                             "reference: megapack/training/CONFIG.md")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --check: the number of processes the run will have (default: from the launcher)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="with --check: GiB per GPU to check the layout's memory against (`megapack plan`); "
                             "default: this machine's GPU, no memory check on a machine without one")


def run(args: argparse.Namespace) -> int:
    """Plan every config (before any process group), then train them in order."""
    if args.print_defaults:
        from megapack.training.preflight.reference import default_yaml

        print(default_yaml(), end="")
        return 0
    if not args.config:
        from megapack.errors import MegapackError

        raise MegapackError("megapack train: --config is required (or --print-defaults to see every key)")
    from megapack.training.run.signals import install_stop_handlers

    install_stop_handlers()  # before the slow part: Slurm's SIGUSR1 may come while the model loads
    from megapack.training.preflight.config import load_config
    from megapack.training.preflight.plan import preflight

    configs = [load_config(path, args.overrides) for path in args.config]
    plans = [preflight(config, args.world_size) for config in configs]  # every check passes before the first run
    if args.check:
        import json

        from megapack.training.memory.report import check_run_memory

        memory = [check_run_memory(config, plan.world_size, args.gpu_memory_gb) for config, plan in zip(configs, plans)]
        for config, plan, mem in zip(configs, plans, memory):
            print(json.dumps({"plan": plan.summary(), "log_dir": config.logging.dir or config.checkpoint.dir,
                              "warnings": plan.warnings, "memory": mem}))
        return 0
    from megapack.errors import MegapackError
    from megapack.training.run.distributed import destroy_distributed
    from megapack.training.run.loop import Trainer

    for i, (config, plan) in enumerate(zip(configs, plans)):
        more = i < len(configs) - 1
        try:
            trainer = Trainer(config, plan)
        except MegapackError as exc:
            if getattr(args, "debug", False):
                raise
            # every rank prints its line before tearing the process group down: the launcher stops the other
            # ranks as soon as one exits (e.g. data.verify full, which fails on all ranks at once)
            from megapack.cli import print_error

            print_error(exc)
            destroy_distributed()
            return 1
        if trainer.run(keep_process_group=more)["interrupted"] and more:
            destroy_distributed()  # a signal stops the remaining runs too
            break
    return 0
