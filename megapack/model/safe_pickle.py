"""Nothing from a checkpoint runs as code: every pickle of a torch_dist checkpoint is read through an allow-list.

A torch_dist checkpoint holds three kinds of pickles, and the libraries unpickle each without restriction:
- `.metadata`, torch's index of the shard files: `FileSystemReader.read_metadata` is a plain `pickle.load`;
- `common.pt`, megatron's non-sharded state (scheduler, train_state, optimizer settings: plain data):
  `torch.load` without `weights_only`, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns it into a plain unpickling;
- byte items inside the `.distcp` files (ShardedObjects: RNG state, optimizer bucket layouts, layers'
  `_extra_state`): torch's `DefaultLoadPlanner.load_bytes` calls `torch.load(weights_only=False)`.
`read_torch_metadata` reads `.metadata` with an unpickler that admits only the classes torch's index is made of;
`load_common` / `load_bytes_item` use `torch.load(weights_only=True)` with the few numpy globals the RNG state needs.
`dist_load` runs megatron's `dist_checkpointing.load` with all three readers replaced, so the bytes a load uses are
the bytes that were checked: nothing is read twice, nothing is unpickled by a second, unrestricted reader. So the
preflight check (`checkpoint_problem`, which reads `.metadata` and `common.pt` the same way) is not what keeps a
load safe: a checkpoint directory may have another writer, and a file swapped between the check and the load is
refused by the load itself.
"""
from __future__ import annotations

import io
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from megapack.errors import MegapackError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

# Exactly the globals found in real torch_dist `.metadata` files (megatron-core 0.16.1 / torch 2.13: model-only,
# training at dp/tp/pp/vpp, both optimizer shardings), each a torch dataclass, enum or value:
METADATA_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata",               # the index itself
        "TensorStorageMetadata",  # per tensor: properties, global size, chunks
        "BytesStorageMetadata",   # per byte item (ShardedObject)
        "ChunkStorageMetadata",   # offsets/sizes of one saved chunk
        "TensorProperties",       # dtype, layout, memory format
        "MetadataIndex",          # keys of storage_data
        "StorageMeta",            # checkpoint/save ids
        "_MEM_FORMAT_ENCODING",   # the enum TensorProperties pickles its memory format as
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),  # file, offset, length of each item
    # megatron stores the savers' local plans in Metadata.all_local_plans (to reuse them on the next save)
    "torch.distributed.checkpoint.planner": frozenset({"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"}),
    "torch.serialization": frozenset({"_get_layout"}),  # how torch.layout pickles: looks a name up among layouts
    "torch": frozenset({"Size"}),  # a tuple of ints; torch dtypes (torch.float32, ...) are admitted by value below
}
_METADATA_HOLDS = "a checkpoint's .metadata may only hold torch's checkpoint metadata"
_COMMON_HOLDS = "common.pt may only hold tensors and plain Python data"
_ITEM_HOLDS = "checkpoint objects may only hold tensors, numpy arrays and plain Python data"


def _numpy_globals() -> list:
    """What numpy's RNG state (np.random.get_state(), in megapack's rng_state) pickles as: a uint32 array."""
    import numpy as np

    reconstruct = np.zeros(1, np.uint32).__reduce__()[0]  # numpy's _reconstruct (numpy.core or numpy._core)
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only METADATA_GLOBALS and torch dtypes; any other global is refused before it is looked up."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        raise MegapackError(f"{self.path}: refused to load {module}.{name} ({_METADATA_HOLDS})")


def read_torch_metadata(path: str | Path) -> Metadata:
    """torch's checkpoint index (a `.metadata` file), unpickled with only its own classes admitted."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    with open(path, "rb") as fh:
        meta = _MetadataUnpickler(fh, path).load()
    if not isinstance(meta, Metadata):
        raise MegapackError(f"{path}: holds a {type(meta).__name__}, not torch's checkpoint metadata")
    return meta


def _weights_only(source: Any, path: Path, holds: str, allowed: list, **kwargs: Any) -> Any:
    """torch.load(weights_only=True) with `allowed` globals added; a refused global is one line naming path."""
    import torch

    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        text = str(exc)  # torch names the global ("... GLOBAL posix.system ..."), else says what it refused
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        raise MegapackError(f"{path}: refused to load {found.group(1) if found else 'it'} ({holds})") from None


def load_common(ckpt_dir: str | Path) -> dict:
    """megatron's common.pt of a checkpoint, as tensors and plain data only."""
    path = Path(ckpt_dir) / "common.pt"
    return _weights_only(path, path, _COMMON_HOLDS, [], map_location="cpu")


def load_bytes_item(value: io.BytesIO, path: Path, key: str) -> Any:
    """One byte item of a .distcp file (torch.save of a ShardedObject's data), as tensors, numpy and plain data."""
    return _weights_only(value, path, f"{key}: {_ITEM_HOLDS}", _numpy_globals())


def _safe_strategies(ckpt_dir: Path) -> tuple[Any, Any]:
    """megatron's torch_dist load strategies, reading `.metadata`, `common.pt` and byte items as above."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(CachedMetadataFileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            if self._cached_metadata is None:
                meta = read_torch_metadata(self._get_metadata_path(kwargs.get("rank")))
                if getattr(meta, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
                    meta.storage_meta = StorageMeta()
                meta.storage_meta.load_id = self.load_id
                self._cached_metadata = meta
            return self._cached_metadata

    class Planner(mcore_torch.MCoreLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:  # DefaultLoadPlanner's, minus its pickle.load
            file = ckpt_dir / self.metadata.storage_data[read_item.storage_index].relative_path
            obj = load_bytes_item(value, file, read_item.dest_index.fqn)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    class Sharded(mcore_torch.TorchDistLoadShardedStrategy):
        """megatron builds its reader and planner inside `load` from two module names: swap them for the call (only
        megatron's loads use those names, never its async saves, so the swap cannot reach another caller)."""

        def __init__(self) -> None:
            super().__init__()
            self.reader = Reader(str(ckpt_dir))

        @contextmanager
        def _safe(self) -> Iterator[None]:
            saved = mcore_torch._get_filesystem_reader, mcore_torch.MCoreLoadPlanner
            mcore_torch._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: self.reader
            mcore_torch.MCoreLoadPlanner = Planner
            try:
                yield
            finally:
                mcore_torch._get_filesystem_reader, mcore_torch.MCoreLoadPlanner = saved

        def load(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> dict:
            with self._safe():
                return super().load(sharded_state_dict, checkpoint_dir)

        def load_tensors_metadata(self, checkpoint_dir: str | Path, metadata: Metadata | None = None) -> dict:
            with self._safe():
                return super().load_tensors_metadata(checkpoint_dir, metadata)

        def load_sharded_metadata(self, checkpoint_dir: str | Path) -> dict:
            with self._safe():
                return super().load_sharded_metadata(checkpoint_dir)

    class Common(TorchCommonLoadStrategy):  # its load_sharded_objects (for strategies that cannot read
        # ShardedObjects themselves) is never called: torch_dist reads them as the byte items above
        def load_common(self, checkpoint_dir: str | Path) -> dict:
            return load_common(checkpoint_dir)

    return Sharded(), Common()


def dist_load(sharded_state_dict: dict, ckpt_dir: str | Path) -> dict:
    """megatron's `dist_checkpointing.load` of a torch_dist checkpoint with every pickle read through an allow-list
    (collective); a refused global is one MegapackError naming the file."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt_dir = Path(ckpt_dir)
    sharded, common = _safe_strategies(ckpt_dir)
    # read (and refuse) the index before torch's loader, which would log a refusal and retry per-rank indexes
    sharded.reader.read_metadata()
    try:
        return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir), sharded_strategy=sharded,
                                       common_strategy=common)
    except CheckpointException as exc:  # torch wraps what failed on each rank; a refusal is ours to report
        refused = next((e for e, _ in exc.failures.values() if isinstance(e, MegapackError)), None)
        if refused is not None:
            raise refused from None
        raise
