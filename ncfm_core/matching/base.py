"""What a matching loss is to the loop and to the planner.

:class:`MatchingLoss` is the interface; :class:`RealSide` is how the loop hands it one iteration's
real features; :class:`IterationShape` and :class:`MatchingCosts` are the plain numbers it plans
with, so a loss's memory, FLOP and launch terms sit beside the code they estimate.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ncfm_core.config import DistillConfig

__all__ = ["F32", "IterationShape", "MatchingCosts", "MatchingLoss", "RealSide"]

F32 = 4  # bytes of a float32
AllReduce = Callable[[Tensor], None]


class RealSide:
    """The real images of one iteration, as normalised features (rows, d), chunk by chunk.

    Rows are class-major, ``per_class`` rows for each of the ``num_classes`` classes this process
    owns; every chunk is whole classes or lies inside one class (``ncfm_core.cf.chunk_bounds``),
    so ``ncfm_core.cf.class_row_sums`` sums it by class. The features are inference tensors: read
    them under ``torch.no_grad()``, never keep them in an autograd graph.
    """

    def __init__(self, bounds: Sequence[tuple[int, int]], per_class: int, num_classes: int,
                 features_of: Callable[[int, int], Tensor], *, keep: bool) -> None:
        self.bounds, self.per_class, self.num_classes = bounds, per_class, num_classes
        self._features_of = features_of  # rows [start, end) -> (end - start, d)
        self._keep = keep  # False under activation checkpointing: a second pass recomputes
        self._kept: deque[Tensor] = deque()

    def chunks(self, *, again: bool = False) -> Iterator[tuple[int, Tensor]]:
        """(first row, features) of every chunk, in row order. ``again``: :meth:`again` will be
        called after the synthetic side, so the features are kept for it (unless recomputing)."""
        for start, end in self.bounds:
            features = self._features_of(start, end)
            if again and self._keep:
                self._kept.append(features)
            yield start, features

    def again(self) -> Iterator[tuple[int, Tensor]]:
        """The same chunks once more: the kept features (each released once read) or, under
        checkpointing, recomputed with this iteration's weights and augmentation."""
        for start, end in self.bounds:
            yield start, self._kept.popleft() if self._kept else self._features_of(start, end)


@dataclass(frozen=True)
class IterationShape:
    """One iteration under a plan, as the memory model sizes it (``ncfm_core.memory_model``).
    Counts are rows (images); bytes and FLOPs are named."""

    num_classes: int  # every class of the set: a plan is for the whole set
    feature_dim: int  # d, the extractor's feature width
    real_rows: int  # real images drawn per iteration (num_classes x per class)
    real_chunk_rows: int  # real rows per chunk (at most real_rows)
    real_chunks: int  # real chunks per iteration
    synthetic_rows: int  # decoded synthetic images (num_classes x ipc x factor^2)
    group_rows: int  # decoded synthetic images of one class group
    checkpointing: bool  # activation checkpointing: a second real pass recomputes its chunks
    real_chunk_recompute_bytes: int  # a real chunk recomputed: input, no-grad forward, features
    real_forward_flops: int  # one real image's forward to the features


@dataclass(frozen=True)
class MatchingCosts:
    """A loss's share of one iteration (bytes unless named), merged into the memory model's terms.

    ``persistent``: held for the whole iteration (accumulators, sampler, its optimiser);
    ``real_chunk_bytes``: transient bytes of one real chunk's statistics (the larger of this and
    the network's no-grad forward counts); ``real`` and ``synthetic``: extra terms of those phases
    (the synthetic ones per class group); ``phases``: phases of its own, e.g. a learned sampler's
    gradient through the real side; ``flops``: the FLOPs of its own maths (a multiply-add counts
    2); ``network_flops``: network passes it adds (psi's recomputed real forward under
    checkpointing), timed at the network's rate; ``passes``: name -> (count, launch units each) of
    the passes it adds (see ``memory_model.TimeModel``); ``kept_between_phases``: bytes of real-side
    results it keeps for a later phase (counted in its phase terms, but not transient: the memory
    model's fragmentation is a share of what each phase allocates and frees again).
    """

    persistent: dict[str, int]
    real_chunk_bytes: int
    real: dict[str, int] = field(default_factory=dict)
    synthetic: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    network_flops: dict[str, int] = field(default_factory=dict)
    passes: dict[str, tuple[int, float]] = field(default_factory=dict)
    kept_between_phases: int = 0


class MatchingLoss(abc.ABC):
    """How one class's synthetic features are matched to its real ones, batched over classes.

    Every iteration ``ncfm_core.distill.Distiller`` calls, in this order:

    1. :meth:`begin`: draw the iteration's random numbers (frequencies...) from the run's generator;
    2. :meth:`real_statistics`: per-class statistics of the real features, accumulated chunk by
       chunk in float64 without gradient (memory bounded by the chunk);
    3. :meth:`group_loss` once per group of classes, each followed by the group's backward (the
       loss is a sum over classes, so the groups' gradients add up to the whole loss's);
    4. :meth:`sampler_backward`: a learned sampler's own gradient and backward;

    then the image optimiser and every optimiser of :meth:`optimizers` step. With several
    processes every process draws the same numbers and sees only its block of classes; anything
    in :meth:`state_dict` must be identical on every process (rank 0's is saved).

    A subclass sets ``description`` (one line, shown by ``ncfm distill --matching list``) and is
    registered with ``@register_matching(name)``; :meth:`costs` is required, so that the plan
    counts what the loss holds and computes.
    """

    name: ClassVar[str] = ""  # set by register_matching
    description: ClassVar[str] = ""

    def __init__(self, config: DistillConfig, *, feature_dim: int, device: torch.device, cf_precision: str) -> None:
        self.config = config
        self.feature_dim = feature_dim  # d of the extractor's features
        self.device = device
        self.cf_precision = cf_precision  # precision of CF projections (ncfm_core.cf.project)

    def begin(self, generator: torch.Generator) -> None:
        """Draw this iteration's random numbers (called after the augmentation's draw)."""

    @abc.abstractmethod
    def real_statistics(self, real: RealSide) -> None:
        """Read every real chunk (:meth:`RealSide.chunks`) and keep the per-class statistics
        that :meth:`group_loss` compares with."""

    @abc.abstractmethod
    def group_loss(self, features: Tensor, classes: slice, rows_per_class: int) -> Tensor:
        """Per-class loss (k,) of one group: ``features`` (k * rows_per_class, d) are the
        synthetic features of the owned classes ``classes`` (k of them), class-major and
        differentiable. The loop scales and sums it."""

    def sampler_backward(self, real: RealSide, all_reduce: AllReduce | None) -> None:
        """After every group's backward: a learned sampler's gradient through the real side
        (:meth:`RealSide.again`), summed over processes by ``all_reduce``, back-propagated into
        its parameters. Also the place to release the iteration's tensors."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimisers that step after the image optimiser (a learned sampler's)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Entries of the loop's checkpoint (keys of its own, beside ``images``, ``generator``...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a whole checkpoint (the loop's keys included)."""

    def sampler_tensors(self) -> dict[str, Tensor]:
        """A learned sampler's weights for ``sampler.safetensors`` (empty: none)."""
        return {}

    @classmethod
    @abc.abstractmethod
    def costs(cls, config: DistillConfig, shape: IterationShape) -> MatchingCosts:
        """The loss's memory, FLOP and launch terms for one iteration of ``shape``."""
