"""The dataset registry: `ImageDataset`, `load_dataset` and the helpers every source shares.

A registry is a plain dict filled by the `register_dataset` decorator (timm-style). A
loader is called with keyword arguments only::

    loader(data_dir=Path | None, image_size=int | None, download=bool, **options)

and returns an `ImageDataset`. A name that ends with ``":"`` (``"folder:"``) registers a
family: ``load_dataset("folder:/x/y")`` calls that loader with ``argument="/x/y"`` as well.

Beside its loader a source registers its train-split `DatasetShape` (so runs can be planned
where the data is not; None where only loading tells, as for ``folder:``) and its preset, the
`DistillConfig` field overrides ``config.make_config`` starts from::

    @register_dataset("cifar10", shape=DatasetShape(10, 3, 32, 50_000), preset=PAPER_PRESET)
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncfm_core.errors import ConfigError
from ncfm_core.platform import user_dir

DatasetLoader = Callable[..., "ImageDataset"]

# Paper settings (the paper and the authors' configs, github.com/gszfwsb/NCFM): ConvNet-3/4/5 by resolution, factor 2, 1024 real images per
# class, F = 1024, pools of 20 extractors trained 60 epochs.
PAPER_PRESET: dict[str, Any] = dict(
    factor=2, iterations=20000, real_per_class=1024, num_freqs=1024, pool_size=20, pool_epochs=60
)


@dataclass(frozen=True)
class DatasetShape:
    """What the planner needs to know about a dataset, without loading it."""

    num_classes: int
    channels: int
    image_size: int
    num_train: int

    @classmethod
    def of(cls, dataset: ImageDataset) -> DatasetShape:
        """The shape of a loaded ``ImageDataset``."""
        return cls(dataset.num_classes, dataset.channels, dataset.image_size, dataset.num_train)

    @property
    def pixels(self) -> int:
        """Values per image, C*H*W."""
        return self.channels * self.image_size * self.image_size


@dataclass(frozen=True)
class _Registration:
    loader: DatasetLoader
    shape: DatasetShape | None
    preset: dict[str, Any]
    eval_protocol: str = "ncfm"


_REGISTRY: dict[str, _Registration] = {}
"""Plain names (``"cifar10"``) and family prefixes (``"folder:"``) to their loaders, shapes and presets."""

_STANDARD_PARAMETERS = frozenset({"data_dir", "image_size", "download", "argument"})
"""Keyword arguments `load_dataset` passes itself; anything else is a source option."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image dataset held in memory as uint8, split into train and test.

    Images are ``(N, C, H, W)`` uint8 with square ``H == W``; labels ``(N,)`` int64 in
    ``[0, num_classes)``. ``mean``/``std`` are per-channel statistics of the train pixels
    scaled to ``[0, 1]`` (what the model input path normalises with). ``fingerprint`` is a
    sha256 hex digest identifying the data as loaded (source files or tensor bytes).
    ``eq=False``: tensors have no boolean equality; compare fingerprints instead.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    allow_flip: bool = True

    def __post_init__(self) -> None:
        # A loader that breaks these breaks every consumer far from the cause: fail here.
        for split, images, labels in (
            ("train", self.train_images, self.train_labels),
            ("test", self.test_images, self.test_labels),
        ):
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"{split}_images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise ValueError(
                    f"{split}_labels must be int64 ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
                )
            if images.shape[2] != images.shape[3]:
                raise ValueError(f"{split}_images must be square, got {tuple(images.shape[2:])}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
                raise ValueError(f"{split}_labels must lie in [0, {len(self.class_names)})")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {tuple(self.train_images.shape[1:])} "
                f"vs {tuple(self.test_images.shape[1:])}"
            )
        if not (len(self.mean) == len(self.std) == self.channels):
            raise ValueError(f"mean and std need {self.channels} entries, got {len(self.mean)} and {len(self.std)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[2])

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    def class_indices(self) -> list[Tensor]:
        """Train indices per class: a list of ``num_classes`` int64 tensors, each ascending."""
        order = torch.argsort(self.train_labels, stable=True)
        counts = torch.bincount(self.train_labels, minlength=self.num_classes)
        return list(torch.split(order, counts.tolist()))


def register_dataset(
    name: str, *, shape: DatasetShape | None = None, preset: dict[str, Any] | None = None,
    eval_protocol: str = "ncfm",
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: register ``loader`` under ``name`` (lower case; ``"prefix:"`` for a family)
    with its train-split ``shape`` at the native size (None: only known once loaded), its
    ``preset`` of `DistillConfig` field overrides (None: none, the config defaults) and the
    name of the evaluation protocol its results get unless one is asked for
    (``ncfm_core.protocols.PROTOCOLS``; the paper's ``ncfm`` by default)."""
    key = name.lower()

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        if key in _REGISTRY and _REGISTRY[key].loader is not loader:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[key] = _Registration(loader, shape, dict(preset or {}), eval_protocol)
        return loader

    return decorator


def _ensure_builtin_sources() -> None:
    # The built-in sources register themselves on import; importing here makes
    # `registry.load_dataset` work even for callers that never imported the package.
    import ncfm_core.data  # noqa: F401


def dataset_names() -> list[str]:
    """Registered names, sorted; a family appears in its documented form (``"folder:PATH"``)."""
    _ensure_builtin_sources()
    return sorted(f"{key}PATH" if key.endswith(":") else key for key in _REGISTRY)


def dataset_shape(name: str, image_size: int | None = None) -> DatasetShape | None:
    """The train-split shape of a registered dataset by name (``fake`` with its default
    options: CIFAR-10-shaped), resized to ``image_size`` if given; None for ``folder:`` and
    other datasets whose shape is only known once loaded."""
    _ensure_builtin_sources()
    entry = _REGISTRY.get(name.lower())
    shape = entry.shape if entry is not None else None
    if shape is not None and image_size is not None:
        shape = replace(shape, image_size=image_size)
    return shape


def _registration(name: str) -> _Registration | None:
    """The registration of a dataset name; ``folder:PATH`` (or any ``NAME:...``) is looked up by
    the part before the colon, as given."""
    _ensure_builtin_sources()
    prefix = name.split(":", 1)[0]
    return _REGISTRY.get(prefix) or _REGISTRY.get(f"{prefix}:")


def dataset_preset(name: str) -> dict[str, Any]:
    """A fresh copy of the preset registered for a dataset name (``folder:PATH`` by its family).
    Unknown names: ``{}``."""
    entry = _registration(name)
    return dict(entry.preset) if entry is not None else {}


def dataset_eval_protocol(name: str) -> str:
    """The name of the evaluation protocol registered for a dataset name (``folder:PATH`` by its
    family). Unknown names: ``"ncfm"``, the paper's."""
    entry = _registration(name)
    return entry.eval_protocol if entry is not None else "ncfm"


def default_data_dir() -> Path:
    """Where datasets live unless ``data_dir`` is given: ``$NCFM_DATA_DIR``, else
    ``platformdirs.user_cache_dir("ncfm")/datasets``. Read at call time, never at import."""
    override = os.environ.get("NCFM_DATA_DIR")
    if override:
        return Path(override).expanduser()
    return Path(user_dir("user_cache_dir")) / "datasets"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    download: bool = True,
    **options: object,
) -> ImageDataset:
    """Load a registered dataset by name (``"digits"``, ``"cifar10"``, ``"folder:/x/y"``, ...).

    ``data_dir`` defaults to `default_data_dir()` for sources that read files;
    ``image_size`` overrides the source's native size; ``download`` lets sources that can
    (CIFAR) fetch missing files; ``options`` are source-specific (see each loader).
    Raises ConfigError for an unknown name or option, NotFoundError for missing files.
    """
    _ensure_builtin_sources()
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        raise ConfigError(image_size_message(image_size))
    key = name.strip().lower()
    prefix, sep, argument = name.strip().partition(":")
    family = f"{prefix.lower()}:" if sep else None
    kwargs: dict[str, object] = {
        "data_dir": Path(data_dir).expanduser() if data_dir is not None else None,
        "image_size": image_size,
        "download": download,
    }
    if family is not None and family in _REGISTRY:
        if not argument:
            raise ConfigError(f"dataset {name!r} needs a path after the colon, e.g. '{family}/data/my_images'")
        loader = _REGISTRY[family].loader
        kwargs["argument"] = argument
    elif key in _REGISTRY and not key.endswith(":"):
        loader = _REGISTRY[key].loader
    else:
        raise ConfigError(_unknown_name_message(name))
    _check_options(name, loader, options)
    return loader(**kwargs, **options)


MAX_IMAGE_SIZE = 1024
"""The largest ``--image-size``: a dataset is held in memory as uint8 at this size, and the
networks' memory plans are made for images up to it."""


def image_size_message(image_size: int) -> str:
    return (f"image_size (--image-size) {image_size} is too large: use at most {MAX_IMAGE_SIZE} pixels per side "
            f"(datasets are held in memory at this size)")


def check_evaluable(dataset: ImageDataset) -> ImageDataset:
    """A dataset distillation and accuracy mean something for: at least 2 classes and a
    non-empty test split (``ConfigError``, exit 2, saying what the data needs). The jobs check
    it (``distill``, ``resume``, ``eval``); loading itself accepts any data."""
    folder = dataset.name.startswith("folder:")
    if dataset.num_classes < 2:
        where = "add a second class folder beside" if folder else "use a dataset with more classes than"
        raise ConfigError(
            f"dataset '{dataset.name}' has {dataset.num_classes} class ({', '.join(dataset.class_names)}); "
            f"telling classes apart needs at least 2 classes, so any accuracy would be meaningless; "
            f"{where} the one there"
        )
    if int(dataset.test_images.shape[0]) == 0:
        hint = ("give every class at least 2 images (one is held out for testing), or use train/ and test/ "
                "folders" if folder else "use a dataset with a test split")
        raise ConfigError(
            f"dataset '{dataset.name}' has no test images, so its accuracy cannot be measured; {hint}"
        )
    return dataset


def _unknown_name_message(name: str) -> str:
    valid = dataset_names()
    plain = [n for n in valid if not n.endswith("PATH")]
    close = difflib.get_close_matches(name.strip().lower(), plain, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown dataset '{name}': {hint}valid names are {', '.join(valid)}"


def _check_options(name: str, loader: DatasetLoader, options: dict[str, object]) -> None:
    parameters = inspect.signature(loader).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return  # the loader takes **options and checks them itself
    accepted = [
        p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _STANDARD_PARAMETERS
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(sorted(accepted)) or "none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for dataset '{name}'; valid options: {valid}")


def check_ipc(dataset: ImageDataset, ipc: int) -> None:
    """Raise ConfigError unless every class has at least ``ipc`` training images."""
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ConfigError(f"IPC must be a positive integer, got {ipc!r}")
    counts = torch.bincount(dataset.train_labels, minlength=dataset.num_classes)
    smallest = int(torch.argmin(counts))
    size = int(counts[smallest])
    if ipc > size:
        raise ConfigError(
            f"IPC {ipc} is more than the {size} training images of class '{dataset.class_names[smallest]}' "
            f"(index {smallest}), the smallest class of {dataset.name}; use --ipc {size} or less, "
            f"or add images to that class"
        )


# -- helpers shared by the sources ----------------------------------------------------------


def channel_mean_std(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``(N, C, H, W)`` images scaled to [0, 1].

    Exact: counts each of the 256 pixel values per channel, then takes the moments of that
    histogram in float64, so no large float sum accumulates rounding error.
    """
    channels = images.shape[1]
    histogram = torch.zeros(channels, 256, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk]
        for c in range(channels):
            histogram[c] += torch.bincount(block[:, c].reshape(-1).long(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = histogram.sum(dim=1).clamp_min(1.0)
    mean = (histogram * values).sum(dim=1) / total
    var = (histogram * (values[None, :] - mean[:, None]) ** 2).sum(dim=1) / total
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def tensor_fingerprint(tag: str, tensors: Iterable[Tensor], extra: Iterable[str] = ()) -> str:
    """sha256 hex over ``tag``, each tensor's dtype, shape and bytes, then ``extra`` strings."""
    hasher = hashlib.sha256(f"ncfm-dataset-v1\0{tag}\0".encode())
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        hasher.update(f"{array.dtype.str}{tuple(array.shape)}\0".encode())
        if array.size:  # an empty split (data in memory without a test split) has no bytes to view
            hasher.update(memoryview(array).cast("B"))
    for item in extra:
        hasher.update(f"{item}\0".encode())
    return hasher.hexdigest()


def file_fingerprint(tag: str, root: Path, files: Iterable[Path], extra: Iterable[str] = ()) -> str:
    """sha256 hex over ``tag``, each file's path relative to ``root``, size and contents
    (streamed in 1 MiB chunks), then ``extra`` strings (load parameters such as the size)."""
    hasher = hashlib.sha256(f"ncfm-dataset-v1\0{tag}\0".encode())
    for path in files:
        hasher.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                hasher.update(block)
    for item in extra:
        hasher.update(f"{item}\0".encode())
    return hasher.hexdigest()


def make_dataset(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    class_names: Iterable[str],
    fingerprint: str,
    allow_flip: bool = True,
) -> ImageDataset:
    """Build an `ImageDataset`, computing mean/std from the train images."""
    mean, std = channel_mean_std(train[0])
    return ImageDataset(
        name=name,
        train_images=train[0],
        train_labels=train[1],
        test_images=test[0],
        test_labels=test[1],
        class_names=tuple(class_names),
        mean=mean,
        std=std,
        fingerprint=fingerprint,
        allow_flip=allow_flip,
    )
