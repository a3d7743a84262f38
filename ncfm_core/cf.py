"""Characteristic-function discrepancy (NCFD) between feature sets, and its building blocks.

The empirical characteristic function (CF) of features ``x_1..x_N`` at a frequency ``t`` is
``Phi(t) = mean_i exp(j <t, x_i>)``; we carry it as its real part ``re = mean cos`` and its
imaginary part ``im = mean sin``. For F frequencies this is one ``(N, d) @ (d, F)`` product,
then cos/sin and a mean over N: linear in N.

Per frequency, the NCFD splits ``|Phi_x - Phi_y|^2`` into an amplitude term
``(|Phi_x| - |Phi_y|)^2`` and a phase term ``2 |Phi_x| |Phi_y| (1 - cos(a_x - a_y))``, weighs them
with ``alpha`` and ``1 - alpha``, and averages ``sqrt`` of the result over frequencies.

Everything here is a pure function of its tensors. Two layouts of labelled sets:

* any labels: :func:`cf_embed_per_class` sums by class with ``index_add``;
* class-major with the same number of rows per class (what the distillation loop builds): per-class
  sums and means are reshapes (:func:`class_row_sums`, :func:`class_means`), with no atomics
  (deterministic on CUDA too) and no ``bincount`` (which would force a host sync on CUDA). The
  real side is streamed in chunks (:func:`chunk_bounds`, :func:`cf_chunk_sums`) so its memory
  does not grow with N, and the frequencies' gradient through it has a closed form
  (:func:`cf_chunk_freq_grad`) instead of an autograd graph over every real row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "CF_PRECISIONS",
    "cf_chunk_freq_grad",
    "cf_chunk_sums",
    "cf_class_major",
    "cf_embed",
    "cf_embed_per_class",
    "chunk_bounds",
    "class_means",
    "class_row_sums",
    "mmd",
    "ncfd",
    "ncfd_terms",
    "normalize_features",
    "project",
    "resolve_cf_precision",
]


# ---- the projections <t, f> and their precision --------------------------------------------------
# Features are L2-normalised and frequencies ~N(0, s^2 I) (s = 1 without psi, psi's scales up to
# ~20), so a projection p = <t, f> has standard deviation ~s: O(1) to O(10) radians. What a
# reduced-precision product does to the phase:
# - TF32 (tensor cores, 10 mantissa bits: inputs rounded with relative error <= 2^-11, products
#   and sums in fp32): |error in p| <= 2^-10 sum_i |t_i f_i| <= 2^-10 ||t|| ~ 2^-10 s sqrt(d)
#   worst case; with independent rounding errors the typical error is ~2^-11 s (5e-4 rad at s=1,
#   1e-2 rad at s=20), and it averages out over the N samples of a CF (tests/test_cf.py measures
#   it: the NCFD moves by < 1e-3 relative, its gradients by < 1e-2).
# - bf16 inputs (8 mantissa bits, 2^-8 relative): 8x that; worse, a bf16 matmul writes a bf16
#   result, whose spacing at |p| ~ 32 is 0.25 rad: cos/sin of it is noise. bf16 projections would
#   need an fp32 output (not available on every backend) and a cast of the fp32 features (the
#   profile already shows dtype copies at 9%). TF32 takes the same fp32 tensors, no copy.
# So: "tf32" on CUDA ("auto"), "fp32" elsewhere; CPU has no TF32, so CPU results stay bit-identical.

CF_PRECISIONS = ("auto", "fp32", "tf32")


def resolve_cf_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"tf32"`` on CUDA, ``"fp32"`` elsewhere; ``"tf32"`` off CUDA -> ``"fp32"``
    (no other backend has TF32 matmuls: asking for it changes nothing there)."""
    if precision not in CF_PRECISIONS:
        raise ValueError(f"unknown CF precision {precision!r}; choose one of {', '.join(CF_PRECISIONS)}")
    return "tf32" if precision != "fp32" and torch.device(device).type == "cuda" else "fp32"


@contextlib.contextmanager
def _cuda_matmul_tf32(enabled: bool) -> Iterator[None]:
    """Inside: CUDA fp32 matmuls may use TF32 tensor cores (only the matmuls launched inside, so
    the networks' and psi's matmuls are untouched); the previous setting is restored after."""
    if not enabled:
        yield
        return
    backend = torch.backends.cuda.matmul
    previous = backend.fp32_precision
    backend.fp32_precision = "tf32"
    try:
        yield
    finally:
        backend.fp32_precision = previous


class _TF32Projection(torch.autograd.Function):
    """``features @ freqs.T`` with the forward and both backward matmuls in TF32."""

    @staticmethod
    def forward(ctx, features: Tensor, freqs: Tensor) -> Tensor:
        ctx.save_for_backward(features, freqs)
        with _cuda_matmul_tf32(True):
            return features @ freqs.T

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        features, freqs = ctx.saved_tensors
        grad_features = grad_freqs = None
        with _cuda_matmul_tf32(True):
            if ctx.needs_input_grad[0]:
                grad_features = grad @ freqs
            if ctx.needs_input_grad[1]:
                grad_freqs = grad.T @ features
        return grad_features, grad_freqs


def project(features: Tensor, freqs: Tensor, precision: str = "fp32") -> Tensor:
    """The projections ``features @ freqs.T`` (N, F), differentiable w.r.t. both. ``precision``
    ``"tf32"`` runs the product (and its backward) on TF32 tensor cores when the tensors are on
    CUDA; anything else, and any tensor off CUDA, is the plain fp32 product, bit for bit."""
    if precision != "tf32" or features.device.type != "cuda":
        return features @ freqs.T
    if torch.is_grad_enabled() and (features.requires_grad or freqs.requires_grad):
        return _TF32Projection.apply(features, freqs)
    with _cuda_matmul_tf32(True):
        return features @ freqs.T


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


# ---- class-major sets (the distillation loop) --------------------------------------------------
# Rows ``[c * per_class, (c + 1) * per_class)`` belong to class ``c``.


def _chunk_layout(start_row: int, n: int, per_class: int) -> tuple[int, bool]:
    """(first class, whether the chunk is whole classes) of rows ``[start_row, start_row + n)``;
    raises ValueError unless the chunk is whole classes or lies inside one class."""
    first = start_row // per_class
    if start_row % per_class == 0 and n % per_class == 0:
        return first, True
    if (start_row + n - 1) // per_class != first:
        raise ValueError(f"chunk [{start_row}, {start_row + n}) neither covers whole classes nor stays in one")
    return first, False


def class_row_sums(values: Tensor, start_row: int, per_class: int) -> tuple[int, Tensor]:
    """Per-class sums of a chunk of a class-major array.

    ``values`` (n, k) are rows ``[start_row, start_row + n)`` of an array holding ``per_class``
    rows per class; the chunk must be whole classes or lie inside one class. Returns
    (first class, sums (classes in the chunk, k)).
    """
    n = values.shape[0]
    first, whole = _chunk_layout(start_row, n, per_class)
    if whole:
        return first, values.reshape(n // per_class, per_class, -1).sum(dim=1)
    return first, values.sum(dim=0, keepdim=True)


def class_means(values: Tensor, per_class: int) -> Tensor:
    """Per-class means of a whole class-major array: values (C * per_class, k) -> (C, k)."""
    return values.reshape(values.shape[0] // per_class, per_class, -1).mean(dim=1)


def cf_class_major(
    features: Tensor, freqs: Tensor, per_class: int, precision: str = "fp32"
) -> tuple[Tensor, Tensor]:
    """Per-class empirical CF of a whole class-major set, differentiable w.r.t. both inputs.

    features (C * per_class, d), freqs (F, d) -> (re (C, F), im (C, F)); the same values as
    :func:`cf_embed_per_class` with class-major labels, up to rounding (mean of a reshape
    instead of ``index_add`` sums divided by counts). ``precision``: see :func:`project`.
    """
    projections = project(features, freqs, precision)  # (C * per_class, F)
    return class_means(torch.cos(projections), per_class), class_means(torch.sin(projections), per_class)


def cf_chunk_sums(
    features: Tensor, freqs: Tensor, start_row: int, per_class: int, precision: str = "fp32"
) -> tuple[int, Tensor, Tensor]:
    """Per-class sums of cos and sin of ``features @ freqs.T`` for one chunk.

    features (n, d), freqs (F, d) -> (first class, cos sums (k, F), sin sums (k, F)), ``k`` the
    classes the chunk touches (see :func:`class_row_sums`). Dividing the accumulated sums by
    ``per_class`` gives the per-class CF of :func:`cf_embed_per_class`. ``precision``: see
    :func:`project`.
    """
    projections = project(features, freqs, precision)  # (n, F)
    first, cos_sums = class_row_sums(torch.cos(projections), start_row, per_class)
    _, sin_sums = class_row_sums(torch.sin(projections), start_row, per_class)
    return first, cos_sums, sin_sums


def cf_chunk_freq_grad(
    features: Tensor,
    freqs: Tensor,
    start_row: int,
    per_class: int,
    grad_re: Tensor,
    grad_im: Tensor,
    precision: str = "fp32",
) -> Tensor:
    """One chunk's share of the gradient w.r.t. ``freqs`` of ``sum(grad_re * re + grad_im * im)``,
    where (re, im) (C, F) is the per-class CF of the whole class-major set.

    ``re[c, f] = mean_{i in c} cos(<t_f, x_i>)``, so ``d re[c, f] / d t_f = -mean sin(.) x_i`` and
    ``d im[c, f] / d t_f = mean cos(.) x_i``: the gradient is ``W.T @ X`` with
    ``W[i, f] = (-grad_re[c_i, f] sin(p_if) + grad_im[c_i, f] cos(p_if)) / per_class``.
    features (n, d), freqs (F, d), grad_re and grad_im (C, F) -> (F, d). Summing over chunks
    gives the full gradient using (n, F) memory per chunk instead of an autograd graph over all
    rows. ``precision`` (see :func:`project`) applies to both products.
    """
    n = features.shape[0]
    first, whole = _chunk_layout(start_row, n, per_class)
    projections = project(features, freqs, precision)  # (n, F)
    if whole:
        k = n // per_class
        g_re = grad_re[first : first + k, None, :]  # (k, 1, F)
        g_im = grad_im[first : first + k, None, :]
        shape = (k, per_class, -1)
        weights = -g_re * torch.sin(projections).reshape(shape) + g_im * torch.cos(projections).reshape(shape)
        weights = weights.reshape(n, -1)
    else:
        weights = -grad_re[first] * torch.sin(projections) + grad_im[first] * torch.cos(projections)
    with _cuda_matmul_tf32(precision == "tf32" and features.device.type == "cuda"):
        return (weights / per_class).T @ features


def chunk_bounds(num_classes: int, per_class: int, chunk: int) -> list[tuple[int, int]]:
    """Row ranges ``(start, end)`` of at most ``chunk`` rows covering a class-major array of
    ``num_classes * per_class`` rows in order, each whole classes (when ``chunk >= per_class``)
    or inside one class (a class split into equal pieces)."""
    if chunk >= per_class:
        step = chunk // per_class
        return [(c * per_class, min(c + step, num_classes) * per_class) for c in range(0, num_classes, step)]
    pieces = -(-per_class // chunk)
    size = -(-per_class // pieces)
    return [
        (c * per_class + s, c * per_class + min(s + size, per_class))
        for c in range(num_classes)
        for s in range(0, per_class, size)
    ]


# ---- discrepancies -----------------------------------------------------------------------------


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


def mmd(mean_x: Tensor, mean_y: Tensor) -> Tensor:
    """DM-style mean matching (``--matching mmd``): squared distance between per-class feature
    means, mean_x and mean_y (..., d) -> (...). For (C, d) inputs one value per class."""
    return ((mean_x - mean_y) ** 2).sum(dim=-1)
