"""Shards are verified before training, and `--check` says no when the run would fail.

meta.json records the token-id range and every file's size; `data.verify: fast` (files, sizes, indexes) refuses a
deleted or truncated shard in preflight, `full` (sha256, hashed across the ranks) refuses a flipped byte before
step 1 with the same line on every rank while `fast` trains on it; preflight refuses token ids beyond the model's
vocabulary and output directories that cannot be written, and says when a run writes no checkpoints. Real demo
data (LLaMA-Factory's alpaca demo through the real LLaMA-3 tokenizer) and the tiny LLaMA-3-vocabulary model.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from megapack.cli import main
from train_helpers import ROOT, base_config, make_demo_shards, make_tiny_hf, write_yaml

NO_CHECKPOINTS = "checkpoint.dir is null: no checkpoints will be written"
NO_FILES = " and, with logging.dir null too, no metrics files (metrics.jsonl, summary.json)"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, llamafactory_data_dir, llama3_tokenizer_path) -> dict:
    w = tmp_path_factory.mktemp("verify")
    return {"shards": make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, w / "bfd", "bfd"),
            "hf": make_tiny_hf(w / "hf")}


def _check(tmp_path: Path, capsys, config: dict, *overrides: str) -> tuple[int, list[str], str]:
    """`megapack train --check` on a config: exit code, the printed warnings (when it passes), stderr."""
    path = write_yaml(tmp_path / "run.yaml", config)
    code = main(["train", "--config", str(path), "--check", *overrides])
    out = capsys.readouterr()
    warnings = json.loads(out.out.splitlines()[-1]).get("warnings") if code == 0 else []
    return code, warnings, out.err.strip()


def _token_ids(shards: Path, meta: dict, split: str) -> np.ndarray:
    return np.concatenate([np.fromfile(shards / f"{s['prefix']}.tokens.bin", dtype=meta["dtype"])
                           for s in meta["splits"][split]["shards"]])


def _small_vocab_model(hf: Path, out: Path, vocab_size: int) -> Path:
    """The tiny model's config.json with another vocabulary size (preflight reads only config.json)."""
    out.mkdir()
    config = json.loads((hf / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"vocab_size": vocab_size}))
    return out


def test_meta_records_token_range_and_file_sizes(inputs):
    shards = inputs["shards"]
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["format_version"] == 2
    assert meta["file_bytes"] == {name: (shards / name).stat().st_size for name in meta["sha256"]}
    spans = []
    for split, info in meta["splits"].items():
        ids = _token_ids(shards, meta, split)
        spans.append((int(ids.min()), int(ids.max())))
        assert (info["min_token_id"], info["max_token_id"]) == spans[-1]
        for shard in info["shards"]:
            assert shard["file_bytes"] == {name: (shards / name).stat().st_size for name in shard["files"]}
    assert sorted(meta["splits"]) == ["train", "val"]
    assert meta["min_token_id"] == min(s[0] for s in spans)
    assert meta["max_token_id"] == max(s[1] for s in spans) == 128009  # <|eot_id|>, the largest id the chats use


def test_token_range_is_taken_chunk_by_chunk_padding_included(tmp_path, monkeypatch):
    from megapack.data.packs import writer

    monkeypatch.setattr(writer, "CHUNK_TOKENS", 8)  # every pack its own write step
    encoded = [([7, 9, 8], [0, 1, 1]), ([300, 12], [0, 1]), ([40, 3, 42, 43, 44], [0, 0, 1, 1, 1]), ([5, 6], [0, 1])]
    store = writer.RecordStore.from_encoded([(np.array(t), np.array(m)) for t, m in encoded])
    meta = writer.write_shard_dir(store, tmp_path / "a", seq_length=16, packing="padding", vocab_size=1000, pad_id=2)
    assert (meta["min_token_id"], meta["max_token_id"]) == (3, 300)
    assert meta["splits"]["train"]["min_token_id"] == 3 and meta["splits"]["train"]["max_token_id"] == 300
    # segments padded to a multiple of 4 with pad id 999: the pad tokens are written, so they count
    meta = writer.write_shard_dir(store, tmp_path / "b", seq_length=16, packing="padding", vocab_size=1000,
                                  pad_id=999, pad_to_multiple=4)
    assert (meta["min_token_id"], meta["max_token_id"]) == (3, 999)
    assert meta["file_bytes"]["train-00000.tokens.bin"] == 2 * 4 * 5  # uint16, packs of 4+4+8+4 tokens


def test_check_refuses_a_deleted_or_truncated_shard_file(inputs, tmp_path, capsys):
    shards = shutil.copytree(inputs["shards"], tmp_path / "shards")
    config = base_config(inputs["hf"], shards, tmp_path / "run")
    (shards / "train-00000.tokens.bin").unlink()
    code, _, err = _check(tmp_path, capsys, config)
    assert (code, err) == (1, f"error: data.path: {shards}/train-00000.tokens.bin: missing (meta.json lists it)")
    # data.verify: off checks no file (the run would stop at its first step)
    assert _check(tmp_path, capsys, config, "data.verify=off")[0] == 0
    shutil.copyfile(inputs["shards"] / "train-00000.tokens.bin", shards / "train-00000.tokens.bin")
    assert _check(tmp_path, capsys, config)[0] == 0
    size = (shards / "val-00000.mask.bin").stat().st_size
    os.truncate(shards / "val-00000.mask.bin", size - 3)
    code, _, err = _check(tmp_path, capsys, config)
    assert (code, err) == (1, f"error: data.path: {shards}/val-00000.mask.bin: {size - 3} bytes, meta.json records "
                              f"{size}")
    # without validation the run does not read the val split
    assert _check(tmp_path, capsys, config, "data.valid_split=null")[0] == 0


def test_preflight_refuses_token_ids_beyond_the_model_vocabulary(inputs, tmp_path, capsys):
    shards = inputs["shards"]
    meta = json.loads((shards / "meta.json").read_text())
    low = min(int(_token_ids(shards, meta, split).min()) for split in ("train", "val"))
    small = _small_vocab_model(inputs["hf"], tmp_path / "hf_small", 128000)
    code, _, err = _check(tmp_path, capsys, base_config(small, shards, tmp_path / "run"))
    assert code == 1
    assert err == (f"error: data.path: {shards} holds token ids in [{low}, 128009] (meta.json min_token_id/"
                   f"max_token_id), outside the model's vocabulary [0, 128000) (vocab_size 128000 in "
                   f"{small}/config.json); preprocess with the model's tokenizer")
    # one id more than the largest the shards hold is enough
    fits = _small_vocab_model(inputs["hf"], tmp_path / "hf_fits", 128010)
    assert _check(tmp_path, capsys, base_config(fits, shards, tmp_path / "run"))[0] == 0
    # shards without a single id past 128004 would still pad with <|finetune_right_pad_id|> 128004
    meta["max_token_id"] = meta["splits"]["train"]["max_token_id"] = meta["splits"]["val"]["max_token_id"] = 127999
    crafted = shutil.copytree(shards, tmp_path / "crafted")
    (crafted / "meta.json").write_text(json.dumps(meta))
    code, _, err = _check(tmp_path, capsys, base_config(small, crafted, tmp_path / "run"))
    assert (code, err) == (1, f"error: data.path: {crafted} pads with id 128004 (meta.json pad_id), outside the "
                              f"model's vocabulary [0, 128000) (vocab_size 128000 in {small}/config.json); "
                              f"preprocess with the model's tokenizer")


def test_shards_written_before_the_range_was_recorded(inputs, tmp_path, capsys):
    """A format_version 2 directory without min/max_token_id and file_bytes: fast verification checks what it can,
    the vocabulary check falls back to the tokenizer's size and says when the range is unknown."""
    shards = shutil.copytree(inputs["shards"], tmp_path / "shards")
    meta = json.loads((shards / "meta.json").read_text())
    for key in ("min_token_id", "max_token_id", "file_bytes"):
        meta.pop(key, None)
    for info in meta["splits"].values():
        info.pop("min_token_id", None)
        info.pop("max_token_id", None)
        for shard in info["shards"]:
            shard.pop("file_bytes", None)
    (shards / "meta.json").write_text(json.dumps(meta))
    code, warnings, _ = _check(tmp_path, capsys, base_config(inputs["hf"], shards, tmp_path / "run"))
    assert (code, warnings) == (0, [NO_CHECKPOINTS])  # the tokenizer's 128256 ids fit the model's 128256
    small = _small_vocab_model(inputs["hf"], tmp_path / "hf_small", 128005)  # still holds pad id 128004
    code, warnings, _ = _check(tmp_path, capsys, base_config(small, shards, tmp_path / "run"))
    assert code == 0 and warnings[1:] == [
        f"data.path: {shards}/meta.json records no token-id range (written before megapack recorded one) and its "
        f"tokenizer has 128256 ids, the model 128005: token ids are not checked; rerun `megapack preprocess` to "
        f"record the range"]
    (shards / "val-00000.real_lengths.bin").unlink()
    code, _, err = _check(tmp_path, capsys, base_config(inputs["hf"], shards, tmp_path / "run"))
    assert (code, err) == (1, f"error: data.path: {shards}/val-00000.real_lengths.bin: missing (meta.json lists it)")


def test_check_refuses_output_directories_that_cannot_be_written(inputs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = base_config(inputs["hf"], inputs["shards"], tmp_path / "run", checkpoint={"dir": str(blocker / "ck")})
    code, _, err = _check(tmp_path, capsys, config)
    assert (code, err) == (1, f"error: checkpoint.dir: {blocker}/ck cannot be created: {blocker} is a file, not a "
                              f"directory")
    config = base_config(inputs["hf"], inputs["shards"], blocker)
    code, _, err = _check(tmp_path, capsys, config)
    assert (code, err) == (1, f"error: logging.dir: {blocker} is a file, expected a directory")
    config = base_config(inputs["hf"], inputs["shards"], tmp_path / "new" / "run",
                         checkpoint={"dir": str(tmp_path / "new" / "ck"), "export_hf": str(blocker / "hf")})
    code, _, err = _check(tmp_path, capsys, config)
    assert (code, err) == (1, f"error: checkpoint.export_hf: {blocker}/hf cannot be created: {blocker} is a file, "
                              f"not a directory")
    code, warnings, _ = _check(tmp_path, capsys, config, "checkpoint.export_hf=null")
    assert (code, warnings) == (0, []) and not (tmp_path / "new").exists()  # --check creates nothing


def _writable_lines(paths: list[Path], uid: int | None) -> list[str]:
    """check_writable_dir on each path ("ok" or its message), in a forked child running as `uid` when given."""
    from megapack.errors import MegapackError
    from megapack.training.preflight.inputs import check_writable_dir

    def lines() -> list[str]:
        out = []
        for path in paths:
            try:
                check_writable_dir("checkpoint.dir", str(path))
                out.append("ok")
            except MegapackError as exc:
                out.append(str(exc))
        return out

    if uid is None:
        return lines()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, check, report through the pipe
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.write(write, "\n".join(lines()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text.splitlines()


def test_a_read_only_parent_directory_is_refused():
    """As an unprivileged user: root may write anywhere, so there the check runs in a child that is `nobody`."""
    uid = None
    if os.geteuid() == 0:
        try:
            uid = pwd.getpwnam("nobody").pw_uid
        except KeyError:
            pytest.skip("running as root without a `nobody` user to drop to")
    parent = Path(tempfile.mkdtemp())
    try:
        parent.chmod(0o755)
        read_only = parent / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
        assert _writable_lines([read_only / "ck", read_only, parent / "ck"], uid) == [
            f"checkpoint.dir: {read_only}/ck cannot be created: {read_only} is not writable",
            f"checkpoint.dir: {read_only} is not writable",
            "ok" if uid is None else f"checkpoint.dir: {parent}/ck cannot be created: {parent} is not writable",
        ]
    finally:
        (parent / "ro").chmod(0o755)
        shutil.rmtree(parent)


def test_check_warns_when_a_run_writes_no_checkpoints(inputs, tmp_path, capsys):
    config = base_config(inputs["hf"], inputs["shards"], tmp_path / "run")
    assert _check(tmp_path, capsys, config)[:2] == (0, [NO_CHECKPOINTS])
    assert _check(tmp_path, capsys, config, "logging.dir=null")[:2] == (0, [NO_CHECKPOINTS + NO_FILES])
    assert _check(tmp_path, capsys, config, f"checkpoint.dir={tmp_path / 'ck'}")[:2] == (0, [])


@pytest.mark.multiprocess
def test_flipped_byte_trains_with_fast_and_is_refused_by_full_on_every_rank(inputs, tmp_path):
    """One launch, 2 ranks: a full-verified run of the intact shards trains a step; a fast-verified run trains a step
    on a copy with one flipped byte (fast does not hash); the copy under `full` stops before step 1 with the same
    one line on both ranks (each file is hashed by one rank only: the other learns it from the all-reduce)."""
    shards = shutil.copytree(inputs["shards"], tmp_path / "shards")
    meta = json.loads((shards / "meta.json").read_text())
    data = bytearray((shards / "train-00000.tokens.bin").read_bytes())
    data[400] ^= 0x01  # the low byte of an int32 token id: still a valid id, now a different token
    (shards / "train-00000.tokens.bin").write_bytes(bytes(data))
    steps = {"train_steps": 1, "global_batch_size": 2}
    clean = base_config(inputs["hf"], inputs["shards"], tmp_path / "clean", training=steps)  # data.verify full
    fast = base_config(inputs["hf"], shards, tmp_path / "fast", data={"verify": "fast"}, training=steps,
                       logging={"dir": None})
    full = base_config(inputs["hf"], shards, tmp_path / "full", data={"verify": "full"}, training=steps)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "megapack",
           "train", "--config", str(write_yaml(tmp_path / "clean.yaml", clean)),
           "--config", str(write_yaml(tmp_path / "fast.yaml", fast)),
           "--config", str(write_yaml(tmp_path / "full.yaml", full))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).splitlines()
    sha = meta["sha256"]["train-00000.tokens.bin"]
    line = f"error: data.path: {shards}/train-00000.tokens.bin: sha256 mismatch (meta.json records {sha[:12]}…)"
    assert proc.returncode != 0 and lines.count(line) == 2, "\n".join(lines[-40:])
    # the clean run hashed every file of both splits and trained; the fast run trained; the full one did not
    hashed = f"data.verify full: sha256 of {len(meta['sha256'])} shard files ok ("
    assert sum(ln.startswith(hashed) for ln in lines) == 1
    assert lines.count(f"warning: {NO_CHECKPOINTS}") == 1 and lines.count(f"warning: {NO_CHECKPOINTS}{NO_FILES}") == 1
    assert sum(ln.startswith("step 1/1 loss ") for ln in lines) == 2
    assert sum(ln.startswith("training 1 steps on ") for ln in lines) == 2
    assert (tmp_path / "clean" / "metrics.jsonl").is_file() and not (tmp_path / "full" / "metrics.jsonl").exists()


def test_checksum_shares_and_an_unreadable_file(inputs, tmp_path):
    """Each file is hashed by exactly one rank (largest first to the least loaded); a file that vanished after
    preflight is reported with the rank that tried to read it."""
    from megapack.errors import MegapackError
    from megapack.training.preflight.inputs import _shares, verify_checksums

    assert _shares([5, 1, 4, 3], 2) == [[0, 1], [2, 3]]
    assert _shares([5, 1, 4, 3], 3) == [[0], [2], [3, 1]]
    meta = json.loads((inputs["shards"] / "meta.json").read_text())
    files = [("data.path", str(inputs["shards"] / name), sha) for name, sha in meta["sha256"].items()]
    hashed, _ = verify_checksums(files, 0, 1, "cpu")
    assert hashed == sum(meta["file_bytes"].values())
    gone = ("data.valid_path", str(tmp_path / "val-00000.mask.bin"), "0" * 64)
    with pytest.raises(MegapackError) as err:
        verify_checksums([*files, gone], 0, 1, "cpu")
    assert str(err.value) == f"data.valid_path: {tmp_path}/val-00000.mask.bin: cannot be read (on rank 0)"
