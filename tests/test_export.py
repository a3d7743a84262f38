"""Exporters: every format writes what it says, checked by reading the files back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ncfm_core.errors import ConfigError
from ncfm_core.export import (
    EXPORT_FORMATS,
    GRID_MIN_CELL,
    GRID_PAD,
    MAX_FOLDER_NAME,
    decoded_by_default,
    export_synset,
)

CLASS_NAMES = ["cat", "dog/wolf", "zebra"]


def make_synset(channels: int = 3, size: int = 8, ipc: int = 2, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(classes * ipc, channels, size, size, generator=generator)
    images[0, :, 0, 0] = 0.0  # the exact ends of the range
    images[0, :, 0, 1] = 1.0
    images[1, :, 0, 0] = 1.3  # out of range values are clamped
    images[1, :, 0, 1] = -0.2
    labels = torch.arange(classes).repeat_interleave(ipc)
    return images, labels


def expected_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) uint8, computed independently in numpy float64."""
    array = np.clip(image.double().numpy(), 0.0, 1.0).transpose(1, 2, 0)
    return np.rint(array * 255.0).astype(np.uint8)


def reference_decode(images: torch.Tensor, labels: torch.Tensor, factor: int):
    """Slow decode by the definition: each of factor x factor tiles, row-major, upsampled."""
    height, width = images.shape[-2:]
    tile_h, tile_w = height // factor, width // factor
    decoded, decoded_labels = [], []
    for image, label in zip(images, labels):
        for row in range(factor):
            for col in range(factor):
                tile = image[:, row * tile_h : (row + 1) * tile_h, col * tile_w : (col + 1) * tile_w]
                decoded.append(
                    F.interpolate(tile[None], size=(height, width), mode="bilinear", align_corners=False)[0]
                )
                decoded_labels.append(int(label))
    return torch.stack(decoded), torch.tensor(decoded_labels)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_pixels_and_layout(tmp_path, channels):
    images, labels = make_synset(channels=channels)
    written = export_synset(images, labels, CLASS_NAMES, tmp_path / "out", "png")
    assert len(written) == len(images) and all(path.is_file() for path in written)
    per_class: dict[int, int] = {}
    for path, image, label in zip(written, images, labels.tolist()):
        index = per_class.get(label, 0)
        per_class[label] = index + 1
        folder = {0: "cat", 1: "dog_wolf", 2: "zebra"}[label]  # "/" sanitised
        assert path == tmp_path / "out" / folder / f"{index:04d}.png"
        with Image.open(path) as png:
            assert png.mode == ("L" if channels == 1 else "RGB")
            pixels = np.asarray(png)
        if channels == 1:
            pixels = pixels[:, :, None]
        np.testing.assert_array_equal(pixels, expected_uint8(image))


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_other_files_is_never_written_into(tmp_path):
    out = tmp_path / "out"
    (out / "cat").mkdir(parents=True)
    (out / "cat" / "0000.png").write_bytes(b"stale")
    (out / "notes.txt").write_text("keep me")
    before = _tree(out)
    images, labels = make_synset()
    for replace in (False, True):  # --replace replaces only an ncfm export
        with pytest.raises(ConfigError, match="holds no ncfm export"):
            export_synset(images, labels, CLASS_NAMES, out, "png", replace=replace)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_earlier_export_is_replaced_whole_only_when_asked(tmp_path):
    """An export into a folder that holds another one is refused; with replace=True the folder
    then holds exactly the new export (no file of the old one left beside a record of the new)."""
    out = tmp_path / "out"
    big, big_labels = make_synset(ipc=5)
    export_synset(big, big_labels, CLASS_NAMES, out, "png", info={"artifact": "big@v1"})
    old = _tree(out)
    assert len([name for name in old if name.endswith(".png")]) == 15
    images, labels = make_synset(ipc=1)
    with pytest.raises(ConfigError, match=r"already holds an export \(of big@v1, png\).*replace"):
        export_synset(images, labels, CLASS_NAMES, out, "png")
    assert _tree(out) == old
    written = export_synset(images, labels, CLASS_NAMES, out, "png", replace=True, info={"artifact": "small@v1"})
    new = _tree(out)
    assert sorted(name for name in new if name.endswith(".png")) == sorted(p.relative_to(out).as_posix() for p in written)
    assert len(written) == 3
    record = json.loads(new["ncfm-export.json"])
    assert record["artifact"] == "small@v1" and record["images"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside


def test_an_empty_folder_reached_through_a_symlink_is_exported_into(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    images, labels = make_synset()
    written = export_synset(images, labels, CLASS_NAMES, link, "npz")
    assert link.is_symlink() and written == [link / "synset.npz"]
    assert sorted(p.name for p in real.iterdir()) == ["README.txt", "ncfm-export.json", "synset.npz"]


@pytest.mark.parametrize("bad", ["", "  "])
def test_an_empty_out_path_is_refused(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    images, labels = make_synset()
    with pytest.raises(ConfigError, match="empty path"):
        export_synset(images, labels, CLASS_NAMES, bad, "npz")
    with pytest.raises(ConfigError, match="current folder"):
        export_synset(images, labels, CLASS_NAMES, ".", "npz")
    assert list(tmp_path.iterdir()) == []


def test_long_class_names_make_short_distinct_folders(tmp_path):
    names = ["x" * 300, "x" * 299 + "y", "ok"]
    images, labels = make_synset()
    written = export_synset(images, labels, names, tmp_path / "out", "imagefolder")
    folders = sorted({path.parent.name for path in written})
    assert len(folders) == 3 and all(len(folder) <= 4 + MAX_FOLDER_NAME for folder in folders)
    assert folders[0] == "000_" + "x" * (MAX_FOLDER_NAME - 9) + "~" + folders[0][-8:]


def test_imagefolder_loads_with_matching_labels(tmp_path):
    from torchvision.datasets import ImageFolder

    names = [f"class{i}" for i in range(11)]  # 11 classes: "10" must sort after "2"
    images, labels = make_synset(classes=11, ipc=2)
    written = export_synset(images, labels, names, tmp_path / "out", "imagefolder")
    assert len(written) == 22
    dataset = ImageFolder(str(tmp_path / "out" / "train"))
    assert dataset.classes == [f"{i:03d}_class{i}" for i in range(11)]
    loaded = sorted((int(target), path) for path, target in dataset.samples)
    expected = sorted((int(label), str(path)) for path, label in zip(written, labels))
    assert loaded == expected
    image, target = dataset[5]
    np.testing.assert_array_equal(np.asarray(image), expected_uint8(images[5]))
    assert target == int(labels[5])


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_size_and_cells(tmp_path, channels):
    size, ipc = 16, 3
    images, labels = make_synset(channels=channels, size=size, ipc=ipc)
    (path,) = export_synset(images, labels, CLASS_NAMES, tmp_path, "grid")
    assert path == tmp_path / "grid.png"
    with Image.open(path) as png:
        grid = np.asarray(png.convert("RGB"))
    scale = -(-GRID_MIN_CELL // size)  # 4: 16 px digits become 64 px cells
    cell = size * scale
    assert grid.shape[0] == len(CLASS_NAMES) * (cell + GRID_PAD) + GRID_PAD
    label_width = grid.shape[1] - ipc * (cell + GRID_PAD) - GRID_PAD
    assert label_width > 10  # room for the class names
    assert (grid[:, :label_width] < 128).any()  # some dark text was drawn
    for position, (image, label) in enumerate(zip(images, labels.tolist())):
        column = position % ipc
        top = GRID_PAD + label * (cell + GRID_PAD)
        left = label_width + column * (cell + GRID_PAD)
        expected = expected_uint8(image)
        expected = np.repeat(np.repeat(expected, scale, axis=0), scale, axis=1)  # nearest upscale
        if channels == 1:
            expected = np.repeat(expected, 3, axis=2)
        np.testing.assert_array_equal(grid[top : top + cell, left : left + cell], expected)


def test_pt_contents(tmp_path):
    images, labels = make_synset()
    (path,) = export_synset(images, labels, CLASS_NAMES, tmp_path, "pt", factor=2, decoded=False)
    assert path == tmp_path / "synset.pt"
    # Test-only load of our own file; product code never unpickles.
    payload = torch.load(path, weights_only=True)
    assert torch.equal(payload["images"], images) and payload["images"].dtype == torch.float32
    assert torch.equal(payload["labels"], labels) and payload["labels"].dtype == torch.int64
    assert payload["class_names"] == CLASS_NAMES
    assert payload["factor"] == 2


def test_npz_contents(tmp_path):
    images, labels = make_synset(channels=1)
    (path,) = export_synset(images.double(), labels.int(), CLASS_NAMES, tmp_path, "npz")
    assert path == tmp_path / "synset.npz"
    with np.load(path, allow_pickle=False) as archive:
        assert archive["images"].dtype == np.float32 and archive["labels"].dtype == np.int64
        np.testing.assert_array_equal(archive["images"], images.numpy())
        np.testing.assert_array_equal(archive["labels"], labels.numpy())
        assert archive["class_names"].tolist() == CLASS_NAMES
        assert int(archive["factor"]) == 1


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_training_formats_write_decoded_images_unless_asked_for_the_stored_ones(tmp_path, fmt):
    images, labels = make_synset(size=8, ipc=2)
    images = images.clamp(0, 1)
    by_default = export_synset(images, labels, CLASS_NAMES, tmp_path / "default", fmt, factor=2)
    stored = export_synset(images, labels, CLASS_NAMES, tmp_path / "stored", fmt, factor=2, decoded=False)
    decoded = export_synset(images, labels, CLASS_NAMES, tmp_path / "decoded", fmt, factor=2, decoded=True)
    assert decoded_by_default(fmt) == (fmt in ("imagefolder", "pt", "npz"))
    same = decoded if decoded_by_default(fmt) else stored
    assert [p.relative_to(tmp_path / ("decoded" if decoded_by_default(fmt) else "stored")) for p in same] == \
        [p.relative_to(tmp_path / "default") for p in by_default]
    for mine, theirs in zip(by_default, same):
        assert mine.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_decoded_export_matches_reference_decode(tmp_path, fmt):
    factor = 2
    images, labels = make_synset(size=8, ipc=2)
    images = images.clamp(0, 1)
    want_images, want_labels = reference_decode(images, labels, factor)
    written = export_synset(images, labels, CLASS_NAMES, tmp_path, fmt, factor=factor, decoded=True)
    count = len(images) * factor**2
    if fmt in ("png", "imagefolder"):
        assert len(written) == count
        for path, want, label in zip(written, want_images, want_labels.tolist()):
            folder = ["cat", "dog_wolf", "zebra"][label]
            assert path.parent.name == (f"{label:03d}_{folder}" if fmt == "imagefolder" else folder)
            with Image.open(path) as png:
                np.testing.assert_array_equal(np.asarray(png), expected_uint8(want))
    elif fmt == "pt":
        payload = torch.load(written[0], weights_only=True)
        assert payload["images"].shape == (count, 3, 8, 8) and payload["factor"] == 1
        torch.testing.assert_close(payload["images"], want_images, rtol=0, atol=1e-6)
        assert torch.equal(payload["labels"], want_labels)
    elif fmt == "npz":
        with np.load(written[0], allow_pickle=False) as archive:
            assert archive["images"].shape == (count, 3, 8, 8)
            np.testing.assert_allclose(archive["images"], want_images.numpy(), rtol=0, atol=1e-6)
            np.testing.assert_array_equal(archive["labels"], want_labels.numpy())
    else:
        with Image.open(written[0]) as png:
            scale = -(-GRID_MIN_CELL // 8)
            # one row per class, 2 * factor^2 = 8 columns
            assert png.size[1] == 3 * (8 * scale + GRID_PAD) + GRID_PAD
            assert png.size[0] > 8 * (8 * scale + GRID_PAD)


def test_bad_inputs(tmp_path):
    images, labels = make_synset()
    with pytest.raises(ConfigError, match="png, grid, imagefolder, pt, npz"):
        export_synset(images, labels, CLASS_NAMES, tmp_path, "jpeg")
    with pytest.raises(ConfigError, match="class names"):
        export_synset(images, labels, CLASS_NAMES[:2], tmp_path, "png")
    with pytest.raises(ConfigError, match="labels"):
        export_synset(images, labels[:-1], CLASS_NAMES, tmp_path, "png")
    with pytest.raises(ConfigError, match="channel"):
        export_synset(torch.rand(6, 2, 4, 4), labels, CLASS_NAMES, tmp_path, "png")
    assert list(tmp_path.iterdir()) == []
