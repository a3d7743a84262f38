"""Train-from-scratch evaluation of a synthetic set, of real baselines, across architectures.

A fresh network is trained on the (decoded) synthetic images under a named protocol and
tested on the real test set; ``repeats`` networks, repeat ``r`` seeded with ``seed + r``.
We report the FINAL-epoch accuracy. The authors report the best test accuracy over epochs,
which selects the model on the test set; ``best_over_epochs=True`` records that figure too,
under its own name (``best_over_epochs_test_acc``), never in place of the final one.

Repeats are independent networks, so they train together: their parameters are stacked
(``torch.func.stack_module_state``) and one vmapped forward runs all R of them on their own
batches, each repeat keeping its own data order and augmentation draws (see
``ncfm_core.train``). Networks with batch norm or dropout cannot be vmapped and train one
after another; the result is the same either way, up to float rounding. ``repeat_mode="auto"``
stacks on CUDA only: on CPU the stacked path was measured slower (benchmarks/eval_speed.py).

Baselines (same protocol, same test set) give the fair metrics of ``ncfm_core.metrics``:
a seeded random real subset of the same IPC (IOR) and the whole training set (HLR).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ncfm_core import augment
from ncfm_core.config import MAX_LR, check_range, check_seed, check_weight_decay, option_name
from ncfm_core.data import ImageDataset, check_ipc
from ncfm_core.data.registry import dataset_eval_protocol
from ncfm_core.errors import ConfigError
from ncfm_core.models import create_network, supported_options
from ncfm_core.synset import decode_synset, sample_per_class
from ncfm_core.train import (
    StackedNetworks,
    TrainSettings,
    accuracy,
    can_stack,
    train_classifier,
    train_stacked,
)

if TYPE_CHECKING:
    from ncfm_core.pool import Pool

REPEAT_MODES = ("auto", "batched", "sequential")
MAX_REPEATS = 1000
"""The most networks one evaluation trains: each is built and kept up front (and trained for
every epoch), so far more is a typo that would exhaust memory, not a protocol."""
MAX_TEMPERATURE = 100.0
"""The largest soft-label temperature: beyond it the teacher's targets are uniform to float
precision, and T^2 scales the loss towards overflow."""

EVAL_FLAGS = {
    "model": "--model", "epochs": "--epochs", "lr": "--lr", "optimizer": "--optimizer",
    "weight_decay": "--weight-decay", "momentum": "--momentum", "batch_size": "--batch-size",
    "repeats": "--repeats", "seed": "--seed", "width": "--width", "protocol": "--protocol",
    "cutmix_prob": "--cutmix-prob", "random_resized_crop": "--rrc", "soft_labels": "--soft-labels",
    "temperature": "--temperature", "teacher_member": "--teacher-member", "best_over_epochs": "--best-over-epochs",
    "repeat_mode": "--repeat-mode",
}
"""The ``ncfm eval`` option of each :class:`EvalConfig` field that has one."""


def eval_option_name(field: str) -> str:
    """``field (--flag)`` for an evaluation setting (:func:`ncfm_core.config.option_name`)."""
    return option_name(field, EVAL_FLAGS)

# Bump when a change to training or evaluation code changes results, so cached baselines
# computed by older code stop matching.
EVAL_CODE_VERSION = 1

# The NCFM authors' evaluation (their configs: AdamW lr 1e-3, weight decay 0.01, batch 128 to 256,
# x0.5 at every fifth, DSA, CutMix p=0.5 with Beta(1, 1), random resized crop with scale (0.5, 1)).
# They train up to 2000 epochs (4000 in some configs); 300 keeps a CPU run short, override
# ``epochs`` to match them.
_NCFM_KNOBS: dict[str, Any] = {
    "epochs": 300,
    "lr": 0.001,
    "optimizer": "adamw",
    "weight_decay": 0.01,
    "momentum": 0.9,
    "batch_size": 128,
    "schedule": "step_half",
    "dsa_strategy": augment.EVAL_STRATEGY,
    "cutmix_prob": 0.5,
    "random_resized_crop": True,
    "rrc_min_scale": 0.5,
}

# The knobs each named protocol sets; everything else keeps the EvalConfig default.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "ncfm": _NCFM_KNOBS,
    # The classic DC / DSA / DM protocol: SGD lr 0.01, momentum 0.9, weight decay 5e-4,
    # x0.1 at half, DSA, batch 256. The papers train 1000 epochs; 300 by default here for
    # speed, override ``epochs`` to match them.
    "dsa": {
        "epochs": 300,
        "lr": 0.01,
        "optimizer": "sgd",
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "batch_size": 256,
        "schedule": "half_tenth",
        "dsa_strategy": augment.EVAL_STRATEGY,
        "cutmix_prob": 0.0,
        "random_resized_crop": False,
        "rrc_min_scale": 0.5,
    },
    # A verdict in seconds on a CPU, for small datasets (the default of digits and mnist5k): the
    # ncfm protocol's optimiser, schedule and DSA on a ConvNet of width 64 for 100 epochs, without
    # CutMix and random resized crop (heavier augmentation needs more epochs to pay off). On digits
    # (docs/evaluation.md) it puts IPC 1 at ~92 % against 63-71 % for random real subsets, with a
    # spread over repeats under 2.5 points, at about a sixth of ncfm's CPU time.
    "quick": {**_NCFM_KNOBS, "epochs": 100, "cutmix_prob": 0.0, "random_resized_crop": False, "width": 64},
}


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol: how each fresh network is trained and what is recorded.

    The defaults are the ``ncfm`` protocol (see :data:`PROTOCOLS`); build named protocols
    with :func:`protocol_config`. :meth:`to_dict` is the effective protocol recorded with
    every result.
    """

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
    seed: int = 0  # repeat r: weight init, data order and augmentation from seed + r
    depth: int | None = None  # ConvNet only; None: by resolution
    width: int = 128  # ConvNet only
    protocol: str = "ncfm"  # the named protocol these knobs started from
    cutmix_prob: float = 0.5  # probability that a batch gets CutMix (labels mixed by area)
    random_resized_crop: bool = True
    rrc_min_scale: float = 0.5  # crop area fraction drawn from U(rrc_min_scale, 1)
    # Soft labels: the loss is T^2 * KL(softmax(teacher / T) || softmax(student / T)) against
    # a trained pool member (``teacher_member``) run on the same augmented batch.
    soft_labels: bool = False
    temperature: float = 1.0
    teacher_member: int = 0
    # Also record the best test accuracy over epochs (test-set model selection; never the
    # reported figure). Costs one test pass per epoch.
    best_over_epochs: bool = False
    # How the repeats train (the numbers agree to float rounding): batched stacks them under
    # vmap (an error for batch norm / dropout networks); sequential trains one after another;
    # auto stacks on CUDA when the network allows it, else sequential.
    repeat_mode: str = "auto"

    def __post_init__(self) -> None:
        """Every range check on an evaluation request, before any work (``ConfigError`` naming
        the setting as ``field (--flag)``, :func:`ncfm_core.config.option_name`)."""
        name = eval_option_name
        for setting, low in (("repeats", 1), ("epochs", 0), ("batch_size", 1), ("width", 1), ("teacher_member", 0)):
            check_range(name(setting), getattr(self, setting), low, integer=True)
        if self.repeats > MAX_REPEATS:
            raise ConfigError(f"{name('repeats')} {self.repeats} is more than {MAX_REPEATS}: each repeat trains "
                              "and keeps a whole network")
        if self.depth is not None:
            check_range(name("depth"), self.depth, 1, integer=True)
        check_seed(name("seed"), self.seed)
        check_range(name("lr"), self.lr, 0, MAX_LR, low_open=True)
        check_weight_decay(name("weight_decay"), self.weight_decay, name("lr"), self.lr)
        check_range(name("momentum"), self.momentum, 0, 1, high_open=True)
        check_range(name("cutmix_prob"), self.cutmix_prob, 0, 1)
        check_range(name("rrc_min_scale"), self.rrc_min_scale, 0, 1, low_open=True)
        check_range(name("temperature"), self.temperature, 0, MAX_TEMPERATURE, low_open=True)
        if not self.soft_labels and (self.temperature != 1.0 or self.teacher_member != 0):
            raise ConfigError(f"{name('temperature')} and {name('teacher_member')} only apply with soft labels; "
                              f"set {name('soft_labels')}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown {name('protocol')} {self.protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        if self.repeat_mode not in REPEAT_MODES:
            raise ConfigError(f"unknown {name('repeat_mode')} {self.repeat_mode!r}; choose one of: "
                              f"{', '.join(REPEAT_MODES)}")
        self.train_settings(True)  # validates optimizer and schedule

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready: the effective protocol recorded with results."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown evaluation setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**values)

    def overrides(self) -> dict[str, Any]:
        """The knobs of the named protocol that this config changes: ``{name: value}``."""
        preset = PROTOCOLS[self.protocol]
        return {key: getattr(self, key) for key, value in preset.items() if getattr(self, key) != value}

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
            cutmix_prob=self.cutmix_prob,
            random_resized_crop=self.random_resized_crop,
            rrc_min_scale=self.rrc_min_scale,
            temperature=self.temperature,
        )


def protocol_names() -> list[str]:
    return list(PROTOCOLS)


def default_protocol(dataset: str) -> str:
    """The protocol a dataset's results get unless one is asked for: the one it registered
    (``quick`` for the small offline datasets, digits and mnist5k), else ``ncfm``."""
    return dataset_eval_protocol(dataset)


def protocol_config(name: str, **overrides: Any) -> EvalConfig:
    """The named protocol (``ncfm``, ``dsa`` or ``quick``, see :data:`PROTOCOLS`) with
    ``overrides`` applied on top (any :class:`EvalConfig` field; ``None`` values mean "not given").

    ``ncfm``: the authors' AdamW lr 1e-3, batch 128, x0.5 at 1/5..4/5, DSA, CutMix p=0.5,
    random resized crop; 300 epochs by default (the authors use up to 2000).
    ``dsa``: DC/DSA/DM's SGD lr 0.01 momentum 0.9 wd 5e-4, x0.1 at half, DSA, batch 256;
    300 epochs by default (the papers use 1000).
    ``quick``: ``ncfm``'s optimiser, schedule and DSA, without CutMix and random resized crop, on a
    ConvNet of width 64 for 100 epochs: a verdict in seconds on a CPU for small datasets.
    """
    key = name.strip().lower()
    if key not in PROTOCOLS:
        raise ConfigError(f"unknown {eval_option_name('protocol')} {name!r}; choose one of: {', '.join(PROTOCOLS)}")
    known = {f.name for f in dataclasses.fields(EvalConfig)} - {"protocol"}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown evaluation setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    for setting in ("optimizer", "repeat_mode"):  # names as people type them: " SGD" is sgd
        if isinstance(given.get(setting), str):
            given[setting] = given[setting].strip().lower()
    if not given.get("soft_labels") and ("temperature" in given or "teacher_member" in given):
        # given at all (even at its default value): it would silently do nothing
        raise ConfigError(f"{eval_option_name('temperature')} and {eval_option_name('teacher_member')} only apply "
                          f"with soft labels; set {eval_option_name('soft_labels')}")
    return EvalConfig(**{**PROTOCOLS[key], **given, "protocol": key})


@dataclass
class EvalResult:
    """The outcome of ``repeats`` trainings under one protocol. Accuracies are fractions in [0, 1]."""

    runs: list[float]  # final-epoch test accuracy of each repeat
    seconds: float
    protocol: dict[str, Any]
    seeds: list[int] = field(default_factory=list)  # repeat r used seed + r
    training: str = "sequential"  # how the repeats were trained: batched | sequential
    # Best test accuracy over epochs per repeat: model selection ON THE TEST SET, recorded only
    # with EvalConfig.best_over_epochs, never the reported accuracy.
    best_over_epochs: list[float] | None = None
    train_set: dict[str, Any] = field(default_factory=dict)  # what the networks were trained on

    @property
    def mean(self) -> float:
        return statistics.fmean(self.runs)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.runs) if len(self.runs) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "mean": self.mean,
            "std": self.std,
            "runs": list(self.runs),
            "seconds": self.seconds,
            "seeds": list(self.seeds),
            "training": self.training,
            "train_set": dict(self.train_set),
            "protocol": dict(self.protocol),
        }
        if self.best_over_epochs is not None:
            record["best_over_epochs_test_acc"] = {
                "mean": statistics.fmean(self.best_over_epochs),
                "runs": list(self.best_over_epochs),
                "note": "best test accuracy over epochs: selected on the test set, not the reported accuracy",
            }
        return record


def build_eval_network(config: EvalConfig, dataset: ImageDataset) -> torch.nn.Module:
    """A fresh ``config.model`` for ``dataset`` (global-RNG init: callers fork and seed it)."""
    kwargs = supported_options(config.model, depth=config.depth, width=config.width)
    return create_network(
        config.model,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        image_size=dataset.image_size,
        mean=dataset.mean,
        std=dataset.std,
        **kwargs,
    )


def teacher_from_pool(pool: Pool, member: int, device: torch.device | str) -> nn.Module:
    """The trained weights of pool member ``member`` as a network in eval mode on ``device``."""
    if not 0 <= member < len(pool):
        raise ConfigError(f"teacher member {member} is not in the pool of {len(pool)}; use 0..{len(pool) - 1}")
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the global RNG untouched
        net = pool.spec.build()
    pool.load_trained_into(net, member)
    return net.to(device).eval()


def _check_teacher(config: EvalConfig, teacher: nn.Module | None) -> None:
    if config.soft_labels and teacher is None:
        raise ConfigError("soft labels need a teacher network: pass a trained pool member (see teacher_from_pool)")
    if teacher is not None and not config.soft_labels:
        raise ConfigError("a teacher was given but the protocol has soft_labels off; set soft_labels=True")


EpochCallback = Callable[[range, int, float, float], None]
"""``on_epoch(repeats, epoch, loss, seconds)``, after every training epoch: the repeats that
trained in it (``range(r, r + 1)`` one after another; every repeat when they train together),
the epoch (from 0), their mean training loss and the epoch's wall time (the first one includes
building the network). Progress only: it never changes what is computed."""


def evaluate_images(
    images: Tensor,
    labels: Tensor,
    dataset: ImageDataset,
    config: EvalConfig,
    device: torch.device | str,
    on_repeat: Callable[[int, float], None] | None = None,
    *,
    teacher: nn.Module | None = None,
    on_epoch: EpochCallback | None = None,
) -> EvalResult:
    """Train ``config.repeats`` fresh networks on (N, C, H, W) images with (N,) labels and test
    each on the real test set. Returns the final-epoch accuracies.

    Repeat ``r`` seeds its weight init (global RNG, forked and restored) and its generator
    (data order, augmentation) with ``config.seed + r``. With ``config.soft_labels``,
    ``teacher`` (a trained network for the same dataset, e.g. :func:`teacher_from_pool`)
    supplies the targets. ``on_repeat(r, accuracy)`` is called per repeat (all at the end
    when the repeats train together); ``on_epoch`` (:data:`EpochCallback`) after every epoch.
    """
    _check_teacher(config, teacher)
    started = time.perf_counter()
    images, labels = images.to(device), labels.to(device)
    test_images, test_labels = dataset.test_images.to(device), dataset.test_labels.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval()
    settings = config.train_settings(dataset.allow_flip)
    seeds = [config.seed + r for r in range(config.repeats)]
    nets = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # weight init only; the global RNG is restored afterwards
            nets.append(build_eval_network(config, dataset).to(device))
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    stackable = can_stack(nets[0])
    if config.repeat_mode == "batched" and not stackable:
        raise ConfigError(
            f"{config.model} has batch norm or dropout and cannot train its repeats batched; "
            "use repeat_mode 'auto' or 'sequential'"
        )
    # auto stacks only on CUDA, where R small networks are expected to be bound by kernel
    # launches (not measured yet); on a 2-core CPU the stacked path measured slower: grouped
    # convolutions and vmapped group norm cost more than they save (docs/benchmarks/eval_speed.md).
    auto_batched = config.repeat_mode == "auto" and len(nets) > 1 and torch.device(device).type == "cuda"
    batched = stackable and (config.repeat_mode == "batched" or auto_batched)
    best: list[float] | None = [0.0] * len(nets) if config.best_over_epochs else None

    last_epoch_end = [started]

    def report_epoch(repeats: range, epoch: int, loss: float) -> None:
        if on_epoch is not None:
            now = time.perf_counter()
            on_epoch(repeats, epoch, loss, now - last_epoch_end[0])
            last_epoch_end[0] = now

    if batched:
        stacked = StackedNetworks(nets)

        def track_stacked(epoch: int, losses: list[float]) -> None:
            if best is not None:
                best[:] = [max(b, a) for b, a in zip(best, stacked.accuracies(test_images, test_labels))]
            report_epoch(range(len(nets)), epoch, statistics.fmean(losses))

        train_stacked(stacked, images, labels, settings, generators, teacher=teacher,
                      on_epoch=track_stacked if best is not None or on_epoch is not None else None)
        runs = stacked.accuracies(test_images, test_labels)
        if on_repeat is not None:
            for repeat, run in enumerate(runs):
                on_repeat(repeat, run)
    else:
        runs = []
        for repeat, (net, generator) in enumerate(zip(nets, generators)):

            def track_one(epoch: int, loss: float, net: nn.Module = net, repeat: int = repeat) -> None:
                if best is not None:
                    best[repeat] = max(best[repeat], accuracy(net, test_images, test_labels))
                report_epoch(range(repeat, repeat + 1), epoch, loss)

            train_classifier(net, images, labels, settings, generator,
                             on_epoch=track_one if best is not None or on_epoch is not None else None,
                             teacher=teacher)
            runs.append(accuracy(net, test_images, test_labels))
            if on_repeat is not None:
                on_repeat(repeat, runs[-1])
    if best is not None:
        best = [max(b, r) for b, r in zip(best, runs)]  # epochs=0 has no per-epoch pass
    return EvalResult(
        runs=runs,
        seconds=time.perf_counter() - started,
        protocol=config.to_dict(),
        seeds=seeds,
        training="batched" if batched else "sequential",
        best_over_epochs=best,
        train_set={"kind": "images", "size": int(images.shape[0])},
    )


ImageEvaluator = Callable[..., EvalResult]
"""Anything called like :func:`evaluate_images` ``(images, labels, dataset, config, device,
on_repeat, *, teacher, on_epoch)`` that returns the same result: the functions below take one as
``evaluator`` (default :func:`evaluate_images`); ``ncfm_core.parallel`` passes one that
spreads the repeats over the ranks of a torchrun job."""


def evaluate_synset(
    images: Tensor,
    labels: Tensor,
    factor: int,
    dataset: ImageDataset,
    config: EvalConfig,
    device: torch.device | str,
    on_repeat: Callable[[int, float], None] | None = None,
    *,
    teacher: nn.Module | None = None,
    evaluator: ImageEvaluator | None = None,
    on_epoch: EpochCallback | None = None,
) -> EvalResult:
    """Decode stored multi-formation images (N, C, H, W) with factor ``factor`` (N * factor^2
    training images), then :func:`evaluate_images` (or ``evaluator``, see :data:`ImageEvaluator`)."""
    decoded, decoded_labels = decode_synset(images.float(), labels, factor)
    evaluator = evaluator or evaluate_images
    result = evaluator(decoded.detach(), decoded_labels, dataset, config, device, on_repeat, teacher=teacher,
                       on_epoch=on_epoch)
    result.train_set = {"kind": "synthetic", "stored": int(images.shape[0]), "factor": factor,
                        "size": int(decoded.shape[0])}
    return result


def evaluate_models(
    images: Tensor,
    labels: Tensor,
    dataset: ImageDataset,
    config: EvalConfig,
    device: torch.device | str,
    models: Sequence[str],
    *,
    factor: int = 1,
    teacher: nn.Module | None = None,
    on_repeat: Callable[[str, int, float], None] | None = None,
    evaluator: ImageEvaluator | None = None,
    on_epoch: Callable[[str, range, int, float, float], None] | None = None,
) -> dict[str, EvalResult]:
    """Cross-architecture evaluation: the same protocol with each network in ``models``
    (e.g. ``("convnet", "alexnet", "vgg11", "resnet18")``; repeated names once), on stored
    images decoded with ``factor`` (1: already decoded). Returns ``{model: EvalResult}`` in order.
    ``on_repeat`` and ``on_epoch`` get the model's name first.
    """
    names = list(dict.fromkeys(name.strip().lower() for name in models))
    if not names:
        raise ConfigError("name at least one model to evaluate, e.g. convnet")
    results: dict[str, EvalResult] = {}
    for name in names:
        model_config = dataclasses.replace(config, model=name)
        callback = None if on_repeat is None else (lambda r, acc, name=name: on_repeat(name, r, acc))
        epochs = None if on_epoch is None else (lambda r, e, loss, s, name=name: on_epoch(name, r, e, loss, s))
        results[name] = evaluate_synset(images, labels, factor, dataset, model_config, device, callback,
                                        teacher=teacher, evaluator=evaluator, on_epoch=epochs)
    return results


def random_real_subset(dataset: ImageDataset, ipc: int, seed: int) -> tuple[Tensor, Tensor]:
    """``ipc`` random real training images per class (uint8) and their labels, seeded."""
    generator = torch.Generator().manual_seed(seed)
    picks = sample_per_class(dataset.class_indices(), ipc, generator).reshape(-1)
    return dataset.train_images[picks], dataset.train_labels[picks]


def evaluate_random_baseline(
    dataset: ImageDataset,
    ipc: int,
    config: EvalConfig,
    device: torch.device | str,
    seed: int,
    *,
    teacher: nn.Module | None = None,
    on_repeat: Callable[[int, float], None] | None = None,
    evaluator: ImageEvaluator | None = None,
    on_epoch: EpochCallback | None = None,
) -> EvalResult:
    """The same protocol on ``ipc`` random real images per class (the subset drawn with
    ``seed``): the reference of IOR. Use the synthetic set's stored IPC, the same storage
    budget (multi-formation decodes it into factor^2 times more training images)."""
    check_ipc(dataset, ipc)
    images, labels = random_real_subset(dataset, ipc, seed)
    evaluator = evaluator or evaluate_images
    result = evaluator(images, labels, dataset, config, device, on_repeat, teacher=teacher, on_epoch=on_epoch)
    result.train_set = {"kind": "random", "ipc": ipc, "subset_seed": seed, "size": int(images.shape[0])}
    return result


def evaluate_full_baseline(
    dataset: ImageDataset,
    config: EvalConfig,
    device: torch.device | str,
    *,
    teacher: nn.Module | None = None,
    on_repeat: Callable[[int, float], None] | None = None,
    evaluator: ImageEvaluator | None = None,
    on_epoch: EpochCallback | None = None,
) -> EvalResult:
    """The same protocol on the whole training set: the reference of HLR. Expensive (every
    epoch passes over all training images); cache it under :func:`baseline_cache_key`."""
    evaluator = evaluator or evaluate_images
    result = evaluator(dataset.train_images, dataset.train_labels, dataset, config, device, on_repeat,
                       teacher=teacher, on_epoch=on_epoch)
    result.train_set = {"kind": "full", "size": int(dataset.train_images.shape[0])}
    return result


# Fields that change how fast a result is computed, not what it is.
_EXECUTION_ONLY = ("repeat_mode",)


def baseline_cache_key(dataset_fingerprint: str, protocol: dict[str, Any], model: str) -> str:
    """A stable key for a cached full-data baseline: ``full-<model>-<24 hex>`` from the dataset
    fingerprint, the protocol dict (:meth:`EvalConfig.to_dict`, with ``model`` set to
    ``model``; execution-only fields left out) and :data:`EVAL_CODE_VERSION`."""
    content = {k: v for k, v in protocol.items() if k not in _EXECUTION_ONLY}
    content["model"] = model.strip().lower()
    blob = json.dumps(
        {"dataset": dataset_fingerprint, "protocol": content, "code": EVAL_CODE_VERSION},
        sort_keys=True,
        default=str,
    ).encode()
    return f"full-{content['model']}-{hashlib.sha256(blob).hexdigest()[:24]}"
