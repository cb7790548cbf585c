"""Measure the activation memory autograd holds for backward, on any device (CPU included), with saved-tensor hooks.

Every tensor autograd saves for backward passes through `torch.autograd.graph.saved_tensors_hooks`' pack hook; the
meter counts the bytes of each distinct storage from its first save until the last saved reference to it is released
(after its backward), so `peak` is the most activation memory held at once. Parameters (and views of them, e.g. a
weight's transpose) are excluded: they are weights, not activations. With `track(module)` only tensors saved inside
those modules' forwards are counted (recomputation in backward included, as it runs their forward again); used as a
context manager the meter counts everything saved inside the block.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class _Held:
    """A saved tensor as autograd stores it while the meter watches; released when autograd drops it."""

    __slots__ = ("tensor", "key", "meter", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: int, meter: "SavedActivations") -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedActivations:
    """Live and peak bytes of the distinct storages held for backward (parameters excluded)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self._held: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self._contexts: list = []
        self._handles: list = []
        self.live = 0
        self.peak = 0

    def _pack(self, tensor: torch.Tensor):
        if tensor.device.type == "meta":
            return tensor
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._exclude:
            return tensor
        entry = self._held.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Held(tensor, key, self)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key: int) -> None:
        entry = self._held.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._held[key]

    def reset_peak(self) -> None:
        """Start a new peak from what is held now (e.g. at the start of a training step)."""
        self.peak = self.live

    def __enter__(self) -> "SavedActivations":
        context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        context.__enter__()
        self._contexts.append(context)
        return self

    def __exit__(self, *exc) -> None:
        self._contexts.pop().__exit__(*exc)

    def track(self, module: torch.nn.Module) -> None:
        """Count what is saved inside `module`'s forward (each call, recomputations in backward included)."""
        self._handles.append(module.register_forward_pre_hook(self._enter_hook))
        self._handles.append(module.register_forward_hook(self._exit_hook))

    def _enter_hook(self, *_) -> None:  # a pre-hook's return value would replace the module's inputs
        self.__enter__()

    def _exit_hook(self, *_) -> None:
        self.__exit__(None, None, None)

    def remove(self) -> None:
        """Remove the module hooks `track` added."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
