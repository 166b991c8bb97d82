"""User-facing errors.

Every problem a user can cause (a wrong path, a corrupt file, a mismatched checkpoint)
is raised as :class:`TsbdError` with a one-line message naming the problem and the fix.
The CLI prints that line alone, never a traceback.
"""

from __future__ import annotations


class TsbdError(Exception):
    """An error caused by the user's input; ``str(err)`` is one line naming problem and fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class DivergedError(TsbdError):
    """Training produced a non-finite loss (raised by the engine; unlearning treats it as an end)."""


def show_value(value) -> str:
    """A value as a user writes it in ``KEY=VALUE`` (TOML-like: ``true``, ``-1``, ``[1, 2]``, plain text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value and value.strip() == value and " " not in value else repr(value)
    return repr(value)


class OptionError(TsbdError):
    """A config option given a value its field refuses: ``str(err)`` is ``KEY=VALUE: must be ...``, after
    ``where`` the value came from (``--opt``, ``[defense_opts.tsbd]``) when known."""

    def __init__(self, key: str, value, problem: str, where: str = ""):
        self.key, self.value, self.problem, self.where = key, value, problem, where
        if where.startswith("--") and where[2:].replace("-", "_") == key:  # a flag of its own: --poison-ratio 2
            text = f"{where} {show_value(value)}: {problem}"
        else:
            text = f"{where + ' ' if where else ''}{key}={show_value(value)}: {problem}"
        super().__init__(text)

    def given_by(self, where: str) -> OptionError:
        """The same error, saying where the value was given."""
        return OptionError(self.key, self.value, self.problem, where)
