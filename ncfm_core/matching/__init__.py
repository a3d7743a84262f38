"""Matching losses as registered strategies: what the distillation loop minimises per class.

A loss is one module with one :class:`MatchingLoss` subclass carrying ``@register_matching(name)``
(timm-style: a plain dict, errors that name the valid choices). It owns its sampler and that
sampler's optimiser if any, its real-side statistics, its per-group loss on the synthetic side,
its share of the checkpoint and its memory/FLOP/launch terms for ``ncfm_core.memory_model``; the
maths stays in ``ncfm_core.cf``. Importing this package registers the built-in losses:

- ``ncfm`` (:mod:`ncfm_core.matching.ncfm`): the characteristic-function discrepancy, with the
  learned sampler psi or Gaussian frequencies;
- ``mmd`` (:mod:`ncfm_core.matching.mmd`): DM-style mean matching, no sampler.

docs/architecture.md ("How to add a matching loss") lists the steps; tests/test_matching.py
adds one inside a test.
"""

from ncfm_core.matching import mmd, ncfm  # noqa: F401 - importing them registers them
from ncfm_core.matching.base import IterationShape, MatchingCosts, MatchingLoss, RealSide
from ncfm_core.matching.registry import (
    matching_class,
    matching_descriptions,
    matching_names,
    register_matching,
    unknown_matching_message,
)

__all__ = [
    "IterationShape",
    "MatchingCosts",
    "MatchingLoss",
    "RealSide",
    "matching_class",
    "matching_descriptions",
    "matching_names",
    "register_matching",
    "unknown_matching_message",
]
