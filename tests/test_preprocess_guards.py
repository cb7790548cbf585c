"""Preprocess refuses what it cannot do well and never leaves a finished-looking directory behind: output files
honour the umask, degenerate inputs are refused with one line, a full disk gives one line and no leftovers."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from megapack.cli import main


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
