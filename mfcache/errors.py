"""The one exception type for problems a user can fix (bad input, bad config, bad cache).

The CLI prints such an error as a single line and exits non-zero; any other exception
is a bug and keeps its traceback. A DataLoader worker's error reaches the main process as
a value (:class:`mfcache.cache.reader.ReadFailure`), never as traceback text to parse.
"""


class MfcacheError(Exception):
    """A user-facing error: its message is one line naming the culprit."""


class UntrustedFile(MfcacheError):
    """A file refused because loading it could run code it holds (a pickled checkpoint, a
    program stored in a cache). The fix is to trust its source: the setting
    ``trust_checkpoint`` (``trust_checkpoint=True`` in Python, which the message names; each
    front end names its own spelling with :meth:`with_fix`, the CLI ``--trust-checkpoint``)."""

    SETTING = "trust_checkpoint=True"

    def __init__(self, refusal: str):
        self.refusal = refusal
        super().__init__(self.with_fix(self.SETTING))

    def with_fix(self, trust: str) -> str:
        """The one-line message, naming ``trust`` as the way to trust the file."""
        return f"{self.refusal}; if you trust its source, pass {trust} (the file can then run any code on this machine)"
