import pytest
import torch
import torch.nn.functional as F

from ncfm_core.errors import ConfigError
from ncfm_core.synset import (
    check_factor,
    decode_synset,
    image_to_tiles,
    init_synset,
    sample_per_class,
    synset_labels,
    tiles_to_image,
)


def _decode_reference(images, labels, factor):
    """Loop over images and tiles, row-major, upsampling each tile on its own."""
    out_images, out_labels = [], []
    h, w = images.shape[-2:]
    th, tw = h // factor, w // factor
    for img, lab in zip(images, labels):
        for ty in range(factor):
            for tx in range(factor):
                tile = img[:, ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw]
                up = F.interpolate(tile[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                out_images.append(up)
                out_labels.append(lab)
    return torch.stack(out_images), torch.stack(out_labels)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_decode_matches_tile_loop_reference(factor):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 16, 16, generator=gen)
    labels = torch.tensor([0, 0, 1, 2, 2])
    got, got_labels = decode_synset(images, labels, factor)
    want, want_labels = _decode_reference(images, labels, factor)
    assert got.shape == (5 * factor**2, 3, 16, 16)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got_labels, want_labels)


def test_tiles_round_trip_and_layout():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    tiles = image_to_tiles(images, 2)
    # tile 1 of image 0 is its top-right 2x2 block
    assert torch.equal(tiles[1, 0], images[0, 0, :2, 2:])
    assert torch.equal(tiles_to_image(tiles, 2), images)


def test_decode_is_differentiable():
    images = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1])
    torch.autograd.gradcheck(lambda x: decode_synset(x, labels, 2)[0], (images,))


def test_check_factor_rejects_non_divisors():
    check_factor(32, 2)
    with pytest.raises(ConfigError, match="--factor"):
        check_factor(30, 4)


def _toy_real(num_classes=3, per_class=6, size=8):
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (num_classes * per_class, 1, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    indices = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    return images, labels, indices


def test_sample_per_class_distinct_and_in_class():
    _, labels, indices = _toy_real()
    picks = sample_per_class(indices, 4, torch.Generator().manual_seed(0))
    assert picks.shape == (3, 4)
    for c in range(3):
        assert (labels[picks[c]] == c).all()
        assert len(set(picks[c].tolist())) == 4
    # more than a class holds: every image of the class is used before any repeats
    big = sample_per_class(indices, 9, torch.Generator().manual_seed(0))
    assert set(big[0, :6].tolist()) == set(indices[0].tolist())


def test_init_real_uses_real_images_of_the_right_class():
    images, labels, indices = _toy_real()
    syn, syn_labels = init_synset(images, indices, 2, 2, "real", torch.Generator().manual_seed(0))
    assert torch.equal(syn_labels, synset_labels(3, 2))
    real_float = images.float() / 255
    for img, lab in zip(syn, syn_labels):
        match = [(real_float[i] == img).all() for i in indices[int(lab)]]
        assert any(match), "an initial image is not a real image of its class"


def test_init_mix_tiles_downsampled_real_images():
    images, labels, indices = _toy_real()
    gen = torch.Generator().manual_seed(0)
    syn, _ = init_synset(images, indices, 1, 2, "mix", gen)
    assert syn.shape == (3, 1, 8, 8)
    real_tiles = F.interpolate(images.float() / 255, size=(4, 4), mode="area")
    for c in range(3):
        tiles = image_to_tiles(syn[c : c + 1], 2)
        for tile in tiles:
            dists = [(tile - real_tiles[i]).abs().max() for i in indices[c]]
            assert min(dists) < 1e-6


def test_init_noise_and_unknown_mode():
    images, _, indices = _toy_real()
    syn, _ = init_synset(images, indices, 2, 1, "noise", torch.Generator().manual_seed(0))
    assert syn.min() >= 0 and syn.max() <= 1 and syn.std() > 0.2
    with pytest.raises(ConfigError, match="unknown init"):
        init_synset(images, indices, 2, 1, "zeros", torch.Generator())
