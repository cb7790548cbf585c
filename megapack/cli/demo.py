"""`megapack demo`: the quickstart's main job on embedded defaults (`--model smollm2`: the real-model miniature)."""
from __future__ import annotations

import argparse
import dataclasses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags: every field of DemoConfig, and of QualityConfig with --model smollm2 (unset: that model's default)."""
    from megapack.demo import DemoConfig
    from megapack.demo_quality import MODELS, QualityConfig

    tiny, real = DemoConfig(), QualityConfig()

    def both(field: str) -> str:
        return f"(tiny: {getattr(tiny, field)}; smollm2: {getattr(real, field)})"

    parser.add_argument("--model", default="tiny", choices=("tiny", *MODELS),
                        help="tiny: a random tiny LLaMA-3 model, the time table only (Table 3); smollm2: "
                             "SmolLM2-135M-Instruct fine-tuned per arm, with validation loss and local-task scores "
                             "before and after (Table 1) beside the time table")
    parser.add_argument("--workdir", default=argparse.SUPPRESS,
                        help=f"where data, shards, checkpoints and logs go {both('workdir')}")
    parser.add_argument("--dataset", default=tiny.dataset, help="a dataset of LLaMA-Factory's demo registry (tiny)")
    parser.add_argument("--num-samples", type=int, default=argparse.SUPPRESS,
                        help=f"LLaMA-Factory demo records to train on {both('num_samples')}")
    parser.add_argument("--seq-length", type=int, default=argparse.SUPPRESS,
                        help=f"tokens per pack {both('seq_length')}")
    parser.add_argument("--packings", default=",".join(tiny.packings), help="comma list of packings to compare")
    parser.add_argument("--nproc", type=int, default=tiny.nproc, help="training processes (torchrun)")
    parser.add_argument("--tp", type=int, default=tiny.tp, help="tensor-parallel size, tiny (rest is data parallel)")
    parser.add_argument("--global-batch-size", type=int, default=tiny.global_batch_size,
                        help="sequences (packs, or conversations in the padding arm) per optimizer step")
    parser.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                        help=f"peak learning rate, cosine decay to lr/10 {both('lr')}")
    parser.add_argument("--epochs", type=float, default=argparse.SUPPRESS, help=f"epochs per arm {both('epochs')}")
    parser.add_argument("--arithmetic", type=int, default=real.arithmetic,
                        help="smollm2: generated arithmetic chats to train on (a quarter multi-turn)")
    parser.add_argument("--valid-arithmetic", type=int, default=real.valid_arithmetic,
                        help="smollm2: held-out generated arithmetic chats to validate on")
    parser.add_argument("--eval-limit", type=int, default=real.eval_limit,
                        help="smollm2: questions per local task (0: all)")
    parser.add_argument("--no-contaminated", dest="contaminated", action="store_false",
                        help="smollm2: leave out the bfd arm with model.cross_sample_attention true")
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="only fetch the data and preprocess it (no training, no report)")


def run(args: argparse.Namespace) -> int:
    """Run the demo (or the real-model miniature) with the parsed flags."""
    from megapack.demo import DemoConfig, run_demo
    from megapack.demo_quality import QualityConfig, run_quality

    config = DemoConfig if args.model == "tiny" else QualityConfig
    fields = {f.name for f in dataclasses.fields(config)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["packings"] = tuple(p for p in values["packings"].split(",") if p)
    if config is DemoConfig:
        run_demo(DemoConfig(**values))
    else:
        values["eval_limit"] = values.get("eval_limit") or None
        run_quality(QualityConfig(**values))
    return 0
