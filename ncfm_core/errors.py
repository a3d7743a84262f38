"""Errors that reach the user, and the exit codes of the ``ncfm`` command (the one table).

Each error class carries the exit code the CLI maps it to. Messages are one line and name the
fix; the CLI prints them without a traceback (unless ``NCFM_DEBUG=1``).
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_FAILURE = 1  # a failure with a one-line reason (also a corrupt store file)
EXIT_USAGE = 2  # a usage error or an invalid option
EXIT_NOT_FOUND = 3  # an artifact, version, dataset or file that does not exist
EXIT_BUDGET = 4  # a memory budget too small
EXIT_BELOW_MIN_ACC = 5  # accuracy below --min-acc (the result is printed and recorded first)
EXIT_BUSY = 6  # a store lock another process held longer than the lock timeout (--lock-timeout)
EXIT_STORAGE = 7  # the file system refused: permission denied, read-only, disk full, name too long, ...
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


class StoreBusyError(NcfmError):
    """A store lock that another process held longer than the lock timeout. Exit code 6; the
    message names the lock, who holds it (PID and command, when known) and for how long."""

    exit_code = EXIT_BUSY


class StorageError(NcfmError):
    """The file system refused an operation: permission denied, a read-only file system, no space
    left, a name too long, a file where a folder should be. Exit code 7; the message names the
    path, what happened and what to do (:func:`storage_error`)."""

    exit_code = EXIT_STORAGE


class ResultNotSavedError(StorageError):
    """A job finished its work but could not record the result (disk full, store gone read-only).
    Exit code 7; ``result`` is what it would have recorded, so the caller can still show it."""

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


# What happened and what to do, per errno; the path is put in front of it.
_OS_ERROR_TEXT: dict[str, tuple[str, str]] = {
    "EACCES": ("permission denied", "give this user access (ls -l shows the owner and mode), or use another folder"),
    "EPERM": ("operation not permitted", "give this user access (ls -l shows the owner and mode), or use another "
              "folder"),
    "EROFS": ("the file system is read-only", "remount it writable, or use a folder on a writable disk"),
    "ENOSPC": ("no space left on the device", "free some space (df -h shows it), or use a folder on another disk"),
    "EDQUOT": ("the disk quota is exceeded", "free some space or raise the quota, or use a folder on another disk"),
    "EFBIG": ("the file is too large for the file system", "use a folder on another file system"),
    "ENAMETOOLONG": ("a name in this path is too long for the file system",
                     "use shorter names (artifact, class or folder names) or a shorter path"),
    "ENOTDIR": ("a part of this path is a file, not a folder", "remove or rename that file, or use another path"),
    "EISDIR": ("is a folder where a file belongs", "remove or rename the folder, or use another path"),
    "ENOTEMPTY": ("the folder is not empty", "empty or remove it, or use another path"),
    "EEXIST": ("already exists", "remove or rename it, or use another path"),
    "ELOOP": ("too many levels of symbolic links", "fix the symbolic link, or use another path"),
    "EIO": ("input/output error (a failing disk or network file system)", "check the disk, then try again"),
    "EMFILE": ("too many open files in this process", "raise the limit (ulimit -n), then try again"),
    "ENFILE": ("too many open files on this system", "close other programs, then try again"),
    "EXDEV": ("the move crosses file systems", "keep the folder on the same disk as its parent"),
    "EBUSY": ("the file or folder is busy (in use, or a mount point)", "use another path"),
}
_OS_ERRORS: dict[int, tuple[str, str]] = {
    getattr(errno, name): text for name, text in _OS_ERROR_TEXT.items() if hasattr(errno, name)
}


def storage_error(err: OSError) -> NcfmError:
    """An ``OSError`` as the error the user sees: ``NotFoundError`` (exit 3) for a missing file,
    else ``StorageError`` (exit 7), one line naming the path, what happened and what to do, e.g.
    ``/data/store/artifacts/x: the file system is read-only (Read-only file system); remount it
    writable, or use a folder on a writable disk (--store, --out)``."""
    paths = [p for p in (err.filename, getattr(err, "filename2", None)) if p not in (None, "")]
    where = "".join(f"{one_line(str(p), limit=200)}: " for p in paths[:1]) + (
        f"(to {one_line(str(paths[1]), limit=200)}) " if len(paths) > 1 else "")
    reason = err.strerror or one_line(err)
    if err.errno == errno.ENOENT:
        return NotFoundError(f"{where}no such file or folder ({reason})")
    what, fix = _OS_ERRORS.get(err.errno or -1, ("the operating system refused", "check the path and the disk"))
    return StorageError(f"{where}{what} ({reason}); {fix}")


def as_user_error(err: BaseException) -> BaseException:
    """The error to report for ``err``: an ``OSError`` becomes :func:`storage_error`, running out
    of host memory (``MemoryError``, a failed CPU or CUDA allocation) a ``BudgetInfeasibleError``
    (exit 4); anything else is returned as it is."""
    if isinstance(err, NcfmError):
        return err
    if isinstance(err, OSError):
        return storage_error(err)
    allocation_failed = isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    if isinstance(err, MemoryError) or allocation_failed or type(err).__name__ == "OutOfMemoryError":
        return BudgetInfeasibleError(
            f"out of memory ({one_line(err, limit=160)}); lower what grows with it (--ipc, --width, --repeats, "
            f"--batch-size, --real-per-class), or free memory and try again"
        )
    return err
