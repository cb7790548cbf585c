"""Load Hugging Face safetensors into a TP/PP-sharded GPTModel, each rank reading only the slices it owns."""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from megapack.errors import MegapackError
from megapack.model.config import head_dim, num_kv_heads
from megapack.model.weights_map import expected_shape, named_mappings


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: config.json and safetensors weights (one file or a sharded index)."""
    return (path / "config.json").is_file() and ((path / "model.safetensors").is_file()
                                                 or (path / "model.safetensors.index.json").is_file())


class SafetensorsReader:
    """Slice-level reads from a single `model.safetensors` or a sharded `model.safetensors.index.json` checkpoint."""

    def __init__(self, hf_dir: str | Path) -> None:
        from safetensors import safe_open

        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / "model.safetensors.index.json"
        single = self.hf_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif single.is_file():
            weight_map = None
        else:
            raise MegapackError(
                f"{self.hf_dir}: no model.safetensors or model.safetensors.index.json (expected HF safetensors weights)"
            )
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self._open = lambda file: self._stack.enter_context(safe_open(str(self.hf_dir / file), framework="pt"))
        if weight_map is None:
            handle = self._open("model.safetensors")
            self._handles["model.safetensors"] = handle
            self.weight_map = {key: "model.safetensors" for key in handle.keys()}
        else:
            self.weight_map = dict(weight_map)
        self.bytes_read = 0
        self.tensors_read: dict[str, int] = {}

    def _slice(self, name: str):
        file = self.weight_map.get(name)
        if file is None:
            raise MegapackError(f"{self.hf_dir}: weight {name!r} is missing from the safetensors files")
        if file not in self._handles:
            if not (self.hf_dir / file).is_file():
                raise MegapackError(f"{self.hf_dir}: shard {file!r} (holding {name!r}) is missing")
            self._handles[file] = self._open(file)
        return self._handles[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of a tensor (no data read)."""
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Read a tensor, or only rows [a, b) / columns [a, b) of it; counts the bytes read."""
        sl = self._slice(name)
        if rows is not None:
            tensor = sl[rows[0] : rows[1]]
        elif cols is not None:
            tensor = sl[:, cols[0] : cols[1]]
        else:
            tensor = sl[:]
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.tensors_read[name] = self.tensors_read.get(name, 0) + tensor.numel()
        return tensor

    def close(self) -> None:
        """Close every open file."""
        self._stack.close()


def _local_tensor(reader: SafetensorsReader, kind: str, names: tuple[str, ...], hf_config: dict, local_shape,
                  tp_rank: int, tp: int) -> torch.Tensor:
    """The rank-local piece of a megatron parameter assembled from HF tensors."""
    if kind == "replicated":
        return reader.read(names[0])
    if kind == "vocab":
        rows = local_shape[0]
        start, vocab = tp_rank * rows, hf_config["vocab_size"]
        out = torch.zeros(local_shape, dtype=reader_dtype(reader, names[0]))
        stop = min(start + rows, vocab)
        if stop > start:
            out[: stop - start] = reader.read(names[0], rows=(start, stop))
        return out
    if kind == "cols":
        width = local_shape[1]
        return reader.read(names[0], cols=(tp_rank * width, (tp_rank + 1) * width))
    if kind == "fc1":
        rows = local_shape[0] // 2
        span = (tp_rank * rows, (tp_rank + 1) * rows)
        return torch.cat([reader.read(names[0], rows=span), reader.read(names[1], rows=span)], dim=0)
    if kind == "qkv":
        d = head_dim(hf_config)
        groups = num_kv_heads(hf_config) // tp
        per_group = hf_config["num_attention_heads"] // num_kv_heads(hf_config)
        q_rows, kv_rows = groups * per_group * d, groups * d
        q = reader.read(names[0], rows=(tp_rank * q_rows, (tp_rank + 1) * q_rows))
        k = reader.read(names[1], rows=(tp_rank * kv_rows, (tp_rank + 1) * kv_rows))
        v = reader.read(names[2], rows=(tp_rank * kv_rows, (tp_rank + 1) * kv_rows))
        hidden = q.shape[1]
        # megatron interleaves per query group: [q heads of the group..., k, v]
        mixed = torch.cat(
            [q.view(groups, per_group * d, hidden), k.view(groups, d, hidden), v.view(groups, d, hidden)], dim=1
        )
        return mixed.reshape(-1, hidden)
    raise AssertionError(kind)


def reader_dtype(reader: SafetensorsReader, name: str) -> torch.dtype:
    """The stored dtype of a tensor (reads one element at most)."""
    sl = reader._slice(name)
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    return dtypes[sl.get_dtype()]


@torch.no_grad()
def load_hf_weights(model, hf_dir: str | Path) -> dict:
    """Copy this rank's TP/PP slices of HF safetensors into `model`; returns {"bytes_read", "tensors_read", ...}."""
    from megatron.core import parallel_state

    from megapack.model.config import load_hf_config

    hf_config = load_hf_config(hf_dir)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    reader = SafetensorsReader(hf_dir)
    loaded = 0
    try:
        for name, param, mapping, _layer in named_mappings(model, hf_config):
            for hf_name in mapping.hf_names:
                want, have = expected_shape(hf_name, hf_config), reader.shape(hf_name)
                if want != have:
                    raise MegapackError(
                        f"{hf_dir}: tensor {hf_name!r} has shape {list(have)}, expected {list(want)} from config.json"
                    )
            local = _local_tensor(reader, mapping.kind, mapping.hf_names, hf_config, tuple(param.shape), tp_rank, tp)
            if tuple(local.shape) != tuple(param.shape):
                raise MegapackError(
                    f"{hf_dir}: {mapping.hf_names[0]!r} gives shape {list(local.shape)} for megatron parameter "
                    f"{name!r} of shape {list(param.shape)}"
                )
            param.copy_(local.to(device=param.device, dtype=param.dtype))
            loaded += 1
    finally:
        reader.close()
    return {"bytes_read": reader.bytes_read, "tensors_read": dict(reader.tensors_read), "parameters_loaded": loaded}
