"""Known, harmless warnings of megatron-core and torch, silenced in one place (each rank prints them every step)."""
from __future__ import annotations

import warnings

KNOWN_HARMLESS_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",  # optional GPU libraries absent (expected on CPU)
    r".*Apex is not installed.*",
    r".*imports from `dynamic_context.py` will be removed.*",
    r".*full scope is deprecated.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    r".*is deprecated. Please use `torch.distributed.*",
    r".*non-leaf Tensor.*",
    r".*`load_state_dict` is deprecated and will be removed in future versions.*",  # megatron's torch_dist loader
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",  # torch, under megatron's checkpoints
)


def quiet_warnings() -> None:
    """Ignore KNOWN_HARMLESS_WARNINGS in this process."""
    for pattern in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
