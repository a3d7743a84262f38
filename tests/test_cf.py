"""ncfm_core.cf against slow, obviously-correct references: loops, complex numbers, closed forms."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from ncfm_core.cf import (
    CFAccumulator,
    cf_embed,
    cf_embed_per_class,
    mmd_per_class,
    ncfd,
    ncfd_per_class,
    ncfd_terms,
    normalize_features,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert error <= atol, f"{what}: max |diff| {error:.3e} > {atol:.1e}\n{actual}\nvs\n{expected}"


# ---- slow references ------------------------------------------------------------------------


def _loop_cf(points: list[list[float]], freqs: list[list[float]]) -> list[complex]:
    """Phi(t) = mean_i exp(j <t, x_i>) with Python complex numbers."""
    values = []
    for t in freqs:
        total = 0j
        for x in points:
            total += cmath.exp(1j * sum(ti * xi for ti, xi in zip(t, x)))
        values.append(total / len(points) if points else 0j)
    return values


def _loop_cf_per_class(features, labels, freqs, num_classes) -> tuple[torch.Tensor, torch.Tensor]:
    re = torch.zeros(num_classes, freqs.shape[0], dtype=torch.float64)
    im = torch.zeros_like(re)
    for c in range(num_classes):
        points = [features[i].tolist() for i in range(len(labels)) if labels[i] == c]
        for f, value in enumerate(_loop_cf(points, freqs.tolist())):
            re[c, f], im[c, f] = value.real, value.imag
    return re, im


def _reference_terms(phi_x: complex, phi_y: complex) -> tuple[float, float]:
    """Amplitude and phase terms through moduli and atan2 angles, as the paper writes them."""
    modulus_x, angle_x = abs(phi_x), cmath.phase(phi_x)
    modulus_y, angle_y = abs(phi_y), cmath.phase(phi_y)
    amplitude = (modulus_x - modulus_y) ** 2
    phase = 2 * modulus_x * modulus_y * (1 - math.cos(angle_x - angle_y))
    return amplitude, phase


def _reference_ncfd(re_x, im_x, re_y, im_y, alpha: float) -> list[float]:
    """Rows of (R, F) inputs -> one NCFD per row, with a loop over frequencies."""
    out = []
    for row in range(re_x.shape[0]):
        total = 0.0
        for f in range(re_x.shape[1]):
            amplitude, phase = _reference_terms(
                complex(re_x[row, f], im_x[row, f]), complex(re_y[row, f], im_y[row, f])
            )
            total += math.sqrt(alpha * amplitude + (1 - alpha) * phase)
        out.append(total / re_x.shape[1])
    return out


# ---- CF embeddings ---------------------------------------------------------------------------


def test_normalize_features_gives_unit_rows_and_keeps_zero_rows():
    features = _randn(5, 7, seed=0) * 3.0
    features[2] = 0.0
    normalised = normalize_features(features)
    norms = normalised.norm(dim=1)
    expected = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    _assert_close(norms, expected, 1e-12, "row norms")
    direction = features[0] / math.sqrt(sum(v * v for v in features[0].tolist()))
    _assert_close(normalised[0], direction, 1e-12, "row 0 direction")


def test_cf_embed_matches_loop():
    features, freqs = _randn(11, 4, seed=1), _randn(6, 4, seed=2)
    re, im = cf_embed(features, freqs)
    reference = _loop_cf(features.tolist(), freqs.tolist())
    _assert_close(re, torch.tensor([v.real for v in reference], dtype=torch.float64), 1e-12, "re")
    _assert_close(im, torch.tensor([v.imag for v in reference], dtype=torch.float64), 1e-12, "im")


def test_cf_embed_per_class_matches_loop_and_empty_class_is_zero():
    num_classes = 4
    features, freqs = _randn(19, 3, seed=3), _randn(5, 3, seed=4)
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0, 1, 1, 2, 0, 0, 2, 1])  # no class 3
    re, im = cf_embed_per_class(features, labels, freqs, num_classes)
    re_ref, im_ref = _loop_cf_per_class(features, labels, freqs, num_classes)
    _assert_close(re, re_ref, 1e-12, "re per class")
    _assert_close(im, im_ref, 1e-12, "im per class")
    assert torch.all(re[3] == 0) and torch.all(im[3] == 0), "empty class must give zeros"


def test_cf_embed_per_class_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels"):
        cf_embed_per_class(_randn(4, 3, seed=0), torch.zeros(5).long(), _randn(2, 3, seed=1), 2)
    with pytest.raises(ValueError, match="freqs"):
        cf_embed_per_class(_randn(4, 3, seed=0), torch.zeros(4).long(), _randn(2, 5, seed=1), 2)


def test_accumulator_in_uneven_chunks_equals_one_shot():
    num_classes, num_freqs = 5, 9
    features = _randn(53, 6, seed=5, dtype=torch.float32)
    labels = torch.randint(0, num_classes - 1, (53,), generator=_gen(6))  # class 4 never seen
    freqs = _randn(num_freqs, 6, seed=7, dtype=torch.float32)
    accumulator = CFAccumulator(num_classes, num_freqs)
    with torch.enable_grad():  # add() must not build a graph even when grads are on
        freqs_with_grad = freqs.clone().requires_grad_(True)
        for start in range(0, 53, 7):
            accumulator.add(features[start : start + 7], labels[start : start + 7], freqs_with_grad)
    re, im = accumulator.mean()
    assert re.dtype == torch.float32 and not re.requires_grad
    re_ref, im_ref = cf_embed_per_class(features, labels, freqs, num_classes)
    _assert_close(re, re_ref, 1e-6, "accumulated re vs one shot")
    _assert_close(im, im_ref, 1e-6, "accumulated im vs one shot")
    expected_counts = torch.bincount(labels, minlength=num_classes)
    assert torch.equal(accumulator.counts, expected_counts), (accumulator.counts, expected_counts)
    # and against the float64 loop, through a float64 accumulator
    accumulator64 = CFAccumulator(num_classes, num_freqs, dtype=torch.float64)
    for start in range(0, 53, 7):
        chunk = slice(start, start + 7)
        accumulator64.add(features[chunk].double(), labels[chunk], freqs.double())
    re_loop, im_loop = _loop_cf_per_class(features.double(), labels, freqs.double(), num_classes)
    _assert_close(accumulator64.mean()[0], re_loop, 1e-12, "float64 accumulated re vs loop")
    _assert_close(accumulator64.mean()[1], im_loop, 1e-12, "float64 accumulated im vs loop")


def test_empirical_cf_of_normal_samples_approaches_closed_form():
    num_samples, mu, sigma = 200_000, 0.7, 0.8
    samples = mu + sigma * torch.randn(num_samples, 1, generator=_gen(8), dtype=torch.float64)
    t = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    re, im = cf_embed(samples, t.unsqueeze(1))
    envelope = torch.exp(-(sigma**2) * t**2 / 2)
    # cos and sin are bounded by 1, so each mean has standard error <= 1/sqrt(N) ~ 2.2e-3;
    # 5 standard errors over 26 comparisons is a false-alarm rate far below 1e-4.
    tolerance = 5.0 / math.sqrt(num_samples)
    _assert_close(re, torch.cos(t * mu) * envelope, tolerance, "Re Phi vs cos(t mu) e^{-s^2t^2/2}")
    _assert_close(im, torch.sin(t * mu) * envelope, tolerance, "Im Phi vs sin(t mu) e^{-s^2t^2/2}")


# ---- NCFD ------------------------------------------------------------------------------------


def _random_cf_pair(seed: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    # CF values lie in the unit disc; uniform in [-0.7, 0.7]^2 keeps them inside it.
    return [
        (torch.rand(shape, generator=_gen(seed + i), dtype=torch.float64) - 0.5) * 1.4
        for i in range(4)
    ]


def test_ncfd_terms_match_atan2_reference_and_sum_to_squared_difference():
    re_x, im_x, re_y, im_y = _random_cf_pair(10, (2, 3, 8))
    amplitude, phase = ncfd_terms(re_x, im_x, re_y, im_y)
    amplitude_ref = torch.empty_like(amplitude)
    phase_ref = torch.empty_like(phase)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in re_x.shape]).tolist():
        index = tuple(index)
        amplitude_ref[index], phase_ref[index] = _reference_terms(
            complex(re_x[index], im_x[index]), complex(re_y[index], im_y[index])
        )
    _assert_close(amplitude, amplitude_ref, 1e-12, "amplitude term vs atan2 reference")
    _assert_close(phase, phase_ref, 1e-12, "phase term vs atan2 reference")
    squared_difference = (re_x - re_y) ** 2 + (im_x - im_y) ** 2
    _assert_close(amplitude + phase, squared_difference, 1e-12, "amp + phase vs |dPhi|^2")
    total = ncfd(re_x, im_x, re_y, im_y, alpha=0.5)
    assert total.shape == (2, 3)
    expected = torch.sqrt(squared_difference / 2).mean(-1)
    _assert_close(total, expected, 1e-12, "alpha=1/2 vs mean |dPhi|/sqrt2")


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_ncfd_matches_loop_reference(alpha):
    re_x, im_x, re_y, im_y = _random_cf_pair(20, (3, 7))
    expected = torch.tensor(_reference_ncfd(re_x, im_x, re_y, im_y, alpha), dtype=torch.float64)
    _assert_close(ncfd(re_x, im_x, re_y, im_y, alpha=alpha), expected, 1e-6, f"ncfd alpha={alpha}")


def test_ncfd_rejects_alpha_outside_unit_interval():
    re_x, im_x, re_y, im_y = _random_cf_pair(0, (4,))
    with pytest.raises(ValueError, match="alpha"):
        ncfd(re_x, im_x, re_y, im_y, alpha=1.5)


def test_ncfd_of_a_set_with_itself_is_zero_with_finite_gradient():
    eps = 1e-12
    features = _randn(6, 4, seed=30).requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    freqs = _randn(8, 4, seed=31)
    value = ncfd_per_class(features, labels, features.detach(), labels, freqs, 2, eps=eps)
    assert torch.all(value <= math.sqrt(eps) * (1 + 1e-9)), f"NCFD(X, X) = {value}"
    value.sum().backward()
    assert torch.isfinite(features.grad).all(), f"gradient at X == Y not finite: {features.grad}"
    # Why the clamp: without it, sqrt'(0) = inf and 0 * inf = NaN.
    naive_features = features.detach().clone().requires_grad_(True)
    re_x, im_x = cf_embed_per_class(naive_features, labels, freqs, 2)
    re_y, im_y = cf_embed_per_class(features.detach(), labels, freqs, 2)
    torch.sqrt((re_x - re_y) ** 2 + (im_x - im_y) ** 2).sum().backward()
    assert torch.isnan(naive_features.grad).any(), "expected the unclamped sqrt to give NaN"


def test_ncfd_gradient_is_finite_when_a_cf_is_exactly_zero():
    # |Phi| = sqrt(re^2 + im^2) at Phi = 0 is where an unclamped modulus would give NaN.
    re_x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    im_x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    re_y, im_y = _random_cf_pair(40, (5,))[:2]
    ncfd(re_x, im_x, re_y, im_y, alpha=0.3).backward()
    assert torch.isfinite(re_x.grad).all(), re_x.grad
    assert torch.isfinite(im_x.grad).all(), im_x.grad


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_ncfd_is_symmetric(alpha):
    freqs = _randn(16, 5, seed=50)
    re_x, im_x = cf_embed(_randn(9, 5, seed=51), freqs)
    re_y, im_y = cf_embed(_randn(4, 5, seed=52) + 0.5, freqs)
    forward = ncfd(re_x, im_x, re_y, im_y, alpha=alpha)
    backward = ncfd(re_y, im_y, re_x, im_x, alpha=alpha)
    assert abs(forward.item() - backward.item()) <= 1e-12, (forward.item(), backward.item())
    assert forward.item() > 1e-3, "the two sets should differ"


def test_ncfd_at_alpha_half_satisfies_triangle_inequality():
    dim, freqs = 4, _randn(12, 4, seed=60)
    generator = _gen(61)
    triples = []
    for _ in range(200):  # three independent random empirical sets of random sizes and spreads
        sets = []
        for _ in range(3):
            size = int(torch.randint(1, 9, (1,), generator=generator))
            spread = float(torch.rand(1, generator=generator, dtype=torch.float64)) * 2
            sets.append(spread * torch.randn(size, dim, generator=generator, dtype=torch.float64))
        triples.append(sets)
    for _ in range(50):  # Y = X u Z with |X| = |Z|: Phi_Y is the midpoint of Phi_X and Phi_Z
        x = torch.randn(5, dim, generator=generator, dtype=torch.float64)
        z = torch.randn(5, dim, generator=generator, dtype=torch.float64) + 1.0
        triples.append([x, torch.cat([x, z]), z])

    def distance(a, b, squared: bool = False):
        re_a, im_a = cf_embed(a, freqs)
        re_b, im_b = cf_embed(b, freqs)
        if squared:  # mean of Chf without the sqrt: not a metric
            amplitude, phase = ncfd_terms(re_a, im_a, re_b, im_b)
            return (0.5 * amplitude + 0.5 * phase).mean().item()
        return ncfd(re_a, im_a, re_b, im_b, alpha=0.5).item()

    slack = 1e-6 + 1e-12  # the eps clamp adds at most sqrt(eps) to a distance
    for x, y, z in triples:
        direct, via_y = distance(x, z), distance(x, y) + distance(y, z)
        assert direct <= via_y + slack, f"triangle violated: {direct} > {via_y}"
    # The test has teeth: the squared form violates it on the midpoint triples.
    violations = sum(
        distance(x, z, squared=True) > distance(x, y, squared=True) + distance(y, z, squared=True)
        for x, y, z in triples[200:]
    )
    assert violations > 0, "expected the squared discrepancy to break the triangle inequality"


def test_gradcheck_through_per_class_cf_and_ncfd():
    num_classes = 2
    features_x = _randn(6, 3, seed=70).requires_grad_(True)
    labels_x = torch.tensor([0, 1, 0, 1, 1, 0])
    features_y = _randn(5, 3, seed=71) + 0.8
    labels_y = torch.tensor([1, 0, 0, 1, 0])
    freqs = _randn(4, 3, seed=72).requires_grad_(True)

    def loss(features, frequencies):
        return ncfd_per_class(
            features, labels_x, features_y, labels_y, frequencies, num_classes, alpha=0.3
        )

    # stay away from the clamps: every per-frequency Chf and |Phi|^2 far above eps
    re_x, im_x = cf_embed_per_class(features_x, labels_x, freqs, num_classes)
    re_y, im_y = cf_embed_per_class(features_y, labels_y, freqs, num_classes)
    amplitude, phase = ncfd_terms(re_x, im_x, re_y, im_y)
    assert (0.3 * amplitude + 0.7 * phase).min() > 1e-4
    assert (re_x**2 + im_x**2).min() > 1e-4 and (re_y**2 + im_y**2).min() > 1e-4
    assert torch.autograd.gradcheck(loss, (features_x, freqs), eps=1e-6, atol=1e-7)


def test_gradcheck_cf_embed_and_normalize():
    features = _randn(5, 3, seed=80).requires_grad_(True)
    freqs = _randn(4, 3, seed=81).requires_grad_(True)
    assert torch.autograd.gradcheck(cf_embed, (features, freqs), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(normalize_features, (features,), eps=1e-6, atol=1e-7)


def test_ncfd_per_class_matches_loop_reference():
    num_classes = 3
    features_x, labels_x = _randn(10, 4, seed=90), torch.randint(0, 3, (10,), generator=_gen(91))
    features_y = _randn(7, 4, seed=92) * 0.5
    labels_y = torch.randint(0, 3, (7,), generator=_gen(93))
    freqs = _randn(6, 4, seed=94)
    re_x, im_x = _loop_cf_per_class(features_x, labels_x, freqs, num_classes)
    re_y, im_y = _loop_cf_per_class(features_y, labels_y, freqs, num_classes)
    expected = torch.tensor(_reference_ncfd(re_x, im_x, re_y, im_y, 0.4), dtype=torch.float64)
    actual = ncfd_per_class(
        features_x, labels_x, features_y, labels_y, freqs, num_classes, alpha=0.4
    )
    _assert_close(actual, expected, 1e-6, "ncfd_per_class vs loop")


# ---- MMD baseline ----------------------------------------------------------------------------


def test_mmd_per_class_matches_loop_reference():
    num_classes = 4
    features_x = _randn(12, 5, seed=100)
    labels_x = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1])
    features_y, labels_y = _randn(6, 5, seed=101) + 0.3, torch.tensor([2, 1, 0, 1, 3, 2])
    expected = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        means = []
        for features, labels in ((features_x, labels_x), (features_y, labels_y)):
            rows = [features[i].tolist() for i in range(len(labels)) if labels[i] == c]
            means.append([sum(col) / len(rows) for col in zip(*rows)] if rows else [0.0] * 5)
        expected[c] = sum((a - b) ** 2 for a, b in zip(*means))
    actual = mmd_per_class(features_x, labels_x, features_y, labels_y, num_classes)
    _assert_close(actual, expected, 1e-12, "mmd_per_class vs loop")
    features_x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f: mmd_per_class(f, labels_x, features_y, labels_y, num_classes), (features_x,)
    )
