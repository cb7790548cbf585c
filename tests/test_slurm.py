"""examples/train.sbatch and examples/preprocess_slurm.sbatch on a real Slurm (tests/slurm.py: munged, slurmctld and
slurmd started for this session on this host), CPU-only: the GPU #SBATCH lines stay, the command line overrides them.

Every training job runs the config of the README's torchrun line (tests/launch_runs.py) from the same directory and
must reproduce its losses: one job to the end; one interrupted by the time-limit signal and one by
`scancel --signal=USR1` (each checkpoints, requeues itself, resumes and finishes); one with a rank killed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from launch_runs import ROOT, STEPS, launcher_env, torchrun_reference
from slurm import FINAL_STATES, SlurmUnavailable, start_cluster, stop_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess]  # Slurm jobs running torchrun

CPU_ONLY = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
# the interrupted runs also save on schedule: the checkpoint writer's helper processes then exist when the signal
# comes (megapack before the fix: they died of it and the next save failed with BrokenPipeError)
SAVE_EVERY_2 = ("checkpoint.save_interval=2",)
TIMING: dict[str, float] = {}  # seconds from submission to step 1 of the full run (aims the time-limit signal)
TRAIN = [str(ROOT / "examples" / "train.sbatch"), str(ROOT / "configs" / "tiny_cpu.yaml"),
         f"training.train_steps={STEPS}"]


@pytest.fixture(scope="session")
def cluster():
    """One single-node Slurm for every test; at the end exactly its daemons are stopped and nothing is left."""
    try:
        c = start_cluster()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    yield c
    leftovers = stop_cluster(c)
    assert not leftovers, f"processes left by the Slurm jobs: {leftovers}"
    assert all(p.poll() is not None for p in c.procs.values()), "a Slurm daemon outlived the test cluster"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The directory of the torchrun reference run (runs/tiny-hf, runs/demo-shards, runs/tiny-train)."""
    w = torchrun_reference(tmp_path_factory.getbasetemp())
    (w / "logs").mkdir(exist_ok=True)
    return w


def _train(cluster, work: Path, name: str, *sbatch: str, overrides: tuple = ()) -> str:
    return cluster.sbatch(*CPU_ONLY, f"--job-name={name}", *sbatch, *TRAIN, f"checkpoint.dir=runs/{name}",
                          *overrides, cwd=work, env=launcher_env(MEGAPACK_ROOT=str(ROOT)))


def _log(work: Path, name: str, job: str) -> str:
    return (work / "logs" / f"{name}-{job}.out").read_text()


def _train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]


def _wait_for_step(run_dir: Path, step: int, timeout: float = 600, until_done=None) -> float | None:
    """When run_dir logged `step` (None: the job (cluster, id) `until_done` ended first)."""
    deadline = time.time() + timeout
    while not any(r["step"] >= step for r in _train_records(run_dir)):
        assert time.time() < deadline, f"{run_dir}: no step {step} after {timeout} s"
        if until_done is not None and until_done[0].job(until_done[1]).get("JobState") in FINAL_STATES:
            return None
        time.sleep(0.1)
    return time.time()


def _same_curve(work: Path, name: str) -> None:
    """Steps 1..STEPS each logged once, losses equal to the torchrun run (≤ 1e-6)."""
    ref = {r["step"]: r["loss"] for r in _train_records(work / "runs" / "tiny-train")}
    got = _train_records(work / "runs" / name)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), f"{name}: steps {[r['step'] for r in got]}"
    worst = max(abs(r["loss"] - ref[r["step"]]) for r in got)
    assert worst <= 1e-6, f"{name}: loss differs from torchrun by {worst:.2e}: {got} vs {ref}"
    assert ref[STEPS] < ref[1] - 0.1  # it trained


def _rank_process(job_id: str, rank: int) -> psutil.Process:
    found = [p for p in psutil.process_iter() if _env(p).get("SLURM_JOB_ID") == job_id
             and _env(p).get("SLURM_PROCID") == str(rank) and "train" in _cmdline(p) and "--check" not in _cmdline(p)]
    assert len(found) == 1, found
    return found[0]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _env(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}


def _when(run_dir: Path, step: int, action, done: dict, key: str) -> threading.Thread:
    """Run action() as soon as run_dir logged `step` (in the background: the tests wait on other jobs meanwhile)."""
    def watch():
        try:
            _wait_for_step(run_dir, step)
            done[key] = (time.time(), action())
        except BaseException as exc:  # noqa: BLE001 - reported by the test that waits for it
            done[key] = (time.time(), exc)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def jobs(cluster, work):
    """Submitted together at the start (the node takes several jobs at once): a full run, a wrong data.path, a run
    whose rank 1 gets SIGKILL after step 1, a run preempted with scancel --signal=USR1 after step 2."""
    submitted = time.time()
    ids = {name: _train(cluster, work, name, f"--output=logs/{name}-%j.out", overrides=over) for name, over in [
        ("full", ()), ("baddata", ("data.path=runs/no-such-shards",)), ("killed", ()), ("preempted", SAVE_EVERY_2)]}
    done: dict = {}
    watchers = [
        _when(work / "runs" / "killed", 1, lambda: _rank_process(ids["killed"], 1).send_signal(signal.SIGKILL),
              done, "killed"),
        _when(work / "runs" / "preempted", 2, lambda: cluster.run("scancel", "--signal=USR1", ids["preempted"]),
              done, "preempted"),
    ]
    yield ids, submitted, done
    for thread in watchers:
        thread.join(timeout=300)


def test_sbatch_trains_to_the_end_with_torchruns_losses(cluster, work, jobs):
    ids, submitted, _ = jobs
    TIMING["first_step_s"] = _wait_for_step(work / "runs" / "full", 1) - submitted
    job = cluster.wait(ids["full"], timeout=300)
    log = _log(work, "full", ids["full"])
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "0", log[-3000:]
    assert f"step {STEPS}/{STEPS} loss" in log and "step 6 validation loss" in log
    assert f"saved checkpoint runs/full/iter_{STEPS:07d}" in log
    summary = json.loads((work / "runs" / "full" / "summary.json").read_text())
    assert summary["total_steps"] == STEPS and summary["interrupted"] is False
    assert f"[megapack] using {ROOT / '.venv' / 'bin' / 'megapack'}" in log  # found through MEGAPACK_ROOT
    _same_curve(work, "full")


def _epoch(stamp: str) -> float:
    """Seconds since the epoch of a Slurm time stamp (local time, e.g. 2026-11-26T16:20:31.123)."""
    whole, _, frac = stamp.partition(".")
    return time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


def _timelimit_checks(cluster) -> list[float]:
    """Times (epoch s) of slurmctld's time-limit passes (every 30 s; the warning signal goes out in one of them)."""
    log = (cluster.root / "slurmctld.log").read_text()
    return [_epoch(s) for s in re.findall(r"^\[(\S+)\] debug2: Testing job time limits", log, flags=re.M)]


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, work, jobs):
    """--time=2 --signal=USR1@110: slurmctld sends SIGUSR1 at its first time-limit pass (every 30 s, logged at
    debug2) after the job starts. The job is submitted so that the pass falls just after its step 1: the lead is the
    full run's time to step 1 (slowed by its neighbours), and when that misses (no signal during training), the
    missed job's own time to step 1 aims the next try."""
    ids, _, _ = jobs
    cluster.wait(ids["full"], timeout=300)
    lead = TIMING.get("first_step_s", 15.0)
    cluster.run("scontrol", "setdebug", "debug2")
    for attempt in range(3):
        name = f"timelimit{attempt}"
        nxt = _next_timelimit_pass(cluster)
        while nxt - time.time() < lead + 2:
            nxt += 30
        time.sleep(max(0.0, nxt - lead - 1 - time.time()))
        submitted = time.time()
        job_id = _train(cluster, work, name, "--time=2", "--signal=USR1@110", f"--output=logs/{name}-%j.out",
                        overrides=SAVE_EVERY_2)
        first = _wait_for_step(work / "runs" / name, 1, until_done=(cluster, job_id))
        # Slurm re-arms the warning of a requeued job: with 2 minutes it would stop every restart after one step;
        # the restart gets 10 minutes, as a real job's restart gets its whole limit again
        while cluster.job(job_id).get("JobState") not in FINAL_STATES:
            if cluster.job(job_id).get("Restarts", "0") != "0":
                cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
                break
            time.sleep(0.2)
        cluster.wait(job_id, timeout=400)
        if "signal 10: checkpointing" in _log(work, name, job_id):
            break
        # no step 1: the signal came before the ranks ran (the pass was too early); else it came too late
        lead = first - submitted if first else lead + 5
    log = _interrupted_then_resumed(cluster, work, name, job_id)
    assert "requeueing job" in log


def _next_timelimit_pass(cluster) -> float:
    deadline = time.time() + 70
    while not _timelimit_checks(cluster):
        assert time.time() < deadline, "slurmctld logged no time-limit pass"
        time.sleep(0.5)
    return _timelimit_checks(cluster)[-1] + 30


def test_a_wrong_data_path_fails_the_job_with_one_line(cluster, work, jobs):
    ids, _, done = jobs
    job = cluster.wait(ids["baddata"], timeout=120)
    log = _log(work, "baddata", ids["baddata"])
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0", job
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "runs/no-such-shards is not a finished megapack shard directory" in errors[0], log
    assert "srun" not in log  # refused by --check before any task started


def test_an_error_on_a_rank_after_the_check_ends_the_job_log_with_one_line(cluster, work):
    """A flipped byte passes `--check` (data.verify fast) and every rank finds it (data.verify full) before step 1:
    the job fails with the rank's exit code (srun's is 143: it stopped the other rank) and its log ends with one line
    naming the rank, its error and the exit code."""
    import shutil

    shards = work / "runs" / "flipped-shards"
    shutil.rmtree(shards, ignore_errors=True)
    shutil.copytree(work / "runs" / "demo-shards", shards)
    data = bytearray((shards / "train-00000.tokens.bin").read_bytes())
    data[400] ^= 0x01
    (shards / "train-00000.tokens.bin").write_bytes(bytes(data))
    job_id = _train(cluster, work, "flipped", "--output=logs/flipped-%j.out",
                    overrides=("data.path=runs/flipped-shards",))
    job = cluster.wait(job_id, timeout=300)
    log = _log(work, "flipped", job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0", log[-3000:]
    error = re.escape("flipped-shards/train-00000.tokens.bin: sha256 mismatch (meta.json records ")
    last = log.strip().splitlines()[-1]
    where = re.escape(str(work / "logs" / f"flipped-{job_id}.out"))
    assert re.fullmatch(rf"error: rank [01] failed with exit code 1: data\.path: \S*{error}\w+…\) "
                        rf"\(srun exit code \d+; job log {where}\)", last), log[-3000:]
    assert "Traceback" not in log and not (work / "logs" / f".failures-{job_id}").exists()


def test_a_killed_rank_fails_the_job_within_seconds(cluster, work, jobs):
    ids, _, done = jobs
    job = cluster.wait(ids["killed"], timeout=300)
    log = _log(work, "killed", ids["killed"])
    killed_at, result = done["killed"]
    assert not isinstance(result, BaseException), result
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", job
    assert re.search(r"srun: error: \S+: task 1: Killed", log), log[-3000:]
    # it printed nothing: the last line names it and where its output is (rank 0 may have lost its peer first)
    where = re.escape(str(work / "logs" / f"killed-{ids['killed']}.out"))
    assert re.fullmatch(rf"error: rank 1 was killed by SIGKILL \(exit code 137\); it printed no error line: its output "
                        rf"is in {where} \(srun exit code \d+\)", log.strip().splitlines()[-1]), log[-3000:]
    # --kill-on-bad-exit stops rank 0 at once (not at the time limit); no requeue of a failed run
    assert _epoch(job["EndTime"]) - killed_at < 60, (job["EndTime"], killed_at)
    assert "requeueing" not in log and job["Restarts"] == "0"


def _interrupted_then_resumed(cluster, work: Path, name: str, job_id: str) -> str:
    job = cluster.wait(job_id, timeout=400)
    log = _log(work, name, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-4000:]
    stopped = re.findall(r"signal 10: checkpointing at step (\d+) and exiting", log)
    assert len(stopped) >= 1 and int(job["Restarts"]) == len(stopped), log[-4000:]
    for step in stopped:
        assert f"saved checkpoint runs/{name}/iter_{int(step):07d}" in log
        assert f"resumed from runs/{name}/iter_{int(step):07d} at step {step}" in log
    assert "Traceback" not in log, log[-4000:]
    assert json.loads((work / "runs" / name / "summary.json").read_text())["interrupted"] is False
    _same_curve(work, name)
    return log


def test_scancel_signal_usr1_checkpoints_requeues_and_resumes(cluster, work, jobs):
    ids, _, done = jobs
    cluster.wait(ids["preempted"], timeout=400)
    assert not isinstance(done["preempted"][1], BaseException), done["preempted"]
    log = _interrupted_then_resumed(cluster, work, "preempted", ids["preempted"])
    assert "requeueing job" in log


PREPROCESS = str(ROOT / "examples" / "preprocess_slurm.sbatch")


def _shards(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != "meta.json"}


def test_preprocess_array_then_pack_job_equals_one_preprocess_run(cluster, work, llamafactory_data_dir,
                                                                     llama3_tokenizer_path):
    """The header's two sbatch lines (4 partitions, --cpus-per-task=1); a second array whose task 3 is cancelled
    before it runs (afterok would never fire: its pack job waits with afterany) gets partition 3 from the pack step."""
    env = launcher_env(MEGAPACK_ROOT=str(ROOT), NUM_PARTITIONS="4", DATASET_DIR=str(llamafactory_data_dir),
                       TOKENIZER=str(llama3_tokenizer_path))
    ids = {}
    for name, extra in (("array", ()), ("cancelled", ("--hold",))):
        e = env | {"OUTPUT_DIR": f"pre/{name}"}
        ids[name] = cluster.sbatch("--array=0-3", "--cpus-per-task=1", *extra, f"--output=logs/pre-{name}-%A_%a.out",
                                   PREPROCESS, cwd=work, env=e)
        if extra:
            cluster.run("scancel", f"{ids[name]}_3")
            cluster.run("scontrol", "release", ids[name])
        dep = "afterany" if extra else "afterok"
        ids[f"{name}-pack"] = cluster.sbatch(f"--dependency={dep}:{ids[name]}", "--export=ALL,PACK=1",
                                             "--cpus-per-task=1", f"--output=logs/pre-{name}-pack-%j.out", PREPROCESS,
                                             cwd=work, env=e)
    args = ["--dataset", "alpaca_en_demo", "--dataset-dir", str(llamafactory_data_dir), "--tokenizer-model",
            str(llama3_tokenizer_path), "--template", "llama3", "--seq-length", "4096", "--packing", "bfd", "--seed",
            "1234", "--val-fraction", "0.01", "--output-dir", "pre/single", "--workers", "1", "--no-progress"]
    single = subprocess.run([sys.executable, "-m", "megapack", "preprocess", *args], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    reference, meta = _shards(work / "pre" / "single"), json.loads((work / "pre" / "single" / "meta.json").read_text())
    assert "train-00000.tokens.bin" in reference
    for name, reused in (("array", 4), ("cancelled", 3)):
        cluster.wait(ids[name], timeout=300)
        job = cluster.wait(ids[f"{name}-pack"], timeout=300)
        log = (work / "logs" / f"pre-{name}-pack-{ids[name + '-pack']}.out").read_text()
        assert job["JobState"] == "COMPLETED", log
        assert re.search(rf"reused partitions\s+{reused}\n", log), log
        assert _shards(work / "pre" / name) == reference, name
        other = json.loads((work / "pre" / name / "meta.json").read_text())
        assert {k for k in meta.keys() | other.keys() if meta.get(k) != other.get(k)} == {"num_partitions"}, name
    # task 3 of the second array never ran (its partition came from the pack step: 3 reused, asserted above)
    assert sorted(p.name for p in (work / "logs").glob(f"pre-cancelled-{ids['cancelled']}_*.out")) == [
        f"pre-cancelled-{ids['cancelled']}_{i}.out" for i in range(3)]
