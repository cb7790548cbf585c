"""One training run: batches and data sources, the step, the loop, checkpoints, stop signals and metrics."""
