"""Sources that need no download: ``digits`` (bundled with scikit-learn), ``fake`` (random
tensors for benchmarks) and ``folder:PATH`` (any ImageFolder tree)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ncfm_core.data.images import (
    list_class_dirs,
    list_images,
    load_labelled_splits,
    resize_uint8,
)
from ncfm_core.data.registry import (
    DatasetShape,
    ImageDataset,
    make_dataset,
    register_dataset,
    tensor_fingerprint,
)
from ncfm_core.errors import ConfigError, NcfmError, NotFoundError

# -- digits ----------------------------------------------------------------------------------

DIGITS_SIZE = 16
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0


def digits_pixels(image_size: int = DIGITS_SIZE) -> tuple[Tensor, Tensor]:
    """All 1,797 scikit-learn digits in their original order: ``(1797, 1, S, S)`` uint8
    images and ``(1797,)`` int64 labels.

    The 8x8 values 0..16 become round(v * 255 / 16) in 0..255, then are resized bilinearly
    to ``S x S`` (half-pixel centres, no antialiasing) and rounded back to uint8.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    values = torch.from_numpy(np.asarray(bunch.images, dtype=np.float64))  # (1797, 8, 8), 0..16
    base = (values * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)[:, None]
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return resize_uint8(base, image_size, antialias=False), labels


def digits_split(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The fixed stratified split of the digits: ``(train_indices, test_indices)``, each
    ascending; 30% of every class goes to test (scikit-learn, ``random_state=0``)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(labels.shape[0])
    train, test = train_test_split(
        indices, test_size=DIGITS_TEST_FRACTION, stratify=labels.numpy(), random_state=DIGITS_SPLIT_SEED
    )
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))


# Digits is our offline real dataset and the README's first command (`ncfm distill digits --ipc 1
# --eval --eval-baseline random`), so its preset is sized for a laptop CPU: a pool of 2 x 3 epochs,
# 100 iterations of 64 real images per class and 256 frequencies. At IPC 1 an iteration spends ~80 %
# of its time on the real side's features, in proportion to real_per_class. Measured on a 2-core CPU
# under the quick protocol (docs/benchmarks/first_contact.md): IPC 1 ~92 % against 63-71 % for random
# real subsets, IPC 10 ~96 % against 90-91 %; the previous preset (4 x 10 epochs, 400 iterations of
# 122 real images, F 1024) took about 4 times as long.
DIGITS_PRESET = dict(
    factor=2,
    iterations=100,
    real_per_class=64,
    num_freqs=256,
    pool_size=2,
    pool_epochs=3,
    pool_batch=128,
    lr_patience=200,
)


@register_dataset("digits", shape=DatasetShape(10, 1, DIGITS_SIZE, 1_257), preset=DIGITS_PRESET, eval_protocol="quick")
def load_digits_dataset(*, data_dir: Path | None, image_size: int | None, download: bool) -> ImageDataset:
    """scikit-learn's handwritten digits (offline): 1 channel, 16x16 unless ``image_size``
    says otherwise, 10 classes, 1,257 train / 540 test. Never flipped: a mirrored digit is
    another digit (or none)."""
    size = image_size or DIGITS_SIZE
    images, labels = digits_pixels(size)
    train, test = digits_split(labels)
    class_names = [str(d) for d in range(10)]
    splits = (images[train], labels[train]), (images[test], labels[test])
    fingerprint = tensor_fingerprint("digits", [*splits[0], *splits[1]], extra=class_names)
    return make_dataset("digits", splits[0], splits[1], class_names, fingerprint, allow_flip=False)


# -- fake ------------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"option {name} must be a positive integer, got {value!r}")
    return value


@register_dataset(
    "fake",
    shape=DatasetShape(10, 3, 32, 10 * 64),  # the default options below
    preset=dict(factor=2, iterations=200, real_per_class=64, num_freqs=256, pool_size=2, pool_epochs=2),
)
def load_fake(
    *,
    data_dir: Path | None,
    image_size: int | None,
    download: bool,
    num_classes: int = 10,
    channels: int = 3,
    train_per_class: int = 64,
    test_per_class: int = 16,
    seed: int = 0,
) -> ImageDataset:
    """Uniform random uint8 images, CIFAR-10-shaped by default (3x32x32, 10 classes), with
    ``train_per_class`` / ``test_per_class`` images per class, labels in class order. The
    same options and ``seed`` give the same tensors. For benchmarks and plumbing tests:
    there is nothing to learn in it."""
    size = image_size or 32
    for option, value in (
        ("num_classes", num_classes),
        ("channels", channels),
        ("train_per_class", train_per_class),
        ("test_per_class", test_per_class),
    ):
        _positive_int(option, value)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"option seed must be an integer, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    splits = []
    for per_class in (train_per_class, test_per_class):
        count = num_classes * per_class
        images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.arange(num_classes, dtype=torch.int64).repeat_interleave(per_class)
        splits.append((images, labels))
    class_names = [f"class_{c}" for c in range(num_classes)]
    fingerprint = tensor_fingerprint("fake", [*splits[0], *splits[1]], extra=class_names)
    return make_dataset("fake", splits[0], splits[1], class_names, fingerprint)


# -- folder:PATH -----------------------------------------------------------------------------

FOLDER_SIZE = 32
_TEST_SPLIT_NAMES = ("test", "val")  # "test" wins when a tree has both


def _class_files(class_dirs: list[Path]) -> list[list[Path]]:
    files = [list_images(d) for d in class_dirs]
    for directory, paths in zip(class_dirs, files):
        if not paths:
            raise NotFoundError(f"no images in class folder {directory}; add images or remove the folder")
    return files


def _stratified_split(
    files: list[list[Path]], test_fraction: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Per class, a seeded permutation of its sorted files; the first round(fraction * n)
    (at least 1 when n >= 2, and never all n) go to test. Both lists come back sorted by
    (label, path), so the split and the order are reproducible."""
    generator = torch.Generator().manual_seed(seed)
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for label, paths in enumerate(files):
        n = len(paths)
        n_test = min(n - 1, max(1, round(test_fraction * n))) if n >= 2 else 0
        order = torch.randperm(n, generator=generator).tolist()
        chosen = set(order[:n_test])
        for i, path in enumerate(paths):
            (test if i in chosen else train).append((path, label))
    return train, test


# No shape: only loading tells. An empty preset leaves DistillConfig's defaults, the paper's
# settings (registry.PAPER_PRESET), which the other real datasets register explicitly.
@register_dataset("folder:", shape=None, preset={})
def load_folder(
    *,
    argument: str,
    data_dir: Path | None,
    image_size: int | None,
    download: bool,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ImageDataset:
    """Any ImageFolder tree at ``argument`` (``folder:PATH``): one subfolder per class, its
    images inside. With ``train/`` and ``test/`` (or ``val/``) split folders those are the
    splits; otherwise a deterministic stratified ``test_fraction`` of each class (seeded by
    ``seed``) is the test split. Images become RGB, ``image_size`` square (default 32) by
    resizing the shorter side and centre-cropping. Class names are the folder names, sorted.
    ``data_dir`` and ``download`` are not used.
    """
    root = Path(argument).expanduser().resolve()
    if not root.is_dir():
        raise NotFoundError(
            f"folder dataset not found: {root} is not a directory; pass folder:PATH with an existing PATH"
        )
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"option test_fraction must be between 0 and 1, got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"option seed must be an integer, got {seed!r}")
    test_dir = next((root / n for n in _TEST_SPLIT_NAMES if (root / n).is_dir()), None)
    split_folders = (root / "train").is_dir() and test_dir is not None

    class_root = root / "train" if split_folders else root
    class_dirs = list_class_dirs(class_root)
    if not class_dirs:
        raise NotFoundError(f"no class folders in {class_root}; expected {class_root}/<class name>/<images>")
    class_names = [d.name for d in class_dirs]

    if split_folders and test_dir is not None:
        label_of = {name: label for label, name in enumerate(class_names)}
        extra = sorted(d.name for d in list_class_dirs(test_dir) if d.name not in label_of)
        if extra:
            raise NcfmError(
                f"{test_dir} has class folders that {root / 'train'} lacks ({', '.join(extra)}); "
                f"add them to train/ or remove them"
            )
        train = [(p, label) for label, paths in enumerate(_class_files(class_dirs)) for p in paths]
        test = [(p, label_of[d.name]) for d in list_class_dirs(test_dir) for p in list_images(d)]
        test.sort(key=lambda item: (item[1], item[0]))
    else:
        train, test = _stratified_split(_class_files(class_dirs), float(test_fraction), seed)

    name = f"folder:{root}"
    size = image_size or FOLDER_SIZE
    (train_split, test_split), fingerprint = load_labelled_splits(
        f"{name}\0test_fraction={test_fraction}\0seed={seed}", root, [train, test], size
    )
    return make_dataset(name, train_split, test_split, class_names, fingerprint)
