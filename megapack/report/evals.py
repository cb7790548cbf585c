"""Benchmark scores of the runs (`megapack eval` wrote them into each run's eval/<suite or tasks>/eval.json) as
the study's Table 1: each run's headline score per task, and its difference from a baseline run."""
from __future__ import annotations

import json
from pathlib import Path

from megapack.errors import MegapackError
from megapack.report.runs import Run

EVAL_GLOB = "eval/*/eval.json"  # megapack.evaluation.results.EVAL_JSON under the run's eval/<label>/


def run_scores(run: Run) -> dict[str, dict]:
    """task -> {"metric", "value", "n_shot"} of a run's evaluations; a task scored twice: the newer file wins."""
    found: dict[str, dict] = {}
    for path in sorted(run.path.glob(EVAL_GLOB), key=lambda p: p.stat().st_mtime):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MegapackError(f"{path}: unreadable ({exc}); expected the eval.json `megapack eval` writes") from None
        scores = record.get("scores") if isinstance(record, dict) else None
        if not isinstance(scores, dict):
            raise MegapackError(f"{path}: no `scores` object (not written by `megapack eval`?)")
        found.update({t: s for t, s in scores.items() if isinstance(s, dict) and isinstance(s.get("value"),
                                                                                            (int, float))})
    return found


def quality_table(runs: list[Run], baseline: str | None) -> list[str]:
    """Markdown lines of Table 1 (scores in %, and `(+d)` against `baseline`); empty when no run was evaluated."""
    scores = {run.name: run_scores(run) for run in runs}
    tasks: list[str] = []
    for per_run in scores.values():
        tasks += [t for t in per_run if t not in tasks]
    if not tasks:
        if baseline is not None:
            raise MegapackError(f"--baseline {baseline}: no run has eval results (run `megapack eval` on them)")
        return []
    if baseline is not None and baseline not in scores:
        raise MegapackError(f"--baseline {baseline}: not one of the runs ({', '.join(scores)})")
    base = scores.get(baseline, {}) if baseline else {}
    header = ["run"] + [_title(t, scores) for t in tasks]
    rows = []
    for name, per_run in scores.items():
        cells = [name + (" (baseline)" if name == baseline else "")]
        for task in tasks:
            mine = per_run.get(task)
            if mine is None:
                cells.append("-")
                continue
            cell = f"{100 * mine['value']:.1f}"
            if baseline and name != baseline and task in base:
                cell += f" ({100 * (mine['value'] - base[task]['value']):+.1f})"
            cells.append(cell)
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(tasks)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


def _title(task: str, scores: dict[str, dict]) -> str:
    """`task (n-shot, metric)` from the first run that has it."""
    entry = next(per_run[task] for per_run in scores.values() if task in per_run)
    shots = f"{entry['n_shot']}-shot, " if entry.get("n_shot") is not None else ""
    return f"{task} ({shots}{str(entry.get('metric', '')).split(',')[0]})"
