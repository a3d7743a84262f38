"""Artifact names, version directories and the ``Store`` that allocates, resolves and
updates them (each version's record through ``store.record``).

Version numbers are allocated with ``os.mkdir`` (atomic, fails if the directory exists),
so two writers never share a version even without the per-name file lock; the lock
only serialises read-modify-write of manifests and keeps allocation tidy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncfm_core.errors import (
    ConfigError,
    CorruptArtifactError,
    NcfmError,
    NotFoundError,
    StorageError,
    one_line,
    storage_error,
)
from ncfm_core.platform import user_dir
from ncfm_core.store.files import atomic_write_bytes
from ncfm_core.store.locks import name_lock, resolve_lock_timeout
from ncfm_core.store.record import EvalRecord, RunRecord, read_record, write_record
from ncfm_core.store.tensors import file_sha256
from ncfm_core.store.layout import (
    ARTIFACTS_DIR,
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    NAME_LOCK_FILE,
    POOLS_DIR,
    RUN_LOCK_FILE,
    SAMPLER_FILE,
    SYNSET_FILE,
)

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Artifact names and pool keys: 1-128 of letters, digits, '.', '_', '-'; first a letter
or digit (so no hidden files and no option-like names); '..' is rejected separately."""

_VERSION_DIR = re.compile(r"^v([1-9][0-9]{0,17})$")
"""A version folder: ``v1``, ``v2``, ... exactly as ncfm names them (ASCII digits, no leading zero,
at most 18 of them), so a hand-made ``v01`` is never a second ``v1``."""
_LOOKS_LIKE_VERSION = re.compile(r"^[vV][0-9]+$", re.ASCII)
_VERSION_REF = re.compile(r"^[vV]?([0-9]{1,18})$", re.ASCII)


# ----------------------------------------------------------------------------- paths, names


def store_root(explicit: str | os.PathLike | None = None) -> Path:
    """The store root: ``explicit`` (the ``--store`` option), else ``$NCFM_HOME``, else
    ``platformdirs.user_data_dir("ncfm")``. Read at call time so tests and long-lived
    processes see the current environment. Returns an absolute path (not created).
    An empty ``explicit`` path is a ``ConfigError``: it would silently mean the current folder."""
    if explicit is not None and not str(explicit).strip():
        raise ConfigError("store (--store) is an empty path; give a folder, or leave it out to use $NCFM_HOME")
    if explicit is not None:
        root = Path(explicit)
        if os.path.lexists(root) and not root.is_dir():
            raise ConfigError(f"store (--store) {root} is not a folder; give the store's folder (or a new one)")
    elif os.environ.get("NCFM_HOME"):
        root = Path(os.environ["NCFM_HOME"])
    else:
        root = Path(user_dir("user_data_dir"))
    return root.expanduser().absolute()


def looks_like_path(ref: str) -> bool:
    """Whether a reference names a directory rather than the store's artifact: it starts with
    ``.``, ``~`` or a separator, or contains one (``./x``, ``/x``, ``~/x``, ``a/b``, ``.``, ``..``). A bare
    name never does (names start with a letter or digit and hold no separator), so ``NAME``
    always means the store, whatever folders the current directory holds."""
    ref = str(ref)
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return ref.startswith((".", "~")) or any(sep in ref for sep in separators)


def validate_name(name: str, what: str = "artifact name") -> str:
    """Return ``name`` unchanged if it is a valid artifact name (or pool key), else raise
    ``ConfigError``. Valid: 1-128 characters from letters, digits, '.', '_', '-', the first a
    letter or digit, no '..'. This keeps names one path component on every platform."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-128 characters from letters, digits, '.', '_', '-', "
            "starting with a letter or digit and without '..' (e.g. cifar10-ipc10)"
        )
    return name


@dataclass(frozen=True)
class ArtifactVersion:
    """One version directory ``<root>/artifacts/<name>/v<version>``."""

    name: str
    version: int
    path: Path

    @property
    def ref(self) -> str:
        """The reference that resolves to exactly this version, ``name@vN``."""
        return f"{self.name}@v{self.version}"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def synset_path(self) -> Path:
        return self.path / SYNSET_FILE

    @property
    def sampler_path(self) -> Path:
        return self.path / SAMPLER_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_DIR / CHECKPOINT_FILE

    @property
    def run_lock_path(self) -> Path:
        """The lock the process distilling into this version holds (``jobs.run.run_lock``)."""
        return self.path / RUN_LOCK_FILE

    def record(self) -> RunRecord:
        """The version's record, read from its manifest, migrated and validated
        (:func:`~ncfm_core.store.record.read_record`; ``NotFoundError`` / ``CorruptArtifactError``)."""
        return read_record(self.manifest_path)

    def verify_sha256(self, relpath: str, record: RunRecord) -> None:
        """Check the file ``relpath`` against the sha256 ``record`` holds for it since it was
        written (nothing to check for versions made before hashes were recorded, or a missing
        file, which its loader reports). A mismatch is a one-line ``CorruptArtifactError``."""
        expected = record.sha256.get(relpath)
        path = self.path / relpath
        if expected is None or not path.is_file():
            return
        actual = file_sha256(path)
        if actual != expected:
            raise CorruptArtifactError(
                f"{path}: content does not match the sha256 in {MANIFEST_FILE} ({actual[:12]}... != "
                f"{expected[:12]}...): the file was changed or damaged; restore or delete this file"
            )


def utc_now() -> str:
    """The current time as ISO-8601 UTC with seconds, e.g. ``2024-01-01T00:00:00+00:00``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    """The artifact store under ``root`` (default: ``store_root()``). ``lock_timeout``: seconds
    to wait for a name's lock held by another process before giving up with ``StoreBusyError``
    (default: ``$NCFM_LOCK_TIMEOUT``, else ``locks.DEFAULT_LOCK_TIMEOUT_S``)."""

    def __init__(self, root: Path | str | None = None, lock_timeout: float | None = None) -> None:
        self.root = store_root(root)
        self.artifacts_dir = self.root / ARTIFACTS_DIR
        self.pools_dir = self.root / POOLS_DIR
        self.lock_timeout = resolve_lock_timeout(lock_timeout)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- locking

    @contextlib.contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        name_dir = self.artifacts_dir / name
        name_dir.mkdir(parents=True, exist_ok=True)
        with name_lock(name_dir / NAME_LOCK_FILE, self.lock_timeout, what=name):
            yield

    # -- versions

    def _version_numbers(self, name: str) -> list[int]:
        name_dir = self.artifacts_dir / name
        if not name_dir.is_dir():
            return []
        numbers = []
        for entry in name_dir.iterdir():
            match = _VERSION_DIR.match(entry.name)
            if match and entry.is_dir():
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    def _stray_version_dirs(self, name: str) -> list[str]:
        """Folders of ``name`` that look like versions but are not named as ncfm names them
        (``v01``, ``V2``): never read as versions, only reported."""
        name_dir = self.artifacts_dir / name
        return sorted(entry.name for entry in name_dir.iterdir()
                      if _LOOKS_LIKE_VERSION.match(entry.name) and not _VERSION_DIR.match(entry.name))

    def versions(self, name: str) -> list[ArtifactVersion]:
        """Every version directory of ``name``, sorted by number (empty if none)."""
        validate_name(name)
        return [ArtifactVersion(name, n, self.artifacts_dir / name / f"v{n}") for n in self._version_numbers(name)]

    def names(self) -> list[str]:
        """Every artifact name in the store, sorted."""
        if not self.artifacts_dir.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.artifacts_dir.iterdir()
            if entry.is_dir() and NAME_PATTERN.match(entry.name) and ".." not in entry.name
        )

    def create_version(self, name: str, record: RunRecord) -> ArtifactVersion:
        """Allocate ``v<N+1>`` for ``name`` and write its manifest: ``record`` with ``name``,
        ``version`` and ``created`` (ISO-8601 UTC) set."""
        validate_name(name)
        (self.artifacts_dir / name).mkdir(parents=True, exist_ok=True)
        with self._name_lock(name):
            # mkdir is the allocation: it fails if a concurrent writer (lock or no lock,
            # e.g. on a file system without working locks) took this number first.
            while True:
                numbers = self._version_numbers(name)
                number = (numbers[-1] if numbers else 0) + 1
                version_dir = self.artifacts_dir / name / f"v{number}"
                try:
                    os.mkdir(version_dir)
                    break
                except FileExistsError:
                    continue
            try:
                write_record(version_dir / MANIFEST_FILE, record.replace(name=name, version=number, created=utc_now()))
            except BaseException:
                shutil.rmtree(version_dir, ignore_errors=True)  # no version without a record
                raise
        return ArtifactVersion(name, number, version_dir)

    def update_record(self, version: ArtifactVersion, edit: Callable[[RunRecord], RunRecord] | None = None,
                      /, **fields: Any) -> RunRecord:
        """Change the record of ``version``: ``edit(record)`` if given, then ``fields`` set
        (read-modify-write under the name's lock, atomic write); returns the new record."""
        with self._name_lock(version.name):
            record = version.record()
            if edit is not None:
                record = edit(record)
            record = record.replace(**fields)
            write_record(version.manifest_path, record)
        return record

    def append_eval(self, version: ArtifactVersion, evaluation: EvalRecord, *,
                    clears_pending_eval: bool = False) -> RunRecord:
        """Append ``evaluation`` to the record's ``evals`` (and, with ``clears_pending_eval``, drop
        the ``pending_eval`` it answers, in the same write); returns the new record."""
        def append(record: RunRecord) -> RunRecord:
            pending = None if clears_pending_eval else record.pending_eval
            return record.replace(evals=(*record.evals, evaluation), pending_eval=pending)

        return self.update_record(version, append)

    def check_writable(self, version: ArtifactVersion) -> None:
        """Before long work whose result goes into ``version``'s manifest: take (and release) the
        name's lock and write (and remove) a probe file beside the manifest. ``NcfmError`` (exit 1)
        naming the folder if either fails, so no result is computed only to be lost."""
        probe = version.path / f".write-probe-{secrets.token_hex(4)}"
        try:
            with self._name_lock(version.name):
                atomic_write_bytes(probe, b"")
                probe.unlink()
        except OSError as err:
            raise StorageError(
                f"{version.path}: cannot write there ({err.strerror or err}), so a result could not be recorded; "
                f"make the store writable (or use a writable copy of it) and run again"
            ) from None

    def delete_version(self, version: ArtifactVersion) -> None:
        """Remove one version directory. It is first renamed out of the ``v<N>`` namespace,
        so an interrupted delete never leaves a half version that still resolves."""
        with self._name_lock(version.name):
            if not version.path.is_dir():
                raise NotFoundError(f"{version.ref}: no such version")
            doomed = version.path.with_name(f".deleting-{version.path.name}-{secrets.token_hex(4)}")
            os.rename(version.path, doomed)
        shutil.rmtree(doomed)

    def resolve(self, ref: str) -> ArtifactVersion:
        """Turn a reference into a version.

        ``name`` -> its latest version whose manifest status is "complete";
        ``name@vN`` or ``name@N`` -> that version, whatever its status;
        a path to a directory holding ``manifest.json`` -> that directory; a path must look like
        one (:func:`looks_like_path`): a bare name is always the store's, never ``./name``.
        ``NotFoundError`` (with suggestions) when nothing matches.
        """
        ref = str(ref)
        if looks_like_path(ref):
            as_path = Path(ref).expanduser()
            try:
                found = as_path.is_dir() and (as_path / MANIFEST_FILE).is_file()
            except OSError as err:  # e.g. a name too long for the file system
                raise ConfigError(f"{ref[:80]}{'...' if len(ref) > 80 else ''}: not a usable path "
                                  f"({err.strerror or err}); pass a version directory or NAME[@vN]") from None
            if found:
                return self._version_from_path(as_path)
            raise NotFoundError(f"{ref}: not a version directory (expected a directory containing {MANIFEST_FILE})")

        name, at, version_text = ref.partition("@")
        validate_name(name)
        if not at:
            return self._latest_complete(name)
        match = _VERSION_REF.match(version_text)  # ASCII digits only: int() would take '²' and fail
        if match is None:
            raise ConfigError(f"invalid version {one_line(version_text, limit=40)!r} in the reference: use "
                              f"name@vN, e.g. {name}@v1")
        number = int(match.group(1))
        if number not in self._version_numbers(name):
            self._raise_unknown_name(name)
            existing = ", ".join(f"v{n}" for n in self._version_numbers(name))
            raise NotFoundError(f"{name}@v{number}: no such version; {name} has {existing}")
        return ArtifactVersion(name, number, self.artifacts_dir / name / f"v{number}")

    def _version_from_path(self, directory: Path) -> ArtifactVersion:
        directory = directory.absolute()
        match = _VERSION_DIR.match(directory.name)
        if match and NAME_PATTERN.match(directory.parent.name):
            return ArtifactVersion(directory.parent.name, int(match.group(1)), directory)
        # A version directory copied elsewhere: trust what its manifest says.
        record = read_record(directory / MANIFEST_FILE)
        name, number = record.name, record.version
        if not (NAME_PATTERN.match(name) and ".." not in name and number >= 1):
            raise CorruptArtifactError(
                f"{directory / MANIFEST_FILE}: has no valid name/version; restore or delete this file"
            )
        return ArtifactVersion(name, number, directory)

    def _raise_unknown_name(self, name: str) -> None:
        if self._version_numbers(name):
            return
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        if close:
            hint = f"did you mean {', '.join(close)}?"
        elif names:
            hint = f"existing artifacts: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"
        else:
            hint = f"the store at {self.root} is empty; run `ncfm distill` first"
        raise NotFoundError(f"no artifact named {name!r}; {hint}")

    def _latest_complete(self, name: str) -> ArtifactVersion:
        self._raise_unknown_name(name)
        described = []
        corrupt: Exception | None = None
        versions = self.versions(name)
        for version in reversed(versions):
            try:
                status = version.record().status
            except (NotFoundError, CorruptArtifactError, OSError) as err:
                log.warning("skipping %s: %s", version.ref, _unreadable(err))
                status = "unreadable manifest"
                if not isinstance(err, NotFoundError) and corrupt is None:
                    corrupt = err  # damaged, or not readable by this user
            if status == "complete":
                return version
            described.append(f"v{version.version} ({status})")
        if corrupt is not None:  # a damaged file, not an unfinished run: say which (exit 1)
            raise corrupt
        newest = versions[-1].ref
        raise NotFoundError(
            f"{name} has no complete version ({', '.join(reversed(described))}); "
            f"finish the newest with `ncfm resume {newest}`, or name a version, e.g. {newest}"
        )

    def scan(self) -> tuple[list[tuple[ArtifactVersion, RunRecord]], list[str]]:
        """Every version in the store with its record, sorted by name and number, plus a
        warning string per version (or name) that cannot be read, whatever the reason (missing,
        damaged, not a regular file, nested too deeply, permission denied), and per folder that
        only looks like a version (``v01``). One bad entry never hides the others."""
        found: list[tuple[ArtifactVersion, RunRecord]] = []
        warnings: list[str] = []
        for name in self.names():
            try:
                versions = self.versions(name)
                warnings.extend(f"{self.artifacts_dir / name / stray}: not a version folder ncfm made (versions "
                                f"are v1, v2, ...); ignored" for stray in self._stray_version_dirs(name))
            except Exception as err:  # one unreadable name must not hide the rest
                warnings.append(f"{name}: cannot list its versions ({_unreadable(err)})")
                continue
            for version in versions:
                try:
                    found.append((version, version.record()))
                except Exception as err:  # a broken version is a warning, never the end of ls
                    warnings.append(f"{version.ref}: {_unreadable(err)}")
        return found, warnings

    # -- pools

    def pool_dir(self, key: str) -> Path:
        """``<root>/pools/<key>`` for a pool cache key (validated like a name; not created)."""
        validate_name(key, what="pool key")
        return self.pools_dir / key


def _unreadable(err: Exception) -> str:
    """Why an entry could not be read, in one line: an ncfm error's own text, else the reason."""
    if isinstance(err, NcfmError):
        return one_line(err, limit=None)
    if isinstance(err, OSError):
        return one_line(storage_error(err), limit=None)
    return f"{type(err).__name__}: {one_line(err)}"
