"""Image files to uint8 tensors: decode with PIL, resize, centre-crop, stack.

Shared by the folder-based sources (``folder:PATH``, Tiny ImageNet, ImageNet subsets).
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ncfm_core.errors import NcfmError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})
"""File suffixes (compared in lower case) that count as images; other files are ignored."""

_PARALLEL_FROM = 64
"""Below this many files a thread pool costs more than it saves."""


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside ``directory``, sorted by name (so loading is deterministic)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_class_dirs(directory: Path) -> list[Path]:
    """Subdirectories of ``directory`` (one per class), sorted by name, hidden ones skipped."""
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale ``image`` so its shorter side is ``size`` (bilinear; PIL widens the filter when
    shrinking, so this antialiases), then crop the central ``size x size`` square."""
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_width = max(size, round(width * scale))
        new_height = max(size, round(height * scale))
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
        left = int(round((new_width - size) / 2.0))
        top = int(round((new_height - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return image


def _decode(path: Path, size: int) -> tuple[np.ndarray, str]:
    """Read one file: ``(size, size, 3)`` uint8 RGB pixels and the sha256 of its bytes."""
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            pixels = np.asarray(resize_center_crop(image.convert("RGB"), size), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NcfmError(f"cannot read image {path} ({reason}); delete or replace that file") from error
    return pixels, hashlib.sha256(raw).hexdigest()


def load_images(paths: list[Path], size: int) -> tuple[Tensor, list[str]]:
    """Decode ``paths`` into one ``(N, 3, size, size)`` uint8 tensor, in order, plus the
    sha256 hex of each file's bytes (for the dataset fingerprint). Decoding runs in a few
    threads: PIL releases the GIL while it decodes and resizes."""
    if not paths:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), []
    if len(paths) >= _PARALLEL_FROM:
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = list(pool.map(lambda p: _decode(p, size), paths))
    else:
        decoded = [_decode(p, size) for p in paths]
    stacked = np.stack([pixels for pixels, _ in decoded])  # (N, H, W, 3)
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
    return images, [digest for _, digest in decoded]


def resize_uint8(images: Tensor, size: int, antialias: bool = True, chunk: int = 1024) -> Tensor:
    """Bilinearly resize uint8 ``(N, C, H, W)`` images to ``(N, C, size, size)`` (half-pixel
    centres, ``align_corners=False``), rounding back to uint8. Returns the input if the size
    already matches."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty(*images.shape[:2], size, size, dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):  # float64 copies stay small
        block = images[start : start + chunk].double()
        resized = F.interpolate(block, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        out[start : start + chunk] = resized.round().clamp(0, 255).to(torch.uint8)
    return out


def load_labelled_splits(
    tag: str, root: Path, splits: list[list[tuple[Path, int]]], size: int
) -> tuple[list[tuple[Tensor, Tensor]], str]:
    """Decode each split's ``(path, label)`` list into ``(N, 3, size, size)`` uint8 images
    and ``(N,)`` int64 labels; returns ``[(images, labels), ...]`` and a fingerprint.

    The fingerprint is a sha256 over ``tag``, ``size`` and, per image in order, its path
    relative to ``root``, its label and the sha256 of its bytes: the source files as read
    (hashed while decoding, so the disk is read once).
    """
    hasher = hashlib.sha256(f"ncfm-dataset-v1\0{tag}\0image_size={size}\0".encode())
    tensors = []
    for split in splits:
        images, digests = load_images([path for path, _ in split], size)
        labels = torch.tensor([label for _, label in split], dtype=torch.int64)
        tensors.append((images, labels))
        for (path, label), digest in zip(split, digests):
            hasher.update(f"{path.relative_to(root).as_posix()}\0{label}\0{digest}\0".encode())
        hasher.update(b"\0split\0")
    return tensors, hasher.hexdigest()
