"""tools/bench/bench_train.py on a given run directory: the step-time breakdown table, and the missing-key error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "bench" / "bench_train.py"


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir()
    lines = [json.dumps({"kind": "train", "step": i + 1, **rec}) for i, rec in enumerate(records)]
    lines.append(json.dumps({"kind": "valid", "step": len(records), "valid_loss": 1.0}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _run(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--run-dir", str(run_dir)], capture_output=True, text=True)


def test_breakdown_table_from_run_dir(tmp_path):
    step = {"time_data_s": 0.1, "time_forward_backward_s": 0.6, "time_optimizer_s": 0.2, "time_checkpoint_s": 0.0,
            "step_time_s": 1.0}
    warmup = dict(step, time_forward_backward_s=5.6, step_time_s=6.0)  # step 1 is left out by default
    saving = dict(step, time_checkpoint_s=0.5, step_time_s=1.5)
    _write_metrics(tmp_path / "run", [warmup, step, step, saving])
    proc = _run(tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| part")}
    assert proc.stdout.startswith("3 steps of ")
    assert rows["forward+backward (`time_forward_backward_s`)"] == ["0.6000", "60.0%", "53.3% |"]
    assert rows["checkpoint (`time_checkpoint_s`)"] == ["0.0000", "0.0%", "11.1% |"]  # one save in three steps
    assert rows["rest (step time minus the parts)"] == ["0.1000", "10.0%", "8.9% |"]
    assert rows["step (`step_time_s`)"] == ["1.0000", "100.0%", "100.0% |"]


def test_missing_key_is_one_line_naming_it(tmp_path):
    _write_metrics(tmp_path / "run", [{"step_time_s": 1.0, "time_data_s": 0.1}] * 3)
    proc = _run(tmp_path / "run")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "'time_forward_backward_s'" in proc.stderr, proc.stderr
