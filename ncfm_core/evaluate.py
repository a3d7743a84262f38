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

from ncfm_core.data import ImageDataset, check_ipc
from ncfm_core.errors import ConfigError
from ncfm_core.models import create_network, supported_options
from ncfm_core.protocols import (  # noqa: F401  (the protocols, importable from here as before)
    EVAL_CODE_VERSION,
    EVAL_FLAGS,
    MAX_REPEATS,
    MAX_TEMPERATURE,
    PROTOCOLS,
    REPEAT_MODES,
    EvalConfig,
    default_protocol,
    eval_option_name,
    protocol_config,
    protocol_names,
)
from ncfm_core.synset import decode_synset, sample_per_class
from ncfm_core.train import (
    StackedNetworks,
    accuracy,
    can_stack,
    train_classifier,
    train_stacked,
)

if TYPE_CHECKING:
    from ncfm_core.pool import Pool


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
