"""safetensors IO with plain, one-line errors naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ncfm_core.errors import CorruptArtifactError, one_line
from ncfm_core.store.files import atomic_write_bytes, descriptor_path, open_regular

# safetensors itself refuses headers above 100 MB; a larger length prefix means garbage.
_MAX_HEADER_BYTES = 100_000_000

DIGEST_KEY = "ncfm_sha256"
"""Metadata key of the sha256 of a file's tensors (names, dtypes, shapes and bytes, by name):
written by :func:`save_tensors`, checked by :func:`load_tensors`, so flipped bytes in tensor
data are found on load even where no manifest says what the file should hold."""


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        hasher.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a whole regular file (what ``sha256sum`` prints), read in 1 MiB blocks.
    ``NotFoundError`` if missing, ``CorruptArtifactError`` if not a regular file
    (``files.open_regular``: a FIFO or a device is never read)."""
    hasher = hashlib.sha256()
    with open_regular(Path(path)) as (fd, _):
        for block in iter(lambda: os.read(fd, 1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically write ``tensors`` (any devices, any layout) as one safetensors file with
    optional string ``metadata`` plus the tensors' digest (``DIGEST_KEY``). Tensors are
    detached, moved to CPU and made contiguous; tensors that share memory are copied, since
    safetensors refuses aliases. Returns the sha256 of the whole file written."""
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
    full_metadata = {**(metadata or {}), DIGEST_KEY: tensors_digest(prepared)}
    data = safetensors.torch.save(prepared, metadata=full_metadata)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def _read_safetensors_header(fd: int, size: int) -> dict:
    # Our own look at the header gives plain reasons ("truncated: ...") instead of
    # safetensors' internal error names, and catches files that are not ours at all.
    with open(fd, "rb", closefd=False) as handle:
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
        raise ValueError(f"header is not valid JSON ({one_line(err)})") from None
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
    if the file is missing; any other problem (not a regular file, truncated, garbled, not
    safetensors, wrong names, shapes or dtypes) is a one-line ``CorruptArtifactError`` naming
    the file. Permission errors propagate as ``OSError``.
    """
    path = Path(path)

    def corrupt(reason: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{path}: {reason}; restore or delete this file")

    with open_regular(path) as (fd, info):
        try:
            _read_safetensors_header(fd, info.st_size)
            # safetensors takes a path: the descriptor's own, so what it maps is the file checked.
            with safetensors.safe_open(descriptor_path(fd, path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as err:  # safetensors raises SafetensorError, OSError, ValueError, ...
            raise corrupt(f"not a readable safetensors file ({one_line(err)})") from None
    recorded = metadata.pop(DIGEST_KEY, None)
    if recorded is not None and recorded != tensors_digest(tensors):
        raise corrupt("tensor data does not match the sha256 recorded in its header (bytes were changed or damaged)")

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
