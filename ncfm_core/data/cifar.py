"""CIFAR-10 and CIFAR-100 from the official "python version" archives.

Why our own reader instead of ``torchvision.datasets.CIFAR10``: the batch files are
pickles, and torchvision unpickles them with the unrestricted standard loader, which runs any code
a tampered file asks for. We read them with `SafeBatchUnpickler`, which resolves only the
three globals a genuine batch needs (numpy's array reconstructor, ``numpy.ndarray`` and
``numpy.dtype``) and refuses every other one. It also lets us read files whose md5 differs
from the published one (tests write tiny files in the real format). torchvision is used
only to download and extract the archive, which it checks against the published md5.

The format (https://www.cs.toronto.edu/~kriz/cifar.html): each batch is a Python 2 pickle
of a dict with ``data``, a uint8 numpy array ``(N, 3072)`` holding each image as 1024 red,
then 1024 green, then 1024 blue values in row-major 32x32 order, and ``labels`` (CIFAR-10)
or ``fine_labels`` (CIFAR-100), lists of ints. ``batches.meta`` / ``meta`` hold
``label_names`` / ``fine_label_names``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncfm_core.data.images import resize_uint8
from ncfm_core.data.registry import (
    PAPER_PRESET,
    DatasetShape,
    ImageDataset,
    default_data_dir,
    file_fingerprint,
    make_dataset,
    register_dataset,
)
from ncfm_core.errors import NcfmError, NotFoundError

_NATIVE_SIZE = 32


def _numpy_reconstruct() -> Any:
    # numpy 2 moved the module to numpy._core; numpy.core still imports but warns.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # The original files (pickled by numpy 1.x under Python 2) name numpy.core;
    # files pickled by numpy 2 name numpy._core. Both resolve to the same function.
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle asked for a global outside `_ALLOWED_GLOBALS`."""


class SafeBatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, strings, numbers and numpy arrays.

    Every class or function a pickle references goes through `find_class`; this one hands
    out the three numpy globals a CIFAR batch needs and refuses everything else, so a
    tampered file cannot make loading call ``os.system`` or any other function.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobalError(f"{module}.{name}") from None


def read_batch(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR batch or meta file with `SafeBatchUnpickler`.

    Python 2 strings are decoded as latin-1 (numpy's own advice for these files, and what
    makes the array bytes round-trip); bytes keys are decoded too, so the dict's keys are
    ``str`` either way. Raises NcfmError naming the file if it is unreadable, truncated,
    not a dict, or references a forbidden global.
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise NcfmError(f"cannot read {path} ({error.strerror or error}); check its permissions") from error
    try:
        loaded = SafeBatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except RefusedGlobalError as error:
        raise NcfmError(
            f"refused to load {path}: it references {error}, which a genuine CIFAR file never does; "
            f"delete the file and download the dataset again"
        ) from error
    except Exception as error:  # pickle raises many types on malformed input
        raise NcfmError(
            f"{path} is corrupt or not a CIFAR batch ({type(error).__name__}); "
            f"delete the folder and download the dataset again"
        ) from error
    if not isinstance(loaded, dict):
        raise NcfmError(
            f"{path} is not a CIFAR batch (holds a {type(loaded).__name__}, not a dict); delete it and re-download"
        )
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in loaded.items()}


def _batch_tensors(path: Path, batch: dict[str, Any], label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """``(N, 3, 32, 32)`` uint8 images and ``(N,)`` int64 labels from one unpickled batch."""
    data = batch.get("data")
    labels = batch.get(label_key)
    pixels = _NATIVE_SIZE * _NATIVE_SIZE * 3
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise NcfmError(f"{path}: 'data' must be a uint8 array (N, {pixels}), got {got}; delete it and re-download")
    if (
        not isinstance(labels, list)
        or len(labels) != data.shape[0]
        or not all(isinstance(label, int) and not isinstance(label, bool) for label in labels)
    ):
        raise NcfmError(f"{path}: '{label_key}' must be a list of {data.shape[0]} ints; delete it and re-download")
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    if label_tensor.numel() and (int(label_tensor.min()) < 0 or int(label_tensor.max()) >= num_classes):
        raise NcfmError(f"{path}: labels outside [0, {num_classes}); delete it and re-download")
    # Copies only if the unpickled array is not already C-ordered and writable.
    images = torch.from_numpy(np.require(data, requirements=("C", "W"))).reshape(-1, 3, _NATIVE_SIZE, _NATIVE_SIZE)
    return images, label_tensor


def _load_cifar(
    name: str,
    torchvision_name: str,
    base: str,
    train_files: list[str],
    test_files: list[str],
    meta_file: str,
    label_key: str,
    names_key: str,
    data_dir: Path | None,
    image_size: int | None,
    download: bool,
) -> ImageDataset:
    root = data_dir if data_dir is not None else default_data_dir()
    # Accept data_dir pointing at the extracted folder itself as well as at its parent.
    folder = root if (root / meta_file).is_file() and not (root / base).is_dir() else root / base
    wanted = [folder / f for f in [*train_files, *test_files, meta_file]]
    missing = [p for p in wanted if not p.is_file()]
    if missing and download:
        _download(torchvision_name, base, root, name)
        folder = root / base
        wanted = [folder / f for f in [*train_files, *test_files, meta_file]]
        missing = [p for p in wanted if not p.is_file()]
    if missing:
        raise NotFoundError(
            f"{name} files not found: expected {missing[0]} (folder '{base}' inside {root}); "
            f"pass --data-dir pointing at the directory that contains '{base}', or allow download"
        )

    meta = read_batch(folder / meta_file)
    class_names = meta.get(names_key)
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names) or not class_names:
        raise NcfmError(f"{folder / meta_file}: '{names_key}' must be a list of names; delete it and re-download")
    splits = []
    for files in (train_files, test_files):
        parts = [_batch_tensors(folder / f, read_batch(folder / f), label_key, len(class_names)) for f in files]
        splits.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    (train_images, train_labels), (test_images, test_labels) = splits

    size = image_size or _NATIVE_SIZE
    if size != _NATIVE_SIZE:
        train_images = resize_uint8(train_images, size)
        test_images = resize_uint8(test_images, size)
    fingerprint = file_fingerprint(name, folder, wanted, extra=[f"image_size={size}"])
    return make_dataset(name, (train_images, train_labels), (test_images, test_labels), class_names, fingerprint)


CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _fetch_archive(torchvision_name: str, root: Path) -> None:
    """Download and extract the official archive into ``root``; torchvision knows the URL
    and checks the archive's md5. Imported here: importing torchvision takes seconds."""
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    source = getattr(torchvision.datasets, torchvision_name)
    download_and_extract_archive(source.url, str(root), filename=source.filename, md5=source.tgz_md5)


def _download(torchvision_name: str, base: str, root: Path, name: str) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        _fetch_archive(torchvision_name, root)
    except Exception as error:  # no network, proxy, disk full, bad checksum: all end the same way
        reason = " ".join(str(error).split()) or type(error).__name__
        raise NotFoundError(
            f"could not download {name} into {root} ({reason}); without network, put the extracted "
            f"'{base}' folder from {CIFAR_PAGE} there, or pass --data-dir pointing at where it is"
        ) from error


@register_dataset("cifar10", shape=DatasetShape(10, 3, _NATIVE_SIZE, 50_000), preset=PAPER_PRESET)
def load_cifar10(*, data_dir: Path | None, image_size: int | None, download: bool) -> ImageDataset:
    """CIFAR-10: 50,000 train / 10,000 test RGB images, 32x32, 10 classes."""
    return _load_cifar(
        "cifar10",
        "CIFAR10",
        "cifar-10-batches-py",
        train_files=[f"data_batch_{i}" for i in range(1, 6)],
        test_files=["test_batch"],
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        data_dir=data_dir,
        image_size=image_size,
        download=download,
    )


@register_dataset("cifar100", shape=DatasetShape(100, 3, _NATIVE_SIZE, 50_000), preset=PAPER_PRESET)
def load_cifar100(*, data_dir: Path | None, image_size: int | None, download: bool) -> ImageDataset:
    """CIFAR-100: 50,000 train / 10,000 test RGB images, 32x32, 100 fine classes."""
    return _load_cifar(
        "cifar100",
        "CIFAR100",
        "cifar-100-python",
        train_files=["train"],
        test_files=["test"],
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        data_dir=data_dir,
        image_size=image_size,
        download=download,
    )
