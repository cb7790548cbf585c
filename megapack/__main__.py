"""`python -m megapack` runs the megapack command."""
import sys

from megapack.cli import main

# The guard matters: dist_checkpointing.save starts a spawn-based manager that re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
