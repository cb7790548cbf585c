"""Nothing from a checkpoint runs as code (issue 21).

A torch_dist checkpoint holds three kinds of pickles: `.metadata` (torch's index), `common.pt` (megatron's common
state) and the byte items inside the `.distcp` files (RNG state, optimizer bucket layouts, layers' `_extra_state`).
Each is crafted here to run `touch <marker>` when unpickled; every path that opens a checkpoint must refuse it in one
line naming the file, and the marker must never appear: `megapack train --check` resuming it (checkpoint.dir,
checkpoint.load) or starting from it (model.init=megatron), `megapack convert megatron-to-hf`, and the model and
resume loaders. The loaders run with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, so they cannot lean on torch's default.
A genuine checkpoint (a real tiny one, written by `megapack convert hf-to-megatron`) still loads on every path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_helpers import make_hf_checkpoint, run_workers
from train_helpers import base_config, make_demo_shards, write_yaml

# one process at a time, but ~22 s: the genuine checkpoint (a convert subprocess, 13 s) and one spawned loader (9 s)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system (posix.system on Linux)
TARGETS = (".metadata", "common.pt", "distcp")


class _Payload:
    """Unpickles as os.system('touch <marker>')."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _poison(genuine: Path, dest: Path, target: str) -> tuple[Path, Path, Path]:
    """A copy of the genuine checkpoint with one pickle replaced by a payload; (checkpoint, crafted file, marker)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    shutil.copytree(genuine, dest)
    marker = dest.parent / f"{dest.name}.ran"
    if target == ".metadata":
        (dest / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
        return dest, dest / ".metadata", marker
    if target == "common.pt":
        torch.save(_Payload(marker), dest / "common.pt")
        return dest, dest / "common.pt", marker
    # a byte item (a layer's _extra_state) re-pointed at a payload appended to its .distcp file; the index itself
    # stays genuine (the fixture wrote it, so unpickling it here is safe)
    meta = pickle.loads((genuine / ".metadata").read_bytes())
    index = next(i for i in meta.storage_data if isinstance(meta.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = meta.storage_data[index]
    blob = io.BytesIO()
    torch.save(_Payload(marker), blob)
    shard = dest / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as fh:
        fh.write(blob.getvalue())
    meta.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob.getvalue()))
    (dest / ".metadata").write_bytes(pickle.dumps(meta))
    return dest, shard, marker


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, llama3_tokenizer_path, llamafactory_data_dir) -> dict:
    """A real tiny torch_dist checkpoint (one `megapack convert hf-to-megatron` process) and demo shards."""
    w = tmp_path_factory.mktemp("ckptsafe")
    hf = make_hf_checkpoint(w / "hf", seed=3, num_layers=2)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "hf-to-megatron",
                          "--hf-dir", str(hf), "--output-dir", str(w / "ckpt")],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    shards = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, w / "shards", "greedy", records=8)
    return {"dir": w, "hf": hf, "ckpt": w / "ckpt", "shards": shards}


def _refused(err: str, file: Path) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {file}: refused to load {SYSTEM} "), err


def _check(genuine: dict, tmp_path: Path, capsys, **sections) -> str:
    from megapack.cli import main

    config = base_config(genuine["hf"], genuine["shards"], tmp_path / "run", **sections)
    capsys.readouterr()
    rc = main(["train", "--config", str(write_yaml(tmp_path / "run.yaml", config)), "--check"])
    err = capsys.readouterr().err
    assert rc == 1, err
    return err


@pytest.mark.parametrize("target", [".metadata", "common.pt"])
@pytest.mark.parametrize("how", ["checkpoint.dir", "checkpoint.load", "model.init=megatron"])
def test_train_check_refuses_a_crafted_checkpoint_without_running_it(genuine, tmp_path, capsys, how, target):
    ckpt, crafted, marker = _poison(genuine["ckpt"], tmp_path / "ck" / "iter_0000001", target)
    sections = {"checkpoint.dir": {"checkpoint": {"dir": str(ckpt.parent)}},
                "checkpoint.load": {"checkpoint": {"load": str(ckpt)}},
                "model.init=megatron": {"model": {"hf_dir": str(genuine["hf"]), "init": "megatron",
                                                  "megatron_checkpoint": str(ckpt)}}}[how]
    err = _check(genuine, tmp_path, capsys, **sections)
    assert not marker.exists(), f"the payload in {crafted} ran under `megapack train --check`"
    _refused(err, crafted)


def _loader_paths(work: str, hf: str, cases: dict) -> dict:
    """In one gloo process: every crafted checkpoint through load_model_checkpoint, load_checkpoint (resume) and
    `megapack convert megatron-to-hf`; then the genuine one through all three. Returns what each did."""
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # megapack must not depend on torch's weights_only default
    from megapack.cli import main
    from megapack.model.builder import build_model
    from megapack.model.checkpoint import load_model_checkpoint
    from megapack.model.config import load_hf_config
    from megapack.training.run.checkpointing import load_checkpoint
    from megapack.training.run.distributed import destroy_distributed, init_distributed

    def attempt(call) -> str:
        try:
            call()
            return "loaded"
        except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
            return f"{type(exc).__name__}: {exc}".splitlines()[0]

    def convert(ckpt: str, out: str) -> str:
        err, rc = io.StringIO(), []
        with contextlib.redirect_stderr(err):
            raised = attempt(lambda: rc.append(main(["convert", "megatron-to-hf", "--checkpoint-dir", ckpt,
                                                     "--output-dir", out, "--no-tokenizer"])))
        return "loaded" if rc == [0] else err.getvalue().strip() or raised

    init_distributed()
    model = build_model(load_hf_config(hf), attention_backend="sdpa", perform_initialization=False).eval()
    done = {}
    for name, case in cases.items():
        if case["path"] == "load_model_checkpoint":
            done[name] = attempt(lambda: load_model_checkpoint(model, case["ckpt"]))
        elif case["path"] == "load_checkpoint":
            done[name] = attempt(lambda: load_checkpoint(case["ckpt"], model, None, None, load_optimizer=False,
                                                         load_rng=False))
    destroy_distributed()
    for name, case in cases.items():
        if case["path"] == "convert":
            done[name] = convert(case["ckpt"], str(Path(work) / f"{name}.hf"))
    return done


def test_loaders_and_convert_refuse_crafted_checkpoints_and_load_genuine_ones(genuine, tmp_path):
    cases, expect = {}, {}
    for path in ("load_model_checkpoint", "load_checkpoint", "convert"):
        for target in TARGETS:
            name = f"{path}-{target.strip('.')}"
            ckpt, crafted, marker = _poison(genuine["ckpt"], tmp_path / name, target)
            cases[name] = {"path": path, "ckpt": str(ckpt)}
            expect[name] = (crafted, marker)
        cases[f"{path}-genuine"] = {"path": path, "ckpt": str(genuine["ckpt"])}
    done = run_workers(_loader_paths, 1, work=str(tmp_path), hf=str(genuine["hf"]), cases=cases)[0]
    ran = [name for name, (crafted, marker) in expect.items() if marker.exists()]
    assert not ran, f"payloads ran: {ran}; outcomes: {done}"
    for name, (crafted, _) in expect.items():
        line = done[name].removeprefix("error: ").removeprefix("MegapackError: ")
        assert line.startswith(f"{crafted}: refused to load {SYSTEM} "), (name, done[name])
    assert done["load_model_checkpoint-genuine"] == done["load_checkpoint-genuine"] == "loaded", done
    assert done["convert-genuine"] == "loaded" and (tmp_path / "convert-genuine.hf" / "config.json").is_file(), done


def test_check_accepts_the_genuine_checkpoint(genuine):
    from megapack.training.preflight.resume import checkpoint_problem

    assert checkpoint_problem(genuine["ckpt"]) is None


@pytest.mark.parametrize("raw, refused", [
    (b"cbuiltins\neval\n(S'1'\ntR.", "builtins.eval"),
    (b"ctorch\nload\n(S'x'\ntR.", "torch.load"),  # module torch, but not a dtype
    (b"ctorch.distributed.checkpoint.metadata\nMetadata.__init__\n.", "torch.distributed.checkpoint.metadata."
                                                                       "Metadata.__init__"),  # no attribute paths
    (b"ctorch\nfloat32\n.", None),  # a dtype is admitted, but is not an index
])
def test_the_metadata_unpickler_admits_only_the_index_classes(genuine, tmp_path, raw, refused):
    from megapack.errors import MegapackError
    from megapack.model.safe_pickle import read_torch_metadata

    meta = read_torch_metadata(genuine["ckpt"] / ".metadata")
    assert meta == pickle.loads((genuine["ckpt"] / ".metadata").read_bytes())
    crafted = tmp_path / ".metadata"
    crafted.write_bytes(raw)
    with pytest.raises(MegapackError) as info:
        read_torch_metadata(crafted)
    expected = f"refused to load {refused} (" if refused else "holds a dtype, not torch's checkpoint metadata"
    assert str(info.value).startswith(f"{crafted}: ") and expected in str(info.value), str(info.value)
