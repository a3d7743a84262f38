"""Errors that reach the user, and the exit codes of the ``ncfm`` command (the one table).

Each error class carries the exit code the CLI maps it to. Messages are one line and name the
fix; the CLI prints them without a traceback (unless ``NCFM_DEBUG=1``).
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # a failure with a one-line reason (also a corrupt store file)
EXIT_USAGE = 2  # a usage error or an invalid option
EXIT_NOT_FOUND = 3  # an artifact, version, dataset or file that does not exist
EXIT_BUDGET = 4  # a memory budget too small
EXIT_BELOW_MIN_ACC = 5  # accuracy below --min-acc (the result is printed and recorded first)
EXIT_INTERRUPTED = 130  # Ctrl-C (a checkpoint is saved first)
EXIT_TERMINATED = 143  # SIGTERM (a scheduler, `docker stop`, `kill`): like Ctrl-C, a checkpoint is saved first


def one_line(err: BaseException | str, limit: int | None = 300) -> str:
    """``err`` as one line (whitespace runs collapsed; its type's name if it has no text), cut
    to ``limit`` characters (None: whole) where it is embedded in another message."""
    text = " ".join(str(err).split()) or (type(err).__name__ if isinstance(err, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


class NcfmError(Exception):
    """A failure with a one-line reason for the user. Exit code 1."""

    exit_code = EXIT_FAILURE


class ConfigError(NcfmError):
    """Bad input found by the core: unknown dataset or network, IPC larger than a class,
    an option out of range. Exit code 2, like a command-line usage error."""

    exit_code = EXIT_USAGE


class NotFoundError(NcfmError):
    """An artifact, version, dataset directory or file that does not exist. Exit code 3."""

    exit_code = EXIT_NOT_FOUND


class CorruptArtifactError(NcfmError):
    """A store file that is truncated, malformed, of the wrong shape or dtype, or not ours.
    Exit code 1; the message names the file."""

    exit_code = EXIT_FAILURE


class BudgetInfeasibleError(NcfmError):
    """A memory budget too small for even the smallest plan. Exit code 4; the message says
    the smallest budget that would work."""

    exit_code = EXIT_BUDGET


class ResultNotSavedError(NcfmError):
    """A job finished its work but could not record the result (disk full, store gone read-only).
    Exit code 1; ``result`` is what it would have recorded, so the caller can still show it."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, result: dict | None = None) -> None:
        super().__init__(message)
        self.result = result


class DivergedError(NcfmError):
    """A distillation whose loss or images became NaN or infinite. Exit code 1; the version is
    marked failed and keeps its last good (finite) checkpoint. ``iteration`` is where it was seen."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, iteration: int | None = None) -> None:
        super().__init__(message)
        self.iteration = iteration
