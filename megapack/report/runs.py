"""Training runs in: each run directory's metrics.jsonl and summary.json, checked and ordered; parent folders expanded."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megapack.data.packs.packing import PACKINGS
from megapack.errors import MegapackError

METRICS, SUMMARY = "metrics.jsonl", "summary.json"
DATASET_PREFIX = "dataset/"  # per-dataset metrics: dataset/<name>/<metric> (the name may hold slashes)


@dataclass
class Run:
    """One training run: its summary (Table 3 columns) and logged records, one per step (the last one of a step wins,
    as after a resume), sorted by step."""

    name: str
    path: Path
    summary: dict
    train: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)  # steps after which a process resumed from a checkpoint

    @property
    def packing(self) -> str:
        """The packing of the run's shards (summary.json), '?' when not recorded."""
        return str(self.summary.get("packing") or "?")

    def steps(self, kind: str = "train") -> np.ndarray:
        """Step numbers of the logged records of `kind`."""
        return np.array([r["step"] for r in (self.train if kind == "train" else self.valid)], dtype=np.int64)

    def values(self, key: str, kind: str = "train") -> np.ndarray:
        """`key` of every logged record of `kind` as floats (NaN where missing or null)."""
        records = self.train if kind == "train" else self.valid
        return np.array([_number(r.get(key)) for r in records], dtype=np.float64)

    def cumulative(self, key: str) -> np.ndarray:
        """Running total of a per-step `key` (step_time_s, conversations) at each logged train step.

        With logging.interval > 1 a logged step stands for the steps since the previous logged one (an estimate).
        """
        steps = self.steps()
        gaps = np.diff(np.concatenate([[0], steps])) if len(steps) else steps
        return np.cumsum(np.nan_to_num(self.values(key)) * np.maximum(gaps, 1))

    def at_steps(self, key: str, steps) -> np.ndarray:
        """The running total of `key` (see `cumulative`) after each of `steps`, interpolated between logged steps."""
        return np.interp(np.asarray(steps, dtype=np.float64), np.concatenate([[0], self.steps()]),
                         np.concatenate([[0.0], self.cumulative(key)]))


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise MegapackError(f"{path}: not found (a run directory holds {METRICS} and {SUMMARY}; {SUMMARY} is "
                            f"written when training ends)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MegapackError(f"{path}: unreadable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise MegapackError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise MegapackError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_records(path: Path) -> tuple[list[dict], list[dict], list[int]]:
    """(train, valid) records of a metrics.jsonl by step (the last of a step wins) and the steps resumed after."""
    # a resume is a `resume` record (the trainer writes one per resumed start) or, in older files, a train step
    # logged again (or earlier than the one before it): resumed after the step before it
    found: dict[str, dict[int, dict]] = {"train": {}, "valid": {}}
    resumes: set[int] = set()
    last_step = None
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MegapackError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
                kind = rec.get("kind") if isinstance(rec, dict) else None
                if kind == "resume" and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
                    resumes.add(rec["step"])
                    last_step = rec["step"]
                if kind not in found:
                    continue  # records of other kinds (a later version's) are not ours to plot
                if isinstance(rec.get("step"), bool) or not isinstance(rec.get("step"), int):
                    raise MegapackError(f"{path}:{lineno}: a {kind} record without an integer 'step'")
                need = "loss" if kind == "train" else "valid_loss"
                if need not in rec:
                    raise MegapackError(f"{path}:{lineno}: a {kind} record without {need!r}")
                if kind == "train":
                    if last_step is not None and rec["step"] <= last_step:
                        resumes.add(rec["step"] - 1)
                    last_step = rec["step"]
                found[kind][rec["step"]] = rec
    except FileNotFoundError:
        raise MegapackError(f"{path}: not found (not a run directory?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MegapackError(f"{path}: unreadable ({exc})") from None
    train, valid = ([found[k][s] for s in sorted(found[k])] for k in ("train", "valid"))
    return train, valid, sorted(resumes)


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """One run directory (metrics.jsonl + summary.json); MegapackError naming the file that is missing or broken."""
    path = Path(path)
    train, valid, resumes = read_records(path / METRICS)
    return Run(name=name or path.name, path=path, summary=_read_json(path / SUMMARY), train=train, valid=valid,
               resumes=resumes)


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a run's metrics.jsonl or summary.json."""
    return (path / METRICS).is_file() or (path / SUMMARY).is_file()


def _order(run: Run) -> tuple:
    rank = PACKINGS.index(run.packing) if run.packing in PACKINGS else len(PACKINGS)
    return rank, run.name


def find_runs(paths: list[str | os.PathLike]) -> list[Run]:
    """Runs of the given run directories (in the given order) and of the run directories inside any other given
    folder (padding, random, greedy, bfd, then others by name); unique names (parent/name where two runs share one)."""
    dirs: list[list[Path]] = []
    for p in map(Path, paths):
        if not p.exists():
            raise MegapackError(f"{p}: not found")
        if not p.is_dir():
            raise MegapackError(f"{p}: not a directory (expected a run directory with {METRICS} and {SUMMARY}, or "
                                f"a folder of them)")
        if is_run_dir(p):
            dirs.append([p])
            continue
        children = sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c))
        if not children:
            raise MegapackError(f"{p}: no {METRICS} here or in its subfolders (expected a run directory, such as "
                                f"runs/demo/train/bfd, or a folder of them, such as runs/demo/train)")
        dirs.append(children)
    runs: list[Run] = []
    seen: set[Path] = set()
    for group in dirs:
        loaded = [load_run(d) for d in group if d.resolve() not in seen]
        seen |= {d.resolve() for d in group}
        runs += loaded if len(group) == 1 else sorted(loaded, key=_order)
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"
    if len({r.name for r in runs}) < len(runs):
        for run in runs:
            run.name = str(run.path)
    return runs


def dataset_numbers(run: Run) -> dict[str, dict[str, float]]:
    """dataset name -> metric -> value, from `dataset/<name>/<metric>` keys: summary.json's, else the last logged
    non-null value (validation records' metrics prefixed 'valid ' unless their name starts with 'valid')."""
    out: dict[str, dict[str, float]] = {}

    def add(key: str, value, kind: str) -> None:
        if not key.startswith(DATASET_PREFIX) or "/" not in key[len(DATASET_PREFIX):]:
            return
        number = _number(value)
        if np.isnan(number):
            return
        name, metric = key[len(DATASET_PREFIX):].rsplit("/", 1)
        if kind == "valid" and not metric.startswith("valid"):
            metric = f"valid {metric}"
        out.setdefault(name, {})[metric] = number

    for kind, records in (("train", run.train), ("valid", run.valid)):
        for rec in records:
            for key, value in rec.items():
                add(key, value, kind)
    for key, value in run.summary.items():
        add(key, value, "summary")
    return out
