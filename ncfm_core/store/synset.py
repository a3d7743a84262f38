"""The synthetic-set and sampler files of a version: ``synset.safetensors`` (the stored images,
their labels, how to decode them) and ``sampler.safetensors`` (psi's weights, if it learned).
This module owns both formats: what is written, and what is accepted on load."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ncfm_core.errors import CorruptArtifactError, one_line
from ncfm_core.store.tensors import load_tensors, save_tensors

SYNSET_FORMAT = "ncfm-synset/1"
SAMPLER_FORMAT = "ncfm-sampler/1"


@dataclass(frozen=True)
class SyntheticSet:
    """A loaded ``synset.safetensors``: stored images (M, C, H, W) float32 in [0, 1], labels (M,).

    ``mean``/``std``: the per-channel normalisation the networks apply to [0, 1] inputs
    (``(x - mean) / std``), the real training set's statistics; None for files written before
    ncfm recorded them."""

    images: Tensor
    labels: Tensor
    factor: int
    ipc: int
    class_names: tuple[str, ...]
    path: Path
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_synset(path: Path) -> SyntheticSet:
    """Load and validate a synthetic set. ``NotFoundError`` if the file is missing; anything
    else wrong (not safetensors, truncated, wrong tensors, shapes, dtypes, metadata, values)
    is a one-line ``CorruptArtifactError`` naming the file."""
    path = Path(path)
    tensors, meta = load_tensors(
        path, {"images": ((None, None, None, None), torch.float32), "labels": ((None,), torch.int64)}
    )

    def corrupt(reason: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{path}: {reason}; restore or delete this file")

    if meta.get("format") != SYNSET_FORMAT:
        raise corrupt(f"not an ncfm synthetic set (format {meta.get('format')!r}, expected {SYNSET_FORMAT!r})")
    try:
        numbers = {key: int(meta[key]) for key in ("factor", "ipc", "num_classes", "image_size", "channels")}
        class_names = json.loads(meta["class_names"])
    except (KeyError, ValueError, RecursionError) as err:
        raise corrupt(f"missing or malformed metadata ({one_line(err)})") from None
    if not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
        raise corrupt("metadata class_names is not a list of strings")
    if len(class_names) != numbers["num_classes"] or min(numbers.values()) < 1:
        raise corrupt("inconsistent metadata (class count, factor or IPC)")
    images, labels = tensors["images"], tensors["labels"]
    expected_shape = (numbers["num_classes"] * numbers["ipc"], numbers["channels"],
                      numbers["image_size"], numbers["image_size"])
    if tuple(images.shape) != expected_shape:
        raise corrupt(f"tensor 'images' has shape {tuple(images.shape)}, expected {expected_shape}")
    if tuple(labels.shape) != (expected_shape[0],):
        raise corrupt(f"tensor 'labels' has shape {tuple(labels.shape)}, expected ({expected_shape[0]},)")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= numbers["num_classes"]):
        raise corrupt(f"labels outside [0, {numbers['num_classes']})")
    if not bool(torch.isfinite(images).all()):
        raise corrupt("images contain NaN or infinity")
    if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise corrupt("pixel values outside [0, 1]")
    mean, std = _normalization(meta, numbers["channels"], corrupt)
    return SyntheticSet(images, labels, numbers["factor"], numbers["ipc"], tuple(class_names), path, mean, std)


def _normalization(
    meta: dict[str, str], channels: int, corrupt: Callable[[str], Exception]
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(mean, std) from the metadata, or (None, None) for files written before they were recorded."""
    if "mean" not in meta and "std" not in meta:
        return None, None
    try:
        mean, std = (tuple(float(v) for v in json.loads(meta[key])) for key in ("mean", "std"))
    except (KeyError, ValueError, TypeError, RecursionError) as err:
        raise corrupt(f"malformed normalisation metadata ({one_line(err)})") from None
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise corrupt(f"normalisation metadata needs {channels} means and positive stds")
    return mean, std


def save_synset(path: Path, images: Tensor, labels: Tensor, *, factor: int, ipc: int,
                class_names: Sequence[str], mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> str:
    """Write a synthetic set: ``images`` (C*ipc, channels, H, W) in [0, 1] as float32, ``labels``
    (C*ipc,) as int64, and the metadata :func:`load_synset` checks them against; ``mean``/``std``
    (one per channel) record the normalisation the networks apply to the images."""
    extra = {} if mean is None or std is None else {
        "mean": json.dumps([float(v) for v in mean]), "std": json.dumps([float(v) for v in std])}
    return save_tensors(  # the file's sha256
        path,
        {"images": images.to(torch.float32).contiguous(), "labels": labels.to(torch.int64).contiguous()},
        {
            "format": SYNSET_FORMAT,
            "factor": str(factor),
            "ipc": str(ipc),
            "num_classes": str(len(class_names)),
            "image_size": str(images.shape[-1]),
            "channels": str(images.shape[1]),
            "class_names": json.dumps(list(class_names)),
            **extra,
        },
    )


def save_sampler(path: Path, tensors: dict[str, Tensor], num_freqs: int) -> str:
    """Write psi's weights. Without a learned psi the file is still written (no tensors), so every
    complete version has the same files; its metadata says which sampler the run used. Returns
    the file's sha256."""
    return save_tensors(path, tensors, {"format": SAMPLER_FORMAT, "kind": "mixture" if tensors else "gaussian",
                                 "num_freqs": str(num_freqs)})
