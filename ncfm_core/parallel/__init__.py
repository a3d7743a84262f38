"""Several processes under ``torchrun``: class-sharded distillation, a pool trained in parallel,
evaluation repeats spread over ranks. See docs/multi-gpu.md.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE unset or 1 everything here is
a no-op and the jobs run exactly as in one process.

Distillation (rank = one process, K = world size; :mod:`ncfm_core.parallel.sharded`):

- classes are split into K contiguous blocks (:func:`shard_classes`, i.e.
  :func:`contiguous_block` with at least one class per rank); each rank keeps the synthetic
  images of its block and their optimiser state (``Distiller(classes=...)``);
- every rank draws the same random numbers (same seed, same draws for all classes), so the pool
  member, beta, the DSA parameters and psi's frequencies agree everywhere without messages;
- psi is one network: the frequencies' gradient and the loss totals are summed over ranks
  (``all_reduce``) before psi's optimiser step, so psi, the LR scheduler and the loss curve stay
  identical on every rank;
- rank 0 alone writes the store. At a checkpoint (and at the end) every rank's shard is gathered
  to rank 0, which writes ONE whole-set state, the same format a single process writes (plus
  ``world_size``). Resuming cuts that state by class block, so any world size can resume it.

Evaluation (:mod:`ncfm_core.parallel.spread`): the repeats are split into contiguous blocks
(:func:`contiguous_block`, alias :func:`repeats_of_rank`), repeat r seeded with ``seed + r``
wherever it trains, and the accuracies all-gathered (:func:`evaluate_images_distributed`), so
the result is the one-process result. The pool's member i trains on rank ``i % K``
(:func:`distributed_load_or_train_pool`).

The job protocol (:mod:`ncfm_core.parallel.protocol`): rank 0 runs the ordinary job
(``ncfm_core.jobs``); the other ranks wait in :func:`ranked_job` for orders from rank 0 (a
distillation, an evaluation or a pool to join; see :func:`send_order`, :func:`job_evaluator`,
:func:`job_pool`) and then for its outcome (the job's result, or the error to raise). Each
order kind's follower (the other ranks' part) is registered with ``@follower(kind)`` in the
module of its work; importing this package imports those modules, so the registry is complete
before any job runs.

Where things are: :mod:`~ncfm_core.parallel.context` (the process group, the collectives, the
contiguous split), :mod:`~ncfm_core.parallel.protocol` (orders, followers, ``ranked_job``),
:mod:`~ncfm_core.parallel.sharded` (distillation), :mod:`~ncfm_core.parallel.spread` (pool and
evaluation).
"""

from __future__ import annotations

from ncfm_core.parallel import (  # noqa: F401  (sharded and spread register their followers)
    protocol,
    sharded,
    spread,
)
from ncfm_core.parallel.context import (
    SINGLE,
    DistContext,
    all_gather,
    all_reduce_sum,
    broadcast_object,
    contiguous_block,
    current,
    env_local_rank,
    env_world_size,
    finish,
    gather_to_main,
    init_from_env,
    repeats_of_rank,
    shard_classes,
)
from ncfm_core.parallel.protocol import RankTerminated, follower, ranked_job
from ncfm_core.parallel.sharded import (
    ShardedDistiller,
    make_distiller,
    merge_shard_states,
    send_order,
)
from ncfm_core.parallel.spread import (
    distributed_load_or_train_pool,
    evaluate_images_distributed,
    job_evaluator,
    job_pool,
)

__all__ = [
    "SINGLE",
    "DistContext",
    "RankTerminated",
    "ShardedDistiller",
    "all_gather",
    "all_reduce_sum",
    "broadcast_object",
    "contiguous_block",
    "current",
    "distributed_load_or_train_pool",
    "env_local_rank",
    "env_world_size",
    "evaluate_images_distributed",
    "finish",
    "follower",
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
