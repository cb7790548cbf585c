"""The GPU check behind `bash tools/gpu_check.sh OUT`: correctness on the device, then packed vs padded throughput.

Run as `python -m tools.gpu.check OUT [--dry-run] [--budget-s S] [--layers N]` from the repository root (what
gpu_check.sh does, after setting up PYTHONPATH); `python tools/gpu/check.py ...` works from anywhere too.
Step 1 (<= 2 min): tests/test_model_backends.py under pytest on the device; 3 steps of configs/tiny_cpu.yaml (the
quickstart's tiny model, LLaMA-3 tokenizer, demo data) through `python -m megapack train` in bf16 on the device
with async checkpoints, against the same run in fp32 on the CPU (CUDA_VISIBLE_DEVICES=""), losses compared.
Step 2 (<= 5 min): tools/gpu/throughput.py per attention backend, each in its own process with its own deadline:
packed (1 and 2 packs per micro-batch) vs padded throughput, and where one packed step's time goes (breakdown.py).
Every subprocess has a timeout, so the check ends within its budget and the report holds what was measured.
`dry_run` runs the same code on the CPU: the "device" run is bf16 on the CPU and the benchmark shape is tiny.
Writes OUT/gpu_check.json and OUT/gpu_check.md after every step. The --worker-* options are internal: the driver
starts itself with them to benchmark one attention backend in a fresh process.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script (python tools/gpu/check.py) from a checkout without installing

from megapack.errors import MegapackError  # noqa: E402
from tools.gpu.breakdown import breakdown_table  # noqa: E402
from tools.gpu.report import Report  # noqa: E402

WORKER_MODULE = "tools.gpu.check"  # the benchmark workers run `python -m tools.gpu.check` in ROOT (Job's cwd)
STEP1_S, STEP2_S, MARGIN_S = 120.0, 300.0, 10.0
LOSS_TOLERANCE = 1e-2  # relative, per step, bf16 on the device against fp32 on the CPU
TRAIN_OVERRIDES = ("training.train_steps=3", "checkpoint.resume=never", "logging.tensorboard=false")


class Job:
    """A subprocess in its own session, output to a log file, killed (its whole group) at its timeout."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None) -> None:
        self.cmd, self.log, self.t0 = cmd, log, time.time()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                         start_new_session=True)

    def finish(self, deadline: float) -> tuple[int | None, float]:
        """(exit code or None on timeout, wall seconds); waits until the deadline at most."""
        try:
            rc = self.proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            rc = None
        return rc, round(time.time() - self.t0, 1)

    def tail(self, lines: int = 15) -> str:
        """The last lines of the log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def environment() -> dict:
    """Versions, device, C compiler and attention backends, without creating a CUDA context in this process."""
    import torch

    cuda = torch.cuda.is_available()
    try:
        from importlib.metadata import version

        megatron = version("megatron-core")
    except Exception:  # a --target install without metadata, or none at all
        megatron = None
    varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    backends = [name for name, ok in (("te", cuda and importlib.util.find_spec("transformer_engine") is not None),
                                      ("flash", cuda and importlib.util.find_spec("flash_attn") is not None),
                                      ("torch_varlen", cuda and varlen), ("sdpa", True)) if ok]
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": cuda, "device_count": torch.cuda.device_count() if cuda else 0,
            "megatron_core": megatron, "c_compiler": shutil.which("cc") or shutil.which("gcc"),
            "attention_backends": backends}


def backend_tests(report: Report, deadline: float, logs: Path) -> None:
    """Step 1a: pytest tests/test_model_backends.py; counts, skip reasons, status."""
    job = Job([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_model_backends.py"],
              logs / "pytest_model_backends.log")
    rc, wall = job.finish(deadline)
    text = job.log.read_text(errors="replace")
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)}
    skips = [ln.split("] ", 1)[-1] for ln in text.splitlines() if ln.startswith("SKIPPED")]
    if rc is None:
        status = "timeout"
    elif rc != 0 or counts.get("failed") or counts.get("error") or counts.get("errors"):
        status = "failed"
    else:
        status = "passed" if counts.get("passed") else "skipped"
    report.set("backend_tests", {"status": status, "exit_code": rc, "counts": counts, "skip_reasons": skips,
                                 "wall_s": wall, "summary": summary, **({"tail": job.tail()} if status != "passed"
                                                                       and status != "skipped" else {})})
    report.log(f"step 1a backend tests: {status} {counts} in {wall} s")


def _prepare_tiny(work: Path) -> tuple[Path, Path]:
    """The quickstart's tiny HF checkpoint and bfd shards (seq 512) of 128 demo conversations."""
    from megapack.demo import DemoConfig, preprocess_all, prepare_inputs

    cfg = DemoConfig(workdir=str(work), packings=("bfd",), num_samples=128, seq_length=512)
    tokenizer, data_dir, hf_dir = prepare_inputs(cfg, work)
    preprocess_all(cfg, work, tokenizer, data_dir)
    return hf_dir, work / "shards" / "bfd"


def _train_job(hf_dir: Path, shards: Path, run_dir: Path, log: Path, precision: str, cpu: bool,
               async_save: bool) -> Job:
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {}))
    cmd = [sys.executable, "-m", "megapack", "train", "--config", "configs/tiny_cpu.yaml", f"model.hf_dir={hf_dir}",
           f"data.path={shards}", f"checkpoint.dir={run_dir}", f"training.precision={precision}",
           f"checkpoint.async_save={str(async_save).lower()}", *TRAIN_OVERRIDES]
    return Job(cmd, log, env)


def _run_result(job: Job, rc: int | None, wall: float, run_dir: Path, label: str) -> dict:
    from megapack.training.run.metrics import read_metrics

    out = {"label": label, "exit_code": rc, "wall_s": wall, "losses": {}}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        out["losses"] = {str(k): v["loss"] for k, v in sorted(read_metrics(metrics).items())}
    out["checkpoint_published"] = (run_dir / "latest").is_file() and "published after step" in job.log.read_text()
    if rc != 0:
        out["tail"] = job.tail()
    return out


def step1(report: Report, work: Path, logs: Path, deadline: float, cuda: bool) -> None:
    """Step 1: backend tests, then 3 training steps on the device against fp32 on the CPU (with a GPU, both runs
    overlap the tests; on the CPU they run one after another)."""
    try:
        hf_dir, shards = _prepare_tiny(work / "tiny")
    except MegapackError as exc:  # AssetUnavailable included: no asset cache and no network
        backend_tests(report, deadline, logs)
        report.set("train_compare", {"status": "skipped", "reason": str(exc).splitlines()[0]})
        report.log(f"step 1b skipped: {exc}")
        return
    ref_dir, dev_dir = work / "train_cpu_fp32", work / "train_device_bf16"

    def start_reference() -> Job:
        return _train_job(hf_dir, shards, ref_dir, logs / "train_cpu_fp32.log", "fp32", True, False)

    def start_device() -> Job:
        return _train_job(hf_dir, shards, dev_dir, logs / "train_device_bf16.log", "bf16", False, True)

    ref, dev = (start_reference(), start_device()) if cuda else (None, None)
    backend_tests(report, deadline, logs)
    dev = dev or start_device()
    dev_rc, dev_wall = dev.finish(deadline)
    ref = ref or start_reference()
    ref_rc, ref_wall = ref.finish(deadline)
    device_label = "bf16 GPU" if cuda else "bf16 CPU (dry run)"
    result = {"device_run": _run_result(dev, dev_rc, dev_wall, dev_dir, device_label),
              "reference_run": _run_result(ref, ref_rc, ref_wall, ref_dir, "fp32 CPU"), "tolerance": LOSS_TOLERANCE}
    a, b = result["device_run"]["losses"], result["reference_run"]["losses"]
    if dev_rc != 0 or ref_rc != 0 or not a or set(a) != set(b):
        result["status"] = "failed"
        result["reason"] = f"exit codes device {dev_rc}, reference {ref_rc} (None: timed out); logs in {logs}"
    else:
        rel = max(abs(a[k] - b[k]) / abs(b[k]) for k in a)
        result["max_rel_diff"] = rel
        ok = rel <= LOSS_TOLERANCE and result["device_run"]["checkpoint_published"]
        result["status"] = "passed" if ok else "failed"
        if not cuda:
            result["reason"] = "dry run: no GPU, the 'device' run is bf16 on the CPU"
    report.set("train_compare", result)
    report.log(f"step 1b train compare: {result['status']} (max relative loss difference "
               f"{result.get('max_rel_diff', float('nan')):.2e}; {device_label} {dev_wall} s, fp32 CPU {ref_wall} s)")


def benchmark(report: Report, worker_cmd: list[str], backends: list[str], deadline: float, dry_run: bool,
              layers: int | None, work: Path, logs: Path) -> None:
    """Step 2: one worker process per backend, sharing the remaining time; same layer count for all."""
    bench = {"status": "running", "backends": {}, "notes": [
        "epoch time = median timed step x steps per epoch (a few steps timed, the epoch extrapolated)",
        "tokens/s counts real tokens only; MFU = model FLOPs of real tokens / (time x bf16 peak)"]}
    report.set("benchmark", bench)
    retried = False
    i = 0
    while i < len(backends):
        name, left = backends[i], deadline - time.time()
        if left < (10 if dry_run else 45):
            bench["backends"][name] = {"error": f"not run: {left:.0f} s left of the step's budget"}
            report.log(f"step 2 {name}: skipped, {left:.0f} s left")
            i += 1
            continue
        share = left / (len(backends) - i)
        out = work / f"bench_{name}.json"
        cmd = [*worker_cmd, "--worker-backend", name, "--worker-out", str(out),
               "--worker-deadline", f"{time.time() + share - MARGIN_S:.1f}"]
        cmd += ["--layers", str(layers)] if layers else []
        cmd += ["--dry-run"] if dry_run else []
        job = Job(cmd, logs / f"bench_{name}.log")
        rc, wall = job.finish(time.time() + share)
        res = json.loads(out.read_text()) if out.is_file() else {"error": "the worker wrote no result"}
        res.update(exit_code=rc, wall_s=wall)
        if rc != 0 and not res.get("error"):
            res["error"] = "timed out" if rc is None else f"exit code {rc}"
        if rc != 0:
            res["tail"] = job.tail()
        packed, padded = (res.get("arms", {}).get(a, {}).get("epoch_time_est_s") for a in ("packed", "padded"))
        if packed and padded:
            res["packed_over_padded_time"] = packed / padded
            res["padded_over_packed_time"] = padded / packed
        bench["backends"][name] = res
        report.set("benchmark", bench)
        if res.get("oom") and not retried and (res.get("layers") or 1) > 1:
            layers, retried = max(1, res["layers"] // 2), True
            report.log(f"step 2 {name}: out of memory at {res['layers']} layers, retrying with {layers}")
            continue
        layers = layers or res.get("layers")
        speed = f"packed/padded epoch time {res['packed_over_padded_time']:.3f}" if "packed_over_padded_time" in res \
            else f"no ratio ({res.get('error')})"
        report.log(f"step 2 {name}: {speed}, {wall} s")
        log_extras(report, name, res)
        i += 1
    ok = [r for r in bench["backends"].values() if math.isfinite(r.get("packed_over_padded_time", math.nan))]
    bench["status"] = "passed" if len(ok) == len(backends) else ("partial" if ok else "failed")
    report.set("benchmark", bench)


def log_extras(report: Report, name: str, res: dict) -> None:
    """Print a backend's micro-batch choice and the breakdown table of one packed step (also in the report)."""
    choice = res.get("micro_batch_choice") or {}
    if choice:
        rates = ", ".join(f"{k} pack(s) {_rate(v.get('tokens_per_s'))} tokens/s" for k, v in sorted(choice.items()))
        report.log(f"step 2 {name}: packed micro-batches: {rates}")
    bd = res.get("breakdown")
    if bd and not bd.get("error"):
        report.log(f"step 2 {name}: where one packed step's time goes ({bd['primary']} time, profiled):\n"
                   + "\n".join(breakdown_table(bd)))
    elif bd:
        report.log(f"step 2 {name}: no breakdown ({bd['error']})")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def run_check(out_dir: str | Path, worker_cmd: list[str], *, dry_run: bool = False, budget_s: float = 450.0,
              started_at: float | None = None, layers: int | None = None) -> dict:
    """Run steps 1 and 2 within budget_s (counted from started_at) and return the report data."""
    t0 = started_at or time.time()
    deadline = t0 + budget_s
    out_dir = Path(out_dir)
    logs = out_dir / "logs"
    report = Report(out_dir, mode="dry-run" if dry_run else "gpu", budget_s=budget_s,
                    started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)))
    env = environment()
    if not dry_run and not env["cuda_available"]:
        raise MegapackError("no CUDA device visible: run on the GPU machine, or pass --dry-run")
    if not env["c_compiler"] and not os.environ.get("TORCHDYNAMO_DISABLE"):
        os.environ["TORCHDYNAMO_DISABLE"] = "1"  # megatron's fused SwiGLU uses torch.compile, which needs cc
        env["torchdynamo_disabled"] = "no C compiler: torch.compile disabled (TORCHDYNAMO_DISABLE=1)"
    report.set("environment", env, step=False)
    report.log(f"environment: {env}")
    with tempfile.TemporaryDirectory(prefix="megapack-gpu-check-") as tmp:
        work = Path(tmp)
        step1_end = min(deadline - MARGIN_S, time.time() + STEP1_S)
        step1(report, work, logs, step1_end, env["cuda_available"])
        step2_end = min(deadline - MARGIN_S, time.time() + STEP2_S)
        benchmark(report, worker_cmd, env["attention_backends"], step2_end, dry_run, layers, work, logs)
    report.set("finished", True, step=False)
    report.log(f"done in {time.time() - t0:.0f} s: {out_dir / 'gpu_check.json'}, {out_dir / 'gpu_check.md'}")
    return report.data


def main() -> int:
    """Parse the arguments and run the check (or one benchmark worker)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="where gpu_check.json, gpu_check.md and logs/ go")
    p.add_argument("--dry-run", action="store_true", help="on the CPU with a tiny shape (no GPU needed)")
    p.add_argument("--budget-s", type=float, default=450.0, help="total seconds, counted from --started-at")
    p.add_argument("--started-at", type=float, default=None, help="epoch seconds the check started (the shell's)")
    p.add_argument("--layers", type=int, default=None, help="benchmark layers (default: as many as fit, up to 8)")
    p.add_argument("--worker-backend", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        if args.worker_backend:
            from tools.gpu.throughput import BenchSettings, dry_run_settings, run_worker

            settings = dry_run_settings() if args.dry_run else BenchSettings()
            settings.num_layers = args.layers or settings.num_layers
            result = run_worker(settings, args.worker_backend, args.worker_out, args.worker_deadline)
            return 1 if result.get("error") else 0
        data = run_check(args.out_dir, [sys.executable, "-m", WORKER_MODULE, args.out_dir], dry_run=args.dry_run,
                         budget_s=args.budget_s, started_at=args.started_at, layers=args.layers)
    except MegapackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = [k for k, v in data["steps"].items() if v.get("status") in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
