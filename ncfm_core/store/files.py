"""Atomic file writes, bounded reads of regular files only, and strict JSON: the lowest layer of
the artifact store.

Every file is written to ``<name>.<random>.tmp`` in its own directory, fsynced and then
moved over the target with ``os.replace``: a crash leaves the old file or the new one.

Every file is read through :func:`open_regular`: opened without blocking, then checked on the
open descriptor, so a FIFO, a device (``/dev/zero``), a socket or a directory in the store's
place is refused before a byte is read, with no window for a swap between check and read; and
what is read whole (JSON) is bounded by what is actually read, not by what ``stat`` claims.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ncfm_core.errors import CorruptArtifactError, NotFoundError, one_line

MAX_JSON_BYTES = 16 * 2**20
"""The largest JSON file the store reads whole: its own stay at kilobytes (a manifest with a
record per eval far below this); a larger file is damaged or not ours."""

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _what_it_is(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(path: Path, what: str) -> CorruptArtifactError:
    return CorruptArtifactError(
        f"{path}: is {what}, not a regular file (ncfm only writes regular files there); delete it or restore the file"
    )


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[tuple[int, os.stat_result]]:
    """Open ``path`` for reading and yield ``(descriptor, its fstat)``, only if it is a regular
    file (a symlink to one is fine). The open never blocks (``O_NONBLOCK``: a FIFO with no
    writer would wait forever) and the check is made on the open descriptor, so the file read is
    the file checked. ``NotFoundError`` if missing; a one-line ``CorruptArtifactError`` naming
    the file for a FIFO, device, socket, directory or symlink loop; other ``OSError`` (permission
    denied, ...) propagate for the caller to report."""
    path = Path(path)
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: file not found") from None
    except OSError as err:
        if err.errno == errno.ENXIO:  # a socket (or a device with no driver) cannot be opened
            raise _not_regular(path, "a socket or device") from None
        if err.errno == errno.ELOOP:
            raise _not_regular(path, "a symbolic link that loops") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, _what_it_is(info.st_mode))
        yield fd, info
    finally:
        os.close(fd)


def descriptor_path(fd: int, path: Path) -> str:
    """A path that opens the very file behind ``fd`` (``/proc/self/fd/N``, ``/dev/fd/N``), for
    libraries that take a path, not a descriptor; ``path`` where the platform has neither."""
    for candidate in (f"/proc/self/fd/{fd}", f"/dev/fd/{fd}"):
        if os.path.exists(candidate):
            return candidate
    return str(path)


def read_bounded(path: Path, max_bytes: int, what: str = "file") -> bytes:
    """The whole content of the regular file ``path`` (:func:`open_regular`), at most
    ``max_bytes``: a larger file is refused before it is read (by its fstat size) and a file
    that grows past the limit while being read is refused when the limit is crossed. Errors name
    the file: ``CorruptArtifactError`` ("larger than any ncfm <what>")."""
    path = Path(path)

    def too_large(size: str) -> CorruptArtifactError:
        limit = f"{max_bytes // 2**20} MiB" if max_bytes >= 2**20 else f"{max_bytes} bytes"
        return CorruptArtifactError(
            f"{path}: {size} bytes is more than any ncfm {what} ({limit} at most); restore or delete this file"
        )

    with open_regular(path) as (fd, info):
        if info.st_size > max_bytes:
            raise too_large(str(info.st_size))
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise too_large(f"more than {max_bytes}")
    return b"".join(chunks)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a
    mix: write ``<name>.<random>.tmp`` in the same directory, fsync, ``os.replace``. The
    temporary file is removed if anything fails. Creates missing parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp_path, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
        fsync_directory(path.parent)
    except OSError as err:
        if err.filename is None and err.errno is not None:  # a failed write (disk full) names no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX; directories cannot be opened on Windows)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finite_json(obj: Any) -> Any:
    # NaN/inf are not JSON; a diverged loss must not make the manifest unreadable to jq.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(value) for value in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as strict JSON: sorted keys, indent 2, trailing newline.
    Non-finite floats are written as ``null``; other non-JSON types raise ``TypeError``."""
    text = json.dumps(_finite_json(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES, what: str = "JSON file") -> dict:
    """Read a JSON object from the regular file ``path``, at most ``max_bytes`` of it
    (:func:`read_bounded`). ``NotFoundError`` if the file is missing, ``CorruptArtifactError``
    (one line, naming the file) if it is not a regular file, too large, nested too deeply to
    parse, or not a JSON object."""
    path = Path(path)
    raw = read_bounded(path, max_bytes, what)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # not UTF-8, not JSON, or a number of more than 4300 digits
        raise CorruptArtifactError(
            f"{path}: not valid JSON ({one_line(err)}); restore or delete this file"
        ) from None
    except RecursionError:  # e.g. 100,000 nested lists: valid JSON no ncfm file ever holds
        raise CorruptArtifactError(f"{path}: JSON nested too deeply to read; restore or delete this file") from None
    if not isinstance(obj, dict):
        raise CorruptArtifactError(
            f"{path}: expected a JSON object, found {type(obj).__name__}; restore or delete this file"
        )
    return obj
