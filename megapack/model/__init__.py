"""Model stage: megatron-core GPT for LLaMA architectures, packed attention, HF weight import/export."""
