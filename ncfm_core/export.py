"""Export a synthetic set in forms people and other tools read.

Formats (``EXPORT_FORMATS``):

- ``png``: ``<out>/<class_name>/<index:04d>.png``, ``index`` counting the images of a class.
- ``grid``: ``<out>/grid.png``, one row per class with its name on the left, small images
  upscaled (nearest neighbour) to at least ``GRID_MIN_CELL`` pixels so they can be seen.
- ``imagefolder``: ``<out>/train/<class_index>_<class_name>/<index:04d>.png``. The class index
  is zero-padded to one width, so sorting folder names (what
  ``torchvision.datasets.ImageFolder`` does) gives class order and its labels equal ours.
- ``pt``: ``<out>/synset.pt``, ``torch.save`` of ``{"images", "labels", "class_names",
  "factor"}``: the form other distillation evaluators load.
- ``npz``: ``<out>/synset.npz`` with ``images`` (float32 NCHW), ``labels`` (int64),
  ``class_names`` (unicode array) and ``factor``; loadable with ``allow_pickle=False``.

The training formats (``TRAINING_FORMATS``: imagefolder, pt, npz) write the DECODED training
images by default (each stored image becomes factor x factor images, what the networks are
trained on); png and grid write the stored form (tiles side by side) by default.
``factor`` in pt/npz is the multi-formation factor of the images as written: 1 after
decoding, else the factor of the stored form. Pixels are written as ``round(x * 255)``
after clamping to [0, 1]. Class names become folder names with every character outside
``[A-Za-z0-9._ -]`` replaced by ``_``.
"""

from __future__ import annotations

import io
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ncfm_core.errors import ConfigError
from ncfm_core.store import atomic_write_bytes
from ncfm_core.store.files import fsync_directory

EXPORT_FORMATS = ("png", "grid", "imagefolder", "pt", "npz")
TRAINING_FORMATS = ("imagefolder", "pt", "npz")
"""Formats meant for training a network: decoded by default (see :func:`decoded_by_default`)."""
GRID_MIN_CELL = 64
"""Grid cells are upscaled by an integer factor until their longer side is at least this."""
GRID_PAD = 2
"""Pixels between grid cells and around the grid."""
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._ -]")


def _to_uint8(images: Tensor) -> np.ndarray:
    """(M, C, H, W) floats in [0, 1] -> (M, H, W, C) uint8 via round(x * 255)."""
    scaled = torch.round(images.detach().to("cpu", torch.float64).clamp(0.0, 1.0) * 255.0)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """One (H, W, C) uint8 image -> PIL image; 1 channel is grayscale ("L")."""
    # fromarray infers "L" from (H, W) and "RGB"/"RGBA" from (H, W, 3/4) uint8 arrays.
    return Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels))


def _folder_names(class_names: Sequence[str]) -> list[str]:
    """File-system-safe, distinct folder names, one per class."""
    safe = [_UNSAFE_CHARS.sub("_", str(name)).strip(" .") or "class" for name in class_names]
    counts: dict[str, int] = {}
    for name in safe:
        counts[name] = counts.get(name, 0) + 1
    # Two classes that sanitise to one name would otherwise share a folder.
    return [name if counts[name] == 1 else f"{name}_{index}" for index, name in enumerate(safe)]


def _per_class_indices(labels: Tensor) -> list[int]:
    """For each image, how many images of its class came before it."""
    seen: dict[int, int] = {}
    indices = []
    for label in labels.tolist():
        indices.append(seen.get(label, 0))
        seen[label] = indices[-1] + 1
    return indices


def _write_pngs(pixels: np.ndarray, labels: Tensor, folders: list[str], root: Path) -> list[Path]:
    written = []
    for image, label, index in zip(pixels, labels.tolist(), _per_class_indices(labels)):
        path = root / folders[label] / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _to_pil(image).save(path, format="PNG")
        written.append(path)
    return written


def _write_grid(pixels: np.ndarray, labels: Tensor, class_names: Sequence[str], path: Path) -> None:
    """One row per class present (in class order), images left to right in stored order."""
    height, width = pixels.shape[1:3]
    scale = max(1, math.ceil(GRID_MIN_CELL / max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    rows: dict[int, list[int]] = {}
    for position, label in enumerate(labels.tolist()):
        rows.setdefault(label, []).append(position)
    row_labels = sorted(rows)
    columns = max(len(members) for members in rows.values())

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_boxes = [measure.textbbox((0, 0), str(class_names[label]), font=font) for label in row_labels]
    label_width = max(box[2] for box in text_boxes) + 2 * GRID_PAD

    grid_w = label_width + columns * (cell_w + GRID_PAD) + GRID_PAD
    grid_h = len(row_labels) * (cell_h + GRID_PAD) + GRID_PAD
    canvas = Image.new("RGB", (grid_w, grid_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, (label, box) in enumerate(zip(row_labels, text_boxes)):
        top = GRID_PAD + row * (cell_h + GRID_PAD)
        text_top = top + (cell_h - (box[3] - box[1])) // 2 - box[1]
        draw.text((GRID_PAD, text_top), str(class_names[label]), fill=(0, 0, 0), font=font)
        for column, position in enumerate(rows[label]):
            tile = _to_pil(pixels[position]).convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_width + column * (cell_w + GRID_PAD), top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def decoded_by_default(fmt: str) -> bool:
    """Whether ``fmt`` writes decoded training images unless told otherwise (the training formats)."""
    return fmt in TRAINING_FORMATS


def export_synset(
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    out_dir: Path,
    fmt: str,
    *,
    factor: int = 1,
    decoded: bool | None = None,
) -> list[Path]:
    """Write a synthetic set under ``out_dir`` in format ``fmt``; returns the files written.

    images (M, C, H, W) float in [0, 1], stored form; labels (M,) int64 indices into
    ``class_names``. With ``decoded=True`` the multi-formation images are first decoded with
    ``factor`` into (M * factor^2, C, H, W); ``None``: :func:`decoded_by_default`. ``out_dir`` is created; files of the same name
    are overwritten, other files are left alone. ``ConfigError`` for an unknown format or
    inputs that do not fit together.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    if images.dim() != 4:
        raise ConfigError(f"expected images of shape (M, C, H, W), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ConfigError(f"expected labels of shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ConfigError("the synthetic set is empty; nothing to export")
    labels = labels.detach().to("cpu", torch.int64)
    if int(labels.min()) < 0 or int(labels.max()) >= len(class_names):
        raise ConfigError(
            f"labels range over [{int(labels.min())}, {int(labels.max())}] but there are "
            f"{len(class_names)} class names"
        )
    if fmt in ("png", "grid", "imagefolder") and images.shape[1] not in (1, 3, 4):
        raise ConfigError(f"cannot write {images.shape[1]}-channel images as PNG; use --format pt or npz")

    if decoded is None:
        decoded = decoded_by_default(fmt)
    if decoded:
        from ncfm_core.synset import decode_synset  # lazy: export must not pull in the loop

        images, labels = decode_synset(images.detach(), labels, factor)
    written_factor = 1 if decoded else factor
    images = images.detach().to("cpu", torch.float32)
    return _staged(Path(out_dir), lambda stage: _write_format(fmt, images, labels, class_names, written_factor, stage))


def _write_format(fmt: str, images: Tensor, labels: Tensor, class_names: Sequence[str], written_factor: int,
                  out_dir: Path) -> list[Path]:
    """Write the files of ``fmt`` under ``out_dir`` (the staging folder); returns them."""
    if fmt == "png":
        return _write_pngs(_to_uint8(images), labels, _folder_names(class_names), out_dir)
    if fmt == "imagefolder":
        width = max(3, len(str(len(class_names) - 1)))
        folders = [f"{index:0{width}d}_{name}" for index, name in enumerate(_folder_names(class_names))]
        return _write_pngs(_to_uint8(images), labels, folders, out_dir / "train")
    if fmt == "grid":
        path = out_dir / "grid.png"
        _write_grid(_to_uint8(images), labels, class_names, path)
        return [path]
    if fmt == "pt":
        path = out_dir / "synset.pt"
        buffer = io.BytesIO()
        payload = {
            "images": images.contiguous(),
            "labels": labels.contiguous(),
            "class_names": [str(name) for name in class_names],
            "factor": written_factor,
        }
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return [path]
    # npz
    path = out_dir / "synset.npz"
    buffer = io.BytesIO()
    np.savez(
        buffer,
        images=images.numpy().astype(np.float32),
        labels=labels.numpy().astype(np.int64),
        class_names=np.array([str(name) for name in class_names], dtype=np.str_),
        factor=np.int64(written_factor),
    )
    atomic_write_bytes(path, buffer.getvalue())
    return [path]


def _staged(out_dir: Path, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Run ``write`` into a hidden staging folder beside ``out_dir``, then move what it wrote into
    place by renames: the whole folder when ``out_dir`` is new (or empty), else file by file and
    new class folders whole (other files in ``out_dir`` are left alone). A process killed while
    writing leaves ``out_dir`` as it was (and at worst the hidden ``.<name>.export-*.tmp``
    folder), never a half-written file under its final name. Returns the final paths."""
    given, out_dir = out_dir, out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.export-{secrets.token_hex(4)}.tmp"
    stage.mkdir()
    try:
        written = write(stage)
        if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
            os.replace(stage, out_dir)  # replaces an empty folder too (POSIX)
        else:
            if not out_dir.is_dir():
                raise ConfigError(f"--out {out_dir} is a file; pass a folder")
            _merge_into(stage, out_dir)
        fsync_directory(out_dir.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [given / path.relative_to(stage) for path in written]


def _merge_into(source: Path, target: Path) -> None:
    for entry in sorted(source.iterdir()):
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            _merge_into(entry, destination)
        else:
            os.replace(entry, destination)  # one rename: the old file or the new, whole
