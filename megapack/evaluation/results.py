"""What `megapack eval` writes: eval.json (lm-eval's results dict unchanged under "lm_eval", plus the model, the
tasks, versions and settings, and one headline score per task) and eval.md (a table), atomically.

The headline scores are what `megapack report` tabulates (Table 1 of the study): one metric per top-level task.
"""
from __future__ import annotations

import math
from pathlib import Path

from megapack.atomic import dumps_json, write_text_atomic

EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
EVAL_FORMAT = 1
# the metric reported for a task (lm-eval "metric,filter" keys); others: the first non-stderr number
HEADLINE = {
    "mmlu": "acc,none", "gsm8k": "exact_match,flexible-extract", "minerva_math": "math_verify,none",
    "bbh_cot_fewshot": "exact_match,get-answer", "bbh_fewshot": "exact_match,none",
    "ifeval": "prompt_level_strict_acc,none", "humaneval": "pass@1,create_test",
    "megapack_arithmetic": "exact_match,get-answer", "megapack_capitals": "acc,none",
}


def top_level(results: dict) -> list[str]:
    """The task and group names of lm-eval's results that are no other group's member, in results order."""
    members = {m for subtasks in (results.get("group_subtasks") or {}).values() for m in subtasks}
    return [name for name in results.get("results", {}) if name not in members]


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def headline(task: str, values: dict) -> tuple[str, float] | None:
    """(metric key, value) reported for `task`: HEADLINE's metric, else its first number that is not a stderr."""
    key = HEADLINE.get(task)
    if key is not None and _number(values.get(key)) is not None:
        return key, float(values[key])
    for key, value in values.items():
        if "," in key and "_stderr" not in key and _number(value) is not None:
            return key, float(value)
    return None


def scores(results: dict) -> dict[str, dict]:
    """task -> {"metric", "value", "n_shot"} for every top-level task with a number."""
    out = {}
    for task in top_level(results):
        found = headline(task, results["results"][task])
        if found is not None:
            shots = (results.get("n-shot") or {}).get(task)
            out[task] = {"metric": found[0], "value": found[1], "n_shot": shots}
    return out


def render_markdown(record: dict) -> str:
    """eval.md: the model, the settings, and every metric of every task lm-eval reported."""
    results = record["lm_eval"]
    lines = ["# Evaluation", "", f"- model: {record['model']['describe']}", f"- tasks: {', '.join(record['tasks'])}"]
    lines += [f"- {key}: {value}" for key, value in record["settings"].items()]
    lines += [f"- versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}", "",
              "| task | n-shot | metric | filter | value | stderr |", "|---|---:|---|---|---:|---:|"]
    shots = results.get("n-shot") or {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or _number(value) is None:
                continue
            metric, filt = key.split(",", 1)
            err = _number(values.get(f"{metric}_stderr,{filt}"))
            lines.append(f"| {values.get('alias', task)} | {shots.get(task, '')} | {metric} | {filt} | "
                         f"{value:.4f} | {'' if err is None else f'{err:.4f}'} |")
    lines += ["", "Headline scores (what `megapack report` shows): " + ", ".join(
        f"{t} {s['metric']} {s['value']:.4f}" for t, s in record["scores"].items()), ""]
    return "\n".join(lines)


def write_outputs(record: dict, folders: list[Path]) -> list[Path]:
    """Write eval.json and eval.md into each folder (atomic: readers see the old or the whole new file)."""
    text, markdown, written = dumps_json(record, indent=2) + "\n", render_markdown(record), []
    for folder in folders:
        write_text_atomic(folder / EVAL_JSON, text)
        write_text_atomic(folder / EVAL_MD, markdown)
        written.append(folder / EVAL_JSON)
    return written
