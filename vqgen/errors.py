"""The one exception type a user's mistake raises: the CLI prints it as one line."""


class VQGenError(ValueError):
    """Bad input from the user: a path, an option or a run that does not fit.

    The message names the bad value and what was expected, in one line.
    """
