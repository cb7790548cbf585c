"""Stop signals (SIGUSR1 before a Slurm time limit or on preemption, SIGTERM) and the helper processes they must spare.

Slurm delivers `--signal=USR1@N` and `scancel --signal=USR1` to every process of the job step, not only to the
ranks: the checkpoint writer's helpers (megatron-core's results-queue manager, a spawned process, and the
multiprocessing resource tracker) would die of the default action and the next save fail with EOFError /
BrokenPipeError. They are started with the stop signals blocked (a blocked mask survives fork and exec), so only
the ranks see them; a rank records the signal and the loop stops at a step boundary all ranks agree on.
"""
from __future__ import annotations

import os
import signal
import threading
import time
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


def _exit_with_parent(parent: int) -> None:
    """In a helper process: exit once its rank is gone (a rank killed with SIGKILL would leave it running, and under
    Slurm's proctrack/linuxproc an orphan is no longer part of the step, so nothing would stop it)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


_manager = None


def start_checkpoint_helpers() -> None:
    """Start megatron-core's checkpoint results queue (a spawned manager process) and the multiprocessing resource
    tracker immune to stop signals, the manager ending with this process; megatron reuses the queue for every
    torch_dist save of the process."""
    global _manager
    import multiprocessing
    from multiprocessing import resource_tracker
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:  # private: megatron creates it lazily at the first save
        return
    with stop_signals_blocked():  # the tracker ignores SIGTERM itself, and unblocks it here when it returns
        resource_tracker.ensure_running()
    with stop_signals_blocked():
        _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # what megatron's queue uses
        _manager.start(_exit_with_parent, (os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()
