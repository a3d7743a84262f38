"""``mmd``: DM-style mean matching, the squared distance between per-class feature means. No
frequencies and no sampler: nothing random is drawn, nothing but the images is learned."""

from __future__ import annotations

import torch
from torch import Tensor

from ncfm_core import cf
from ncfm_core.config import DistillConfig
from ncfm_core.matching.base import F32, IterationShape, MatchingCosts, MatchingLoss, RealSide
from ncfm_core.matching.registry import register_matching


@register_matching("mmd")
class MeanMatching(MatchingLoss):
    description = "DM-style mean matching of per-class features, no sampler"

    _real_means: Tensor | None = None  # (C, d) of the current iteration

    @torch.no_grad()
    def real_statistics(self, real: RealSide) -> None:
        sums = torch.zeros(real.num_classes, self.feature_dim, dtype=torch.float64, device=self.device)
        for start, features in real.chunks():
            first, chunk_sums = cf.class_row_sums(features, start, real.per_class)
            sums[first : first + chunk_sums.shape[0]] += chunk_sums.double()
        self._real_means = (sums / real.per_class).float()

    def group_loss(self, features: Tensor, classes: slice, rows_per_class: int) -> Tensor:
        return cf.mmd(self._real_means[classes], cf.class_means(features, rows_per_class))

    @classmethod
    def costs(cls, config: DistillConfig, shape: IterationShape) -> MatchingCosts:
        """Per-class accumulators (C, d) and a real chunk's per-class sums; nothing per group
        beyond the features the loop already counts, no FLOPs worth counting, no extra pass."""
        c, d = shape.num_classes, shape.feature_dim
        return MatchingCosts(
            persistent={"per-class CF/mean accumulators": 2 * c * d * (8 + F32 + F32)},
            real_chunk_bytes=shape.real_chunk_rows * 3 * d * F32,
        )
