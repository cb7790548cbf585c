"""The GPU check's report: one dict, rewritten as OUT/gpu_check.json and OUT/gpu_check.md after every change."""
from __future__ import annotations

import time
from pathlib import Path

from megapack.atomic import write_json_atomic, write_text_atomic
from tools.gpu.breakdown import breakdown_table


class Report:
    """Everything the check prints lands here too; `set` and `log` rewrite both files at once (a kill leaves them)."""

    def __init__(self, out_dir: str | Path, **header) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.data: dict = {**header, "elapsed_s": 0.0, "finished": False, "steps": {}, "log": []}
        self.write()

    def log(self, text: str) -> None:
        """Print a line and keep it in the report."""
        print(text, flush=True)
        self.data["log"].append(f"[{time.time() - self.t0:6.1f}s] {text}")
        self.write()

    def set(self, key: str, value, step: bool = True) -> None:
        """Store a step's result (under `steps`) or a top-level value, then write."""
        (self.data["steps"] if step else self.data)[key] = value
        self.write()

    def write(self) -> None:
        """Rewrite gpu_check.json and gpu_check.md atomically."""
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        write_json_atomic(self.out_dir / "gpu_check.json", self.data)
        write_text_atomic(self.out_dir / "gpu_check.md", markdown(self.data))


def _fmt(value, spec: str = "{}") -> str:
    return "-" if value is None else spec.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(data: dict) -> str:
    """The report as Markdown: environment, step 1 (tests, loss comparison), step 2 (benchmark table), log."""
    out = [f"# megapack GPU check ({data.get('mode', '?')})", ""]
    env = data.get("environment") or {}
    out += [f"- {k}: {v}" for k, v in env.items()]
    out += [f"- elapsed: {data['elapsed_s']} s of a {data.get('budget_s')} s budget; finished: {data['finished']}", ""]
    steps = data["steps"]
    tests = steps.get("backend_tests")
    if tests:
        out += ["## Step 1a: tests/test_model_backends.py", "",
                f"status **{tests['status']}**, counts {tests.get('counts')}, {tests.get('wall_s')} s", ""]
        out += [f"- skipped: {r}" for r in tests.get("skip_reasons", [])]
        out.append("")
    cmp_ = steps.get("train_compare")
    if cmp_:
        out += ["## Step 1b: 3 training steps, device vs CPU fp32", "", f"status **{cmp_['status']}**"
                + (f": {cmp_['reason']}" if cmp_.get("reason") else ""), ""]
        dev, ref = cmp_.get("device_run") or {}, cmp_.get("reference_run") or {}
        dev_l, ref_l = dev.get("losses") or {}, ref.get("losses") or {}
        rows = []
        for step in sorted(set(dev_l) | set(ref_l), key=int):
            a, b = dev_l.get(step), ref_l.get(step)
            rel = abs(a - b) / abs(b) if a is not None and b else None
            rows.append([str(step), _fmt(a, "{:.6f}"), _fmt(b, "{:.6f}"), _fmt(rel, "{:.2e}")])
        if rows:
            out += _table(["step", f"loss {dev.get('label', 'device')}", f"loss {ref.get('label', 'reference')}",
                           "relative difference"], rows)
            out += ["", f"max relative difference {_fmt(cmp_.get('max_rel_diff'), '{:.2e}')} "
                        f"(tolerance {cmp_.get('tolerance')}); async checkpoint published: "
                        f"{dev.get('checkpoint_published')}", ""]
    bench = steps.get("benchmark")
    if bench:
        out += _bench_markdown(bench)
    out += ["## Log", "", "```", *data["log"], "```", ""]
    return "\n".join(out)


def _bench_markdown(bench: dict) -> list[str]:
    out = ["## Step 2: packed vs padded training throughput", "", f"status **{bench['status']}**"
           + (f": {bench['reason']}" if bench.get("reason") else ""), ""]
    out += [f"- {line}" for line in bench.get("notes", [])]
    out.append("")
    rows = []
    for name, res in bench.get("backends", {}).items():
        arms = res.get("arms", {})
        for arm in ("packed", "packed_mb2", "padded"):
            a = arms.get(arm)
            if not a:
                rows.append([name, arm, "-", "-", "-", "-", "-", "-", "-", res.get("error") or "not run"])
                continue
            mem = a.get("peak_memory_bytes")
            rows.append([
                name, arm, _fmt(res.get("layers")), _fmt(a.get("tokens_per_s"), "{:,.0f}"),
                _fmt(a.get("mfu"), "{:.1%}"),
                _fmt(mem / 2**30 if mem else None, "{:.1f}"), _fmt(a.get("median_step_s"), "{:.3f}"),
                f"{a.get('timed_steps')}/{a.get('steps_per_epoch')}", _fmt(a.get("epoch_time_est_s"), "{:.1f}"),
                _fmt(a.get("padding_fraction"), "{:.1%}"),
            ])
        if res.get("packed_over_padded_time") is not None:
            rows.append([name, "packed / padded", "", "", "", "", "", "",
                         _fmt(res["packed_over_padded_time"], "{:.3f}"),
                         f"speedup {res['padded_over_packed_time']:.2f}x"])
    if rows:
        out += _table(["backend", "arm", "layers", "tokens/s", "MFU", "peak GiB", "median step (s)",
                       "timed/epoch steps", "epoch est. (s)", "padding"], rows)
        out.append("")
    return out + _choice_markdown(bench) + _breakdown_markdown(bench)


def _choice_markdown(bench: dict) -> list[str]:
    """The packed arm's real tokens/s at 1 and 2 packs per micro-batch, per backend."""
    rows = []
    for name, res in bench.get("backends", {}).items():
        for k, c in sorted((res.get("micro_batch_choice") or {}).items()):
            mem = c.get("peak_memory_bytes")
            rows.append([name, k, _fmt(c.get("micro_batches_per_step")), _fmt(c.get("tokens_per_s"), "{:,.0f}"),
                         _fmt(c.get("median_step_s"), "{:.3f}"), _fmt(mem / 2**30 if mem else None, "{:.1f}")])
    if not rows:
        return []
    return ["### Micro-batch choice (packed arm)", "", *_table(
        ["backend", "packs per micro-batch", "micro-batches per step", "tokens/s", "median step (s)", "peak GiB"],
        rows), ""]


def _breakdown_markdown(bench: dict) -> list[str]:
    """Per backend: where one profiled packed step's time goes, by phase."""
    out = []
    for name, res in bench.get("backends", {}).items():
        bd = res.get("breakdown")
        if not bd:
            continue
        out += [f"### Where one packed step's time goes: {name}", ""]
        if bd.get("error"):
            out += [f"not measured: {bd['error']}", ""]
            continue
        out += [f"torch.profiler over one packed step ({bd['wall_ms']:.1f} ms wall with profiling, {bd['events']} "
                f"events); shares of {bd['primary']} time, 'other' holding what no phase claims", ""]
        out += breakdown_table(bd) + [""]
    return out
