"""Convert checkpoints: `hf-to-megatron --hf-dir D --output-dir C` or `megatron-to-hf --checkpoint-dir C --output-dir D`."""
import sys

from megapack.cli import main

if __name__ == "__main__":  # dist_checkpointing.save spawns processes: the guard is required
    raise SystemExit(main(["convert", *sys.argv[1:]]))
