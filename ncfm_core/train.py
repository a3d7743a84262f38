"""Supervised training of classifiers: used by the extractor pool and by evaluation.

Data stays on the device; images may be uint8 (real data) or float in [0, 1] (synthetic).
All randomness (shuffling, augmentation) comes from the generators passed in.

One training step, for each of R independent repeats (R = 1 for :func:`train_classifier`):

1. a mini-batch from this repeat's own shuffle of the data;
2. random resized crop (optional), then DSA (optional), each drawn per image;
3. CutMix (optional): with probability p, one box pasted from a permutation of the batch,
   the labels mixed by the pasted area;
4. the loss: cross-entropy against the (soft) targets, or, with a teacher, the
   distillation KL against the teacher's logits on this very augmented batch.

Repeat ``r`` draws all its randomness, in a fixed order, from ``generators[r]`` only, so
training R networks together (:func:`train_stacked`, one vmapped forward over stacked
parameters) gives each one the same data order, the same augmentation draws and, up to
float rounding, the same weights as training it alone with :func:`train_classifier`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncfm_core import augment
from ncfm_core.errors import ConfigError

SCHEDULES = ("none", "step_half", "half_tenth")
OPTIMIZERS = ("sgd", "adamw")

# Aspect ratios of random resized crops: log-uniform in [3/4, 4/3], as torchvision's default.
CROP_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)

# Modules whose training-mode forward depends on the whole batch or on the global RNG:
# networks holding them cannot be vmapped over stacked parameters and train one by one.
UNSTACKABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


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
    cutmix_prob: float = 0.0  # probability that a batch gets CutMix (0: never, no draws at all)
    random_resized_crop: bool = False  # per-image crop of a random box, resized to the full image
    rrc_min_scale: float = 0.5  # crop area as a fraction of the image, drawn from U(min, 1)
    temperature: float = 1.0  # soft-label distillation temperature (used only with a teacher)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs must be >= 0, batch size >= 1 and the learning rate > 0")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ConfigError(f"CutMix probability must be in [0, 1], got {self.cutmix_prob}")
        if not 0.0 < self.rrc_min_scale <= 1.0:
            raise ConfigError(f"random-resized-crop minimum scale must be in (0, 1], got {self.rrc_min_scale}")
        if not self.temperature > 0.0:
            raise ConfigError(f"soft-label temperature must be > 0, got {self.temperature}")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate at the start of ``epoch`` (0-based)."""
    if schedule == "step_half":
        milestones = [epochs * k // 5 for k in range(1, 5)]
        return 0.5 ** sum(epoch >= m for m in milestones if m > 0)
    if schedule == "half_tenth":
        return 0.1 if epochs > 1 and epoch >= epochs // 2 else 1.0
    return 1.0


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params``. Both update every element from its own gradient and
    state alone, so one optimizer over stacked (R, ...) parameters performs exactly the
    updates of R separate optimizers, one per repeat."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def as_float_images(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


# ----------------------------------------------------------------------------- augmentation


def sample_resized_crops(num: int, min_scale: float, generator: torch.Generator) -> Tensor:
    """Draw ``num`` random crop boxes, returned as (num, 4) float on ``generator.device``.

    Columns: ``width_fraction``, ``height_fraction`` (box side / image side, in (0, 1]),
    ``centre_x``, ``centre_y`` (box centre in normalised coordinates, the image spanning
    [-1, 1]). The area fraction is U(min_scale, 1) and the aspect ratio log-uniform in
    :data:`CROP_RATIO_RANGE`; a side that would exceed the image is clipped to it (where
    torchvision would redraw), and the centre is uniform over the positions that keep the
    box inside the image.
    """
    draws = torch.rand(num, 4, generator=generator, device=generator.device)  # (num, 4)
    area = min_scale + (1.0 - min_scale) * draws[:, 0]
    low, high = math.log(CROP_RATIO_RANGE[0]), math.log(CROP_RATIO_RANGE[1])
    ratio = torch.exp(low + (high - low) * draws[:, 1])  # width / height
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = (2.0 * draws[:, 2] - 1.0) * (1.0 - width)
    centre_y = (2.0 * draws[:, 3] - 1.0) * (1.0 - height)
    return torch.stack([width, height, centre_x, centre_y], dim=1)


def apply_resized_crops(images: Tensor, boxes: Tensor) -> Tensor:
    """Crop each image to its box and resize it back to the full size (bilinear).

    ``images`` (N, C, H, W) float; ``boxes`` (N, 4) as from :func:`sample_resized_crops`.
    Output pixel (i, j) samples the input at ``x = centre_x + width_fraction * u_j``,
    ``y = centre_y + height_fraction * v_i`` where ``u_j = (2j + 1) / W - 1`` (pixel centres,
    ``align_corners=False``), clamping at the border. Returns (N, C, H, W).
    """
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = boxes[:, 0]
    theta[:, 0, 2] = boxes[:, 2]
    theta[:, 1, 1] = boxes[:, 1]
    theta[:, 1, 2] = boxes[:, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_cutmix(
    batch_size: int, height: int, width: int, probability: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw one CutMix for a batch: returns ``box`` (4,) int64 ``(top, bottom, left, right)``
    (rows ``top:bottom``, columns ``left:right``) and ``partners`` (B,) int64, a permutation
    of the batch (image ``b`` receives the box of image ``partners[b]``), on ``generator.device``.

    CutMix (Yun et al. 2019) with the authors' Beta(1, 1): ``lam ~ U(0, 1)``, box sides
    ``int(side * sqrt(1 - lam))`` around a uniform centre, clipped at the border. With
    probability ``1 - probability`` the box is empty (no mixing). Computed with tensor ops
    only, so a GPU generator needs no host synchronisation.
    """
    device = generator.device
    gate_and_lam = torch.rand(2, generator=generator, device=device)
    centre_row = torch.randint(0, height, (1,), generator=generator, device=device)
    centre_col = torch.randint(0, width, (1,), generator=generator, device=device)
    partners = torch.randperm(batch_size, generator=generator, device=device)
    cut_ratio = torch.sqrt(1.0 - gate_and_lam[1:])
    cut_height = torch.floor(height * cut_ratio).long()
    cut_width = torch.floor(width * cut_ratio).long()
    top = (centre_row - cut_height // 2).clamp(0, height)
    bottom = (centre_row + cut_height // 2).clamp(0, height)
    left = (centre_col - cut_width // 2).clamp(0, width)
    right = (centre_col + cut_width // 2).clamp(0, width)
    applied = gate_and_lam[:1] < probability
    bottom = torch.where(applied, bottom, top)  # an empty box mixes nothing
    return torch.cat([top, bottom, left, right]), partners


def apply_cutmix(images: Tensor, boxes: Tensor, partners: Tensor) -> tuple[Tensor, Tensor]:
    """Paste, in each repeat ``r``, the box ``boxes[r]`` of image ``partners[r, b]`` into image ``b``.

    ``images`` (R, B, C, H, W); ``boxes`` (R, 4) int64 ``(top, bottom, left, right)``;
    ``partners`` (R, B) int64. Returns the mixed images (R, B, C, H, W) and the pasted area
    fractions (R,), the label weight of the partner (see :func:`mix_targets`).
    """
    repeats, _, _, height, width = images.shape
    boxes = boxes.to(images.device)
    partners = partners.to(images.device)
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])  # (R, H)
    in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])  # (R, W)
    inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None, None]  # (R, 1, 1, H, W)
    pasted = images[torch.arange(repeats, device=images.device)[:, None], partners]  # (R, B, C, H, W)
    mixed = torch.where(inside, pasted, images)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])  # (R,) pixels
    return mixed, area.to(images.dtype) / float(height * width)


def mix_targets(targets: Tensor, partners: Tensor, fractions: Tensor) -> Tensor:
    """``(1 - f_r) * targets[r, b] + f_r * targets[r, partners[r, b]]``.

    ``targets`` (R, B, K) probabilities; ``partners`` (R, B); ``fractions`` (R,). Returns (R, B, K).
    """
    repeats = targets.shape[0]
    partner_targets = targets[torch.arange(repeats, device=targets.device)[:, None], partners.to(targets.device)]
    weight = fractions.to(targets.dtype)[:, None, None]
    return (1.0 - weight) * targets + weight * partner_targets


# ----------------------------------------------------------------------------- losses


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``-sum_k targets_k * log_softmax(logits)_k`` per sample: (..., K), (..., K) -> (...).

    Equals ``F.cross_entropy`` for one-hot targets; CutMix targets are area-weighted mixtures.
    """
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Soft-label loss per sample: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    (..., K), (..., K) -> (...). Its gradient w.r.t. the student equals that of the soft
    cross-entropy ``-T^2 sum p_teacher log p_student`` (they differ by the teacher's entropy,
    a constant); ``T^2`` keeps gradient magnitudes comparable across temperatures (Hinton et
    al. 2015). The teacher's logits are only read: each is softmaxed exactly once, and no
    class is overwritten where the teacher is wrong.
    """
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature * temperature * (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainingBatch:
    """One augmented mini-batch for R repeats."""

    images: Tensor  # (R, B, C, H, W) float
    labels: Tensor  # (R, B) int64
    partners: Tensor | None = None  # (R, B) CutMix partners; None: no CutMix configured
    fractions: Tensor | None = None  # (R,) pasted area fraction per repeat

    def targets(self, num_classes: int) -> Tensor:
        """(R, B, K) label distributions: one-hot, mixed by area where CutMix pasted a box."""
        one_hot = F.one_hot(self.labels, num_classes).to(self.images.dtype)
        if self.partners is None or self.fractions is None:
            return one_hot
        return mix_targets(one_hot, self.partners, self.fractions)


def augmented_batch(
    images: Tensor,
    labels: Tensor,
    picks: Tensor,
    settings: TrainSettings,
    generators: Sequence[torch.Generator],
) -> TrainingBatch:
    """Gather and augment the images ``picks`` (R, B) of (N, C, H, W) ``images`` / (N,) ``labels``.

    Repeat ``r`` draws, from ``generators[r]`` and in this order: crop boxes, DSA parameters,
    CutMix; each only when configured. The draws are small; the image work runs once over
    all R * B images.
    """
    repeats, size = picks.shape
    batch = as_float_images(images[picks])  # (R, B, C, H, W)
    _, _, channels, height, width = batch.shape
    crops, dsa_draws, cut_boxes, cut_partners = [], [], [], []
    for generator in generators:
        if settings.random_resized_crop:
            crops.append(sample_resized_crops(size, settings.rrc_min_scale, generator))
        if settings.dsa_strategy:
            dsa_draws.append(
                augment.sample_params(settings.dsa_strategy, size, width, generator, allow_flip=settings.allow_flip)
            )
        if settings.cutmix_prob > 0.0:
            box, partners = sample_cutmix(size, height, width, settings.cutmix_prob, generator)
            cut_boxes.append(box)
            cut_partners.append(partners)
    flat = batch.reshape(repeats * size, channels, height, width)
    if crops:
        flat = apply_resized_crops(flat, torch.cat(crops))
    if dsa_draws and dsa_draws[0]:
        params = {key: torch.cat([draw[key] for draw in dsa_draws]).to(flat.device) for key in dsa_draws[0]}
        flat = augment.apply_params(flat, torch.arange(repeats * size, device=flat.device), params)
    batch = flat.reshape(repeats, size, channels, height, width)
    picked_labels = labels[picks]
    if not cut_boxes:
        return TrainingBatch(batch, picked_labels)
    partners = torch.stack(cut_partners).to(batch.device)
    batch, fractions = apply_cutmix(batch, torch.stack(cut_boxes), partners)
    return TrainingBatch(batch, picked_labels, partners, fractions)


def per_sample_loss(
    logits: Tensor, batch: TrainingBatch, teacher: nn.Module | None, temperature: float
) -> Tensor:
    """(R, B, K) student logits -> (R, B) losses: the distillation KL against ``teacher`` on
    ``batch.images`` when given (hard and CutMix labels are then unused), else cross-entropy
    against the (possibly CutMix-mixed) labels."""
    repeats, size, num_classes = logits.shape
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(batch.images.flatten(0, 1)).reshape(repeats, size, -1)
        return distillation_kl(logits, teacher_logits, temperature)
    if batch.partners is not None:
        return soft_target_cross_entropy(logits, batch.targets(num_classes))
    return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none").reshape(repeats, size)


RepeatLogits = Callable[[Tensor], Tensor]  # (R, B, C, H, W) -> (R, B, K)


def _fit(
    repeat_logits: RepeatLogits,
    parameters: list[Tensor],
    images: Tensor,
    labels: Tensor,
    settings: TrainSettings,
    generators: Sequence[torch.Generator],
    teacher: nn.Module | None,
    on_epoch: Callable[[int, list[float]], None] | None,
) -> None:
    """The training loop shared by one network and R stacked ones."""
    if teacher is not None:
        teacher.eval()
    optimizer = make_optimizer(parameters, settings)
    num = images.shape[0]
    for epoch in range(settings.epochs):
        factor = lr_factor(settings.schedule, epoch, settings.epochs)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor
        orders = torch.stack(
            [torch.randperm(num, generator=g, device=g.device).to(images.device) for g in generators]
        )  # (R, N)
        totals = torch.zeros(len(generators), device=images.device)
        batches = 0
        for start in range(0, num, settings.batch_size):
            picks = orders[:, start : start + settings.batch_size]  # (R, B)
            batch = augmented_batch(images, labels, picks, settings, generators)
            losses = per_sample_loss(repeat_logits(batch.images), batch, teacher, settings.temperature).mean(dim=1)
            # Repeats share no parameter, so the gradient of the sum gives each repeat
            # exactly the gradient of its own mean loss.
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            totals += losses.detach()
            batches += 1
        if on_epoch is not None:
            on_epoch(epoch, (totals / max(batches, 1)).tolist())


def train_classifier(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
    on_epoch: Callable[[int, float], None] | None = None,
    *,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """Train ``net`` in place on (N, C, H, W) images with hard labels (N,); returns it in eval mode.

    With ``teacher`` (put in eval mode, never trained) the loss is :func:`distillation_kl` at
    ``settings.temperature`` against the teacher's logits on the same augmented batch.
    ``on_epoch(epoch, mean_loss)`` is called after every epoch.
    """
    net.train()
    callback = None if on_epoch is None else (lambda epoch, losses: on_epoch(epoch, losses[0]))
    _fit(lambda batch: net(batch[0]).unsqueeze(0), list(net.parameters()), images, labels, settings,
         [generator], teacher, callback)
    net.eval()
    return net


def can_stack(net: nn.Module) -> bool:
    """Whether copies of ``net`` can train together under ``vmap``: no batch norm (its
    training forward mixes the batch and updates running statistics in place) and no
    dropout (global RNG)."""
    return not any(isinstance(module, UNSTACKABLE_MODULES) for module in net.modules())


class StackedNetworks:
    """R networks of one architecture as stacked parameters ``(R, ...)``, run with one
    vmapped ``functional_call``. Build with copies that :func:`can_stack`."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        if not nets:
            raise ConfigError("stacking needs at least one network")
        blocked = [type(m).__name__ for net in nets for m in net.modules() if isinstance(m, UNSTACKABLE_MODULES)]
        if blocked:
            raise ConfigError(f"cannot stack networks holding {blocked[0]}; train them one by one")
        self.count = len(nets)
        # Detached leaf copies (R, ...) that require grad: the optimizer's parameters.
        self.params, self.buffers = torch.func.stack_module_state(list(nets))
        self.template = copy.deepcopy(nets[0]).to("meta").train()

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def _one(self, params: dict[str, Tensor], buffers: dict[str, Tensor], images: Tensor) -> Tensor:
        return torch.func.functional_call(self.template, (params, buffers), (images,))

    def logits(self, images: Tensor) -> Tensor:
        """Per-repeat batches (R, B, C, H, W) -> logits (R, B, K)."""
        return torch.func.vmap(self._one)(self.params, self.buffers, images)

    def shared_logits(self, images: Tensor) -> Tensor:
        """One batch for all repeats (N, C, H, W) -> logits (R, N, K)."""
        return torch.func.vmap(self._one, in_dims=(0, 0, None))(self.params, self.buffers, images)

    @torch.no_grad()
    def accuracies(self, images: Tensor, labels: Tensor, batch_size: int = 1024) -> list[float]:
        """Top-1 accuracy in [0, 1] of every repeat on (N, C, H, W) images, (N,) labels."""
        chunk = max(1, batch_size // self.count)  # bounds the activations of R copies at once
        correct = torch.zeros(self.count, dtype=torch.long, device=labels.device)
        for start in range(0, images.shape[0], chunk):
            logits = self.shared_logits(as_float_images(images[start : start + chunk]))  # (R, n, K)
            correct += (logits.argmax(dim=-1) == labels[start : start + chunk]).sum(dim=1).to(correct.device)
        return (correct.double() / max(images.shape[0], 1)).tolist()

    @torch.no_grad()
    def write_back(self, nets: Sequence[nn.Module]) -> None:
        """Copy repeat ``r``'s parameters and buffers into ``nets[r]``."""
        for r, net in enumerate(nets):
            for name, tensor in net.named_parameters():
                tensor.copy_(self.params[name][r])
            for name, tensor in net.named_buffers():
                tensor.copy_(self.buffers[name][r])


def train_stacked(
    stacked: StackedNetworks,
    images: Tensor,
    labels: Tensor,
    settings: TrainSettings,
    generators: Sequence[torch.Generator],
    *,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[int, list[float]], None] | None = None,
) -> StackedNetworks:
    """Train R stacked networks together on (N, C, H, W) images / (N,) labels; repeat ``r``
    draws its data order and augmentation from ``generators[r]`` exactly as
    :func:`train_classifier` would. ``on_epoch(epoch, mean_losses)`` gets one loss per repeat."""
    if len(generators) != stacked.count:
        raise ConfigError(f"need one generator per stacked network: {len(generators)} for {stacked.count}")
    _fit(stacked.logits, stacked.parameters(), images, labels, settings, generators, teacher, on_epoch)
    return stacked


def train_classifiers_batched(
    nets: Sequence[nn.Module],
    images: Tensor,
    labels: Tensor,
    settings: TrainSettings,
    generators: Sequence[torch.Generator],
    *,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[int, list[float]], None] | None = None,
) -> list[nn.Module]:
    """:func:`train_stacked` on copies of ``nets``, written back into them; returns them in
    eval mode. Same result, per network, as :func:`train_classifier` with ``generators[r]``."""
    stacked = StackedNetworks(nets)
    train_stacked(stacked, images, labels, settings, generators, teacher=teacher, on_epoch=on_epoch)
    stacked.write_back(nets)
    for net in nets:
        net.eval()
    return list(nets)


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
