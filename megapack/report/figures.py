"""The report's figures: one PNG per quantity, every run one line (the same colour everywhere), resumes dotted."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapack.atomic import write_atomic
from megapack.errors import MegapackError
from megapack.report.runs import Run

LOSS = "training loss (cross-entropy, nats)"


@dataclass(frozen=True)
class Figure:
    """One figure: file stem, title, axis labels, and the (x, y) series of a run."""

    stem: str
    title: str
    xlabel: str
    ylabel: str
    series: Callable[[Run], tuple[np.ndarray, np.ndarray]]
    kind: str = "train"
    marks: Callable[[Run], np.ndarray] | None = None  # x positions of the run's resumes (a dotted line each)


def _per_step(key: str, scale: float = 1.0) -> Callable[[Run], tuple[np.ndarray, np.ndarray]]:
    return lambda run: (run.steps(), run.values(key) * scale)


def _resumes_at(key: str | None) -> Callable[[Run], np.ndarray]:
    """Where a run resumed, on an axis of steps (key None) or of the running total of `key`."""
    def marks(run: Run) -> np.ndarray:
        steps = np.array(run.resumes, dtype=np.int64)
        return steps if key is None else run.at_steps(key, steps)

    return marks


def _valid_vs_conversations(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Validation losses against the conversations trained before each (steps differ between padding and packing)."""
    return run.at_steps("conversations", run.steps("valid")), run.values("valid_loss", "valid")


FIGURES = (
    Figure("loss_vs_step", "Training loss against optimizer steps", "optimizer step", LOSS, _per_step("loss"),
           marks=_resumes_at(None)),
    Figure("loss_vs_time", "Training loss against training time", "training time (s, sum of step times)", LOSS,
           lambda run: (run.cumulative("step_time_s"), run.values("loss")), marks=_resumes_at("step_time_s")),
    Figure("loss_vs_conversations", "Training loss against conversations seen", "conversations seen", LOSS,
           lambda run: (run.cumulative("conversations"), run.values("loss")), marks=_resumes_at("conversations")),
    Figure("learning_rate", "Learning rate", "optimizer step", "learning rate", _per_step("lr")),
    # real tokens, as the table's tokens/s (summary.json tokens_per_s): padding excluded, prompts included
    Figure("tokens_per_s", "Throughput: real tokens per second", "optimizer step",
           "real tokens/s (conversation tokens, no padding)", _per_step("tokens_per_s")),
    Figure("conversations_per_s", "Throughput: conversations per second", "optimizer step", "conversations/s",
           _per_step("conversations_per_s")),
    Figure("padding_fraction", "Padding per step", "optimizer step", "padding (% of the tokens computed)",
           _per_step("padding_fraction", 100.0)),
    Figure("valid_loss", "Validation loss against conversations seen", "conversations seen",
           "validation loss (cross-entropy, nats)", _valid_vs_conversations, kind="valid"),
)
MARKERS_UP_TO = 40  # points per line drawn with markers (short runs, validation)
# runs that train the same packs (greedy and bfd often do) draw the same line: shapes and dashes keep each visible
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
LINESTYLES = ("-", "--", "-.", ":")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MegapackError("matplotlib is not installed; the report's figures need it: pip install 'megapack[plot]'"
                            ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(figure: Figure, runs: list[Run], out_dir: Path) -> dict | None:
    """Draw one figure and save it as out_dir/<stem>.png; returns what the axes hold (title, labels, one entry
    per line: label and points), or None (nothing written) when no run has a value to plot."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    lines, resumes = [], []
    for i, run in enumerate(runs):
        x, y = figure.series(run)
        keep = np.isfinite(x) & np.isfinite(y)
        if not keep.any():
            continue
        marker = MARKERS[i % len(MARKERS)] if keep.sum() <= MARKERS_UP_TO or figure.kind == "valid" else None
        lines += ax.plot(x[keep], y[keep], color=f"C{i % 10}", linestyle=LINESTYLES[i % len(LINESTYLES)],
                         linewidth=1.5, marker=marker, markersize=7 - 1.2 * (i % 3), markerfacecolor="none",
                         label=run.name)
        marks = [float(m) for m in figure.marks(run)] if figure.marks is not None else []
        for m in marks:  # where the run resumed from a checkpoint: a dotted line in the run's colour
            ax.axvline(m, color=f"C{i % 10}", linestyle=":", linewidth=1.0, alpha=0.8, label="_nolegend_")
        if marks:
            resumes.append({"label": run.name, "x": marks})
    if not lines:
        plt.close(fig)
        return None
    ax.set(title=figure.title, xlabel=figure.xlabel, ylabel=figure.ylabel)
    if resumes:
        ax.text(0.99, 0.01, "dotted: resumed from a checkpoint", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=8, alpha=0.8)
    if figure.xlabel == "optimizer step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if figure.stem == "padding_fraction":
        ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    legend = ax.legend(title="run")
    fig.tight_layout()
    path = out_dir / f"{figure.stem}.png"
    try:  # under a temporary name of this writer's own, removed on failure
        write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    except OSError as exc:
        raise MegapackError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return {
        "file": path.name, "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
        "legend": [t.get_text() for t in legend.get_texts()],
        "lines": [{"label": line.get_label(), "points": len(line.get_xdata()),
                   "last": [float(line.get_xdata()[-1]), float(line.get_ydata()[-1])]} for line in lines],
        "resumes": resumes,
    }


def draw_all(runs: list[Run], out_dir: Path) -> list[dict]:
    """Every figure some run has values for; a figure of these names left from an earlier report without values
    now is removed. Returns each drawn figure's contents (see `draw`)."""
    drawn = []
    for figure in FIGURES:
        entry = draw(figure, runs, out_dir)
        if entry is None:
            (out_dir / f"{figure.stem}.png").unlink(missing_ok=True)
        else:
            drawn.append(entry)
    return drawn
