"""The CPU compatibility layer and the distributed environment parsing (patches run in a child interpreter)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from megapack.errors import MegapackError
from megapack.training.run import distributed

_CHILD = textwrap.dedent(
    """
    import torch
    from megapack.training.compat import cpu_compat

    # 1. with CUDA "available" the layer must leave torch untouched
    real_is_available, real_current = torch.cuda.is_available, torch.cuda.current_device
    depth = torch._C._len_torch_function_stack()
    torch.cuda.is_available = lambda: True
    cpu_compat.install_cpu_compat()
    assert torch.cuda.current_device is real_current and not cpu_compat.is_installed()
    assert torch._C._len_torch_function_stack() == depth
    torch.cuda.is_available = real_is_available

    # 2. without CUDA: installed once, idempotent
    cpu_compat.install_cpu_compat()
    cpu_compat.install_cpu_compat()
    assert cpu_compat.is_installed() and torch._C._len_torch_function_stack() == depth + 1
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).to("cuda:0").device.type == "cpu"
    assert torch.empty(3, device=torch.device("cuda", 0), pin_memory=True).device.type == "cpu"
    x = torch.ones(2).cuda()
    assert x.device.type == "cpu" and x.type() == "torch.cuda.FloatTensor"
    assert x.type("torch.cuda.HalfTensor").dtype == torch.float16
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
    torch.cuda.synchronize()
    # megatron's RNG tracker: seeding, saving and restoring the stand-in CUDA generator
    from megatron.core.tensor_parallel import random as mrandom
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    mrandom._set_cuda_rng_state(state)
    assert torch.equal(mrandom._get_cuda_rng_state(), state)
    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    with tracker.fork("model-parallel-rng"):
        pass
    torch.cuda.manual_seed(6)
    assert not torch.equal(torch.cuda.get_rng_state(), state)
    print("OK")
    """
)


def test_cpu_compat_is_a_noop_with_cuda_and_patches_without():
    if __import__("torch").cuda.is_available():
        pytest.skip("the patch checks need a machine without CUDA")
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


@pytest.mark.parametrize(
    "nodelist,first",
    [("gpu[003-005,009]", "gpu003"), ("node7", "node7"), ("a[1,4],b2", "a1"), ("login-01,login-02", "login-01")],
)
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def _clear(monkeypatch, **env: str):
    """Remove every launcher variable, then set `env`."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID", "SLURM_NODELIST", "SLURM_STEP_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_rank_from_torchrun_slurm_and_single_process(monkeypatch):
    import os

    _clear(monkeypatch, RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1")
    assert distributed._rank_from_environment() == (5, 8, 1)

    _clear(monkeypatch, SLURM_PROCID="3", SLURM_NTASKS="16", SLURM_LOCALID="3", SLURM_NODELIST="dgx[12-13]",
           SLURM_JOB_ID="123456")
    assert distributed._rank_from_environment() == (3, 16, 3)
    assert os.environ["MASTER_ADDR"] == "dgx12" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)

    _clear(monkeypatch)
    assert distributed._rank_from_environment() == (0, 1, 0)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


def test_multi_process_without_master_addr_is_a_one_line_error(monkeypatch):
    _clear(monkeypatch, RANK="0", WORLD_SIZE="2")
    with pytest.raises(MegapackError, match="MASTER_ADDR"):
        distributed._rank_from_environment()
