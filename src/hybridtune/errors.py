"""The one error type users see.

Anything the user can fix (a recipe key, a data row, a path) raises `UserError` with a message that
names *where* (key path or file:row), *what was found* and *what was expected*. The CLI prints the
message and exits with code 2, without a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

EXIT_USER_ERROR = 2
EXIT_TRAINING_STOPPED = 3


class UserError(Exception):
    """A problem in the user's input: recipe, data, model path or output dir."""

    def __init__(self, where: str, found: str, expected: str, hint: str | None = None):
        # a user's value is cut short: a message must never be the size of the bad input itself
        where, found = _cap(str(where), 300), _cap(str(found), 500)
        self.where, self.found, self.expected, self.hint = where, found, expected, hint
        message = f"{where}: found {found}; expected {expected}"
        if hint:
            message += f" ({hint})"
        # one line, always: the CLI prints it as is (a library's message may span lines)
        super().__init__(re.sub(r"\s*\n\s*", " ", message))

    def __reduce__(self):
        """Picklable (a refusal in a Ray worker comes back to the search as itself)."""
        return type(self), (self.where, self.found, self.expected, self.hint)


class TrainingStopped(Exception):
    """Training met something it cannot go on from (a NaN / inf loss). Not bad input, so not
    UserError: the CLI prints the one-line message and exits with code 3. The run dir keeps its
    checkpoints, so the run can be resumed (`hybridtune train --resume RUN_DIR`) once fixed."""


class RunFailed(Exception):
    """A run failed after its run dir was written (a library error, out of memory, a disk error):
    the CLI prints this one line (the step and the cause) and exits with code 3; `--debug` adds the
    traceback. The run dir is marked failed (failed.json) and keeps its checkpoints."""


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: message` of an exception on one line, cut to `limit` characters (a library's message
    may span lines or repeat a huge value)."""
    text = re.sub(r"\s*\n\s*", " ", str(e)).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """'did you mean X?' for a misspelt key or value, or None when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
