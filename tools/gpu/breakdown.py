"""Where one training step's time goes: torch.profiler over one step, self time of every event put in a phase.

Attribution: the profiler runs with CPU activity (plus CUDA activity on a GPU) and `with_stack=True`, which puts
each Python frame in the event tree above the ops it runs. An event's phase is that of its innermost enclosing frame
that names a component (PHASE_RULES: megatron's MLP, megapack's core attention, megatron's self-attention for the
QKV/output projections, norms and RoPE, the loss and output layer, the optimizer). A backward op runs under the
autograd engine's `evaluate_function: XBackward0` node, which carries the sequence number of the forward op that
made it: the backward node takes that forward op's phase (a Python autograd Function's backward, like the chunked
loss's, also has its own frames). A collective (c10d / NCCL / gloo) outside the model is DP communication; inside
the model (the loss's TP reductions) it stays with its component. What no rule claims is "other".
Shares are of the profiled step: on the CPU each phase's self CPU time over max(wall time, all self time), "other"
taking the rest (unattributed ops, Python overhead); on a GPU the same with each event's self device time (kernels
it launched), "other" then also holding device idle time. The profiler's Python tracing slows the CPU side, so
CPU-side shares (and GPU idle time) are upper bounds for the un-profiled step.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable

PHASES = ("attention", "attention_proj", "mlp", "norms_rope_elementwise", "loss", "optimizer", "dp_comm", "other")
PHASE_LABELS = {
    "attention": "attention (core attention kernels)",
    "attention_proj": "attention QKV / output projections",
    "mlp": "MLP (fc1, fc2, SwiGLU)",
    "norms_rope_elementwise": "norms, RoPE, residual / elementwise",
    "loss": "output layer + loss",
    "optimizer": "optimizer step",
    "dp_comm": "DP communication",
    "other": "other (embedding, schedule, Python, idle)",
}
# (substring of a Python frame's name, phase); the innermost frame that matches any rule decides
PHASE_RULES: tuple[tuple[str, str], ...] = (
    ("megapack/model/attention.py", "attention"),
    ("megatron/core/transformer/dot_product_attention.py", "attention"),
    ("transformer_engine/pytorch/attention", "attention"),
    ("flash_attn/", "attention"),
    ("megapack/model/chunked_loss.py", "loss"),
    ("megatron/core/tensor_parallel/cross_entropy.py", "loss"),
    ("megatron/core/fusions/fused_cross_entropy.py", "loss"),
    ("_postprocess", "loss"),  # megatron's GPTModel._postprocess (output layer) and megapack's override
    ("megapack/training/run/step.py(", "other"),  # loss_func / reduce_loss: step-level, not the model's loss
    ("megatron/core/models/common/embeddings/rope_utils.py", "norms_rope_elementwise"),
    ("megatron/core/models/common/embeddings/rotary_pos_embedding.py", "norms_rope_elementwise"),
    ("megatron/core/transformer/mlp.py", "mlp"),
    ("megatron/core/fusions/fused_bias_swiglu.py", "mlp"),
    ("megatron/core/transformer/attention.py", "attention_proj"),
    ("torch/nn/modules/normalization.py", "norms_rope_elementwise"),
    ("megatron/core/transformer/torch_norm.py", "norms_rope_elementwise"),
    ("megatron/core/fusions/fused_layer_norm.py", "norms_rope_elementwise"),
    ("megatron/core/fusions/fused_bias_dropout.py", "norms_rope_elementwise"),
    ("megatron/core/transformer/transformer_layer.py", "norms_rope_elementwise"),  # residual adds, bias-dropout
    ("megatron/core/optimizer/", "optimizer"),
    ("megatron/core/optimizer_param_scheduler.py", "optimizer"),
    ("torch/optim/", "optimizer"),
    ("Optimizer.step#", "optimizer"),
)
COLLECTIVE = re.compile(r"all_?reduce|reduce_?scatter|all_?gather|broadcast|nccl|gloo|c10d::|record_param_comms|"
                        r"torch/distributed/distributed_c10d\.py", re.I)
BACKWARD_NODE = "autograd::engine::evaluate_function: "
MODEL_PHASES = ("attention", "attention_proj", "mlp", "norms_rope_elementwise", "loss")


def _rule(name: str) -> str | None:
    """The phase a frame or op name claims on its own, if any."""
    for needle, phase in PHASE_RULES:
        if needle in name:
            return phase
    return None


def attribute(events: list) -> list[str | None]:
    """The phase of each profiler event (None: no rule claims it), by innermost frame or its forward op."""
    index = {id(e): i for i, e in enumerate(events)}
    parent = [index.get(id(e.cpu_parent)) if e.cpu_parent is not None else None for e in events]
    # (thread, sequence number) -> the forward op that made the autograd node: ops record the number the next node
    # will get, so the last op (by start time) carrying it is the one that made it
    backward = _under_backward(events, parent)
    forward: dict[tuple[int, int], int] = {}
    for i, e in enumerate(events):
        if e.sequence_nr >= 0 and not backward[i]:
            for key in ((e.thread, e.sequence_nr), (-1, e.sequence_nr)):  # (-1, n): any thread, if ids disagree
                j = forward.get(key)
                if j is None or e.time_range.start >= events[j].time_range.start:
                    forward[key] = i
    memo: dict[int, str | None] = {}

    def own(i: int) -> str | None:
        """What the event's own name (or, for a backward node, its forward op) says."""
        e = events[i]
        if e.name.startswith(BACKWARD_NODE) and e.sequence_nr >= 0:
            j = forward.get((getattr(e, "fwd_thread", e.thread), e.sequence_nr), forward.get((-1, e.sequence_nr)))
            return component(j) if j is not None else _rule(e.name)
        return _rule(e.name)

    def component(i: int | None) -> str | None:
        """The phase of the innermost event at or above i that claims one (memoised along the way)."""
        chain, found = [], None
        while i is not None:
            if i in memo:
                found = memo[i]
                break
            chain.append(i)
            found = own(i)
            if found is not None:
                break
            i = parent[i]
        for k in chain:
            memo[k] = found
        return found

    phases: list[str | None] = []
    collective_memo: dict[int, bool] = {}
    for i in range(len(events)):
        phase = component(i)
        if phase not in MODEL_PHASES and _collective(i, events, parent, collective_memo):
            phase = "dp_comm"
        phases.append(phase)
    return phases


def _under_backward(events: list, parent: list) -> list[bool]:
    """Whether each event is an autograd-engine node or runs inside one."""
    flags: list[bool | None] = [None] * len(events)
    for i in range(len(events)):
        chain, k, found = [], i, False
        while k is not None:
            if flags[k] is not None:
                found = bool(flags[k])
                break
            chain.append(k)
            if events[k].name.startswith(BACKWARD_NODE):
                found = True
                break
            k = parent[k]
        for c in chain:
            flags[c] = found
    return [bool(f) for f in flags]


def _collective(i: int | None, events: list, parent: list, memo: dict[int, bool]) -> bool:
    """Whether the event is, or runs inside, a collective (by op or frame name)."""
    chain = []
    found = False
    while i is not None:
        if i in memo:
            found = memo[i]
            break
        chain.append(i)
        if COLLECTIVE.search(events[i].name):
            found = True
            break
        i = parent[i]
    for k in chain:
        memo[k] = found
    return found


def shares(events: list, phases: list[str | None], wall_us: float, device: bool) -> dict:
    """Per-phase time (ms) and share of the step; 'other' takes what no phase claims, so the shares sum to 100%."""
    totals = dict.fromkeys(PHASES, 0.0)
    for e, phase in zip(events, phases):
        t = (getattr(e, "self_device_time_total", 0) or 0) if device else e.self_cpu_time_total
        totals[phase if phase in totals else "other"] += max(float(t), 0.0)
    claimed = sum(v for k, v in totals.items() if k != "other")
    busy = claimed + totals["other"]
    basis = max(float(wall_us), busy)
    totals["other"] = basis - claimed
    return {"basis": "device" if device else "cpu", "step_ms": basis / 1000.0,
            "busy_ms": busy / 1000.0, "phase_ms": {k: v / 1000.0 for k, v in totals.items()},
            "phase_pct": {k: 100.0 * v / basis if basis else 0.0 for k, v in totals.items()}}


def profile_step(step: Callable[[], object], cuda: bool) -> dict:
    """Run `step` once under torch.profiler and return the breakdown: CPU always, device time too with CUDA."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities, with_stack=True) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    t1 = time.perf_counter()
    events = list(prof.events())
    phases = attribute(events)
    out = {"wall_ms": wall_us / 1000.0, "events": len(events), "cpu": shares(events, phases, wall_us, False),
           "phases": list(PHASES), "labels": PHASE_LABELS}
    if cuda:
        out["device"] = shares(events, phases, wall_us, True)
    out["primary"] = "device" if cuda else "cpu"
    out["analysis_s"] = round(time.perf_counter() - t1, 2)
    return out


def breakdown_table(bd: dict) -> list[str]:
    """Markdown rows of a breakdown: one per phase, its time and share (device and CPU columns on a GPU)."""
    cols = [k for k in ("device", "cpu") if k in bd]
    header = ["phase"] + [f"{k} ms" for k in cols] + [f"{k} %" for k in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for phase in bd.get("phases", PHASES):
        ms = [f"{bd[k]['phase_ms'][phase]:.2f}" for k in cols]
        pct = [f"{bd[k]['phase_pct'][phase]:.1f}" for k in cols]
        lines.append("| " + " | ".join([PHASE_LABELS.get(phase, phase), *ms, *pct]) + " |")
    total = [f"{bd[k]['step_ms']:.2f}" for k in cols] + [f"{sum(bd[k]['phase_pct'].values()):.1f}" for k in cols]
    lines.append("| " + " | ".join(["profiled step", *total]) + " |")
    return lines
