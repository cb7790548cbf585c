"""Resumable torch_dist checkpoints: model, distributed optimizer, scheduler, RNG and data position.

Layout: <dir>/iter_0000100/ (megatron dist_checkpointing files + megapack.json), <dir>/latest (the name of the
newest complete one), <dir>/config.yaml. A checkpoint is written under `iter_XXXXXXX.tmp` (in the background
when async) and renamed when every rank has finished, so `latest` never points to a half-written directory. A
checkpoint being deleted (pruned, or replaced by a new save of the same step) is first renamed to
`iter_XXXXXXX.pruned`, so no half-deleted one ever sits under a published name either; leftovers of killed saves and
deletions are removed by the next publish.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from megapack.atomic import free_bytes, write_json_atomic, write_text_atomic
from megapack.errors import MegapackError
from megapack.model.checkpoint import FORMAT, MODEL_PREFIX, model_sharded_state_dict, read_metadata
from megapack.training.compat.adamw_fallback import (
    allocate_torch_adam_state, restore_torch_adam_steps, torch_adam_step_tolerant,
)
from megapack.training.preflight.resume import (
    DEFAULT_OPTIMIZER_SHARDING, ITER_RE, iteration_dir, resume_checkpoint, same_model_parallel,
)
from megapack.training.run.signals import start_checkpoint_helpers

def _optim_metadata(sharding: str) -> dict:
    return {"distrib_optim_sharding_type": sharding, "singleton_local_shards": False}


def _rng_state() -> dict:
    import torch
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import torch
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data):
    """RNG state of this (pp, tp) position; DP replicas share DP rank 0's (so DP size may change on resume)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        data,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module (its keys match model-only checkpoints)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_keys(model) -> list[str]:
    """State-dict keys of the model chunks: "model", or "model0", "model1"... with virtual pipeline stages (as
    Megatron-LM names them; the tensors inside are keyed by global layer, so the files do not depend on it)."""
    from megapack.model.builder import as_chunks

    count = len(as_chunks(model))
    return ["model"] if count == 1 else [f"model{i}" for i in range(count)]


def _vpp() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_virtual_pipeline_model_parallel_world_size() or 1


def _sharded_state_dict(model, optimizer, is_loading: bool, sharding: str) -> dict:
    from megapack.model.builder import as_chunks

    state = {key: model_sharded_state_dict(_unwrap(chunk)) for key, chunk in zip(_model_keys(model), as_chunks(model))}
    if optimizer is not None:
        models_sd = state["model"] if len(state) == 1 else dict(state)
        state["optimizer"] = optimizer.sharded_state_dict(models_sd, is_loading=is_loading,
                                                          metadata=_optim_metadata(sharding))
    return state


def _training_state(model, optimizer, scheduler, train_state: dict, iteration: int, sharding: str) -> dict:
    state = _sharded_state_dict(model, optimizer, is_loading=False, sharding=sharding)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["train_state"] = dict(train_state, iteration=iteration)
    state["rng_state"] = _rng_sharded_object(_rng_state())
    return state


def _publish(root: Path, iteration: int, keep_last: int, info: dict) -> Path:
    """Collective, after every rank has written its shards: rank 0 renames .tmp, points `latest` at it, prunes."""
    import torch.distributed as dist

    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        write_json_atomic(tmp / "megapack.json", info)
        if final.exists():  # the same step saved again (a resumed run): `latest` may name it, never delete in place
            _set_aside(final)
        os.replace(tmp, final)
        write_text_atomic(root / "latest", final.name + "\n")
        _prune(root, keep_last)
    dist.barrier()
    return final


class CheckpointSaver:
    """Writes training checkpoints under root, synchronously or in the background.

    In the background (megatron-core's torch_dist async save), `save` returns once each rank has planned its
    shards and forked a writer process holding a snapshot of them; training continues while it writes. `poll`
    (every step) and `wait` publish finished checkpoints: `iter_XXXXXXX.tmp` becomes `iter_XXXXXXX` and `latest`
    moves only after every rank's writer succeeded, so a crash mid-write leaves the previous checkpoint current.
    """

    def __init__(self, root: str | os.PathLike, *, keep_last: int, async_save: bool, save_interval: int | None,
                 total_steps: int, optimizer_sharding: str = DEFAULT_OPTIMIZER_SHARDING) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.root = Path(root)
        self.keep_last, self.save_interval, self.total_steps = keep_last, save_interval, total_steps
        self.sharding = optimizer_sharding
        self.queue = AsyncCallsQueue() if async_save else None
        self._pending: list[Path] = []
        start_checkpoint_helpers()  # Slurm signals every process of a step: the writer's helpers must survive them

    def latest(self) -> Path | None:
        """The newest published checkpoint."""
        try:
            return resume_checkpoint(self.root)
        except MegapackError:
            return None

    def due(self, step: int) -> bool:
        """Whether the schedule checkpoints after `step` (the final checkpoint is saved by the caller)."""
        return bool(self.save_interval) and step % self.save_interval == 0 and step < self.total_steps

    @property
    def is_async(self) -> bool:
        """Whether saves are written in the background."""
        return self.queue is not None

    def save(self, iteration: int, model, optimizer, scheduler, train_state: dict, *, meta: dict) -> None:
        """Collective: start writing the checkpoint of step `iteration` (finished at once when not async)."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing
        from megatron.core import parallel_state as ps

        self._finalize(blocking=True)  # one checkpoint in flight at a time (its path stays pending for the log)
        tmp = iteration_dir(self.root, iteration).with_name(f"iter_{iteration:07d}.tmp")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = _training_state(model, optimizer, scheduler, train_state, iteration, self.sharding)
        info = dict(meta, format=FORMAT, iteration=iteration, train_state=dict(train_state, iteration=iteration),
                    optimizer_sharding=self.sharding,
                    saved_with={"tp": ps.get_tensor_model_parallel_world_size(),
                                "pp": ps.get_pipeline_model_parallel_world_size(),
                                "dp": ps.get_data_parallel_world_size(), **({"vpp": _vpp()} if _vpp() > 1 else {}),
                                **({"cp": ps.get_context_parallel_world_size()}
                                   if ps.get_context_parallel_world_size() > 1 else {})})

        def publish() -> None:
            self._pending.append(_publish(self.root, iteration, self.keep_last, info))

        self._needed = _state_bytes(state)
        with self._failures(tmp):
            if self.queue is None:
                dist_checkpointing.save(state, str(tmp))
                publish()
                return
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
            request.add_finalize_fn(publish)
            self.queue.schedule_async_request(request)

    @contextmanager
    def _failures(self, tmp: Path):
        """A failed write (full disk, I/O error) becomes one line naming the path, the bytes needed and free; the
        unfinished `.tmp` directory is removed, so nothing half-written stays behind or looks complete."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        try:
            yield
        except MegapackError:
            raise
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - the writer's OSError arrives wrapped
            shutil.rmtree(tmp, ignore_errors=True)
            free = free_bytes(self.root)
            full = _is_disk_full(exc) or (free is not None and free < self._needed)
            first = (str(exc).splitlines() or ["(no message)"])[0]
            reason = "no space left on device" if full else f"{type(exc).__name__}: {first[:200]}"
            free_text = f"{free:,}" if free is not None else "an unknown number of"
            raise MegapackError(f"checkpoint.dir: writing {tmp} failed ({reason}); this rank's part needs about "
                                f"{self._needed:,} bytes, {free_text} bytes are free") from None

    def _finalize(self, blocking: bool) -> None:
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            pending = sorted(self.root.glob("iter_*.tmp"))
            with self._failures(pending[-1] if pending else self.root / "iter_unknown.tmp"):
                self.queue.maybe_finalize_async_calls(blocking=blocking)

    def poll(self) -> list[Path]:
        """Collective, cheap: publish checkpoints whose writers are done; returns the paths published since the
        last poll/wait."""
        self._finalize(blocking=False)
        done, self._pending = self._pending, []
        return done

    def wait(self) -> list[Path]:
        """Collective: block until every started checkpoint is written and published; returns the paths published
        since the last poll/wait."""
        self._finalize(blocking=True)
        done, self._pending = self._pending, []
        return done

    def close(self) -> None:
        """Wait for outstanding writes and stop the background machinery."""
        self.wait()
        if self.queue is not None:
            self.queue.close()


def _state_bytes(state) -> int:
    """Bytes of the tensors this rank writes (ShardedTensor data and plain tensors in a nested state dict)."""
    import torch

    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    data = getattr(state, "data", state)
    return data.numel() * data.element_size() if isinstance(data, torch.Tensor) else 0


def _is_disk_full(exc: BaseException | None) -> bool:
    """Whether a (chained or nested) exception is a full disk or quota."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _set_aside(path: Path) -> None:
    """Rename a published checkpoint out of the `iter_XXXXXXX` names (to be deleted by `_prune`)."""
    trash = path.with_name(path.name + ".pruned")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; delete older ones (renamed first) and what killed saves and deletions
    left behind (`iter_*.tmp`, `iter_*.pruned`, a temporary `latest`)."""
    done = sorted(p for p in root.glob("iter_*") if ITER_RE.match(p.name))
    for old in done[:-keep_last]:
        try:
            _set_aside(old)
        except OSError:  # cannot rename (unexpected): delete in place, as pruning never fails a run
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob("iter_*.tmp"), *root.glob("iter_*.pruned")]:
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".latest.*.tmp"):  # megapack.atomic's temporary name, from a kill while moving `latest`
        stale.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, *, load_optimizer: bool = True,
                    load_rng: bool = True) -> dict:
    """Collective: restore model (+ optimizer, scheduler, RNG) from a checkpoint; returns its train_state.

    The RNG state is per (TP, PP) position, so it is restored only at the layout the checkpoint was saved with.
    Every pickle in the checkpoint is read through an allow-list (megapack.model.safe_pickle).
    """
    from megatron.core import parallel_state as ps

    from megapack.model.builder import as_chunks
    from megapack.model.safe_pickle import dist_load

    path = Path(path)
    meta = read_metadata(path)
    load_rng = load_rng and same_model_parallel(meta, ps.get_tensor_model_parallel_world_size(),
                                                 ps.get_pipeline_model_parallel_world_size(), _vpp())
    if load_optimizer and optimizer is not None:
        allocate_torch_adam_state(optimizer)
    sharding = meta.get("optimizer_sharding", DEFAULT_OPTIMIZER_SHARDING)
    template = _sharded_state_dict(model, optimizer if load_optimizer else None, is_loading=True, sharding=sharding)
    if load_rng:
        template["rng_state"] = _rng_sharded_object(None)
    loaded = dist_load(template, path)
    for key, chunk in zip(_model_keys(model), as_chunks(model)):
        missing, unexpected = _unwrap(chunk).load_state_dict(
            {k.removeprefix(MODEL_PREFIX): v for k, v in loaded[key].items()}, strict=False
        )
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise MegapackError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                                f"unexpected {list(unexpected)[:3]})")
    if load_optimizer and optimizer is not None:
        import torch

        with torch.no_grad(), torch_adam_step_tolerant(optimizer):  # main params are views of leaves with grad
            optimizer.load_state_dict(loaded["optimizer"])
        restore_torch_adam_steps(optimizer, loaded["optimizer"])
    if load_optimizer and scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if load_rng and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    state = dict(loaded.get("train_state") or {})
    if "consumed_samples" in state:  # checkpoints written before packs had their own name
        state.setdefault("consumed_packs", state.pop("consumed_samples"))
    return state
