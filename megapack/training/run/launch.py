"""Start a run's ranks and, when one fails, end with one line: which rank, its error (or where its output is) and the
exit code, instead of torchrun's ChildFailedError traceback or srun's scattered task lines.

A rank that stops on an error records its one line (`record_failure`, called by the CLI's error path): in the error
file torchrun gives each worker (TORCHELASTIC_ERROR_FILE, torch's format, so a plain `torchrun` shows the line too)
and, under srun, in `$MEGAPACK_FAILURE_DIR/rank-<R>.json` (examples/train.sbatch sets it in the submit directory,
which every node sees). `megapack launch` runs torchrun's elastic agent in this process and turns its
ChildFailedError into that line (`run_torchrun`); after a failed srun it reads the recorded lines and srun's own task
lines in the job log (`srun_failure_line`).

The cause among several failed ranks: the earliest one-line error (a MegapackError names what to fix), else a rank
killed by a signal other than the launcher's SIGTERM (out of memory, kill -9), else the earliest unexpected exception
(often a rank that lost its peer), else the lowest rank; within each, a rank that exited by itself before one the
launcher stopped (with SIGTERM, as it stops the others once a rank failed).
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

FAILURE_DIR_ENV = "MEGAPACK_FAILURE_DIR"
TORCH_ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
SBATCH_BANNER = "[megapack] job "  # examples/train.sbatch's first line of every (re)start in the job log
# srun's line for a failed task, e.g. `srun: error: node1: task 1: Killed`, `... tasks 0-1: Exited with exit code 1`
SRUN_TASK_LINE = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.+)$")


@dataclass
class Failure:
    """One failed rank as the launcher saw it."""

    rank: int
    exitcode: int | None = None  # the process's (negative: killed by that signal); None where unknown (srun)
    message: str | None = None  # the rank's one line; None when it recorded none (killed, or died in a library)
    kind: str = ""  # "error" (MegapackError), "exception" (anything else the rank raised), "" (nothing recorded)
    timestamp: float = float("inf")


def _this_rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def record_failure(message: str, kind: str = "error") -> None:
    """Record this rank's one-line error for its launcher, when it runs under one (nothing otherwise). The JSON is
    torch's error-file format (`message.message`, `message.extraInfo`: a plain torchrun shows the line as the root
    cause's traceback) plus our `megapack` kind and a precise timestamp."""
    targets = [Path(os.environ[TORCH_ERROR_FILE_ENV])] if os.environ.get(TORCH_ERROR_FILE_ENV) else []
    if os.environ.get(FAILURE_DIR_ENV):
        targets.append(Path(os.environ[FAILURE_DIR_ENV]) / f"rank-{_this_rank()}.json")
    now = time.time()
    record = json.dumps({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                       "timestamp": str(int(now))}},
                         "megapack": kind, "timestamp": now})
    for path in targets:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(record)
        except OSError:
            pass  # the line is on the rank's stderr anyway


def _read_record(data) -> tuple[str | None, str, float | None]:
    """(message, kind, timestamp) of an error file's JSON: ours, or torch's (`@record`: an exception)."""
    if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
        return None, "", None  # no file (torch's placeholder), or not a format we know
    lines = str(data["message"].get("message") or "").strip().splitlines()
    kind = data.get("megapack") if data.get("megapack") in ("error", "exception") else "exception"
    stamp = data.get("timestamp") if "megapack" in data else None
    return (lines[0] if lines else None), kind, (float(stamp) if isinstance(stamp, (int, float)) else None)


def root_cause(failures: list[Failure]) -> Failure:
    """The failure to report (see the module's docstring for the order)."""
    def order(f: Failure) -> tuple:
        stopped = f.exitcode == -signal.SIGTERM  # by the launcher, once another rank had failed
        killed = f.exitcode is not None and f.exitcode < 0 and not stopped
        group = 0 if f.kind == "error" else 1 if killed and not f.message else 2 if f.kind == "exception" else 3
        return group, stopped, f.timestamp, f.rank

    return min(failures, key=order)


def exit_code(f: Failure) -> int:
    """The shell's exit code for a rank's: 128 + N when killed by signal N, 1 when unknown."""
    if f.exitcode is None or f.exitcode == 0:
        return 1
    return 128 - f.exitcode if f.exitcode < 0 else f.exitcode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def failure_line(f: Failure, where: str) -> str:
    """`rank R ...: <its line>`, or where its output is when it recorded none (`where`: "above", "in <log>")."""
    if f.exitcode is not None and f.exitcode < 0:
        head = f"rank {f.rank} was killed by {_signal_name(-f.exitcode)} (exit code {exit_code(f)})"
    elif f.exitcode is not None:
        head = f"rank {f.rank} failed with exit code {f.exitcode}"
    else:
        head = f"rank {f.rank} failed"
    return f"{head}: {f.message}" if f.message else f"{head}; it printed no error line: its output is {where}"


def run_torchrun(command: list[str], *, nproc_per_node: int, nnodes: str = "1", rdzv_endpoint: str | None = None,
                 rdzv_id: str = "megapack") -> tuple[int, str | None]:
    """Run `command` on nproc_per_node processes per node with torchrun's elastic agent (standalone on one node, c10d
    rendezvous at rdzv_endpoint across nodes); (exit code, None) when every rank succeeded, else (the failed rank's
    exit code, its one line)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api as process_api
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    from megapack.errors import MegapackError

    argv = [f"--nproc-per-node={nproc_per_node}"]
    if rdzv_endpoint:
        argv += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id}"]
    elif str(nnodes) != "1":
        raise MegapackError(f"--nnodes {nnodes}: needs --rdzv-endpoint (the first node's host:port)")
    else:
        argv.append("--standalone")
    argv += ["--no-python", *command]
    # the agent's own lines about the failure ("failed (exitcode: 1) local_rank: ...", "Sending process ... closing
    # signal SIGTERM") say less than our line, which replaces them
    process_api.logger.addFilter(lambda record: not str(record.msg).startswith(("failed (exitcode", "Sending process")))
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as exc:
        failures = []
        for rank, pf in exc.failures.items():
            message, kind, stamp = _read_record(getattr(pf, "error_file_data", None))
            failures.append(Failure(rank=int(rank), exitcode=pf.exitcode, message=message, kind=kind,
                                    timestamp=stamp if stamp is not None else float(pf.timestamp)))
        root = root_cause(failures)
        return exit_code(root), failure_line(root, "above")
    except SignalException as exc:
        return 128 + int(exc.sigval), f"the launcher got {_signal_name(int(exc.sigval))}: every rank was stopped"
    except RendezvousError as exc:
        raise MegapackError(f"--rdzv-endpoint {rdzv_endpoint}: the rendezvous failed ({exc})") from None
    return 0, None


def read_failures(failure_dir: str | Path) -> list[Failure]:
    """The failures the ranks recorded in failure_dir (`rank-<R>.json`)."""
    out = []
    for path in sorted(Path(failure_dir).glob("rank-*.json")):
        try:
            message, kind, stamp = _read_record(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if message is not None:
            out.append(Failure(rank=int(path.stem.split("-")[1]), message=message, kind=kind, timestamp=stamp or 0))
    return out


def _ranks(text: str) -> list[int]:
    """srun's task list (`1`, `0-1`, `0,2-3`) as ranks."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


SRUN_SIGNALS = {"Killed": signal.SIGKILL, "Terminated": signal.SIGTERM, "Aborted": signal.SIGABRT,
                "Segmentation fault": signal.SIGSEGV, "Bus error": signal.SIGBUS}


def _srun_task_failures(log: Path) -> list[Failure]:
    """srun's task lines of the job's last (re)start, in order, as failures (no message: the output is in the log)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    starts = [i for i, line in enumerate(lines) if line.startswith(SBATCH_BANNER)]
    out = []
    for line in lines[starts[-1] if starts else 0:]:
        match = SRUN_TASK_LINE.match(line.strip())
        if match:
            what = match.group(3).strip().rstrip(".")
            code = re.search(r"exit code (\d+)", what)
            exitcode = int(code.group(1)) if code else -SRUN_SIGNALS[what] if what in SRUN_SIGNALS else None
            out += [Failure(rank=rank, exitcode=exitcode, timestamp=len(out)) for rank in _ranks(match.group(2))]
    return out


def srun_failure_line(failure_dir: str | Path | None, srun_exit_code: int,
                      log: str | Path | None = None) -> tuple[int, str]:
    """(exit code, line) after srun exited with srun_exit_code: the recorded error of the failed rank, else the first
    task srun reported, else srun's code; with where the output is (the job log). The exit code is the failed rank's
    when srun reported it (srun's own is often 143: it stopped the other ranks with SIGTERM), else srun's."""
    recorded = read_failures(failure_dir) if failure_dir else []
    tasks = _srun_task_failures(Path(log)) if log else []
    where = f"in {log}" if log else "in the job's output"
    for f in recorded:  # what srun says of the rank: a recorded rank it stopped (Terminated) is not the cause
        f.exitcode = next((t.exitcode for t in tasks if t.rank == f.rank), None)
    errors = [f for f in recorded if f.kind == "error"]
    if errors or (recorded and not tasks):
        root = root_cause(errors or recorded)
    elif tasks:
        root = root_cause([t for t in tasks if t.exitcode != -signal.SIGTERM] or tasks)
        root.message = next((f.message for f in recorded if f.rank == root.rank), None)
    else:
        return srun_exit_code, (f"srun failed with exit code {srun_exit_code} and no rank recorded an error: the "
                                f"output is {where}")
    line = failure_line(root, where)
    line += f" (srun exit code {srun_exit_code}" + (f"; job log {log})" if root.message and log else ")")
    return (exit_code(root) if root.exitcode is not None else srun_exit_code), line
