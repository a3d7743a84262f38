"""The store's per-name lock: a file lock with a time limit that says who holds it.

The lock (``artifacts/<name>/.lock``, a ``filelock`` flock) is held for milliseconds at a time:
allocating a version, or a read-modify-write of a manifest. A wait of seconds therefore means a
stuck or suspended holder (Ctrl-Z, a hung network file system), so a waiter says every
``LOCK_REPORT_EVERY_S`` who holds it and for how long, and gives up after the lock timeout with
a one-line :class:`~ncfm_core.errors.StoreBusyError` (exit 6).

Who holds it is recorded beside the lock, in ``<lock>.holder`` (JSON: pid, host, command, since),
written by the holder once it has the lock and removed before it lets go. The lock file itself
cannot carry it: older filelock releases truncate it on every attempt to take it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import filelock

from ncfm_core.errors import ConfigError, CorruptArtifactError, NcfmError, StoreBusyError, one_line
from ncfm_core.store.files import read_json

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_S = 120.0
"""How long to wait for a name's lock before giving up: every hold lasts milliseconds, so two
minutes of waiting means the holder is stuck, not busy."""
LOCK_TIMEOUT_ENV = "NCFM_LOCK_TIMEOUT"
"""Environment variable with the lock timeout in seconds (``--lock-timeout`` wins over it)."""
LOCK_REPORT_EVERY_S = 10.0
"""Seconds between two "still waiting" lines while the lock is held by another process."""
HOLDER_SUFFIX = ".holder"
"""The record of who holds a lock: ``<lock file name>.holder``, beside it."""
_MAX_HOLDER_BYTES = 4096


def resolve_lock_timeout(value: float | str | None = None) -> float:
    """The lock timeout in seconds: ``value`` (``--lock-timeout``), else ``$NCFM_LOCK_TIMEOUT``,
    else :data:`DEFAULT_LOCK_TIMEOUT_S`. ``ConfigError`` unless it is a finite number >= 0
    (0: give up at once when the lock is taken)."""
    source = "lock_timeout (--lock-timeout)"
    if value is None:
        value = os.environ.get(LOCK_TIMEOUT_ENV) or None
        source = f"${LOCK_TIMEOUT_ENV}"
    if value is None:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"{source} must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def holder_path(lock_path: Path) -> Path:
    """Where the holder of ``lock_path`` records itself."""
    return lock_path.with_name(lock_path.name + HOLDER_SUFFIX)


def _command_line() -> str:
    """This process's command as a person would have typed it: ``ncfm eval x``, ``python -c``."""
    argv = list(sys.argv) or [""]
    program = Path(argv[0])
    if argv[0] in ("", "-c"):
        head = f"python {argv[0]}".strip()
    elif program.name == "__main__.py":  # python -m package
        head = f"python -m {program.parent.name}"
    else:
        head = program.name
    return one_line(" ".join([head, *argv[1:]]), limit=200)


def _record_holder(lock_path: Path) -> None:
    """Best effort: a store we may lock but not write beside keeps working, its holder unknown."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": _command_line()}
    target = holder_path(lock_path)
    temp = target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        temp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(temp, target)  # readers see the whole record or none; durability does not matter
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()


def _pid_exited(pid: int) -> bool:
    if os.name != "posix" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive under another user, or cannot tell
        return False
    return False


def describe_holder(lock_path: Path, waited: float) -> str:
    """Who holds ``lock_path`` and for how long, as far as its holder record tells
    ("PID 4242 on host (ncfm eval x) for 35 s"); "an unknown process" when there is no
    readable record (a process of another program, or an ncfm too old to write one)."""
    unknown = f"an unknown process (no readable {holder_path(lock_path).name}) for at least {waited:.0f} s"
    try:
        record = read_json(holder_path(lock_path), max_bytes=_MAX_HOLDER_BYTES, what="lock holder record")
    except (NcfmError, OSError):
        return unknown
    pid, host, command, since = (record.get(key) for key in ("pid", "host", "command", "since"))
    if not isinstance(pid, int) or isinstance(pid, bool):
        return unknown
    same_host = host == socket.gethostname()
    if same_host and _pid_exited(pid):  # its record outlived it: whoever holds the lock now did not write one
        return f"an unknown process (the last recorded holder, PID {pid}, has exited) for at least {waited:.0f} s"
    held_for = time.time() - since if isinstance(since, (int, float)) and math.isfinite(since) else None
    duration = f"for {max(held_for, waited):.0f} s" if held_for is not None else f"for at least {waited:.0f} s"
    where = "" if same_host or not isinstance(host, str) else f" on {one_line(host, limit=60)}"
    what = f" ({one_line(command, limit=120)})" if isinstance(command, str) and command else ""
    return f"PID {pid}{where}{what} {duration}"


@contextlib.contextmanager
def name_lock(lock_path: Path, timeout: float, what: str) -> Iterator[None]:
    """Hold the file lock ``lock_path`` (which serialises writes of ``what``) for the block.

    While another process holds it, log a warning every :data:`LOCK_REPORT_EVERY_S` naming the
    holder (:func:`describe_holder`) and how long this process has waited; after ``timeout``
    seconds raise :class:`StoreBusyError` (exit 6). A lock path that cannot be a lock (a folder,
    a symbolic link: filelock refuses to follow one) is a ``CorruptArtifactError`` naming it;
    other ``OSError`` (permission denied, read-only) propagate."""
    lock = filelock.FileLock(str(lock_path))
    started = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - started)
        try:
            lock.acquire(timeout=max(0.0, min(LOCK_REPORT_EVERY_S, left)))
            break
        except filelock.Timeout:
            waited = time.monotonic() - started
            holder = describe_holder(lock_path, waited)
            if waited >= timeout:
                raise StoreBusyError(
                    f"gave up after waiting {waited:.0f} s for the lock {lock_path} (another process is writing "
                    f"{what}): it is held by {holder}; if that process is stuck, stop it, then run again, or wait "
                    f"longer with lock_timeout (--lock-timeout SECONDS, ${LOCK_TIMEOUT_ENV})"
                ) from None
            log.warning("still waiting for the lock %s after %.0f s: held by %s; giving up after %g s "
                        "(--lock-timeout)", lock_path, waited, holder, timeout)
        except OSError as err:
            if err.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO):
                raise CorruptArtifactError(
                    f"{lock_path}: cannot be used as a lock ({err.strerror or one_line(err)}); it must be a regular "
                    f"file: delete it (ncfm creates it again)"
                ) from None
            raise
    try:
        _record_holder(lock_path)
        yield
    finally:
        with contextlib.suppress(OSError):
            holder_path(lock_path).unlink()
        lock.release()
