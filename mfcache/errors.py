"""The one exception type for problems a user can fix (bad input, bad config, bad cache).

The CLI prints such an error as a single line and exits non-zero; any other exception
is a bug and keeps its traceback.
"""


class MfcacheError(Exception):
    """A user-facing error: its message is one line naming the culprit."""
