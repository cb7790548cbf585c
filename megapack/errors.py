"""User-facing errors: one line that names the file, key or value and what was expected."""


class MegapackError(Exception):
    """An error the user can act on; the CLI prints its message on one line without a traceback."""


def nested_too_deeply(path: object) -> MegapackError:
    """The error for a JSON file nested past what Python's parser takes (it raises RecursionError)."""
    return MegapackError(f"{path}: JSON nested too deeply to read (Python's parser stops at about 1,000 levels)")
