"""Preprocess refuses what it cannot do well and never leaves a finished-looking directory behind: output files
honour the umask, degenerate inputs are refused with one line, a full disk gives one line and no leftovers."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from megapack.cli import main
from megapack.data.pipeline import MIN_SEQ_LENGTH


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
        assert "no trained tokens" in err and "--seq-length 16" in err and "300 samples" in err, err
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
    assert json.loads((tmp_path / "random" / "meta.json").read_text())["num_loss_tokens"] > 0


def test_all_samples_dropped_is_refused(tmp_path, llama3_tokenizer_path, llamafactory_data_dir, capsys):
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
