"""User-facing errors: one line that names the file, key or value and what was expected."""


class MegapackError(Exception):
    """An error the user can act on; the CLI prints its message on one line without a traceback."""
