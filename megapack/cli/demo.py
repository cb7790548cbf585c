"""`megapack demo`: the quickstart's main job on embedded defaults."""
from __future__ import annotations

import argparse
import dataclasses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags: every field of DemoConfig."""
    from megapack.demo import DemoConfig

    defaults = DemoConfig()
    parser.add_argument("--workdir", default=defaults.workdir,
                        help="where data, shards, checkpoints and logs go (LLaMA-Factory's demo data: <workdir>/data)")
    parser.add_argument("--dataset", default=defaults.dataset, help="a dataset of LLaMA-Factory's demo registry")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples, help="records to use")
    parser.add_argument("--seq-length", type=int, default=defaults.seq_length, help="tokens per pack")
    parser.add_argument("--packings", default=",".join(defaults.packings), help="comma list of packings to compare")
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="training processes (torchrun)")
    parser.add_argument("--tp", type=int, default=defaults.tp, help="tensor-parallel size (rest is data parallel)")
    parser.add_argument("--global-batch-size", type=int, default=defaults.global_batch_size,
                        help="sequences (packs, or conversations in the padding arm) per optimizer step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (cosine decay to lr/10)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="epochs per arm")
    parser.add_argument("--no-train", dest="train", action="store_false", help="only fetch the data and preprocess it (no training, no report)")


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed flags."""
    from megapack.demo import DemoConfig, run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["packings"] = tuple(p for p in values["packings"].split(",") if p)
    run_demo(DemoConfig(**values))
    return 0
