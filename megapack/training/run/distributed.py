"""Distributed runtime: torch.distributed from torchrun or Slurm variables, megatron parallel_state, RNG seeds."""
from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from megapack.errors import MegapackError


# Under Slurm without MASTER_PORT, every job derives its own rendezvous port from its id in this range.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


@dataclass
class DistEnv:
    """Where this process sits: global rank, world size, local rank, parallel sizes and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    device: torch.device
    cp: int = 1


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a Slurm node list such as `gpu[003-005,009],login1` (-> `gpu003`)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise MegapackError(f"SLURM_NODELIST={nodelist!r}: expected a Slurm host list like 'node[01-04]'")
    prefix, bracket = match.group(1), match.group(3)
    if bracket is None:
        return prefix
    return prefix + bracket.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise MegapackError(f"environment variable {name}={value!r}: expected an integer") from None


_SET_HERE: set[str] = set()  # the rendezvous variables _rank_from_environment set for a single process


def _rank_from_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else Slurm, else a single process; sets MASTER_ADDR/PORT."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        if "MASTER_ADDR" not in os.environ:
            nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST") or "127.0.0.1"
            os.environ["MASTER_ADDR"] = first_slurm_host(nodelist)
        if "MASTER_PORT" not in os.environ:
            job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
            os.environ["MASTER_PORT"] = str(SLURM_PORT_BASE + job % SLURM_PORT_SPAN)
    else:
        rank, world, local = 0, 1, 0
    if world == 1:  # a single in-process group: destroy_distributed takes these out again (a later sbatch or
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):  # torchrun inherits
            if name not in os.environ:  # the environment, and this port stays bound while the group lives)
                os.environ[name] = value
                _SET_HERE.add(name)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise MegapackError(f"environment variable {name} is not set: launch with torchrun or srun")
    return rank, world, local


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU) RNGs."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 600, vpp: int = 1,
                     cp: int = 1) -> DistEnv:
    """Initialise torch.distributed (nccl with CUDA, gloo + CPU patches without) and megatron's parallel_state
    (`vpp` > 1: that many virtual pipeline stages, i.e. model chunks, per pipeline rank; `cp`: context-parallel
    size, world = tp * cp * pp * dp)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    rank, world, local = _rank_from_environment()
    if tp < 1 or pp < 1 or cp < 1 or world % (tp * cp * pp) != 0:
        raise MegapackError(
            f"world size {world} is not divisible by tensor parallel {tp} x context parallel {cp} x pipeline "
            f"parallel {pp}"
        )
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        from megapack.training.compat.cpu_compat import install_cpu_compat

        install_cpu_compat()
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
    )
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    return DistEnv(rank=rank, world_size=world, local_rank=local, tp=tp, pp=pp, dp=world // (tp * cp * pp),
                   device=device, cp=cp)


def destroy_distributed() -> None:
    """Tear down megatron's parallel groups and the default process group (safe to call twice)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    while _SET_HERE:
        os.environ.pop(_SET_HERE.pop(), None)
