"""Packed vs padded training steps on one device: megapack's model, DDP and distributed AdamW, as the trainer runs them.

Conversation lengths follow tools/bench/bench_packing.py (lognormal, log-mean ln 700, sigma 1, clipped to
[8, 16384], truncated to the sequence length; scaled by seq_length / 4096 for small dry-run shapes), token ids are
random. The packed arm trains best-fit-decreasing packs, one pack per THD micro-batch (arm `packed_mb2`: two packs
per micro-batch, half as many micro-batches per step, the micro-batch choice); the padded arm trains one
conversation per row, `padded_micro_batch` rows per micro-batch padded to the longest (rounded up to 8), exactly as
`build_batch(padded=True)` gives the trainer. Both arms take `global_batch` sequences (packs or conversations)
per optimizer step. Each arm warms up, times a few steps (synchronised) and extrapolates one epoch of the same
conversations as median step time x steps per epoch. After the packed arm's timed steps, one more packed step
runs under torch.profiler for the per-phase breakdown (tools/gpu/breakdown.py).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megapack.data.packs.packing import assign_packs
from megapack.data.packs.shards import Pack
from megapack.training.run.batch import Batch, build_batch

if TYPE_CHECKING:  # torch is imported where it is used: settings and length helpers stay light
    import torch

BYTES_PER_PARAM = 18  # bf16 parameter + fp32 gradient + fp32 main parameter + two fp32 Adam moments
# Conservative on purpose (an out-of-memory retry costs a worker start): 8 LLaMA-3-8B-shaped layers with 8192-token
# micro-batches peaked at 63.3 GiB allocated on an H200 (46.9 GiB of it parameters and AdamW state); these
# constants predict about 11 GiB more than that.
ACT_BYTES_PER_TOKEN_HIDDEN = 40  # saved activations per token per layer, in units of hidden_size bytes
LOGIT_BYTES = 12  # per token per vocabulary entry: bf16 logits, fp32 copies in the cross entropy, gradient
RESERVE_BYTES = 6 << 30  # CUDA context, allocator slack, workspaces


@dataclass
class BenchSettings:
    """Model shape and workload of the benchmark (defaults: LLaMA-3-8B layers at 4096 tokens)."""

    hidden_size: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    intermediate_size: int = 14336
    vocab_size: int = 128256
    rope_theta: float = 500000.0
    num_layers: int | None = None  # None: as many as fit the free device memory, up to max_layers
    max_layers: int = 8
    seq_length: int = 4096
    conversations: int = 640
    global_batch: int = 8  # sequences per optimizer step: packs (packed) or conversations (padded)
    padded_micro_batch: int = 2  # conversations per padded micro-batch
    warmup_steps: int = 3
    timed_steps: int = 10
    seed: int = 0
    bf16: bool = True


def dry_run_settings() -> BenchSettings:
    """A tiny CPU shape for `gpu_check.sh --dry-run` (hidden 64, 2 layers, 256 tokens, 2 timed steps)."""
    return BenchSettings(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=512,
                         num_layers=2, seq_length=256, conversations=48, warmup_steps=1, timed_steps=2, bf16=False)


def hf_config(s: BenchSettings, layers: int) -> dict:
    """A Hugging Face LLaMA config dict of the benchmark shape (no rope_scaling, like LLaMA-3 8B)."""
    from megapack.model.tiny_checkpoint import tiny_llama_config

    cfg = tiny_llama_config(vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=layers,
                            num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                            intermediate_size=s.intermediate_size, rope_theta=s.rope_theta)
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = "bfloat16" if s.bf16 else "float32"
    return cfg


def conversation_lengths(n: int, seq_length: int, seed: int) -> np.ndarray:
    """n lengths from bench_packing's lognormal, scaled by seq_length / 4096, truncated to seq_length."""
    scale = seq_length / 4096
    rng = np.random.default_rng(seed)
    raw = np.clip(np.exp(rng.normal(np.log(700 * scale), 1.0, n)), 8, 16384 * scale)
    return np.minimum(raw.astype(np.int64), seq_length)


def layer_params(s: BenchSettings) -> int:
    """Parameters of one decoder layer (attention, SwiGLU MLP, two norms)."""
    h, d = s.hidden_size, s.hidden_size // s.num_heads
    return h * s.num_heads * d * 2 + 2 * h * s.num_kv_heads * d + 3 * h * s.intermediate_size + 2 * h


def outer_params(s: BenchSettings) -> int:
    """Embedding, output layer (untied, vocabulary padded to 128) and final norm parameters."""
    vocab = -(-s.vocab_size // 128) * 128
    return 2 * vocab * s.hidden_size + s.hidden_size


def estimate_layers(s: BenchSettings, free_bytes: int) -> tuple[int, str]:
    """How many layers fit `free_bytes` with AdamW state and the largest micro-batch's activations."""
    max_tokens = s.seq_length * max(1, s.padded_micro_batch)
    vocab = -(-s.vocab_size // 128) * 128
    fixed = outer_params(s) * BYTES_PER_PARAM + max_tokens * vocab * LOGIT_BYTES + RESERVE_BYTES
    per_layer = layer_params(s) * BYTES_PER_PARAM + max_tokens * ACT_BYTES_PER_TOKEN_HIDDEN * s.hidden_size
    fit = int((free_bytes - fixed) // per_layer)
    layers = max(1, min(s.max_layers, fit))
    why = (f"free {free_bytes / 2**30:.1f} GiB; {BYTES_PER_PARAM} B/param, {per_layer / 2**30:.2f} GiB per layer incl. "
           f"activations of {max_tokens} tokens, {fixed / 2**30:.1f} GiB embeddings+logits+reserve -> {fit} fit, "
           f"capped at {s.max_layers}")
    return layers, why


def _pack(lengths: list[int], vocab: int, rng: np.random.Generator) -> Pack:
    """A pack of random tokens with unpadded segments of the given lengths, every token trained."""
    total = int(sum(lengths))
    return Pack(tokens=rng.integers(0, vocab, total, dtype=np.int64), loss_mask=np.ones(total, np.uint8),
                real_lengths=np.array(lengths, np.int64), padded_lengths=np.array(lengths, np.int64))


ARMS = ("packed", "packed_mb2", "padded")
PACKS_PER_MICRO_BATCH = {"packed": 1, "packed_mb2": 2}


def arm_steps(s: BenchSettings, lengths: np.ndarray, arm: str) -> list[list[Batch]]:
    """One epoch of the conversations as optimizer steps of micro-batches, for an arm of ARMS."""
    rng = np.random.default_rng(s.seed + 1)
    if arm in PACKS_PER_MICRO_BATCH:
        plan = assign_packs(lengths, s.seq_length, "bfd", seed=s.seed)
        segments = np.split(plan.real_lengths, plan.pack_offsets[1:-1])  # the real lengths of each pack's segments
        packs = [_pack(pack.tolist(), s.vocab_size, rng) for pack in segments]
        k = PACKS_PER_MICRO_BATCH[arm]  # packs per micro-batch: one THD row of up to k x seq_length tokens
        mbs = [build_batch(packs[i : i + k]) for i in range(0, len(packs), k)]
        per_step = max(1, s.global_batch // k)
    elif arm == "padded":
        order = rng.permutation(len(lengths))
        groups = [order[i : i + s.padded_micro_batch] for i in range(0, len(order), s.padded_micro_batch)]
        mbs = [build_batch([_pack([int(lengths[i])], s.vocab_size, rng) for i in g], padded=True)
               for g in groups]
        per_step = max(1, s.global_batch // s.padded_micro_batch)
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return [mbs[i : i + per_step] for i in range(0, len(mbs), per_step)]


class StepRunner:
    """The trainer's model stack for one attention backend (GPTModel, Float16Module in bf16, DDP, distributed AdamW)
    and its optimizer step."""

    def __init__(self, config: dict, backend: str, bf16: bool, max_row: int) -> None:
        from megapack.training.preflight.config import OptimizerConfig
        from megapack.training.run.loop import build_model_and_optimizer

        self.parts = build_model_and_optimizer(config, OptimizerConfig(lr=1e-5), attention_backend=backend,
                                               precision="bf16" if bf16 else "fp32", row_length=max_row,
                                               total_steps=1_000_000)
        self.num_params = sum(p.numel() for p in self.parts.raw_model.parameters())
        self.max_row = max_row

    def step(self, micro_batches: list[Batch], device: torch.device) -> float:
        """One optimizer step over the micro-batches (the trainer's train_step); returns the token-weighted loss."""
        from megapack.training.run.step import train_step

        p = self.parts
        batches = iter([mb.to(device) for mb in micro_batches])
        return train_step(p.model, p.optimizer, p.scheduler, batches, len(micro_batches), self.max_row,
                          device)["loss"]


@dataclass
class ArmResult:
    """Timings of one arm (all rates over the timed steps only)."""

    steps_per_epoch: int
    sequences_per_step: int
    packs_per_micro_batch: int | None
    micro_batches_per_step: int
    warmup_steps: int
    timed_steps: int = 0
    step_times_s: list[float] = field(default_factory=list)
    median_step_s: float | None = None
    mean_step_s: float | None = None
    tokens_per_s: float | None = None  # real (non-padding) tokens
    padding_fraction: float | None = None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    epoch_time_est_s: float | None = None  # median step time x steps per epoch (extrapolated)
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


def time_arm(runner: StepRunner, steps: list[list[Batch]], s: BenchSettings, config: dict, device: torch.device,
             peak_flops: float | None, deadline: float, on_step: Callable[[ArmResult], None],
             arm: str = "packed") -> ArmResult:
    """Warm up, then time steps until timed_steps or the deadline; on_step sees the partial result after each."""
    import torch

    from megapack.model.flops import model_flops

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = ArmResult(steps_per_epoch=len(steps), sequences_per_step=s.global_batch,
                    packs_per_micro_batch=PACKS_PER_MICRO_BATCH.get(arm),
                    micro_batches_per_step=len(steps[0]), warmup_steps=s.warmup_steps)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    real = total = 0
    flops = 0.0
    for i in range(s.warmup_steps + s.timed_steps):
        batch = steps[i % len(steps)]
        if res.step_times_s and time.time() + 2 * max(res.step_times_s) > deadline:
            res.stopped_early = True
            break
        sync()
        t0 = time.perf_counter()
        loss = runner.step(batch, device)
        sync()
        dt = time.perf_counter() - t0
        res.losses.append(loss)
        if i < s.warmup_steps:
            continue
        res.step_times_s.append(dt)
        real += sum(mb.stats["real_tokens"] for mb in batch)
        total += sum(mb.stats["total_tokens"] for mb in batch)
        flops += sum(model_flops(config, mb.stats["real_tokens"], mb.stats["seq_sq_sum"]) for mb in batch)
        res.timed_steps = len(res.step_times_s)
        elapsed = sum(res.step_times_s)
        res.median_step_s = statistics.median(res.step_times_s)
        res.mean_step_s = elapsed / res.timed_steps
        res.tokens_per_s = real / elapsed
        res.padding_fraction = 1.0 - real / max(total, 1)
        res.mfu = flops / (elapsed * peak_flops) if peak_flops else None
        res.epoch_time_est_s = res.median_step_s * res.steps_per_epoch
        if cuda:
            res.peak_memory_bytes = int(torch.cuda.max_memory_allocated())
        on_step(res)
    return res


def arm_dict(res: ArmResult) -> dict:
    """A JSON-ready dict of an arm result."""
    out = asdict(res)
    out["losses_finite"] = all(math.isfinite(x) for x in res.losses)
    return out


def profile_breakdown(runner: StepRunner, steps: list[list[Batch]], res: ArmResult, device: torch.device,
                      deadline: float) -> dict:
    """Where one packed step's time goes (tools/gpu/breakdown.py), unless the arm's deadline is too close."""
    from tools.gpu.breakdown import profile_step

    # the profiled step runs slower (Python tracing) and its events take a while to read: keep a wide margin
    need = 5 * (res.median_step_s or 0.0) + 10.0
    if not res.step_times_s or time.time() + need > deadline:
        return {"error": f"not profiled: {deadline - time.time():.0f} s left of the arm's time, {need:.0f} s needed"}
    batch = steps[len(res.losses) % len(steps)]
    try:
        return profile_step(lambda: runner.step(batch, device), device.type == "cuda")
    except Exception as exc:  # the breakdown is an extra: its failure must not cost the throughput numbers
        return {"error": f"{type(exc).__name__}: " + (str(exc).splitlines() or [""])[0]}


def micro_batch_choice(arms: dict) -> dict:
    """Real tokens/s (and median step) of the packed arm per packs per micro-batch, from the arms measured."""
    out = {}
    for arm, k in PACKS_PER_MICRO_BATCH.items():
        a = arms.get(arm)
        if a:
            out[str(k)] = {"arm": arm, "tokens_per_s": a.get("tokens_per_s"), "median_step_s": a.get("median_step_s"),
                           "micro_batches_per_step": a.get("micro_batches_per_step"),
                           "peak_memory_bytes": a.get("peak_memory_bytes"), "timed_steps": a.get("timed_steps")}
    return out


def run_worker(s: BenchSettings, backend: str, out_path: str | Path, deadline: float) -> dict:
    """Both arms for one backend in this process (one GPU, TP1/PP1); out_path is rewritten after every timed step."""
    import resource

    import torch

    from megapack.atomic import write_json_atomic
    from megapack.training.run.distributed import destroy_distributed, init_distributed
    from megapack.model.flops import device_peak_flops

    env = init_distributed(tp=1, pp=1, seed=s.seed)
    cuda = env.device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    result: dict = {"backend": backend, "device": name, "peak_flops": device_peak_flops(name) if cuda else None,
                    "settings": asdict(s), "arms": {}}

    def save() -> None:
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_json_atomic(out_path, result)

    layers, why = s.num_layers, "given"
    if layers is None:
        layers, why = estimate_layers(s, torch.cuda.mem_get_info()[0] if cuda else 0)
    lengths = conversation_lengths(s.conversations, s.seq_length, s.seed)
    result.update(layers=layers, layers_reason=why, conversations=len(lengths), epoch_real_tokens=int(lengths.sum()))
    config = hf_config(s, layers)
    save()
    try:
        runner = StepRunner(config, backend, s.bf16, s.seq_length * max(1, s.padded_micro_batch))
        result["params"] = runner.num_params
        for k, arm in enumerate(ARMS):
            steps = arm_steps(s, lengths, arm)
            arm_deadline = time.time() + (deadline - time.time()) / (len(ARMS) - k)

            def on_step(res: ArmResult, arm: str = arm) -> None:
                result["arms"][arm] = arm_dict(res)
                save()

            res = time_arm(runner, steps, s, config, env.device, result["peak_flops"], arm_deadline, on_step, arm)
            on_step(res)
            if arm == "packed":
                result["breakdown"] = profile_breakdown(runner, steps, res, env.device, arm_deadline)
                save()
        result["micro_batch_choice"] = micro_batch_choice(result["arms"])
    except torch.cuda.OutOfMemoryError as exc:
        result["oom"] = True
        result["error"] = "out of memory: " + str(exc).splitlines()[0]
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: " + (str(exc).splitlines() or [""])[0]
        raise
    finally:
        save()
        destroy_distributed()
    return result
