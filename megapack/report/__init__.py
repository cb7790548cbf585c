"""Report stage, after training: finished runs side by side (Table 3 columns, loss/throughput/padding figures)."""
