"""Where a run's micro-batches come from: the `DataSource` interface the loop and the step use, and its shard-directory
implementation (`megapack.training.run.blend.BlendSource` is the other one).

The loop asks a source for the next step's micro-batches, for validation, for the state that goes into checkpoints
and for the numbers only it knows (a blend's per-member losses); it never asks what is behind it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from megapack.errors import MegapackError
from megapack.training.preflight.config import RunConfig
from megapack.training.preflight.plan import RunPlan
from megapack.training.run.batch import Batch
from megapack.training.run.balance import CostModel
from megapack.training.run.sampler import Balancing, BatchFeed, TrainSampler, validation_batches

# evaluate(micro-batches, count) -> the loss over them (the model side of validation; see run.step.evaluate)
Evaluate = Callable[[Iterator[Batch], int], float]


@dataclass
class Validation:
    """A validation pass: the loss, and the metric fields a source adds (a blend's per-member losses)."""

    loss: float
    fields: dict[str, float] = field(default_factory=dict)


class DataSource(Protocol):
    """What the loop and the step know about the data."""

    def describe(self) -> str:
        """What the run trains on, in a few words (for the log)."""

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed."""

    def next_step(self) -> tuple[Iterator[Batch], int]:
        """(micro-batches, their count) of this rank's next training step; advances the position."""

    def validate(self, evaluate: Evaluate) -> Validation | None:
        """The validation loss (None without a validation split)."""

    def loss_report(self, losses, batch: Batch) -> dict:
        """Extra entries of one micro-batch's loss report (inside megatron's schedule; {} for most sources)."""

    def step_report(self, outputs: list, device) -> dict:
        """The step's extra metric fields from those entries (collective over stages and DP ranks)."""

    def summary(self) -> dict:
        """Extra fields of the run summary."""

    def state_dict(self) -> dict:
        """The data position (saved in checkpoints next to the metric totals)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's train state."""


def batch_feed(plan: RunPlan, config: RunConfig, device) -> BatchFeed:
    """This rank's feed: micro-batches laid out as the plan says, read on the TP source rank and broadcast."""
    from megatron.core import parallel_state as ps

    return BatchFeed(padded=plan.padded, reduction=config.training.loss_reduction, pad_id=plan.pad_id,
                     row_multiple=plan.row_multiple, tp_src=ps.get_tensor_model_parallel_src_rank(),
                     tp_group=ps.get_tensor_model_parallel_group(),
                     is_tp_src=ps.get_tensor_model_parallel_rank() == 0, device=device,
                     cp_rank=ps.get_context_parallel_rank(), cp_size=ps.get_context_parallel_world_size())


def balancing(config: RunConfig, plan: RunPlan, lengths: Callable) -> Balancing:
    """training.balance with the model's cost and the shards' segment lengths (`lengths(key)` -> (real, padded))."""
    return Balancing(config.training.balance, CostModel.of_model(plan.hf_config), plan.seq_length, lengths)


class ShardSource:
    """One shard directory: its train split in shuffled epochs, its (or data.valid_path's) validation split."""

    def __init__(self, config: RunConfig, plan: RunPlan, feed: BatchFeed, dp_rank: int, log) -> None:
        from megapack.data.packs.shards import ShardDataset

        data = config.data
        self.path, self.feed = data.path, feed
        self.train = ShardDataset(data.path, split=data.train_split)
        self.valid = None
        if data.valid_split:
            try:
                self.valid = ShardDataset(data.valid_path or data.path, split=data.valid_split)
            except MegapackError as exc:
                log(f"no validation: {exc}")
        self.micro_batch_size, self.eval_max_batches = plan.micro_batch_size, config.training.eval_max_batches
        self.sampler = TrainSampler(len(self.train), plan.global_batch_size, plan.micro_batch_size, dp_rank, plan.dp,
                                    config.training.seed,
                                    balancing=balancing(config, plan, self.train.segment_lengths))

    def describe(self) -> str:
        """The shard directory."""
        return str(self.path)

    @property
    def epoch(self) -> float:
        """Fractional epochs of the train split consumed."""
        return self.sampler.epoch

    def next_step(self) -> tuple[Iterator[Batch], int]:
        """The next step's micro-batches of this rank."""
        index_lists = self.sampler.next_step()
        return self.feed.batches(self.sampler.reader(self.train.__getitem__), index_lists), len(index_lists)

    def validate(self, evaluate: Evaluate) -> Validation | None:
        """The loss over the validation split (strided over DP ranks, unshuffled)."""
        if self.valid is None or len(self.valid) == 0:
            return None
        index_lists = validation_batches(len(self.valid), self.micro_batch_size, self.sampler.dp_rank,
                                         self.sampler.dp_size, self.eval_max_batches)
        return Validation(evaluate(self.feed.batches(self.valid.__getitem__, index_lists), len(index_lists)))

    def loss_report(self, losses, batch: Batch) -> dict:
        """Nothing beyond the loss."""
        return {}

    def step_report(self, outputs: list, device) -> dict:
        """The step's balance across DP ranks (the sampler's layout, the same on every rank)."""
        return self.sampler.report()

    def summary(self) -> dict:
        """Nothing beyond the run's totals."""
        return {}

    def state_dict(self) -> dict:
        """Packs consumed."""
        return {"consumed_packs": self.sampler.consumed_packs}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the checkpoint's pack."""
        self.sampler.consumed_packs = int(state.get("consumed_packs", 0))
