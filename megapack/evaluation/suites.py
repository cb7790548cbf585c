"""Which tasks `megapack eval` runs: the study's suite, megapack's shipped local tasks (resolved into an include
folder), and the offline check that every task's data is cached before a model loads.

Needs lm-eval (`pip install 'megapack[eval]'`); imported lazily, after `offline_env()` (megapack.evaluation.runner).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from megapack.errors import MegapackError

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' packaged builders: data_files, no Hub


@dataclass(frozen=True)
class TaskSpec:
    """One task or group of a suite: its lm-eval name, its shots (None: the task's own), and why this variant."""

    name: str
    num_fewshot: int | None
    why: str = ""


# The study's Table 1 (MMLU 5-shot, GSM8K 4-shot, MATH 4-shot, BBH 3-shot, IFEval 0-shot, HumanEval 0-shot) as
# lm-eval 0.4.13 tasks; megapack/evaluation/README.md explains each choice.
SUITES: dict[str, tuple[TaskSpec, ...]] = {
    "paper": (
        TaskSpec("mmlu", 5, "the 57-subject loglikelihood multiple choice (acc), as MMLU is usually reported"),
        TaskSpec("gsm8k", 4, "the plain question/answer variant; flexible-extract and strict-match both reported"),
        TaskSpec("minerva_math", 4, "MATH with the 4 Minerva exemplars and equivalence checking (math_verify)"),
        TaskSpec("bbh_cot_fewshot", 3, "BBH's own 3 chain-of-thought exemplars per task (the paper's BBH setting)"),
        TaskSpec("ifeval", 0, "prompt- and instruction-level strict/loose accuracy"),
        TaskSpec("humaneval", 0, "pass@1, greedy; runs generated code: needs --allow-code-eval"),
    ),
}


@dataclass(frozen=True)
class DataNeed:
    """The data one leaf task reads: a Hub dataset (path, config) or local files (a packaged builder)."""

    task: str
    path: str | None
    name: str | None
    data_files: tuple[str, ...] = ()


def write_local_tasks(dest: Path) -> Path:
    """Copy megapack's shipped task YAMLs into `dest` with their data_files made absolute (lm-eval resolves
    relative data_files against the working directory, not the YAML's folder); returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(SHIPPED_TASKS.glob("*.yaml")):
        config = yaml.safe_load(src.read_text(encoding="utf-8"))
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(SHIPPED_TASKS / rel) for split, rel in files.items()}
        (dest / src.name).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return dest


def shipped_task_names() -> list[str]:
    """The names of megapack's shipped tasks."""
    return sorted(yaml.safe_load(p.read_text(encoding="utf-8"))["task"] for p in SHIPPED_TASKS.glob("*.yaml"))


def task_manager(include_paths: list[Path]):
    """lm-eval's TaskManager over its own tasks and `include_paths`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include_paths] or None)


def check_names(manager, names: list[str]) -> None:
    """Every name is a task, group or tag lm-eval knows; else one line naming the unknown ones."""
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        raise MegapackError(f"--tasks: unknown task {', '.join(unknown)} (lm-eval 0.4.13 tasks, megapack's "
                            f"{', '.join(shipped_task_names())}, or YAMLs of an --include-path folder)")


def _members(config: dict) -> list[str]:
    """The task/group names a group config lists (`task:` entries as names or dicts)."""
    out: list[str] = []
    for item in config.get("task") or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            ref = item.get("task") or item.get("group")
            out += [ref] if isinstance(ref, str) else [r for r in ref or [] if isinstance(r, str)]
    return out


def data_needs(manager, name: str, _depth: int = 0) -> list[DataNeed]:
    """The data every leaf task under `name` reads, from the task YAMLs alone (no dataset is opened)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or _depth > 8:
        return []
    if entry.kind == Kind.TAG:
        return [n for t in sorted(entry.tags) for n in data_needs(manager, t, _depth + 1)]
    config = entry.cfg if entry.cfg is not None else load_yaml(entry.yaml_path, resolve_func=False)
    if entry.kind == Kind.GROUP:
        return [n for m in _members(config) for n in data_needs(manager, m, _depth + 1)]
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    files = list(files.values()) if isinstance(files, dict) else [files] if isinstance(files, str) else files or []
    return [DataNeed(name, config.get("dataset_path"), config.get("dataset_name"), tuple(map(str, files)))]


def _cached(need: DataNeed) -> bool:
    """Whether the data loads without the network (offline mode must be on)."""
    import datasets

    if need.path in LOCAL_BUILDERS:
        return all(Path(f).is_file() for f in need.data_files)
    if need.path is None:
        return True  # a Python task that builds its own data
    try:
        datasets.load_dataset_builder(need.path, need.name)
    except Exception:  # noqa: BLE001 - offline: ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        return False
    return True


def _code_eval_cached() -> bool:
    """Whether evaluate's code_eval metric (humaneval's pass@k) is in evaluate's module cache."""
    import evaluate.config

    return (Path(evaluate.config.HF_MODULES_CACHE) / "evaluate_modules" / "metrics" /
            "evaluate-metric--code_eval").is_dir()


def _load_command(path: str, configs: list[str]) -> str:
    """Python that caches a Hub dataset's configs: one, a few by name, or all of them."""
    if not configs:
        return f"datasets.load_dataset({path!r})"
    if len(configs) == 1:
        return f"datasets.load_dataset({path!r}, {configs[0]!r})"
    names = repr(configs) if len(configs) <= 3 else f"datasets.get_dataset_config_names({path!r})"
    return f"[datasets.load_dataset({path!r}, c) for c in {names}]"


def missing_data(manager, names: list[str]) -> list[str]:
    """One line per requested task whose data is not cached: the task, what is missing, the command that fetches
    it on a machine with network (its cache then copied here, or HF_HOME pointed at it)."""
    lines = []
    for name in names:
        needs = data_needs(manager, name)
        local = sorted({f for n in needs if n.path in LOCAL_BUILDERS for f in n.data_files if not Path(f).is_file()})
        if local:
            lines.append(f"task {name}: data file {', '.join(local)} not found")
            continue
        hub = [n for n in needs if n.path not in LOCAL_BUILDERS and not _cached(n)]
        metric = any(n.task == "humaneval" for n in needs) and not _code_eval_cached()
        if not hub and not metric:
            continue
        what, commands = [], []
        for path in sorted({n.path for n in hub}):
            mine = sorted({n.name for n in hub if n.path == path and n.name})
            what.append(f"dataset {path}" + (f" ({len(mine)} configs)" if len(mine) > 3 else
                                             f" (config {', '.join(mine)})" if mine else ""))
            commands.append(_load_command(path, mine))
        if metric:
            what.append("the code_eval metric")
            commands.append("evaluate.load('code_eval')")
        imports = ", ".join((["datasets"] if hub else []) + (["evaluate"] if metric else []))
        lines.append(f"task {name}: {' and '.join(what)} not cached; on a machine with network run "
                     f"python -c \"import {imports}; {'; '.join(commands)}\" and copy its ~/.cache/huggingface here "
                     f"(or point HF_HOME at it)")
    return lines


def load_with_shots(manager, specs: list[TaskSpec]) -> list:
    """What simple_evaluate's `tasks` takes: a name where the task keeps its own shots, else the loaded task or
    group with every leaf task set to the spec's shots."""
    out: list = []
    for spec in specs:
        if spec.num_fewshot is None:
            out.append(spec.name)
            continue
        loaded = manager.load([spec.name])
        for task in loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
        top = loaded["groups"].get(spec.name) or loaded["tasks"].get(spec.name)
        out += [top] if top is not None else list(loaded["tasks"].values())
    return out


def unsafe_tasks(manager, names: list[str]) -> list[str]:
    """The requested tasks that execute model-generated code (a leaf YAML with `unsafe_code: true`)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    found = []
    for name in names:
        for need in data_needs(manager, name):
            entry = manager.task_index.get(need.task)
            config = entry.cfg if entry.cfg is not None else load_yaml(entry.yaml_path, resolve_func=False)
            if config.get("unsafe_code"):
                found.append(name)
                break
    return found

