"""megatron-core 0.16 workarounds for its torch AdamW fallback (used when neither Apex nor Transformer Engine is
installed, e.g. on CPU): the optimizer state it needs before the first step, and the `step` counts its loader drops.

Kept beside the CPU compatibility layer (cpu_compat.py): both adapt megatron-core to environments it does not
target, and both can go when megatron-core handles these cases itself.
"""
from __future__ import annotations

from contextlib import contextmanager


def allocate_torch_adam_state(optimizer) -> None:
    """Give torch AdamW (megatron's fallback without Apex/TE) its lazily created state, `step` included.

    megatron's DistributedOptimizer.state_dict() needs a step before the first optimizer step, which is exactly
    the situation when resuming; the values are overwritten by the load.
    """
    import torch

    for inner in _torch_adamws(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _torch_adamws(optimizer):
    """The torch AdamW instances inside a megatron (chained) optimizer: its fallback without Apex/TE."""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.AdamW):
            yield inner


@contextmanager
def torch_adam_step_tolerant(optimizer):
    """During a fully_reshardable load with torch AdamW: keep each parameter's current `step`.

    megatron 0.16's loader hands over exp_avg/exp_avg_sq/param but skips `step`, then copies every key of the
    AdamW state (which, without Apex/TE, has a `step`) and fails; `restore_torch_adam_steps` sets it afterwards.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def setter(model_param, tensors, _opt=opt, _original=original):
            current = _opt._get_main_param_and_optimizer_states(model_param)
            if "step" in current and "step" not in tensors:
                tensors = dict(tensors, step=current["step"])
            _original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = setter
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method


def _checkpoint_adam_step(state) -> float | None:
    """The optimizer step count stored with the param groups of a loaded optimizer state dict."""
    if isinstance(state, dict):
        for group in state.get("param_groups", []) if isinstance(state.get("param_groups"), list) else []:
            if isinstance(group, dict) and group.get("step") is not None:
                return float(group["step"])
        for value in state.values():
            found = _checkpoint_adam_step(value)
            if found is not None:
                return found
    elif isinstance(state, list):
        for value in state:
            found = _checkpoint_adam_step(value)
            if found is not None:
                return found
    return None


def restore_torch_adam_steps(optimizer, loaded_optimizer_state) -> None:
    """Fix torch AdamW `step` after megatron's load (its fallback path without Apex/TE).

    megatron copies per-parameter tensors from the template over the state, which puts back the placeholder step
    of `allocate_torch_adam_state`; and it hands every parameter the same step tensor, which AdamW would increment
    once per parameter. Each parameter gets its own tensor holding the checkpoint's step count.
    """
    import torch

    step = _checkpoint_adam_step(loaded_optimizer_state)
    if step is None:
        return
    for state in (st for inner in _torch_adamws(optimizer) for st in inner.state.values()):
        if "exp_avg" in state:
            state["step"] = torch.tensor(step, dtype=torch.float32)
