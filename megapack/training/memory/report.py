"""The memory plan as people read it: a table, a verdict with the lever to pull, and the `train --check` refusal."""
from __future__ import annotations

from megapack.errors import MegapackError
from megapack.training.memory.estimate import GIB, check_gpu_memory_gb


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def advice(plan: dict) -> str:
    """Which lever to pull for the worst position, largest share first (model state -> TP/PP; activations ->
    recompute, micro-batch, TP with sequence parallelism)."""
    worst = max(plan["ranks"], key=lambda r: r["total_bytes"])
    state = worst["weight_bytes"] + worst["grad_bytes"] + worst["optimizer_bytes"]
    levers = []
    cp = plan["cp"]
    # long rows (16K tokens and more): context parallelism divides the activations, when the world allows it
    more_cp = (plan["seq_length"] >= 16384 and plan["seq_length"] % (4 * cp) == 0
               and plan["world_size"] % (plan["tp"] * plan["pp"] * cp * 2) == 0)
    act = ["training.recompute=selective" if plan["recompute"] == "none" and plan["device"] == "cpu" else None,
           "training.recompute=full" if plan["recompute"] != "full" else None,
           f"parallel.cp={cp * 2}" if more_cp else None,
           f"training.micro_batch_size={plan['micro_batch_size'] // 2}" if plan["micro_batch_size"] > 1 else None,
           "parallel.sequence_parallel=true" if plan["tp"] > 1 and not plan["sequence_parallel"] else None]
    model = [f"parallel.tp={plan['tp'] * 2}" if plan["tp"] < 8 else None, f"parallel.pp={plan['pp'] * 2}",
             "more GPUs (the optimizer state is sharded over DP)"]
    ordered = act + model if worst["activation_bytes"] > state else model + act
    levers = [lever for lever in ordered if lever]
    return (f"model state {_gib(state)} GiB, activations {_gib(worst['activation_bytes'])} GiB; pull a lever: "
            + ", ".join(levers))


def verdict(plan: dict) -> str:
    """One line: fits or not, the worst position's bytes against the limit, and the lever when it does not fit."""
    w = plan["worst"]
    where = f"rank position tp={w['tp_rank']} pp={w['pp_rank']}"
    need = f"{_gib(w['total_bytes'])} GiB ({w['total_bytes']:,} bytes)"
    limit = (f"the limit {_gib(plan['limit_bytes'])} GiB ({plan['limit_bytes']:,} bytes: "
             f"{plan['gpu_memory_bytes'] / GIB:g} GiB per GPU less 10% and 1 GiB)")
    if plan["fits"]:
        return f"fits: the fullest, {where}, needs {need}, under {limit}"
    return f"does not fit: {where} needs {need}, over {limit}; {advice(plan)}"


def format_plan(plan: dict) -> str:
    """A readable table (GiB per position) with the layout above it and the verdict as its last line."""
    head = (f"{plan['total_parameters']:,} parameters (+{plan['vocab_padding_parameters']:,} vocabulary padding); "
            f"world {plan['world_size']} = TP {plan['tp']} x CP {plan['cp']} x PP {plan['pp']}"
            + (f" (VPP {plan['vpp']})" if plan["vpp"] else "") + f" x DP {plan['dp']}; "
            f"{plan['micro_batch_size']} x {plan['seq_length']} tokens per micro-batch"
            + (f" (rows up to {plan['row_tokens']:,} with CP padding, {plan['tokens_per_rank']:,} per CP rank)"
               if plan["cp"] > 1 else "") + f", {plan['num_microbatches']} "
            f"micro-batches per step; recompute {plan['recompute']}; "
            f"{'bf16' if plan['activation_bytes_per_value'] == 2 else 'fp32'}, {plan['device']}")
    cp_ranks = "0" if plan["cp"] == 1 else f"0-{plan['cp'] - 1}"  # every CP rank of a position needs the same
    rows = [[str(r["tp_rank"]), cp_ranks, str(r["pp_rank"]), f"{r['parameters']:,}", str(r["layers"]),
             _gib(r["weight_bytes"]), _gib(r["grad_bytes"]), _gib(r["optimizer_bytes"]),
             f"{r['microbatches_in_flight']:g}", _gib(r["gathered_kv_bytes"]), _gib(r["activation_bytes"]),
             _gib(r["total_bytes"])] for r in plan["ranks"]]
    header = ["tp", "cp", "pp", "parameters", "layers", "weights GiB", "grads GiB", "optimizer GiB", "in flight",
              "K/V GiB", "activations GiB", "total GiB"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(header)]
    table = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *rows]]
    footnote = ("in flight: micro-batches whose activations the rank holds at once in the 1F1B schedule (pp - pp "
                "rank; interleaved with parallel.vpp: counted in chunks of 1/vpp of the stage); activations = in "
                "flight x one micro-batch's saved tensors + the largest transient; K/V: of those saved tensors, one "
                "micro-batch's keys and values of the whole row, all-gathered over the CP group (parallel.cp)")
    return "\n".join([head, *table, footnote, verdict(plan)])


def check_fits(plan: dict) -> None:
    """Raise the one-line refusal (rank position, bytes, limit, lever) when a position does not fit."""
    if not plan["fits"]:
        raise MegapackError(f"parallel: {verdict(plan)}")


def gpu_memory_for_check(gpu_memory_gb: float | None) -> float | None:
    """GiB to check `train --check` against: the flag, else this machine's GPU; None (no check) on a CPU machine."""
    import torch

    if gpu_memory_gb is not None:
        return check_gpu_memory_gb(gpu_memory_gb)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    return None


def check_run_memory(config, world_size: int, gpu_memory_gb: float | None) -> dict | None:
    """`train --check`'s memory check: refuse (one line) a layout that does not fit; None where there is nothing to
    compare with (a CPU machine and no --gpu-memory-gb)."""
    from megapack.training.memory.estimate import plan_config

    gib = gpu_memory_for_check(gpu_memory_gb)
    if gib is None:
        return None
    plan = plan_config(config, world_size, gib)
    check_fits(plan)
    return {"fits": True, "worst": plan["worst"], "limit_bytes": plan["limit_bytes"],
            "gpu_memory_bytes": plan["gpu_memory_bytes"]}
