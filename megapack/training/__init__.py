"""Training stage: distributed runtime, CPU backend, data loading, the loop, checkpoints and metrics."""
