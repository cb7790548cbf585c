"""`megapack convert`: Hugging Face safetensors <-> megatron torch_dist checkpoints (single process or torchrun)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from megapack.errors import MegapackError

TOKENIZER_SUBDIR = "tokenizer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Two forms: `hf-to-megatron --hf-dir D --output-dir C` and `megatron-to-hf --checkpoint-dir C --output-dir D`."""
    sub = parser.add_subparsers(dest="direction", required=True, help="hf-to-megatron or megatron-to-hf")
    to_mcore = sub.add_parser("hf-to-megatron", help="HF safetensors -> topology-independent torch_dist checkpoint",
                              formatter_class=parser.formatter_class)
    to_mcore.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    to_mcore.add_argument("--output-dir", required=True, help="new (empty) checkpoint directory")
    to_hf = sub.add_parser("megatron-to-hf", help="torch_dist checkpoint -> HF config.json + safetensors",
                           formatter_class=parser.formatter_class)
    to_hf.add_argument("--checkpoint-dir", required=True,
                       help="a megapack torch_dist checkpoint (one iter_XXXXXXX folder, a `convert hf-to-megatron` "
                            "output) or a run's checkpoints/ folder (its `latest`; stderr says which iteration)")
    to_hf.add_argument("--output-dir", required=True, help="new (empty) Hugging Face directory")
    to_hf.add_argument("--overwrite", action="store_true",
                       help="replace a non-empty --output-dir that holds a Hugging Face checkpoint (config.json)")
    to_hf.add_argument("--tokenizer-dir", default=None,
                       help="take the tokenizer from here, a folder or a tokenizer file (default: the checkpoint's "
                            "tokenizer/ folder, else the model directory the run trained, else the tokenizer file its "
                            "shards were made with, as its megapack.json records)")
    to_hf.add_argument("--no-tokenizer", action="store_true",
                       help="write the weights and config.json only (no tokenizer files)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size (e.g. 5GB, 500MB)")
    for sub_parser in (to_mcore, to_hf):
        sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="full tracebacks")
        sub_parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (under torchrun)")
        sub_parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size (under torchrun)")


def parse_size(text: str) -> int:
    """Bytes from a size such as '5GB', '500MB', '1024'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise MegapackError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MB")
    unit = (match.group(2) or "").upper().replace("I", "").rstrip("B")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(unit or " "))


def tokenizer_identity(hf_dir: Path) -> str | None:
    """vocab_identity of the first readable of original/tokenizer.model, tokenizer.model, tokenizer.json; else None."""
    from megapack.data.render.vocab import vocab_identity
    from megapack.model.hf_export import TOKENIZER_FILES

    for rel in ("original/tokenizer.model", "tokenizer.model", "tokenizer.json"):
        path = hf_dir / rel
        identity = vocab_identity(path) if path.is_file() and rel in TOKENIZER_FILES else None
        if identity is not None:
            return identity
    return None


def tokenizer_source(ckpt_dir: Path, meta: dict, given: str | None, skip: bool) -> Path | None:
    """Where megatron-to-hf takes the tokenizer from: --tokenizer-dir, the checkpoint's tokenizer/ folder
    (hf-to-megatron), else the model directory the run trained (megapack.json `hf_dir`; older training checkpoints:
    `model.hf_dir` of the config.yaml beside them), or when that holds no tokenizer file the one the shards were made
    with (megapack.json `tokenizer_model`). Refused in one line when that is unknown, gone, or holds another
    vocabulary than the checkpoint's."""
    from megapack.data.render.vocab import vocab_identity
    from megapack.model.hf_tokenizer import tokenizer_file
    from megapack.training.preflight.identity import same_tokenizer
    from megapack.training.preflight.identity import tokenizer_identity as trained_identity
    from megapack.training.preflight.resume import trained_model_dir

    if skip:
        return None
    hint = "give --tokenizer-dir DIR (the tokenizer files to carry) or --no-tokenizer (weights and config.json only)"
    if given is not None:
        source = Path(given)
    elif (ckpt_dir / TOKENIZER_SUBDIR).is_dir():
        source = ckpt_dir / TOKENIZER_SUBDIR
    else:
        recorded = trained_model_dir(ckpt_dir, meta)
        if recorded is None:
            raise MegapackError(f"{ckpt_dir}: megapack.json does not say which model directory the run trained "
                                f"(model.hf_dir); {hint}")
        if not Path(recorded).is_dir():
            raise MegapackError(f"{ckpt_dir}: the run's model directory {recorded} (model.hf_dir) is not there; {hint}")
        source = Path(recorded)
        shards_file = meta.get("tokenizer_model")  # a model folder without tokenizer files (the launcher's tiny one)
        if tokenizer_file(source) is None and shards_file and Path(shards_file).is_file():
            source = Path(shards_file)
    found = tokenizer_identity(source) if source.is_dir() else vocab_identity(source) if source.is_file() else None
    trained = trained_identity(meta)
    if same_tokenizer(found, trained) is False:
        raise MegapackError(f"{source}: its tokenizer ({found}) is not the one {ckpt_dir} was trained with "
                            f"({trained}); {hint}")
    return source


def checkpoint_to_export(path: Path) -> Path:
    """The checkpoint folder megatron-to-hf reads: `path` itself when it holds megapack.json, else the checkpoint a
    run's checkpoints/ folder names as `latest` (its newest published one), said on stderr; refused in one line."""
    import sys

    from megapack.model.checkpoint import METADATA_FILE
    from megapack.training.preflight.resume import ITER_RE, resume_checkpoint

    if (path / METADATA_FILE).is_file() or not path.is_dir():
        return path  # read_metadata names what is missing
    found = resume_checkpoint(path, key="--checkpoint-dir")
    if found is None:
        raise MegapackError(f"--checkpoint-dir {path}: holds no megapack.json, no `latest` and no iter_XXXXXXX folder "
                            f"(expected a megapack checkpoint or a run's checkpoints/ folder)")
    print(f"exporting {found} (iteration {int(ITER_RE.match(found.name).group(1))}, the latest of its run)",
          file=sys.stderr, flush=True)
    return found


def check_output_dir(out_dir: Path, overwrite: bool) -> bool:
    """Whether --output-dir must be cleared first: refused (one line) when it is a file, or not empty without
    --overwrite, or not empty and not a Hugging Face folder (no config.json) with it."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    if not out_dir.is_dir():
        raise MegapackError(f"--output-dir {out_dir}: exists and is not a directory")
    if not overwrite:
        raise MegapackError(f"--output-dir {out_dir}: exists and is not empty; pass --overwrite to replace it")
    if not (out_dir / "config.json").is_file():
        raise MegapackError(f"--output-dir {out_dir}: holds no config.json, so it is not a Hugging Face folder; "
                            f"--overwrite replaces only those")
    return True


def _trained(ckpt_dir: Path, meta: dict) -> dict | None:
    """The chat template record the checkpoint's run trained with (megapack.json, else its shards' meta.json)."""
    from megapack.inference.source import ModelSource, trained_template

    return trained_template(ModelSource("megatron", ckpt_dir, meta.get("hf_config") or {}, meta))


def _dtype_flags(hf_config: dict) -> dict:
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    return {"bf16": dtype == "bfloat16"}


def run(args: argparse.Namespace) -> int:
    """Run one conversion; every rank under torchrun calls this."""
    import torch.distributed as dist

    from megapack.model.builder import build_model
    from megapack.model.checkpoint import load_model_checkpoint, read_metadata, save_model_checkpoint
    from megapack.model.config import load_hf_config
    from megapack.model.hf_export import copy_tokenizer_files, export_hf
    from megapack.model.hf_tokenizer import prepare_tokenizer
    from megapack.model.hf_import import load_hf_weights
    from megapack.training.run.distributed import destroy_distributed, init_distributed

    out_dir = Path(args.output_dir)
    if args.direction == "hf-to-megatron" and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MegapackError(f"{out_dir}: --output-dir exists and is not empty (refusing to overwrite)")
    if args.direction == "hf-to-megatron":
        hf_dir = Path(args.hf_dir)
        hf_config = load_hf_config(hf_dir)
    else:
        replace = check_output_dir(out_dir, args.overwrite)
        ckpt_dir = checkpoint_to_export(Path(args.checkpoint_dir))
        meta = read_metadata(ckpt_dir)
        hf_config = meta["hf_config"]
        tokenizer_dir = tokenizer_source(ckpt_dir, meta, args.tokenizer_dir, args.no_tokenizer)  # before the work
        tokenizer = None if tokenizer_dir is None else prepare_tokenizer(tokenizer_dir, _trained(ckpt_dir, meta),
                                                                         str(ckpt_dir))
    init_distributed(tp=args.tp, pp=args.pp)
    if args.direction == "megatron-to-hf" and replace:  # every check passed: the old export goes, on rank 0 only
        if dist.get_rank() == 0:
            import shutil

            shutil.rmtree(out_dir)
        dist.barrier()
    try:
        model = build_model(hf_config, attention_backend="sdpa", perform_initialization=False,
                            **_dtype_flags(hf_config)).eval()
        if args.direction == "hf-to-megatron":
            load_hf_weights(model, hf_dir)
            out = Path(args.output_dir)
            tok_identity = tokenizer_identity(hf_dir)
            save_model_checkpoint(model, out, hf_config, tok_identity, extra={"source": str(hf_dir.resolve())})
            if dist.get_rank() == 0 and tok_identity is not None:
                copy_tokenizer_files(hf_dir, out / TOKENIZER_SUBDIR)
            if dist.get_rank() == 0:
                print(f"wrote torch_dist checkpoint {out}")
        else:
            load_model_checkpoint(model, ckpt_dir)
            copied = export_hf(model, hf_config, args.output_dir, tokenizer,
                               max_shard_bytes=parse_size(args.max_shard_size))
            if dist.get_rank() == 0:
                template = "" if tokenizer is None or tokenizer.chat_template is not None else " (no chat template)"
                carried = f"with the tokenizer of {tokenizer_dir}{template}: {', '.join(copied)}" if tokenizer \
                    else "without tokenizer files (--no-tokenizer)"
                print(f"wrote Hugging Face checkpoint {args.output_dir} {carried}")
    finally:
        destroy_distributed()
    return 0
