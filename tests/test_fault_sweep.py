"""kill -9 sweeps: a preprocessing run and a short training run with async checkpoints are SIGKILLed (the whole
process family, workers and checkpoint writers included) at seeded-random moments and at moments picked by phase;
after each, the same command (preprocess) or config (training) is run again to completion and must give exactly
what the uninterrupted run gave: the same shard bytes and meta.json, the same per-step losses.

The moments and the phase each kill landed in are printed (pytest shows them on failure; -s shows them always), and
the random ones are drawn from random.Random(SEED), so a failing moment can be replayed.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megapack.data.packs.shards import ShardDataset, is_shard_file
from megapack.errors import MegapackError
from train_helpers import base_config, finish, kill_family, launch, make_demo_shards, make_tiny_hf

pytestmark = pytest.mark.multiprocess  # preprocess with a worker pool, torchrun launches

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
STEPS = 6  # training steps of every run of the training sweep
PARTS = 3  # preprocessing partitions (999 records in blocks of 256: every partition holds records)
TIMING_KEYS = ("wall_seconds", "seconds")  # meta.json has none today; timings may differ between runs


def _files(out: Path) -> dict[str, bytes]:
    """Every file under out (hidden ones and subfolders included), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _without_timings(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in TIMING_KEYS}


# ---------------------------------------------------------------------------------------------- preprocessing


def _preprocess_cmd(data_dir: Path, tokenizer: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "megapack", "preprocess", "--input", str(data_dir / "alpaca_en_demo.json"),
            "--format", "alpaca", "--tokenizer-model", str(tokenizer), "--seq-length", "1024", "--packing", "greedy",
            "--val-fraction", "0.1", "--seed", "1", "--workers", "2", "--num-partitions", str(PARTS),
            "--max-shard-tokens", "16384", "--no-progress", "--output-dir", str(out)]


def _preprocess_phase(out: Path) -> str:
    """Where a preprocess run was, read from what it left: the work-folder protocol of megapack.data.pipeline."""
    work = out / ".work"
    if (out / "meta.json").exists():
        return "published, removing .work" if work.exists() else "finished"
    if out.exists() and any(is_shard_file(p.name) for p in out.iterdir()):
        return "writing shards"
    if not (work / "job.json").exists():
        return "starting"
    done = sum((work / f"part-{i:05d}-of-{PARTS:05d}" / "part.json").exists() for i in range(PARTS))
    return "tokenizing" if done < PARTS else "packing"


def _preprocess_moments(rng: random.Random, duration: float) -> list[tuple[str, float | str]]:
    """(label, trigger): a delay in seconds after the start, or a path (glob) under the output directory whose
    appearance triggers the kill at once."""
    moments: list[tuple[str, float | str]] = [(f"random {d:.3f} s", d) for d in
                                               sorted(rng.uniform(0, duration) for _ in range(9))]
    return moments + [
        ("job.json written", ".work/job.json"),
        ("partition 1 being written", f".work/.part-00000-of-{PARTS:05d}.*.tmp"),
        ("partition 1 finished", f".work/part-00000-of-{PARTS:05d}/part.json"),
        ("last partition finished", f".work/part-{PARTS - 1:05d}-of-{PARTS:05d}/part.json"),
        ("first shard file open", ".train-00000.tokens.bin.*.tmp"),
        ("fifth train shard written", "train-00004.tokens.bin"),
        ("meta.json published", "meta.json"),
    ]


def test_preprocess_kill9_sweep(tmp_path, llamafactory_data_dir, llama3_tokenizer_path):
    ref_out = tmp_path / "reference"
    t0 = time.perf_counter()
    done = subprocess.run(_preprocess_cmd(llamafactory_data_dir, llama3_tokenizer_path, ref_out), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    duration = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    reference = _files(ref_out)
    ref_meta = json.loads(reference["meta.json"])
    assert ref_meta["num_records"] == 999 and len(ref_meta["splits"]["train"]["shards"]) >= 6
    assert len(ref_meta["sha256"]) + 1 == len(reference)  # meta.json and the shard files it lists, nothing else

    rows = []
    for n, (label, trigger) in enumerate(_preprocess_moments(random.Random(SEED), duration)):
        out = tmp_path / f"killed{n:02d}"
        cmd = _preprocess_cmd(llamafactory_data_dir, llama3_tokenizer_path, out)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # its pool workers share its process group
        start = time.perf_counter()
        while proc.poll() is None:
            if isinstance(trigger, float):
                if time.perf_counter() - start >= trigger:
                    break
            elif out.exists() and next(iter(out.glob(trigger)), None) is not None:
                break
            time.sleep(0.0005)
        exited = proc.poll() is not None
        kill_family(proc)
        phase = "exited before the kill" if exited else _preprocess_phase(out)
        rows.append((label, phase))
        print(f"preprocess kill {n:2d} at {label:28s} -> {phase}")
        if (out / "meta.json").exists():  # looks complete only if it is: every listed file, byte for byte
            shards = {k: v for k, v in _files(out).items() if not k.startswith(".work/")}
            assert shards == reference, (label, phase, sorted(set(shards) ^ set(reference)))
        elif out.exists():
            with pytest.raises(MegapackError, match="not a finished megapack shard directory"):
                ShardDataset(out)

        rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if phase in ("finished", "exited before the kill"):  # a finished directory is never clobbered
            assert rerun.returncode == 1 and "already holds finished shards" in rerun.stderr, (label, rerun.stderr)
        else:
            assert rerun.returncode == 0, (label, phase, rerun.stderr)
        got = _files(out)
        assert sorted(got) == sorted(reference), (label, phase, sorted(set(got) ^ set(reference)))
        for name, data in reference.items():
            if name != "meta.json":
                assert got[name] == data, (label, phase, name)
        assert _without_timings(json.loads(got["meta.json"])) == _without_timings(ref_meta), (label, phase)

    phases = [p for _, p in rows]
    print("preprocess kills by phase:", dict(Counter(phases)))
    killed = [p for p in phases if p != "exited before the kill"]
    assert len(killed) >= 10, rows
    # not vacuous: kills landed before tokenization finished and after it, before the shards were published
    assert {"starting", "tokenizing"} & set(killed), rows
    assert {"packing", "writing shards"} & set(killed), rows
    assert len(set(killed)) >= 3, rows


# ---------------------------------------------------------------------------------------------- training


def _steps(metrics: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train record of a metrics.jsonl, in file order (a resumed run appends)."""
    if not metrics.exists():
        return []
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train"]


def _published(ck: Path) -> int:
    """The step a resume of ck starts from, read independently of megapack: `latest`, else the newest complete
    iter_ folder, else 0."""
    marker = ck / "latest"
    if marker.exists() and (ck / marker.read_text().strip() / "megapack.json").is_file():
        return int(marker.read_text().strip().removeprefix("iter_"))
    done = [int(p.name[5:]) for p in ck.glob("iter_???????") if (p / "megapack.json").is_file()]
    return max(done, default=0)


def _training_moments(rng: random.Random) -> list[tuple[str, str, float, float]]:
    """(label, condition, value, delay): 'time' = `value` seconds after launch; 'step' = `delay` seconds after step
    `value`'s metrics line (after the last one: the final, blocking checkpoint is in flight); 'tmp' = the moment
    iter_<value>.tmp appears (an async save starting); 'latest' = the moment `latest` reaches iter_<value> (just
    published, pruning the oldest)."""
    moments = [("during start-up", "time", rng.uniform(0.5, 4.0), 0.0)]
    for step in range(1, STEPS + 1):  # one moment inside every step (the last: the final checkpoint is in flight)
        delay = rng.uniform(0, 1.2 if step < STEPS else 0.3)
        moments.append((f"step {step} + {delay:.2f} s", "step", step, delay))
    moments += [(f"iter_{k}.tmp appears", "tmp", k, 0.0) for k in [rng.randint(2, STEPS - 1)]]
    moments += [(f"`latest` reaches {k}", "latest", k, 0.0) for k in sorted(rng.sample(range(2, STEPS), 2))]
    return moments


def _training_phase(ck: Path, logged: int) -> str:
    if logged == 0:
        return "starting"
    if logged == STEPS:
        return "final checkpoint"
    return "training, async save in flight" if list(ck.glob("iter_*.tmp")) else "training, no save in flight"


@pytest.fixture(scope="module")
def training_sweep(tmp_path_factory, llama3_tokenizer_path, llamafactory_data_dir):
    """Ten single-process runs killed at the moments above (two at a time), then two launches side by side: the
    uninterrupted reference run and the resumption of every killed run (same config each). Yields the observations;
    removes the checkpoints after."""
    w = tmp_path_factory.mktemp("sweep")
    hf = make_tiny_hf(w / "hf")
    # packs of 128 tokens: half the step time of the usual 256 (the kill/resume properties do not depend on it)
    greedy = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, w / "greedy", "greedy", seq_length=128)

    def cfg(name: str) -> dict:
        return base_config(hf, greedy, w / name, data={"seq_length": 128, "valid_split": None},
                           training={"global_batch_size": 2, "train_steps": STEPS},
                           checkpoint={"dir": str(w / f"ck_{name}"), "save_interval": 1, "keep_last": 2,
                                       "async_save": True})

    def kill_at(n: int, moment: tuple[str, str, float, float]) -> dict:
        label, kind, value, delay = moment
        name = f"run{n:02d}"
        ck, metrics = w / f"ck_{name}", w / name / "metrics.jsonl"
        proc = launch(1, [{"config": cfg(name)}], w, name, wait=False)
        start, step_seen_at = time.time(), None
        while proc.poll() is None and time.time() < start + 300:
            logged = metrics.read_bytes().count(b"\n") if metrics.exists() else 0  # finished lines: train steps
            if kind == "time" and time.time() - start >= value:
                break
            if kind == "step" and logged >= value:
                step_seen_at = step_seen_at or time.time()
                if time.time() - step_seen_at >= delay:
                    break
            if kind == "tmp" and (ck / f"iter_{int(value):07d}.tmp").exists():
                break
            if kind == "latest" and (ck / "latest").exists() and _published(ck) >= value:
                break
            time.sleep(0.005)
        exited = proc.poll() is not None
        kill_family(proc)
        assert not exited, f"{name} ({label}) ended before the kill:\n" + (w / f"{name}.log").read_text()[-3000:]
        lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        killed = _steps(metrics)
        latest = (ck / "latest").read_text().strip() if (ck / "latest").exists() else None
        iters = {p.name: sorted(f.name for f in p.iterdir()) for p in sorted(ck.glob("iter_*"))} if ck.exists() else {}
        run = {"name": name, "label": label, "killed": killed, "lines": lines, "latest": latest, "iters": iters,
               "resume_from": _published(ck), "phase": _training_phase(ck, len(killed))}
        print(f"training kill {n:2d} at {label:22s} -> {run['phase']}: steps logged {len(killed)}, "
              f"resumes from {run['resume_from']}, left {list(iters)}")
        return run

    # two single-process runs at a time (one process leaves a core idle); each kill is its own process family
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda item: kill_at(*item), enumerate(_training_moments(random.Random(SEED)))))
    print("training kills by phase:", dict(Counter(r["phase"] for r in runs)))
    halves = [[{"config": cfg("reference")}] + [{"config": cfg(r["name"])} for r in runs[0::2]],
              [{"config": cfg(r["name"])} for r in runs[1::2]]]
    procs = [launch(1, jobs, w, f"resumed{i}", wait=False) for i, jobs in enumerate(halves)]
    for i, proc in enumerate(procs):
        finish(proc, w, f"resumed{i}", timeout=900)
    log = (w / "resumed0.log").read_text() + (w / "resumed1.log").read_text()
    yield {"dir": w, "runs": runs, "log": log, "reference": dict(_steps(w / "reference" / "metrics.jsonl"))}
    for ck in w.glob("ck_*"):  # ~5 GB of checkpoints (pytest keeps its last three temporary folders)
        shutil.rmtree(ck, ignore_errors=True)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_reference_run_trains(training_sweep):
    ref = training_sweep["reference"]
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1] - 0.05, ref  # the weights move: equal curves below are not a frozen model's


def test_each_kill_leaves_a_complete_latest_checkpoint(training_sweep):
    """At each kill: `latest` names a checkpoint with every file a finished one has, and every folder under a
    published name (iter_XXXXXXX) is complete; a half-deleted one would sit there with megapack.json, see
    tests/test_checkpoint_publish.py."""
    w = training_sweep["dir"]
    complete = sorted(p.name for p in (w / "ck_reference" / f"iter_{STEPS:07d}").iterdir())
    assert {"megapack.json", ".metadata", "common.pt"} <= set(complete), complete
    for run in training_sweep["runs"]:
        logged = [s for s, _ in run["killed"]]
        assert logged == list(range(1, len(logged) + 1)), run
        c = run["resume_from"]
        assert c <= len(logged), run  # a checkpoint is published only after its step is logged
        if run["latest"] is not None:
            assert run["latest"] == f"iter_{c:07d}" and run["iters"][run["latest"]] == complete, run
        for name, files in run["iters"].items():  # iter_XXXXXXX.tmp (being saved), .pruned (being deleted)
            assert not re.fullmatch(r"iter_\d{7}", name) or files == complete, (run, name)


def test_each_resume_continues_the_uninterrupted_curve(training_sweep):
    w, ref, log = training_sweep["dir"], training_sweep["reference"], training_sweep["log"]
    for run in training_sweep["runs"]:
        c, killed = run["resume_from"], dict(run["killed"])
        all_lines = (w / run["name"] / "metrics.jsonl").read_text().splitlines()
        resumed = [(r["step"], r["loss"]) for r in map(json.loads, all_lines[run["lines"]:]) if r["kind"] == "train"]
        # the resume starts right after the checkpoint that was current at the kill: steps after it are redone
        assert [s for s, _ in resumed] == list(range(c + 1, STEPS + 1)), run
        ck = w / f"ck_{run['name']}"
        started = f"resumed from {ck / f'iter_{c:07d}'} at step {c}" if c else f"resumed from {ck}"
        assert (started in log) == (c > 0), (run, started)
        union = {s: loss for s, loss in killed.items() if s <= c} | dict(resumed)
        assert sorted(union) == sorted(ref), run
        worst = max(_rel(union[s], ref[s]) for s in ref)
        assert worst <= 1e-6, (run["name"], run["label"], worst, union, ref)
        # what the killed run logged after its checkpoint (and redid) matched as well
        assert all(_rel(loss, ref[s]) <= 1e-6 for s, loss in killed.items()), (run, ref)


def test_resumed_runs_finish_clean(training_sweep):
    w = training_sweep["dir"]
    for run in training_sweep["runs"]:
        ck = w / f"ck_{run['name']}"
        assert (ck / "latest").read_text().strip() == f"iter_{STEPS:07d}", run
        left = sorted(p.name for p in ck.iterdir())
        assert left == ["config.yaml", f"iter_{STEPS - 1:07d}", f"iter_{STEPS:07d}", "latest"], (run, left)
        summary = json.loads((w / run["name"] / "summary.json").read_text())
        assert summary["total_steps"] == STEPS and summary["interrupted"] is False, run


def test_kills_covered_the_run(training_sweep):
    """Not vacuous: ten real kills, spread over start-up, training with an async save in flight and the final
    checkpoint, resuming from several different steps."""
    runs = training_sweep["runs"]
    phases = {r["phase"] for r in runs}
    assert len(runs) >= 10
    assert {"starting", "training, async save in flight", "final checkpoint"} <= phases, [
        (r["label"], r["phase"]) for r in runs]
    assert len({r["resume_from"] for r in runs}) >= 4, [(r["label"], r["resume_from"]) for r in runs]
