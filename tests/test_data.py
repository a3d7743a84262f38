"""Tests of the dataset registry: every source loads from files written in its real format."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
from pathlib import Path

import numpy as np
import platformdirs
import pytest
import torch
from PIL import Image

from ncfm_core.config import DistillConfig
from ncfm_core.data import (
    IMAGENET_SUBSETS,
    PAPER_PRESET,
    DatasetShape,
    ImageDataset,
    channel_mean_std,
    check_ipc,
    dataset_names,
    dataset_preset,
    dataset_shape,
    default_data_dir,
    load_dataset,
    register_dataset,
)
from ncfm_core.data.cifar import SafeBatchUnpickler, read_batch
from ncfm_core.data.sources import digits_pixels
from ncfm_core.errors import ConfigError, NcfmError, NotFoundError

# Works whether or not tests/ is a package (pytest puts tests/ or its parent on sys.path).
try:
    from fixtures_data import (
        CIFAR100_NAMES,
        PALETTE,
        py2_pickle_bytes,
        solid_image,
        write_cifar10,
        write_cifar100,
        write_imagenet_tree,
        write_tinyimagenet,
    )
except ImportError:
    from tests.fixtures_data import (
        CIFAR100_NAMES,
        PALETTE,
        py2_pickle_bytes,
        solid_image,
        write_cifar10,
        write_cifar100,
        write_imagenet_tree,
        write_tinyimagenet,
    )


def nearest_palette_index(image: torch.Tensor) -> int:
    """Index of the PALETTE colour closest to the mean colour of a ``(3, H, W)`` image."""
    mean = image.double().mean(dim=(1, 2))
    distances = [float(((mean - torch.tensor(c, dtype=torch.float64)) ** 2).sum()) for c in PALETTE]
    return int(np.argmin(distances))


# -- the ImageDataset container and shared helpers -------------------------------------------


def tiny_dataset(train_labels: list[int], num_classes: int = 3) -> ImageDataset:
    n = len(train_labels)
    return ImageDataset(
        name="tiny",
        train_images=torch.zeros(n, 1, 2, 2, dtype=torch.uint8),
        train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=torch.zeros(1, 1, 2, 2, dtype=torch.uint8),
        test_labels=torch.tensor([0]),
        class_names=tuple(f"c{i}" for i in range(num_classes)),
        mean=(0.0,),
        std=(0.0,),
        fingerprint="0" * 64,
    )


def test_class_indices_match_a_loop():
    labels = [2, 0, 1, 2, 2, 0, 1, 1, 2]
    dataset = tiny_dataset(labels)
    expected = [[i for i, label in enumerate(labels) if label == c] for c in range(3)]
    assert [t.tolist() for t in dataset.class_indices()] == expected
    assert all(t.dtype == torch.int64 for t in dataset.class_indices())
    assert (dataset.num_classes, dataset.channels, dataset.image_size, dataset.num_train) == (3, 1, 2, 9)


def test_class_indices_include_empty_classes():
    dataset = tiny_dataset([0, 0, 2], num_classes=4)
    assert [t.tolist() for t in dataset.class_indices()] == [[0, 1], [], [2], []]


def test_image_dataset_rejects_inconsistent_tensors():
    with pytest.raises(ValueError, match="labels must lie"):
        tiny_dataset([0, 5])
    images = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    labels = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("x", images.float(), labels, images, labels, ("a",), (0.0,), (1.0,), "f")
    with pytest.raises(ValueError, match="mean and std"):
        ImageDataset("x", images, labels, images, labels, ("a",), (0.0, 0.0), (1.0,), "f")


def test_channel_mean_std_matches_numpy():
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (37, 3, 5, 5), dtype=torch.uint8, generator=generator)
    images[:, 2] //= 4  # channels with different statistics
    mean, std = channel_mean_std(images, chunk=8)  # several chunks, the last one short
    reference = images.numpy().astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, reference.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, reference.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)


def test_check_ipc_names_the_smallest_class():
    dataset = tiny_dataset([0, 0, 0, 1, 1, 2, 2, 2])
    check_ipc(dataset, 2)  # equal to the smallest class: fine
    with pytest.raises(ConfigError) as caught:
        check_ipc(dataset, 3)
    message = str(caught.value)
    assert "'c1'" in message and "2 training images" in message and "--ipc 2" in message
    assert "\n" not in message
    with pytest.raises(ConfigError):
        check_ipc(dataset, 0)


# -- registry ------------------------------------------------------------------------------


def test_dataset_names_lists_every_source():
    names = dataset_names()
    expected = {"digits", "mnist5k", "cifar10", "cifar100", "tinyimagenet", "fake", "folder:PATH", *IMAGENET_SUBSETS}
    assert set(names) == expected
    assert names == sorted(names)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError) as caught:
        load_dataset("cifar1O")
    message = str(caught.value)
    assert "did you mean 'cifar10'" in message and "digits" in message and "folder:PATH" in message
    assert "\n" not in message


def test_unknown_option_and_bad_image_size_are_config_errors():
    with pytest.raises(ConfigError, match="num_clases"):
        load_dataset("fake", num_clases=3)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("fake", image_size=0)
    with pytest.raises(ConfigError, match="path after the colon"):
        load_dataset("folder:")


def test_register_dataset_adds_a_loader_and_refuses_duplicates():
    shape = DatasetShape(2, 3, 4, 3)

    @register_dataset("unit-test-source", shape=shape, preset=dict(iterations=7))
    def load_unit(*, data_dir, image_size, download, width: int = 2):
        return tiny_dataset([0, 1, 2])

    try:
        assert "unit-test-source" in dataset_names()
        assert load_dataset("Unit-Test-Source", width=3).name == "tiny"
        assert dataset_shape("Unit-Test-Source") == shape and dataset_preset("unit-test-source") == dict(iterations=7)
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("unit-test-source")(lambda **_: None)
    finally:
        from ncfm_core.data import registry

        del registry._REGISTRY["unit-test-source"]


def test_default_data_dir_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("NCFM_DATA_DIR", str(tmp_path / "first"))
    assert default_data_dir() == tmp_path / "first"
    monkeypatch.setenv("NCFM_DATA_DIR", str(tmp_path / "second"))
    assert default_data_dir() == tmp_path / "second"
    monkeypatch.delenv("NCFM_DATA_DIR")
    assert default_data_dir() == Path(platformdirs.user_cache_dir("ncfm")) / "datasets"


@pytest.mark.parametrize("name", dataset_names())
def test_every_source_registers_a_preset_and_a_shape(name):
    preset = dataset_preset(name)
    assert set(preset) <= {field.name for field in dataclasses.fields(DistillConfig)}
    shape = dataset_shape(name)
    if name.startswith("folder:"):
        assert shape is None and preset == {}  # shape known once loaded; config defaults are the paper's
        assert {k: getattr(DistillConfig("folder:/x", 1), k) for k in PAPER_PRESET} == PAPER_PRESET
    else:
        assert isinstance(shape, DatasetShape) and preset
        assert dataset_shape(name.upper()) == shape
        assert dataset_shape(name, image_size=8) == dataclasses.replace(shape, image_size=8)


@pytest.mark.parametrize("name", ["digits", "fake"])
@pytest.mark.parametrize("image_size", [None, 8])
def test_registered_shape_is_the_loaded_shape(name, image_size):
    loaded = load_dataset(name, image_size=image_size)
    assert dataset_shape(name, image_size=image_size) == DatasetShape.of(loaded)
    assert DatasetShape.of(loaded).pixels == loaded.train_images[0].numel()


# -- digits --------------------------------------------------------------------------------


def bilinear_reference(image: list[list[float]], size: int) -> list[list[float]]:
    """Bilinear resize of a square image with half-pixel centres (edges clamped), not
    rounded: a plain loop to check torch's interpolate against."""
    n = len(image)

    def source(i: int) -> tuple[int, int, float]:
        x = max((i + 0.5) * n / size - 0.5, 0.0)
        x0 = min(int(math.floor(x)), n - 1)
        return x0, min(x0 + 1, n - 1), x - x0

    out = []
    for i in range(size):
        y0, y1, wy = source(i)
        row = []
        for j in range(size):
            x0, x1, wx = source(j)
            top = (1 - wx) * image[y0][x0] + wx * image[y0][x1]
            bottom = (1 - wx) * image[y1][x0] + wx * image[y1][x1]
            row.append((1 - wy) * top + wy * bottom)
        out.append(row)
    return out


def test_digits_pixels_match_a_reference_loop():
    from sklearn.datasets import load_digits

    raw = load_digits().images  # (1797, 8, 8) values 0..16
    images, labels = digits_pixels(16)
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == load_digits().target.tolist()
    for index in (0, 1, 500, 1796):
        scaled = [[float(round(v * 255 / 16)) for v in row] for row in raw[index]]
        expected = torch.tensor(bilinear_reference(scaled, 16), dtype=torch.float64)
        # Each stored pixel must be a correct rounding of the exact value (ties either way).
        error = (images[index, 0].double() - expected).abs().max().item()
        assert error <= 0.5 + 1e-9, f"digit {index}: max error {error}"
    at_native = digits_pixels(8)[0]
    assert at_native[5, 0].tolist() == [[round(v * 255 / 16) for v in row] for row in raw[5]]


def test_digits_dataset():
    dataset = load_dataset("digits")
    assert dataset.train_images.shape[1:] == (1, 16, 16) and dataset.train_images.dtype == torch.uint8
    assert dataset.train_labels.dtype == torch.int64
    assert dataset.num_train + dataset.test_images.shape[0] == 1797
    assert dataset.num_classes == 10 and dataset.class_names == tuple(str(d) for d in range(10))
    assert dataset.allow_flip is False
    assert int(dataset.train_images.max()) == 255 and int(dataset.train_images.min()) == 0
    test_fraction = dataset.test_images.shape[0] / 1797
    assert abs(test_fraction - 0.3) < 0.01
    per_class_test = torch.bincount(dataset.test_labels, minlength=10).double()
    per_class_all = per_class_test + torch.bincount(dataset.train_labels, minlength=10).double()
    assert ((per_class_test / per_class_all - 0.3).abs() < 0.02).all(), per_class_test / per_class_all
    reference = dataset.train_images.double().numpy() / 255.0
    assert dataset.mean[0] == pytest.approx(reference.mean(), abs=1e-12)
    assert dataset.std[0] == pytest.approx(reference.std(), abs=1e-12)

    again = load_dataset("digits")
    assert again.fingerprint == dataset.fingerprint and len(dataset.fingerprint) == 64
    assert torch.equal(again.test_images, dataset.test_images) and torch.equal(again.train_labels, dataset.train_labels)
    check_ipc(dataset, 10)
    small = load_dataset("digits", image_size=8)
    assert small.image_size == 8 and small.fingerprint != dataset.fingerprint


# -- fake ----------------------------------------------------------------------------------


def test_fake_shapes_and_determinism():
    dataset = load_dataset("fake")
    assert dataset.train_images.shape == (640, 3, 32, 32) and dataset.test_images.shape == (160, 3, 32, 32)
    assert torch.bincount(dataset.train_labels).tolist() == [64] * 10
    again = load_dataset("fake")
    assert torch.equal(again.train_images, dataset.train_images) and again.fingerprint == dataset.fingerprint
    other = load_dataset("fake", seed=1)
    assert not torch.equal(other.train_images, dataset.train_images) and other.fingerprint != dataset.fingerprint
    custom = load_dataset("fake", num_classes=3, channels=1, image_size=8, train_per_class=5, test_per_class=2)
    assert custom.train_images.shape == (15, 1, 8, 8) and custom.test_images.shape == (6, 1, 8, 8)
    assert custom.num_classes == 3 and len(custom.mean) == 1
    with pytest.raises(ConfigError, match="train_per_class"):
        load_dataset("fake", train_per_class=0)


# -- CIFAR ---------------------------------------------------------------------------------


def test_cifar10_from_real_format_files(tmp_path):
    write_cifar10(tmp_path, per_class=3, test_per_class=2)
    dataset = load_dataset("cifar10", tmp_path, download=False)
    assert dataset.train_images.shape == (30, 3, 32, 32) and dataset.test_images.shape == (20, 3, 32, 32)
    assert dataset.class_names[:3] == ("airplane", "automobile", "bird") and dataset.num_classes == 10
    assert torch.bincount(dataset.train_labels).tolist() == [3] * 10
    # The fixture wrote label into the first red value and 100 + label into the first green.
    assert torch.equal(dataset.train_images[:, 0, 0, 0].long(), dataset.train_labels)
    assert torch.equal(dataset.train_images[:, 1, 0, 0].long(), dataset.train_labels + 100)
    assert torch.equal(dataset.test_images[:, 0, 0, 0].long(), dataset.test_labels)
    assert dataset.allow_flip and len(dataset.fingerprint) == 64
    assert load_dataset("cifar10", tmp_path, download=False).fingerprint == dataset.fingerprint
    # data_dir may also point at the extracted folder itself
    direct = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", download=False)
    assert torch.equal(direct.train_images, dataset.train_images)


def test_cifar10_fingerprint_follows_the_files(tmp_path):
    write_cifar10(tmp_path / "a", seed=0)
    write_cifar10(tmp_path / "b", seed=5)
    first = load_dataset("cifar10", tmp_path / "a", download=False)
    second = load_dataset("cifar10", tmp_path / "b", download=False)
    assert first.fingerprint != second.fingerprint
    resized = load_dataset("cifar10", tmp_path / "a", download=False, image_size=16)
    assert resized.image_size == 16 and resized.fingerprint != first.fingerprint


def test_cifar100_from_real_format_files(tmp_path):
    write_cifar100(tmp_path, per_class=2, test_per_class=1)
    dataset = load_dataset("cifar100", tmp_path, download=False)
    assert dataset.train_images.shape == (200, 3, 32, 32) and dataset.test_images.shape == (100, 3, 32, 32)
    assert dataset.class_names == tuple(CIFAR100_NAMES)
    assert torch.bincount(dataset.train_labels, minlength=100).tolist() == [2] * 100
    assert torch.equal(dataset.train_images[:, 0, 0, 0].long(), dataset.train_labels)  # fine, not coarse
    assert torch.equal(dataset.test_images[:, 1, 0, 0].long(), dataset.test_labels + 100)


def test_fixture_files_hold_only_numpy_globals(tmp_path):
    import pickletools

    folder = write_cifar10(tmp_path)
    globals_used = {
        arg for op, arg, _ in pickletools.genops((folder / "data_batch_1").read_bytes()) if op.name == "GLOBAL"
    }
    assert globals_used == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}


def test_missing_cifar_dir_without_download(tmp_path):
    with pytest.raises(NotFoundError) as caught:
        load_dataset("cifar10", tmp_path / "nowhere", download=False)
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message and "cifar-10-batches-py" in message and "--data-dir" in message
    with pytest.raises(NotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path, download=False)


def test_failed_download_is_not_found_naming_the_folder(tmp_path, monkeypatch):
    from urllib.error import URLError

    from ncfm_core.data import cifar

    def offline(torchvision_name, root):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cifar, "_fetch_archive", offline)
    with pytest.raises(NotFoundError) as caught:
        load_dataset("cifar10", tmp_path / "cache", download=True)
    message = str(caught.value)
    assert str(tmp_path / "cache") in message and "cifar-10-batches-py" in message and "Name or service" in message
    assert "\n" not in message


def test_download_then_load(tmp_path, monkeypatch):
    from ncfm_core.data import cifar

    calls = []

    def fake_fetch(torchvision_name, root):
        calls.append(torchvision_name)
        write_cifar100(root)

    monkeypatch.setattr(cifar, "_fetch_archive", fake_fetch)
    dataset = load_dataset("cifar100", tmp_path, download=True)
    assert calls == ["CIFAR100"] and dataset.num_classes == 100
    load_dataset("cifar100", tmp_path, download=True)
    assert calls == ["CIFAR100"]  # files present: no second download


def test_missing_single_batch_is_named(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(NotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, download=False)


def test_corrupt_batch_gives_one_clear_error(tmp_path):
    folder = write_cifar10(tmp_path)
    batch = folder / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    with pytest.raises(NcfmError) as caught:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(caught.value)
    assert str(batch) in message and "corrupt" in message and "\n" not in message


def test_batch_with_wrong_array_shape_is_rejected(tmp_path):
    folder = write_cifar10(tmp_path)
    bad = {b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}
    (folder / "data_batch_1").write_bytes(py2_pickle_bytes(bad))
    with pytest.raises(NcfmError, match="3072"):
        load_dataset("cifar10", tmp_path, download=False)


def test_batch_with_non_integer_labels_is_rejected(tmp_path):
    folder = write_cifar10(tmp_path)
    bad = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, b"cat"]}
    (folder / "data_batch_1").write_bytes(py2_pickle_bytes(bad))
    with pytest.raises(NcfmError, match="list of 2 ints"):
        load_dataset("cifar10", tmp_path, download=False)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = write_cifar10(tmp_path)
    payload = pickle.dumps({"data": _Exploit(marker), "labels": []}, protocol=2)
    (folder / "data_batch_1").write_bytes(payload)
    with pytest.raises(NcfmError) as caught:
        load_dataset("cifar10", tmp_path, download=False)
    assert "system" in str(caught.value) and "refused" in str(caught.value)
    assert not marker.exists()

    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps(print, protocol=4))  # any other global, any protocol
    with pytest.raises(NcfmError, match="builtins.print"):
        read_batch(evil)


def test_restricted_unpickler_reads_numpy2_protocol4_pickles(tmp_path):
    # A batch re-saved by Python 3 and numpy 2 names numpy._core; that is allowed too.
    array = np.arange(12, dtype=np.uint8).reshape(2, 6)
    loaded = SafeBatchUnpickler(io.BytesIO(pickle.dumps({"data": array}, protocol=4))).load()
    assert np.array_equal(loaded["data"], array)


# -- Tiny ImageNet -------------------------------------------------------------------------


def test_tinyimagenet_fixture_tree(tmp_path):
    wnids = ["n03000134", "n01443537", "n02099601"]  # wnids.txt is not sorted in the real file
    _, val_wnids = write_tinyimagenet(tmp_path, wnids, train_per_class=2)
    dataset = load_dataset("tinyimagenet", tmp_path)
    ordered = sorted(wnids)  # labels follow sorted wnids, like ImageFolder
    assert dataset.train_images.shape == (6, 3, 64, 64) and dataset.test_images.shape == (6, 3, 64, 64)
    assert dataset.class_names == tuple(f"name of {w}" for w in ordered)
    assert dataset.test_labels.tolist() == [ordered.index(w) for w in val_wnids]
    for images, labels in ((dataset.train_images, dataset.train_labels), (dataset.test_images, dataset.test_labels)):
        for image, label in zip(images, labels.tolist()):
            assert nearest_palette_index(image) == wnids.index(ordered[label])
    assert load_dataset("tinyimagenet", tmp_path / "tiny-imagenet-200").fingerprint == dataset.fingerprint


def test_tinyimagenet_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(NotFoundError) as caught:
        load_dataset("tinyimagenet", tmp_path)
    message = str(caught.value)
    assert "tiny-imagenet-200" in message and "http" in message and str(tmp_path) in message


# -- ImageNet subsets ----------------------------------------------------------------------


@pytest.mark.parametrize("subset", sorted(IMAGENET_SUBSETS))
def test_subset_lists_have_ten_unique_classes(subset):
    classes = IMAGENET_SUBSETS[subset]
    assert len(classes) == 10
    assert len({c.wnid for c in classes}) == 10 and len({c.index for c in classes}) == 10
    assert all(len(c.wnid) == 9 and c.wnid[0] == "n" and c.wnid[1:].isdigit() for c in classes)
    assert all(0 <= c.index < 1000 for c in classes)


def test_subset_indices_follow_sorted_wnid_order():
    # ImageNet class indices are positions in the sorted wnid list, so across all subsets
    # a larger index must always mean a larger wnid, and one index one wnid.
    pairs = sorted({(c.index, c.wnid) for classes in IMAGENET_SUBSETS.values() for c in classes})
    assert len({i for i, _ in pairs}) == len(pairs) == len({w for _, w in pairs})
    assert [w for _, w in pairs] == sorted(w for _, w in pairs)
    assert IMAGENET_SUBSETS["imagenette"][0].wnid == "n01440764"  # index 0 is the first wnid


def test_imagenette_fixture_tree(tmp_path):
    classes = IMAGENET_SUBSETS["imagenette"]
    wnids = [c.wnid for c in classes]
    # An ImageNet-style tree also holds other classes; and the subset's folders are
    # written in reverse so their colours do not follow label order by accident.
    write_imagenet_tree(tmp_path, list(reversed(wnids)) + ["n09999999"], train_per_class=2, val_per_class=1)
    dataset = load_dataset("imagenette", tmp_path)
    assert dataset.train_images.shape == (20, 3, 128, 128) and dataset.test_images.shape == (10, 3, 128, 128)
    assert dataset.class_names == tuple(c.name for c in classes) and dataset.class_names[0] == "tench"
    assert torch.bincount(dataset.train_labels).tolist() == [2] * 10
    for images, labels in ((dataset.train_images, dataset.train_labels), (dataset.test_images, dataset.test_labels)):
        for image, label in zip(images, labels.tolist()):
            assert nearest_palette_index(image) == 9 - label  # reversed order in the writer


def test_imagewoof_in_fastai_layout(tmp_path):
    wnids = [c.wnid for c in IMAGENET_SUBSETS["imagewoof"]]
    write_imagenet_tree(tmp_path / "imagewoof2-160", wnids, train_per_class=1, val_per_class=1)
    dataset = load_dataset("imagewoof", tmp_path, image_size=16)
    assert dataset.train_images.shape == (10, 3, 16, 16)
    assert [nearest_palette_index(image) for image in dataset.train_images] == dataset.train_labels.tolist()


def test_subset_with_missing_classes_names_them(tmp_path):
    wnids = [c.wnid for c in IMAGENET_SUBSETS["imagefruit"]]
    write_imagenet_tree(tmp_path, wnids[:7], train_per_class=1, val_per_class=1)
    with pytest.raises(NotFoundError) as caught:
        load_dataset("imagefruit", tmp_path)
    assert all(w in str(caught.value) for w in wnids[7:])
    with pytest.raises(NotFoundError, match="ImageFolder layout"):
        load_dataset("imagemeow", tmp_path / "empty")


# -- folder:PATH ---------------------------------------------------------------------------


def write_unique_pngs(folder: Path, per_class: dict[str, int]) -> dict[int, str]:
    """One PNG per image, each a unique grey level (lossless); returns grey level -> class."""
    grey_to_class = {}
    level = 10
    for class_name, count in per_class.items():
        for i in range(count):
            solid_image(folder / class_name / f"img_{i}.png", (level, level, level), (12, 9))
            grey_to_class[level] = class_name
            level += 7
    return grey_to_class


def test_folder_without_split_folders(tmp_path):
    root = tmp_path / "pets"
    grey_to_class = write_unique_pngs(root, {"dog": 10, "cat": 5, "axolotl": 2})
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored
    dataset = load_dataset(f"folder:{root}")
    assert dataset.name == f"folder:{root.resolve()}"
    assert dataset.class_names == ("axolotl", "cat", "dog")
    assert dataset.train_images.shape[1:] == (3, 32, 32)
    test_counts = torch.bincount(dataset.test_labels, minlength=3).tolist()
    assert test_counts == [1, 1, 2]  # 20% of 2, 5 and 10, at least one each
    seen = []
    for images, labels in ((dataset.train_images, dataset.train_labels), (dataset.test_images, dataset.test_labels)):
        for image, label in zip(images, labels.tolist()):
            level = int(image[0, 16, 16])
            assert grey_to_class[level] == dataset.class_names[label]
            seen.append(level)
    assert sorted(seen) == sorted(grey_to_class)  # every image exactly once, train and test disjoint
    again = load_dataset(f"folder:{root}")
    assert torch.equal(again.test_images, dataset.test_images) and again.fingerprint == dataset.fingerprint
    reseeded = load_dataset(f"folder:{root}", seed=1)
    assert reseeded.fingerprint != dataset.fingerprint


def test_folder_with_split_folders(tmp_path):
    root = tmp_path / "shapes"
    write_unique_pngs(root / "train", {"square": 3, "circle": 2})
    write_unique_pngs(root / "val", {"circle": 1, "square": 2})
    dataset = load_dataset(f"folder:{root}", image_size=8)
    assert dataset.class_names == ("circle", "square")
    assert dataset.train_images.shape == (5, 3, 8, 8) and dataset.test_images.shape == (3, 3, 8, 8)
    assert dataset.train_labels.tolist() == [0, 0, 1, 1, 1] and dataset.test_labels.tolist() == [0, 1, 1]


def test_folder_resizes_shorter_side_then_center_crops(tmp_path):
    # 40x20 image: red left quarter, green middle half, blue right quarter. Shorter side
    # 20 -> 10 makes it 20x10; the central 10 columns are the green half.
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, :10, 0] = 255
    image[:, 10:30, 1] = 255
    image[:, 30:, 2] = 255
    for i in range(2):
        path = tmp_path / "tree" / "only" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    dataset = load_dataset(f"folder:{tmp_path / 'tree'}", image_size=10)
    crop = dataset.train_images[0]
    assert crop.shape == (3, 10, 10)
    inner = crop[:, :, 1:9].int()  # the outer columns may blend with the neighbours
    assert (inner[1] >= 250).all() and (inner[0] <= 5).all() and (inner[2] <= 5).all()


def test_folder_errors(tmp_path):
    with pytest.raises(NotFoundError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="no class folders"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    with pytest.raises(NotFoundError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'hollow'}")
    bad = tmp_path / "bad" / "a" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a jpeg")
    solid_image(tmp_path / "bad" / "a" / "fine.png", (1, 2, 3))
    with pytest.raises(NcfmError, match="broken.jpg"):
        load_dataset(f"folder:{tmp_path / 'bad'}")
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset(f"folder:{tmp_path / 'bad'}", test_fraction=1.5)

