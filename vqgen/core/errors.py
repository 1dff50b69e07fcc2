"""The one exception type a user's mistake raises: the CLI prints it as one line."""


class VQGenError(ValueError):
    """Bad input from the user: a path, an option or a run that does not fit.

    The message names the bad value and what was expected, in one line.
    """


def one_line(err: BaseException) -> str:
    """A short, one-line reason from a library's exception."""
    lines = str(err).strip().splitlines()
    return (lines[0][:200] if lines else "") or type(err).__name__
