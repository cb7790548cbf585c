"""Helpers of the trainer tests: tiny HF model, real demo shards, configs, and a torchrun job runner.

Run as a script under torchrun (`python tests/train_helpers.py jobs.json`) it executes several training runs in
one launch (process start + megatron import dominate on small CPUs), re-initialising megatron's parallel state
between runs of the same world size.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_hf(out: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """A random transformers LlamaForCausalLM with the LLaMA-3 vocabulary, hidden 64, 2 layers, saved to out."""
    import torch
    import transformers

    from megapack.model.tiny_checkpoint import tiny_llama_config

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_llama_config(num_layers=num_layers)))
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_demo_shards(data_dir: Path, tokenizer: Path, out: Path, packing: str, *, records: int | None = 48,
                     seq_length: int = 256, val_fraction: float = 0.1, seed: int = 1) -> Path:
    """Real LLaMA-Factory alpaca demo conversations (the first `records`) through `megapack preprocess`."""
    from megapack.cli import main

    if (out / "meta.json").is_file():
        return out
    src = data_dir / "alpaca_en_demo.json"
    if records is not None:
        subset = out.parent / f"alpaca_first_{records}.json"
        subset.write_text(json.dumps(json.loads(src.read_text())[:records]))
        src = subset
    rc = main(["preprocess", "--input", str(src), "--format", "alpaca", "--tokenizer-model", str(tokenizer),
               "--seq-length", str(seq_length), "--packing", packing, "--val-fraction", str(val_fraction),
               "--seed", str(seed), "--output-dir", str(out), "--no-progress", "--workers", "1"])
    assert rc == 0, f"preprocess failed ({rc})"
    return out


def demo_inputs(w: Path, tokenizer: Path, data_dir: Path) -> tuple[Path, Path, Path]:
    """(tiny HF model, greedy shards, padding shards) of the first 48 demo conversations, under w."""
    hf = make_tiny_hf(w / "hf")
    return hf, *(make_demo_shards(data_dir, tokenizer, w / packing, packing) for packing in ("greedy", "padding"))


def base_config(hf_dir: Path, shards: Path, run_dir: Path, **sections) -> dict:
    """A run config dict: tiny model, given shards, fp32, constant LR, no dropout; sections override keys."""
    cfg = {
        "model": {"hf_dir": str(hf_dir), "init": "hf"},
        "data": {"path": str(shards)},
        "optimizer": {"lr": 1e-3, "min_lr": 0.0, "weight_decay": 0.01, "clip_grad": 1.0, "decay_style": "cosine",
                      "warmup_steps": 1},
        "training": {"global_batch_size": 4, "micro_batch_size": 1, "train_steps": 5, "precision": "fp32"},
        "checkpoint": {"dir": None},
        "logging": {"dir": str(run_dir), "tensorboard": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return copy.deepcopy(cfg)


def losses(run_dir: Path, kind: str = "train", key: str = "loss") -> dict[int, float]:
    """step -> loss of a run's metrics.jsonl (the last record of a step wins)."""
    from megapack.training.run.metrics import read_metrics

    return {s: r[key] for s, r in read_metrics(Path(run_dir) / "metrics.jsonl", kind).items()}


def launch(nproc: int, jobs: list[dict], workdir: Path, name: str, timeout: int = 400,
           wait: bool = True) -> subprocess.Popen:
    """torchrun `nproc` processes running the jobs (each {"config": dict, ...}) one after another; with wait=False
    it returns at once (see `finish`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / f"{name}.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), str(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(workdir / f"{name}.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if wait:
        finish(proc, workdir, name, timeout)
    return proc


def finish(proc: subprocess.Popen, workdir: Path, name: str, timeout: int = 400) -> None:
    """Wait for a launch; fail with its log's tail unless it succeeded (past the timeout: its whole family killed)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_family(proc)
        raise AssertionError(f"torchrun {name} ran past {timeout} s:\n" + (workdir / f"{name}.log").read_text()[-6000:])
    if proc.returncode != 0:
        tail = (workdir / f"{name}.log").read_text()[-6000:]
        raise AssertionError(f"torchrun {name} failed with {proc.returncode}:\n{tail}")


def kill_family(proc: subprocess.Popen) -> None:
    """SIGKILL proc's process group and the groups of all its descendants (torchrun starts each worker in its own
    session; a worker's async checkpoint writer shares the worker's group); wait until every one is gone."""
    groups = {proc.pid}
    try:
        groups |= {os.getpgid(c.pid) for c in psutil.Process(proc.pid).children(recursive=True)}
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        alive = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) in groups and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {alive} survived SIGKILL")


def segment_losses(trainer, dataset) -> dict[tuple, tuple[float, int]]:
    """Forward-only per-conversation (loss sum, targets) of every pack, keyed by the conversation's real tokens."""
    import numpy as np
    import torch

    from megapack.training.run.batch import build_batch
    from megapack.training.run.step import forward_step

    out = {}
    model = trainer.parts.model
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            mb = build_batch([dataset[i]], padded=trainer.plan.padded, pad_id=trainer.plan.pad_id)
            tok_loss, _ = forward_step(iter([mb.to(trainer.env.device)]), model, stats_sink=[])
            tok_loss = tok_loss.reshape(-1).double().numpy()
            weights = mb.loss_weight.astype(np.float64)
            for a, e, n in zip(mb.cu_seqlens_padded[:-1], mb.cu_seqlens_padded[1:], np.diff(mb.cu_seqlens)):
                key = tuple(mb.tokens[a : a + n].tolist())
                out[key] = (float((tok_loss[a:e] * weights[a:e]).sum()), int(weights[a:e].sum()))
    return out


def _log_packs(sampler, path: Path, write: bool) -> None:
    """Wrap a BlendSampler's next_step: append {"consumed": packs before the step, "packs": the step's global batch}."""
    inner = sampler.next_step

    def next_step():
        before = sampler.consumed_packs
        out = inner()
        if write:
            with open(path, "a") as fh:
                fh.write(json.dumps({"consumed": before, "packs": sampler.step_packs}) + "\n")
        return out

    sampler.next_step = next_step


def _log_rank_packs(sampler, path: Path, rank: int) -> None:
    """Wrap a TrainSampler's next_step: append this rank's micro-batches (pack keys) of each step as a JSON line to
    `path`.rank<R>."""
    inner = sampler.next_step

    def next_step():
        out = inner()
        with open(f"{path}.rank{rank}", "a") as fh:
            fh.write(json.dumps(out) + "\n")
        return out

    sampler.next_step = next_step


def measure_activations(trainer, path: str) -> Callable[[], None]:
    """Record, per training step, the peak activation bytes saved for backward inside the decoder (its layers and
    their core attention, whose recomputation in backward counts too) into `path`.rank<R>.json."""
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megapack.model.attention import PackedCoreAttention
    from megapack.model.builder import as_chunks
    from megapack.training.run import step
    from activations import SavedActivations  # tests/activations.py (this script runs from tests/)

    chunks = as_chunks(trainer.parts.raw_model)
    meter = SavedActivations(exclude=[p for c in chunks for p in c.parameters()])
    for module in (m for c in chunks for m in c.modules()):
        if isinstance(module, (TransformerBlock, TransformerLayer, PackedCoreAttention)):
            meter.track(module)
    peaks, original = [], step.run_schedule

    def measured(*args, **kwargs):
        meter.reset_peak()
        out = original(*args, **kwargs)
        if not kwargs["forward_only"]:
            peaks.append(meter.peak)
        return out

    step.run_schedule = measured
    return lambda: Path(f"{path}.rank{trainer.env.rank}.json").write_text(json.dumps(peaks))


def record_attention_calls(trainer, path: str) -> Callable[[], None]:
    """Record every packed core-attention call (model chunk, global layer, training, cu_seqlens) into
    `path`.rank<R>.json."""
    from megapack.model.attention import PackedCoreAttention
    from megapack.model.builder import as_chunks

    chunk_of = {id(m): i for i, c in enumerate(as_chunks(trainer.parts.raw_model)) for m in c.modules()}
    calls, original = [], PackedCoreAttention._packed

    def packed(self, q, k, v, params):
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        calls.append([chunk_of[id(self)], self.layer_number, self.training, cu.tolist()])
        return original(self, q, k, v, params)

    PackedCoreAttention._packed = packed
    return lambda: Path(f"{path}.rank{trainer.env.rank}.json").write_text(json.dumps(calls))


def _dump_optimizer(optimizer, path: Path) -> None:
    """Write the param groups' hyperparameters (all but the parameters) and each optimizer's clip_grad as JSON."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    clips = [o.config.clip_grad for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    path.write_text(json.dumps({"param_groups": groups, "clip_grad": clips}, default=float))


def _run_jobs(spec_path: str) -> None:
    import torch.distributed as dist

    from megapack.errors import MegapackError
    from megapack.training.run import metrics
    from megapack.training.preflight.config import load_config
    from megapack.training.run.loop import Trainer

    from megapack.model.attention import PackedCoreAttention
    from megapack.training.run import step

    from megapack.training.preflight import inputs

    original_write, original_schedule = metrics.MetricsWriter.write, step.run_schedule
    original_packed, original_check_free = PackedCoreAttention._packed, inputs.check_free
    jobs = json.loads(Path(spec_path).read_text())
    for job in jobs:
        # jobs start together: a rank must not preflight the next job while rank 0 still holds this one's lock
        # (a real launch runs one job per process, and its process-group rendezvous does this)
        if dist.is_initialized():
            dist.barrier()
        metrics.MetricsWriter.write = original_write
        step.run_schedule, PackedCoreAttention._packed = original_schedule, original_packed
        # as if the holder took the directory's lock after preflight: only rank 0's lock (runlock) can refuse
        inputs.check_free = (lambda *a: None) if job.get("lock_taken_after_preflight") else original_check_free
        if job.get("signal_at_step"):
            # deliver SIGUSR1 to this process right after logging the given step (what Slurm does before the limit)
            # (every rank, or only job["signal_rank"])
            def write(self, record, _at=job["signal_at_step"], _sig=getattr(signal, job.get("signal", "SIGUSR1")),
                      _rank=job.get("signal_rank")):
                original_write(self, record)
                if record.get("kind") == "train" and record["step"] == _at and _rank in (None, dist.get_rank()):
                    os.kill(os.getpid(), _sig)

            metrics.MetricsWriter.write = write
        config = load_config(None, job.get("overrides", []), raw=job["config"])
        try:
            trainer = Trainer(config)
        except MegapackError as exc:  # each rank's own line; job["expect_error"] (a substring): go on to the next job
            print(f"rank {os.environ.get('RANK')}: error: {exc}", flush=True)
            if job.get("expect_error") and job["expect_error"] in str(exc):
                continue
            raise
        if job.get("optimizer_dump") and dist.get_rank() == 0:  # the optimizer's hyperparameters once resumed
            _dump_optimizer(trainer.parts.optimizer, Path(job["optimizer_dump"]))
        if job.get("pack_log"):  # rank 0 appends each step's global batch of (member, pack) as a JSON line
            _log_packs(trainer.source.sampler, Path(job["pack_log"]), dist.get_rank() == 0)
        if job.get("rank_pack_log"):  # each rank appends the pack keys it trains per step (a plain TrainSampler)
            _log_rank_packs(trainer.source.sampler, Path(job["rank_pack_log"]), dist.get_rank())
        if job.get("validate_only"):  # one validation pass with the initial weights, written to the run's metrics
            trainer.validate()
            trainer.close(keep_process_group=True)
            continue
        dumps = [measure_activations(trainer, job["activations"])] if job.get("activations") else []
        if job.get("attention_calls"):
            dumps.append(record_attention_calls(trainer, job["attention_calls"]))
        if job.get("segment_losses"):
            result = {json.dumps(list(k)): v for k, v in segment_losses(trainer, trainer.source.train).items()}
            if dist.get_rank() == 0:
                Path(job["segment_losses"]).write_text(json.dumps(result))
            trainer.close(keep_process_group=True)
            continue
        trainer.run(keep_process_group=True)
        for dump in dumps:
            dump()
    dist.barrier()
    dist.destroy_process_group()


def hf_loss_on_split(hf_dir: Path, shards: Path, split: str) -> tuple[float, int]:
    """transformers' LlamaForCausalLM loss (sum, targets) over every conversation of a shard split, one at a time."""
    import numpy as np
    import torch
    import transformers

    from megapack.data.packs.shards import ShardDataset

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    ds = ShardDataset(shards, split)
    with torch.no_grad():
        for i in range(len(ds)):
            pack = ds[i]
            for a, n in zip(pack.cu_seqlens_padded[:-1], pack.real_lengths):
                e = a + n
                ids = torch.as_tensor(np.asarray(pack.tokens[a:e], np.int64))[None]
                target = torch.as_tensor(np.asarray(pack.loss_mask[a + 1 : e], np.float64))
                logits = model(input_ids=ids).logits[0, :-1].double()
                nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
                total += float((nll * target).sum())
                count += int(target.sum())
    return total, count


def write_yaml(path: Path, config: dict) -> Path:
    """Save a config dict as YAML."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


if __name__ == "__main__":
    _run_jobs(sys.argv[1])
