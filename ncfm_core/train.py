"""Supervised training of one classifier: used by the extractor pool and by evaluation.

Data stays on the device; images may be uint8 (real data) or float in [0, 1] (synthetic).
All randomness (shuffling, augmentation) comes from the generator passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncfm_core import augment
from ncfm_core.errors import ConfigError

SCHEDULES = ("none", "step_half", "half_tenth")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainSettings:
    """How to train one network from scratch."""

    epochs: int
    lr: float
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    batch_size: int = 256
    # none; step_half: x0.5 at 1/5, 2/5, 3/5, 4/5 of training (NCFM's protocol);
    # half_tenth: x0.1 at half (DC/DSA/DM's protocol)
    schedule: str = "none"
    dsa_strategy: str | None = None  # augmentation per image, e.g. augment.EVAL_STRATEGY
    allow_flip: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs must be >= 0, batch size >= 1 and the learning rate > 0")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate at the start of ``epoch`` (0-based)."""
    if schedule == "step_half":
        milestones = [epochs * k // 5 for k in range(1, 5)]
        return 0.5 ** sum(epoch >= m for m in milestones if m > 0)
    if schedule == "half_tenth":
        return 0.1 if epochs > 1 and epoch >= epochs // 2 else 1.0
    return 1.0


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def as_float_images(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def train_classifier(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``net`` in place on (N, C, H, W) images with hard labels (N,); returns it.

    ``on_epoch(epoch, mean_loss)`` is called after every epoch.
    """
    net.train()
    optimizer = make_optimizer(net.parameters(), settings)
    num = images.shape[0]
    size = images.shape[-1]
    for epoch in range(settings.epochs):
        factor = lr_factor(settings.schedule, epoch, settings.epochs)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor
        order = torch.randperm(num, generator=generator, device=generator.device).to(images.device)
        total, batches = 0.0, 0
        for start in range(0, num, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            batch = as_float_images(images[idx])
            if settings.dsa_strategy:
                groups = torch.arange(len(idx), device=batch.device)
                params = augment.sample_params(
                    settings.dsa_strategy, len(idx), size, generator, allow_flip=settings.allow_flip
                )
                batch = augment.apply_params(batch, groups, _to(params, batch.device))
            loss = F.cross_entropy(net(batch), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        if on_epoch is not None:
            on_epoch(epoch, total / max(batches, 1))
    net.eval()
    return net


def _to(params: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in params.items()}


@torch.no_grad()
def accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1] of ``net`` on (N, C, H, W) images, evaluated in chunks."""
    was_training = net.training
    net.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = net(as_float_images(images[start : start + batch_size]))
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    net.train(was_training)
    return correct / max(images.shape[0], 1)
