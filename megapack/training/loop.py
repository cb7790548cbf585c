"""The training job: pre-flight checks, distributed setup, the step loop, validation, checkpoints, summary."""
from __future__ import annotations

import math
import signal
import time
import warnings
from functools import partial
from pathlib import Path

from megapack.atomic import write_json_atomic
from megapack.errors import MegapackError
from megapack.training.checkpointing import CheckpointSaver
from megapack.training.config import TrainConfig, preflight, save_resolved_config, tokenizer_identity
from megapack.training.data import STAT_KEYS, TrainSampler, micro_batch_iterator, validation_batches
from megapack.training.metrics import (
    MetricsWriter, device_peak_flops, format_table, model_flops, summary,
)


class _StopFlag:
    """SIGTERM / SIGUSR1 (Slurm preemption, time limit) set a flag; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.signal = signum


def _forward_step(data_iterator, model, *, stats_sink: list):
    """One micro-batch forward; returns per-token losses and the loss function the schedule calls on them."""
    from megatron.core.packed_seq_params import PackedSeqParams

    batch = next(data_iterator)
    stats_sink.append(batch["stats"])
    cu, m = batch["cu_seqlens"], batch["max_seqlen"]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m, max_seqlen_kv=m)
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
        packed_seq_params=params,
    )
    return output, partial(_loss_func, batch["loss_weight"], batch["num_targets"])


def _loss_func(weight, num_targets: int, losses):
    """(sum of weighted token losses, denominator, report): megatron divides by the global denominator."""
    import torch

    loss = (losses.float().reshape(-1) * weight.reshape(-1)).sum()
    count = torch.tensor(num_targets, dtype=torch.int, device=loss.device)
    return loss, count, {"lm loss": torch.stack([loss.detach(), count.to(loss.dtype)])}


def _reduce_loss(outputs: list, device) -> tuple[float, float]:
    """(loss sum, denominator) over all micro-batches and DP ranks, available on every rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in outputs:
        total += item["lm loss"].to(torch.float64)
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())  # only the last stage is non-zero
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total[0]), float(total[1])


def _reduce_stats(stats: list[dict], device) -> dict[str, int]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t = torch.tensor([sum(s[k] for s in stats) for k in STAT_KEYS], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return {k: int(v) for k, v in zip(STAT_KEYS, t.tolist())}


def quiet_warnings() -> None:
    """Silence the known, harmless warnings megatron-core and torch print on every rank at every step."""
    for pattern in (".*Apex is not installed.*", ".*CUDA_DEVICE_MAX_CONNECTIONS.*", ".*full scope is deprecated.*",
                    ".*is deprecated. Please use `torch.distributed.*", ".*non-leaf Tensor.*"):
        warnings.filterwarnings("ignore", message=pattern)


class Trainer:
    """State of one run; `run()` is the loop."""

    def __init__(self, config: TrainConfig, world_size: int | None = None) -> None:
        quiet_warnings()
        self.config = config
        self.layout, self.shard_meta, self.hf_config, self.resume_from = preflight(config, world_size)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        import torch
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megapack.data.shards import ShardDataset
        from megapack.model.builder import build_model
        from megapack.training.distributed import init_distributed
        from megapack.training.optim import build_optimizer, build_scheduler, wrap_ddp

        cfg, lay = self.config, self.layout
        self.env = init_distributed(tp=lay.tp, pp=lay.pp, seed=cfg.training.seed)
        self.device = self.env.device
        self.is_logger = self.env.rank == 0
        self.bf16 = cfg.training.precision == "bf16" or (cfg.training.precision == "auto" and torch.cuda.is_available())

        self.train_ds = ShardDataset(cfg.data.path, split=cfg.data.train_split)
        self.valid_ds = None
        if cfg.data.valid_split:
            valid_path = cfg.data.valid_path or cfg.data.path
            try:
                self.valid_ds = ShardDataset(valid_path, split=cfg.data.valid_split)
            except MegapackError as exc:
                self._log(f"no validation: {exc}")
        if cfg.training.train_steps is not None:
            self.total_steps = cfg.training.train_steps
        else:
            samples = (cfg.training.epochs or 1.0) * len(self.train_ds)
            self.total_steps = max(1, math.ceil(samples / lay.global_batch_size))

        # THD micro-batches differ in length, so pipeline p2p sends shapes first (megatron refuses that flag with
        # its default MoE dispatcher, which a dense model never uses)
        varlen = {"variable_seq_lengths": True, "moe_token_dispatcher_type": "alltoall"} if lay.pp > 1 else {}
        model = build_model(
            self.hf_config,
            attention_backend=cfg.model.attention_backend,
            cross_sample_attention=cfg.model.cross_sample_attention,
            bf16=self.bf16,
            sequence_parallel=cfg.parallel.sequence_parallel,
            seq_length=lay.seq_length * lay.micro_batch_size,
            calculate_per_token_loss=True,
            **varlen,
        )
        self.raw_model = model
        if self.resume_from is None:
            self._init_weights(model)
        if self.bf16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model.config, model)
        self.model = wrap_ddp(model, self.bf16)
        self.optimizer = build_optimizer(cfg.optimizer, [self.model], self.bf16)
        self.scheduler = build_scheduler(cfg.optimizer, self.optimizer, self.total_steps)
        from megatron.core.distributed import finalize_model_grads

        mc = model.config
        mc.finalize_model_grads_func = finalize_model_grads
        mc.no_sync_func = self.model.no_sync
        mc.grad_scale_func = self.optimizer.scale_loss
        self.fb_func = get_forward_backward_func()

        self.dp_rank = ps.get_data_parallel_rank()
        self.tp_src = ps.get_tensor_model_parallel_src_rank()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.is_tp_src = ps.get_tensor_model_parallel_rank() == 0
        self.iteration, consumed, self.totals = 0, 0, dict.fromkeys(("train_time_s", *STAT_KEYS), 0)
        if self.resume_from is not None:
            from megapack.training.checkpointing import load_checkpoint

            state = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler)
            self.iteration, consumed = int(state["iteration"]), int(state["consumed_samples"])
            self.totals.update(state.get("totals", {}))
            self._log(f"resumed from {self.resume_from} at step {self.iteration}")
        self.sampler = TrainSampler(len(self.train_ds), lay.global_batch_size, lay.micro_batch_size, self.dp_rank,
                                    lay.dp, cfg.training.seed, consumed)
        self.padded = self.shard_meta.get("packing") == "padding"
        self.pad_multiple = 8  # the padding arm rounds each micro-batch to the longest conversation, up to 8
        self.peak = cfg.logging.peak_flops or device_peak_flops(
            torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        log_dir = cfg.logging.dir or cfg.checkpoint.dir
        self.writer = MetricsWriter(log_dir if self.is_logger else None, cfg.logging.tensorboard)
        self.log_dir = Path(log_dir) if log_dir else None
        ck = cfg.checkpoint
        async_save = torch.cuda.is_available() if ck.async_save == "auto" else ck.async_save
        self.saver = CheckpointSaver(ck.dir, keep_last=ck.keep_last, async_save=async_save,
                                     optimizer_sharding=ck.optimizer_sharding) if ck.dir else None
        if self.is_logger and cfg.checkpoint.dir:
            save_resolved_config(cfg, cfg.checkpoint.dir, extra=dict(self.layout.model_dump(),
                                                                     total_steps=self.total_steps))

    def _init_weights(self, model) -> None:
        init = self.config.model.init
        if init == "hf":
            from megapack.model.hf_import import load_hf_weights

            load_hf_weights(model, self.config.model.hf_dir)
        elif init == "megatron":
            from megapack.model.checkpoint import load_model_checkpoint

            load_model_checkpoint(model, self.config.model.megatron_checkpoint)

    def _log(self, text: str) -> None:
        if getattr(self, "is_logger", True):
            print(text, flush=True)

    def _batches(self, dataset, index_lists):
        return micro_batch_iterator(
            dataset, index_lists, padded=self.padded, reduction=self.config.training.loss_reduction,
            pad_multiple=self.pad_multiple, pad_id=self.shard_meta.get("pad_id"), is_src=self.is_tp_src,
            src=self.tp_src, group=self.tp_group,
            device=self.device, row_multiple=self.layout.tp if self.config.parallel.sequence_parallel else 1,
        )

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns the step's metrics (same on every rank)."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        index_lists = self.sampler.next_step()
        stats: list[dict] = []
        outputs = self.fb_func(
            forward_step_func=partial(_forward_step, stats_sink=stats),
            data_iterator=self._batches(self.train_ds, index_lists),
            model=[self.model],
            num_microbatches=len(index_lists),
            seq_length=self.layout.seq_length * self.layout.micro_batch_size,
            micro_batch_size=1,
            forward_only=False,
        )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        loss_sum, count = _reduce_loss(outputs, self.device)
        record = {"loss": loss_sum / max(count, 1.0), "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "lr": lr, "skipped": not ok}
        return record | _reduce_stats(stats, self.device)

    def evaluate(self) -> float | None:
        """Token-weighted (or sample-weighted) loss over the validation split."""
        import torch

        if self.valid_ds is None or len(self.valid_ds) == 0:
            return None
        index_lists = validation_batches(len(self.valid_ds), self.layout.micro_batch_size, self.dp_rank,
                                         self.layout.dp, self.config.training.eval_max_batches)
        self.model.eval()
        with torch.no_grad():
            outputs = self.fb_func(
                forward_step_func=partial(_forward_step, stats_sink=[]),
                data_iterator=self._batches(self.valid_ds, index_lists),
                model=[self.model],
                num_microbatches=len(index_lists),
                seq_length=self.layout.seq_length * self.layout.micro_batch_size,
                micro_batch_size=1,
                forward_only=True,
            )
        self.model.train()
        loss_sum, count = _reduce_loss(outputs, self.device)
        return loss_sum / max(count, 1.0)

    def save(self, wait: bool = False) -> None:
        """Checkpoint now (collective); with async saves, `wait` blocks until it is written and published."""
        if self.saver is None:
            return
        t0 = time.perf_counter()
        meta = {"hf_config": self.hf_config, "tokenizer_identity": tokenizer_identity(self.shard_meta),
                "layout": self.layout.model_dump()}
        state = {"consumed_samples": self.sampler.consumed_samples, "totals": dict(self.totals)}
        self.saver.save(self.iteration, self.model, self.optimizer, self.scheduler, state, meta=meta)
        self._log(f"checkpoint of step {self.iteration}: training blocked {time.perf_counter() - t0:.2f} s")
        self._log_saved(self.saver.wait() if wait or not self.saver.is_async else [])

    def _log_saved(self, paths: list[Path]) -> None:
        for path in paths:
            self._log(f"saved checkpoint {path} (published after step {self.iteration})")

    # ------------------------------------------------------------------ loop
    def run(self, keep_process_group: bool = False) -> dict:
        """Train to the configured number of steps (or until SIGTERM/SIGUSR1); returns the run summary.

        keep_process_group leaves torch.distributed up (several runs in one launch, e.g. tests).
        """
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state

        from megapack.training.distributed import destroy_distributed

        self._setup()
        stop = _StopFlag()
        cfg = self.config
        last_loss, valid_loss, interrupted = None, None, False
        self._log(f"training {self.total_steps} steps on {cfg.data.path}: {self.layout.model_dump()}")
        try:
            while self.iteration < self.total_steps:
                t0 = time.perf_counter()
                rec = self.train_step()
                # slowest rank's step time; the same all-reduce tells every rank whether any got a stop signal
                sync = torch.tensor([time.perf_counter() - t0, float(stop.signal or 0)], dtype=torch.float64,
                                    device=self.device)
                dist.all_reduce(sync, op=dist.ReduceOp.MAX)
                dt, stop.signal = float(sync[0]), int(sync[1]) or None
                self.iteration += 1
                if self.saver is not None:
                    self._log_saved(self.saver.poll())
                last_loss = rec["loss"]
                self.totals["train_time_s"] += dt
                for k in STAT_KEYS:
                    self.totals[k] += rec[k]
                rec |= self._throughput(rec, dt)
                if self.iteration % cfg.logging.interval == 0 or self.iteration == self.total_steps:
                    self._emit(rec)
                if cfg.training.eval_interval and self.iteration % cfg.training.eval_interval == 0 \
                        and self.iteration < self.total_steps:
                    valid_loss = self._validate()
                if stop.signal and self.iteration < self.total_steps:
                    self._log(f"signal {stop.signal}: checkpointing at step {self.iteration} and exiting")
                    self.save(wait=True)
                    interrupted = True
                    break
                ck = cfg.checkpoint
                if ck.save_interval and self.iteration % ck.save_interval == 0 and self.iteration < self.total_steps:
                    self.save()
            if not interrupted:
                valid_loss = self._validate()
                self.save(wait=True)
                if cfg.checkpoint.export_hf:
                    from megapack.model.hf_export import export_hf

                    export_hf(self.raw_model, self.hf_config, cfg.checkpoint.export_hf, tokenizer_dir=cfg.model.hf_dir)
            result = self._summary(last_loss, valid_loss, interrupted)
            if self.saver is not None:
                self.saver.close()
        finally:
            self.writer.close()
            if keep_process_group:
                parallel_state.destroy_model_parallel()
            else:
                destroy_distributed()
        return result

    def _throughput(self, rec: dict, dt: float) -> dict:
        out = {
            "step_time_s": dt,
            "tokens_per_s": rec["real_tokens"] / dt,
            "trained_tokens_per_s": rec["target_tokens"] / dt,
            "conversations_per_s": rec["conversations"] / dt,
            "packs_per_s": rec["packs"] / dt,
            "padding_fraction": 1.0 - rec["real_tokens"] / max(rec["total_tokens"], 1),
            "epoch": self.sampler.epoch,
        }
        if self.peak:
            flops = model_flops(self.hf_config, rec["real_tokens"], rec["seq_sq_sum"])
            out["mfu"] = flops / (dt * self.env.world_size * self.peak)
        return out

    def _emit(self, rec: dict) -> None:
        rec = {"kind": "train", "step": self.iteration} | {k: v for k, v in rec.items() if k != "seq_sq_sum"}
        self.writer.write(rec)
        mfu = f" mfu {rec['mfu']:.3f}" if "mfu" in rec else ""
        gn = f"{rec['grad_norm']:.3f}" if rec["grad_norm"] is not None else "-"
        self._log(
            f"step {self.iteration}/{self.total_steps} loss {rec['loss']:.6f} lr {rec['lr']:.3e} grad_norm {gn} "
            f"conv {rec['conversations']} tok/s {rec['tokens_per_s']:.0f} conv/s {rec['conversations_per_s']:.2f} "
            f"packs/s {rec['packs_per_s']:.2f} pad {rec['padding_fraction']:.3f}{mfu}"
        )

    def _validate(self) -> float | None:
        loss = self.evaluate()
        if loss is not None:
            self.writer.write({"kind": "valid", "step": self.iteration, "valid_loss": loss})
            self._log(f"step {self.iteration} validation loss {loss:.6f}")
        return loss

    def _summary(self, last_loss, valid_loss, interrupted: bool) -> dict:
        t = self.totals
        result = summary(
            epochs=self.sampler.epoch, steps=self.iteration, train_time_s=t["train_time_s"], packs=t["packs"],
            conversations=t["conversations"], tokens=t["real_tokens"], target_tokens=t["target_tokens"],
            final_loss=last_loss, final_valid_loss=valid_loss, packing=self.layout.packing,
        )
        result["interrupted"] = interrupted
        if self.is_logger:
            print(format_table([result]), flush=True)
            if self.log_dir is not None:
                write_json_atomic(self.log_dir / "summary.json", result)
        return result


def train(config: TrainConfig) -> dict:
    """Run a training job described by config (inside torchrun/srun, or as a single process)."""
    return Trainer(config).run()
