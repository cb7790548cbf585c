"""Weighted dataset mixtures (`data.blend`): Megatron's blended dataset over megapack shard directories.

The members are preprocessed on their own; the mixture is decided at training time, so changing the weights needs
no new preprocessing. Semantics (README "Dataset mixtures"):

- Weights are shares of the *tokens* the run reads (real tokens of the packs, padding excluded), normalised to
  sum to 1. The global pack sequence is built greedily, as Megatron's BlendedDataset builds its sample index: the
  next pack comes from the member furthest behind its share (deficit `w_m * T - T_m`, T the tokens so far; ties go
  to the earlier member). The deficits sum to 0 and the member taken has a deficit >= 0, which then drops by less
  than one pack, so every deficit stays within [-L, (M-1) * L] (L the longest pack, M members): after T tokens each
  member's share is within (M-1) * L / T of its weight (1% after 100 * (M-1) packs of seq_length).
- Each member walks its own packs in a seeded per-epoch order (`seeds` purpose `blend_order`, keys: the member's
  index and its epoch); a member that runs out starts its next epoch on its own, the others are unaffected.
- One epoch of the blend is the sum of the members' train packs: `training.epochs` counts those (unless
  `training.train_steps` is set); summary.json reports each member's own epochs.
- The sequence is global: DP rank r trains the same slots of it as with a single dataset (TrainSampler), so it does
  not depend on the DP size, and a checkpoint's data position (each member's packs and tokens consumed) resumes it
  at any DP size. Resuming with other weights continues every member where it was; the deficits restart from the
  resume point under the new weights.
- Validation runs each member's own val split exactly as a run on that member alone would; the blend's
  `valid_loss` is the weight-averaged member loss (over the members that have a val split).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from megapack import seeds
from megapack.errors import MegapackError
from megapack.training.preflight.config import RunConfig
from megapack.training.preflight.plan import RunPlan
from megapack.training.run.batch import Batch
from megapack.training.run.sampler import Balancing, BatchFeed, TrainSampler, validation_batches
from megapack.training.run.source import Evaluate, Validation, balancing


class BlendSchedule:
    """The blend's global pack sequence: (member, pack index) pairs, from a position of every member."""

    def __init__(self, lengths: Sequence[np.ndarray], weights: Sequence[float], seed: int,
                 state: dict | None = None) -> None:
        if len(lengths) != len(weights) or not lengths or any(len(x) == 0 for x in lengths):
            raise ValueError("a blend needs one non-empty pack-length array per weight")
        total = float(sum(weights))
        self.lengths = [np.asarray(x, np.int64) for x in lengths]
        self.weights = [float(w) / total for w in weights]
        self.seed = seed
        count = len(self.lengths)
        self.packs, self.tokens, self.base = [0] * count, [0] * count, [0] * count
        self.reweighted = False
        if state:
            self.packs, self.tokens = [int(v) for v in state["packs"]], [int(v) for v in state["tokens"]]
            same = np.allclose(state["weights"], self.weights, rtol=1e-12, atol=0)
            self.base = [int(v) for v in state["base"]] if same else list(self.tokens)
            self.reweighted = not same
        self._orders: list[tuple[int, np.ndarray | None]] = [(-1, None)] * count

    def next(self) -> tuple[int, int]:
        """The next (member, pack index); advances the position."""
        since = [t - b for t, b in zip(self.tokens, self.base)]
        total = sum(since)
        m = max(range(len(since)), key=lambda j: self.weights[j] * total - since[j])  # first of equal deficits
        epoch, pos = divmod(self.packs[m], len(self.lengths[m]))
        if self._orders[m][0] != epoch:
            self._orders[m] = (epoch, seeds.epoch_order(len(self.lengths[m]), self.seed, epoch, member=m))
        pack = int(self._orders[m][1][pos])
        self.packs[m] += 1
        self.tokens[m] += int(self.lengths[m][pack])
        return m, pack

    def state_dict(self) -> dict:
        """The position, for checkpoints (plain ints and floats)."""
        return {"weights": self.weights, "packs": list(self.packs), "tokens": list(self.tokens),
                "base": list(self.base)}


class BlendSampler(TrainSampler):
    """TrainSampler over the blend's global sequence: pack "indices" are (member, pack) pairs."""

    def __init__(self, schedule: BlendSchedule, names: Sequence[str], global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, consumed_packs: int = 0,
                 balancing: Balancing | None = None) -> None:
        super().__init__(sum(len(x) for x in schedule.lengths), global_batch_size, micro_batch_size, dp_rank,
                         dp_size, seed, consumed_packs, balancing)
        self.schedule, self.names = schedule, list(names)
        self.step_packs: list[tuple[int, int]] = []  # the whole global batch of the last step (every rank alike)

    def next_step(self) -> list[list[tuple[int, int]]]:
        """This DP rank's micro-batches of (member, pack) for the next step; advances every member's position."""
        self.step_packs = [self.schedule.next() for _ in range(self.gbs)]
        self._step_start = self.consumed_packs
        return super().next_step()

    def _pack(self, k: int) -> tuple[int, int]:
        return self.step_packs[k - self._step_start]

    def state_dict(self) -> dict:
        """The data position of every member (goes into the checkpoint next to consumed_packs)."""
        return {"names": self.names} | self.schedule.state_dict()


class BlendSource:
    """A data.blend mixture as a data source: the blended train sequence, each member's own validation, and the
    per-member accounting (loss, trained and real tokens, packs, epochs) in the step records and the summary."""

    TOTALS = ("trained_tokens", "tokens")  # per member, kept in checkpoints

    def __init__(self, config: RunConfig, plan: RunPlan, feed: BatchFeed, dp_rank: int, log) -> None:
        from megapack.data.packs.shards import ShardDataset

        data = config.data
        self.config, self.plan, self.feed, self.dp_rank, self.log = config, plan, feed, dp_rank, log
        self.names = [m["name"] for m in plan.blend]
        self.weights = [m["weight"] for m in plan.blend]
        self.trains = [ShardDataset(m["path"], split=data.train_split) for m in plan.blend]
        self.valids = []
        for m in plan.blend:
            try:
                self.valids.append(ShardDataset(m["path"], split=data.valid_split) if data.valid_split else None)
            except MegapackError as exc:
                log(f"no validation for blend member {m['name']}: {exc}")
                self.valids.append(None)
        self.sampler = self._sampler(None, 0)
        self.totals = {f"dataset/{n}/{k}": 0 for n in self.names for k in self.TOTALS}
        self.last_loss: dict[str, float | None] = {}
        self.last_valid_loss: dict[str, float] = {}

    def _sampler(self, state: dict | None, consumed_packs: int) -> BlendSampler:
        schedule = BlendSchedule([t.pack_lengths(real=True) for t in self.trains], self.weights,
                                 self.config.training.seed, state)
        if schedule.reweighted:
            self.log("data.blend: the weights differ from the checkpoint's; every member continues where it was, "
                     "the shares count from here")
        return BlendSampler(schedule, self.names, self.plan.global_batch_size, self.plan.micro_batch_size,
                            self.dp_rank, self.plan.dp, self.config.training.seed, consumed_packs,
                            balancing(self.config, self.plan, lambda key: self.trains[key[0]].segment_lengths(key[1])))

    def describe(self) -> str:
        """The members and their weights."""
        return "data.blend " + ", ".join(f"{n} {w:.4g}" for n, w in zip(self.names, self.weights))

    @property
    def epoch(self) -> float:
        """Fractional epochs of the blend (one epoch: every member's train packs)."""
        return self.sampler.epoch

    def next_step(self) -> tuple[Iterator[Batch], int]:
        """The next step's micro-batches of this rank, each pack tagged with its member."""
        index_lists = self.sampler.next_step()
        read = lambda key: self.trains[key[0]][key[1]]  # noqa: E731 - (member, pack) -> pack
        return self.feed.batches(read, index_lists, members=lambda idx: [m for m, _ in idx]), len(index_lists)

    def validate(self, evaluate: Evaluate) -> Validation | None:
        """Each member's validation loss (as a run on that member alone computes it) and their weighted mean."""
        mbs, max_batches = self.plan.micro_batch_size, self.config.training.eval_max_batches
        losses = {}
        for name, valid in zip(self.names, self.valids):
            if valid is None or len(valid) == 0:
                continue
            index_lists = validation_batches(len(valid), mbs, self.dp_rank, self.plan.dp, max_batches)
            losses[name] = evaluate(self.feed.batches(valid.__getitem__, index_lists), len(index_lists))
        if not losses:
            return None
        weights = {n: w for n, w in zip(self.names, self.weights) if n in losses}
        self.last_valid_loss.update(losses)
        loss = sum(weights[n] * v for n, v in losses.items()) / sum(weights.values())
        return Validation(loss, {f"dataset/{n}/valid_loss": v for n, v in losses.items()})

    def loss_report(self, losses, batch: Batch) -> dict:
        """Per member of one micro-batch: [sum of weighted losses, sum of weights, trained tokens, real tokens]."""
        import torch

        weight, member = batch.loss_weight.reshape(-1).to(torch.float32), batch.member.reshape(-1)
        rows = torch.stack([losses.float().reshape(-1) * weight, weight, (weight > 0).float(),
                            (member >= 0).float()], dim=1)
        sums = torch.zeros(len(self.names), 4, dtype=torch.float32, device=rows.device)
        return {"member loss": sums.index_add_(0, member.clamp(min=0), rows).detach()}

    def step_report(self, outputs: list, device) -> dict:
        """`dataset/<name>/{loss,trained_tokens,tokens}` of the step (summed over micro-batches, stages and DP
        ranks; the loss is None for a member with no trained token in the step), added to the member totals."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        total = torch.zeros(len(self.names), 4, dtype=torch.float64, device=device)
        for item in outputs:
            if "member loss" in item:
                total += item["member loss"].to(torch.float64)
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())  # only the last stage is non-zero
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))  # per-token sums
        fields: dict = self.sampler.report()
        for name, (s, w, trained, tokens) in zip(self.names, total.tolist()):
            loss = s / w if w > 0 else None
            self.last_loss[name] = loss if loss is not None else self.last_loss.get(name)
            fields |= {f"dataset/{name}/loss": loss, f"dataset/{name}/trained_tokens": int(trained),
                       f"dataset/{name}/tokens": int(tokens)}
            self.totals[f"dataset/{name}/trained_tokens"] += int(trained)
            self.totals[f"dataset/{name}/tokens"] += int(tokens)
        return fields

    def summary(self) -> dict:
        """Per member: weight, packs and epochs consumed, tokens and their share, trained tokens, last losses."""
        s, t = self.sampler.schedule, self.totals
        tokens = sum(t[f"dataset/{n}/tokens"] for n in self.names)
        out = {}
        for m, n in enumerate(self.names):
            numbers = {"weight": s.weights[m], "packs": s.packs[m], "epochs": s.packs[m] / len(s.lengths[m]),
                       "tokens": t[f"dataset/{n}/tokens"], "token_share": t[f"dataset/{n}/tokens"] / max(tokens, 1),
                       "trained_tokens": t[f"dataset/{n}/trained_tokens"], "final_loss": self.last_loss.get(n),
                       "final_valid_loss": self.last_valid_loss.get(n)}
            out |= {f"dataset/{n}/{k}": v for k, v in numbers.items()}
        return out

    def state_dict(self) -> dict:
        """Packs consumed, every member's position and the member totals."""
        return {"consumed_packs": self.sampler.consumed_packs, "blend": self.sampler.state_dict(),
                "blend_totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        """Continue every member where the checkpoint left it (another mixture, which preflight allowed with
        checkpoint.reset_data_position, starts from its first packs)."""
        blend = state.get("blend")
        if blend is None or blend.get("names") != self.names:
            return
        self.sampler = self._sampler(blend, int(state.get("consumed_packs", 0)))
        # checkpoints written before the blend kept its totals kept them among the run's totals
        saved = state.get("blend_totals") or state.get("totals") or {}
        self.totals = {k: int(saved.get(k, 0)) for k in self.totals}
