"""`megapack inspect DIR`: statistics of a shard directory; --verify, --show i, --plot out.png."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the inspect flags."""
    parser.add_argument("dir", help="output directory of megapack preprocess")
    parser.add_argument("--split", default="train", help="split for --show and --plot (train or val)")
    parser.add_argument("--verify", action="store_true", help="re-check every checksum and structural invariant")
    parser.add_argument("--show", type=int, action="append", metavar="I", help="print pack I, trained tokens in «»")
    parser.add_argument("--tokenizer-model", help="tokenizer for --show (default: the one recorded in meta.json)")
    parser.add_argument("--plot", metavar="OUT.png", help="draw the conversation-length histogram and the pack fill, "
                        "with the split's numbers (padding shards: the fill of the trainer's padded micro-batches)")
    parser.add_argument("--micro-batch-size", type=int, default=1, metavar="N",
                        help="padding shards, --plot: conversations per micro-batch, as training.micro_batch_size "
                             "(default 1, its default); each micro-batch is padded to its longest, rounded up to 8")
    parser.add_argument("--train-seed", type=int, default=1234, metavar="S",
                        help="padding shards, --plot: training.seed (default 1234, its default), which orders "
                             "epoch 0's train micro-batches")


def run(args: argparse.Namespace) -> int:
    """Print statistics, then do what the flags ask; exit 1 when --verify finds problems."""
    from megapack.data.packs.views import plot, render_pack
    from megapack.data.packs.verify import verify
    from megapack.data.packs.shards import read_meta, ShardDataset
    from megapack.data.packs.summary import summary_rows, table
    from megapack.errors import MegapackError
    from megapack.seeds import check_seed

    check_seed(args.train_seed, "--train-seed")
    if args.micro_batch_size < 1:
        raise MegapackError(f"--micro-batch-size {args.micro_batch_size}: expected at least 1")
    meta = read_meta(args.dir)
    print(f"{args.dir}:\n{table(summary_rows(meta))}")
    status = 0
    if args.verify:
        problems = verify(args.dir)
        for p in problems:
            print(f"verify: {p}", file=sys.stderr)
        print(f"verify: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
        status = 1 if problems else 0
    if args.show or args.plot:
        ds = ShardDataset(args.dir, args.split)
    if args.show:
        tokenizer = None
        path = args.tokenizer_model or meta.get("tokenizer_model")
        if path:
            from megapack.data.render.tokenizers import load_tokenizer

            try:
                tokenizer = load_tokenizer(path)
            except MegapackError as exc:
                print(f"note: showing token ids ({exc})", file=sys.stderr)
        for i in args.show:
            if not -len(ds) <= i < len(ds):
                raise MegapackError(f"--show {i}: expected a pack index in [0, {len(ds)})")
            print(render_pack(ds, i, tokenizer))
    if args.plot:
        numbers = plot(ds, args.plot, args.micro_batch_size, args.train_seed)
        if "padding_fraction" in numbers:
            print(f"padded micro-batches (micro_batch_size {args.micro_batch_size}): {numbers['micro_batches']:,}, "
                  f"{numbers['padding_fraction']:.1%} of the tokens computed are padding")
        print(f"wrote {args.plot}")
    return status
