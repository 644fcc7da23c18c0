"""User-facing errors.

A ``BrainhpcError`` is bad input or a refused action: the CLI prints its message (which must
name the file, key or value and what was expected) and exits with status 2, without a traceback.
Anything else is a bug and keeps its traceback.
"""


class BrainhpcError(Exception):
    """Bad input or a refused action; the message is shown to the user as-is."""
