"""Differentiable siamese augmentation: batched ops against a per-group loop reference,
closed forms, the siamese property, reproducibility and float64 gradchecks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ncfm_core.augment import (
    EVAL_STRATEGY,
    MATCH_STRATEGY,
    PARAM_KEYS,
    apply_params,
    augment,
    parse_strategy,
    sample_params,
)
from ncfm_core.errors import ConfigError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_images(batch: int, channels: int, size: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=gen(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------
# Slow reference: loop over groups, apply each op with that group's Python scalars.


def reference_apply(images: torch.Tensor, groups: torch.Tensor, params: dict) -> torch.Tensor:
    out = torch.empty_like(images)
    height, width = images.shape[-2:]
    num_groups = next(iter(params.values())).shape[0]
    for g in range(num_groups):
        index = (groups == g).nonzero().flatten()
        if index.numel() == 0:
            continue
        x = images[index].clone()
        if "brightness" in params:
            x = x + float(params["brightness"][g])
        if "saturation" in params:
            m = x.mean(dim=1, keepdim=True)
            x = (x - m) * float(params["saturation"][g]) + m
        if "contrast" in params:
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * float(params["contrast"][g]) + m
        if "crop_shift" in params:
            dy, dx = (int(v) for v in params["crop_shift"][g])
            shifted = torch.zeros_like(x)
            for h in range(height):
                for w in range(width):
                    if 0 <= h + dy < height and 0 <= w + dx < width:
                        shifted[:, :, h, w] = x[:, :, h + dy, w + dx]
            x = shifted
        if "cutout_centre" in params:
            cy, cx = (int(v) for v in params["cutout_centre"][g])
            side_h, side_w = int(height * 0.5 + 0.5), int(width * 0.5 + 0.5)
            top, left = cy - side_h // 2, cx - side_w // 2
            for h in range(height):
                for w in range(width):
                    if top <= h < top + side_h and left <= w < left + side_w:
                        x[:, :, h, w] = 0.0
        if any(k in params for k in ("flip", "scale", "rotate")):
            f = -1.0 if ("flip" in params and bool(params["flip"][g])) else 1.0
            sx, sy = (float(v) for v in params["scale"][g]) if "scale" in params else (1.0, 1.0)
            a = float(params["rotate"][g]) if "rotate" in params else 0.0
            # F @ S @ R written out: flip, then scale, then rotate the sampling grid.
            theta = torch.tensor(
                [[[f * sx * math.cos(a), -f * sx * math.sin(a), 0.0],
                  [sy * math.sin(a), sy * math.cos(a), 0.0]]],
                dtype=x.dtype,
            ).expand(x.shape[0], 2, 3)
            grid = F.affine_grid(theta, list(x.shape), align_corners=True)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out[index] = x
    return out


# ---------------------------------------------------------------------------------------
# Strategy parsing and sampling


def test_parse_strategy():
    assert parse_strategy(MATCH_STRATEGY) == ("color", "crop", "cutout")
    assert parse_strategy(EVAL_STRATEGY) == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert parse_strategy(EVAL_STRATEGY, allow_flip=False) == ("color", "crop", "cutout", "scale", "rotate")
    assert parse_strategy("rotate_Color") == ("color", "rotate")  # canonical order, any case
    assert parse_strategy(["crop", "flip"]) == ("crop", "flip")
    assert parse_strategy("none") == () and parse_strategy("") == ()
    assert parse_strategy("flip", allow_flip=False) == ()


@pytest.mark.parametrize("bad", ["color_zoom", "colour", "crop__cutout", "crop_crop"])
def test_bad_strategy_is_config_error(bad):
    with pytest.raises(ConfigError):
        parse_strategy(bad)
    with pytest.raises(ConfigError):
        augment(rand_images(2, 3, 8), torch.tensor([0, 0]), bad, gen(), num_groups=1)


def test_sample_params_shapes_and_ranges():
    groups, size = 2000, 32
    params = sample_params(EVAL_STRATEGY, groups, size, gen(1))
    assert set(params) == set(PARAM_KEYS)
    for value in params.values():
        assert value.shape[0] == groups and value.device == torch.device("cpu")
    b, s, c = params["brightness"], params["saturation"], params["contrast"]
    assert b.min() >= -0.5 and b.max() <= 0.5 and b.min() < -0.45 and b.max() > 0.45
    assert s.min() >= 0.0 and s.max() <= 2.0 and s.max() > 1.9
    assert c.min() >= 0.5 and c.max() <= 1.5 and c.min() < 0.55 and c.max() > 1.45
    shift = params["crop_shift"]
    assert shift.dtype == torch.int64 and shift.shape == (groups, 2)
    assert shift.min() == -4 and shift.max() == 4  # int(32 * 0.125 + 0.5) = 4, both ends reached
    centre = params["cutout_centre"]
    assert centre.dtype == torch.int64 and centre.min() == 0 and centre.max() == 32  # even side 16: [0, 32]
    flip = params["flip"]
    assert flip.dtype == torch.bool and 0.45 < flip.double().mean() < 0.55
    scale = params["scale"]
    assert scale.shape == (groups, 2) and scale.min() >= 1 / 1.2 and scale.max() <= 1.2
    assert not torch.equal(scale[:, 0], scale[:, 1])  # x and y drawn independently
    rotate = params["rotate"]
    assert rotate.abs().max() <= math.radians(15.0) and rotate.abs().max() > math.radians(14.5)
    match_keys = {"brightness", "saturation", "contrast", "crop_shift", "cutout_centre"}
    assert set(sample_params(MATCH_STRATEGY, 3, size, gen())) == match_keys
    assert "flip" not in sample_params(EVAL_STRATEGY, 3, size, gen(), allow_flip=False)


def test_odd_cutout_side_centres():
    # side int(14 * 0.5 + 0.5) = 7 is odd: centres in [0, 14).
    centre = sample_params("cutout", 3000, 14, gen(2))["cutout_centre"]
    assert centre.min() == 0 and centre.max() == 13


def test_reproducible_with_fixed_generator():
    x = rand_images(6, 3, 16, seed=5)
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    first = augment(x, groups, EVAL_STRATEGY, gen(123), num_groups=3)
    second = augment(x, groups, EVAL_STRATEGY, gen(123), num_groups=3)
    other = augment(x, groups, EVAL_STRATEGY, gen(124), num_groups=3)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    p1, p2 = sample_params(EVAL_STRATEGY, 3, 16, gen(7)), sample_params(EVAL_STRATEGY, 3, 16, gen(7))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    # augment == sample_params then apply_params with the same generator state.
    params = sample_params(EVAL_STRATEGY, 3, 16, gen(123))
    torch.testing.assert_close(apply_params(x, groups, params), first, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Batched application against the loop reference; the siamese property


@pytest.mark.parametrize("strategy", [MATCH_STRATEGY, EVAL_STRATEGY, "crop", "cutout", "flip_scale_rotate", "color"])
def test_matches_per_group_loop_reference(strategy):
    num_groups, size = 4, 12
    params = sample_params(strategy, num_groups, size, gen(11))
    groups_a = torch.tensor([0, 1, 2, 3, 0, 2, 1])
    groups_b = torch.tensor([3, 3, 0, 1])  # a different batch drawing on the same params
    for x, groups in ((rand_images(7, 3, size, seed=1), groups_a), (rand_images(4, 3, size, seed=2), groups_b)):
        got = apply_params(x, groups, params)
        expected = reference_apply(x, groups, params)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_same_content_in_same_group_comes_out_identical():
    """Real and synthetic images of one class share one draw: identical inputs in the
    same group give identical outputs, whatever else is in the batch."""
    real = rand_images(8, 3, 16, seed=3, dtype=torch.float32)
    real_groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    synthetic = real[[1, 2, 7]].clone().requires_grad_(True)
    synthetic_groups = torch.tensor([0, 1, 3])
    out = augment(
        torch.cat([real, synthetic]), torch.cat([real_groups, synthetic_groups]), EVAL_STRATEGY, gen(4), num_groups=4
    )
    torch.testing.assert_close(out[8:], out[[1, 2, 7]], rtol=0, atol=1e-6)
    # Gradients reach the synthetic images.
    out[8:].sum().backward()
    assert synthetic.grad is not None and synthetic.grad.abs().sum() > 0


def test_different_groups_get_different_draws():
    num_groups = 16
    params = sample_params(EVAL_STRATEGY, num_groups, 32, gen(9))
    for key in ("brightness", "saturation", "contrast", "rotate"):
        assert params[key].unique().numel() == num_groups, key
    assert params["scale"][:, 0].unique().numel() == num_groups
    # The same image in every group comes out differently per group.
    x = rand_images(1, 3, 32, seed=6).expand(num_groups, 3, 32, 32)
    out = apply_params(x, torch.arange(num_groups), params)
    for g in range(1, num_groups):
        assert not torch.allclose(out[0], out[g])


# ---------------------------------------------------------------------------------------
# Closed forms


def constant_images(values: list[float], size: int = 4, batch: int = 2) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1).expand(batch, -1, size, size).clone()


def test_brightness_saturation_contrast_closed_forms_on_constant_images():
    v = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64).view(1, 3, 1, 1)
    x = constant_images([0.2, 0.5, 0.9])
    groups = torch.tensor([0, 1])
    factors = torch.tensor([0.3, 1.7])
    per_image = factors.double().view(2, 1, 1, 1)
    mean = v.mean()

    out = apply_params(x, groups, {"brightness": factors})
    torch.testing.assert_close(out, (v + per_image).expand_as(x), rtol=0, atol=1e-12)
    out = apply_params(x, groups, {"saturation": factors})
    torch.testing.assert_close(out, ((v - mean) * per_image + mean).expand_as(x), rtol=0, atol=1e-12)
    out = apply_params(x, groups, {"contrast": factors})
    torch.testing.assert_close(out, ((v - mean) * per_image + mean).expand_as(x), rtol=0, atol=1e-12)

    # All three in DSA's order: brightness, saturation, contrast.
    b, s, c = 0.25, 0.6, 1.3
    step = v + b
    step = (step - step.mean()) * s + step.mean()
    step = (step - step.mean()) * c + step.mean()
    params = {"brightness": torch.tensor([b]), "saturation": torch.tensor([s]), "contrast": torch.tensor([c])}
    out = apply_params(x[:1], torch.tensor([0]), params)
    torch.testing.assert_close(out, step.expand(1, 3, 4, 4), rtol=0, atol=1e-6)


def test_saturation_mixes_over_channels_and_contrast_over_the_image():
    # One channel: the per-pixel channel mean is the pixel itself, so saturation is a no-op.
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[..., :, :2] = 0.2
    x[..., :, 2:] = 0.8
    out = apply_params(x, torch.tensor([0]), {"saturation": torch.tensor([1.7])})
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    # Contrast mixes with the whole-image mean 0.5.
    out = apply_params(x, torch.tensor([0]), {"contrast": torch.tensor([1.5])})
    torch.testing.assert_close(out, (x - 0.5) * 1.5 + 0.5, rtol=0, atol=1e-12)


def test_crop_is_an_integer_shift_with_zero_padding():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float64).view(2, 1, 5, 5) + 1
    params = {"crop_shift": torch.tensor([[1, -2], [0, 0]])}
    out = apply_params(x, torch.tensor([0, 1]), params)
    expected = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    expected[..., :4, 2:] = x[:1, :, 1:, :3]  # out[h, w] = x[h + 1, w - 2]
    torch.testing.assert_close(out[:1], expected, rtol=0, atol=0)
    torch.testing.assert_close(out[1:], x[1:], rtol=0, atol=0)


def test_cutout_zeroes_a_clipped_square():
    x = torch.ones(2, 2, 8, 8, dtype=torch.float64)
    params = {"cutout_centre": torch.tensor([[4, 4], [0, 8]])}  # side 4
    out = apply_params(x, torch.tensor([0, 1]), params)
    assert torch.equal(out[0, :, 2:6, 2:6], torch.zeros(2, 4, 4, dtype=torch.float64))
    assert out[0].sum() == 2 * (64 - 16)
    # Centre (0, 8): rows [-2, 2) and columns [6, 10) clipped to a 2x2 corner.
    assert torch.equal(out[1, :, :2, 6:], torch.zeros(2, 2, 2, dtype=torch.float64))
    assert out[1].sum() == 2 * (64 - 4)


def test_flip_matches_torch_flip():
    x = rand_images(2, 3, 9, seed=8)
    out = apply_params(x, torch.tensor([0, 1]), {"flip": torch.tensor([True, False])})
    torch.testing.assert_close(out[0], x[0].flip(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=1e-12)


def test_geometry_samples_ramp_at_flip_scale_rotate_of_each_pixel():
    """A linear ramp is reproduced exactly by bilinear sampling, so output pixel p must
    hold ramp(F S R p) wherever that point lies inside the image; applying flip, scale
    and rotate one after another agrees there too."""
    size = 17
    coords = torch.linspace(-1.0, 1.0, size, dtype=torch.float64)  # align_corners=True
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def ramp(px, py):
        return 1.0 + 0.3 * px + 0.5 * py

    x = ramp(xx, yy).view(1, 1, size, size)
    angle, sx, sy = math.radians(10.0), 1.1, 0.9
    params = {
        "flip": torch.tensor([True]),
        "scale": torch.tensor([[sx, sy]], dtype=torch.float64),
        "rotate": torch.tensor([angle], dtype=torch.float64),
    }
    out = apply_params(x, torch.tensor([0]), params)[0, 0]
    rx = math.cos(angle) * xx - math.sin(angle) * yy
    ry = math.sin(angle) * xx + math.cos(angle) * yy
    qx, qy = -sx * rx, sy * ry  # flip negates x after scaling
    inside = (qx.abs() <= 1) & (qy.abs() <= 1)
    assert inside.sum() > size * size // 2
    torch.testing.assert_close(out[inside], ramp(qx, qy)[inside], rtol=0, atol=1e-9)
    # More than one pixel outside the frame, all four bilinear neighbours are zero padding.
    spacing = 2.0 / (size - 1)
    far_outside = (qx.abs() >= 1 + spacing) | (qy.abs() >= 1 + spacing)
    assert far_outside.any() and torch.equal(out[far_outside], torch.zeros_like(out[far_outside]))

    one = torch.tensor([0])
    sequential = apply_params(x, one, {"flip": params["flip"]})
    sequential = apply_params(sequential, one, {"scale": params["scale"]})
    sequential = apply_params(sequential, one, {"rotate": params["rotate"]})[0, 0]
    # Sequential resampling also zeroes points that an intermediate step pushed out,
    # so compare only where every intermediate point is inside too.
    # Bilinear reads of the scaled image at the neighbours of R p must also be exact,
    # so keep S R p a little more than a pixel inside.
    margin = 1 - 1.2 * spacing
    interior = inside & (rx.abs() <= 1) & (ry.abs() <= 1) & ((sx * rx).abs() <= margin) & ((sy * ry).abs() <= margin)
    assert interior.sum() > size * size // 3
    torch.testing.assert_close(sequential[interior], out[interior], rtol=0, atol=1e-9)


def test_flip_never_happens_without_allow_flip():
    x = torch.arange(3 * 6 * 6, dtype=torch.float32).view(1, 3, 6, 6).expand(4, 3, 6, 6)
    groups = torch.arange(4)
    g = gen(10)
    for _ in range(200):
        assert torch.equal(augment(x, groups, "flip", g, num_groups=4, allow_flip=False), x)
        assert "flip" not in sample_params(EVAL_STRATEGY, 4, 6, g, allow_flip=False)
    # Control: with flips allowed the same loop does flip (probability of never: 2^-40).
    flipped = [not torch.equal(augment(x, groups, "flip", g, num_groups=4), x) for _ in range(10)]
    assert any(flipped)


def test_empty_strategy_is_identity():
    x = rand_images(3, 3, 8)
    assert torch.equal(augment(x, torch.tensor([0, 1, 0]), "none", gen(), num_groups=2), x)


def test_bad_inputs_are_config_errors():
    x = rand_images(3, 3, 8)
    params = sample_params(MATCH_STRATEGY, 2, 8, gen())
    with pytest.raises(ConfigError, match="one entry per image"):
        apply_params(x, torch.tensor([0, 1]), params)
    with pytest.raises(ConfigError, match="zoom"):
        apply_params(x, torch.tensor([0, 1, 0]), {"zoom": torch.ones(2)})
    with pytest.raises(ConfigError, match="groups"):
        apply_params(x, torch.tensor([0, 1, 0]), {"brightness": torch.ones(2), "contrast": torch.ones(3)})
    with pytest.raises(ConfigError, match="group"):
        sample_params(MATCH_STRATEGY, 0, 8, gen())


# ---------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("strategy", [EVAL_STRATEGY, MATCH_STRATEGY, "color", "scale_rotate"])
def test_gradcheck_through_apply_params(strategy):
    params = sample_params(strategy, 2, 6, gen(12))
    x = rand_images(3, 2, 6, seed=13).requires_grad_(True)
    groups = torch.tensor([0, 1, 0])
    assert torch.autograd.gradcheck(lambda images: apply_params(images, groups, params), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_draws_on_cuda_and_matches_cpu_apply():
    g = torch.Generator(device="cuda").manual_seed(0)
    params = sample_params(EVAL_STRATEGY, 3, 16, g)
    assert all(v.device.type == "cuda" for v in params.values())
    x = rand_images(5, 3, 16, dtype=torch.float32)
    groups = torch.tensor([0, 1, 2, 0, 1])
    on_gpu = apply_params(x.cuda(), groups.cuda(), params).cpu()
    on_cpu = apply_params(x, groups, {k: v.cpu() for k, v in params.items()})
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
