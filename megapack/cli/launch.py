"""`megapack launch --nproc-per-node N megapack train --config run.yaml`: torchrun whose failure is one line."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `megapack launch`."""
    parser.add_argument("--nproc-per-node", type=int, default=None, help="processes (ranks) on this node")
    parser.add_argument("--nnodes", default="1", help="number of nodes (each runs this command)")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="the first node's address for torchrun's c10d rendezvous; none: one node (standalone)")
    parser.add_argument("--rdzv-id", default="megapack", help="rendezvous id, the same on every node of a run")
    parser.add_argument("--srun-exit-code", type=int, default=None, metavar="RC",
                        help="run nothing: after srun failed with RC (examples/train.sbatch), print the failed "
                             "rank's line from --failure-dir and --log and exit with its exit code (else RC)")
    parser.add_argument("--failure-dir", default=None,
                        help="with --srun-exit-code: the MEGAPACK_FAILURE_DIR the ranks recorded their errors in")
    parser.add_argument("--log", default=None, help="with --srun-exit-code: the job's output file")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="what every rank runs, e.g. megapack train --config run.yaml [key.sub=value ...]")


def run(args: argparse.Namespace) -> int:
    """Run the command on every rank (or summarize srun's failure); the last line of a failure names the rank."""
    import sys

    from megapack.errors import MegapackError
    from megapack.training.run.launch import run_torchrun, srun_failure_line

    if args.srun_exit_code is not None:
        code, line = srun_failure_line(args.failure_dir, args.srun_exit_code, args.log)
        sys.stderr.write(f"error: {line}\n")
        return code or 1
    if not args.command:
        raise MegapackError("megapack launch: expected the command every rank runs (e.g. megapack train --config "
                            "run.yaml)")
    if args.nproc_per_node is None or args.nproc_per_node < 1:
        raise MegapackError(f"--nproc-per-node {args.nproc_per_node}: expected a positive number of processes")
    code, line = run_torchrun(args.command, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                              rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)
    if line:
        sys.stderr.write(f"error: {line}\n")
        sys.stderr.flush()
    return code
