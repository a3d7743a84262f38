"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021), batched over groups.

One random draw of parameters per *group* (a class): every image of a group, real or
synthetic, gets the same transformation, and the result is differentiable w.r.t. the
images. All groups are handled by one vectorised op per augmentation, with no Python
loop over images or groups.

Images are ``(B, C, H, W)`` pixels in ``[0, 1]`` (the networks normalise them later), so
brightness, saturation and contrast act on ``[0, 1]`` values; nothing is clamped, as in
DSA. Images are assumed square (``H == W == image_size``).

Operations and parameter ranges (DSA's ``ParamDiffAug``), always applied in this order
whatever order the strategy names them in:

- ``color``: brightness ``x + U(-0.5, 0.5)``; then saturation
  ``(x - m_pixel) * U(0, 2) + m_pixel`` with ``m_pixel`` the channel mean of each pixel;
  then contrast ``(x - m_image) * U(0.5, 1.5) + m_image`` with ``m_image`` the mean of the
  whole image.
- ``crop``: translation by integer pixel shifts in ``[-s, s]``, ``s = int(0.125 * size +
  0.5)``, zero padding: ``out[h, w] = x[h + dy, w + dx]``.
- ``cutout``: a zeroed square of side ``int(0.5 * size + 0.5)`` centred at a random pixel
  (clipped at the border).
- ``flip``: horizontal flip with probability 0.5 (never with ``allow_flip=False``).
- ``scale``: independent x/y sampling-grid scales in ``[1/1.2, 1.2]``.
- ``rotate``: rotation by ``U(-15, 15)`` degrees.

Flip, scale and rotate are composed into one affine matrix per group and applied with a
single ``grid_sample`` (bilinear, zero padding, ``align_corners=True``): the sampling point
of output pixel ``p`` is ``F S R p`` in normalised coordinates, exactly what applying
flip, then scale, then rotate one after another gives, except that sequential resampling
would also zero the pixels that an intermediate step pushed outside the frame. Crop stays
an exact integer shift and cutout an exact mask.

Difference from DSA's reference code: its default ``aug_mode='S'`` applies only ONE
randomly chosen operation of the strategy per call; here every named operation is
applied every time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ncfm_core.errors import ConfigError

__all__ = [
    "EVAL_STRATEGY",
    "MATCH_STRATEGY",
    "OPERATIONS",
    "PARAM_KEYS",
    "apply_params",
    "augment",
    "parse_strategy",
    "sample_params",
]

MATCH_STRATEGY = "color_crop_cutout"
EVAL_STRATEGY = "color_crop_cutout_flip_scale_rotate"

# Canonical order in which operations run.
OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")
# Parameter names, in the order apply_params uses them; each op fills some of them.
PARAM_KEYS = ("brightness", "saturation", "contrast", "crop_shift", "cutout_centre", "flip", "scale", "rotate")

BRIGHTNESS = 1.0  # brightness offset is (U(0,1) - 0.5) * BRIGHTNESS
SATURATION = 2.0  # saturation factor is U(0,1) * SATURATION
CONTRAST = 0.5  # contrast factor is U(0,1) + CONTRAST
CROP_RATIO = 0.125  # largest shift as a fraction of the side
CUTOUT_RATIO = 0.5  # cutout side as a fraction of the side
FLIP_PROBABILITY = 0.5
SCALE_RATIO = 1.2  # scales in [1/SCALE_RATIO, SCALE_RATIO]
ROTATE_DEGREES = 15.0  # angles in [-ROTATE_DEGREES, ROTATE_DEGREES]


def parse_strategy(strategy: str | Sequence[str], allow_flip: bool = True) -> tuple[str, ...]:
    """``"color_crop_cutout"`` (or a sequence of names) -> the operations in canonical
    order, e.g. ``("color", "crop", "cutout")``. ``""`` and ``"none"`` give ``()``.
    ``"flip"`` is dropped when ``allow_flip`` is false. Unknown or repeated names raise
    :class:`ConfigError`."""
    if isinstance(strategy, str):
        text = strategy.strip().lower()
        names = [] if text in ("", "none") else text.split("_")
    else:
        names = [str(name).strip().lower() for name in strategy]
    unknown = [name for name in names if name not in OPERATIONS]
    if unknown:
        raise ConfigError(
            f"unknown augmentation {unknown[0]!r} in strategy {strategy!r}; "
            f"use names from: {', '.join(OPERATIONS)} joined by '_' (or 'none')"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"augmentation strategy {strategy!r} names {repeated[0]!r} twice; name it once")
    return tuple(op for op in OPERATIONS if op in names and (allow_flip or op != "flip"))


def sample_params(
    strategy: str | Sequence[str],
    num_groups: int,
    image_size: int,
    generator: torch.Generator,
    *,
    allow_flip: bool = True,
) -> dict[str, Tensor]:
    """Draw one set of augmentation parameters per group, on ``generator.device``.

    Returns a dict with a subset of these keys (only those the strategy needs), every
    tensor with leading dimension ``num_groups`` (G):
    ``brightness`` (G,) offset; ``saturation`` (G,) factor; ``contrast`` (G,) factor;
    ``crop_shift`` (G, 2) int64 (row, column) shift; ``cutout_centre`` (G, 2) int64
    (row, column); ``flip`` (G,) bool; ``scale`` (G, 2) (x, y) grid scale; ``rotate`` (G,)
    angle in radians.
    """
    ops = parse_strategy(strategy, allow_flip=allow_flip)
    if num_groups < 1:
        raise ConfigError(f"augmentation needs at least one group, got {num_groups}")
    if image_size < 1:
        raise ConfigError(f"image size must be positive, got {image_size}")
    device = generator.device

    def uniform(*shape: int) -> Tensor:
        return torch.rand(num_groups, *shape, generator=generator, device=device)

    params: dict[str, Tensor] = {}
    if "color" in ops:
        params["brightness"] = (uniform() - 0.5) * BRIGHTNESS
        params["saturation"] = uniform() * SATURATION
        params["contrast"] = uniform() + CONTRAST
    if "crop" in ops:
        max_shift = int(image_size * CROP_RATIO + 0.5)
        params["crop_shift"] = torch.randint(
            -max_shift, max_shift + 1, (num_groups, 2), generator=generator, device=device
        )
    if "cutout" in ops:
        side = int(image_size * CUTOUT_RATIO + 0.5)
        # As DSA: centres in [0, size] for an even side, [0, size) for an odd one.
        params["cutout_centre"] = torch.randint(
            0, image_size + (1 - side % 2), (num_groups, 2), generator=generator, device=device
        )
    if "flip" in ops:
        params["flip"] = uniform() < FLIP_PROBABILITY
    if "scale" in ops:
        params["scale"] = uniform(2) * (SCALE_RATIO - 1.0 / SCALE_RATIO) + 1.0 / SCALE_RATIO
    if "rotate" in ops:
        params["rotate"] = (uniform() * 2.0 - 1.0) * math.radians(ROTATE_DEGREES)
    return params


def apply_params(images: Tensor, groups: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Apply per-group parameters: image ``b`` uses draw ``groups[b]``.

    ``images`` (B, C, H, W) float; ``groups`` (B,) int64 in ``[0, G)``; ``params`` as
    returned by :func:`sample_params` (any subset of its keys). Returns (B, C, H, W),
    differentiable w.r.t. ``images``.
    """
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise ConfigError(f"unknown augmentation parameter(s) {', '.join(unknown)}; expected keys from {PARAM_KEYS}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ConfigError(f"augmentation expects float images (B, C, H, W), got {tuple(images.shape)} {images.dtype}")
    if groups.dim() != 1 or groups.shape[0] != images.shape[0]:
        raise ConfigError(
            f"groups must have one entry per image: got shape {tuple(groups.shape)} for {images.shape[0]} images"
        )
    if not params:
        return images
    num_groups = {value.shape[0] for value in params.values()}
    if len(num_groups) != 1:
        raise ConfigError(f"augmentation parameters disagree on the number of groups: {sorted(num_groups)}")

    batch = images.shape[0]
    device, dtype = images.device, images.dtype
    groups = groups.to(device=device, dtype=torch.long)

    def per_image(key: str) -> Tensor:
        return params[key].to(device)[groups]

    def per_image_factor(key: str) -> Tensor:
        return per_image(key).to(dtype).view(batch, 1, 1, 1)

    x = images
    if "brightness" in params:
        x = x + per_image_factor("brightness")
    if "saturation" in params:
        pixel_mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        x = (x - pixel_mean) * per_image_factor("saturation") + pixel_mean
    if "contrast" in params:
        image_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = (x - image_mean) * per_image_factor("contrast") + image_mean
    if "crop_shift" in params:
        x = _shift_with_zero_padding(x, per_image("crop_shift"))
    if "cutout_centre" in params:
        x = x * _cutout_mask(x.shape[-2], x.shape[-1], per_image("cutout_centre")).to(dtype)
    if any(key in params for key in ("flip", "scale", "rotate")):
        theta = _geometric_matrices(params, torch.promote_types(dtype, torch.float32), device)[groups]
        grid = F.affine_grid(theta, list(x.shape), align_corners=True).to(dtype)  # (B, H, W, 2)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return x


def augment(
    images: Tensor,
    groups: Tensor,
    strategy: str | Sequence[str],
    generator: torch.Generator,
    *,
    num_groups: int,
    allow_flip: bool = True,
) -> Tensor:
    """Sample one draw per group and apply it: (B, C, H, W) -> (B, C, H, W).

    ``groups`` (B,) int64 in ``[0, num_groups)``; put a class's real and synthetic images
    in the same group to augment them alike.
    """
    params = sample_params(strategy, num_groups, images.shape[-1], generator, allow_flip=allow_flip)
    return apply_params(images, groups, params)


def _shift_with_zero_padding(x: Tensor, shift: Tensor) -> Tensor:
    """``out[b, :, h, w] = x[b, :, h + shift[b, 0], w + shift[b, 1]]``, zero where that is
    outside the image. x (B, C, H, W), shift (B, 2) int64."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1))  # (B, C, H+2, W+2); row/column 0 and H+1/W+1 are zero
    # Sources outside the image clamp onto the zero border.
    rows = (torch.arange(height, device=x.device) + shift[:, :1] + 1).clamp(0, height + 1)  # (B, H)
    cols = (torch.arange(width, device=x.device) + shift[:, 1:] + 1).clamp(0, width + 1)  # (B, W)
    x = padded.gather(2, rows[:, None, :, None].expand(batch, channels, height, width + 2))
    return x.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))


def _cutout_mask(height: int, width: int, centre: Tensor) -> Tensor:
    """(B, 1, H, W) mask, 0 inside each image's square of side ``int(0.5 * size + 0.5)``
    starting at ``centre - side // 2``, 1 elsewhere. centre (B, 2) int64 (row, column)."""
    side_h = int(height * CUTOUT_RATIO + 0.5)
    side_w = int(width * CUTOUT_RATIO + 0.5)
    first_row = centre[:, :1] - side_h // 2  # (B, 1)
    first_col = centre[:, 1:] - side_w // 2
    rows = torch.arange(height, device=centre.device)
    cols = torch.arange(width, device=centre.device)
    in_rows = (rows >= first_row) & (rows < first_row + side_h)  # (B, H)
    in_cols = (cols >= first_col) & (cols < first_col + side_w)  # (B, W)
    return (~(in_rows[:, :, None] & in_cols[:, None, :])).unsqueeze(1)


def _geometric_matrices(params: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """(G, 2, 3) affine matrices ``F @ S @ R`` (no translation) for ``affine_grid``: the
    output pixel at normalised (x, y) samples the input at ``F S R (x, y)``."""
    present = next(params[key] for key in ("flip", "scale", "rotate") if key in params)
    num_groups = present.shape[0]
    linear = torch.eye(2, dtype=dtype, device=device).expand(num_groups, 2, 2)
    if "flip" in params:
        sign = 1.0 - 2.0 * params["flip"].to(device=device, dtype=dtype)  # -1 flips x
        linear = torch.diag_embed(torch.stack([sign, torch.ones_like(sign)], dim=1)) @ linear
    if "scale" in params:
        linear = linear @ torch.diag_embed(params["scale"].to(device=device, dtype=dtype))
    if "rotate" in params:
        angle = params["rotate"].to(device=device, dtype=dtype)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], dim=1), torch.stack([sin, cos], dim=1)], dim=1)
        linear = linear @ rotation
    translation = torch.zeros(num_groups, 2, 1, dtype=dtype, device=device)
    return torch.cat([linear, translation], dim=2)
