"""The README's launcher commands, run as a new user would: from a directory of their own, nothing activated."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bare_env() -> dict:
    """The caller's environment without any virtualenv on PATH (the launchers must find the checkout's .venv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    return env | {"OMP_NUM_THREADS": "1"}


@pytest.mark.multiprocess
def test_readme_torchrun_line_on_cpu_from_another_directory_resolves_paths_there(tmp_path_factory):
    """The README's CPU line of examples/train_torchrun.sh (tests/launch_runs.py, the launcher tests' reference)."""
    from launch_runs import STEPS, torchrun_reference

    repo_runs = sorted(p.name for p in (ROOT / "runs").glob("*")) if (ROOT / "runs").is_dir() else []
    work = torchrun_reference(tmp_path_factory.getbasetemp())
    out = (work / "torchrun.log").read_text()
    assert f"[megapack] using {ROOT / '.venv' / 'bin' / 'megapack'}" in out
    # the config's relative paths (runs/tiny-hf, runs/demo-shards, runs/tiny-train) landed where the user stands
    for rel in ("runs/tiny-hf/config.json", "runs/demo-shards/meta.json", "runs/tiny-train/summary.json",
                "runs/tiny-train/latest"):
        assert (work / rel).is_file(), rel
    assert f"step {STEPS}/{STEPS} loss" in out and f"step {STEPS} validation loss" in out
    assert (work / "runs" / "tiny-train" / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    after = sorted(p.name for p in (ROOT / "runs").glob("*")) if (ROOT / "runs").is_dir() else []
    assert after == repo_runs  # nothing written into the repository


@pytest.mark.multiprocess
def test_multinode_script_two_nodes_equal_one_node_with_two_processes(tmp_path_factory):
    """examples/train_multinode.sh started twice on this host (NNODES=2, NPROC=1: two "nodes" of one process),
    rendezvous at this host's name and a free port: the losses of the README's one-node 2-process run."""
    from launch_runs import STEPS, launcher_env, torchrun_reference
    from train_helpers import kill_family

    work = torchrun_reference(tmp_path_factory.getbasetemp())
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    env = launcher_env(MASTER_ADDR=socket.gethostname(), MASTER_PORT=str(port), NNODES="2", NPROC="1",
                       RDZV_ID=f"test-{port}")
    cmd = ["bash", str(ROOT / "examples" / "train_multinode.sh"), str(ROOT / "configs" / "tiny_cpu.yaml"),
           f"training.train_steps={STEPS}", "checkpoint.dir=runs/multinode"]
    logs = [open(work / f"node{i}.log", "w") for i in range(2)]
    nodes = [subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
             for log in logs]
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_family(node)
    text = [(work / f"node{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], text[0][-3000:] + text[1][-3000:]
    ref = _train_losses(work / "runs" / "tiny-train")
    got = _train_losses(work / "runs" / "multinode")
    assert [s for s, _ in got] == list(range(1, STEPS + 1)) and [s for s, _ in ref] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, ref)) <= 1e-6, (got, ref)
    assert re.search(r"\bworld_size +2$", text[0] + text[1], re.M)  # the settings block at the start


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]


def test_launchers_say_how_to_get_megapack_when_there_is_none(tmp_path):
    fake = tmp_path / "checkout"
    (fake / "examples").mkdir(parents=True)
    for name in ("train_torchrun.sh", "find_megapack.sh"):
        (fake / "examples" / name).write_text((ROOT / "examples" / name).read_text())
    run = subprocess.run(["bash", str(fake / "examples" / "train_torchrun.sh"), "x.yaml"], cwd=tmp_path,
                         env=_bare_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.strip().startswith(f"error: no megapack on PATH and no {fake}/.venv")
    assert "examples/quickstart.sh" in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides,built", [
    (["data.path=/elsewhere/shards", "model.hf_dir=/elsewhere/model"], []),
    (["model.hf_dir=/elsewhere/model"], ["preprocess"]),
    (["data.path=/elsewhere/shards"], ["runs/tiny-hf"]),
])
def test_tiny_launcher_builds_only_what_the_run_uses(tmp_path, overrides, built):
    """With tiny_cpu.yaml, the launcher builds the tiny model and the demo shards only where the run still points at
    them: an overridden `model.hf_dir` or `data.path` is not built in the current directory (a stub `megapack`
    records the commands)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')  # this venv's python
    (stub / "python").chmod(0o755)
    log = tmp_path / "calls.log"
    (stub / "megapack").write_text(f'#!/usr/bin/env bash\necho "$1" >> {log}\n')
    (stub / "megapack").chmod(0o755)
    env = _bare_env() | {"PATH": f"{stub}:/usr/local/bin:/usr/bin:/bin", "NPROC": "2"}
    run = subprocess.run(["bash", str(ROOT / "examples" / "train_torchrun.sh"), str(ROOT / "configs" / "tiny_cpu.yaml"),
                          *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    calls = log.read_text().split()
    assert calls[-2:] == ["train", "launch"], calls  # the check, then the launch
    assert ("preprocess" in calls) == ("preprocess" in built), calls
    assert (tmp_path / "runs" / "tiny-hf" / "config.json").is_file() == ("runs/tiny-hf" in built)


def test_quickstart_from_another_directory_writes_there(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), "--no-train", "--num-samples", "16",
                          "--packings", "greedy"], cwd=tmp_path, env=_bare_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "runs" / "demo" / "shards" / "greedy" / "meta.json").is_file()
    assert (tmp_path / "runs" / "demo" / "data" / "dataset_info.json").is_file()


@pytest.mark.multiprocess
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, llama3_tokenizer_path,
                                                                  llamafactory_data_dir):
    """SIGUSR1 to rank 0 only, right after it logged step 2 (after the step's all-reduce: the moment where a flag
    read straight from the handler stopped rank 0 one step before rank 1): both ranks checkpoint step 2, and the run
    resumed from it continues the uninterrupted loss curve (one launch: interrupted, resumed, uninterrupted)."""
    from train_helpers import base_config, demo_inputs, launch, losses

    hf, greedy, _ = demo_inputs(tmp_path, llama3_tokenizer_path, llamafactory_data_dir)
    cfg = base_config(hf, greedy, tmp_path / "run", training={"train_steps": 4},
                      checkpoint={"dir": str(tmp_path / "ck")})
    launch(2, [{"config": cfg, "signal_at_step": 2, "signal_rank": 0}, {"config": cfg},
               {"config": base_config(hf, greedy, tmp_path / "ref", training={"train_steps": 4})}], tmp_path, "sig",
           timeout=400)
    log = (tmp_path / "sig.log").read_text()
    assert "signal 10: checkpointing at step 2 and exiting" in log and "at step 2" in log.split("resumed from")[1]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("kind") == "train"] == [1, 2, 3, 4]
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert max(abs(got[s] - ref[s]) for s in ref) <= 1e-6, (got, ref)
