"""Atomic writes: readers see the old file or the whole new one, and the new file honours the umask like open()."""
from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest

from megapack.atomic import chmod_default, current_umask, write_json_atomic, write_text_atomic
from megapack.data.packs.mmidx import HashingFile
from megapack.data.packs.shards import is_shard_file
from megapack.data.pipeline.partitions import PartitionWriter, finished_partition, part_dir
from megapack.data.pipeline.preprocess import _ours


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_honour_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_text_atomic(tmp_path / "a.txt", "hello\n")
    write_json_atomic(tmp_path / "b.json", {"a": 1})
    (tmp_path / "plain.txt").write_text("x")  # what open() gives under this umask
    for name in ("a.txt", "b.json", "plain.txt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
    assert os.umask(mask) == mask  # reading the umask left it unchanged


def test_atomic_replace_keeps_nothing_temporary(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "sub" / "m.json"
    write_json_atomic(target, {"v": 1})
    write_json_atomic(target, {"v": 2})
    assert target.read_text() == '{\n  "v": 2\n}\n'
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]


def test_current_umask_reads_without_changing(umask):
    for mask in (0o022, 0o027, 0o077):
        umask(mask)
        assert current_umask() == mask and os.umask(mask) == mask


def test_chmod_default_fixes_a_library_written_0600_file(tmp_path, umask):
    """safetensors' save_file writes through a 0600 temporary file (seen with safetensors 0.8.0): exported weights
    need chmod_default to get the mode of every other file."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    umask(0o027)
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    chmod_default(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


# Temporary names are unique per writer (issue 21): two processes on two hosts can share a pid, so one writer's
# temporary file or folder is never another's; a writer that fails removes only its own.


def test_two_writers_of_one_shard_file_keep_their_own_temp_files(tmp_path):
    target = tmp_path / "train-00000.tokens.bin"
    a = HashingFile(target)
    a.write(b"A" * 1000)
    b = HashingFile(target)  # a second process writing the same file
    b.write(b"B" * 10)
    b.abort()
    a.write(b"a")
    digest = a.commit()
    assert target.read_bytes() == b"A" * 1000 + b"a"
    assert digest == hashlib.sha256(b"A" * 1000 + b"a").hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert a.tmp != b.tmp and is_shard_file(a.tmp.name) and _ours(a.tmp)  # a rerun's cleanup knows the name


def test_two_writers_of_one_partition_keep_their_own_temp_folders(tmp_path):
    a = PartitionWriter(tmp_path, 0, 2)
    a.write(np.array([5, 6, 7], "<u2").tobytes(), b"\x00\x01\x01")
    b = PartitionWriter(tmp_path, 0, 2)  # a second task of the same partition (same pid on another host)
    b.write(np.array([9], "<u2").tobytes(), b"\x01")
    b.abort()
    a.finish(np.array([0]), np.array([3]), {"records": 1})
    final = part_dir(tmp_path, 0, 2)
    assert finished_partition(tmp_path, 0, 2) == {"records": 1}
    assert (final / "tokens.bin").read_bytes() == np.array([5, 6, 7], "<u2").tobytes()
    assert (final / "mask.bin").read_bytes() == b"\x00\x01\x01"
    assert np.load(final / "samples.npy").tolist() == [[0, 3]]
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
