"""Let megatron-core run on CPU over gloo: a small set of documented patches, installed only when CUDA is absent.

megatron-core assumes CUDA in many places. `install_cpu_compat()` covers exactly what TP x PP x DP training,
the distributed optimizer and torch_dist checkpoints touch (verified on megatron-core 0.16.1, torch 2.13 CPU):

1. `torch.cuda.current_device()` is used as a device argument -> returns `torch.device("cpu")`;
   `torch.cuda.set_device` becomes a no-op.
2. Explicit CUDA devices in tensor factories and `.to(...)` (e.g. the optimizer's loss-scale tensor,
   `device="cuda"`) -> a `TorchFunctionMode` (`_CpuDeviceMode`), entered for the life of the process, rewrites
   every CUDA device argument (keyword or positional) to CPU and drops `pin_memory=True`.
3. `Tensor.cuda()` returns the tensor itself (handled inside the mode); `Module.cuda()` returns the module.
4. `clip_grad_by_total_norm_fp32` asserts `grad.type() == 'torch.cuda.FloatTensor'` -> inside the mode,
   `Tensor.type()` with no argument reports the CUDA type name, and `Tensor.type('torch.cuda.X')` converts to
   `torch.X`. (Patching `Tensor.type` directly recurses through the mode, so this lives in the mode.)
5. CUDA RNG used by megatron's RNG tracker (`torch.cuda.manual_seed`, `get_rng_state`, `set_rng_state`,
   `tensor_parallel.random._set_cuda_rng_state`) -> backed by one CPU `torch.Generator` standing in for the GPU
   generator, so checkpointed "CUDA" RNG state round-trips.
6. `torch.cuda.synchronize`, `empty_cache`, `nvtx.range_push/pop` -> no-ops; memory statistics -> 0.

Scripts that call `dist_checkpointing.save` must still run under `if __name__ == "__main__":` (it starts a
multiprocessing manager with the spawn method); that is the caller's job, not a patch.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_lock = threading.Lock()
_fake_cuda_generator: torch.Generator | None = None
_CPU = torch.device("cpu")


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and makes `Tensor.type()` / `Tensor.cuda()` behave as on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.device:  # device objects stay as written; they are rewritten where they are used
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                name = func(*args)
                return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], args[1].replace("torch.cuda.", "torch.", 1), *args[2:])
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if any(_is_cuda_device(a) for a in args):
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


def _cpu_current_device() -> torch.device:
    return _CPU


def _noop_named(name: str):
    """A distinct no-op per patched name (torch._dynamo rejects one function object standing for two torch APIs)."""

    def noop(*_args: Any, **_kwargs: Any) -> None:
        return None

    noop.__name__ = noop.__qualname__ = name
    return noop


def _zero_named(name: str):
    def zero(*_args: Any, **_kwargs: Any) -> int:
        return 0

    zero.__name__ = zero.__qualname__ = name
    return zero


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return _fake_cuda_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    _fake_cuda_generator.set_state(new_state.clone() if new_state.device.type == "cpu" else new_state.cpu())


def _manual_seed(seed: int) -> None:
    _fake_cuda_generator.manual_seed(int(seed))


def _manual_seed_all(seed: int) -> None:
    _fake_cuda_generator.manual_seed(int(seed))


def _get_megatron_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return _fake_cuda_generator.get_state()


def install_cpu_compat() -> None:
    """Install the CPU patches listed in this module's docstring; idempotent; a no-op when CUDA is available."""
    global _installed, _fake_cuda_generator
    if torch.cuda.is_available():
        return
    with _lock:
        if _installed:
            return
        _fake_cuda_generator = torch.Generator(device="cpu")
        _fake_cuda_generator.manual_seed(0)

        cuda = torch.cuda
        cuda.current_device = _cpu_current_device
        for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats"):
            setattr(cuda, name, _noop_named(name))
        cuda.nvtx.range_push = _noop_named("range_push")
        cuda.nvtx.range_pop = _noop_named("range_pop")
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
            setattr(cuda, name, _zero_named(name))
        # torch.cuda.X and torch.cuda.random.X are the same objects upstream, so one function serves both names
        cuda.manual_seed = cuda.random.manual_seed = _manual_seed
        cuda.manual_seed_all = cuda.random.manual_seed_all = _manual_seed_all
        cuda.get_rng_state = cuda.random.get_rng_state = _get_rng_state
        cuda.set_rng_state = cuda.random.set_rng_state = _set_rng_state
        torch.nn.Module.cuda = lambda self, device=None: self

        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random._set_cuda_rng_state = _set_rng_state
        mcore_random._get_cuda_rng_state = _get_megatron_rng_state

        # Entered for the rest of the process (never exited): every later torch call on this thread goes through it.
        _CpuDeviceMode().__enter__()
        _installed = True


def is_installed() -> bool:
    """Whether the CPU patches are active in this process."""
    return _installed
