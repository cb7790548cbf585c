"""`megapack eval MODEL (--suite paper | --tasks a,b)`: lm-evaluation-harness on an HF folder or a megapack
checkpoint, offline; writes eval.json and eval.md."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _limit(text: str) -> float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `megapack eval`."""
    from megapack.evaluation.runner import BACKENDS
    from megapack.evaluation.suites import SUITES

    parser.add_argument("model", metavar="MODEL",
                        help="a Hugging Face folder, or a megapack checkpoint: a run's checkpoints/ folder (its "
                             "`latest`), one iter_XXXXXXX folder or a `convert hf-to-megatron` output (exported to a "
                             "temporary HF folder first)")
    parser.add_argument("--suite", choices=list(SUITES), default=None,
                        help="the study's six benchmarks with its shots (megapack/evaluation/README.md)")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval tasks or groups (megapack's own: "
                                                    "megapack_arithmetic, megapack_capitals), with their own shots")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of lm-eval task YAMLs (repeatable); data_files in them must be absolute")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="at most N examples per task (a fraction below 1: that share); for quick checks only")
    parser.add_argument("--batch-size", default="1", help="lm-eval batch size, or auto")
    parser.add_argument("--num-fewshot", type=int, default=None, help="replace every task's shot count")
    parser.add_argument("--backend", choices=list(BACKENDS), default="hf",
                        help="hf (transformers) or vllm (GPU nodes, when vllm is installed)")
    parser.add_argument("--device", default="cpu", help="torch device for the hf backend (cpu, cuda, cuda:1)")
    parser.add_argument("--dtype", default="float32", help="weights' dtype for the model (float32, bfloat16, auto)")
    parser.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="prompt through the model's chat template (default: on for --suite when the model has "
                             "one, off for --tasks, as lm_eval's default)")
    parser.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction, default=None,
                        help="with the chat template: few-shot examples as earlier turns (default: as the template)")
    parser.add_argument("--allow-code-eval", action="store_true",
                        help="allow tasks that execute generated code (humaneval); run them in a sandbox")
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's random seed (its other seeds stay 1234)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where eval.json and eval.md go (default: eval/ in the working directory; a megapack "
                             "run's checkpoint also writes them into the run's eval/<suite or tasks>/, for "
                             "`megapack report`)")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print where the results are; missing data is one `error:` line per task and exit code 2."""
    from megapack.evaluation.runner import EvalSettings, MissingData, evaluate

    settings = EvalSettings(
        suite=args.suite, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        include_paths=list(args.include_path), limit=args.limit, batch_size=args.batch_size,
        num_fewshot=args.num_fewshot, backend=args.backend, device=args.device, dtype=args.dtype,
        apply_chat_template=args.apply_chat_template, fewshot_as_multiturn=args.fewshot_as_multiturn,
        allow_code_eval=args.allow_code_eval, seed=args.seed)
    try:
        record, written = evaluate(args.model, settings, Path(args.out) if args.out else Path("eval"))
    except MissingData as exc:
        sys.stderr.write("".join(f"error: {line}\n" for line in str(exc).splitlines()))
        return exc.exit_code
    for task, score in record["scores"].items():
        print(f"{task}: {score['metric']} {score['value']:.4f}")
    print(f"wrote {', '.join(map(str, written))}")
    return 0
