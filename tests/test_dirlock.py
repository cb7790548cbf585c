"""A directory has one writer at a time (issue 21): a second preprocess or training into a directory another live
run holds is refused in one line naming the holder; a stale lock (holder gone) is taken over with a warning."""
from __future__ import annotations

import json
import os
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


@pytest.mark.multiprocess
def test_training_into_a_held_dir_is_refused_and_a_stale_lock_is_taken_over(tiny, held):
    from train_helpers import finish, launch

    w = tiny[0]
    stale = _train_config(tiny, "stale")
    (w / "ck_stale").mkdir(exist_ok=True)
    _lock_file(w / "ck_stale").write_text("host gone, pid 999999, started 2025-01-01 00:00:00 UTC\n")  # not flocked
    busy = _train_config(tiny, "busy")
    held(w / "ck_busy")
    with pytest.raises(AssertionError) as info:  # the stale run trains; the busy one is refused with one line
        finish(launch(1, [{"config": stale}, {"config": busy}], w, "locks", wait=False), w, "locks")
    log = (w / "locks.log").read_text()
    assert "stale lock" in log and "pid 999999" in log, log[-3000:]
    assert (w / "ck_stale" / "latest").read_text().strip() == "iter_0000002"
    line = next(x for x in log.splitlines() if "in use by another run" in x)
    assert str(w / "ck_busy") in line and HOLDER in line, str(info.value)[-3000:]
    assert not (w / "ck_busy" / "latest").exists() and not (w / "log_busy" / "metrics.jsonl").exists()
