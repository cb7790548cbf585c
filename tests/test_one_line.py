"""Errors a user can act on are one line naming the file, key or value (issue 21): a misspelt config key with the
close match, a model config.json too large to allocate, a GPU memory that is not a positive finite number, a missing
shard data file, and the launchers' summary of a failed rank (what each rank records, how the line is chosen)."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from megapack.cli import main
from megapack.errors import MegapackError
from megapack.training.preflight.config import load_config

BASE = {"model": {"hf_dir": "/m"}, "data": {"path": "/d", "seq_length": 64},
        "training": {"global_batch_size": 8, "train_steps": 5}}


@pytest.mark.parametrize("raw, overrides, expected", [
    ({k: v for k, v in BASE.items() if k != "training"} | {"traning": BASE["training"]}, [],
     "config.yaml: traning: unknown key (did you mean 'training'?)"),
    (BASE, ["optimzer.lr=1e-4"], "command line: optimzer.lr=1e-4: unknown key (did you mean 'optimizer'?)"),
    (BASE, ["training.micro_batch_sise=2"],
     "command line: training.micro_batch_sise=2: unknown key (did you mean 'training.micro_batch_size'?)"),
    (BASE | {"data": {"blend": [{"path": "/a", "wieght": 1}]}}, [],
     "config.yaml: data.blend.0.wieght: unknown key (did you mean 'data.blend.0.weight'?)"),
    (BASE, ["nonsense.key=1"], "command line: nonsense.key=1: unknown key"),
])
def test_a_misspelt_key_is_named_with_its_close_match(tmp_path, raw, overrides, expected):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MegapackError) as info:
        load_config(path, overrides)
    assert str(info.value) == expected.replace("config.yaml", str(path))


def _plan_inputs(tmp_path, **hf_changes) -> tuple:
    """A config whose shards are a meta.json only (data.verify off) and whose model is a tiny config.json."""
    from megapack.model.tiny_checkpoint import tiny_llama_config

    shards, hf = tmp_path / "shards", tmp_path / "hf"
    shards.mkdir()
    hf.mkdir()
    (shards / "meta.json").write_text(json.dumps({
        "format_version": 2, "seq_length": 64, "pad_to_multiple": 8, "packing": "greedy", "pad_id": 0,
        "tokenizer_identity": "vocab:" + "a" * 64, "splits": {"train": {"num_packs": 20, "shards": []}}}))
    (hf / "config.json").write_text(json.dumps(tiny_llama_config(num_layers=4) | hf_changes))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"hf_dir": str(hf)}, "data": {"path": str(shards), "verify": "off"},
                                    "training": {"global_batch_size": 8, "train_steps": 5}}))
    return path, hf / "config.json"


@pytest.mark.parametrize("key, value, expected", [
    ("vocab_size", 10**12, "expected at most 16,777,216"),
    ("hidden_size", 2**21, "expected at most 1,048,576"),
    ("intermediate_size", 2**23, "expected at most 4,194,304"),
    ("num_hidden_layers", 10**6, "expected at most 4,096"),
    ("num_attention_heads", 2**14, "expected at most 4,096"),
])
def test_a_model_too_large_to_allocate_is_refused_by_check(tmp_path, capsys, key, value, expected):
    path, config_json = _plan_inputs(tmp_path, **{key: value})
    assert main(["train", "--config", str(path), "--check", "--world-size", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config_json}: key {key!r} = {value:,}, {expected}", err


def test_an_embedding_too_large_to_allocate_is_refused(tmp_path, capsys):
    path, config_json = _plan_inputs(tmp_path, vocab_size=2**24, hidden_size=2**16, num_attention_heads=512,
                                     num_key_value_heads=8, head_dim=128)
    assert main(["train", "--config", str(path), "--check", "--world-size", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {config_json}: vocab_size × hidden_size = 1,099,511,627,776 embedding parameters, "
                   f"expected at most 68,719,476,736"), err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_gpu_memory_must_be_a_positive_finite_number(tmp_path, capsys, value):
    path, _ = _plan_inputs(tmp_path)
    expected = f"error: --gpu-memory-gb {float(value)}: expected a positive, finite number of GiB"
    assert main(["plan", "--config", str(path), "--world-size", "1", f"--gpu-memory-gb={value}"]) == 1
    assert capsys.readouterr().err.strip() == expected
    assert main(["train", "--config", str(path), "--check", "--world-size", "1", f"--gpu-memory-gb={value}"]) == 1
    assert capsys.readouterr().err.strip() == expected


@pytest.fixture(scope="module")
def shards(tmp_path_factory, llamafactory_data_dir, llama3_tokenizer_path):
    from train_helpers import make_demo_shards

    w = tmp_path_factory.mktemp("shards")
    return make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, w / "greedy", "greedy", records=16)


@pytest.mark.parametrize("name", ["train-00000.mask.bin", "train-00000.tokens.bin"])
def test_a_missing_shard_data_file_is_one_line_when_the_shards_are_opened(shards, tmp_path, name):
    from megapack.data.packs.shards import ShardDataset

    copy = shutil.copytree(shards, tmp_path / "shards")
    (copy / name).unlink()
    with pytest.raises(MegapackError) as info:
        ShardDataset(copy, "train").pack_lengths()
    assert str(info.value) == f"{copy / name}: cannot read the shard data (No such file or directory)"
    with pytest.raises(MegapackError) as info:
        ShardDataset(copy, "train")[0]
    assert str(info.value) == f"{copy / name}: cannot read the shard data (No such file or directory)"


@pytest.mark.multiprocess
def test_a_bare_launch_of_a_bad_config_ends_with_one_line_naming_the_rank(tmp_path):
    """`megapack launch` without the launchers' `--check`: each rank stops on the config, the last line names one."""
    import os
    import subprocess
    import sys

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE | {"training": {"global_batch_size": 2, "train_stepz": 3}}))
    run = subprocess.run([sys.executable, "-m", "megapack", "launch", "--nproc-per-node", "2", sys.executable, "-m",
                          "megapack", "train", "--config", str(path)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    error = f"{path}: training.train_stepz: unknown key (did you mean 'training.train_steps'?)"
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and lines[-1] in (f"error: rank {r} failed with exit code 1: {error}" for r in (0, 1))
    assert lines.count(f"error: {error}") == 2 and "Traceback" not in run.stderr, run.stderr


def _log(tmp_path, *lines: str):
    path = tmp_path / "job.out"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_srun_failures_are_summed_up_in_one_line(tmp_path, monkeypatch, capsys):
    """What examples/train.sbatch prints after a failed srun: the recorded error of the rank that failed first, else
    the task srun reported (a kill leaves no line), else srun's exit code; lines of an earlier start are ignored."""
    from megapack.training.run.launch import FAILURE_DIR_ENV, record_failure, srun_failure_line

    failures = tmp_path / "failures"
    monkeypatch.setenv(FAILURE_DIR_ENV, str(failures))
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    for rank, kind, message in ((0, "exception", "RuntimeError: Connection closed by peer"),
                                (1, "error", "data.path: /s/train-00000.tokens.bin: sha256 mismatch")):
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        record_failure(message, kind)
    log = _log(tmp_path, "[megapack] job 7 (restart 0) on n1: 2 tasks", "srun: error: n1: task 1: Killed",
               "[megapack] job 7 (restart 1) on n1: 2 tasks", "error: data.path: ...",
               "srun: error: n1: tasks 1-2: Exited with exit code 1")
    assert srun_failure_line(failures, 143, log) == (1, "rank 1 failed with exit code 1: data.path: /s/train-00000."
                                                     f"tokens.bin: sha256 mismatch (srun exit code 143; job log {log})")
    # both found it, srun stopped rank 1 (SIGTERM) after rank 0 exited: rank 0 is the cause, whichever recorded first
    monkeypatch.setenv("SLURM_PROCID", "0")
    record_failure("data.path: /s/train-00000.tokens.bin: sha256 mismatch", "error")
    log = _log(tmp_path, "srun: error: n1: task 0: Exited with exit code 1", "srun: error: n1: task 1: Terminated")
    assert srun_failure_line(failures, 143, log)[1].startswith("rank 0 failed with exit code 1: data.path: ")
    record_failure("RuntimeError: Connection closed by peer", "exception")
    (failures / "rank-1.json").unlink()  # rank 1 was killed and recorded nothing; rank 0 lost its peer
    log = _log(tmp_path, "[megapack] job 7 (restart 0) on n1: 2 tasks", "srun: error: n1: task 1: Killed",
               "srun: error: n1: task 0: Exited with exit code 1")
    assert srun_failure_line(failures, 1, log) == (137, f"rank 1 was killed by SIGKILL (exit code 137); it printed "
                                                        f"no error line: its output is in {log} (srun exit code 1)")
    assert srun_failure_line(failures, 1, None) == (1, "rank 0 failed: RuntimeError: Connection closed by peer (srun "
                                                       "exit code 1)")
    assert srun_failure_line(tmp_path / "none", 2, None) == (2, "srun failed with exit code 2 and no rank recorded "
                                                                "an error: the output is in the job's output")
    assert main(["launch", "--srun-exit-code", "1", "--failure-dir", str(failures), "--log", str(log)]) == 137
    assert capsys.readouterr().err.startswith("error: rank 1 was killed by SIGKILL (exit code 137)")


def test_the_failed_rank_is_the_one_that_stopped_first_with_an_error():
    from megapack.training.run.launch import Failure, root_cause

    error = dict(message="data.path: x", kind="error")
    # two ranks found the same error; the launcher stopped one (SIGTERM) before it exited: the other is the cause
    assert root_cause([Failure(0, -15, timestamp=1.0, **error), Failure(1, 1, timestamp=2.0, **error)]).rank == 1
    # an error beats a kill, a kill beats an exception (the peer of a killed rank), an exception beats silence
    killed, exception = Failure(2, -9, timestamp=0.0), Failure(3, 1, "RuntimeError: peer", "exception", 0.0)
    assert root_cause([exception, killed, Failure(1, 1, timestamp=5.0, **error)]).rank == 1
    assert root_cause([exception, killed, Failure(4, -15, timestamp=0.0)]).rank == 2
    assert root_cause([Failure(4, -15, timestamp=0.0), exception]).rank == 3


DEEP_JSON = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"


def test_deeply_nested_json_files_are_one_line(tmp_path, llama3_tokenizer_path, capsys):
    """dataset_info.json, tokenizer_config.json, config.json, meta.json and megapack.json nested past what the parser
    takes: one line naming the file (old code: a RecursionError traceback)."""
    from megapack.data.packs.shards import read_meta
    from megapack.data.render.hf_jinja import read_template_files
    from megapack.model.checkpoint import read_metadata
    from megapack.model.config import load_hf_config

    for name in ("dataset_info.json", "tokenizer_config.json", "config.json", "meta.json", "megapack.json"):
        (tmp_path / name).write_text(DEEP_JSON)
    out = tmp_path / "out"
    assert main(["preprocess", "--dataset", "a", "--dataset-dir", str(tmp_path), "--tokenizer-model",
                 str(llama3_tokenizer_path), "--output-dir", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'dataset_info.json'}: ") and "\n" not in err, err
    calls = [(read_template_files, tmp_path, "tokenizer_config.json"), (load_hf_config, tmp_path, "config.json"),
             (read_meta, tmp_path, "meta.json"), (read_metadata, tmp_path, "megapack.json")]
    for read, arg, name in calls:
        with pytest.raises(MegapackError, match="nested too deeply") as info:
            read(arg)
        assert str(tmp_path / name) in str(info.value), (name, info.value)
