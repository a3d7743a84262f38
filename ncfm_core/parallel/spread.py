"""Work spread over the ranks outside a distillation's classes: the pool's members and an
evaluation's repeats, each with its follower (the other ranks' part of the order)."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncfm_core import store as store_lib
from ncfm_core.data import ImageDataset
from ncfm_core.evaluate import EpochCallback, EvalConfig, EvalResult, ImageEvaluator, evaluate_images
from ncfm_core.parallel.context import (
    DistContext,
    all_gather,
    broadcast_object,
    contiguous_block,
    current,
)
from ncfm_core.parallel.protocol import (
    _order_dataset,
    _order_device,
    _order_done,
    _send_order,
    follower,
)
from ncfm_core.pool import Pool, PoolProgress, PoolSpec, load_or_train_pool, train_pool

# ----------------------------------------------------------------------------- pool


def distributed_load_or_train_pool(
    spec: PoolSpec,
    dataset: ImageDataset,
    device: torch.device | str,
    cache_dir: Path | None = None,
    on_progress: PoolProgress | None = None,
) -> tuple[Pool, bool]:
    """:func:`ncfm_core.pool.load_or_train_pool` over the ranks: rank 0 decides (cache or not);
    a cached pool is read by rank 0 and broadcast; otherwise member ``i`` trains on rank
    ``i % K``, the members are all-gathered and rank 0 writes the cache. Every rank returns the
    whole pool on ``device`` and whether it came from the cache."""
    ctx = current()
    if not ctx.distributed:
        return load_or_train_pool(spec, dataset, device, cache_dir=cache_dir, on_progress=on_progress)
    path = None if cache_dir is None else Path(cache_dir) / store_lib.POOL_FILE
    cached = broadcast_object(ctx, bool(ctx.is_main and path is not None and path.exists()))
    if cached:
        pool = Pool.load(path, spec, device="cpu") if ctx.is_main else None
        pool = broadcast_object(ctx, pool)
        return pool.to(device), True
    mine = list(range(ctx.rank, spec.size, ctx.world_size))
    share = train_pool(spec, dataset, device, on_progress, members=mine).to("cpu")
    shares = all_gather(ctx, (mine, share.init_states, share.trained_states, share.test_accuracy))
    by_member: dict[int, tuple[dict, dict, float]] = {}
    for members, inits, traineds, accuracies in shares:
        by_member.update({m: (i, t, a) for m, i, t, a in zip(members, inits, traineds, accuracies)})
    order = range(spec.size)
    pool = Pool(spec, [by_member[m][0] for m in order], [by_member[m][1] for m in order],
                [by_member[m][2] for m in order])
    if ctx.is_main and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pool.save(path)
    return pool.to(device), False


def job_pool(
    spec: PoolSpec,
    dataset: ImageDataset,
    device: torch.device | str,
    cache_dir: Path | None = None,
    on_progress: PoolProgress | None = None,
) -> tuple[Pool, bool]:
    """A pool a job needs outside a distillation (the soft-label teacher of ``ncfm eval``):
    :func:`ncfm_core.pool.load_or_train_pool` in one process; under torchrun rank 0 orders
    the other ranks to train their members with it (:func:`distributed_load_or_train_pool`)."""
    _send_order("pool", {"spec": spec, "device_type": torch.device(device).type}, dataset)
    found = distributed_load_or_train_pool(spec, dataset, device, cache_dir=cache_dir, on_progress=on_progress)
    _order_done()
    return found


@follower("pool")
def _follow_pool(ctx: DistContext, order: dict[str, Any], device: torch.device) -> None:
    distributed_load_or_train_pool(order["spec"], _order_dataset(order), _order_device(ctx, order, device))


# ----------------------------------------------------------------------------- evaluation


def evaluate_images_distributed(
    images: Tensor,
    labels: Tensor,
    dataset: ImageDataset,
    config: EvalConfig,
    device: torch.device | str,
    ctx: DistContext | None = None,
    on_repeat: Callable[[int, float], None] | None = None,
    *,
    teacher: torch.nn.Module | None = None,
    on_epoch: EpochCallback | None = None,
) -> EvalResult:
    """:func:`ncfm_core.evaluate.evaluate_images` with the repeats spread over the ranks (every
    rank calls it): rank r trains its block :func:`~ncfm_core.parallel.contiguous_block` of the
    repeats (repeat i still seeded with ``config.seed + i``) and the accuracies are
    all-gathered, so every rank returns what one process training all the repeats returns
    (exactly, with sequential training; batched training agrees up to rounding).
    ``on_repeat(i, accuracy)``: this rank's repeats as they finish, the others' after the
    gather. ``on_epoch``: this rank's repeats' epochs."""
    ctx = ctx or current()
    started = time.perf_counter()
    mine = contiguous_block(config.repeats, ctx.world_size, ctx.rank)
    found: dict[int, tuple[float, float | None]] = {}
    training: str | None = None
    if len(mine):
        block = dataclasses.replace(config, seed=config.seed + mine.start, repeats=len(mine))
        report = None if on_repeat is None else (lambda i, accuracy: on_repeat(mine.start + i, accuracy))
        epochs = None if on_epoch is None else (
            lambda block_repeats, e, loss, s: on_epoch(range(mine.start + block_repeats.start,
                                                             mine.start + block_repeats.stop), e, loss, s))
        result = evaluate_images(images, labels, dataset, block, device, report, teacher=teacher, on_epoch=epochs)
        best = result.best_over_epochs or [None] * len(mine)
        found = {mine.start + i: (run, best[i]) for i, run in enumerate(result.runs)}
        training = result.training
    merged: dict[int, tuple[float, float | None]] = {}
    trainings: set[str] = set()
    for part, how in all_gather(ctx, (found, training)):
        merged.update(part)
        trainings.update([how] if how else [])
    if on_repeat is not None:
        for repeat in sorted(set(merged) - set(found)):
            on_repeat(repeat, merged[repeat][0])
    order = range(config.repeats)
    return EvalResult(
        runs=[merged[r][0] for r in order],
        seconds=time.perf_counter() - started,
        protocol=config.to_dict(),
        seeds=[config.seed + r for r in order],
        training=trainings.pop() if len(trainings) == 1 else "mixed",
        best_over_epochs=[merged[r][1] for r in order] if config.best_over_epochs else None,  # type: ignore[misc]
        train_set={"kind": "images", "size": int(images.shape[0])},
    )


def job_evaluator() -> ImageEvaluator:
    """The ``evaluator`` a job passes to ``ncfm_core.evaluate``: :func:`evaluate_images` in one
    process; under torchrun, on rank 0, one that orders the other ranks to join and spreads the
    repeats with :func:`evaluate_images_distributed`."""
    ctx = current()
    if not (ctx.distributed and ctx.is_main):
        return evaluate_images

    def spread(images: Tensor, labels: Tensor, dataset: ImageDataset, config: EvalConfig,
               device: torch.device | str, on_repeat: Callable[[int, float], None] | None = None, *,
               teacher: torch.nn.Module | None = None, on_epoch: EpochCallback | None = None) -> EvalResult:
        cpu_teacher = None if teacher is None else copy.deepcopy(teacher).to("cpu")
        # The full baseline trains on the dataset's own training set, which the followers hold.
        whole = images is dataset.train_images and labels is dataset.train_labels
        _send_order("eval", {"images": None if whole else images.detach().cpu(),
                             "labels": None if whole else labels.cpu(), "config": config.to_dict(),
                             "device_type": torch.device(device).type, "teacher": cpu_teacher}, dataset)
        result = evaluate_images_distributed(images, labels, dataset, config, device, ctx, on_repeat,
                                             teacher=teacher, on_epoch=on_epoch)
        _order_done()
        return result

    return spread


@follower("eval")
def _follow_evaluation(ctx: DistContext, order: dict[str, Any], device: torch.device) -> None:
    dataset = _order_dataset(order)
    images, labels = order["images"], order["labels"]
    if images is None:  # the whole training set (the full baseline)
        images, labels = dataset.train_images, dataset.train_labels
    evaluate_images_distributed(images, labels, dataset, EvalConfig.from_dict(order["config"]),
                                _order_device(ctx, order, device), ctx, teacher=order["teacher"])
