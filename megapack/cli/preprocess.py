"""`megapack preprocess`: tokenize, pack and write indexed shards (flags in the spirit of Megatron-LM's tool)."""
from __future__ import annotations

import argparse
import dataclasses
import sys


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the preprocess flags; choices come from the registries, defaults from PreprocessConfig."""
    from megapack.data.packs.packing import PACKINGS
    from megapack.data.pipeline.preprocess import MIN_SEQ_LENGTH, PreprocessConfig
    from megapack.data.render.templates import TEMPLATES
    from megapack.data.render.tokenizers import TOKENIZER_KINDS
    from megapack.data.sources.formats import ON_ERROR
    from megapack.data.sources.registry import FORMATS

    default = {f.name: f.default for f in dataclasses.fields(PreprocessConfig)}
    src = parser.add_argument_group("input")
    src.add_argument("--input", type=_csv, action="extend", metavar="PATH[,PATH...]", help="data files or folders")
    src.add_argument("--dataset", type=_csv, action="extend", metavar="NAME[,NAME...]", help="names in dataset_info.json")
    src.add_argument("--dataset-dir", help="folder holding dataset_info.json (LLaMA-Factory layout)")
    src.add_argument("--format", default=default["format"], choices=FORMATS,
                     help="record format (auto: detected per file; default %(default)s)")
    src.add_argument("--on-error", default=default["on_error"], choices=ON_ERROR,
                     help="bad records: count and skip, or stop (default %(default)s)")
    src.add_argument("--max-record-depth", type=int, default=default["max_record_depth"], metavar="N",
                     help="a record nested deeper is a bad record (default %(default)s)")
    src.add_argument("--max-record-bytes", type=int, default=default["max_record_bytes"], metavar="B",
                     help="a larger record is a bad record (default %(default)s, 16 MiB)")
    tok = parser.add_argument_group("tokenizer and template")
    tok.add_argument("--tokenizer-model", required=True,
                     help="tiktoken ranks / SentencePiece / tokenizer.json file or checkpoint dir")
    tok.add_argument("--tokenizer-type", default=default["tokenizer_type"], choices=TOKENIZER_KINDS,
                     help="tokenizer kind (auto: detected from the file; default %(default)s)")
    tok.add_argument("--template", default=default["template"], choices=(*TEMPLATES, "hf"),
                     help="chat template; hf: the checkpoint's own chat_template (default %(default)s)")
    tok.add_argument("--chat-template-from", default=None, metavar="DIR",
                     help="--template hf: checkpoint folder with tokenizer_config.json / chat_template.jinja "
                          "(default: the --tokenizer-model folder)")
    tok.add_argument("--template-date", default=None, metavar="YYYY-MM-DD",
                     help="--template hf: the date strftime_now returns (needed by templates that print today's date)")
    tok.add_argument("--train-on-prompt", action="store_true", help="loss on every token, not only responses")
    tok.add_argument("--mask-history", action="store_true", help="loss on the last response only")
    tok.add_argument("--system", default=None, help="system prompt for conversations without one")
    pack = parser.add_argument_group("packing")
    pack.add_argument("--seq-length", type=int, default=default["seq_length"], metavar="L",
                      help=f"tokens per pack, at least {MIN_SEQ_LENGTH} (default %(default)s)")
    pack.add_argument("--packing", default=default["packing"],  # checked by the job: a one-line error, exit 1
                      help=f"one of {', '.join(PACKINGS)} (default %(default)s)")
    pack.add_argument("--pad-to-multiple", type=int, default=default["pad_to_multiple"], metavar="K",
                      help="round each segment up to K tokens (default %(default)s)")
    pack.add_argument("--drop-long", action="store_true",
                      help="drop conversations longer than --seq-length (else truncate)")
    pack.add_argument("--seed", type=int, default=default["seed"],
                      help="seed of the pack order and the val split (default %(default)s)")
    pack.add_argument("--val-fraction", type=float, default=default["val_fraction"],
                      help="held-out fraction, written as the val split (default %(default)s)")
    out = parser.add_argument_group("output and scale")
    out.add_argument("--output-dir", required=True, help="the shard directory to write")
    out.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --output-dir")
    out.add_argument("--workers", type=int, default=default["workers"],
                     help="tokenizer processes (default %(default)s)")
    out.add_argument("--num-partitions", type=int, default=default["num_partitions"],
                     help="split the records into P parts (multi-node; default %(default)s)")
    out.add_argument("--partition-index", type=int, default=None,
                     help="tokenize only part i and stop; a run without it packs all parts (tokenizing missing ones)")
    out.add_argument("--max-shard-tokens", type=int, default=default["max_shard_tokens"],
                     help="tokens per shard file at most (default %(default)s)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run preprocessing and print the summary table."""
    from megapack.data.pipeline.preprocess import PreprocessConfig, run_preprocess
    from megapack.data.packs.summary import summary_rows, table

    cfg = PreprocessConfig(
        output_dir=args.output_dir, tokenizer_model=args.tokenizer_model, inputs=args.input, datasets=args.dataset,
        dataset_dir=args.dataset_dir, format=args.format, tokenizer_type=args.tokenizer_type, template=args.template,
        chat_template_from=args.chat_template_from, template_date=args.template_date,
        train_on_prompt=args.train_on_prompt, mask_history=args.mask_history, system=args.system,
        seq_length=args.seq_length, packing=args.packing, pad_to_multiple=args.pad_to_multiple,
        drop_long=args.drop_long, seed=args.seed, val_fraction=args.val_fraction, workers=args.workers,
        on_error=args.on_error, max_record_depth=args.max_record_depth,
        max_record_bytes=args.max_record_bytes, overwrite=args.overwrite, num_partitions=args.num_partitions,
        partition_index=args.partition_index, max_shard_tokens=args.max_shard_tokens, progress=not args.no_progress,
    )
    result = run_preprocess(cfg)
    if args.partition_index is not None:
        rows = [(k, result[k]) for k in ("records", "conversations", "tokens", "trained_tokens")]
        rows += [(f"skipped: {r}", n) for r, n in sorted(result["skipped"].items())]
        print(f"partition {args.partition_index}/{args.num_partitions} of {args.output_dir}"
              f" {'reused' if result['reused'] else 'done'}:\n{table(rows)}")
        return 0
    print(f"wrote {args.output_dir}:\n{table(summary_rows(result))}")
    for line in result.get("skipped_examples", [])[:5]:
        print(f"  e.g. {line}", file=sys.stderr)
    return 0
