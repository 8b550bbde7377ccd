"""The one exception type for problems a user can fix (bad input, bad config, bad cache).

The CLI prints such an error as a single line and exits non-zero; any other exception
is a bug and keeps its traceback.
"""

_WORKER_LINE = "mfcache.errors.MfcacheError: "


class MfcacheError(Exception):
    """A user-facing error: its message is one line naming the culprit.

    Raised in a DataLoader worker (a damaged cache found while reading), torch re-raises it
    in the main process as ``MfcacheError("Caught MfcacheError in DataLoader worker process
    N. Original Traceback ...")``; that message is cut back to the worker's one line."""

    def __init__(self, message: str = ""):
        if isinstance(message, str) and message.startswith("Caught MfcacheError") and _WORKER_LINE in message:
            message = message.rsplit(_WORKER_LINE, 1)[1].strip()
        super().__init__(message)
