"""megapack: packed-sequence supervised fine-tuning of LLaMA-3 with megatron-core."""

__version__ = "0.1.0"  # the one place: setup.py reads it, `megapack --version` prints it
