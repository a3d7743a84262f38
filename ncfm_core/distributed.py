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

The job protocol: rank 0 runs the ordinary job (``ncfm_core.jobs``); the other ranks wait in
:func:`ranked_job` for an order from rank 0 (the distillation to join, or nothing) and then for
its outcome (the version, or the error to raise).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime as _dt
import functools
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
from ncfm_core.evaluate import EvalConfig, EvalResult, evaluate_images
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
            _leader["followers_done"] = True
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

_leader: dict[str, bool] = {"order_sent": False, "followers_done": False}
JobFunction = TypeVar("JobFunction", bound=Callable[..., Any])


def send_order(config: DistillConfig, dataset: ImageDataset, device: torch.device, *, target: int,
               checkpoint_every: int, state: dict | None) -> None:
    """Rank 0, at the start of a distillation: tell the other ranks what to join (the dataset
    travels with it, so their file systems need not hold it; ``device``'s type is the one they
    compute on, as random-number states belong to a device type)."""
    ctx = current()
    if not ctx.distributed:
        return
    broadcast_object(ctx, {"config": config.to_dict(), "dataset": dataset, "device_type": device.type,
                           "target": target, "checkpoint_every": checkpoint_every, "state": state})
    _leader["order_sent"] = True
    _leader["followers_done"] = False


def _follow_distillation(ctx: DistContext, order: dict[str, Any], device: torch.device) -> None:
    """A non-zero rank's part of a distillation: pool, shard, iterations, gathers."""
    if order["device_type"] != device.type:
        device = torch.device("cuda", ctx.local_rank) if order["device_type"] == "cuda" else torch.device("cpu")
    config = DistillConfig.from_dict(order["config"])
    dataset: ImageDataset = order["dataset"]
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


def ranked_job(job: JobFunction) -> JobFunction:
    """Run a distill/resume job under torchrun: rank 0 runs ``job``; the others follow its order
    and return its result (the version) or raise its error. ``job`` takes ``store`` first and a
    ``device`` keyword. One process: ``job`` itself."""

    @functools.wraps(job)
    def wrapper(store: Any, *args: Any, **kwargs: Any) -> Any:
        if env_world_size() <= 1:
            return job(store, *args, **kwargs)
        from ncfm_core.budget import resolve_device

        ctx, device = init_from_env(resolve_device(str(kwargs.get("device", "auto")))[0])
        if ctx.is_main:
            _leader.update(order_sent=False, followers_done=False)
            try:
                with _terminate_as_error():
                    result = job(store, *args, **kwargs)
            except BaseException as err:
                # Followers that are still inside the iterations cannot take a message; they
                # stop when torchrun tears the group down after this process exits non-zero.
                if not _leader["order_sent"]:
                    broadcast_object(ctx, None)
                if not _leader["order_sent"] or _leader["followers_done"]:
                    broadcast_object(ctx, ("error", type(err).__name__, str(err)))
                raise
            if not _leader["order_sent"]:
                broadcast_object(ctx, None)
            broadcast_object(ctx, ("ok", result))
            return result
        order = broadcast_object(ctx)
        if order is not None:
            _follow_distillation(ctx, order, device)
        outcome = broadcast_object(ctx)
        if outcome[0] == "error":
            raise _error_class(outcome[1])(outcome[2])
        return outcome[1]  # rank 0's ArtifactVersion (its path is on rank 0's machine)

    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------- evaluation


def repeats_of_rank(repeats: int, world_size: int, rank: int) -> list[int]:
    """The evaluation repeats rank ``rank`` trains: r, r + K, r + 2K, ..."""
    return list(range(rank, repeats, world_size))


def evaluate_images_distributed(
    images: Tensor,
    labels: Tensor,
    dataset: ImageDataset,
    config: EvalConfig,
    device: torch.device | str,
    ctx: DistContext | None = None,
    *,
    teacher: torch.nn.Module | None = None,
) -> EvalResult:
    """:func:`ncfm_core.evaluate.evaluate_images` with the repeats spread over the ranks: rank r
    trains repeats r, r + K, ... (repeat i still seeded with ``config.seed + i``), and the
    accuracies are all-gathered, so every rank returns the result of one process training all
    the repeats (exactly, with sequential repeats; batched repeats agree up to rounding)."""
    ctx = ctx or current()
    started = time.perf_counter()
    mine = repeats_of_rank(config.repeats, ctx.world_size, ctx.rank)
    found: dict[int, tuple[float, float | None, str]] = {}
    for repeat in mine:
        one = dataclasses.replace(config, seed=config.seed + repeat, repeats=1)
        result = evaluate_images(images, labels, dataset, one, device, teacher=teacher)
        best = None if result.best_over_epochs is None else result.best_over_epochs[0]
        found[repeat] = (result.runs[0], best, result.training)
    merged: dict[int, tuple[float, float | None, str]] = {}
    for part in all_gather(ctx, found):
        merged.update(part)
    order = range(config.repeats)
    best_runs = [merged[r][1] for r in order]
    return EvalResult(
        runs=[merged[r][0] for r in order],
        seconds=time.perf_counter() - started,
        protocol=config.to_dict(),
        seeds=[config.seed + r for r in order],
        training="sequential",
        best_over_epochs=best_runs if config.best_over_epochs else None,  # type: ignore[arg-type]
        train_set={"kind": "images", "size": int(images.shape[0])},
    )


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
    "gather_to_main",
    "init_from_env",
    "make_distiller",
    "merge_shard_states",
    "ranked_job",
    "repeats_of_rank",
    "send_order",
    "shard_classes",
]
