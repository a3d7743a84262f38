"""Class-sharded distillation: each rank distils its block of classes, and rank 0 gathers the
shards into one whole-set state at every checkpoint and at the end."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ncfm_core.config import DistillConfig
from ncfm_core.data import ImageDataset
from ncfm_core.distill import Distiller, LoopHooks, checkpoint_due
from ncfm_core.errors import ConfigError
from ncfm_core.parallel import spread
from ncfm_core.parallel.context import (
    DistContext,
    all_reduce_sum,
    current,
    gather_to_main,
    shard_classes,
)
from ncfm_core.parallel.protocol import (
    _order_dataset,
    _order_device,
    _order_done,
    _send_order,
    follower,
)
from ncfm_core.pool import Pool, PoolSpec
from ncfm_core.runtime import BackendSettings, apply_backend


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


class ShardedDistiller(Distiller):
    """A :class:`Distiller` of one class block whose :meth:`state_dict` and :meth:`synthetic_set`
    gather every rank's shard to rank 0 (the other ranks get None).

    Every rank must gather at the same iterations: where :func:`~ncfm_core.distill.checkpoint_due`
    (what :meth:`Distiller.run` checkpoints at), and at the run's end (``config.iterations``);
    asked at another iteration it raises instead of blocking (a failure path's extra checkpoint).
    """

    def __init__(self, config: DistillConfig, dataset: ImageDataset, pool: Pool, device: torch.device,
                 ctx: DistContext, *, checkpoint_every: int) -> None:
        if config.precision == "fp16":  # a check, not a decision: the plan decided the precision
            raise ConfigError("--precision fp16 is not supported with several processes (each rank's loss scaler "
                              "would skip different steps); use bf16 or fp32")
        classes = shard_classes(dataset.num_classes, ctx.world_size, ctx.rank)
        super().__init__(config, dataset, pool, device, classes=classes,
                         all_reduce=functools.partial(all_reduce_sum, ctx))
        self.ctx = ctx
        self.checkpoint_every = checkpoint_every
        self._gathered: tuple[int, dict[str, Any] | None, Tensor | None] | None = None

    def is_sync_point(self) -> bool:
        target = self.config.iterations
        return self.iteration == target or checkpoint_due(self.iteration, target, self.checkpoint_every)

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
        if self.iteration == self.config.iterations:
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
                   checkpoint_every: int) -> Distiller:
    """The job's distiller: a plain :class:`Distiller` in one process, else this rank's
    :class:`ShardedDistiller`. Either runs to ``config.iterations``."""
    ctx = current()
    if not ctx.distributed:
        return Distiller(config, dataset, pool, device)
    return ShardedDistiller(config, dataset, pool, device, ctx, checkpoint_every=checkpoint_every)


def send_order(config: DistillConfig, dataset: ImageDataset, device: torch.device, *,
               checkpoint_every: int, state: dict | None, backend: BackendSettings | None = None) -> None:
    """Rank 0, at the start of a distillation: the other ranks join it (pool, their class
    blocks, the gathers) from ``state`` (None: from scratch) up to ``config.iterations``, with the
    plan's ``backend`` settings. No-op in one process."""
    _send_order("distill", {"config": config.to_dict(), "device_type": device.type,
                            "checkpoint_every": checkpoint_every, "state": state,
                            "backend": None if backend is None else backend.to_dict()}, dataset)


@follower("distill")
def _follow_distillation(ctx: DistContext, order: dict[str, Any], device: torch.device) -> None:
    """A non-zero rank's part of a distillation: pool, shard, iterations, gathers."""
    device = _order_device(ctx, order, device)
    apply_backend(BackendSettings.from_dict(order.get("backend")), device)  # rank 0's plan's cuDNN setting
    config = DistillConfig.from_dict(order["config"])
    dataset = _order_dataset(order)
    spec = PoolSpec.from_config(config, dataset)
    pool, _ = spread.distributed_load_or_train_pool(spec, dataset, device)
    distiller = ShardedDistiller(config, dataset, pool, device, ctx, checkpoint_every=order["checkpoint_every"])
    if order["state"] is not None:
        distiller.load_state_dict(order["state"])
    # The gathers rank 0's checkpoints make (Distiller.run's rule), then the final one.
    distiller.run(config.iterations, checkpoint_every=distiller.checkpoint_every,
                  hooks=LoopHooks(checkpoint=lambda _: distiller.gather()))
    distiller.gather()
