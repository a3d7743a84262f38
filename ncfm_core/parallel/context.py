"""Where this process stands under torchrun, the collectives, and the contiguous split of work
over the ranks. Everything here is a no-op in one process."""

from __future__ import annotations

import atexit
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ncfm_core.errors import ConfigError

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


def env_local_rank() -> int | None:
    """LOCAL_RANK under torchrun (several processes), None in one process."""
    return _env_int("LOCAL_RANK", 0) if env_world_size() > 1 else None


def init_from_env(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), once per process.

    ``device`` is this rank's resolved device (``cuda:LOCAL_RANK`` for CUDA; see
    :func:`ncfm_core.devices.resolve_device`). With CUDA the group is "cpu:gloo,cuda:nccl" (NCCL
    for CUDA tensors, gloo for any CPU ones) and the rank's CUDA device is made current;
    otherwise gloo. Returns the context; :data:`SINGLE` in one process.
    """
    global _context
    world_size = env_world_size()
    if world_size <= 1:
        return SINGLE
    if _context is None:
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
            atexit.register(_destroy_group)
        _context = DistContext(rank, world_size, local_rank, backend)
    return _context


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


# ----------------------------------------------------------------------------- splitting work


def contiguous_block(count: int, world_size: int, rank: int) -> range:
    """The contiguous block of ``range(count)`` rank ``rank`` of ``world_size`` takes: the first
    ``count % world_size`` ranks one item more than the others; with fewer items than ranks the
    last ranks get none. Blocks in rank order concatenate to ``range(count)``, so gathering is a
    concatenation (a rank's rows of the class-major synthetic set stay one slice; its evaluation
    repeats can train batched). ValueError if ``rank`` is not in a world of ``world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_classes(num_classes: int, world_size: int, rank: int) -> range:
    """The class ids rank ``rank`` owns (:func:`contiguous_block`); every rank needs at least
    one class (ConfigError otherwise)."""
    block = contiguous_block(num_classes, world_size, rank)
    if num_classes < world_size:
        raise ConfigError(f"{world_size} processes for {num_classes} classes; use at most {num_classes} processes")
    return block


repeats_of_rank = contiguous_block
"""The evaluation repeats rank ``rank`` trains (ranks beyond the repeats get none)."""


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
