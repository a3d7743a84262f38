"""DD-Ranking's fair-comparison metrics, on accuracies given as FRACTIONS in [0, 1].

- IOR (improvement over random) = acc(synthetic) - acc(random real subset of the same IPC),
  both trained under the same protocol: does the distilled set carry more than random images?
- HLR (hard-label recovery) = acc(whole real training set) - acc(synthetic): how much of the
  full-data accuracy is still missing.
- LRS = (e^a - e^-1) / (e - e^-1) with a = (IOR - HLR) / 2.

With accuracies in [0, 1], IOR and HLR lie in [-1, 1], so ``a`` lies in [-1, 1] and LRS in
[0, 1]: 0 when the synthetic set is as bad as can be (IOR = -1, HLR = 1), 1 when it is
perfect (IOR = 1, HLR = -1). DD-Ranking evaluates the same formula on percents, where ``a``
reaches +-100 and LRS leaves its intended range; every function here refuses percents.
"""

from __future__ import annotations

import math

from ncfm_core.errors import ConfigError

__all__ = ["fair_metrics", "hlr", "ior", "lrs"]


def _fraction(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ConfigError(f"{what} must be a fraction in [0, 1], got {value}; divide percents by 100")
    return value


def _difference(value: float, what: str) -> float:
    value = float(value)
    if not -1.0 <= value <= 1.0 or math.isnan(value):
        raise ConfigError(f"{what} must lie in [-1, 1] (a difference of fractions), got {value}")
    return value


def ior(acc_syn: float, acc_random: float) -> float:
    """Improvement over random, ``acc_syn - acc_random``, in [-1, 1]. Inputs in [0, 1]."""
    return _fraction(acc_syn, "synthetic-set accuracy") - _fraction(acc_random, "random-subset accuracy")


def hlr(acc_full: float, acc_syn: float) -> float:
    """Hard-label recovery gap, ``acc_full - acc_syn``, in [-1, 1]. Inputs in [0, 1]."""
    return _fraction(acc_full, "full-data accuracy") - _fraction(acc_syn, "synthetic-set accuracy")


def lrs(ior_value: float, hlr_value: float) -> float:
    """Label-robust score ``(e^a - e^-1) / (e - e^-1)``, ``a = (ior - hlr) / 2``, in [0, 1].

    ``ior_value`` and ``hlr_value`` are differences of fractions, in [-1, 1] (see :func:`ior`,
    :func:`hlr`). Larger is better; IOR = HLR gives ``(1 - e^-1) / (e - e^-1)`` ~ 0.269.
    """
    a = (_difference(ior_value, "IOR") - _difference(hlr_value, "HLR")) / 2.0
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def fair_metrics(acc_syn: float, acc_random: float | None = None, acc_full: float | None = None) -> dict[str, float]:
    """The metrics the given baselines allow: ``ior`` with ``acc_random``, ``hlr`` with
    ``acc_full``, ``lrs`` with both. Accuracies (mean over repeats) are fractions in [0, 1]."""
    metrics: dict[str, float] = {}
    if acc_random is not None:
        metrics["ior"] = ior(acc_syn, acc_random)
    if acc_full is not None:
        metrics["hlr"] = hlr(acc_full, acc_syn)
    if "ior" in metrics and "hlr" in metrics:
        metrics["lrs"] = lrs(metrics["ior"], metrics["hlr"])
    return metrics
