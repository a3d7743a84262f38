"""Errors that reach the user. Each carries the exit code the CLI maps it to.

Messages are one line and name the fix; the CLI prints them without a traceback
(unless ``NCFM_DEBUG=1``).
"""


class NcfmError(Exception):
    """A failure with a one-line reason for the user. Exit code 1."""

    exit_code = 1


class ConfigError(NcfmError):
    """Bad input found by the core: unknown dataset or network, IPC larger than a class,
    an option out of range. Exit code 2, like a command-line usage error."""

    exit_code = 2


class NotFoundError(NcfmError):
    """An artifact, version, dataset directory or file that does not exist. Exit code 3."""

    exit_code = 3


class CorruptArtifactError(NcfmError):
    """A store file that is truncated, malformed, of the wrong shape or dtype, or not ours.
    Exit code 1; the message names the file."""

    exit_code = 1


class BudgetInfeasibleError(NcfmError):
    """A memory budget too small for even the smallest plan. Exit code 4; the message says
    the smallest budget that would work."""

    exit_code = 4
