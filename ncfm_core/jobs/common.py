"""What several jobs need: the dataset a config names, checked against a manifest, and the
records a manifest keeps about it."""

from __future__ import annotations

import platform
from typing import Any

import torch

from ncfm_core import __version__
from ncfm_core.config import DistillConfig
from ncfm_core.data import ImageDataset, load_dataset
from ncfm_core.errors import CorruptArtifactError, NcfmError, NotFoundError, one_line
from ncfm_core.store import ArtifactVersion
from ncfm_core.store.synset import SyntheticSet, load_synset


def software_versions() -> dict[str, str]:
    return {"ncfm": __version__, "torch": torch.__version__, "python": platform.python_version()}


def load_job_dataset(config: DistillConfig, data_dir: str | None = None) -> ImageDataset:
    return load_dataset(config.dataset, data_dir or config.data_dir, image_size=config.image_size)


def dataset_record(config: DistillConfig, dataset: ImageDataset) -> dict[str, Any]:
    return {
        "name": config.dataset,
        "fingerprint": dataset.fingerprint,
        "num_classes": dataset.num_classes,
        "image_size": dataset.image_size,
        "channels": dataset.channels,
        "class_names": list(dataset.class_names),
        "num_train": dataset.num_train,
        "num_test": int(dataset.test_images.shape[0]),
    }


def check_fingerprint(version: ArtifactVersion, manifest: dict, dataset: ImageDataset) -> None:
    recorded = (manifest.get("dataset") or {}).get("fingerprint")
    if recorded != dataset.fingerprint:
        raise NcfmError(
            f"dataset '{dataset.name}' is not the data {version.ref} was made from (fingerprint "
            f"{str(dataset.fingerprint)[:12]}... != {str(recorded)[:12]}...); point --data-dir at the original data"
        )


def config_from_manifest(version: ArtifactVersion, manifest: dict) -> DistillConfig:
    raw = manifest.get("config")
    if not isinstance(raw, dict):
        raise CorruptArtifactError(f"{version.manifest_path}: has no config; this version cannot be resumed")
    try:
        return DistillConfig.from_dict(raw)
    except TypeError as err:
        raise CorruptArtifactError(f"{version.manifest_path}: invalid config ({one_line(err)})") from None


def complete_synset(version: ArtifactVersion, manifest: dict) -> SyntheticSet:
    if manifest.get("status") != "complete":
        raise NotFoundError(
            f"{version.ref} is {manifest.get('status', 'unknown')}, so it has no synthetic set yet; "
            f"finish it with `ncfm resume {version.ref}`"
        )
    return load_synset(version.synset_path)
