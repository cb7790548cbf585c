"""Faults a run must survive or refuse loudly: non-finite losses, resuming with other data, a finished run started
again, incomplete checkpoints. One-process runs of the tiny model on real demo shards (two launches)."""
from __future__ import annotations

import json
import shutil

import pytest

from train_helpers import base_config, demo_inputs, finish, launch, losses, write_yaml

EXPLODING = {"lr": 1e6, "warmup_steps": 0, "decay_style": "constant", "clip_grad": 0.0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama3_tokenizer_path, llamafactory_data_dir):
    w = tmp_path_factory.mktemp("faults")
    hf, greedy, padding = demo_inputs(w, llama3_tokenizer_path, llamafactory_data_dir)
    saving = {"save_interval": 1, "keep_last": 2, "async_save": False}

    def cfg(name: str, shards=greedy, **sections):
        sections.setdefault("training", {}).setdefault("train_steps", 3)
        sections["training"].setdefault("global_batch_size", 2)
        return base_config(hf, shards, w / name, checkpoint={"dir": str(w / f"ck_{name}"), **saving}, **sections)

    finished = cfg("finished")
    stop = cfg("stop", optimizer=EXPLODING, training={"train_steps": 6})
    skip = cfg("skip", optimizer=EXPLODING, training={"train_steps": 8, "on_nonfinite": "skip",
                                                       "max_nonfinite_skips": 2})
    failed = {}
    procs = {name: launch(1, jobs, w, name, wait=False)  # two one-process launches side by side
             for name, jobs in (("first", [{"config": finished}, {"config": finished}, {"config": stop}]),
                                ("second", [{"config": skip}]))}
    for name, proc in procs.items():
        with pytest.raises(AssertionError) as info:  # the last job of each launch stops with its one-line error
            finish(proc, w, name)
        failed[name] = str(info.value)
    return {"dir": w, "hf": hf, "greedy": greedy, "padding": padding, "failed": failed, "finished": finished}


@pytest.mark.multiprocess
def test_nonfinite_loss_stops_before_the_update_and_keeps_the_good_checkpoints(runs):
    w = runs["dir"]
    log = (w / "first.log").read_text()
    records = _records(w / "stop")
    bad = [s for s, r in records.items() if r["nonfinite"]]
    # lr 1e6 blows the weights up: the gradient (or the loss) turns NaN/inf a few steps in, and the run stops there
    assert bad and bad == [max(records)] and 1 < bad[0] < 6, records
    what = records[bad[0]]["nonfinite"]
    assert what in ("loss", "gradient") and records[bad[0]]["skipped"] and records[bad[0]]["grad_norm"] is None
    line = next(x for x in log.splitlines() if "MegapackError: training.on_nonfinite" in x)
    assert f"step {bad[0]}: the {what} is not finite" in line and "stopped before the optimizer step" in line
    # no checkpoint of the non-finite state: the newest is the step before, and keep_last did not prune it
    ck = w / "ck_stop"
    assert (ck / "latest").read_text().strip() == f"iter_{bad[0] - 1:07d}"
    assert f"newest checkpoint: {ck / f'iter_{bad[0] - 1:07d}'}" in line
    for path in [*ck.rglob("*.json"), w / "stop" / "metrics.jsonl"]:
        for text in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            json.loads(text, parse_constant=lambda c: pytest.fail(f"{path}: {c} is not JSON"))


@pytest.mark.multiprocess
def test_nonfinite_skip_is_bounded(runs):
    w = runs["dir"]
    log = (w / "second.log").read_text()
    records = _records(w / "skip")
    bad = sorted(s for s, r in records.items() if r["nonfinite"])
    assert bad == list(range(bad[0], bad[0] + 3)) and bad[-1] == max(records), records  # 2 skips, the 3rd stops
    assert log.count("update skipped") == 2
    assert f"MegapackError: training.max_nonfinite_skips: step {bad[-1]}: the " in log


def _records(run_dir) -> dict[int, dict]:
    from megapack.training.run.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.multiprocess
def test_a_finished_run_is_not_rewritten_by_a_run_that_trains_nothing(runs):
    w = runs["dir"]
    log = (w / "first.log").read_text()
    assert "the run already finished at step 3 of 3; nothing to train" in log
    assert sorted(losses(w / "finished")) == [1, 2, 3]  # the second start wrote no steps
    assert log.count("training 3 steps on") == 1


@pytest.mark.multiprocess
def test_resuming_with_other_data_is_refused_unless_the_position_is_reset(runs, tmp_path, capsys):
    from megapack.cli import main

    config = dict(runs["finished"], data={"path": str(runs["padding"]), "seq_length": 256})
    path = write_yaml(tmp_path / "other.yaml", config)
    assert main(["train", "--config", str(path), "--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: data.path: {runs['padding']} holds other packs than ") and "\n" not in err
    assert "packing 'greedy' -> 'padding'" in err and "checkpoint.reset_data_position=true" in err
    assert main(["train", "--config", str(path), "--check", "checkpoint.reset_data_position=true",
                 "training.train_steps=5"]) == 0
    plan = json.loads(capsys.readouterr().out.splitlines()[-1])["plan"]
    assert plan["reset_data_position"] is True and plan["resume_step"] == 3


@pytest.mark.multiprocess
def test_an_incomplete_latest_checkpoint_is_refused_or_falls_back_when_asked(runs, tmp_path, capsys):
    from megapack.cli import main

    ck = tmp_path / "ck"
    shutil.copytree(runs["dir"] / "ck_finished", ck)
    newest = ck / "iter_0000003"
    next(newest.glob("*.distcp")).unlink()
    config = dict(runs["finished"], checkpoint=dict(runs["finished"]["checkpoint"], dir=str(ck)))
    path = write_yaml(tmp_path / "run.yaml", config)
    assert main(["train", "--config", str(path), "--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint.dir: {newest} is incomplete (__0_0.distcp is missing)"), err
    assert "set checkpoint.fallback=previous to resume from iter_0000002" in err and "\n" not in err
    assert main(["train", "--config", str(path), "--check", "checkpoint.fallback=previous"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["plan"]["resume_step"] == 2
    assert f"{newest} is incomplete" in captured.err
    # a latest checkpoint without megapack.json no longer resumes silently from an older one
    shutil.rmtree(newest)
    shutil.copytree(runs["dir"] / "ck_finished" / "iter_0000003", newest)
    (newest / "megapack.json").unlink()
    assert main(["train", "--config", str(path), "--check"]) == 1
    assert "(megapack.json is missing)" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_tmp(runs, tmp_path):
    """A real ENOSPC: the checkpoint directory is a 20 MB tmpfs (a tiny-model checkpoint needs ~100 MB per rank)."""
    import os
    import shlex
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --mount (root or user namespaces)")
    mnt = tmp_path / "ck"
    mnt.mkdir()
    config = dict(runs["finished"], checkpoint={"dir": str(mnt), "save_interval": 1, "async_save": False},
                  logging={"dir": str(tmp_path / "log"), "tensorboard": False})
    path = write_yaml(tmp_path / "run.yaml", config)
    cli = [sys.executable, "-m", "megapack", "train", "--config", str(path)]
    script = (f"mount -t tmpfs -o size=20m tmpfs {mnt} || exit 99; {shlex.join(cli)}; rc=$?; "
              f"find {mnt} -mindepth 1 | sed 's|^{mnt}/||'; exit $rc")
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if run.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs: {run.stderr.strip()}")
    err = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and err.startswith(f"error: checkpoint.dir: writing {mnt}/iter_0000001.tmp failed "
                                                  "(no space left on device)"), run.stderr[-3000:]
    assert "bytes, " in err and "bytes are free" in err
    assert "Traceback" not in run.stderr
    left = run.stdout.split()
    assert not [p for p in left if p.startswith("iter_")], left  # no .tmp (and nothing that looks complete)


def test_a_config_error_under_the_torchrun_launcher_is_one_line(tmp_path):
    """examples/train_torchrun.sh checks the config before torchrun starts: our line, not a ChildFailedError."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"hf_dir": "/m"}, "data": {"path": "/d"},
                                    "training": {"global_batch_size": 2, "train_stepz": 3}}))
    env = dict(os.environ, NPROC="2", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    run = subprocess.run(["bash", str(root / "examples" / "train_torchrun.sh"), str(path)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 1 and run.stderr.strip() == (f"error: {path}: training.train_stepz: unknown key (did you "
                                                          f"mean 'training.train_steps'?)"), run.stderr


@pytest.mark.multiprocess
def test_an_error_on_a_rank_after_the_check_ends_the_torchrun_launcher_with_one_line(tmp_path, llama3_tokenizer_path,
                                                                                   llamafactory_data_dir):
    """A flipped byte passes `--check` (data.verify fast) and is found by the ranks (data.verify full) before step 1:
    the launcher's last line names the failed rank, its line and its exit code, not torchrun's ChildFailedError."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from train_helpers import make_demo_shards, make_tiny_hf

    root = Path(__file__).resolve().parents[1]
    shards = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, tmp_path / "shards", "greedy", records=16)
    meta = json.loads((shards / "meta.json").read_text())
    data = bytearray((shards / "train-00000.tokens.bin").read_bytes())
    data[400] ^= 0x01
    (shards / "train-00000.tokens.bin").write_bytes(bytes(data))
    config = base_config(make_tiny_hf(tmp_path / "hf"), shards, tmp_path / "run", data={"verify": "full"},
                         training={"train_steps": 1, "global_batch_size": 2})
    path = write_yaml(tmp_path / "run.yaml", config)
    env = dict(os.environ, NPROC="2", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    run = subprocess.run(["bash", str(root / "examples" / "train_torchrun.sh"), str(path)], capture_output=True,
                         text=True, timeout=300, env=env)
    sha = meta["sha256"]["train-00000.tokens.bin"]
    error = f"data.path: {shards}/train-00000.tokens.bin: sha256 mismatch (meta.json records {sha[:12]}…)"
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and re.fullmatch(r"error: rank [01] failed with exit code 1: " + re.escape(error),
                                                lines[-1]), run.stderr[-3000:]
    assert lines.count(f"error: {error}") == 2  # each rank's own line, before the summary
    assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr, run.stderr[-3000:]
