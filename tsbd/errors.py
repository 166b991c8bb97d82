"""User-facing errors.

Every problem a user can cause (a wrong path, a corrupt file, a mismatched checkpoint)
is raised as :class:`TsbdError` with a one-line message naming the problem and the fix.
The CLI prints that line alone, never a traceback.
"""


class TsbdError(Exception):
    """An error caused by the user's input; ``str(err)`` is one line naming problem and fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class DivergedError(TsbdError):
    """Training produced a non-finite loss (raised by the engine; unlearning treats it as an end)."""
