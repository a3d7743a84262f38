"""The artifact store: versioned results on disk, written atomically, read defensively.

Layout under the root (see ``store_root``)::

    <root>/artifacts/<name>/v<N>/manifest.json                 JSON: config, status, metrics, ...
    <root>/artifacts/<name>/v<N>/synset.safetensors            stored-form images, labels
    <root>/artifacts/<name>/v<N>/sampler.safetensors           psi weights
    <root>/artifacts/<name>/v<N>/checkpoint/state.safetensors  everything resume needs
    <root>/pools/<key>/pool.safetensors                        cached feature-extractor pools

Rules this module keeps:

- Every file is written to ``<name>.<random>.tmp`` in its own directory, fsynced and then
  moved over the target with ``os.replace``: a crash leaves the old file or the new one.
- Nothing is loaded with pickle: tensors go through safetensors, everything else is JSON.
  Arbitrary nested states (optimiser state dicts, RNG states) are split into a flat
  tensor dict plus a JSON tree (``flatten_state``), so one checkpoint is one file.
- Any unreadable file becomes a one-line ``CorruptArtifactError`` naming the file.
- Version numbers are allocated with ``os.mkdir`` (atomic, fails if the directory exists),
  so two writers never share a version even without the per-name file lock; the lock
  only serialises read-modify-write of manifests and keeps allocation tidy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import platformdirs
import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ncfm_core.errors import ConfigError, CorruptArtifactError, NotFoundError

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Artifact names and pool keys: 1-128 of letters, digits, '.', '_', '-'; first a letter
or digit (so no hidden files and no option-like names); '..' is rejected separately."""

STATE_TREE_KEY = "ncfm_state_tree"
"""safetensors metadata key under which ``save_state`` stores the JSON tree."""

STATE_TREE_FORMAT = 1
MANIFEST_FILE = "manifest.json"
SYNSET_FILE = "synset.safetensors"
SAMPLER_FILE = "sampler.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.safetensors"
STATUSES = ("running", "complete", "failed")

_VERSION_DIR = re.compile(r"^v([0-9]+)$")
_LOCK_FILE = ".lock"
_LOCK_PATIENCE_S = 10.0
# safetensors itself refuses headers above 100 MB; a larger length prefix means garbage.
_MAX_HEADER_BYTES = 100_000_000


# ----------------------------------------------------------------------------- paths, names


def store_root(explicit: str | os.PathLike | None = None) -> Path:
    """The store root: ``explicit`` (the ``--store`` option), else ``$NCFM_HOME``, else
    ``platformdirs.user_data_dir("ncfm")``. Read at call time so tests and long-lived
    processes see the current environment. Returns an absolute path (not created)."""
    if explicit is not None and str(explicit) != "":
        root = Path(explicit)
    elif os.environ.get("NCFM_HOME"):
        root = Path(os.environ["NCFM_HOME"])
    else:
        root = Path(platformdirs.user_data_dir("ncfm"))
    return root.expanduser().absolute()


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


# ----------------------------------------------------------------------------- atomic files


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
        _fsync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened on Windows.
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
            f"{path}: not valid JSON ({_one_line(err)}); restore or delete this file"
        ) from None
    if not isinstance(obj, dict):
        raise CorruptArtifactError(
            f"{path}: expected a JSON object, found {type(obj).__name__}; restore or delete this file"
        )
    return obj


def _one_line(err: BaseException | str) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------- tensors


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` (any devices, any layout) as one safetensors file with
    optional string ``metadata``. Tensors are detached, moved to CPU and made contiguous;
    tensors that share memory are copied, since safetensors refuses aliases."""
    prepared: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor names must be str, got {key!r}")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{key}: expected a torch.Tensor, got {type(tensor).__name__}")
        cpu = tensor.detach().to("cpu").contiguous()
        if cpu.numel() > 0:
            storage = cpu.untyped_storage()
            whole = storage.nbytes() == cpu.numel() * cpu.element_size()
            if storage.data_ptr() in seen_storages or not whole:
                cpu = cpu.clone()
            seen_storages.add(cpu.untyped_storage().data_ptr())
        prepared[key] = cpu
    if metadata is not None:
        bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
    data = safetensors.torch.save(prepared, metadata=dict(metadata) if metadata else None)
    atomic_write_bytes(Path(path), data)


def _read_safetensors_header(path: Path) -> dict:
    # Our own look at the header gives plain reasons ("truncated: ...") instead of
    # safetensors' internal error names, and catches files that are not ours at all.
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"header length {header_len} does not fit in a {size}-byte file")
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"header is not valid JSON ({_one_line(err)})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data_len = size - 8 - header_len
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {name!r} has no valid data_offsets")
        data_end = max(data_end, offsets[1])
    if data_end > data_len:
        raise ValueError(f"truncated: the header describes {data_end} data bytes, the file holds {data_len}")
    return header


def load_tensors(
    path: Path,
    expected: dict[str, tuple[tuple[int | None, ...] | None, torch.dtype | None]] | None = None,
    device: str = "cpu",
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a safetensors file written by ``save_tensors``; returns ``(tensors, metadata)``.

    ``expected`` maps every tensor name the file must hold (no more, no fewer) to
    ``(shape, dtype)``; a ``None`` shape, dimension or dtype is not checked. ``NotFoundError``
    if the file is missing; any other problem (truncated, garbled, not safetensors, wrong
    names, shapes or dtypes) is a one-line ``CorruptArtifactError`` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path}: file not found")

    def corrupt(reason: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{path}: {reason}; restore or delete this file")

    try:
        _read_safetensors_header(path)
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises SafetensorError, OSError, ValueError, ...
        raise corrupt(f"not a readable safetensors file ({_one_line(err)})") from None

    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise corrupt(f"unexpected tensor names (missing {missing}, unexpected {extra})")
        for name, (shape, dtype) in expected.items():
            tensor = tensors[name]
            if dtype is not None and tensor.dtype != dtype:
                raise corrupt(f"tensor {name!r} has dtype {tensor.dtype}, expected {dtype}")
            if shape is not None:
                actual = tuple(tensor.shape)
                matches = len(actual) == len(shape) and all(
                    want is None or want == got for want, got in zip(shape, actual)
                )
                if not matches:
                    wanted = tuple("*" if dim is None else dim for dim in shape)
                    raise corrupt(f"tensor {name!r} has shape {actual}, expected {wanted}")
    if device != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    return tensors, metadata


# ----------------------------------------------------------------------------- nested states
#
# Tree encoding (JSON): None/bool/int/str and finite floats stand for themselves; a list is
# a list. Every JSON object whose keys start with "__" is a tag:
#   {"__tensor__": key}      a tensor stored under ``key`` in the flat tensor dict
#   {"__tuple__": [...]}     a tuple
#   {"__float__": "nan"}     a non-finite float ("nan", "inf", "-inf")
#   {"__dict__": [[k, v]]}   a dict whose keys are not all plain strings (e.g. the int
#                            parameter ids of an optimizer state_dict); keys are encoded
#                            like values, so 0 and "0" stay different
#   {"__dtype__": "float32"} a torch.dtype;  {"__device__": "cuda:0"} a torch.device
# Any other object is a dict with string keys none of which starts with "__".


def _encode(obj: Any, path: list[str], tensors: dict[str, Tensor], allow_tensors: bool = True) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {"__float__": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, Tensor):
        if not allow_tensors:
            raise TypeError(f"{'.'.join(path) or '<root>'}: tensors cannot be dict keys")
        key = ".".join(path) or "__root__"
        unique_key, suffix = key, 1
        while unique_key in tensors:  # "a.b" and ["a"]["b"] would otherwise collide
            unique_key, suffix = f"{key}~{suffix}", suffix + 1
        tensors[unique_key] = obj
        return {"__tensor__": unique_key}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(item, [*path, str(i)], tensors, allow_tensors) for i, item in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(item, [*path, str(i)], tensors, allow_tensors) for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        if all(type(key) is str and not key.startswith("__") for key in obj):
            return {key: _encode(value, [*path, key], tensors, allow_tensors) for key, value in obj.items()}
        return {
            "__dict__": [
                [_encode(key, [*path, str(key)], tensors, allow_tensors=False), _encode(value, [*path, str(key)], tensors)]
                for key, value in obj.items()
            ]
        }
    raise TypeError(
        f"{'.'.join(path) or '<root>'}: cannot store a {type(obj).__name__} in a state; "
        "use tensors, dicts, lists, tuples, numbers, strings, bools or None"
    )


def _decode(node: Any, tensors: dict[str, Tensor], used: set[str]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(item, tensors, used) for item in node]
    if not isinstance(node, dict):
        raise ValueError(f"unexpected {type(node).__name__} in state tree")
    tags = [key for key in node if key.startswith("__")]
    if not tags:
        return {key: _decode(value, tensors, used) for key, value in node.items()}
    if len(node) != 1:
        raise ValueError(f"malformed tag object with keys {sorted(node)}")
    tag, payload = tags[0], node[tags[0]]
    if tag == "__tensor__":
        if not isinstance(payload, str) or payload not in tensors:
            raise ValueError(f"state tree refers to missing tensor {payload!r}")
        used.add(payload)
        return tensors[payload]
    if tag == "__tuple__" and isinstance(payload, list):
        return tuple(_decode(item, tensors, used) for item in payload)
    if tag == "__float__" and payload in ("nan", "inf", "-inf"):
        return float(payload)
    if tag == "__dtype__" and isinstance(payload, str):
        dtype = getattr(torch, payload, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {payload!r} in state tree")
        return dtype
    if tag == "__device__" and isinstance(payload, str):
        return torch.device(payload)
    if tag == "__dict__" and isinstance(payload, list):
        result = {}
        for item in payload:
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError("malformed __dict__ entry in state tree")
            key = _decode(item[0], tensors, used)
            if isinstance(key, (list, dict, Tensor)):
                raise ValueError("unhashable dict key in state tree")
            result[key] = _decode(item[1], tensors, used)
        return result
    raise ValueError(f"unknown or malformed tag {tag!r} in state tree")


def flatten_state(obj: Any) -> tuple[dict[str, Tensor], dict]:
    """Split a nested state into ``(tensors, tree)``.

    ``obj`` may nest dicts (any keys of type str/int/float/bool/None/tuple), lists, tuples,
    ints, floats, strs, bools, None, torch dtypes/devices and tensors. ``tensors`` maps a
    dotted path such as ``"optimizer.state.0.exp_avg"`` to each tensor (the objects
    themselves, not copies); ``tree`` is JSON-able and holds ``{"__tensor__": key}`` where
    the tensors were. ``unflatten_state`` is the exact inverse, except that tensor subclasses
    (``nn.Parameter``) come back as plain tensors and tuple subclasses as tuples.
    """
    tensors: dict[str, Tensor] = {}
    root = _encode(obj, [], tensors)
    return tensors, {"format": STATE_TREE_FORMAT, "root": root}


def unflatten_state(tensors: dict[str, Tensor], tree: dict) -> object:
    """Rebuild the object ``flatten_state`` split into ``tensors`` and ``tree``.
    Raises ``ValueError`` if the tree is malformed, refers to a tensor that is missing, or
    leaves a tensor unused."""
    if not isinstance(tree, dict) or tree.get("format") != STATE_TREE_FORMAT or "root" not in tree:
        raise ValueError(f"not a state tree of format {STATE_TREE_FORMAT}")
    used: set[str] = set()
    obj = _decode(tree["root"], tensors, used)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"tensors not referenced by the state tree: {unused[:5]}")
    return obj


def save_state(path: Path, state: Any) -> None:
    """Atomically write a nested ``state`` (see ``flatten_state``) as ONE safetensors file,
    the tree JSON in its metadata under ``"ncfm_state_tree"``: a checkpoint is replaced in
    one rename, so resume never sees half of an old and half of a new one."""
    tensors, tree = flatten_state(state)
    save_tensors(Path(path), tensors, {STATE_TREE_KEY: json.dumps(tree, sort_keys=True, allow_nan=False)})


def load_state(path: Path, device: str = "cpu") -> object:
    """Inverse of ``save_state``; tensors land on ``device`` (keep RNG states on CPU).
    ``NotFoundError`` if missing, one-line ``CorruptArtifactError`` for anything wrong."""
    path = Path(path)
    tensors, metadata = load_tensors(path, device=device)
    if STATE_TREE_KEY not in metadata:
        raise CorruptArtifactError(f"{path}: not an ncfm state file (no {STATE_TREE_KEY} metadata); restore or delete it")
    try:
        return unflatten_state(tensors, json.loads(metadata[STATE_TREE_KEY]))
    except (ValueError, TypeError) as err:
        raise CorruptArtifactError(f"{path}: broken state tree ({_one_line(err)}); restore or delete this file") from None


# ----------------------------------------------------------------------------- versions


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

    def manifest(self) -> dict:
        """The manifest as a dict (``NotFoundError`` / ``CorruptArtifactError``)."""
        return read_json(self.manifest_path)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    """The artifact store under ``root`` (default: ``store_root()``)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = store_root(root)
        self.artifacts_dir = self.root / "artifacts"
        self.pools_dir = self.root / "pools"

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- locking

    @contextlib.contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        name_dir = self.artifacts_dir / name
        name_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(name_dir / _LOCK_FILE))
        try:
            lock.acquire(timeout=_LOCK_PATIENCE_S)
        except filelock.Timeout:
            log.warning("still waiting for the lock %s (another ncfm process is writing %s)", lock.lock_file, name)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

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

    def create_version(self, name: str, manifest: dict) -> ArtifactVersion:
        """Allocate ``v<N+1>`` for ``name`` and write its manifest: a copy of ``manifest`` with
        ``name``, ``version``, ``created`` (ISO-8601 UTC) and ``status`` (default "running")."""
        validate_name(name)
        status = manifest.get("status", "running")
        if status not in STATUSES:
            raise ConfigError(f"invalid manifest status {status!r}; use one of {', '.join(STATUSES)}")
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
            full = dict(manifest)
            full.update(name=name, version=number, created=_utc_now(), status=status)
            write_json(version_dir / MANIFEST_FILE, full)
        return ArtifactVersion(name, number, version_dir)

    def update_manifest(self, version: ArtifactVersion, **fields: Any) -> dict:
        """Set ``fields`` in the manifest of ``version`` (read-modify-write under the name's
        lock, atomic write); returns the new manifest."""
        if "status" in fields and fields["status"] not in STATUSES:
            raise ConfigError(f"invalid manifest status {fields['status']!r}; use one of {', '.join(STATUSES)}")
        with self._name_lock(version.name):
            manifest = version.manifest()
            manifest.update(fields)
            write_json(version.manifest_path, manifest)
        return manifest

    def append_eval(self, version: ArtifactVersion, record: dict) -> dict:
        """Append ``record`` to the manifest's ``"evals"`` list (created if absent), under
        the lock; returns the new manifest."""
        with self._name_lock(version.name):
            manifest = version.manifest()
            evals = manifest.get("evals")
            if not isinstance(evals, list):
                evals = []
            manifest["evals"] = [*evals, record]
            write_json(version.manifest_path, manifest)
        return manifest

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
        a path to a directory holding ``manifest.json`` -> that directory.
        ``NotFoundError`` (with suggestions) when nothing matches.
        """
        ref = str(ref)
        as_path = Path(ref).expanduser()
        if as_path.is_dir() and (as_path / MANIFEST_FILE).is_file():
            return self._version_from_path(as_path)
        if "/" in ref or os.sep in ref:
            raise NotFoundError(f"{ref}: not a version directory (expected a directory containing {MANIFEST_FILE})")

        name, at, version_text = ref.partition("@")
        validate_name(name)
        if not at:
            return self._latest_complete(name)
        digits = version_text[1:] if version_text[:1] in ("v", "V") else version_text
        if not digits.isdigit():
            raise ConfigError(f"invalid version {version_text!r} in {ref!r}: use name@vN, e.g. {name}@v1")
        number = int(digits)
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
        manifest = read_json(directory / MANIFEST_FILE)
        name, number = manifest.get("name"), manifest.get("version")
        if not (isinstance(name, str) and NAME_PATTERN.match(name) and isinstance(number, int)):
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
        for version in reversed(self.versions(name)):
            try:
                status = version.manifest().get("status", "unknown")
            except (NotFoundError, CorruptArtifactError) as err:
                log.warning("skipping %s: %s", version.ref, err)
                status = "unreadable manifest"
            if status == "complete":
                return version
            described.append(f"v{version.version} ({status})")
        raise NotFoundError(
            f"{name} has no complete version ({', '.join(reversed(described))}); "
            f"pick one with {name}@vN or finish it with `ncfm resume {name}@vN`"
        )

    def scan(self) -> tuple[list[tuple[ArtifactVersion, dict]], list[str]]:
        """Every version in the store with its manifest, sorted by name and number, plus a
        warning string per version whose manifest is missing or unreadable (never raises
        for a broken entry)."""
        found: list[tuple[ArtifactVersion, dict]] = []
        warnings: list[str] = []
        for name in self.names():
            for version in self.versions(name):
                try:
                    found.append((version, version.manifest()))
                except (NotFoundError, CorruptArtifactError) as err:
                    warnings.append(f"{version.ref}: {err}")
        return found, warnings

    # -- pools

    def pool_dir(self, key: str) -> Path:
        """``<root>/pools/<key>`` for a pool cache key (validated like a name; not created)."""
        validate_name(key, what="pool key")
        return self.pools_dir / key
