"""The GPU check behind `bash tools/gpu_check.sh OUT`: check (driver), report (gpu_check.json / .md), throughput
(packed vs padded training steps, step 2's worker)."""
