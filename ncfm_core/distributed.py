"""Several processes under ``torchrun``: class-sharded distillation, a pool trained in parallel,
evaluation repeats spread over ranks. See docs/multi-gpu.md.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE unset or 1 everything here is
a no-op and the jobs run exactly as in one process.

Distillation (rank = one process, K = world size):

- classes are split into K contiguous blocks (:func:`shard_classes`); each rank keeps the
  synthetic images of its block and their optimiser state (``Distiller(classes=...)``);
- every rank draws the same random numbers (same seed, same draws for all classes), so the pool
  member, beta, the DSA parameters and psi's frequencies agree everywhere without messages;
- psi is one network: the frequencies' gradient and the loss totals are summed over ranks
  (``all_reduce``) before psi's optimiser step, so psi, the LR scheduler and the loss curve stay
  identical on every rank;
- rank 0 alone writes the store. At a checkpoint (and at the end) every rank's shard is gathered
  to rank 0, which writes ONE whole-set state, the same format a single process writes (plus
  ``world_size``). Resuming cuts that state by class block, so any world size can resume it.

Evaluation: the repeats are split into contiguous blocks (:func:`repeats_of_rank`), repeat r
seeded with ``seed + r`` wherever it trains, and the accuracies all-gathered
(:func:`evaluate_images_distributed`), so the result is the one-process result.

The job protocol: rank 0 runs the ordinary job (``ncfm_core.jobs``); the other ranks wait in
:func:`ranked_job` for orders from rank 0 (a distillation, an evaluation or a pool to join; see
:func:`send_order`, :func:`job_evaluator`, :func:`job_pool`) and then for its outcome (the
job's result, or the error to raise).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import datetime as _dt
import functools
import inspect
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ncfm_core import errors
from ncfm_core.config import DistillConfig
from ncfm_core.data import ImageDataset
from ncfm_core.distill import Distiller
from ncfm_core.errors import ConfigError, NcfmError
from ncfm_core.evaluate import EvalConfig, EvalResult, ImageEvaluator, evaluate_images
from ncfm_core.pool import Pool, PoolProgress, PoolSpec, load_or_train_pool, train_pool

GROUP_TIMEOUT = _dt.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``backend`` is "cpu:gloo,cuda:nccl", "gloo" or None (one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()
_context: DistContext | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer; unset it or run under torchrun"
        ) from None


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def init_from_env(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), once per process.

    With a CUDA ``device`` the group is "cpu:gloo,cuda:nccl" (NCCL for CUDA tensors, gloo for any
    CPU ones) and this rank uses ``cuda:LOCAL_RANK``; otherwise gloo.
    Returns (context, the device this rank computes on). One process: (:data:`SINGLE`, device).
    """
    global _context
    world_size = env_world_size()
    if world_size <= 1:
        return SINGLE, device
    if _context is None:
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
            atexit.register(_destroy_group)
        _context = DistContext(rank, world_size, local_rank, backend)
    if device.type == "cuda":
        device = torch.device("cuda", _context.local_rank)
    return _context, device


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """After a command's last job succeeded, on every rank: wait for each other (barrier), then
    leave the group. Without the barrier a rank that exits first can close its connections
    while a peer's gloo threads still use them, and that peer aborts ("terminate called
    without an active exception"). Failures skip this (a peer may be gone); the group is then
    left at exit. The rank stays known (:func:`current`), so only rank 0 prints. No-op in one
    process."""
    if _context is not None and _context.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def current() -> DistContext:
    """The context joined by :func:`init_from_env`, :data:`SINGLE` before that or without torchrun."""
    return _context or SINGLE


def shard_classes(num_classes: int, world_size: int, rank: int) -> range:
    """The contiguous block of class ids rank ``rank`` owns: the first ``num_classes % world_size``
    ranks get one class more than the others. Contiguous blocks keep a rank's rows of the
    class-major synthetic set one slice, so gathering is a concatenation in rank order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if num_classes < world_size:
        raise ConfigError(f"{world_size} processes for {num_classes} classes; use at most {num_classes} processes")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(ctx: DistContext, tensor: Tensor) -> None:
    """Sum ``tensor`` in place over the ranks (psi's frequency gradient, the loss totals)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def broadcast_object(ctx: DistContext, value: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (pickled; for orders, states and pools)."""
    if not ctx.distributed:
        return value
    holder = [value if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_to_main(ctx: DistContext, value: Any) -> list[Any] | None:
    """Every rank's ``value`` in rank order on rank 0; None on the other ranks."""
    if not ctx.distributed:
        return [value]
    found: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(value, found, dst=0)
    return found


def all_gather(ctx: DistContext, value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order, on every rank."""
    if not ctx.distributed:
        return [value]
    found: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(found, value)
    return found


def merge_shard_states(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whole-set distiller state from the rank-ordered shard states of contiguous class blocks.

    ``images`` (rows_r, ...) and the image optimiser's per-row moments are concatenated along
    dim 0; everything else is identical on every rank and taken from rank 0.
    """
    first = shards[0]
    merged = dict(first)
    merged["images"] = torch.cat([s["images"] for s in shards])
    moments: dict[Any, dict[str, Any]] = {}
    for key, entry in first["image_optimizer"]["state"].items():
        moments[key] = {}
        for name, value in entry.items():
            rows = first["images"].shape[0]
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows:
                moments[key][name] = torch.cat([s["image_optimizer"]["state"][key][name] for s in shards])
            else:
                moments[key][name] = value
    merged["image_optimizer"] = {**first["image_optimizer"], "state": moments}
    merged["world_size"] = len(shards)
    return merged


# ----------------------------------------------------------------------------- distillation


class ShardedDistiller(Distiller):
    """A :class:`Distiller` of one class block whose :meth:`state_dict` and :meth:`synthetic_set`
    gather every rank's shard to rank 0 (the other ranks get None).

    Every rank must gather at the same iterations: after an iteration that is a multiple of
    ``checkpoint_every`` and below ``target``, and at ``target`` (what ``ncfm_core.jobs`` does);
    asked at another iteration it raises instead of blocking (a failure path's extra checkpoint).
    """

    def __init__(self, config: DistillConfig, dataset: ImageDataset, pool: Pool, device: torch.device,
                 ctx: DistContext, *, target: int, checkpoint_every: int) -> None:
        if config.precision == "fp16":
            raise ConfigError("--precision fp16 is not supported with several processes (each rank's loss scaler "
                              "would skip different steps); use bf16 or fp32")
        classes = shard_classes(dataset.num_classes, ctx.world_size, ctx.rank)
        super().__init__(config, dataset, pool, device, classes=classes,
                         all_reduce=functools.partial(all_reduce_sum, ctx))
        self.ctx = ctx
        self.target = target
        self.checkpoint_every = checkpoint_every
        self._gathered: tuple[int, dict[str, Any] | None, Tensor | None] | None = None

    def is_sync_point(self) -> bool:
        i = self.iteration
        return i == self.target or (i % self.checkpoint_every == 0 and i < self.target)

    def gather(self) -> tuple[dict[str, Any] | None, Tensor | None]:
        """(whole-set state, all labels (C*ipc,)) on rank 0, (None, None) elsewhere; once per
        iteration."""
        if self._gathered is not None and self._gathered[0] == self.iteration:
            return self._gathered[1], self._gathered[2]
        if not self.is_sync_point():
            raise RuntimeError(f"iteration {self.iteration} is not a point where all ranks gather their shards")
        shard = (super().state_dict(), self.labels.cpu())
        shards = gather_to_main(self.ctx, shard)
        state = labels = None
        if shards is not None:
            state = merge_shard_states([s for s, _ in shards])
            labels = torch.cat([lab for _, lab in shards])
        self._gathered = (self.iteration, state, labels)
        if self.iteration == self.target:
            _order_done()
        return state, labels

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state, _ = self.gather()
        return state  # type: ignore[return-value]

    def synthetic_set(self) -> tuple[Tensor, Tensor]:
        state, labels = self.gather()
        if state is None:
            raise RuntimeError("only rank 0 holds the whole synthetic set")
        return state["images"].detach().clone(), labels.clone()


def make_distiller(config: DistillConfig, dataset: ImageDataset, pool: Pool, device: torch.device, *,
                   target: int, checkpoint_every: int) -> Distiller:
    """The job's distiller: a plain :class:`Distiller` in one process, else this rank's
    :class:`ShardedDistiller`."""
    ctx = current()
    if not ctx.distributed:
        return Distiller(config, dataset, pool, device)
    return ShardedDistiller(config, dataset, pool, device, ctx, target=target, checkpoint_every=checkpoint_every)


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
    path = None if cache_dir is None else Path(cache_dir) / "pool.safetensors"
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


# ----------------------------------------------------------------------------- job protocol
#
# Rank 0 runs the job (ncfm_core.jobs). Whenever it needs the other ranks it broadcasts an
# order, ("distill" | "pool" | "eval", payload); they carry it out together with rank 0 (the
# order's own collectives) and come back for the next message. Last comes the outcome,
# ("ok", result) or ("error", class name, message). An order's dataset travels once: the
# followers keep the last one they were sent, so their file systems need not hold it.

_leader: dict[str, Any] = {"busy": False, "dataset": None}
"""Rank 0's view: ``busy`` while the followers are inside an order (its collectives not all
done; they cannot take a message then), ``dataset`` the fingerprint they hold."""
_follower: dict[str, Any] = {"dataset": None}
JobFunction = TypeVar("JobFunction", bound=Callable[..., Any])


def _send_order(kind: str, payload: dict[str, Any], dataset: ImageDataset) -> None:
    """Rank 0: tell the other ranks to join ``kind`` (no-op in one process)."""
    ctx = current()
    if not (ctx.distributed and ctx.is_main):
        return
    fresh = _leader["dataset"] != dataset.fingerprint
    broadcast_object(ctx, (kind, {**payload, "fingerprint": dataset.fingerprint,
                                  "dataset": dataset if fresh else None}))
    _leader.update(busy=True, dataset=dataset.fingerprint)


def _order_done() -> None:
    """Rank 0, after the last collective of an order: the followers wait for a message again."""
    _leader["busy"] = False


def _order_dataset(order: dict[str, Any]) -> ImageDataset:
    if order["dataset"] is not None:
        _follower["dataset"] = order["dataset"]
    dataset = _follower["dataset"]
    if dataset is None or dataset.fingerprint != order["fingerprint"]:
        raise RuntimeError("rank 0 named a dataset this rank was never sent (a job protocol error)")
    return dataset


def _order_device(ctx: DistContext, order: dict[str, Any], device: torch.device) -> torch.device:
    """The device a follower computes an order on: the type rank 0 computes on (random-number
    states belong to a device type), this rank's own GPU."""
    if order["device_type"] == device.type:
        return device
    return torch.device("cuda", ctx.local_rank) if order["device_type"] == "cuda" else torch.device("cpu")


def send_order(config: DistillConfig, dataset: ImageDataset, device: torch.device, *, target: int,
               checkpoint_every: int, state: dict | None) -> None:
    """Rank 0, at the start of a distillation: the other ranks join it (pool, their class
    blocks, the gathers) from ``state`` (None: from scratch). No-op in one process."""
    _send_order("distill", {"config": config.to_dict(), "device_type": device.type, "target": target,
                            "checkpoint_every": checkpoint_every, "state": state}, dataset)


def _follow_distillation(ctx: DistContext, order: dict[str, Any], device: torch.device) -> None:
    """A non-zero rank's part of a distillation: pool, shard, iterations, gathers."""
    device = _order_device(ctx, order, device)
    config = DistillConfig.from_dict(order["config"])
    dataset = _order_dataset(order)
    spec = PoolSpec.from_config(config, dataset)
    pool, _ = distributed_load_or_train_pool(spec, dataset, device)
    distiller = ShardedDistiller(config, dataset, pool, device, ctx, target=order["target"],
                                 checkpoint_every=order["checkpoint_every"])
    if order["state"] is not None:
        distiller.load_state_dict(order["state"])
    while distiller.iteration < distiller.target:
        distiller.step()
        if distiller.is_sync_point() and distiller.iteration < distiller.target:
            distiller.gather()
    distiller.gather()


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


def _follow_pool(ctx: DistContext, order: dict[str, Any], device: torch.device) -> None:
    distributed_load_or_train_pool(order["spec"], _order_dataset(order), _order_device(ctx, order, device))


def _follow_evaluation(ctx: DistContext, order: dict[str, Any], device: torch.device) -> None:
    dataset = _order_dataset(order)
    images, labels = order["images"], order["labels"]
    if images is None:  # the whole training set (the full baseline)
        images, labels = dataset.train_images, dataset.train_labels
    evaluate_images_distributed(images, labels, dataset, EvalConfig.from_dict(order["config"]),
                                _order_device(ctx, order, device), ctx, teacher=order["teacher"])


_FOLLOW: dict[str, Callable[[DistContext, dict[str, Any], torch.device], None]] = {
    "distill": _follow_distillation,
    "pool": _follow_pool,
    "eval": _follow_evaluation,
}


class RankTerminated(NcfmError):
    """torchrun stopped this rank (SIGTERM), usually because another rank failed."""


@contextlib.contextmanager
def _terminate_as_error() -> Iterator[None]:
    """While active, SIGTERM (torchrun stopping the group after a rank failed) raises
    :class:`RankTerminated`, so rank 0's job records the version as failed before exiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        if sys.exc_info()[0] is not None:
            return  # already failing (e.g. a peer's crash reached us first): let the bookkeeping finish
        raise RankTerminated("stopped by torchrun (another rank failed or the job was cancelled); "
                             "continue with `ncfm resume`")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error_class(name: str) -> type[NcfmError]:
    found = getattr(errors, name, None)
    return found if isinstance(found, type) and issubclass(found, NcfmError) else NcfmError


def _requested_device(job: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> str:
    """The job call's ``device`` argument, positional or keyword ("auto" when not given)."""
    try:
        bound = inspect.signature(job).bind_partial(None, *args, **kwargs)
    except TypeError:
        return "auto"
    return str(bound.arguments.get("device", "auto"))


def ranked_job(job: JobFunction) -> JobFunction:
    """Run a job (distill, resume, eval) under torchrun: rank 0 runs ``job``, sending orders
    for the work it spreads; the other ranks carry out the orders, then return rank 0's result
    or raise its error. ``job`` takes ``store`` first and a ``device`` argument. One process:
    ``job`` itself."""

    @functools.wraps(job)
    def wrapper(store: Any, *args: Any, **kwargs: Any) -> Any:
        if env_world_size() <= 1:
            return job(store, *args, **kwargs)
        from ncfm_core.budget import resolve_device

        ctx, device = init_from_env(resolve_device(_requested_device(job, args, kwargs))[0])
        if ctx.is_main:
            _leader["busy"] = False
            try:
                with _terminate_as_error():
                    result = job(store, *args, **kwargs)
            except BaseException as err:
                # Followers inside an order cannot take a message; they stop when torchrun tears
                # the group down after this process exits non-zero.
                if not _leader["busy"]:
                    broadcast_object(ctx, ("error", type(err).__name__, str(err)))
                raise
            broadcast_object(ctx, ("ok", result))
            return result
        while True:
            message = broadcast_object(ctx)
            if message[0] == "ok":
                return message[1]  # rank 0's result (a version's path is on rank 0's machine)
            if message[0] == "error":
                error = _error_class(message[1])(message[2])
                error.relayed = True  # rank 0 reports it; the CLI does not print it again
                raise error
            _FOLLOW[message[0]](ctx, message[1], device)

    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------- evaluation


def repeats_of_rank(repeats: int, world_size: int, rank: int) -> range:
    """The evaluation repeats rank ``rank`` trains: a contiguous block, the first
    ``repeats % world_size`` ranks one more (a block keeps batched training possible on a rank;
    ranks beyond ``repeats`` get none)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    base, extra = divmod(repeats, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


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
) -> EvalResult:
    """:func:`ncfm_core.evaluate.evaluate_images` with the repeats spread over the ranks (every
    rank calls it): rank r trains its block :func:`repeats_of_rank` (repeat i still seeded with
    ``config.seed + i``) and the accuracies are all-gathered, so every rank returns what one
    process training all the repeats returns (exactly, with sequential training; batched
    training agrees up to rounding). ``on_repeat(i, accuracy)``: this rank's repeats as they
    finish, the others' after the gather."""
    ctx = ctx or current()
    started = time.perf_counter()
    mine = repeats_of_rank(config.repeats, ctx.world_size, ctx.rank)
    found: dict[int, tuple[float, float | None]] = {}
    training: str | None = None
    if len(mine):
        block = dataclasses.replace(config, seed=config.seed + mine.start, repeats=len(mine))
        report = None if on_repeat is None else (lambda i, accuracy: on_repeat(mine.start + i, accuracy))
        result = evaluate_images(images, labels, dataset, block, device, report, teacher=teacher)
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
               teacher: torch.nn.Module | None = None) -> EvalResult:
        cpu_teacher = None if teacher is None else copy.deepcopy(teacher).to("cpu")
        # The full baseline trains on the dataset's own training set, which the followers hold.
        whole = images is dataset.train_images and labels is dataset.train_labels
        _send_order("eval", {"images": None if whole else images.detach().cpu(),
                             "labels": None if whole else labels.cpu(), "config": config.to_dict(),
                             "device_type": torch.device(device).type, "teacher": cpu_teacher}, dataset)
        result = evaluate_images_distributed(images, labels, dataset, config, device, ctx, on_repeat,
                                             teacher=teacher)
        _order_done()
        return result

    return spread


__all__ = [
    "DistContext",
    "SINGLE",
    "ShardedDistiller",
    "all_gather",
    "all_reduce_sum",
    "broadcast_object",
    "current",
    "distributed_load_or_train_pool",
    "env_world_size",
    "evaluate_images_distributed",
    "finish",
    "gather_to_main",
    "init_from_env",
    "job_evaluator",
    "job_pool",
    "make_distiller",
    "merge_shard_states",
    "ranked_job",
    "repeats_of_rank",
    "send_order",
    "shard_classes",
]
