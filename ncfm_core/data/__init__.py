"""Dataset registry: every source loads into one in-memory `ImageDataset` of uint8 tensors.

Registered names: ``digits`` (offline), ``cifar10``, ``cifar100``, ``tinyimagenet``, the
ImageNet subsets ``imagenette``, ``imagewoof``, ``imagefruit``, ``imagemeow``,
``imagesquawk``, ``imageyellow``, ``fake``, and the family ``folder:PATH``. Importing this
package registers them all, each with its train-split shape (`dataset_shape`) and its preset
(`dataset_preset`).
"""

from __future__ import annotations

# Importing the source modules fills the registry (each loader carries @register_dataset).
from ncfm_core.data import cifar, imagenet, mnist, sources  # noqa: F401
from ncfm_core.data.imagenet import IMAGENET_SUBSETS, SubsetClass
from ncfm_core.data.registry import (
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

__all__ = [
    "IMAGENET_SUBSETS",
    "PAPER_PRESET",
    "DatasetShape",
    "ImageDataset",
    "SubsetClass",
    "channel_mean_std",
    "check_ipc",
    "dataset_names",
    "dataset_preset",
    "dataset_shape",
    "default_data_dir",
    "load_dataset",
    "register_dataset",
]
