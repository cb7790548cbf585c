"""How the demos start runs: a run config written where its run logs, and `megapack train` under torchrun (CPU)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from megapack.errors import MegapackError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_run_config(config: dict) -> Path:
    """Write a run config as <logging.dir>/config.yaml (an old summary.json there removed); returns its path."""
    run_dir = Path(config["logging"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def launch(paths: list[Path], nproc: int, log: Path) -> list[dict]:
    """`megapack train` on the run configs at `paths`, one after another in one torchrun launch of nproc CPU
    processes, the log to `log` (rank 0's run and step lines also to the terminal); returns their summary.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", "-m", "megapack", "train"]
    for path in paths:
        cmd += ["--config", str(path)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        for line in proc.stdout:  # the whole log goes to the file; rank 0's run and step lines also to the terminal
            fh.write(line)
            if line.startswith(("training ", "step ")):
                print("  " + line.split(": {")[0].rstrip(), flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise MegapackError(f"training failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
    return [json.loads((path.parent / "summary.json").read_text()) for path in paths]
