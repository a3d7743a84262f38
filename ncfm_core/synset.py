"""The synthetic set: stored images, labels, multi-formation decoding and initialisation.

Multi-formation with factor ``rho`` stores each image of size HxW as ``rho x rho`` tiles of
size (H/rho)x(W/rho). Decoding upsamples every tile back to HxW, so ``M`` stored images give
``M * rho^2`` training images. Pixels live in [0, 1]; the network normalises them.

Images are ordered class-major: class ``c`` owns stored images ``[c*ipc, (c+1)*ipc)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ncfm_core.errors import ConfigError

INIT_MODES = ("real", "mix", "noise")


def check_factor(image_size: int, factor: int) -> None:
    """Raise ConfigError unless ``factor`` >= 1 divides ``image_size``."""
    if factor < 1 or image_size % factor != 0:
        raise ConfigError(
            f"factor (--factor) {factor} must be >= 1 and divide the image size {image_size}; "
            f"try 1 or 2"
        )


def image_to_tiles(images: Tensor, factor: int) -> Tensor:
    """Split each image into ``factor x factor`` tiles, row-major.

    (M, C, H, W) -> (M * factor^2, C, H/factor, W/factor).
    """
    if factor == 1:
        return images
    m, c, h, w = images.shape
    th, tw = h // factor, w // factor
    tiles = images.reshape(m, c, factor, th, factor, tw)  # (M, C, fy, th, fx, tw)
    tiles = tiles.permute(0, 2, 4, 1, 3, 5)  # (M, fy, fx, C, th, tw)
    return tiles.reshape(m * factor * factor, c, th, tw)


def tiles_to_image(tiles: Tensor, factor: int) -> Tensor:
    """Inverse of :func:`image_to_tiles`: (M * factor^2, C, h, w) -> (M, C, h*factor, w*factor)."""
    if factor == 1:
        return tiles
    n, c, th, tw = tiles.shape
    m = n // (factor * factor)
    grid = tiles.reshape(m, factor, factor, c, th, tw).permute(0, 3, 1, 4, 2, 5)  # (M, C, fy, th, fx, tw)
    return grid.reshape(m, c, factor * th, factor * tw)


def decode_synset(images: Tensor, labels: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Decode stored multi-formation images into training images.

    images (M, C, H, W), labels (M,) -> images (M * factor^2, C, H, W), labels (M * factor^2,).
    Each tile is bilinearly upsampled (align_corners=False) to H x W. Differentiable.
    """
    if factor == 1:
        return images, labels
    size = images.shape[-2:]
    tiles = image_to_tiles(images, factor)
    decoded = F.interpolate(tiles, size=size, mode="bilinear", align_corners=False)
    return decoded, labels.repeat_interleave(factor * factor)


def synset_labels(num_classes: int, ipc: int, device: torch.device | str | None = None) -> Tensor:
    """Class-major labels of the stored set: (num_classes * ipc,) int64."""
    return torch.arange(num_classes, device=device).repeat_interleave(ipc)


def sample_per_class(
    class_indices: list[Tensor], count: int, generator: torch.Generator
) -> Tensor:
    """Draw ``count`` train indices from each class, distinct while the class has enough.

    A class smaller than ``count`` is cycled through in one random order (only the "mix" init
    asks for more than IPC images, and IPC itself is checked against class sizes elsewhere).
    Returns (C, count) int64 on the generator's device.
    """
    rows = []
    for idx in class_indices:
        order = torch.randperm(len(idx), generator=generator, device=generator.device)
        if count > len(idx):
            order = order.repeat(-(-count // len(idx)))
        rows.append(idx.to(generator.device)[order[:count]])
    return torch.stack(rows)


def init_synset(
    train_images: Tensor,
    class_indices: list[Tensor],
    ipc: int,
    factor: int,
    mode: str,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Initial stored images and labels.

    train_images: uint8 (N, C, H, W) real images; class_indices: per-class index tensors.
    mode "real": ``ipc`` random real images per class; "mix": each stored image tiles
    ``factor^2`` downsampled real images of its class (the paper's init); "noise": uniform
    noise. Returns float images (C*ipc, C, H, W) in [0, 1] on train_images' device and labels.
    """
    if mode not in INIT_MODES:
        raise ConfigError(f"unknown init {mode!r}; choose one of {', '.join(INIT_MODES)}")
    num_classes = len(class_indices)
    _, channels, height, width = train_images.shape
    device = train_images.device
    labels = synset_labels(num_classes, ipc, device)
    if mode == "noise":
        noise = torch.rand(
            (num_classes * ipc, channels, height, width), generator=generator, device=generator.device
        )
        return noise.to(device), labels
    per_image = 1 if mode == "real" else factor * factor
    picks = sample_per_class(class_indices, ipc * per_image, generator).reshape(-1).to(device)
    real = train_images[picks].float() / 255.0  # (C*ipc*per_image, C, H, W)
    if mode == "real":
        return real, labels
    tiles = F.interpolate(real, size=(height // factor, width // factor), mode="area")
    return tiles_to_image(tiles, factor).clamp_(0.0, 1.0), labels
