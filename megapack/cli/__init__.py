"""The `megapack` command: one subcommand per job, each a thin layer of argument parsing over library functions."""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from megapack.errors import MegapackError

# subcommand -> (module under megapack.cli, one-line help). Each module defines add_arguments(parser) and run(args).
SUBCOMMANDS = {
    "preprocess": ("preprocess", "tokenize, pack and write indexed shards from chat datasets"),
    "train": ("train", "packed SFT with megatron-core (launch with torchrun or srun)"),
    "launch": ("launch", "run a command on every rank with torchrun; a failed rank ends it with one line"),
    "plan": ("plan", "per-GPU memory of a run's layout from the model's config.json: will it fit? (no GPU needed)"),
    "convert": ("convert", "convert checkpoints between Hugging Face and megatron torch_dist"),
    "generate": ("generate", "answer a prompt or a chat with a trained checkpoint (megatron or HF; greedy or sampled)"),
    "eval": ("eval", "benchmark a checkpoint or HF folder with lm-eval, offline (--suite paper, --tasks, local tasks)"),
    "inspect": ("inspect", "show statistics of a shard directory, verify it, print a pack"),
    "report": ("report", "compare finished runs: Table 3 (and Table 1 with eval results) and figures in report.md"),
    "demo": ("demo", "run the quickstart's main job on embedded defaults"),
    "assets": ("assets", "list or fetch the pinned reference assets: tokenizers, demo data, the real SmolLM2 model"),
}


def installed_version() -> str:
    """The installed distribution's version (setup.py takes it from megapack/__init__.py, its one place)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megapack")
    except PackageNotFoundError:
        return "(not installed: pip install -e . records the version)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for on/off switches (`--no-train`), whose default is only their absence."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="megapack", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"megapack {installed_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=HelpFormatter)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        module = importlib.import_module(f"megapack.cli.{module_name}")
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def print_error(exc: BaseException) -> None:
    """`error: <message>` on stderr in ONE write: ranks under torchrun run with unbuffered stdio (`python -u`), where
    print() writes the text and the newline separately and two ranks failing together interleave their lines."""
    sys.stderr.write(f"error: {exc}\n")
    sys.stderr.flush()
    _record(str(exc), "error")


def _record(message: str, kind: str) -> None:
    """Under a launcher (torchrun's error file, srun's MEGAPACK_FAILURE_DIR): record the line for its last line."""
    import os

    if os.environ.get("TORCHELASTIC_ERROR_FILE") or os.environ.get("MEGAPACK_FAILURE_DIR"):
        from megapack.training.run.launch import record_failure

        record_failure(message, kind)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `megapack` console script; returns the process exit code."""
    if (list(argv) if argv is not None else sys.argv[1:])[:1] == ["train"]:
        from megapack.training.run.signals import install_stop_handlers

        install_stop_handlers()  # before any import: Slurm's SIGUSR1 may reach a task that is still starting
    from megapack.quiet import quiet_warnings

    quiet_warnings()  # every subcommand: the known, harmless library warnings stay out of the user's output
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MegapackError as exc:
        if args.debug:
            raise
        print_error(exc)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the traceback follows; the launcher's last line quotes the exception
        _record(f"{type(exc).__name__}: {exc}".splitlines()[0], "exception")
        raise


if __name__ == "__main__":
    sys.exit(main())
