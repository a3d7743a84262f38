"""ncfm from Python: distill, load a result for training, evaluate (see docs/python.md).

Three functions, the same work the ``ncfm`` commands do (they call the same jobs):

- :func:`distill`: a registered dataset by name, ``folder:PATH``, or images in memory
  (:func:`dataset_from_tensors`) -> :class:`DistillResult`; written to a store only when asked;
- :func:`open_synthetic`: a stored result -> :class:`SyntheticDataset`, a
  ``torch.utils.data.Dataset`` of the decoded training images;
- :func:`evaluate`: train fresh networks on a synthetic set under a named protocol and test them
  on the real test set -> :class:`~ncfm_core.evaluate.EvalResult`.

Images are ``(N, C, H, W)``; pixels are floats in [0, 1] (uint8 0..255 accepted on input);
labels ``(N,)`` int64 class indices. Square images only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ncfm_core import parallel
from ncfm_core.config import DistillConfig, make_config
from ncfm_core.data import ImageDataset, dataset_names, dataset_preset, load_dataset
from ncfm_core.data.registry import make_dataset, tensor_fingerprint
from ncfm_core.errors import ConfigError
from ncfm_core.evaluate import EvalResult, protocol_config
from ncfm_core.jobs import distill_job, eval_job
from ncfm_core.jobs.common import open_complete_synset
from ncfm_core.jobs.eval import eval_images_job
from ncfm_core.runtime import configure_allocator
from ncfm_core.store import RunRecord, Store
from ncfm_core.synset import decode_synset

ArrayLike = Union[Tensor, np.ndarray]
PathLike = Union[str, Path]

__all__ = [
    "DistillResult",
    "SyntheticDataset",
    "dataset_from_tensors",
    "distill",
    "evaluate",
    "open_synthetic",
]


# ----------------------------------------------------------------------------- data in memory


def _as_uint8_images(images: ArrayLike, what: str) -> Tensor:
    """(N, C, H, W) or (N, H, W) uint8, or floats in [0, 1] -> (N, C, H, W) uint8 (round(x * 255))."""
    tensor = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images).detach().cpu()
    if tensor.dim() == 3:
        tensor = tensor[:, None]
    if tensor.dim() != 4:
        raise ConfigError(f"{what} must be (N, C, H, W) or (N, H, W), got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return tensor.contiguous()
    if not tensor.is_floating_point():
        raise ConfigError(f"{what} must be uint8 (0..255) or floats in [0, 1], got {tensor.dtype}")
    if tensor.numel() and not (bool(torch.isfinite(tensor).all()) and tensor.min() >= 0 and tensor.max() <= 1):
        raise ConfigError(f"{what}: float pixels must lie in [0, 1]; divide 0..255 values by 255 (or pass uint8)")
    return torch.round(tensor.double() * 255.0).to(torch.uint8).contiguous()


def _as_float_images(images: ArrayLike, what: str) -> Tensor:
    """Like :func:`_as_uint8_images`, but to float32 in [0, 1] without rounding floats."""
    tensor = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images).detach().cpu()
    if tensor.is_floating_point():
        _as_uint8_images(tensor[:1], what)  # shape and range checks
        return (tensor[:, None] if tensor.dim() == 3 else tensor).float()
    return _as_uint8_images(tensor, what).float() / 255.0


def _as_labels(labels: ArrayLike, count: int, what: str) -> Tensor:
    tensor = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels).detach().cpu()
    if tensor.is_floating_point() or tensor.shape != (count,):
        raise ConfigError(f"{what} must be {count} integer class indices, got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.to(torch.int64).contiguous()


def dataset_from_tensors(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    test: tuple[ArrayLike, ArrayLike] | None = None,
    class_names: Sequence[str] | None = None,
    name: str = "tensors",
    allow_flip: bool = True,
) -> ImageDataset:
    """An :class:`~ncfm_core.data.ImageDataset` from images in memory.

    ``images``: (N, C, H, W) or (N, H, W) (one channel), uint8 0..255 or floats in [0, 1],
    square; ``labels``: (N,) class indices in [0, num_classes). ``test``: an optional
    ``(images, labels)`` test split of the same shape (without one, evaluation needs a dataset
    that has it). ``class_names`` default to "0", "1", ...; ``allow_flip=False`` for data a
    mirror changes (digits, text). Its fingerprint hashes the tensors, so a result remembers
    exactly which data made it; ``mean``/``std`` are the train pixels' per-channel statistics.
    """
    train_images = _as_uint8_images(images, "images")
    train_labels = _as_labels(labels, train_images.shape[0], "labels")
    if test is None:
        test_images = torch.zeros((0, *train_images.shape[1:]), dtype=torch.uint8)
        test_labels = torch.zeros((0,), dtype=torch.int64)
    else:
        test_images = _as_uint8_images(test[0], "test images")
        test_labels = _as_labels(test[1], test_images.shape[0], "test labels")
    count = int(max(int(train_labels.max()) if train_labels.numel() else -1,
                    int(test_labels.max()) if test_labels.numel() else -1)) + 1
    names = [str(c) for c in range(count)] if class_names is None else [str(c) for c in class_names]
    fingerprint = tensor_fingerprint(name, [train_images, train_labels, test_images, test_labels], extra=names)
    try:
        return make_dataset(name, (train_images, train_labels), (test_images, test_labels), names, fingerprint,
                            allow_flip=allow_flip)
    except ValueError as err:
        raise ConfigError(f"these tensors do not make a dataset: {err}") from None


# ----------------------------------------------------------------------------- results


class SyntheticDataset(Dataset):
    """A synthetic set ready for training: DECODED images ``(N, C, H, W)`` float32 in [0, 1]
    and labels ``(N,)`` int64, as a ``torch.utils.data.Dataset`` of ``(image, label)`` pairs
    (``image`` (C, H, W), ``label`` an int).

    ``mean``/``std`` (one per channel) are the normalisation the distillation networks applied,
    ``(x - mean) / std``; with ``normalize=True`` items come normalised. ``class_names[label]``
    names a class. ``dataset_name`` is the dataset it was distilled from (None if unknown).
    """

    def __init__(self, images: Tensor, labels: Tensor, class_names: Sequence[str],
                 mean: Sequence[float] | None, std: Sequence[float] | None, *, normalize: bool = False,
                 ref: str | None = None, dataset_name: str | None = None) -> None:
        if normalize and (mean is None or std is None):
            raise ConfigError(
                "this synthetic set has no recorded normalisation (made by an older ncfm); use normalize=False "
                "and normalise with the dataset's: ncfm_core.data.load_dataset(NAME).mean and .std"
            )
        self.images = images.detach().to("cpu", torch.float32)
        self.labels = labels.detach().to("cpu", torch.int64)
        self.class_names = tuple(class_names)
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.normalize = normalize
        self.ref = ref
        self.dataset_name = dataset_name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _normalized(self, images: Tensor) -> Tensor:
        assert self.mean is not None and self.std is not None
        shape = (-1, 1, 1) if images.dim() == 3 else (1, -1, 1, 1)
        return (images - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        return (self._normalized(image) if self.normalize else image), int(self.labels[index])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All items at once: images (N, C, H, W) (normalised if ``normalize``), labels (N,)."""
        return (self._normalized(self.images) if self.normalize else self.images), self.labels


@dataclass(frozen=True, eq=False)
class DistillResult:
    """What :func:`distill` returns: the STORED images ``(C * ipc, channels, H, W)`` float32 in
    [0, 1] with ``labels`` (C * ipc,), each image holding ``factor x factor`` tiles
    (:meth:`synthetic` decodes them), the config that made them, the dataset they came from,
    the normalisation (``mean``/``std``), the run's ``record`` (what ``ncfm inspect`` shows), and
    ``ref`` (``name@vN``) when stored."""

    images: Tensor
    labels: Tensor
    factor: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: DistillConfig
    record: RunRecord = field(repr=False)
    dataset: ImageDataset = field(repr=False)
    ref: str | None = None
    store: Path | None = None

    def synthetic(self, normalize: bool = False) -> SyntheticDataset:
        """The decoded training images as a :class:`SyntheticDataset` (``C * ipc * factor^2`` items)."""
        images, labels = decode_synset(self.images, self.labels, self.factor)
        return SyntheticDataset(images, labels, self.class_names, self.mean, self.std, normalize=normalize,
                                ref=self.ref, dataset_name=self.config.dataset)


# ----------------------------------------------------------------------------- the three functions


def _dataset_and_name(data: str | ImageDataset | ArrayLike, labels: ArrayLike | None,
                      test: tuple[ArrayLike, ArrayLike] | None, class_names: Sequence[str] | None,
                      data_dir: PathLike | None, image_size: int | None) -> tuple[ImageDataset, str]:
    if isinstance(data, str):
        if labels is not None or test is not None or class_names is not None:
            raise ConfigError("labels, test and class_names are for images in memory; a named dataset has its own")
        return load_dataset(data, data_dir, image_size=image_size), data
    if isinstance(data, ImageDataset):
        return data, data.name
    if labels is None:
        raise ConfigError("images in memory need their labels: distill(images, ipc, labels=labels)")
    dataset = dataset_from_tensors(data, labels, test=test, class_names=class_names)
    if test is None:  # the pool's accuracy and every evaluation are measured on it
        raise ConfigError("images in memory need a test split too: distill(images, ipc, labels=labels, "
                          "test=(test_images, test_labels))")
    return dataset, dataset.name


def distill(
    data: str | ImageDataset | ArrayLike,
    ipc: int,
    *,
    labels: ArrayLike | None = None,
    test: tuple[ArrayLike, ArrayLike] | None = None,
    class_names: Sequence[str] | None = None,
    preset: str | None = None,
    store: PathLike | None = None,
    name: str | None = None,
    device: str = "auto",
    gpu_mem: str | None = None,
    data_dir: PathLike | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> DistillResult:
    """Distill ``data`` into ``ipc`` stored synthetic images per class.

    ``data``: a registered dataset name (``"digits"``, ``"cifar10"``, ...), ``"folder:PATH"``,
    an :class:`~ncfm_core.data.ImageDataset`, or images in memory ((N, C, H, W) or (N, H, W),
    uint8 or floats in [0, 1]) with ``labels`` (N,), a test split ``test=(images, labels)``
    (required: the pool's and every evaluation's accuracy are measured on it) and optional
    ``class_names`` (see :func:`dataset_from_tensors`).

    Settings are those of ``ncfm distill``: the :class:`~ncfm_core.config.DistillConfig`
    defaults <- the preset <- ``options`` (any ``DistillConfig`` field, e.g. ``iterations=50``,
    ``pool_size=2``). The preset is the dataset's own; ``preset="digits"`` (any registered
    name) starts from another one, the way to give data in memory small settings.

    ``store``: a store directory to keep the result in, as version ``name@vN`` (default name
    ``<dataset>-ipc<IPC>``), where ``ncfm inspect``/``ncfm export`` read it; ``None``: nothing is
    kept (the run works in a temporary directory, removed before this returns). ``device`` and
    ``gpu_mem`` as on the command line (the job resolves the device: under torchrun each rank
    takes ``cuda:LOCAL_RANK``); ``callback`` receives the progress events.
    """
    configure_allocator()  # before anything touches CUDA (ncfm_core.runtime)
    dataset, dataset_name = _dataset_and_name(data, labels, test, class_names, data_dir, options.get("image_size"))
    if preset is not None:
        if preset.lower() not in dataset_names():
            raise ConfigError(f"unknown preset {preset!r}; use a registered dataset name: {', '.join(dataset_names())}")
        options = {**dataset_preset(preset), **options}
    config = make_config(dataset_name, ipc, data_dir=None if data_dir is None else str(data_dir), **options)

    def run(root: Path) -> tuple[str, RunRecord, Any]:
        target = Store(root)
        # The job's boundary resolves the device (under torchrun with this rank's LOCAL_RANK).
        version = distill_job(target, config, name=name, device=device, callback=callback, gpu_mem=gpu_mem,
                              dataset=dataset)
        # Under torchrun every rank returns rank 0's version, whose files are on rank 0's machine
        # (with store=None, in rank 0's own temporary folder): rank 0 reads the result and sends it.
        ctx = parallel.current()
        opened = open_complete_synset(target, version.ref) if ctx.is_main else None
        opened_version, record, synset = parallel.broadcast_object(ctx, opened)
        return opened_version.ref, record, synset

    if store is None:
        with tempfile.TemporaryDirectory(prefix="ncfm-") as tmp:
            ref, record, synset = run(Path(tmp))
        ref, root = None, None
    else:
        root = Store(store).root
        ref, record, synset = run(root)
    stored = DistillConfig.from_dict(dict(record.config))  # with the memory plan applied
    return DistillResult(
        images=synset.images, labels=synset.labels, factor=synset.factor, class_names=synset.class_names,
        mean=tuple(dataset.mean), std=tuple(dataset.std), config=stored, record=record, dataset=dataset,
        ref=ref, store=root,
    )


def open_synthetic(ref: str, store: PathLike | None = None, normalize: bool = False) -> SyntheticDataset:
    """The decoded training images of a stored result as a :class:`SyntheticDataset`.

    ``ref``: ``NAME`` (its latest complete version), ``NAME@vN`` or a version directory;
    ``store``: the store directory (default: ``$NCFM_HOME``, else the user data directory, as
    for ``ncfm``). Reads ``synset.safetensors`` (no pickle) and decodes each stored image into
    ``factor x factor`` training images. ``normalize=True``: items come as ``(x - mean) / std``.
    """
    version, record, synset = open_complete_synset(Store(store), ref)
    images, labels = decode_synset(synset.images, synset.labels, synset.factor)
    dataset_name = None if record.dataset is None else record.dataset.name
    return SyntheticDataset(images, labels, synset.class_names, synset.mean, synset.std, normalize=normalize,
                            ref=version.ref, dataset_name=dataset_name)


def evaluate(
    synthetic: str | DistillResult | SyntheticDataset | tuple[ArrayLike, ArrayLike],
    dataset: str | ImageDataset | None = None,
    *,
    protocol: str = "ncfm",
    store: PathLike | None = None,
    device: str = "auto",
    data_dir: PathLike | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **settings: Any,
) -> EvalResult:
    """Train ``repeats`` fresh networks from scratch on a synthetic set and test each on the real
    test split: the FINAL-epoch accuracies (``result.mean``, ``result.std``, ``result.runs``,
    fractions in [0, 1]).

    ``synthetic``: a stored result's reference (evaluated and recorded in its record, as
    ``ncfm eval`` does; ``store`` as for :func:`open_synthetic`), a :class:`DistillResult`, a
    :class:`SyntheticDataset` or ``(images, labels)`` of training images ((N, C, H, W) in [0, 1]
    or uint8; already decoded). ``dataset``: where the test split and the normalisation come
    from, a registered name or an :class:`~ncfm_core.data.ImageDataset`; default: the one the
    result was distilled from. ``protocol``: ``"ncfm"`` or ``"dsa"``
    (:func:`~ncfm_core.protocols.protocol_config`); ``settings`` override its knobs (``epochs``,
    ``repeats``, ``lr``, ``model``, ``width``, ...).
    """
    configure_allocator()  # before anything touches CUDA (ncfm_core.runtime)
    config = protocol_config(protocol, **settings)
    if isinstance(dataset, str):
        dataset = load_dataset(dataset, data_dir)
    if isinstance(synthetic, str):  # the jobs resolve the device at their boundary, as for distill
        record = eval_job(Store(store), synthetic, config, device=device, callback=callback,
                          data_dir=None if data_dir is None else str(data_dir), dataset=dataset)
        return EvalResult(runs=list(record["accuracy"]["runs"]), seconds=float(record["seconds"]),
                          protocol=dict(record["protocol"]), seeds=list(record["seeds"]),
                          training=str(record["training"]), train_set=dict(record["train_set"]))
    if isinstance(synthetic, DistillResult):
        images, labels, factor = synthetic.images, synthetic.labels, synthetic.factor
        dataset = dataset if dataset is not None else synthetic.dataset
    elif isinstance(synthetic, SyntheticDataset):
        images, labels, factor = synthetic.images, synthetic.labels, 1
        if dataset is None and synthetic.dataset_name is not None:
            dataset = load_dataset(synthetic.dataset_name, data_dir)
    else:
        images = _as_float_images(synthetic[0], "images")
        labels, factor = _as_labels(synthetic[1], images.shape[0], "labels"), 1
    if dataset is None:
        raise ConfigError("name the dataset whose test split to evaluate on: evaluate(..., dataset='digits') "
                          "or an ImageDataset")
    if dataset.test_images.shape[0] == 0:
        raise ConfigError(f"dataset '{dataset.name}' has no test split; build it with test=(images, labels)")
    return eval_images_job(images, labels, dataset, config, factor=factor, device=device, callback=callback)
