"""`megapack train --config run.yaml [key.sub=value ...]`: packed SFT with megatron-core (launch with torchrun/srun)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `megapack train`."""
    parser.add_argument("--config", required=True, help="run config (YAML), see configs/")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    parser.add_argument("--check", action="store_true",
                        help="validate config, shards, checkpoint and layout; print them as JSON and exit (no GPU)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --check: the number of processes the run will have (default: from the launcher)")


def run(args: argparse.Namespace) -> int:
    """Validate the config (before any process group), then train."""
    from megapack.training.config import load_config
    from megapack.training.loop import quiet_warnings

    quiet_warnings()
    config = load_config(args.config, args.overrides)
    if args.check:
        import json

        from megapack.training.config import preflight

        layout, _meta, _hf, resume = preflight(config, args.world_size)
        print(json.dumps({"layout": layout.model_dump(), "resume_from": str(resume) if resume else None,
                          "log_dir": config.logging.dir or config.checkpoint.dir}))
        return 0
    from megapack.training.loop import train

    train(config)
    return 0
