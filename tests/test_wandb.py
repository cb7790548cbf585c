"""Weights & Biases (logging.wandb): in WANDB_MODE=offline a real training run, stopped by a signal and resumed (one
launch, 1 process), writes offline runs whose history holds metrics.jsonl's losses and whose config is the resolved
config; without the wandb package, --check refuses in one line naming the extra."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from train_helpers import base_config, launch, losses, make_demo_shards, make_tiny_hf, write_yaml

STEPS = 4


def read_wandb_records(path: Path) -> list:
    """Every record of an offline run's .wandb file, decoded with wandb's own protobuf `Record` (the file is a
    leveldb-style log: a 7-byte `:W&B` header, 32 KiB blocks of chunks with a 7-byte crc/length/type header)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _history(records: list) -> dict[int, dict[str, float]]:
    """step -> {key: value} of the history records (a step's validation joins its train row)."""
    rows: dict[int, dict[str, float]] = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            rows.setdefault(int(row["_step"]), {}).update(row)
    return rows


def _config(records: list) -> dict:
    """The run's config as W&B holds it (the run record's, then config updates), {key: value}."""
    found = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        items = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        found |= {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}
    return {k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v) for k, v in found.items()}


@pytest.mark.multiprocess
def test_offline_runs_hold_the_metrics_and_the_resolved_config(tmp_path, monkeypatch, llama3_tokenizer_path,
                                                               llamafactory_data_dir):
    pytest.importorskip("wandb")
    hf = make_tiny_hf(tmp_path / "hf")
    shards = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, tmp_path / "greedy", "greedy")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    run_dir = tmp_path / "run"
    cfg = base_config(hf, shards, run_dir, training={"train_steps": STEPS, "eval_interval": 2},
                      checkpoint={"dir": str(tmp_path / "ck")},
                      logging={"wandb": {"project": "megapack-test", "name": "greedy-tiny"}})
    # stopped by SIGUSR1 after step 2 (checkpoint), then resumed to the end: two processes' W&B runs
    launch(1, [{"config": cfg, "signal_at_step": 2}, {"config": cfg}], tmp_path, "wandb")

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in lines if r["kind"] == "resume"] == [
        {"kind": "resume", "step": 2, "checkpoint": str(tmp_path / "ck" / "iter_0000002")}]
    train, valid = losses(run_dir), losses(run_dir, "valid", "valid_loss")
    assert sorted(train) == [1, 2, 3, 4] and sorted(valid) == [2, 4]

    files = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # one W&B run per process: the stopped one and the resumed one
    rows: dict[int, dict] = {}
    for path in files:
        records = read_wandb_records(path)
        rows |= _history(records)
        config = _config(records)
        assert config["training"]["precision"] == "fp32"  # resolved: the plan's choice, not `auto`
        assert config["logging"]["wandb"]["project"] == "megapack-test"
        assert config["derived"]["total_steps"] == STEPS
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.project == "megapack-test" and run.display_name == "greedy-tiny"
    assert {s: r["train/loss"] for s, r in rows.items()} == train  # every step, the same float as metrics.jsonl
    assert {s: r["valid/valid_loss"] for s, r in rows.items() if "valid/valid_loss" in r} == valid
    assert {s: r["train/lr"] for s, r in rows.items()} == losses(run_dir, key="lr")
    assert {s: r["train/trained_tokens"] for s, r in rows.items()} == losses(run_dir, key="trained_tokens")


def test_missing_wandb_is_one_line_at_check(tmp_path, monkeypatch, capsys, llama3_tokenizer_path,
                                            llamafactory_data_dir):
    from megapack.cli import main

    hf = make_tiny_hf(tmp_path / "hf")
    shards = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, tmp_path / "greedy", "greedy")
    config = base_config(hf, shards, tmp_path / "run", logging={"wandb": {"project": "p", "mode": "offline"}})
    path = write_yaml(tmp_path / "run.yaml", config)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec and import both fail
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--check", "--world-size", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: logging.wandb: the wandb package is not installed: pip install 'megapack[wandb]' "
                   "(or set logging.wandb=null)"], err
    monkeypatch.delitem(sys.modules, "wandb")
    config["logging"]["wandb"] = {"project": "p", "mode": "sometimes"}
    assert main(["train", "--config", str(write_yaml(tmp_path / "bad.yaml", config)), "--check"]) == 1
    assert "logging.wandb.mode" in capsys.readouterr().err
