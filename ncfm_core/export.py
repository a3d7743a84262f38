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
``[A-Za-z0-9._ -]`` replaced by ``_``, cut to ``MAX_FOLDER_NAME`` characters (a cut name ends in
``~`` and 8 hex digits of the full name's sha256, so two long names stay apart).

Every export also writes ``ncfm-export.json`` (what was written: format, form, image count,
factor, class names, plus what the caller adds, e.g. the artifact) and ``README.txt``.

An export owns its folder: it is written into a hidden staging folder beside the target and
moved into place whole. A target that does not exist or is empty is simply taken. A target that
holds anything else is refused, unless ``replace=True`` (``--replace``) AND it holds an earlier
ncfm export (its ``ncfm-export.json``): then the old folder is swapped out by two renames and
deleted. Merging into a folder is never done: files of an older export would sit beside a record
that does not describe them. A symbolic link to a folder exports into the folder it names.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ncfm_core.errors import ConfigError, NcfmError
from ncfm_core.store import atomic_write_bytes
from ncfm_core.store.files import fsync_directory, read_json

EXPORT_FORMATS = ("png", "grid", "imagefolder", "pt", "npz")
TRAINING_FORMATS = ("imagefolder", "pt", "npz")
"""Formats meant for training a network: decoded by default (see :func:`decoded_by_default`)."""
GRID_MIN_CELL = 64
"""Grid cells are upscaled by an integer factor until their longer side is at least this."""
GRID_PAD = 2
"""Pixels between grid cells and around the grid."""
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._ -]")
MAX_FOLDER_NAME = 100
"""The longest folder name made from a class name (file systems allow 255 bytes)."""
EXPORT_INFO_FILE = "ncfm-export.json"
"""Written into every export: what it holds; also what marks a folder as an ncfm export."""
EXPORT_README_FILE = "README.txt"
_MAX_INFO_BYTES = 2**20


def _to_uint8(images: Tensor) -> np.ndarray:
    """(M, C, H, W) floats in [0, 1] -> (M, H, W, C) uint8 via round(x * 255)."""
    scaled = torch.round(images.detach().to("cpu", torch.float64).clamp(0.0, 1.0) * 255.0)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """One (H, W, C) uint8 image -> PIL image; 1 channel is grayscale ("L")."""
    # fromarray infers "L" from (H, W) and "RGB"/"RGBA" from (H, W, 3/4) uint8 arrays.
    return Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels))


def _short_name(name: str) -> str:
    """``name`` (already safe), cut to :data:`MAX_FOLDER_NAME` with a digest of the whole."""
    if len(name) <= MAX_FOLDER_NAME:
        return name
    return f"{name[:MAX_FOLDER_NAME - 9]}~{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _folder_names(class_names: Sequence[str]) -> list[str]:
    """File-system-safe, distinct folder names of at most ``MAX_FOLDER_NAME`` characters, one per class."""
    safe = [_short_name(_UNSAFE_CHARS.sub("_", str(name)).strip(" .") or "class") for name in class_names]
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


def _out_path(out_dir: Path | str) -> Path:
    """``out_dir`` as a path; an empty one (which would mean the current folder) is refused."""
    if not str(out_dir).strip():
        raise ConfigError("out (--out) is an empty path; give the folder to export into, e.g. synthetic/")
    return Path(out_dir).expanduser()


def previous_export(folder: Path) -> dict[str, Any] | None:
    """The ``ncfm-export.json`` of an earlier export in ``folder``, None if it holds none (or
    an unreadable one: then it is not known to be ours)."""
    try:
        info = read_json(folder / EXPORT_INFO_FILE, max_bytes=_MAX_INFO_BYTES, what="export record")
    except (NcfmError, OSError):
        return None
    return info if info.get("format") in EXPORT_FORMATS else None


def check_export_target(out_dir: Path | str, replace: bool = False) -> dict[str, Any] | None:
    """Before any work: whether an export may go to ``out_dir`` (see the module docstring);
    returns the record of the earlier export it will replace (None: nothing to replace).
    ``ConfigError`` for an empty path, a target that is not a folder or is the current folder,
    and a non-empty folder unless ``replace`` and it holds an ncfm export."""
    given = _out_path(out_dir)
    target = Path(os.path.realpath(given))
    try:
        here = Path.cwd().resolve()
    except OSError:
        here = None
    if here is not None and (target == here or target in here.parents):
        raise ConfigError(f"out (--out) {given} is the current folder or holds it: an export replaces its folder "
                          "whole; give a new folder, e.g. synthetic/")
    if not os.path.lexists(target):
        return None
    if not target.is_dir():
        raise ConfigError(f"out (--out) {given} exists and is not a folder; give a new or empty folder")
    if not any(target.iterdir()):
        return None
    previous = previous_export(target)
    if previous is None:
        raise ConfigError(f"out (--out) {given} is not empty and holds no ncfm export ({EXPORT_INFO_FILE}); "
                          "ncfm replaces only its own exports: give a new or empty folder")
    if not replace:
        raise ConfigError(f"out (--out) {given} already holds an export (of {previous.get('artifact', 'unknown')}, "
                          f"{previous.get('format')}); add replace=True (--replace) to replace it whole, or give a "
                          "new folder")
    return previous


def export_record(fmt: str, stored_images: int, factor: int, decoded: bool, class_names: Sequence[str],
                  info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``ncfm-export.json`` says of an export of ``stored_images`` images (``factor``:
    their multi-formation factor): format, form, the image count and factor as written, the
    class names, and ``info`` (e.g. the artifact and its normalisation)."""
    return {"format": fmt, "decoded": bool(decoded), "form": "decoded" if decoded else "stored",
            "images": stored_images * (factor**2 if decoded else 1), "stored_images": stored_images,
            "factor": 1 if decoded else factor, "class_names": [str(name) for name in class_names], **(info or {})}


def export_readme(info: dict[str, Any], stored_factor: int) -> str:
    """The ``README.txt`` beside an export: what its images are and how the networks saw them."""
    artifact = info.get("artifact") or "a synthetic set"
    if info["decoded"]:
        form = (f"DECODED training images: each stored image ({stored_factor} x {stored_factor} tiles) became "
                f"{stored_factor**2} images, upsampled to full size; train on these." if stored_factor > 1
                else "training images (no multi-formation: stored = decoded).")
    else:
        form = (f"STORED images: each holds {stored_factor} x {stored_factor} tiles; decode before training "
                f"(ncfm export --decoded, or ncfm_core.open_synthetic)." if stored_factor > 1
                else "stored images (no multi-formation: stored = decoded).")
    mean, std = info.get("mean"), info.get("std")
    norm = ("networks normalise [0, 1] pixels with mean " + ", ".join(f"{v:.4f}" for v in mean)
            + " and std " + ", ".join(f"{v:.4f}" for v in std)) if mean and std else \
        "normalisation: not recorded (artifact made before ncfm recorded it)"
    return (f"{artifact}, exported by ncfm as {info['format']}\n"
            f"{info['images']} {form}\n"
            f"pixels in [0, 1] (PNG: 0..255); {norm}\n"
            f"details: {EXPORT_INFO_FILE}\n")


def export_synset(
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    out_dir: Path,
    fmt: str,
    *,
    factor: int = 1,
    decoded: bool | None = None,
    replace: bool = False,
    info: dict[str, Any] | None = None,
) -> list[Path]:
    """Write a synthetic set into the folder ``out_dir`` in format ``fmt``, with
    ``ncfm-export.json`` (what was written, plus ``info``) and ``README.txt``; returns the
    files of the format written.

    images (M, C, H, W) float in [0, 1], stored form; labels (M,) int64 indices into
    ``class_names``. With ``decoded=True`` the multi-formation images are first decoded with
    ``factor`` into (M * factor^2, C, H, W); ``None``: :func:`decoded_by_default`. ``out_dir``
    must be new or empty, or hold an earlier ncfm export and ``replace`` be set (see
    :func:`check_export_target`); the export then takes its place whole. ``ConfigError`` for an
    unknown format, a refused target or inputs that do not fit together, before anything is written.
    """
    check_export_target(out_dir, replace)
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
    record = export_record(fmt, int(images.shape[0]), factor, decoded, class_names, info)
    if decoded:
        from ncfm_core.synset import decode_synset  # lazy: export must not pull in the loop

        images, labels = decode_synset(images.detach(), labels, factor)
    written_factor = 1 if decoded else factor
    images = images.detach().to("cpu", torch.float32)

    def write(stage: Path) -> list[Path]:
        files = _write_format(fmt, images, labels, class_names, written_factor, stage)
        atomic_write_bytes(stage / EXPORT_README_FILE, export_readme(record, factor).encode())
        atomic_write_bytes(stage / EXPORT_INFO_FILE, (json.dumps(record, sort_keys=True, indent=2) + "\n").encode())
        return files

    return _staged(_out_path(out_dir), write, replace)


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


def _staged(given: Path, write: Callable[[Path], list[Path]], replace: bool) -> list[Path]:
    """Run ``write`` into a hidden staging folder beside the target, then put it in the target's
    place: one rename when the target is new or an empty folder; when it holds an earlier export
    (and ``replace``), the old folder is renamed aside, the new one renamed in, the old one
    deleted. A process killed while writing leaves the target as it was (and at worst a hidden
    ``.ncfm-export-*.tmp`` folder beside it), never a half-written export. A symbolic link to a
    folder exports into the folder it names. Returns the final paths (under ``given``)."""
    target = Path(os.path.realpath(given))
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".ncfm-export-{secrets.token_hex(4)}.tmp"
    aside = target.parent / f".ncfm-replaced-{secrets.token_hex(4)}.tmp"
    stage.mkdir()
    swapped = False
    try:
        written = write(stage)
        if check_export_target(given, replace) is None:  # again: it may have changed while we wrote
            os.replace(stage, target)  # a new name, or over an empty folder (POSIX)
        else:
            os.rename(target, aside)
            try:
                os.rename(stage, target)
            except BaseException:
                os.rename(aside, target)
                raise
            swapped = True
        fsync_directory(target.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if swapped:
            shutil.rmtree(aside, ignore_errors=True)
    return [given / path.relative_to(stage) for path in written]
