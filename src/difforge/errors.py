"""The one exception type for user mistakes.

Anything a user can get wrong (a flag, a folder, a damaged file) raises `DifforgeError`
(a `ValueError`) with a one-line message naming the thing and what to do. The CLI prints
it without a traceback and exits with status 2.
"""


class DifforgeError(ValueError):
    """A clear, user-facing error: bad argument, missing file, damaged checkpoint."""
