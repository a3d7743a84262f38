"""Atomic file writes and strict JSON: the lowest layer of the artifact store.

Every file is written to ``<name>.<random>.tmp`` in its own directory, fsynced and then
moved over the target with ``os.replace``: a crash leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from ncfm_core.errors import CorruptArtifactError, NotFoundError, one_line


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


def read_json(path: Path) -> dict:
    """Read a JSON object from ``path``. ``NotFoundError`` if the file is missing,
    ``CorruptArtifactError`` (one line, naming the file) if it is not a JSON object."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CorruptArtifactError(f"{path}: is a directory, expected a JSON file") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptArtifactError(
            f"{path}: not valid JSON ({one_line(err)}); restore or delete this file"
        ) from None
    if not isinstance(obj, dict):
        raise CorruptArtifactError(
            f"{path}: expected a JSON object, found {type(obj).__name__}; restore or delete this file"
        )
    return obj
