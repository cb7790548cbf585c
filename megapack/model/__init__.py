"""Model stage: megatron-core GPT for LLaMA architectures, packed attention, HF weight import/export."""
import warnings

# megatron-core announces at import time that optional GPU libraries are absent; on CPU that is expected noise
for _message in (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*",
                 r".*imports from `dynamic_context.py` will be removed.*", r"full scope is deprecated.*"):
    warnings.filterwarnings("ignore", message=_message)
