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

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megapack import seeds
from megapack.errors import MegapackError
from megapack.training.preflight.config import TrainConfig
from megapack.training.run.batch import PackBatches, TrainSampler, validation_batches


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

    def order(self, member: int, epoch: int) -> np.ndarray:
        """The pack order of a member's epoch."""
        return seeds.rng(self.seed, "blend_order", member, epoch).permutation(len(self.lengths[member]))

    def next(self) -> tuple[int, int]:
        """The next (member, pack index); advances the position."""
        since = [t - b for t, b in zip(self.tokens, self.base)]
        total = sum(since)
        m = max(range(len(since)), key=lambda j: self.weights[j] * total - since[j])  # first of equal deficits
        epoch, pos = divmod(self.packs[m], len(self.lengths[m]))
        if self._orders[m][0] != epoch:
            self._orders[m] = (epoch, self.order(m, epoch))
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
                 dp_rank: int, dp_size: int, seed: int, consumed_packs: int = 0) -> None:
        super().__init__(sum(len(x) for x in schedule.lengths), global_batch_size, micro_batch_size, dp_rank,
                         dp_size, seed, consumed_packs)
        self.schedule, self.names = schedule, list(names)
        self.step_packs: list[tuple[int, int]] = []  # the whole global batch of the last step (every rank alike)

    def next_step(self) -> list[list[tuple[int, int]]]:
        """This DP rank's micro-batches of (member, pack) for the next step; advances every member's position."""
        self.step_packs = [self.schedule.next() for _ in range(self.gbs)]
        return super().next_step()

    def _pack(self, k: int) -> tuple[int, int]:
        return self.step_packs[k - self.consumed_packs]

    def state_dict(self) -> dict:
        """The data position of every member (goes into the checkpoint next to consumed_packs)."""
        return {"names": self.names} | self.schedule.state_dict()

    def member_positions(self) -> dict[str, dict]:
        """Per member: its weight, packs consumed and epochs (fractional) so far."""
        s = self.schedule
        return {name: {"weight": s.weights[m], "packs": s.packs[m], "epochs": s.packs[m] / len(s.lengths[m])}
                for m, name in enumerate(self.names)}


class BlendDataset:
    """The members' train splits behind one `dataset[(member, pack)]`."""

    def __init__(self, members: Sequence) -> None:
        self.members = list(members)
        self.num_members = len(self.members)

    def __len__(self) -> int:
        return sum(len(m) for m in self.members)

    def __getitem__(self, key: tuple[int, int]):
        member, pack = key
        return self.members[member][pack]


class BlendBatches(PackBatches):
    """PackBatches of a blend: the blended train sequence, and one validation split per member."""

    def __init__(self, train: BlendDataset, valids: list, sampler: BlendSampler, **kwargs) -> None:
        super().__init__(train, None, sampler, **kwargs)
        self.valids = valids

    def member_validation(self, member: int, micro_batch_size: int, max_batches: int | None):
        """(iterator, count) over a member's validation split, or None without one."""
        valid = self.valids[member]
        if valid is None or len(valid) == 0:
            return None
        index_lists = validation_batches(len(valid), micro_batch_size, self.sampler.dp_rank, self.sampler.dp_size,
                                         max_batches)
        return self._batches(valid, index_lists), len(index_lists)


# ---------------------------------------------------------------------------------------------- preflight

def _member_key(i: int) -> str:
    return f"data.blend[{i}].path"


def blend_preflight(config: TrainConfig) -> tuple[dict, list, dict, list[dict]]:
    """Read and cross-check every member's metadata: (first member's meta with the blend's packing, shard sets,
    data identity, members). Members must share seq_length, pad_to_multiple, tokenizer identity, pad id and
    padded/packed layout; a difference is one line naming the member path and the value."""
    from megapack.data.packs.shards import read_meta
    from megapack.training.preflight.plan import data_identity, tokenizer_identity

    data = config.data
    metas = [read_meta(m.path) for m in data.blend]
    first = metas[0]
    ref = f"{_member_key(0)} {data.blend[0].path}"
    pad_ref = ("data.pad_to_multiple", data.pad_to_multiple) if data.pad_to_multiple is not None \
        else (ref, first.get("pad_to_multiple"))
    checks = [  # (what, value of a member's meta, where the expected value comes from, the expected value)
        ("seq_length", lambda meta: int(meta.get("seq_length", data.seq_length)), "data.seq_length", data.seq_length),
        ("pad_to_multiple", lambda meta: meta.get("pad_to_multiple"), *pad_ref),
        ("tokenizer identity", tokenizer_identity, ref, tokenizer_identity(first)),
        ("pad_id", lambda meta: meta.get("pad_id"), ref, first.get("pad_id")),
        ("padding arm", lambda meta: meta.get("packing") == "padding", ref, first.get("packing") == "padding"),
    ]
    sets, members = [], []
    for i, (member, meta) in enumerate(zip(data.blend, metas)):
        for what, value, against, expected in checks:
            if value(meta) != expected:
                raise MegapackError(f"{_member_key(i)}: {member.path} has {what} {value(meta)!r}, but {against} "
                                    f"has {expected!r}; every blend member needs the same {what}")
        splits = meta.get("splits", {})
        if data.train_split not in splits:
            raise MegapackError(f"{_member_key(i)}: {Path(member.path) / 'meta.json'} has no split "
                                f"{data.train_split!r} (has: {', '.join(splits) or 'none'})")
        read = [data.train_split] + ([data.valid_split] if data.valid_split and data.valid_split in splits else [])
        sets.append((_member_key(i), Path(member.path), meta, read))
        members.append({"name": member.name, "path": member.path, "weight": member.weight,
                        "train_packs": int(splits[data.train_split]["num_packs"])})
    total = sum(m["weight"] for m in members)
    for m in members:
        m["weight"] /= total
    packings = list(dict.fromkeys(str(meta.get("packing", "unknown")) for meta in metas))
    meta = dict(first, packing="+".join(packings))
    identity = {"blend": [{"name": m["name"]} | data_identity(x) for m, x in zip(members, metas)],
                "packing": meta["packing"], "seq_length": first.get("seq_length")}
    return meta, sets, identity, members


def identity_change(saved: dict, identity: dict) -> str:
    """What differs between a checkpoint's data identity and a blend's, in a few words."""
    old, new = saved.get("blend") or [], identity["blend"]
    names_old, names_new = [m["name"] for m in old], [m["name"] for m in new]
    if names_old != names_new:
        return f"members {', '.join(names_old) or 'none (data.path)'} -> {', '.join(names_new)}"
    return "other packs in " + ", ".join(n for a, b, n in zip(old, new, names_new) if a != b)


# ---------------------------------------------------------------------------------------------- training side

def build_blend_data(config: TrainConfig, plan, device, consumed_packs: int, state: dict | None, log) -> BlendBatches:
    """The members' shards, the blend sampler at the checkpoint's position, TP broadcast of micro-batches."""
    from megatron.core import parallel_state as ps

    from megapack.data.packs.shards import ShardDataset

    data = config.data
    trains = [ShardDataset(m["path"], split=data.train_split) for m in plan.blend]
    valids = []
    for m in plan.blend:
        try:
            valids.append(ShardDataset(m["path"], split=data.valid_split) if data.valid_split else None)
        except MegapackError as exc:
            log(f"no validation for blend member {m['name']}: {exc}")
            valids.append(None)
    if state is not None and state.get("names") != [m["name"] for m in plan.blend]:
        state = None  # another mixture (preflight allowed it: checkpoint.reset_data_position)
    schedule = BlendSchedule([t.pack_lengths(real=True) for t in trains], [m["weight"] for m in plan.blend],
                             config.training.seed, state)
    if schedule.reweighted:
        log("data.blend: the weights differ from the checkpoint's; every member continues where it was, the "
            "shares count from here")
    sampler = BlendSampler(schedule, [m["name"] for m in plan.blend], plan.global_batch_size,
                           plan.micro_batch_size, ps.get_data_parallel_rank(), plan.dp, config.training.seed,
                           consumed_packs if state is not None else 0)
    return BlendBatches(BlendDataset(trains), valids, sampler, padded=plan.padded,
                        reduction=config.training.loss_reduction, pad_id=plan.pad_id, row_multiple=plan.row_multiple,
                        tp_src=ps.get_tensor_model_parallel_src_rank(), tp_group=ps.get_tensor_model_parallel_group(),
                        is_tp_src=ps.get_tensor_model_parallel_rank() == 0, device=device)


def member_report(losses, weight, member, num_members: int):
    """Per member of one micro-batch: [sum of weighted losses, sum of weights, trained tokens, real tokens]."""
    import torch

    weight, member = weight.reshape(-1).to(torch.float32), member.reshape(-1)
    ids = member.clamp(min=0)
    rows = torch.stack([losses.float().reshape(-1) * weight, weight, (weight > 0).float(),
                        (member >= 0).float()], dim=1)
    return torch.zeros(num_members, 4, dtype=torch.float32, device=rows.device).index_add_(0, ids, rows).detach()


def reduce_members(outputs: list, num_members: int, device) -> dict:
    """{"members": per member [loss, trained tokens, real tokens]} summed over micro-batches, stages and DP ranks
    ({} without a blend); the loss is None for a member with no trained token in the step."""
    if not num_members:
        return {}
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    total = torch.zeros(num_members, 4, dtype=torch.float64, device=device)
    for item in outputs:
        if "member loss" in item:
            total += item["member loss"].to(torch.float64)
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())  # only the last stage is non-zero
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return {"members": [[float(s) / w if w > 0 else None, int(t), int(r)] for s, w, t, r in total.tolist()]}


def validate_blend(trainer) -> float | None:
    """Each member's validation loss (as a run on that member alone computes it) and their weighted mean; logged."""
    from megapack.training.run.loop import row_length
    from megapack.training.run.step import evaluate

    data, plan = trainer.data, trainer.plan
    losses = {}
    for m, member in enumerate(plan.blend):
        batches = data.member_validation(m, plan.micro_batch_size, trainer.config.training.eval_max_batches)
        if batches is not None:
            losses[member["name"]] = evaluate(trainer.parts.model, *batches, row_length(plan), trainer.env.device)
    if not losses:
        return None
    weights = {m["name"]: m["weight"] for m in plan.blend if m["name"] in losses}
    loss = sum(weights[n] * v for n, v in losses.items()) / sum(weights.values())
    trainer.metrics.record_validation(trainer.iteration, loss, members=losses)
    return loss
