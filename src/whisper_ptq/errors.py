"""The one exception type that means "the user gave us something we cannot use"."""


class UserError(Exception):
    """Bad input (model, dataset, recipe, path...). The CLI prints it as one line and exits with code 2."""
