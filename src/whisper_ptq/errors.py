"""The one exception type that means "the user gave us something we cannot use"."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (model, dataset, recipe, path...), said in one line that names the culprit. `param` names the
    argument at fault in library terms (`batch_size`); the command line shows it as its flag (`--batch-size`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def one_line(exc: BaseException) -> str:
    """A user error as its message; anything else with its type, since that is often the only clue."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    return message if isinstance(exc, UserError) else f"{type(exc).__name__}: {message}".rstrip(": ")
