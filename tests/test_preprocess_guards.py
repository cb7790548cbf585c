"""Preprocess refuses what it cannot do well and never leaves a finished-looking directory behind: output files
honour the umask, degenerate inputs are refused with one line, a full disk gives one line and no leftovers."""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megapack.cli import main
from megapack.data.pipeline.preprocess import MIN_SEQ_LENGTH

ROOT = Path(__file__).resolve().parents[1]


def _docs(path: Path, n: int = 40) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i}: " + "packing many tokens " * (i % 7 + 1)}) + "\n")
    return path


def _argv(tok, inputs, out, *extra) -> list[str]:
    return ["preprocess", "--tokenizer-model", str(tok), "--no-progress", *[a for p in inputs for a in ("--input", str(p))],
            "--output-dir", str(out), *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_output_files_honour_the_umask(tmp_path, llama3_tokenizer_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert main(_argv(llama3_tokenizer_path, [_docs(tmp_path / "d.jsonl")], out, "--template", "plain",
                          "--seq-length", "256")) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "meta.json" in modes and len(modes) > 1
    assert modes == {name: 0o644 for name in modes}, modes


def test_seq_length_below_the_minimum_is_refused(tmp_path, llama3_tokenizer_path, capsys):
    data = _docs(tmp_path / "d.jsonl")
    for bad in ("8", "15", "0", "-4"):
        out = tmp_path / f"o{bad}"
        assert main(_argv(llama3_tokenizer_path, [data], out, "--template", "plain", "--seq-length", bad)) == 1
        err = _one_line_error(capsys)
        assert f"--seq-length {bad}: expected an integer >= 16" in err, err
        assert not out.exists()
    assert main(_argv(llama3_tokenizer_path, [data], tmp_path / "o16", "--template", "plain", "--seq-length", "16")) == 0


def test_help_documents_the_minimum_seq_length(capsys):
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    assert f"at least {MIN_SEQ_LENGTH}" in " ".join(capsys.readouterr().out.split())


def test_train_split_without_trained_tokens_is_refused(tmp_path, llama3_tokenizer_path, llamafactory_data_dir, capsys):
    """glaive_toolcall_en_demo's first response token is at position >= 17: at --seq-length 16 every conversation is
    cut before its first trained token."""
    base = ["--dataset", "glaive_toolcall_en_demo", "--dataset-dir", str(llamafactory_data_dir), "--seq-length", "16"]
    for packing in ("bfd", "padding"):
        out = tmp_path / f"out-{packing}"
        assert main(_argv(llama3_tokenizer_path, [], out, *base, "--packing", packing)) == 1
        err = _one_line_error(capsys)
        assert "no trained tokens" in err and "--seq-length 16" in err and "300 conversations" in err, err
        assert not out.exists()
    # an existing directory keeps what is not ours and gets no meta.json
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_argv(llama3_tokenizer_path, [], out, *base, "--overwrite")) == 1
    _one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # random packing keeps whole conversations: the same data trains there
    assert main(_argv(llama3_tokenizer_path, [], tmp_path / "random", *base, "--packing", "random")) == 0
    assert json.loads((tmp_path / "random" / "meta.json").read_text())["num_trained_tokens"] > 0


def test_all_conversations_dropped_is_refused(tmp_path, llama3_tokenizer_path, llamafactory_data_dir, capsys):
    base = ["--dataset", "identity,glaive_toolcall_en_demo", "--dataset-dir", str(llamafactory_data_dir)]
    out = tmp_path / "out"
    assert main(_argv(llama3_tokenizer_path, [], out, *base, "--seq-length", "16", "--drop-long")) == 1
    err = _one_line_error(capsys)
    assert "no trained tokens" in err and "391 dropped by --drop-long" in err, err
    assert not out.exists()


def test_folder_with_docs_and_registry_reads_only_data(tmp_path, llama3_tokenizer_path, llamafactory_data_dir, capsys):
    """A copy of LLaMA-Factory's data folder layout: README.md, README_zh.md, dataset_info.json and a dataset."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("README.md", "README_zh.md", "dataset_info.json", "alpaca_en_demo.json"):
        (folder / name).write_bytes((llamafactory_data_dir / name).read_bytes())
    out = tmp_path / "out"
    assert main(_argv(llama3_tokenizer_path, [folder], out, "--seq-length", "512")) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_records"] == 999 and meta["skipped"] == {}


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tree(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


def _assert_not_complete(out: Path) -> None:
    tree = _tree(out)
    assert "meta.json" not in tree and not [p for p in tree if p.endswith(".tmp") or ".tmp" in Path(p).name], tree
    assert not [p for p in tree if p.startswith(("train-", "val-"))], tree


def test_disk_full_while_writing_shards(tmp_path, llama3_tokenizer_path, monkeypatch, capsys):
    from megapack.data.packs import mmidx

    real_write = mmidx.HashingFile.write
    calls = {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if calls["n"] > 2:
            raise ENOSPC
        real_write(self, data)

    monkeypatch.setattr(mmidx.HashingFile, "write", write)
    data, out = _docs(tmp_path / "d.jsonl"), tmp_path / "out"
    argv = _argv(llama3_tokenizer_path, [data], out, "--template", "plain", "--seq-length", "64")
    assert main(argv) == 1
    err = _one_line_error(capsys)
    assert f"{out}: No space left on device while writing the shards" in err, err
    assert "bytes needed" in err and "rerun" in err, err
    _assert_not_complete(out)
    assert (out / ".work" / "part-00000-of-00001" / "part.json").exists()  # the tokenized partition is kept
    monkeypatch.setattr(mmidx.HashingFile, "write", real_write)
    assert main(argv) == 0 and "reused partitions" in capsys.readouterr().out
    assert (out / "meta.json").exists() and not (out / ".work").exists()


def test_disk_full_while_tokenizing(tmp_path, llama3_tokenizer_path, monkeypatch, capsys):
    from megapack.data.pipeline import partitions

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise ENOSPC

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def close(self):
            self.f.close()

    def fake_open(path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        return Full(f) if str(path).endswith("tokens.bin") and "w" in mode else f

    monkeypatch.setattr(partitions, "open", fake_open, raising=False)
    out = tmp_path / "out"
    assert main(_argv(llama3_tokenizer_path, [_docs(tmp_path / "d.jsonl")], out, "--template", "plain")) == 1
    err = _one_line_error(capsys)
    assert str(out / ".work" / "part-00000-of-00001") in err and "No space left on device" in err, err
    assert not out.exists()  # created by this run, nothing reusable: removed


def test_disk_full_while_writing_meta(tmp_path, llama3_tokenizer_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def fsync(fd):
        if ".meta.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise ENOSPC
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_argv(llama3_tokenizer_path, [_docs(tmp_path / "d.jsonl")], out, "--template", "plain",
                      "--overwrite")) == 1
    err = _one_line_error(capsys)
    assert str(out / "meta.json") in err and "No space left on device" in err, err
    _assert_not_complete(out)
    assert "keep.txt" in _tree(out)


def test_real_full_disk_in_a_small_tmpfs(tmp_path, llama3_tokenizer_path, llamafactory_data_dir):
    """A real ENOSPC from the kernel: preprocess into a 1.5 MB tmpfs mounted in a private mount namespace."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --mount (root or user namespaces)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--tokenizer-model", str(llama3_tokenizer_path),
           "--dataset", "alpaca_en_demo", "--dataset-dir", str(llamafactory_data_dir), "--seq-length", "512",
           "--no-progress", "--output-dir", str(mnt / "out")]
    for size, stage in (("1500k", "while writing the shards"), ("300k", "while tokenizing")):
        script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99; {shlex.join(cli)}; rc=$?; "
                  f"find {mnt / 'out'} 2>/dev/null | sed 's|^{mnt / 'out'}||'; exit $rc")
        run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if run.returncode == 99:
            pytest.skip(f"cannot mount a tmpfs: {run.stderr.strip()}")
        err = run.stderr.strip()
        assert run.returncode == 1 and err.startswith("error: ") and "\n" not in err, (size, err)
        assert "No space left on device" in err and stage in err, (size, err)
        tree = run.stdout.split()
        assert "/meta.json" not in tree and not [p for p in tree if ".tmp" in p], (size, tree)



class _Killed(BaseException):
    """Stands for SIGKILL: nothing in preprocess catches it, so no cleanup code runs."""


def test_killed_while_removing_the_work_folder(tmp_path, llama3_tokenizer_path, monkeypatch, capsys):
    """Found by tests/test_fault_sweep.py: a kill after meta.json was published but before `.work/` was gone left
    the tokenized copy behind for good, and the same command refused to run ("already holds finished shards"). Now
    the same command finishes the removal without rewriting the shards, and the removal drops job.json last."""
    from megapack.data.packs import writer
    from megapack.data.pipeline.partitions import remove_work_dir

    real_write_json = writer.write_json_atomic

    def write_json(path, obj, *args, **kwargs):  # the kill lands right after meta.json is published
        real_write_json(path, obj, *args, **kwargs)
        if Path(path).name == "meta.json":
            raise _Killed(path)

    out = tmp_path / "out"
    argv = _argv(llama3_tokenizer_path, [_docs(tmp_path / "d.jsonl")], out, "--template", "plain", "--seq-length",
                 "64", "--num-partitions", "2")
    monkeypatch.setattr(writer, "write_json_atomic", write_json)
    with pytest.raises(_Killed):
        main(argv)
    monkeypatch.setattr(writer, "write_json_atomic", real_write_json)
    work = _tree(out / ".work")
    assert work == sorted(["job.json", *(f"part-0000{i}-of-00002{f}" for i in (0, 1)
                                         for f in ("", "/mask.bin", "/part.json", "/samples.npy", "/tokens.bin"))])
    shards = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}
    assert "meta.json" in shards and len(shards) > 5
    # another command is still refused and touches nothing
    assert main([*argv[:-1], "65"]) == 1 and "already holds finished shards" in _one_line_error(capsys)
    assert _tree(out / ".work") == work

    # killed again while removing the work folder: after the first partition, job.json is still there
    real_rmtree = shutil.rmtree
    removed: list[str] = []

    def rmtree(path, *args, **kwargs):
        if removed:
            raise _Killed(path)
        removed.append(Path(path).name)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(_Killed):
        remove_work_dir(out / ".work")
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    left = _tree(out / ".work")
    assert removed[0].startswith("part-") and "job.json" in left and len(left) == 1 + 5, left

    # the same command removes the rest and reports the published shards, rewriting none of them
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert not (out / ".work").exists()
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == shards
    # killed between job.json and the folder itself: the empty folder goes, the finished directory stays finished
    (out / ".work").mkdir()
    assert main(argv) == 1 and "already holds finished shards" in _one_line_error(capsys)
    assert not (out / ".work").exists() and "meta.json" in _tree(out)


def test_partitions_written_before_the_rename_read_with_the_new_keys(tmp_path):
    from megapack.data.pipeline.partitions import DONE_FILE, finished_partition, part_dir

    folder = part_dir(tmp_path, 0, 1)
    folder.mkdir(parents=True)
    (folder / DONE_FILE).write_text(json.dumps({"records": 3, "samples": 2, "tokens": 10, "loss_tokens": 4}))
    assert finished_partition(tmp_path, 0, 1) == {"records": 3, "conversations": 2, "tokens": 10, "trained_tokens": 4}


def test_every_record_failing_the_same_way_names_the_first_one(tmp_path, llama3_tokenizer_path, capsys):
    """The one-line error gives the first bad record's file:line and reason, not only the counts."""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}]}) + "\n"
                            for i in range(5)))
    assert main(_argv(llama3_tokenizer_path, [data], tmp_path / "out", "--format", "sharegpt")) == 1
    err = _one_line_error(capsys)
    assert '"ends on user turn": 5' in err and f"first: {data}:1: ends on user turn" in err, err


def test_hostile_records_are_counted_bad_records_and_the_limits_are_flags(tmp_path, llama3_tokenizer_path, capsys):
    """Too deep and too large records are skipped with file:line and counted in meta.json; the flags raise the limits."""
    data = _docs(tmp_path / "d.jsonl", 20)
    with open(data, "a", encoding="utf-8") as f:
        f.write('{"text": "deep", "x": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
        f.write(json.dumps({"text": "long " * 60_000}) + "\n")
        f.write('{"text": "nested past the default", "x": ' + "[" * 150 + "]" * 150 + "}\n")
    out = tmp_path / "out"
    assert main(_argv(llama3_tokenizer_path, [data], out, "--max-record-bytes", "200000")) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == {"too deeply nested": 2, "record too large": 1}, meta["skipped"]
    assert meta["num_conversations"] == 20
    err = capsys.readouterr().err
    assert f"{data}:21: too deeply nested" in err and f"{data}:22: record too large" in err, err
    assert f"{data}:23: too deeply nested (nested deeper than 100 levels (raise --max-record-depth))" in err, err
    assert main(_argv(llama3_tokenizer_path, [data], tmp_path / "raised", "--max-record-bytes", "400000",
                      "--max-record-depth", "200")) == 0
    raised = json.loads((tmp_path / "raised" / "meta.json").read_text())
    assert raised["num_conversations"] == 22 and raised["skipped"] == {"too deeply nested": 1}, raised["skipped"]
    capsys.readouterr()
    assert main(_argv(llama3_tokenizer_path, [data], tmp_path / "x", "--max-record-depth", "0")) == 1
    assert "--max-record-depth 0: expected a positive integer" in _one_line_error(capsys)
