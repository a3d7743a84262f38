"""Train-from-scratch evaluation of a synthetic set (and of real baselines).

A fresh network is trained on the decoded synthetic images with per-image DSA augmentation and
tested on the real test set. We report the FINAL-epoch accuracy: the authors' best-over-epochs
figure selects the model on the test set.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ncfm_core import augment
from ncfm_core.data import ImageDataset
from ncfm_core.errors import ConfigError
from ncfm_core.models import create_network
from ncfm_core.synset import decode_synset, sample_per_class
from ncfm_core.train import TrainSettings, accuracy, train_classifier


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol: how each fresh network is trained."""

    model: str = "convnet"
    epochs: int = 300
    lr: float = 0.001
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    batch_size: int = 128
    schedule: str = "step_half"  # x0.5 at 1/5 .. 4/5 (the authors' protocol)
    dsa_strategy: str = augment.EVAL_STRATEGY
    repeats: int = 3
    seed: int = 0
    depth: int | None = None  # ConvNet only; None: by resolution
    width: int = 128  # ConvNet only

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ConfigError("--repeats must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_settings(self, allow_flip: bool) -> TrainSettings:
        return TrainSettings(
            epochs=self.epochs,
            lr=self.lr,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            schedule=self.schedule,
            dsa_strategy=self.dsa_strategy or None,
            allow_flip=allow_flip,
        )


@dataclass
class EvalResult:
    runs: list[float]  # final-epoch test accuracy of each repeat, fractions in [0, 1]
    seconds: float
    protocol: dict[str, Any]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.runs)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.runs) if len(self.runs) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "runs": list(self.runs), "seconds": self.seconds}


def build_eval_network(config: EvalConfig, dataset: ImageDataset) -> torch.nn.Module:
    kwargs: dict[str, Any] = {}
    if config.model == "convnet":
        kwargs = {"depth": config.depth, "width": config.width}
    return create_network(
        config.model,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        image_size=dataset.image_size,
        mean=dataset.mean,
        std=dataset.std,
        **kwargs,
    )


def evaluate_images(
    images: Tensor,
    labels: Tensor,
    dataset: ImageDataset,
    config: EvalConfig,
    device: torch.device | str,
    on_repeat: Callable[[int, float], None] | None = None,
) -> EvalResult:
    """Train ``config.repeats`` fresh networks on (N, C, H, W) images, test each on the real test set.

    Repeat ``r`` seeds both its weight init and its data order with ``config.seed + r``.
    """
    started = time.perf_counter()
    images, labels = images.to(device), labels.to(device)
    test_images, test_labels = dataset.test_images.to(device), dataset.test_labels.to(device)
    settings = config.train_settings(dataset.allow_flip)
    runs = []
    for repeat in range(config.repeats):
        seed = config.seed + repeat
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # weight init only; the global RNG is restored afterwards
            net = build_eval_network(config, dataset).to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        train_classifier(net, images, labels, settings, generator)
        runs.append(accuracy(net, test_images, test_labels))
        if on_repeat is not None:
            on_repeat(repeat, runs[-1])
    return EvalResult(runs, time.perf_counter() - started, config.to_dict())


def evaluate_synset(
    images: Tensor,
    labels: Tensor,
    factor: int,
    dataset: ImageDataset,
    config: EvalConfig,
    device: torch.device | str,
    on_repeat: Callable[[int, float], None] | None = None,
) -> EvalResult:
    """Decode stored multi-formation images, then :func:`evaluate_images`."""
    decoded, decoded_labels = decode_synset(images.float(), labels, factor)
    return evaluate_images(decoded.detach(), decoded_labels, dataset, config, device, on_repeat)


def random_real_subset(dataset: ImageDataset, ipc: int, seed: int) -> tuple[Tensor, Tensor]:
    """``ipc`` random real training images per class (uint8) and their labels, seeded."""
    generator = torch.Generator().manual_seed(seed)
    picks = sample_per_class(dataset.class_indices(), ipc, generator).reshape(-1)
    return dataset.train_images[picks], dataset.train_labels[picks]
