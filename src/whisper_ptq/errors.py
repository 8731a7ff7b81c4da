"""The one exception type that means "the user gave us something we cannot use"."""


class UserError(Exception):
    """Bad input (model, dataset, recipe, path...). The CLI prints it as one line and exits with code 2."""


def one_line(exc: BaseException) -> str:
    """A user error as its message; anything else with its type, since that is often the only clue."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    return message if isinstance(exc, UserError) else f"{type(exc).__name__}: {message}".rstrip(": ")
