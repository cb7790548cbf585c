"""Will it fit? Bytes per (TP rank, PP rank) position of a run: weights, gradients, optimizer state, activations.

Parameters come from the real megatron-core model of each position, built on the meta device
(`megapack.training.memory.meta_build`); the bytes follow from what megatron keeps for them (bf16 runs: bf16 weights,
fp32 main-gradient buffer, fp32 master weights and both Adam moments sharded over DP by the distributed optimizer;
fp32 runs: the weights are the master copy). Activations are what autograd saves for one packed THD micro-batch
(`seq_length x micro_batch_size` tokens in one row), counted tensor by tensor in `layer_activation_bytes`, times the
micro-batches in flight of the 1F1B schedule, plus the loss's logits on the last stage and a backward workspace.
Context parallelism (`parallel.cp`): a rank holds row / cp tokens (the row CP-padded,
`megapack.training.preflight.layout_rules`) plus the keys and values of the whole row, all-gathered over the CP group
for its attention; the distributed optimizer shards over DP x CP; parameters are not sharded by CP.
`tests/test_memory_plan.py` checks the sum against a measured CPU training step.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from megapack.errors import MegapackError
from megapack.model.config import DEFAULT_LOSS_CHUNK_TOKENS

if TYPE_CHECKING:
    from megapack.training.preflight.config import RunConfig

GIB = 2**30
# Not available to tensors: the CUDA context and NCCL's buffers (~1 GiB together on H100/H200), and the caching
# allocator's fragmentation, for which megatron users budget about a tenth of the card.
CONTEXT_RESERVE_BYTES = 1 * GIB
FRAGMENTATION_RESERVE = 0.10


@dataclass(frozen=True)
class Target:
    """The implementation facts that decide what autograd keeps."""

    bytes_per_value: int  # 2 for bf16 activations, 4 for fp32
    flash_attention: bool  # te / flash / torch_varlen: O(t) state, K/V kept at the KV-head count
    fused_swiglu: bool  # megatron's bias_swiglu_impl (CUDA): keeps only the fc1 output


def resolve_target(device: str, precision: str) -> Target:
    """The GPU target (flash-type attention, fused SwiGLU; bf16 unless fp32) or the CPU one (SDPA, unfused, fp32)."""
    if device not in ("gpu", "cpu"):
        raise MegapackError(f"memory plan device {device!r}: expected 'gpu' or 'cpu'")
    bf16 = precision == "bf16" or (precision == "auto" and device == "gpu")
    return Target(2 if bf16 else 4, flash_attention=device == "gpu", fused_swiglu=device == "gpu")


def layer_activation_bytes(hf: dict, tokens: int, tp: int, sp: bool, recompute: str, target: Target,
                           kv_tokens: int | None = None) -> dict:
    """Bytes one decoder layer keeps for backward for a THD row of `tokens` tokens, and the transient workspaces.

    s tokens, h hidden, a heads, g KV heads, d head dim, f FFN; '/t' on TP-split tensors, h/t_sp on the
    sequence-parallel ones (t_sp = t with SP, else 1). Saved, in values (no dropout, no biases, so no masks):
      2 RMSNorms          2 x (input + normalised) = 4sh/t_sp   (torch's RMSNorm; TE keeps input + ln_out too)
      qkv and fc1 inputs  2sh/t_sp   (megatron's linear keeps the un-gathered SP input and re-gathers in backward)
      RoPE                4sd fp32   (cos and sin for q and k, per layer)
      core attention      q s*a*d/t, k and v 2*s*g*d/t (SDPA: expanded to a heads), output s*a*d/t (shared with
                          linear_proj's input), log-sum-exp s*a/t fp32; SDPA on CPU also keeps its t x t fp32 mask
      SwiGLU MLP          fc1 output 2sf/t, fc2 input sf/t; unfused (CPU) also silu's output and a copy: +2sf/t
    selective recompute (megatron's core_attn) keeps only the attention's inputs (q, k, v at the KV-head count)
    and recomputes the rest in backward; full recompute keeps only the layer's input sh/t_sp and rebuilds one
    layer at a time in backward.
    Context parallelism: s is the rank's share of the row (row/cp) and attention keeps the keys and values of the
    whole row, S = `kv_tokens` (all-gathered over the CP group): k and v count 2*S*g*d/t ('gathered_kv'; SDPA:
    expanded to a heads), the SDPA mask s x S, and the backward's dK/dV of the row before they are reduce-scattered.
    """
    s, h, f = tokens, int(hf["hidden_size"]), int(hf["intermediate_size"])
    a = int(hf["num_attention_heads"])
    g = int(hf.get("num_key_value_heads") or a)
    d = int(hf.get("head_dim") or h // a)
    kv = s if kv_tokens is None else kv_tokens
    b, t, t_sp = target.bytes_per_value, tp, (tp if sp and tp > 1 else 1)
    norms_and_inputs = (4 + 2) * s * h // t_sp * b
    rope = 4 * s * d * 4
    kv_heads = g if target.flash_attention else a
    attn_inputs = s * a * d // t * b + 2 * kv * kv_heads * d // t * b
    attn_state = s * a * d // t * b + s * a // t * 4 + (0 if target.flash_attention else s * kv * 4)
    mlp = (3 if target.fused_swiglu else 5) * s * f // t * b
    full_layer = norms_and_inputs + rope + attn_inputs + attn_state + mlp
    if recompute == "none":
        saved, recompute_workspace = full_layer, 0
    elif recompute == "selective":
        recompute_workspace = attn_inputs + attn_state  # one layer's attention, rebuilt in its backward
        saved = norms_and_inputs + rope + (s * a + 2 * kv * g) * d // t * b + s * a * d // t * b + mlp
    elif recompute == "full":
        saved, recompute_workspace = s * h // t_sp * b, full_layer
    else:
        raise MegapackError(f"training.recompute {recompute!r}: expected none, selective or full")
    # gradient workspace of a layer's backward: the fc1-output gradient, the largest it allocates, or under CP the
    # attention's dQ and the whole row's dK/dV when those are larger
    grad_workspace = max(2 * s * f // t * b, (s * a + 2 * kv * g) * d // t * b)
    # the gathered keys and values one layer keeps for its backward (full recompute: only the layer being rebuilt)
    kept_heads = g if recompute == "selective" else kv_heads
    gathered_kv = 2 * kv * kept_heads * d // t * b if kv != s and recompute != "full" else 0
    return {"saved": saved, "recompute_workspace": recompute_workspace, "grad_workspace": grad_workspace,
            "gathered_kv": gathered_kv}


def microbatches_in_flight(pp: int, pp_rank: int, num_microbatches: int, vpp: int | None) -> float:
    """Model chunks' micro-batches whose activations 1F1B keeps at once, in units of this rank's whole stage.

    Non-interleaved: pp - pp_rank (megatron's warmup pp - rank - 1, plus the one in steady state). Interleaved
    with v chunks per rank: megatron's warmup (pp - rank - 1) * 2 + (v - 1) * pp chunk-forwards plus one, each
    holding 1/v of the stage's layers.
    """
    if pp == 1:
        return 1.0
    if not vpp or vpp == 1:
        return float(min(pp - pp_rank, num_microbatches))
    chunks = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, num_microbatches * vpp)
    return chunks / vpp


@dataclass(frozen=True)
class RankMemory:
    """The bytes one (TP rank, PP rank) position needs (the same on every DP rank)."""

    tp_rank: int
    pp_rank: int
    parameters: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    layers: int
    microbatches_in_flight: float
    activation_bytes_per_microbatch: int
    logits_bytes: int
    tokens: int  # of the row this rank holds: row / cp
    gathered_kv_bytes: int  # of one micro-batch, all layers: the whole row's K/V kept for backward (CP > 1)


@functools.lru_cache(maxsize=16)
def _positions(hf_json: str, tp: int, pp: int, vpp: int | None, sp: bool, bf16: bool, cp: int):
    from megapack.training.memory.meta_build import build_positions

    return tuple(build_positions(json.loads(hf_json), tp, pp, vpp=vpp, sequence_parallel=sp, bf16=bf16, cp=cp))


def positions(hf: dict, tp: int, pp: int, vpp: int | None = None, sp: bool = False, bf16: bool = True, cp: int = 1):
    """Every position's `meta_build.Position` of a layout, cached per process (the grid's runs share layouts)."""
    return _positions(json.dumps(hf, sort_keys=True), tp, pp, vpp, sp, bf16, cp)


def vocab_padding_parameters(hf: dict, tp: int) -> int:
    """Parameters megatron adds by padding the vocabulary to a multiple of 128 x TP (embedding, and output if untied)."""
    from megapack.model.builder import padded_vocab_size

    rows = padded_vocab_size(int(hf["vocab_size"]), tp) - int(hf["vocab_size"])
    return rows * int(hf["hidden_size"]) * (1 if hf.get("tie_word_embeddings") else 2)


def rank_memory(position, hf: dict, *, tp: int, pp: int, dp: int, vpp: int | None, sp: bool, tokens: int,
                num_microbatches: int, recompute: str, target: Target, loss_chunk_tokens: int = 0,
                cp: int = 1) -> RankMemory:
    """The bytes of one position (see the module docstring for what each term holds); `tokens` is the whole row,
    of which each of the `cp` context-parallel ranks holds tokens / cp."""
    from megapack.model.builder import padded_vocab_size

    b = target.bytes_per_value
    shards = dp * cp  # megatron's DDP and distributed optimizer work over the DP x CP group
    buffer = position.buffer_numel(shards)
    weight = position.parameters * b
    grad = buffer * 4  # grad_reduce_in_fp32: fp32 main gradients for every local parameter
    optimizer = -(-buffer // shards) * ((4 if b == 2 else 0) + 8)  # [fp32 master,] exp_avg, exp_avg_sq: a shard
    row = tokens
    tokens = -(-row // cp)
    layer = layer_activation_bytes(hf, tokens, tp, sp, recompute, target, kv_tokens=row if cp > 1 else None)
    layers = sum(position.chunk_layers)
    h_sp = tokens * int(hf["hidden_size"]) // (tp if sp and tp > 1 else 1) * b
    per_micro = layers * layer["saved"] + (h_sp if not position.last_stage else 3 * h_sp)  # stage output / final norm
    in_flight = microbatches_in_flight(pp, position.pp_rank, num_microbatches, vpp)
    h = int(hf["hidden_size"])
    vocab_rows = padded_vocab_size(int(hf["vocab_size"]), tp) // tp
    # The loss's logits: megatron's keeps the fp32 softmax of every token (in place of the logits) plus the bf16
    # logits and their gradient; the chunked loss (megapack.model.chunked_loss) holds one chunk's (fp32, and its
    # bf16 logits) and keeps each token's fp32 log-sum-exp.
    chunked = 0 < loss_chunk_tokens < tokens  # a row of one chunk takes megatron's loss
    logits = (loss_chunk_tokens if chunked else tokens) * vocab_rows * (4 + (2 if b == 2 else 0))
    logits = logits if position.last_stage else 0
    if position.last_stage and chunked:
        per_micro += tokens * 4
    # Transients on top of the saved activations, whichever phase is larger: the loss (logits, then the output
    # layer's weight gradient: megatron without gradient-accumulation fusion materialises it before adding it to the
    # fp32 main gradient, as the chunked loss does per chunk, except into an fp32 accumulator for a weight tied to the
    # embedding); a layer's backward (the
    # recomputed layer or attention, the activation gradient, fc1's weight gradient); the embedding's dense weight
    # gradient at the end of the first stage's backward.
    tied = bool(hf.get("tie_word_embeddings", False))
    weight_grad = vocab_rows * h * (4 + b if chunked and tied else b)
    loss_phase = logits + weight_grad if position.last_stage else 0
    layer_phase = layer["recompute_workspace"] + layer["grad_workspace"] + 2 * int(hf["intermediate_size"]) // tp * h * b
    embedding_phase = vocab_rows * h * b if position.first_stage else 0
    workspace = max(loss_phase, layer_phase, embedding_phase)
    activation = int(round(in_flight * per_micro)) + workspace
    return RankMemory(tp_rank=position.tp_rank, pp_rank=position.pp_rank, parameters=position.parameters,
                      weight_bytes=weight, grad_bytes=grad, optimizer_bytes=optimizer, activation_bytes=activation,
                      total_bytes=weight + grad + optimizer + activation, layers=layers,
                      microbatches_in_flight=in_flight, activation_bytes_per_microbatch=per_micro,
                      logits_bytes=logits, tokens=tokens, gathered_kv_bytes=layers * layer["gathered_kv"])


def check_gpu_memory_gb(gpu_memory_gb: float) -> float:
    """The GiB of one GPU, refused in one line unless a positive, finite number (`--gpu-memory-gb nan` is not)."""
    if not (isinstance(gpu_memory_gb, (int, float)) and math.isfinite(gpu_memory_gb) and gpu_memory_gb > 0):
        raise MegapackError(f"--gpu-memory-gb {gpu_memory_gb}: expected a positive, finite number of GiB")
    return float(gpu_memory_gb)


def usable_bytes(gpu_memory_gb: float) -> int:
    """What tensors may use of a GPU of `gpu_memory_gb` GiB: minus the context reserve and a tenth for fragmentation."""
    gpu_memory_gb = check_gpu_memory_gb(gpu_memory_gb)
    return int(gpu_memory_gb * GIB * (1 - FRAGMENTATION_RESERVE) - CONTEXT_RESERVE_BYTES)


def plan_memory(hf: dict, *, world_size: int, tp: int = 1, pp: int = 1, vpp: int | None = None,
                sequence_parallel: bool = False, seq_length: int = 4096, micro_batch_size: int = 1,
                num_microbatches: int = 1, recompute: str = "none", precision: str = "auto", device: str = "gpu",
                gpu_memory_gb: float = 80.0, loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS, cp: int = 1,
                row_tokens: int | None = None) -> dict:
    """The memory plan of a layout: per-position bytes, the limit and whether every position fits (a JSON dict).
    `row_tokens`: a micro-batch row's tokens (default seq_length x micro_batch_size; more with CP padding), of which
    each of the `cp` context-parallel ranks holds row / cp."""
    if world_size % (tp * cp * pp):
        keys = "parallel.tp/parallel.cp/parallel.pp" if cp > 1 else "parallel.tp/parallel.pp"
        raise MegapackError(f"{keys}: world size {world_size} is not divisible by "
                            f"{'tp*cp*pp' if cp > 1 else 'tp*pp'} = {tp * cp * pp}")
    dp = world_size // (tp * cp * pp)
    target = resolve_target(device, precision)
    sp = sequence_parallel and tp > 1
    tokens = row_tokens or seq_length * micro_batch_size
    found = positions(hf, tp, pp, vpp, sp, target.bytes_per_value == 2, cp)
    ranks = [rank_memory(p, hf, tp=tp, pp=pp, dp=dp, vpp=vpp, sp=sp, tokens=tokens, num_microbatches=num_microbatches,
                         recompute=recompute, target=target, loss_chunk_tokens=loss_chunk_tokens, cp=cp)
             for p in found]
    padding = vocab_padding_parameters(hf, tp)
    limit = usable_bytes(gpu_memory_gb)
    worst = max(ranks, key=lambda r: r.total_bytes)
    return {
        "total_parameters": sum(p.unique_parameters for p in found) - padding,
        "vocab_padding_parameters": padding,
        "world_size": world_size, "tp": tp, "cp": cp, "pp": pp, "dp": dp, "vpp": vpp, "sequence_parallel": sp,
        "row_tokens": tokens, "tokens_per_rank": -(-tokens // cp), "seq_length": seq_length, "micro_batch_size": micro_batch_size, "num_microbatches": num_microbatches,
        "recompute": recompute, "loss_chunk_tokens": loss_chunk_tokens, "activation_bytes_per_value": target.bytes_per_value, "device": device,
        "gpu_memory_bytes": int(gpu_memory_gb * GIB), "limit_bytes": limit,
        "ranks": [asdict(r) for r in ranks],
        "worst": {"tp_rank": worst.tp_rank, "pp_rank": worst.pp_rank, "total_bytes": worst.total_bytes},
        "fits": worst.total_bytes <= limit,
    }


def plan_config(config, world_size: int, gpu_memory_gb: float = 80.0, device: str = "gpu") -> dict:
    """`plan_memory` for a RunConfig (its model's config.json, and the shards' meta.json when they exist already;
    no weights)."""
    from megapack.model.config import check_parallel_sizes, load_hf_config
    from megapack.training.preflight.layout_rules import context_parallel_rules, shard_segments_per_pack
    from megapack.training.preflight.plan import batch_layout, planned_seq_length

    hf = load_hf_config(config.model.hf_dir)
    par, tr = config.parallel, config.training
    seq_length = planned_seq_length(config)
    check_parallel_sizes(hf, par.tp, par.pp, seq_length)
    segments, pad_multiple = shard_segments_per_pack(config)
    layout = context_parallel_rules(config, seq_length, world_size, pad_multiple)
    _dp, _gbs, num_micro = batch_layout(config, world_size, seq_length)
    return plan_memory(hf, world_size=world_size, tp=par.tp, pp=par.pp, vpp=par.vpp,
                       sequence_parallel=par.sequence_parallel, seq_length=seq_length,
                       micro_batch_size=tr.micro_batch_size, num_microbatches=num_micro, recompute=tr.recompute,
                       precision=tr.precision, device=device, gpu_memory_gb=gpu_memory_gb,
                       loss_chunk_tokens=config.model.loss_chunk_tokens, cp=par.cp,
                       row_tokens=layout.row_budget(seq_length * tr.micro_batch_size,
                                                    segments * tr.micro_batch_size))
