"""`megapack inspect`: statistics, --verify catches corrupted bytes and broken structure, --show marks exactly the
trained spans (the real alpaca responses), --plot writes a PNG; matplotlib is not imported by the CLI parser."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from megapack.cli import main


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, llama3_tokenizer_path, llamafactory_data_dir):
    out = tmp_path_factory.mktemp("inspect") / "alpaca"
    code = main(["preprocess", "--dataset", "alpaca_en_demo", "--dataset-dir", str(llamafactory_data_dir),
                 "--tokenizer-model", str(llama3_tokenizer_path), "--seq-length", "512", "--no-progress",
                 "--output-dir", str(out)])
    assert code == 0
    return out


def test_stats_verify_show_plot(shard_dir, llamafactory_data_dir, capsys, tmp_path):
    png = tmp_path / "dist.png"
    assert main(["inspect", str(shard_dir), "--verify", "--show", "0", "--show", "5", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"records read\s+999\n", out) and re.search(r"train: conversations\s+999\n", out)
    assert "verify: ok" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = {r["output"] for r in json.loads((llamafactory_data_dir / "alpaca_en_demo.json").read_text())}
    spans = [s.split("\u00bb")[0] for s in out.split("\u00ab")[1:]]
    assert len(spans) >= 4
    meta = json.loads((shard_dir / "meta.json").read_text())
    for span in spans:
        assert span.endswith("<|eot_id|>")
        # a truncated conversation keeps only a prefix of its response
        assert span[: -len("<|eot_id|>")] in outputs or meta["truncated"] > 0
    assert sum(span[: -len("<|eot_id|>")] in outputs for span in spans) >= len(spans) - 1


def _rehash(meta_path, directory, name):
    meta = json.loads(meta_path.read_text())
    meta["sha256"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))


def test_verify_finds_corruption(shard_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    data = bytearray((bad / "train-00000.tokens.bin").read_bytes())
    data[100] ^= 0xFF
    (bad / "train-00000.tokens.bin").write_bytes(bytes(data))
    assert main(["inspect", str(bad), "--verify"]) == 1
    assert "train-00000.tokens.bin: sha256 mismatch (meta.json records " in capsys.readouterr().err
    # structural damage with matching checksums: merge two packs into one longer than seq_length
    shutil.rmtree(bad)
    shutil.copytree(shard_dir, bad)
    for kind in ("tokens", "mask"):
        idx = bad / f"train-00000.{kind}.idx"
        raw = bytearray(idx.read_bytes())
        nseq, ndoc = np.frombuffer(bytes(raw[18:34]), dtype="<u8")
        doc_off = 34 + 12 * int(nseq)
        docs = np.frombuffer(bytes(raw[doc_off:]), dtype="<i8").copy()
        lens = np.frombuffer(bytes(raw[34 : 34 + 4 * int(nseq)]), dtype="<i4")
        # remove a boundary between two packs whose sum exceeds 512 (keep the entry count: duplicate the last)
        cum = np.concatenate([[0], np.cumsum(lens)])
        k = next(i for i in range(1, len(docs) - 1) if cum[docs[i + 1]] - cum[docs[i - 1]] > 512)
        docs = np.concatenate([docs[:k], docs[k + 1 :], docs[-1:]])
        raw[doc_off:] = docs.astype("<i8").tobytes()
        idx.write_bytes(bytes(raw))
        _rehash(bad / "meta.json", bad, idx.name)
    assert main(["inspect", str(bad), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "document index is not 0" in err and "longer than seq_length 512" in err


def test_cli_import_is_light_and_errors_are_one_line(tmp_path, capsys):
    code = "import sys, megapack.cli as c; c.build_parser(); print(sorted(m for m in ('matplotlib','torch','megatron') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "meta.json: not found" in err and "\n" not in err
