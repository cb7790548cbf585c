"""GPU check driver (run by tools/gpu_check.sh): correctness on the device, then packed vs padded throughput.

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md after every step. The --worker-* options are internal: the
driver starts itself with them to benchmark one attention backend in a fresh process.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megapack.errors import MegapackError  # noqa: E402


def main() -> int:
    """Parse the arguments and run the check (or one benchmark worker)."""
    p = argparse.ArgumentParser(description=__doc__)
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
            from megapack.training.bench import BenchSettings, dry_run_settings, run_worker

            settings = dry_run_settings() if args.dry_run else BenchSettings()
            settings.num_layers = args.layers or settings.num_layers
            result = run_worker(settings, args.worker_backend, args.worker_out, args.worker_deadline)
            return 1 if result.get("error") else 0
        from megapack.training.gpu_check import run_check

        data = run_check(args.out_dir, [sys.executable, str(Path(__file__).resolve()), args.out_dir],
                         dry_run=args.dry_run, budget_s=args.budget_s, started_at=args.started_at,
                         layers=args.layers)
    except MegapackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = [k for k, v in data["steps"].items() if v.get("status") in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
