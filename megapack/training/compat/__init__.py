"""Workarounds that let megatron-core 0.16.1 train on CPU/gloo and with torch's AdamW (installed only where needed)."""
