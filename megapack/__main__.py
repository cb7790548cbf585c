"""`python -m megapack` runs the megapack command."""
import sys

from megapack.cli import main

sys.exit(main())
