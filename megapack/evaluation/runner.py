"""One `megapack eval`: offline switches, the data check, the model (exported first when it is a megapack
checkpoint), lm-eval's `simple_evaluate`, and eval.json / eval.md written where asked (and into the run's folder)."""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megapack.errors import MegapackError
from megapack.evaluation.model_input import ModelInput, export_to, resolve_input
from megapack.evaluation.results import EVAL_FORMAT, scores, write_outputs
from megapack.evaluation.suites import SUITES, TaskSpec

MISSING_DATA_EXIT = 2
BACKENDS = ("hf", "vllm")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}


class MissingData(MegapackError):
    """Some tasks' data is not cached: one line per task (exit code 2)."""

    exit_code = MISSING_DATA_EXIT


@dataclass
class EvalSettings:
    """Everything one evaluation depends on besides the model (recorded in eval.json as given)."""

    suite: str | None = None
    tasks: list[str] = field(default_factory=list)
    include_paths: list[str] = field(default_factory=list)
    limit: float | None = None
    batch_size: str = "1"
    num_fewshot: int | None = None
    backend: str = "hf"
    device: str = "cpu"
    dtype: str = "float32"
    apply_chat_template: bool | None = None  # None: on for --suite when the model has a chat template, else off
    fewshot_as_multiturn: bool | None = None  # None: as apply_chat_template (lm-eval's rule)
    allow_code_eval: bool = False
    seed: int = 0


def offline_env() -> None:
    """Never reach the Hub: the offline switches of huggingface_hub, datasets, transformers and evaluate, set
    before they are imported (and in their config modules when something imported them already)."""
    os.environ.update(OFFLINE)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)), ("datasets.config",
                          ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")), ("evaluate.config", ("HF_EVALUATE_OFFLINE",))):
        if module in sys.modules:
            for name in names:
                setattr(sys.modules[module], name, True)


def specs_of(settings: EvalSettings) -> list[TaskSpec]:
    """The tasks to run: the suite's (with its shots) and --tasks (their own shots); --num-fewshot replaces all."""
    if settings.suite is not None and settings.suite not in SUITES:
        raise MegapackError(f"--suite {settings.suite}: expected one of {', '.join(SUITES)}")
    specs = list(SUITES[settings.suite]) if settings.suite else []
    specs += [TaskSpec(t, None) for t in settings.tasks if t not in {s.name for s in specs}]
    if not specs:
        raise MegapackError("give --suite paper or --tasks a,b (lm-eval task names)")
    if settings.num_fewshot is not None:
        specs = [TaskSpec(s.name, None, s.why) for s in specs]
    return specs


def has_chat_template(hf_dir: Path) -> bool:
    """Whether the folder's tokenizer carries a chat template (chat_template.jinja or tokenizer_config.json)."""
    if (hf_dir / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def chat_settings(settings: EvalSettings, hf_dir: Path) -> tuple[bool, bool]:
    """(apply_chat_template, fewshot_as_multiturn): the flags given, else the suite's rule (template on when the
    model has one), else off; multi-turn follows the template unless given; refused when it cannot apply."""
    template = settings.apply_chat_template
    if template is None:
        template = settings.suite is not None and has_chat_template(hf_dir)
    if template and not has_chat_template(hf_dir):
        raise MegapackError(f"--apply-chat-template: {hf_dir} has no chat template (chat_template.jinja or "
                            f"tokenizer_config.json chat_template); pass --no-apply-chat-template")
    multiturn = template if settings.fewshot_as_multiturn is None else settings.fewshot_as_multiturn
    if multiturn and not template:
        raise MegapackError("--fewshot-as-multiturn needs the chat template (--apply-chat-template)")
    return template, multiturn


def _model_args(settings: EvalSettings, hf_dir: Path) -> str:
    if settings.backend == "vllm":
        return f"pretrained={hf_dir},dtype={settings.dtype if settings.dtype != 'float32' else 'auto'}"
    return f"pretrained={hf_dir},dtype={settings.dtype}"


def check_backend(backend: str) -> None:
    """hf always; vllm only when it is importable (one line otherwise)."""
    if backend not in BACKENDS:
        raise MegapackError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise MegapackError("--backend vllm: vllm is not installed (pip install 'lm-eval[vllm]==0.4.13' on a GPU "
                                "node), or use --backend hf")


def versions() -> dict[str, str]:
    """Versions of what decides the scores."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("megapack", "lm_eval", "transformers", "torch", "datasets", "vllm"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def label(settings: EvalSettings) -> str:
    """A folder name for this evaluation under a run's eval/: the suite, else the task names."""
    name = settings.suite or "+".join(sorted(settings.tasks))
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
    if len(name) <= 80:
        return name
    import hashlib

    return name[:64] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def evaluate(model_path: str | Path, settings: EvalSettings, out_dir: Path | None) -> tuple[dict, list[Path]]:
    """Run the evaluation; returns (the eval.json record, the eval.json files written)."""
    offline_env()
    check_backend(settings.backend)
    specs = specs_of(settings)
    model = resolve_input(model_path)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MegapackError("lm-eval is not installed: pip install 'megapack[eval]'") from None
    from megapack.evaluation.suites import (check_names, missing_data, task_manager, unsafe_tasks,
                                            write_local_tasks)

    with tempfile.TemporaryDirectory(prefix="megapack-eval-") as tmp:
        includes = [write_local_tasks(Path(tmp) / "tasks")] + [Path(p) for p in settings.include_paths]
        for path in includes[1:]:
            if not path.is_dir() and not path.is_file():
                raise MegapackError(f"--include-path {path}: no such folder (expected task YAMLs)")
        manager = task_manager(includes)
        names = [s.name for s in specs]
        check_names(manager, names)
        missing = missing_data(manager, names)
        if missing:
            raise MissingData("\n".join(missing))
        unsafe = unsafe_tasks(manager, names)
        if unsafe and not settings.allow_code_eval:
            raise MegapackError(f"task {', '.join(unsafe)} executes model-generated code: pass --allow-code-eval "
                                f"(in a sandbox), or leave the task out")
        if unsafe:
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"
        hf_dir = model.given if model.kind == "hf" else export_to(model, Path(tmp) / "model")
        template, multiturn = chat_settings(settings, hf_dir)
        results = _simple_evaluate(manager, specs, settings, hf_dir, template, multiturn, bool(unsafe))
    record = build_record(model, settings, specs, results, template, multiturn)
    folders = ([out_dir] if out_dir is not None else []) + (
        [model.run_dir / "eval" / label(settings)] if model.run_dir is not None else [])
    return record, write_outputs(record, folders)


def _simple_evaluate(manager, specs: list[TaskSpec], settings: EvalSettings, hf_dir: Path, template: bool,
                     multiturn: bool, unsafe: bool) -> dict:
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from megapack.evaluation.suites import load_with_shots

    try:
        results = lm_eval.simple_evaluate(
            model=settings.backend, model_args=_model_args(settings, hf_dir), tasks=load_with_shots(manager, specs),
            num_fewshot=settings.num_fewshot, batch_size=settings.batch_size, device=settings.device,
            limit=settings.limit, log_samples=False, apply_chat_template=template, fewshot_as_multiturn=multiturn,
            task_manager=manager, random_seed=settings.seed, numpy_random_seed=1234, torch_random_seed=1234,
            fewshot_random_seed=1234, confirm_run_unsafe_code=unsafe)
    except ModuleNotFoundError as exc:
        raise MegapackError(f"lm-eval needs the module {exc.name!r} for these tasks: pip install 'megapack[eval]'"
                            ) from None
    # what lm-eval's own results file holds (its serialisation of the same dict)
    return json.loads(json.dumps(results, default=handle_non_serializable))


def build_record(model: ModelInput, settings: EvalSettings, specs: list[TaskSpec], results: dict, template: bool,
                 multiturn: bool) -> dict:
    """The eval.json object."""
    return {
        "format": EVAL_FORMAT,
        "model": {"path": str(model.given.resolve()), "kind": model.kind, "describe": model.describe(),
                  "checkpoint": str(model.checkpoint.resolve()) if model.checkpoint else None,
                  "iteration": model.iteration, "run_dir": str(model.run_dir.resolve()) if model.run_dir else None},
        "tasks": [s.name for s in specs],
        "settings": {**{k: v for k, v in asdict(settings).items() if k not in ("apply_chat_template",
                                                                               "fewshot_as_multiturn")},
                     "apply_chat_template": template, "fewshot_as_multiturn": multiturn,
                     "num_fewshot_per_task": {s.name: s.num_fewshot for s in specs}},
        "versions": versions(),
        "scores": scores(results),
        "lm_eval": results,
    }
