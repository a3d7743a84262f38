"""Characteristic-function discrepancy (NCFD) between feature sets, and its building blocks.

The empirical characteristic function (CF) of features ``x_1..x_N`` at a frequency ``t`` is
``Phi(t) = mean_i exp(j <t, x_i>)``; we carry it as its real part ``re = mean cos`` and its
imaginary part ``im = mean sin``. For F frequencies this is one ``(N, d) @ (d, F)`` product,
then cos/sin and a mean over N: linear in N.

Per frequency, the NCFD splits ``|Phi_x - Phi_y|^2`` into an amplitude term
``(|Phi_x| - |Phi_y|)^2`` and a phase term ``2 |Phi_x| |Phi_y| (1 - cos(a_x - a_y))``, weighs them
with ``alpha`` and ``1 - alpha``, and averages ``sqrt`` of the result over frequencies.

Everything here is a pure function of its tensors, except :class:`CFAccumulator`, which
streams the (no-grad) real side in chunks so its memory does not grow with N.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "CFAccumulator",
    "cf_embed",
    "cf_embed_per_class",
    "mmd_per_class",
    "ncfd",
    "ncfd_per_class",
    "ncfd_terms",
    "normalize_features",
]


def normalize_features(features: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each row of ``features`` (N, d) to unit L2 norm; rows with norm below ``eps``
    are divided by ``eps`` instead (so a zero row stays zero). Returns (N, d)."""
    return features / torch.linalg.vector_norm(features, dim=-1, keepdim=True).clamp_min(eps)


def _check_features_freqs(features: Tensor, freqs: Tensor) -> None:
    if features.dim() != 2 or freqs.dim() != 2 or features.shape[1] != freqs.shape[1]:
        raise ValueError(
            f"expected features (N, d) and freqs (F, d), got {tuple(features.shape)} and "
            f"{tuple(freqs.shape)}"
        )


def _check_labels(features: Tensor, labels: Tensor) -> None:
    if labels.dim() != 1 or labels.shape[0] != features.shape[0] or labels.is_floating_point():
        raise ValueError(
            f"expected integer labels (N,) = ({features.shape[0]},), got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )


def _segment_sums(values: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Sum the rows of ``values`` (N, k) by class: returns (C, k).

    ``index_add`` rather than a one-hot ``(C, N) @ (N, k)`` matmul: it does N*k additions
    instead of C*N*k multiply-adds and never builds the (C, N) one-hot matrix (at C = 200 and
    1024 real images per class that matrix alone is 160 MB in float32). Its backward is a
    gather, also O(N*k). On CUDA, float index_add uses atomic adds, so results can differ in
    the last bits between runs unless torch's deterministic mode is on.
    """
    return values.new_zeros(num_classes, values.shape[1]).index_add(0, labels, values)


def _segment_means(values: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean of the rows of ``values`` (N, k) by class: (C, k); a class without rows gives 0."""
    counts = torch.bincount(labels, minlength=num_classes)
    return _segment_sums(values, labels, num_classes) / counts.clamp_min(1).unsqueeze(1)


def cf_embed(features: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Empirical CF of one set. features (N, d), freqs (F, d) -> (re (F,), im (F,)),
    ``re_f = mean_i cos(<t_f, x_i>)``, ``im_f = mean_i sin(<t_f, x_i>)``."""
    _check_features_freqs(features, freqs)
    projections = features @ freqs.T  # (N, F)
    return torch.cos(projections).mean(dim=0), torch.sin(projections).mean(dim=0)


def cf_embed_per_class(
    features: Tensor, labels: Tensor, freqs: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Empirical CF of every class at once.

    features (N, d), labels (N,) int64 in [0, C), freqs (F, d) -> (re (C, F), im (C, F)).
    A class with no samples gets re = im = 0 (the CF of an empty set is undefined; 0 keeps
    the batch shape and such a class should simply not be counted by the caller).
    Differentiable w.r.t. both ``features`` and ``freqs``.
    """
    _check_features_freqs(features, freqs)
    _check_labels(features, labels)
    projections = features @ freqs.T  # (N, F)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1)  # (C, 1)
    re = _segment_sums(torch.cos(projections), labels, num_classes) / counts
    im = _segment_sums(torch.sin(projections), labels, num_classes) / counts
    return re, im


class CFAccumulator:
    """Per-class empirical CF of a set streamed in chunks, without gradients.

    Only the (C, F) sums of cos/sin and the (C,) counts are kept, so memory is bounded by
    the largest chunk, not by N. Per-chunk sums are taken in the features' dtype and on
    their device; the running totals are float64 on ``device`` (``None``: torch's default),
    so many chunks do not pile up float32 rounding. Every chunk must use the same ``freqs``.

    Because this runs under ``no_grad``, the result is a constant for autograd: no gradient
    reaches the real features (wanted) and none reaches ``freqs`` either. When the frequency
    sampler psi is trained, its gradient through the real CF is therefore lost; use
    :func:`cf_embed_per_class` with detached real features where that term is needed.
    """

    def __init__(
        self,
        num_classes: int,
        num_freqs: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_classes = num_classes
        self.num_freqs = num_freqs
        self.dtype = dtype
        self._cos_sums = torch.zeros(num_classes, num_freqs, dtype=torch.float64, device=device)
        self._sin_sums = torch.zeros_like(self._cos_sums)
        self._counts = torch.zeros(num_classes, dtype=torch.int64, device=self._cos_sums.device)

    @torch.no_grad()
    def add(self, features: Tensor, labels: Tensor, freqs: Tensor) -> None:
        """Fold in one chunk: features (n, d), labels (n,) in [0, C), freqs (F, d)."""
        _check_features_freqs(features, freqs)
        _check_labels(features, labels)
        if freqs.shape[0] != self.num_freqs:
            raise ValueError(f"expected {self.num_freqs} frequencies, got {freqs.shape[0]}")
        labels = labels.to(features.device)
        projections = features @ freqs.to(features.device, features.dtype).T  # (n, F)
        target = self._cos_sums.device
        cos_sums = _segment_sums(torch.cos(projections), labels, self.num_classes)
        sin_sums = _segment_sums(torch.sin(projections), labels, self.num_classes)
        self._cos_sums += cos_sums.to(target, torch.float64)
        self._sin_sums += sin_sums.to(target, torch.float64)
        self._counts += torch.bincount(labels, minlength=self.num_classes).to(target)

    @property
    def counts(self) -> Tensor:
        """Samples seen per class, (C,) int64."""
        return self._counts.clone()

    def mean(self) -> tuple[Tensor, Tensor]:
        """(re (C, F), im (C, F)) in ``dtype``; classes never seen give zeros."""
        divisor = self._counts.clamp_min(1).unsqueeze(1).to(torch.float64)
        return (self._cos_sums / divisor).to(self.dtype), (self._sin_sums / divisor).to(self.dtype)


def _safe_modulus(re: Tensor, im: Tensor, eps: float) -> Tensor:
    # sqrt has an infinite slope at 0, so |Phi| = sqrt(re^2 + im^2) would give NaN
    # gradients for a CF that is exactly 0. Clamping the argument at eps makes |Phi| read
    # sqrt(eps) there with zero gradient; above the clamp its gradient (re, im)/|Phi| is a
    # unit vector, so nothing blows up just above it either.
    return torch.sqrt(torch.clamp(re * re + im * im, min=eps))


def ncfd_terms(
    re_x: Tensor, im_x: Tensor, re_y: Tensor, im_y: Tensor, eps: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """Amplitude and phase terms per frequency, inputs of any (broadcastable) shape (..., F).

    amplitude = (|Phi_x| - |Phi_y|)^2
    phase     = 2 |Phi_x| |Phi_y| (1 - cos(a_x - a_y)) = 2 (|Phi_x| |Phi_y| - re_x re_y - im_x im_y)

    No atan2: ``|Phi_x||Phi_y| cos(a_x - a_y)`` is the real inner product of the two complex
    numbers. Moduli are gradient-safe (see ``_safe_modulus``), so each is at least sqrt(eps)
    and ``amplitude + phase`` equals ``|Phi_x - Phi_y|^2`` up to O(eps). The phase term is
    not clamped at 0: rounding can leave it a hair below 0, which ``ncfd``'s clamp absorbs.
    """
    modulus_x = _safe_modulus(re_x, im_x, eps)
    modulus_y = _safe_modulus(re_y, im_y, eps)
    amplitude = (modulus_x - modulus_y) ** 2
    phase = 2.0 * (modulus_x * modulus_y - (re_x * re_y + im_x * im_y))
    return amplitude, phase


def ncfd(
    re_x: Tensor,
    im_x: Tensor,
    re_y: Tensor,
    im_y: Tensor,
    alpha: float = 0.5,
    eps: float = 1e-12,
) -> Tensor:
    """Neural characteristic-function discrepancy, averaged over frequencies.

    Inputs (..., F) -> (...): ``mean_f sqrt(max(alpha * amp_f + (1 - alpha) * phase_f, eps))``.
    For (C, F) inputs this is one value per class; the caller sums (and scales) them.
    With alpha = 1/2 each frequency contributes ``|Phi_x - Phi_y| / sqrt(2)`` (a metric);
    the clamp keeps the gradient finite when the two CFs coincide (value sqrt(eps) there).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    amplitude, phase = ncfd_terms(re_x, im_x, re_y, im_y, eps=eps)
    discrepancy = alpha * amplitude + (1.0 - alpha) * phase
    return torch.sqrt(torch.clamp(discrepancy, min=eps)).mean(dim=-1)


def ncfd_per_class(
    features_x: Tensor,
    labels_x: Tensor,
    features_y: Tensor,
    labels_y: Tensor,
    freqs: Tensor,
    num_classes: int,
    alpha: float = 0.5,
    eps: float = 1e-12,
) -> Tensor:
    """NCFD between the classes of two labelled feature sets under shared ``freqs`` (F, d).

    features_x (Nx, d), labels_x (Nx,), features_y (Ny, d), labels_y (Ny,) -> (C,).
    Gradients reach both feature sets and ``freqs``; detach a side to freeze it.
    """
    re_x, im_x = cf_embed_per_class(features_x, labels_x, freqs, num_classes)
    re_y, im_y = cf_embed_per_class(features_y, labels_y, freqs, num_classes)
    return ncfd(re_x, im_x, re_y, im_y, alpha=alpha, eps=eps)


def mmd_per_class(
    features_x: Tensor, labels_x: Tensor, features_y: Tensor, labels_y: Tensor, num_classes: int
) -> Tensor:
    """DM-style baseline: squared distance between per-class feature means, (C,).

    features_x (Nx, d), labels_x (Nx,), features_y (Ny, d), labels_y (Ny,). A class absent
    from a set has mean 0 there (so its distance is the other side's squared mean norm).
    """
    _check_labels(features_x, labels_x)
    _check_labels(features_y, labels_y)
    mean_x = _segment_means(features_x, labels_x, num_classes)  # (C, d)
    mean_y = _segment_means(features_y, labels_y, num_classes)  # (C, d)
    return ((mean_x - mean_y) ** 2).sum(dim=-1)
