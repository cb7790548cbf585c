"""Stop signals (SIGUSR1 before a Slurm time limit or on preemption, SIGTERM) and the helper processes they must spare.

Slurm delivers `--signal=USR1@N` and `scancel --signal=USR1` to every process of the job step, not only to the
ranks: the checkpoint writer's helpers (megatron-core's results-queue manager, a spawned process, and the
multiprocessing resource tracker) would die of the default action and the next save fail with EOFError /
BrokenPipeError. They are started with the stop signals blocked (a blocked mask survives fork and exec), so only
the ranks see them; a rank records the signal and the loop stops at a step boundary all ranks agree on.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _handler(signum, _frame) -> None:
    _received.append(signum)


def install_stop_handlers() -> None:
    """Record SIGTERM/SIGUSR1 instead of dying (idempotent; first thing in `megapack train`, so a signal that
    arrives while the model loads is kept for the first step boundary)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not _handler:
                signal.signal(sig, _handler)


def received() -> int | None:
    """The first stop signal this process received since the last reset (None: none)."""
    return _received[0] if _received else None


def reset_stop_signals() -> None:
    """Forget the received stop signals (a run has acted on them)."""
    _received.clear()


@contextmanager
def stop_signals_blocked():
    """Block the stop signals in this thread; processes started inside inherit the block (this one gets the pending
    signals when the block ends)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_checkpoint_helpers() -> None:
    """Start megatron-core's checkpoint results-queue manager (and the resource tracker) immune to stop signals;
    megatron reuses this queue for every torch_dist save of the process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    with stop_signals_blocked():
        filesystem_async._get_write_results_queue()  # private: megatron starts it lazily at the first save
