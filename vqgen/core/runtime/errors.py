"""The exceptions that reach the user: a mistake (one line, exit code 2) and a stop on a signal."""


class VQGenError(ValueError):
    """Bad input from the user: a path, an option or a run that does not fit.

    The message names the bad value and what was expected, in one line.
    """


def one_line(err: BaseException) -> str:
    """A short, one-line reason from a library's exception."""
    lines = str(err).strip().splitlines()
    return (lines[0][:200] if lines else "") or type(err).__name__


class TrainingStopped(Exception):
    """Training stopped on a signal after writing a resumable state.

    Not a mistake, but unfinished work: the process exits with `exit_code` (128 + the signal number).
    """

    def __init__(self, message: str, exit_code: int, main_process: bool = True):
        super().__init__(message)
        self.exit_code = exit_code
        self.main_process = main_process


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an interrupt, so that a command cleans up as it does on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum
