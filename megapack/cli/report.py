"""`megapack report RUN_DIR... [--output DIR]`: runs side by side in report.md with PNG figures."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the report flags."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (metrics.jsonl + summary.json) or folders of them, e.g. runs/demo/train")
    parser.add_argument("--output", metavar="DIR",
                        help="where report.md and the figures go (default: report/ beside the first RUN_DIR, "
                             "e.g. runs/demo/report for runs/demo/train)")
    parser.add_argument("--baseline", metavar="RUN", default=None,
                        help="with eval results (`megapack eval` on the runs): the run whose scores the others are "
                             "compared with, by its name in the report (e.g. padding)")


def run(args: argparse.Namespace) -> int:
    """Write the report and print where it is."""
    from megapack.report.document import write_report

    report = write_report(args.runs, args.output, args.baseline)
    print(f"{len(report.runs)} runs ({', '.join(r.name for r in report.runs)}), {len(report.figures)} figures: "
          f"wrote {report.path}")
    return 0
