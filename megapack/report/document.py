"""`megapack report`: runs side by side as a Markdown report (Table 3 columns, figures, per-dataset numbers)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megapack.atomic import write_text_atomic
from megapack.errors import MegapackError
from megapack.report.evals import quality_table
from megapack.report.figures import FIGURES, draw_all
from megapack.report.runs import Run, dataset_numbers, find_runs
from megapack.training.run.metrics import TABLE_COLUMNS

REPORT_NAME = "report.md"
# (summary key, column title, format): the Table 3 columns of format_table plus the final validation loss
TITLES = {"loss": "final loss"}
COLUMNS = tuple((key, TITLES.get(title, title), fmt) for key, title, fmt in TABLE_COLUMNS) + (
    ("final_valid_loss", "final valid loss", "{:.4f}"),
)
NOTES = (
    "time: the steps' wall time summed (summary.json `total_training_time_s`); packs/s is the paper's samples/s "
    "(one sample is one pack; the padding arm's packs are single conversations); conv/s counts each conversation "
    "once, also when `random` packing cuts it across two packs; tokens/s counts real (not padding) tokens."
)


@dataclass
class Report:
    """What `write_report` wrote: the Markdown file, the runs, each figure's contents."""

    path: Path
    runs: list[Run]
    figures: list[dict]


def default_output(paths: list[str | os.PathLike]) -> Path:
    """report/ beside the first path given: runs/demo/train/bfd -> runs/demo/train/report,
    runs/demo/train (a folder of runs) -> runs/demo/report (where `megapack demo` writes its report)."""
    first = Path(os.path.normpath(paths[0]))
    if first.name in ("", ".."):  # "." or "..": name the folder
        first = Path(os.path.abspath(first))
    return first.parent / "report"


def _cell(value, fmt: str) -> str:
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown lines of a table (first two columns left-aligned, the rest right-aligned)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


def summary_table(runs: list[Run]) -> list[str]:
    """The Table 3 columns, one row per run, as Markdown lines."""
    rows = []
    for run in runs:
        name = run.name + (" (interrupted)" if run.summary.get("interrupted") else "")
        rows.append([name] + [_cell(run.summary.get(key), fmt) for key, _, fmt in COLUMNS])
    return markdown_table(["run"] + [title for _, title, _ in COLUMNS], rows)


def dataset_table(runs: list[Run]) -> list[str]:
    """Per-dataset numbers (run x dataset rows, one column per metric) as Markdown lines; empty when none exist."""
    numbers = {run.name: dataset_numbers(run) for run in runs}
    metrics = sorted({m for per_run in numbers.values() for values in per_run.values() for m in values})
    if not metrics:
        return []
    rows = [[run, dataset] + [_cell(values.get(m), "{:.4g}") for m in metrics]
            for run, per_run in numbers.items() for dataset, values in sorted(per_run.items())]
    return markdown_table(["run", "dataset"] + metrics, rows)


def _resumed(run: Run) -> str:
    """`, resumed after step 3, 7` for a run that resumed from checkpoints; empty otherwise."""
    return f", resumed after step {', '.join(map(str, run.resumes))}" if run.resumes else ""


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


QUALITY_NOTE = ("Scores in % from each run's `megapack eval` results (its eval/*/eval.json: one headline metric per "
                "task); in brackets the difference from the baseline run in points, as the study's Table 1 reports.")


def render(runs: list[Run], figures: list[dict], baseline: str | None = None) -> str:
    """The report's Markdown text."""
    lines = ["# Training report", ""]
    lines += [f"{_count(len(runs), 'run')}:", ""]
    lines += [f"- `{run.name}`: {run.path} ({run.packing} packing, {_count(len(run.train), 'logged step')}, "
              f"{_count(len(run.valid), 'validation')}{_resumed(run)})" for run in runs]
    lines += ["", "## Table 3 columns", ""] + summary_table(runs) + ["", NOTES, ""]
    quality = quality_table(runs, baseline)
    if quality:
        lines += ["## Table 1 columns: benchmark scores", ""] + quality + ["", QUALITY_NOTE, ""]
    lines += ["## Figures", ""]
    lines += ["Every run is one line, in the same colour and marker in every figure. The time and conversation axes "
              "add up each logged step's `step_time_s` and `conversations` (with `logging.interval` > 1, each logged "
              "step stands for the steps since the previous one). A dotted vertical line on the loss figures marks "
              "where a run resumed from a checkpoint. Throughput counts real tokens (conversation tokens, padding "
              "excluded), as the table's tokens/s does; validation is plotted against conversations seen, since "
              "padding and packed arms take different numbers of steps for the same data.", ""]
    drawn = {f["file"] for f in figures}
    for figure in FIGURES:
        if f"{figure.stem}.png" in drawn:
            lines += [f"### {figure.title}", "", f"![{figure.title}]({figure.stem}.png)", ""]
        else:
            lines += [f"### {figure.title}", "", "No run logged a value for it.", ""]
    per_dataset = dataset_table(runs)
    lines += ["## Per dataset", ""]
    lines += (per_dataset if per_dataset else ["No run logged per-dataset metrics (`dataset/<name>/<metric>`)."]) + [""]
    return "\n".join(lines)


def write_report(paths: list[str | os.PathLike], output: str | os.PathLike | None = None,
                 baseline: str | None = None) -> Report:
    """Read the runs, draw the figures into `output` (default: `default_output`) and write report.md there (with
    the runs' benchmark scores against `baseline`, a run's name, when they have eval results)."""
    if not paths:
        raise MegapackError("no run directory given")
    runs = find_runs(list(paths))
    quality_table(runs, baseline)  # a wrong --baseline is refused before anything is drawn
    out_dir = Path(output) if output is not None else default_output(list(paths))
    if out_dir.exists() and not out_dir.is_dir():
        raise MegapackError(f"{out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MegapackError(f"{out_dir}: cannot create the report folder ({exc.strerror or exc})") from None
    figures = draw_all(runs, out_dir)
    path = out_dir / REPORT_NAME
    try:
        write_text_atomic(path, render(runs, figures, baseline))
    except OSError as exc:
        raise MegapackError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return Report(path=path, runs=runs, figures=figures)
