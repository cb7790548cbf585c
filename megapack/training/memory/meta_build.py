"""The real megatron-core GPTModel of every (TP rank, PP rank) position, built on the meta device: no memory, no GPU.

One process impersonates each rank in turn: torch's "fake" process-group backend (the one torchtitan's dry runs use)
stands in for NCCL/gloo, megatron's parallel_state is initialised for that rank, `build_model` runs under
`torch.device("meta")` with `use_cpu_initialization` (megatron otherwise creates parameters with an explicit CUDA
device) and without initialisation (nothing to initialise on meta), and the state is torn down before the next rank.
Building the 70B model of one position takes ~0.05 s.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megapack.errors import MegapackError

# megatron's distributed optimizer aligns every parameter's start in the gradient/parameter buffer to 64 elements
# (param_and_grad_buffer._pad_start_of_param_if_needed) and pads each bucket's end to lcm(DP, 128)
PARAM_ALIGN = 64
BUCKET_ALIGN = 128


@dataclass(frozen=True)
class Position:
    """What one (TP rank, PP rank) position holds: parameter counts and the layers of each of its model chunks."""

    tp_rank: int
    pp_rank: int
    parameters: int  # every parameter element this rank stores
    unique_parameters: int  # counting TP-replicated tensors (norms) on TP rank 0 only, a tied output copy never
    param_numels: tuple[int, ...] = field(repr=False)  # per parameter, in registration order (buffer layout)
    chunk_layers: tuple[int, ...] = ()  # decoder layers of each virtual-pipeline chunk (one entry without VPP)
    first_stage: bool = False  # holds the embedding
    last_stage: bool = False  # holds the output layer and the loss

    def buffer_numel(self, dp: int) -> int:
        """Elements of megatron's contiguous gradient (and parameter) buffer: aligned starts, end padded for DP."""
        import math

        end = 0
        for numel in self.param_numels:
            end = -(-end // PARAM_ALIGN) * PARAM_ALIGN + numel
        divisor = math.lcm(dp, BUCKET_ALIGN)
        return -(-end // divisor) * divisor


def _count(model_chunks: list) -> tuple[int, int, list[int]]:
    total = unique = 0
    numels: list[int] = []
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    for chunk in model_chunks:
        for param in chunk.parameters():
            n = param.numel()
            total += n
            numels.append(n)
            split = bool(getattr(param, "tensor_model_parallel", False))
            tied_copy = getattr(param, "shared_embedding", False) and not chunk.pre_process
            if not tied_copy and (split or tp_rank == 0):
                unique += n
    return total, unique, numels


def _skip_init(weight):
    """No initialisation: megatron still runs its CPU init path (which marks the TP-split tensors) but draws nothing
    (torch's normal_ on meta tensors runs a slow Python decomposition: three quarters of a build)."""
    return weight


def build_position(hf_config: dict, tp: int, pp: int, tp_rank: int, pp_rank: int, *, vpp: int | None = None,
                   sequence_parallel: bool = False, bf16: bool = True, seq_length: int = 4096, cp: int = 1,
                   cp_rank: int = 0) -> Position:
    """Build the model chunks of one position on meta under a fake process group of tp*cp*pp ranks (megatron's
    context_parallel_size: CP ranks hold the same parameters, CP shards activations only); count them."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megapack.model.builder import build_model

    if dist.is_initialized():
        raise MegapackError("the memory planner builds its models under its own fake process group: call it "
                            "before torch.distributed is initialised (e.g. from `megapack plan` or `train --check`)")
    if not torch.cuda.is_available():
        from megapack.training.compat.cpu_compat import install_cpu_compat

        install_cpu_compat()  # megatron's RNG tracker and device arguments, as for a CPU run
    # megatron's default order (tp-cp-ep-dp-pp): TP is the fastest-varying, then CP; DP is 1 here
    rank = (pp_rank * cp + cp_rank) * tp + tp_rank
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp * cp * pp)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp,
                                     virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
                                     create_gloo_process_groups=False)
        where = (ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(),
                 ps.get_pipeline_model_parallel_rank())
        if where != (tp_rank, cp_rank, pp_rank):
            raise MegapackError(f"rank {rank} is not position tp={tp_rank} cp={cp_rank} pp={pp_rank} in megatron's "
                                f"order")
        model_parallel_cuda_manual_seed(0)
        stages = list(range(vpp)) if vpp and vpp > 1 else [None]
        extra = {"variable_seq_lengths": True, "moe_token_dispatcher_type": "alltoall"} if pp > 1 else {}
        if vpp and vpp > 1:  # each chunk builds num_layers / (pp * vpp) layers
            extra["virtual_pipeline_model_parallel_size"] = vpp
        chunks = []
        with torch.device("meta"):
            for stage in stages:
                chunks.append(build_model(hf_config, attention_backend="sdpa", bf16=bf16,
                                          sequence_parallel=sequence_parallel and tp > 1, seq_length=seq_length,
                                          vp_stage=stage, use_cpu_initialization=True,
                                          perform_initialization=True, init_method=_skip_init,
                                          output_layer_init_method=_skip_init, embedding_init_method=_skip_init,
                                          **extra))
        total, unique, numels = _count(chunks)
        return Position(tp_rank=tp_rank, pp_rank=pp_rank, parameters=total, unique_parameters=unique,
                        param_numels=tuple(numels), chunk_layers=tuple(len(c.decoder.layers) for c in chunks),
                        first_stage=chunks[0].pre_process, last_stage=chunks[-1].post_process)
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def build_positions(hf_config: dict, tp: int, pp: int, **kwargs) -> list[Position]:
    """Every (TP rank, PP rank) position of the layout (CP rank 0: every CP rank holds the same parameters), built
    one after another (see `build_position`)."""
    from megapack.model.config import check_parallel_sizes

    check_parallel_sizes(hf_config, tp, pp)
    return [build_position(hf_config, tp, pp, t, p, **kwargs) for p in range(pp) for t in range(tp)]
