"""Errors caused by the user's input (config, data, samples): the CLI prints them without a traceback."""


class UserInputError(ValueError):
    """Base class: the message names the offending file, row, field or key."""
