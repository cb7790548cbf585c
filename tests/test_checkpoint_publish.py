"""Publishing and pruning training checkpoints when a kill lands half-way through deleting one (found by the kill -9
sweep, tests/test_fault_sweep.py): no folder under a published `iter_XXXXXXX` name is ever partial, `latest` always
resolves to a complete checkpoint, and the next publish removes what the kill left."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

from megapack.training.run.checkpointing import ITER_RE, _prune, _publish
from megapack.training.preflight import resume
from megapack.training.preflight.resume import resume_checkpoint

FILES = ["__0_0.distcp", "__0_1.distcp", "megapack.json"]


@pytest.fixture(autouse=True)
def _complete_means_every_file(monkeypatch):
    """These stand-in checkpoints have no torch_dist index: complete means all FILES are there."""
    monkeypatch.setattr(resume, "checkpoint_problem",
                        lambda path: next((f"{f} is missing" for f in FILES if not (Path(path) / f).is_file()), None))


class _Killed(BaseException):
    """Stands for SIGKILL: no cleanup code runs."""


def _checkpoint(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    for name in FILES:
        (folder / name).write_text(f"{tag}:{name}")
    return folder


def _kill_inside_rmtree(monkeypatch) -> list[str]:
    """The first shutil.rmtree deletes one file of its folder, then the process 'dies'."""
    real = shutil.rmtree
    calls: list[str] = []

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if not path.exists():
            return real(path, *args, **kwargs)
        calls.append(path.name)
        if len(calls) == 1:
            (path / FILES[0]).unlink()
            raise _Killed(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return calls


def _published(root: Path) -> dict[str, list[str]]:
    return {p.name: sorted(f.name for f in p.iterdir()) for p in root.iterdir() if ITER_RE.match(p.name)}


def test_a_kill_while_pruning_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Seen in the sweep at "`latest` reaches 3": iter_0000001 kept megapack.json but had lost __0_0.distcp."""
    for i in (1, 2, 3):
        _checkpoint(tmp_path / f"iter_{i:07d}", str(i))
    (tmp_path / "latest").write_text("iter_0000003\n")
    calls = _kill_inside_rmtree(monkeypatch)
    with pytest.raises(_Killed):
        _prune(tmp_path, keep_last=2)
    assert _published(tmp_path) == {f"iter_{i:07d}": FILES for i in (2, 3)}
    assert calls == ["iter_0000001.pruned"]
    assert resume_checkpoint(tmp_path) == tmp_path / "iter_0000003"
    _prune(tmp_path, keep_last=2)  # the next publish removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]


def test_saving_the_latest_step_again_never_deletes_it_in_place(tmp_path, monkeypatch):
    """A run resumed from its final checkpoint saves that step again. Deleting the old folder in place meant a kill
    part-way left `latest` naming a partial checkpoint that still had megapack.json, so the next resume loaded it."""
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    _checkpoint(tmp_path / "iter_0000005", "old5")
    _checkpoint(tmp_path / "iter_0000006", "old6")
    (tmp_path / "latest").write_text("iter_0000006\n")
    (tmp_path / ".latest.0123abcd.tmp").write_text("iter_0000004\n")  # a kill while `latest` was being moved
    new = _checkpoint(tmp_path / "iter_0000006.tmp", "new6")
    (new / "megapack.json").unlink()  # _publish writes it
    calls = _kill_inside_rmtree(monkeypatch)
    with pytest.raises(_Killed):
        _publish(tmp_path, 6, keep_last=2, info={"iteration": 6})
    assert _published(tmp_path) == {f"iter_{i:07d}": FILES for i in (5, 6)}
    assert calls == ["iter_0000006.pruned"]  # the old folder was set aside before it was deleted
    assert resume_checkpoint(tmp_path) == tmp_path / "iter_0000006"
    assert (tmp_path / "iter_0000006" / "__0_0.distcp").read_text() == "new6:__0_0.distcp"
    monkeypatch.undo()
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    _checkpoint(tmp_path / "iter_0000007.tmp", "new7")
    (tmp_path / "iter_0000007.tmp" / "megapack.json").unlink()
    _publish(tmp_path, 7, keep_last=2, info={"iteration": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006", "iter_0000007", "latest"]
    assert (tmp_path / "latest").read_text() == "iter_0000007\n"
