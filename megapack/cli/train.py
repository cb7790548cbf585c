"""`megapack train --config run.yaml [key.sub=value ...]`: packed SFT with megatron-core (launch with torchrun/srun)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `megapack train`."""
    parser.add_argument("--config", required=True, help="run config (YAML), see configs/")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    parser.add_argument("--check", action="store_true",
                        help="validate the config against the shards and world size, print the layout, and exit")


def run(args: argparse.Namespace) -> int:
    """Validate the config (before any process group), then train."""
    from megapack.training.config import load_config
    from megapack.training.loop import quiet_warnings

    quiet_warnings()

    config = load_config(args.config, args.overrides)
    if args.check:
        from megapack.training.loop import preflight

        layout, _meta, _hf, resume = preflight(config)
        print(layout.model_dump_json())
        if resume is not None:
            print(f"would resume from {resume}")
        return 0
    from megapack.training.loop import train

    result = train(config)
    return 0 if result is not None else 1
