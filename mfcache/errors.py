"""The one exception type for problems a user can fix (bad input, bad config, bad cache).

The CLI prints such an error as a single line and exits non-zero; any other exception
is a bug and keeps its traceback. A DataLoader worker's error reaches the main process as
a value (:class:`mfcache.cache.reader.ReadFailure`), never as traceback text to parse.

A message names a setting the user can change by its key in backquotes, never by a CLI flag:
a config key (`extract.dtype`, `train.steps`, or an override `head.use_c1=false`), a stage
function's keyword as `section.name` (`extract.skip_bad` is ``extract(skip_bad=...)``,
`train.resume`, `evaluate.force`), or a keyword several stages share (`split`, `detector`,
`overrides`, `trust_checkpoint=True`). ``str(exc)`` is that text, as Python users read it;
a front end names the settings its own way with :meth:`MfcacheError.spelled` (the CLI:
``mfcache.cli.common.CLI_NAMES``, ``--skip-bad``, ``--set head.use_c1=false``). Every key a
message uses has a CLI spelling (tests/test_errors.py checks it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_QUOTED = re.compile(r"`([^`\n]+)`")


def spelled(message: str, names: Mapping[str, str]) -> str:
    """``message`` with each backquoted setting that ``names`` spells (``{"extract.out":
    "--out"}``) replaced by that spelling, without the backquotes; any other backquoted text
    (`mfcache extract`) stays as it is."""
    return _QUOTED.sub(lambda m: names.get(m.group(1), m.group(0)), message)


class MfcacheError(Exception):
    """A user-facing error: its message is one line naming the culprit (and settings as
    backquoted keys: see the module doc)."""

    def spelled(self, names: Mapping[str, str]) -> str:
        """The message with its settings named as ``names`` spells them (:func:`spelled`)."""
        return spelled(str(self), names)


class UntrustedFile(MfcacheError):
    """A file refused because loading it could run code it holds (a pickled checkpoint, a
    program stored in a cache). The fix is to trust its source, the setting
    `trust_checkpoint=True` the message names (the CLI's ``--trust-checkpoint``)."""

    def __init__(self, refusal: str):
        self.refusal = refusal
        super().__init__(
            f"{refusal}; if you trust its source, pass `trust_checkpoint=True` (the file can then run any code "
            "on this machine)"
        )
