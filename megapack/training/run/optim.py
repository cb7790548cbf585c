"""DDP wrapping, megatron's distributed AdamW, the warmup + decay learning-rate schedule, and the resume rule: the
config in force is what runs from the resumed step on."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from megapack.training.preflight.config import OptimizerConfig


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    """Warmup length in steps from `warmup_steps` or `warmup_ratio` (0 when neither is set)."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    if cfg.warmup_ratio is not None:
        return int(round(cfg.warmup_ratio * total_steps))
    return 0


def wrap_ddp(model, disable_bucketing: bool = False):
    """Wrap this rank's model (chunk) in megatron's DistributedDataParallel with buffers for the distributed optimizer
    (`disable_bucketing` for the second and later virtual-pipeline chunks, as Megatron-LM does)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=False,
        average_in_collective=False,  # required by calculate_per_token_loss: we divide by the global token count
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                   disable_bucketing=disable_bucketing)


def build_optimizer(cfg: OptimizerConfig, model_chunks: list, bf16: bool):
    """AdamW over the DDP-wrapped chunks via `get_megatron_optimizer` with the distributed optimizer."""
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam",  # megatron's Adam decouples weight decay (AdamW)
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        adam_eps=cfg.eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=True,
        barrier_with_L1_time=False,
    )
    return get_megatron_optimizer(opt_config, model_chunks)


def build_scheduler(cfg: OptimizerConfig, optimizer, total_steps: int):
    """megatron's OptimizerParamScheduler counted in optimizer steps: linear warmup, then decay to min_lr.

    With W warmup steps, step k (1-based) uses lr * k / (W + 1) up to step W + 1, which uses the full rate: the
    first step already trains (a warmup from 0 would waste it: a 2-step run would train once).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warm = warmup_steps(cfg, total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=cfg.lr / (warm + 1) if warm else 0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warm,
        lr_decay_steps=max(total_steps, warm + 1),
        lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,  # the config wins over a checkpoint, except the step count
    )


@contextmanager
def config_hyperparameters_kept(optimizer, scheduler) -> Iterator[None]:
    """Around a checkpoint load: the param groups keep the hyperparameters built from the config in force (max_lr,
    min_lr, betas, eps, weight decay), which `optimizer.load_state_dict` brings back from the checkpoint; the
    scheduler then sets lr and weight decay of the restored step from them."""
    built = [{k: v for k, v in group.items() if k not in ("params", "step")} for group in optimizer.param_groups]
    yield
    groups = optimizer.param_groups
    assert len(groups) == len(built), "the checkpoint's optimizer has other parameter groups"
    for group, values in zip(groups, built):
        group.update(values)
    scheduler.step(increment=0)


def scheduled_lr(cfg: OptimizerConfig, total_steps: int, step: int) -> float:
    """The lr step `step` (1-based) uses under `build_scheduler(cfg, ..., total_steps)`."""
    stand_in = SimpleNamespace(param_groups=[{}])
    build_scheduler(cfg, stand_in, total_steps).step(increment=step - 1)
    return stand_in.param_groups[0]["lr"]


def resume_note(changes: dict[str, list], cfg: OptimizerConfig, resume_step: int, total_steps: int) -> str | None:
    """One line: what a resumed run changes (plan.resume_changes), from which step, and what it does to the lr."""
    if not changes:
        return None
    step = resume_step + 1
    said = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
    line = f"resume: {said} {'applies' if len(changes) == 1 else 'apply'} from step {step}"
    old_total = next((old for key, (old, _) in changes.items() if not key.startswith("optimizer.")), total_steps)
    reverted = {key.removeprefix("optimizer."): old for key, (old, _) in changes.items()
                if key.startswith("optimizer.")}
    try:
        saved = OptimizerConfig.model_validate(cfg.model_dump() | reverted)
    except ValueError:  # a saved setting this version no longer accepts: no lr comparison
        return line
    before, after = scheduled_lr(saved, old_total, step), scheduled_lr(cfg, total_steps, step)
    replanned = f"its decay re-planned over {total_steps} steps" if old_total != total_steps else ""
    if math.isclose(before, after, rel_tol=1e-9, abs_tol=0.0):
        return f"{line}{'; the schedule has ' + replanned if replanned else ''}; lr at step {step} stays {after:.3g}"
    return (f"{line}; the schedule is recomputed with the new values{', ' + replanned if replanned else ''}: lr at "
            f"step {step} {before:.3g} -> {after:.3g} (a jump: the saved schedule is not continued)")
