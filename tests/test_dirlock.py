"""A directory has one writer at a time (issue 21): a second preprocess or training into a directory another live
run holds is refused in one line naming the holder; a stale lock (holder gone) is taken over with a warning."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megapack.cli import main

HOLDER = "host testhost, pid 4242, started 2026-01-01 00:00:00 UTC"


def _lock_file(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.megapack.lock"


@pytest.fixture
def held(tmp_path):
    """A live process holding `directory`'s lock (flock on the lock file, holder line written)."""
    procs = []

    def hold(directory: Path) -> subprocess.Popen:
        path = _lock_file(directory)
        code = (f"import fcntl,os,sys,time; fd=os.open({str(path)!r}, os.O_RDWR|os.O_CREAT, 0o666); "
                f"fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd,0); os.write(fd, {HOLDER!r}.encode()); "
                "print('held', flush=True); time.sleep(300)")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def _docs(path: Path, n: int = 20) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i}: " + "packing many tokens " * (i % 7 + 1)}) + "\n")
    return path


def _argv(tok, inp, out) -> list[str]:
    return ["preprocess", "--tokenizer-model", str(tok), "--no-progress", "--input", str(inp), "--output-dir", str(out),
            "--seq-length", "64", "--workers", "1"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_preprocess_into_a_held_directory_is_refused_and_removes_nothing(tmp_path, llama3_tokenizer_path, held,
                                                                         capsys):
    inp = _docs(tmp_path / "docs.jsonl")
    out = tmp_path / "out"
    assert main(_argv(llama3_tokenizer_path, inp, out)) == 0  # the other run's published output
    published = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    proc = held(out)
    assert main(_argv(llama3_tokenizer_path, inp, out) + ["--overwrite"]) != 0
    err = _one_line_error(capsys)
    assert str(out) in err and HOLDER in err, err
    assert sorted(p.name for p in out.iterdir()) == published  # nothing of the holder's removed
    proc.kill()
    proc.wait()
    assert main(_argv(llama3_tokenizer_path, inp, out) + ["--overwrite"]) == 0  # released: goes through
    assert "stale lock" in capsys.readouterr().err  # the dead holder's line is reported


def test_two_concurrent_preprocess_runs_one_writer(tmp_path, llama3_tokenizer_path):
    """Both started at once: one publishes, the other is refused in one line; the published output stays whole."""
    inp = _docs(tmp_path / "docs.jsonl", 200)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megapack", *_argv(llama3_tokenizer_path, inp, out)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    assert ok, results
    assert (out / "meta.json").is_file()  # whatever the other run did, the published output is intact
    for rc, _, err in results:
        if rc != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
            assert len(lines) == 1 and ("in use by another run" in lines[0] or "already holds" in lines[0]), err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llama3_tokenizer_path, llamafactory_data_dir):
    from train_helpers import demo_inputs

    w = tmp_path_factory.mktemp("locks")
    hf, greedy, _ = demo_inputs(w, llama3_tokenizer_path, llamafactory_data_dir)
    return w, hf, greedy


def _train_config(tiny, name: str) -> dict:
    from train_helpers import base_config

    w, hf, greedy = tiny
    return base_config(hf, greedy, w / f"log_{name}", checkpoint={"dir": str(w / f"ck_{name}"), "async_save": False},
                       training={"train_steps": 2, "global_batch_size": 2})


def test_train_check_refuses_a_held_checkpoint_dir_and_passes_once_released(tiny, held, capsys):
    from train_helpers import write_yaml

    w = tiny[0]
    path = write_yaml(w / "check.yaml", _train_config(tiny, "check"))
    for key in ("ck_check", "log_check"):
        (w / key).mkdir(exist_ok=True)
        proc = held(w / key)
        capsys.readouterr()
        assert main(["train", "--config", str(path), "--check"]) == 1
        err = _one_line_error(capsys)
        assert str(w / key) in err and HOLDER in err and "in use by another run" in err, err
        proc.kill()
        proc.wait()
    assert main(["train", "--config", str(path), "--check"]) == 0  # released (stale files left): goes through


def test_a_lock_that_fails_half_way_is_one_line_and_every_lock_is_released(tmp_path, monkeypatch):
    """Rank 0 failing to take a lock for another reason than a holder (here a full disk writing the holder line)
    raises the one-line MegapackError that lock_run_dirs broadcasts, not a traceback, and keeps no lock."""
    from types import SimpleNamespace

    from megapack.dirlock import DirLock
    from megapack.errors import MegapackError
    from megapack.training.run.runlock import lock_run_dirs

    config = SimpleNamespace(checkpoint=SimpleNamespace(dir=str(tmp_path / "ck")),
                             logging=SimpleNamespace(dir=str(tmp_path / "log")))
    pwrite = os.pwrite

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".log.megapack.lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(MegapackError) as info:
        lock_run_dirs(config, 0)
    assert str(info.value) == f"logging.dir {tmp_path / 'log'}: cannot take its lock (No space left on device)"
    monkeypatch.undo()
    for name in ("ck", "log"):  # a lock still held by this process would refuse a second open file's flock
        lock = DirLock(tmp_path / name, name)
        assert lock.acquire() is None
        lock.release()


@pytest.mark.multiprocess
def test_training_into_a_held_dir_is_refused_and_a_stale_lock_is_taken_over(tiny, held):
    """Two ranks (DP=2) in one launch: the stale-lock run trains; a run that fails inside Trainer.__init__ after
    taking the lock (a corrupt shard under data.verify full) releases it, so the next run of the same processes
    takes it; the run into a held directory is refused on every rank with the same line, whether preflight sees the
    holder or only rank 0's lock does (the refusal broadcast), and nobody hangs."""
    from train_helpers import finish, launch

    w, _, greedy = tiny
    stale = _train_config(tiny, "stale")
    (w / "ck_stale").mkdir(exist_ok=True)
    _lock_file(w / "ck_stale").write_text("host gone, pid 999999, started 2025-01-01 00:00:00 UTC\n")  # not flocked
    corrupt = w / "greedy_corrupt"
    shutil.copytree(greedy, corrupt, dirs_exist_ok=True)
    data = bytearray((greedy / "train-00000.tokens.bin").read_bytes())
    data[400] ^= 0x01  # same size: only data.verify full (after the lock is taken) notices
    (corrupt / "train-00000.tokens.bin").write_bytes(bytes(data))
    failing = _train_config(tiny, "failing")
    failing["data"]["path"] = str(corrupt)
    busy = _train_config(tiny, "busy")
    held(w / "ck_busy")
    jobs = [{"config": stale}, {"config": failing, "expect_error": "sha256 mismatch"},
            {"config": _train_config(tiny, "failing"), "validate_only": True},
            {"config": busy, "expect_error": "in use by another run"},  # refused by every rank's preflight
            {"config": busy, "lock_taken_after_preflight": True,  # refused by rank 0's lock, broadcast
             "expect_error": "in use by another run"}]  # every rank goes on: the launch ends, nobody hangs
    finish(launch(2, jobs, w, "locks", wait=False), w, "locks")  # (a refusal of one rank only would hang or fail)
    log = (w / "locks.log").read_text()
    assert "stale lock" in log and "pid 999999" in log, log[-3000:]
    assert (w / "ck_stale" / "latest").read_text().strip() == "iter_0000002"
    lines = log.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("training 2 steps"))  # its settings block follows
    assert any(re.fullmatch(r"  world_size +2", x) for x in lines[start + 1:start + 40]), log[-3000:]
    for rank in (0, 1):
        # the two ranks write into one log: a line of one may land in the middle of the other's
        lines = [f"rank {rank}: error: {m}" for m in re.findall(rf"rank {rank}: error: (.*?)(?=rank \d: error: |\n)", log)]
        assert len(lines) == 3 and "sha256 mismatch" in lines[0] and lines[1] == lines[2], log[-3000:]
        assert lines[2] == (f"rank {rank}: error: checkpoint.dir {w / 'ck_busy'}: in use by another run ({HOLDER}; "
                            f"lock file {_lock_file(w / 'ck_busy')}); wait for it to finish or choose another "
                            "directory"), log[-3000:]
    assert '"kind": "valid"' in (w / "log_failing" / "metrics.jsonl").read_text()  # the failed run left it free
    assert not [p for d in ("ck_busy", "log_busy") if (w / d).exists() for p in (w / d).iterdir()]
