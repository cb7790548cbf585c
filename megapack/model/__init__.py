"""Model stage: megatron-core GPT for LLaMA architectures, packed attention, HF weight import/export."""
from megapack.quiet import quiet_warnings

quiet_warnings()  # megatron-core announces absent optional GPU libraries at import time
