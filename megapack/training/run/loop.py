"""The training job: built from its run plan in small pieces, then one loop that reads top to bottom.

    plan = preflight(config)            # every check and every `auto`, before any process group
    trainer = Trainer(config, plan)     # distributed init, model + optimizer, resume, data, checkpoints, metrics
    trainer.run()                       # the loop; close() in `finally`
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from megapack.model.config import DEFAULT_LOSS_CHUNK_TOKENS
from megapack.quiet import quiet_warnings
from megapack.training.preflight.config import OptimizerConfig, RunConfig
from megapack.training.run.sources import open_source
from megapack.training.preflight.plan import RunPlan, preflight, resolved_config, save_resolved_config
from megapack.training.run.signals import install_stop_handlers, received, reset_stop_signals

class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm preemption, time limit) are recorded (megapack.training.run.signals); the loop checkpoints
    at the next step boundary, the same on every rank (`agree`)."""

    def __init__(self) -> None:
        install_stop_handlers()
        self.signal: int | None = None  # agreed by all ranks

    def agree(self, device) -> int | None:
        """Collective: the stop signal any rank has received so far (every rank gets the same answer)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(received() or 0)], dtype=torch.float64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signal = int(flag.item()) or None
        return self.signal


@dataclass
class ModelParts:
    """This rank's model chunk (wrapped for DDP and precision), the bare GPTModel, optimizer and LR schedule. With
    virtual pipeline stages (parallel.vpp > 1) `model` and `raw_model` are lists, one chunk per virtual stage
    (megatron's convention; `megapack.model.builder.as_chunks` gives a list either way)."""

    model: object
    raw_model: object
    optimizer: object
    scheduler: object


def build_model_and_optimizer(hf_config: dict, optimizer: OptimizerConfig, *, attention_backend: str,
                              precision: str, row_length: int, total_steps: int, pp: int = 1,
                              sequence_parallel: bool = False, cross_sample_attention: bool = False,
                              recompute: str = "none", init_weights: Callable | None = None,
                              vpp: int = 1, loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS) -> ModelParts:
    """The GPTModel of this pipeline stage (initial weights from `init_weights`), DDP, distributed AdamW and the LR
    schedule; `row_length` is the longest THD row of a micro-batch. `vpp` > 1 builds one chunk per virtual stage
    (interleaved 1F1B), each with its own DDP, one optimizer over all of them."""
    from megatron.core.distributed import finalize_model_grads

    from megapack.model.builder import build_model
    from megapack.training.run.optim import build_optimizer, build_scheduler, wrap_ddp

    bf16 = precision == "bf16"
    # THD micro-batches differ in length, so pipeline p2p sends shapes first (megatron refuses that flag with
    # its default MoE dispatcher, which a dense model never uses)
    varlen = {"variable_seq_lengths": True, "moe_token_dispatcher_type": "alltoall"} if pp > 1 and vpp == 1 else {}
    if vpp > 1:
        # interleaving sends both ways between the same two ranks at PP=2, where megatron's shape exchange for
        # variable lengths mixes the two up: rows are padded to row_length (plan.row_multiple) and the p2p path
        # is megatron's unbatched one, which orders the two directions (as Megatron-LM runs interleaving)
        varlen = {"virtual_pipeline_model_parallel_size": vpp, "batch_p2p_comm": False}
    raws, models = [], []
    for stage in range(vpp) if vpp > 1 else [None]:
        raw = build_model(hf_config, attention_backend=attention_backend, cross_sample_attention=cross_sample_attention,
                          bf16=bf16, sequence_parallel=sequence_parallel, seq_length=row_length, recompute=recompute,
                          calculate_per_token_loss=True, vp_stage=stage, loss_chunk_tokens=loss_chunk_tokens, **varlen)
        if init_weights is not None:
            init_weights(raw)
        model = raw
        if bf16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(raw.config, raw)
        raws.append(raw)
        models.append(wrap_ddp(model, disable_bucketing=len(models) > 0))
    opt = build_optimizer(optimizer, models, bf16)
    scheduler = build_scheduler(optimizer, opt, total_steps)
    for raw in raws:
        raw.config.finalize_model_grads_func = finalize_model_grads
        raw.config.no_sync_func = [m.no_sync for m in models] if vpp > 1 else models[0].no_sync
        raw.config.grad_scale_func = opt.scale_loss
    if vpp > 1:
        return ModelParts(models, raws, opt, scheduler)
    return ModelParts(models[0], raws[0], opt, scheduler)


def load_initial_weights(model, config: RunConfig) -> None:
    """Load the starting weights `model.init` names (HF safetensors or a megatron checkpoint; random: as built)."""
    if config.model.init == "hf":
        from megapack.model.hf_import import load_hf_weights

        load_hf_weights(model, config.model.hf_dir)
    elif config.model.init == "megatron":
        from megapack.model.checkpoint import load_model_checkpoint

        load_model_checkpoint(model, config.model.megatron_checkpoint)


class Trainer:
    """One run, constructed from its plan; `run()` trains to the end (or a stop signal) and returns the summary."""

    def __init__(self, config: RunConfig, plan: RunPlan | None = None) -> None:
        from megapack.training.run.distributed import init_distributed
        from megapack.training.run.runlock import lock_run_dirs, release

        quiet_warnings()
        self.config = config
        self.plan = plan = plan or preflight(config)
        self.env = init_distributed(tp=plan.tp, pp=plan.pp, seed=config.training.seed, vpp=config.parallel.vpp or 1,
                                    cp=plan.cp)
        self.locks, stale = lock_run_dirs(config, self.env.rank)  # one run per directory (megapack.dirlock)
        try:
            self._start(stale)
        except BaseException:  # released now, not at process exit: a later run of this process may take it
            try:  # the metric files and the W&B run are closed on this path too
                getattr(self, "metrics", None) and self.metrics.close()
            finally:
                release(self.locks)
            raise

    def _start(self, stale: list[str]) -> None:
        """Everything after the lock: data check, model, resume state, metrics, data source, checkpoint saver."""
        from megapack.training.run.checkpointing import CheckpointSaver, load_checkpoint
        from megapack.training.run.metrics import RunMetrics

        config, plan, vpp = self.config, self.plan, self.config.parallel.vpp or 1
        verified = None
        if plan.checksums:  # data.verify full: every rank hashes a share; a mismatch stops all with the same line
            from megapack.training.preflight.inputs import verify_checksums

            verified = verify_checksums(plan.checksums, self.env.rank, self.env.world_size, self.env.device)
        self.parts = build_model_and_optimizer(
            plan.hf_config, config.optimizer, attention_backend=plan.attention_backend, precision=plan.precision,
            row_length=plan.row_length, total_steps=plan.total_steps, pp=plan.pp,
            sequence_parallel=config.parallel.sequence_parallel,
            cross_sample_attention=config.model.cross_sample_attention, recompute=config.training.recompute,
            loss_chunk_tokens=config.model.loss_chunk_tokens,
            init_weights=None if plan.resume_from else partial(load_initial_weights, config=config), vpp=vpp)
        state = {"iteration": 0, "consumed_packs": 0, "totals": {}}
        if plan.resume_from is not None:  # the config in force wins over the checkpoint's hyperparameters
            from megapack.training.run.optim import config_hyperparameters_kept

            with config_hyperparameters_kept(self.parts.optimizer, self.parts.scheduler):
                state = load_checkpoint(plan.resume_from, self.parts.model, self.parts.optimizer, self.parts.scheduler)
        self.iteration = int(state["iteration"])
        self.nonfinite_streak = 0
        log_dir = None if self.finished else config.logging.dir or config.checkpoint.dir  # nothing rewritten
        self.metrics = RunMetrics(log_dir, is_logger=self.env.rank == 0, interval=config.logging.interval,
                                  tensorboard=config.logging.tensorboard, total_steps=plan.total_steps,
                                  hf_config=plan.hf_config, peak_flops=plan.peak_flops,
                                  world_size=plan.world_size, packing=plan.packing, totals=state.get("totals"),
                                  run_config=None if self.finished else resolved_config(config, plan))
        for warning in [*plan.warnings, *stale]:
            self.metrics.log(f"warning: {warning}")
        if verified is not None:
            self.metrics.log(f"data.verify full: sha256 of {len(plan.checksums)} shard files ok "
                             f"({verified[0] / 1e9:.3f} GB hashed on rank 0 in {verified[1]:.2f} s)")
        if plan.resume_from is not None:
            self.metrics.record_resume(self.iteration, str(plan.resume_from))  # written unless finished (no dir)
            self.metrics.log(f"resumed from {plan.resume_from} at step {self.iteration}"
                             + (" with the data position reset to the first pack" if plan.reset_data_position else ""))
            from megapack.training.run.optim import resume_note

            note = None if self.finished else resume_note(plan.resume_changes, config.optimizer, plan.resume_step,
                                                          plan.total_steps)
            if note is not None:
                self.metrics.log(note)
        self.source = open_source(config, plan, self.env.device, self.metrics.log)
        if not plan.reset_data_position:
            self.source.load_state_dict(state)
        ck = config.checkpoint
        self.saver = CheckpointSaver(ck.dir, keep_last=ck.keep_last, async_save=plan.async_save,
                                     save_interval=ck.save_interval, total_steps=plan.total_steps,
                                     optimizer_sharding=ck.optimizer_sharding) if ck.dir else None
        if self.env.rank == 0 and ck.dir and not self.finished:
            save_resolved_config(config, plan, ck.dir)

    @property
    def finished(self) -> bool:
        """Whether the run had already reached plan.total_steps when this process started (nothing to train)."""
        return self.plan.resume_step >= self.plan.total_steps

    def run(self, keep_process_group: bool = False) -> dict:
        """Train to plan.total_steps (or until SIGTERM/SIGUSR1); returns the run summary. keep_process_group leaves
        torch.distributed up (several runs in one launch, e.g. tests)."""
        plan, metrics, stop = self.plan, self.metrics, StopFlag()
        if self.finished:  # a finished run is never rewritten by a process that trains nothing
            metrics.log(f"{plan.resume_from}: the run already finished at step {plan.resume_step} of "
                        f"{plan.total_steps}; nothing to train, its checkpoints and summary are left as they are")
            self.close(keep_process_group)
            return {"total_steps": plan.resume_step, "interrupted": False, "already_finished": True}
        from megapack.training.run.metrics import format_settings

        metrics.log(f"training {plan.total_steps} steps on {self.source.describe()}:\n"
                    f"{format_settings(plan.summary())}")
        metrics.start(self.iteration)
        if self.config.training.eval_at_start and self.iteration == 0:
            self.validate()
        interrupted = False
        try:
            while self.iteration < plan.total_steps:
                record = self._train_one_step()
                metrics.record_step(self.iteration, record, self.source.epoch)
                self._check_finite(record)
                if self._eval_due():
                    self.validate()
                # agreed here, not in the step's all-reduce: a signal may land between the two on one rank only
                if stop.agree(self.env.device) and self.iteration < plan.total_steps:
                    metrics.log(f"signal {stop.signal}: checkpointing at step {self.iteration} and exiting")
                    self.save(wait=True)
                    interrupted = True
                    break
            if not interrupted:
                self.validate()
                self.save(wait=True)
                self._export()
            return metrics.finish(self.iteration, self.source.epoch, interrupted, self.source.summary())
        finally:
            reset_stop_signals()  # acted on (or the run ended): the next run of the launch starts clean
            self.close(keep_process_group)

    def _train_one_step(self) -> dict:
        """One optimizer step, the scheduled checkpoint, and the step's timings (slowest rank)."""
        import torch
        import torch.distributed as dist

        from megapack.training.run.step import train_step

        t0 = time.perf_counter()
        p = self.parts
        batches, count = self.source.next_step()
        record = train_step(p.model, p.optimizer, p.scheduler, batches, count, self.plan.row_length, self.env.device,
                            source=self.source)
        self.iteration += 1
        t1 = time.perf_counter()
        if self.saver is not None:
            self._log_saved(self.saver.poll())
            if self.saver.due(self.iteration) and record["nonfinite"] is None:
                self.save()
        t2 = time.perf_counter()
        # slowest rank's times
        keys = ("time_data_s", "time_forward_backward_s", "time_optimizer_s")
        sync = torch.tensor([t2 - t0, t2 - t1, *(record[k] for k in keys)], dtype=torch.float64,
                            device=self.env.device)
        dist.all_reduce(sync, op=dist.ReduceOp.MAX)
        values = sync.tolist()
        return record | {"step_time_s": values[0], "time_checkpoint_s": values[1]} | dict(zip(keys, values[2:5]))

    def _check_finite(self, record: dict) -> None:
        """Apply training.on_nonfinite to a step whose loss or gradient was NaN/inf (its update was not applied)."""
        from megapack.errors import MegapackError

        if record["nonfinite"] is None:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        tr = self.config.training
        if tr.on_nonfinite == "skip" and self.nonfinite_streak <= tr.max_nonfinite_skips:
            self.metrics.log(f"step {self.iteration}: non-finite {record['nonfinite']}, update skipped "
                             f"({self.nonfinite_streak} of at most {tr.max_nonfinite_skips} in a row)")
            return
        newest = None
        if self.saver is not None:
            self._log_saved(self.saver.wait())  # earlier checkpoints (finite states) are published, none of this one
            newest = self.saver.latest()
        key = "training.on_nonfinite" if tr.on_nonfinite == "stop" else "training.max_nonfinite_skips"
        raise MegapackError(f"{key}: step {self.iteration}: the {record['nonfinite']} is not finite (loss "
                            f"{record['loss']}); stopped before the optimizer step; newest checkpoint: {newest or 'none'}")

    def _eval_due(self) -> bool:
        interval = self.config.training.eval_interval
        return bool(interval) and self.iteration % interval == 0 and self.iteration < self.plan.total_steps

    def validate(self) -> float | None:
        """Validation loss over the source's validation data (None without any); logged."""
        from megapack.training.run.step import evaluate

        def on_model(batches, count: int) -> float:
            return evaluate(self.parts.model, batches, count, self.plan.row_length, self.env.device)

        result = self.source.validate(on_model)
        if result is None:
            return None
        self.metrics.record_validation(self.iteration, result.loss, result.fields)
        return result.loss

    def save(self, wait: bool = False) -> None:
        """Checkpoint now (collective); with async saves, `wait` blocks until it is written and published."""
        if self.saver is None:
            return
        t0 = time.perf_counter()
        meta = {"hf_config": self.plan.hf_config, "tokenizer_identity": self.plan.tokenizer_identity,
                "data_identity": self.plan.data_identity, "plan": self.plan.summary(),
                "optimizer": self.config.optimizer.model_dump(mode="json"),  # what runs (compared on resume)
                "hf_dir": str(Path(self.config.model.hf_dir).resolve()),  # its tokenizer files, for conversions
                "template": self.plan.shard_meta.get("template"),  # the chat template it learnt (megapack generate)
                "tokenizer_model": self.plan.shard_meta.get("tokenizer_model")}  # exports when hf_dir has none
        state = {"totals": dict(self.metrics.totals)} | self.source.state_dict()
        p = self.parts
        self.saver.save(self.iteration, p.model, p.optimizer, p.scheduler, state, meta=meta)
        self.metrics.log(f"checkpoint of step {self.iteration}: training blocked {time.perf_counter() - t0:.2f} s")
        self._log_saved(self.saver.wait() if wait or not self.saver.is_async else [])

    def _log_saved(self, paths) -> None:
        for path in paths:
            self.metrics.log(f"saved checkpoint {path} (published after step {self.iteration})")

    def _export(self) -> None:
        if self.config.checkpoint.export_hf:
            from megapack.model.hf_export import export_hf
            from megapack.training.preflight.identity import export_tokenizer

            tokenizer = export_tokenizer(self.config.model.hf_dir, self.plan.shard_meta)  # checked at preflight
            export_hf(self.parts.raw_model, self.plan.hf_config, self.config.checkpoint.export_hf, tokenizer)

    def close(self, keep_process_group: bool = False) -> None:
        """Finish outstanding checkpoint writes, close the metric sinks, tear down the process groups."""
        from megatron.core import parallel_state

        from megapack.training.run.distributed import destroy_distributed
        from megapack.training.run.runlock import release

        try:
            if self.saver is not None:
                self.saver.close()
        finally:
            self.metrics.close()
            release(self.locks)
            if keep_process_group:
                parallel_state.destroy_model_parallel()
            else:
                destroy_distributed()


def train(config: RunConfig) -> dict:
    """Run a training job described by config (inside torchrun/srun, or as a single process)."""
    return Trainer(config).run()
