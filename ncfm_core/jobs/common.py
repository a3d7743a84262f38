"""What several jobs need: the dataset a config names, checked against a version's record, and
the parts of the record that describe it."""

from __future__ import annotations

import dataclasses
import platform

import torch

from ncfm_core.config import DistillConfig, validate
from ncfm_core.data import ImageDataset, load_dataset
from ncfm_core.errors import ConfigError, CorruptArtifactError, NcfmError, NotFoundError, one_line
from ncfm_core import store as store_lib
from ncfm_core.store import ArtifactVersion, DatasetRecord, Normalization, RunRecord, Store
from ncfm_core.store.synset import SyntheticSet, load_synset
from ncfm_core.version import __version__


def software_versions() -> dict[str, str]:
    return {"ncfm": __version__, "torch": torch.__version__, "python": platform.python_version()}


def load_job_dataset(config: DistillConfig, data_dir: str | None = None) -> ImageDataset:
    return load_dataset(config.dataset, data_dir or config.data_dir, image_size=config.image_size)


def dataset_record(config: DistillConfig, dataset: ImageDataset) -> DatasetRecord:
    return DatasetRecord(
        name=config.dataset,
        fingerprint=dataset.fingerprint,
        num_classes=dataset.num_classes,
        image_size=dataset.image_size,
        channels=dataset.channels,
        class_names=tuple(dataset.class_names),
        num_train=dataset.num_train,
        num_test=int(dataset.test_images.shape[0]),
        # What the networks apply to [0, 1] pixels, (x - mean) / std: the real train set's statistics.
        normalization=Normalization(mean=tuple(dataset.mean), std=tuple(dataset.std)),
    )


def check_fingerprint(version: ArtifactVersion, record: RunRecord, dataset: ImageDataset) -> None:
    recorded = None if record.dataset is None else record.dataset.fingerprint
    if recorded != dataset.fingerprint:
        raise NcfmError(
            f"dataset '{dataset.name}' is not the data {version.ref} was made from (fingerprint "
            f"{str(dataset.fingerprint)[:12]}... != {str(recorded)[:12]}...); point --data-dir at the original data"
        )


def config_from_record(version: ArtifactVersion, record: RunRecord) -> DistillConfig:
    if not record.config:
        raise CorruptArtifactError(f"{version.manifest_path}: has no config; this version cannot be resumed")
    try:
        return validate(DistillConfig.from_dict(dict(record.config)))
    except (TypeError, ConfigError) as err:
        raise CorruptArtifactError(
            f"{version.manifest_path}: invalid config ({one_line(err)}); restore or delete this file"
        ) from None


def complete_synset(version: ArtifactVersion, record: RunRecord) -> SyntheticSet:
    if record.status != "complete":
        raise NotFoundError(
            f"{version.ref} is {record.status}, so it has no synthetic set yet; "
            f"finish it with `ncfm resume {version.ref}`"
        )
    version.verify_sha256(store_lib.SYNSET_FILE, record)
    return load_synset(version.synset_path)


def open_complete_synset(store: Store, ref: str) -> tuple[ArtifactVersion, RunRecord, SyntheticSet]:
    """The version ``ref`` names, its record and its synthetic set (NotFoundError unless it is
    complete), with the normalisation filled in from the record for synset files written before
    it was recorded there. What ``ncfm eval``, ``ncfm export`` and ``ncfm_core.open_synthetic`` read."""
    version = store.resolve(ref)
    record = version.record()
    synset = complete_synset(version, record)
    recorded = None if record.dataset is None else record.dataset.normalization
    if synset.mean is None and recorded is not None:
        synset = dataclasses.replace(synset, mean=tuple(map(float, recorded.mean)), std=tuple(map(float, recorded.std)))
    return version, record, synset
