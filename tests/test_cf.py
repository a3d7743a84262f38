"""ncfm_core.cf against slow, obviously-correct references: loops, complex numbers, closed forms."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from ncfm_core.cf import (
    cf_chunk_freq_grad,
    cf_chunk_sums,
    cf_class_major,
    cf_embed,
    cf_embed_per_class,
    chunk_bounds,
    class_means,
    class_row_sums,
    mmd,
    ncfd,
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


def _loop_freq_grad(features, freqs, labels, per_class, grad_re, grad_im) -> torch.Tensor:
    """d/dt_f of sum_{c,f} grad_re[c, f] re[c, f] + grad_im[c, f] im[c, f], one row at a time:
    with g = grad_re - j grad_im, each row adds Re(g e^{j<t_f, x_i>}) / per_class to the sum, so
    it adds Re(j g e^{j<t_f, x_i>}) x_i / per_class to the gradient."""
    grad = torch.zeros_like(freqs)
    for f in range(freqs.shape[0]):
        for i in range(features.shape[0]):
            c = int(labels[i])
            g = complex(grad_re[c, f], -grad_im[c, f])
            phase = sum(t * x for t, x in zip(freqs[f].tolist(), features[i].tolist()))
            weight = (1j * g * cmath.exp(1j * phase)).real / per_class
            for j in range(features.shape[1]):
                grad[f, j] += weight * float(features[i, j])
    return grad


def _ncfd_per_class(features_x, labels_x, features_y, labels_y, freqs, num_classes, alpha=0.5, eps=1e-12):
    """NCFD per class between two labelled sets: the per-class CF of each side, then ncfd."""
    re_x, im_x = cf_embed_per_class(features_x, labels_x, freqs, num_classes)
    re_y, im_y = cf_embed_per_class(features_y, labels_y, freqs, num_classes)
    return ncfd(re_x, im_x, re_y, im_y, alpha=alpha, eps=eps)


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


def test_float32_chunks_accumulated_in_float64_equal_one_shot_and_loop():
    """The loop's real side: float32 chunks of uneven sizes, sums kept in float64."""
    num_classes, per_class, num_freqs = 5, 11, 9
    features = _randn(num_classes * per_class, 6, seed=5, dtype=torch.float32)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    freqs = _randn(num_freqs, 6, seed=7, dtype=torch.float32)
    re_loop, im_loop = _loop_cf_per_class(features.double(), labels, freqs.double(), num_classes)
    for chunk in (55, 22, 7, 3):
        re = torch.zeros(num_classes, num_freqs, dtype=torch.float64)
        im = torch.zeros_like(re)
        for s, e in chunk_bounds(num_classes, per_class, chunk):
            first, cos_sums, sin_sums = cf_chunk_sums(features[s:e], freqs, s, per_class)
            assert cos_sums.dtype == torch.float32
            re[first : first + cos_sums.shape[0]] += cos_sums.double()
            im[first : first + sin_sums.shape[0]] += sin_sums.double()
        re, im = (re / per_class).float(), (im / per_class).float()
        re_ref, im_ref = cf_embed_per_class(features, labels, freqs, num_classes)
        _assert_close(re, re_ref, 1e-6, f"chunk {chunk}: accumulated re vs one shot")
        _assert_close(im, im_ref, 1e-6, f"chunk {chunk}: accumulated im vs one shot")
        _assert_close(re.double(), re_loop, 1e-6, f"chunk {chunk}: accumulated re vs float64 loop")
        _assert_close(im.double(), im_loop, 1e-6, f"chunk {chunk}: accumulated im vs float64 loop")


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
    value = _ncfd_per_class(features, labels, features.detach(), labels, freqs, 2, eps=eps)
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
        return _ncfd_per_class(
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


def test_gradcheck_ncfd():
    re_x, im_x, re_y, im_y = (t.requires_grad_(True) for t in _random_cf_pair(75, (2, 5)))
    amplitude, phase = ncfd_terms(re_x, im_x, re_y, im_y)
    assert (0.3 * amplitude + 0.7 * phase).min() > 1e-4  # away from the clamps
    assert (re_x**2 + im_x**2).min() > 1e-4 and (re_y**2 + im_y**2).min() > 1e-4
    assert torch.autograd.gradcheck(
        lambda *cfs: ncfd(*cfs, alpha=0.3), (re_x, im_x, re_y, im_y), eps=1e-6, atol=1e-7
    )


def test_per_class_ncfd_matches_loop_reference():
    num_classes = 3
    features_x, labels_x = _randn(10, 4, seed=90), torch.randint(0, 3, (10,), generator=_gen(91))
    features_y = _randn(7, 4, seed=92) * 0.5
    labels_y = torch.randint(0, 3, (7,), generator=_gen(93))
    freqs = _randn(6, 4, seed=94)
    re_x, im_x = _loop_cf_per_class(features_x, labels_x, freqs, num_classes)
    re_y, im_y = _loop_cf_per_class(features_y, labels_y, freqs, num_classes)
    expected = torch.tensor(_reference_ncfd(re_x, im_x, re_y, im_y, 0.4), dtype=torch.float64)
    actual = _ncfd_per_class(
        features_x, labels_x, features_y, labels_y, freqs, num_classes, alpha=0.4
    )
    _assert_close(actual, expected, 1e-6, "per-class ncfd vs loop")


# ---- MMD baseline ----------------------------------------------------------------------------


def test_mmd_of_class_means_matches_loop_reference():
    num_classes, per_class = 4, 3
    features_x = _randn(num_classes * per_class, 5, seed=100)  # class-major
    means_y = _randn(num_classes, 5, seed=101) + 0.3
    expected = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        rows = [features_x[c * per_class + i].tolist() for i in range(per_class)]
        mean_x = [sum(col) / per_class for col in zip(*rows)]
        expected[c] = sum((a - b) ** 2 for a, b in zip(mean_x, means_y[c].tolist()))
    actual = mmd(class_means(features_x, per_class), means_y)
    _assert_close(actual, expected, 1e-12, "mmd of class means vs loop")
    features_x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: mmd(class_means(f, per_class), means_y), (features_x,))


# ---- class-major pieces of the distillation loop ---------------------------------------------


@pytest.mark.parametrize("classes, per_class, chunk", [(3, 10, 10_000), (3, 10, 7), (4, 5, 10), (4, 5, 12), (2, 9, 1)])
def test_chunk_bounds_cover_every_row_once_and_respect_classes(classes, per_class, chunk):
    bounds = chunk_bounds(classes, per_class, chunk)
    rows = [r for s, e in bounds for r in range(s, e)]
    assert rows == list(range(classes * per_class))
    for s, e in bounds:
        assert 0 < e - s <= max(chunk, 1)
        whole = s % per_class == 0 and (e - s) % per_class == 0
        assert whole or s // per_class == (e - 1) // per_class, (s, e)


def test_chunk_bounds_small_cases_by_hand():
    assert chunk_bounds(3, 4, 8) == [(0, 8), (8, 12)]  # two whole classes, then the last one
    assert chunk_bounds(2, 4, 100) == [(0, 8)]
    assert chunk_bounds(1, 10, 4) == [(0, 4), (4, 8), (8, 10)]  # 3 pieces of at most 4 rows
    assert chunk_bounds(2, 6, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]  # 2 equal pieces per class


@pytest.mark.parametrize("start, n", [(0, 12), (4, 8), (0, 4), (5, 3), (9, 1)])
def test_class_row_sums_matches_loop(start, n):
    per_class, width = 4, 3
    values = _randn(n, width, seed=start + 10 * n)
    first, sums = class_row_sums(values, start, per_class)
    expected = {}
    for i in range(n):
        c = (start + i) // per_class
        row = expected.setdefault(c, [0.0] * width)
        for j in range(width):
            row[j] += float(values[i, j])
    assert first == min(expected)
    assert list(expected) == list(range(first, first + sums.shape[0]))
    _assert_close(sums, torch.tensor(list(expected.values()), dtype=torch.float64), 1e-12, "class row sums")


def test_class_row_sums_refuses_a_chunk_across_a_class_boundary():
    with pytest.raises(ValueError, match="neither"):
        class_row_sums(torch.ones(4, 2), 8, 10)  # rows 8..11 straddle classes 0 and 1
    with pytest.raises(ValueError, match="neither"):
        cf_chunk_freq_grad(torch.ones(4, 2), torch.ones(3, 2), 8, 10, torch.ones(2, 3), torch.ones(2, 3))


def test_class_means_and_cf_class_major_match_loop():
    num_classes, per_class = 3, 4
    features, freqs = _randn(num_classes * per_class, 3, seed=110), _randn(5, 3, seed=111)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    means = [[sum(col) / per_class for col in zip(*features[c * per_class : (c + 1) * per_class].tolist())]
             for c in range(num_classes)]
    _assert_close(class_means(features, per_class), torch.tensor(means, dtype=torch.float64), 1e-12, "means")
    re, im = cf_class_major(features, freqs, per_class)
    re_ref, im_ref = _loop_cf_per_class(features, labels, freqs, num_classes)
    _assert_close(re, re_ref, 1e-12, "class-major re vs loop")
    _assert_close(im, im_ref, 1e-12, "class-major im vs loop")
    features.requires_grad_(True)
    freqs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, t: cf_class_major(x, t, per_class), (features, freqs))


@pytest.mark.parametrize("chunk", [30, 10, 4, 1])
def test_chunked_cf_sums_equal_the_per_class_cf(chunk):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(10)
    freqs = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    re, im = torch.zeros(3, 7, dtype=torch.float64), torch.zeros(3, 7, dtype=torch.float64)
    for s, e in chunk_bounds(3, 10, chunk):
        first, cos_sums, sin_sums = cf_chunk_sums(features[s:e], freqs, s, 10)
        re[first : first + cos_sums.shape[0]] += cos_sums
        im[first : first + sin_sums.shape[0]] += sin_sums
    ref_re, ref_im = cf_embed_per_class(features, labels, freqs, 3)
    torch.testing.assert_close(re / 10, ref_re, atol=1e-12, rtol=0)
    torch.testing.assert_close(im / 10, ref_im, atol=1e-12, rtol=0)
    loop_re, loop_im = _loop_cf_per_class(features, labels, freqs, 3)
    _assert_close(re / 10, loop_re, 1e-12, f"chunk {chunk}: re vs loop")
    _assert_close(im / 10, loop_im, 1e-12, f"chunk {chunk}: im vs loop")


def test_cf_chunk_sums_gradcheck():
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    freqs = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: cf_chunk_sums(x, t, 0, 3)[1:], (features, freqs))


@pytest.mark.parametrize("chunk", [30, 10, 3])
def test_closed_form_frequency_gradient_equals_autograd(chunk):
    """psi's gradient through the real CF, chunk by chunk, equals autograd through
    cf_embed_per_class, in float64."""
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(10)
    freqs = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_re = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    grad_im = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    re, im = cf_embed_per_class(features, labels, freqs, 3)
    (reference,) = torch.autograd.grad((grad_re * re + grad_im * im).sum(), freqs)
    total = sum(
        cf_chunk_freq_grad(features[s:e], freqs.detach(), s, 10, grad_re, grad_im)
        for s, e in chunk_bounds(3, 10, chunk)
    )
    torch.testing.assert_close(total, reference, atol=1e-12, rtol=1e-10)
    loop = _loop_freq_grad(features, freqs.detach(), labels, 10, grad_re, grad_im)
    _assert_close(total, loop, 1e-10, f"chunk {chunk}: closed-form frequency gradient vs loop")


def _chunk_objective(features, freqs, start, per_class, grad_re, grad_im):
    """The chunk's share of sum(grad_re * re + grad_im * im), from cf_chunk_sums."""
    first, cos_sums, sin_sums = cf_chunk_sums(features, freqs, start, per_class)
    rows = slice(first, first + cos_sums.shape[0])
    return (grad_re[rows] * cos_sums + grad_im[rows] * sin_sums).sum() / per_class


class _ClosedFormChunkObjective(torch.autograd.Function):
    """_chunk_objective as a function of the frequencies whose backward is cf_chunk_freq_grad,
    so gradcheck compares the closed form with finite differences."""

    @staticmethod
    def forward(ctx, freqs, features, start, per_class, grad_re, grad_im):
        ctx.save_for_backward(freqs, features, grad_re, grad_im)
        ctx.start, ctx.per_class = start, per_class
        return _chunk_objective(features, freqs, start, per_class, grad_re, grad_im)

    @staticmethod
    def backward(ctx, grad_output):
        freqs, features, grad_re, grad_im = ctx.saved_tensors
        closed = cf_chunk_freq_grad(features, freqs, ctx.start, ctx.per_class, grad_re, grad_im)
        return grad_output * closed, None, None, None, None, None


@pytest.mark.parametrize("chunk", [12, 4, 2])
def test_cf_chunk_freq_grad_gradcheck_and_autograd_of_chunk_sums(chunk):
    classes, per_class = 3, 4
    features = _randn(classes * per_class, 3, seed=120)
    freqs = _randn(4, 3, seed=121).requires_grad_(True)
    grad_re, grad_im = _randn(classes, 4, seed=122), _randn(classes, 4, seed=123)
    for s, e in chunk_bounds(classes, per_class, chunk):
        args = (features[s:e], s, per_class, grad_re, grad_im)
        assert torch.autograd.gradcheck(
            lambda t: _ClosedFormChunkObjective.apply(t, *args), (freqs,), eps=1e-6, atol=1e-8
        ), (s, e)
        (autograd,) = torch.autograd.grad(_chunk_objective(features[s:e], freqs, *args[1:]), freqs)
        closed = cf_chunk_freq_grad(features[s:e], freqs.detach(), *args[1:])
        _assert_close(closed, autograd, 1e-12, f"rows [{s}, {e}): closed form vs autograd of the chunk sums")


# -- CF projections in TF32 (issue 14) ------------------------------------------------------------


def _tf32(x: torch.Tensor, truncate: bool) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (10 mantissa bits), or TF32 by truncation (the worse case;
    which one tensor cores apply is up to the hardware), kept in fp32."""
    bits = x.contiguous().view(torch.int32)
    if not truncate:
        bits = bits + 0x0FFF + ((bits >> 13) & 1)  # round half to even on the 13 dropped bits
    return (bits & ~0x1FFF).view(torch.float32)


def test_cf_precision_resolves_to_tf32_on_cuda_only():
    from ncfm_core.cf import resolve_cf_precision

    assert resolve_cf_precision("auto", "cuda:0") == "tf32" == resolve_cf_precision("tf32", "cuda")
    assert resolve_cf_precision("auto", "cpu") == "fp32" == resolve_cf_precision("tf32", "cpu")
    assert resolve_cf_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="CF precision"):
        resolve_cf_precision("bf16", "cuda")


def test_tf32_projection_on_cpu_is_the_fp32_product_bit_for_bit():
    """CPU has no TF32: asking for it runs the very same product, so CPU runs stay bit-identical."""
    from ncfm_core.cf import project

    gen = _gen(3)
    features = torch.randn(50, 16, generator=gen, requires_grad=True)
    freqs = torch.randn(8, 16, generator=gen, requires_grad=True)
    plain = features @ freqs.T
    tf32 = project(features, freqs, "tf32")
    assert torch.equal(plain, tf32)
    g = torch.randn(50, 8, generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(plain, (features, freqs), g),
                                                  torch.autograd.grad(tf32, (features, freqs), g)))


def test_tf32_autograd_function_and_its_flag_scope():
    """The CUDA path's pieces, run on CPU: the custom backward equals autograd's, and the TF32
    flag is on only inside the projection and restored after (the networks never see it)."""
    from ncfm_core.cf import _cuda_matmul_tf32, _TF32Projection

    backend = torch.backends.cuda.matmul
    before = backend.fp32_precision
    with _cuda_matmul_tf32(True):
        assert backend.fp32_precision == "tf32"
    assert backend.fp32_precision == before
    with _cuda_matmul_tf32(False):
        assert backend.fp32_precision == before
    gen = _gen(4)
    features = torch.randn(40, 12, generator=gen, requires_grad=True)
    freqs = torch.randn(6, 12, generator=gen, requires_grad=True)
    g = torch.randn(40, 6, generator=gen)
    out = _TF32Projection.apply(features, freqs)
    torch.testing.assert_close(out, features @ freqs.T, rtol=0, atol=0)
    for mine, reference in zip(torch.autograd.grad(out, (features, freqs), g),
                               torch.autograd.grad(features @ freqs.T, (features, freqs), g)):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)
    assert backend.fp32_precision == before


@pytest.mark.parametrize("num_freqs", [1024, 4096])
@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_tf32_rounded_projections_keep_the_ncfd_and_its_gradients(num_freqs, scale):
    """Realistic inputs: post-ReLU features (d = 2048) of two classes, L2-normalised, 300 real and
    100 synthetic per class; frequencies ~N(0, scale^2 I) (1: no psi; 20: psi's largest scales).
    Projection inputs rounded to TF32 (nearest and truncated), products in fp32; gradients through
    the rounded values. Measured (seed 0): phase error RMS ~3e-4 x scale (nearest) / ~8e-4 x scale
    (truncated); NCFD within 7e-4 relative; gradients within 1.3e-3 (scale 1) and 2.8e-2 (scale 20)
    relative (L2). Stated bounds, with margin: NCFD 2e-3, gradients 1e-2 x max(1, scale / 5).
    Every iteration draws new real images, whose CF noise moves these gradients by O(1): a 1%
    error is far below it. (bf16 inputs measured 8x worse, and a bf16 output 0.25 rad steps at
    |p| ~ 32; see ncfm_core.cf.)"""
    gen = _gen(0)
    d, per_real, per_syn, classes = 2048, 300, 100, 2
    centres = torch.rand(classes, d, generator=gen)
    real = normalize_features(torch.relu(
        centres.repeat_interleave(per_real, 0) + 0.5 * torch.randn(classes * per_real, d, generator=gen)))
    syn0 = normalize_features(torch.relu(
        centres.repeat_interleave(per_syn, 0) + 0.6 * torch.randn(classes * per_syn, d, generator=gen)))
    freqs0 = scale * torch.randn(num_freqs, d, generator=gen)

    def loss_and_grads(rounding):
        syn, freqs = syn0.clone().requires_grad_(True), freqs0.clone().requires_grad_(True)

        def projections(x, t):
            exact = x @ t.T
            if rounding is None:
                return exact
            return exact + (rounding(x.detach()) @ rounding(t.detach()).T - exact).detach()

        pr, ps = projections(real, freqs), projections(syn, freqs)
        loss = ncfd(class_means(torch.cos(pr), per_real), class_means(torch.sin(pr), per_real),
                    class_means(torch.cos(ps), per_syn), class_means(torch.sin(ps), per_syn)).sum()
        return (loss.detach(), *torch.autograd.grad(loss, (syn, freqs)))

    exact = loss_and_grads(None)
    grad_bound = 1e-2 * max(1.0, scale / 5)
    for truncate in (False, True):
        loss, grad_syn, grad_freqs = loss_and_grads(lambda x, t=truncate: _tf32(x, t))
        assert abs(float(loss - exact[0])) <= 2e-3 * float(exact[0])
        assert float((grad_syn - exact[1]).norm() / exact[1].norm()) <= grad_bound
        assert float((grad_freqs - exact[2]).norm() / exact[2].norm()) <= grad_bound


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tf32_projection_on_cuda_is_close_to_fp32_and_leaves_the_flag_alone():
    """The GPU check of the TF32 lever: the real CUDA path, forward and both gradients, within
    the bounds the CPU simulation states, and the global matmul setting untouched after."""
    from ncfm_core.cf import project

    backend = torch.backends.cuda.matmul
    before = backend.fp32_precision
    gen = torch.Generator(device="cuda").manual_seed(0)
    features = normalize_features(torch.rand(600, 2048, generator=gen, device="cuda")).requires_grad_(True)
    freqs = (5.0 * torch.randn(1024, 2048, generator=gen, device="cuda")).requires_grad_(True)
    g = torch.randn(600, 1024, generator=gen, device="cuda")
    exact = project(features, freqs, "fp32")
    fast = project(features, freqs, "tf32")
    assert backend.fp32_precision == before
    assert float((fast - exact).abs().max()) < 5e-2 and float((fast - exact).pow(2).mean().sqrt()) < 1e-2
    for a, b in zip(torch.autograd.grad(fast, (features, freqs), g), torch.autograd.grad(exact, (features, freqs), g)):
        assert float((a - b).norm() / b.norm()) < 1e-2
    assert backend.fp32_precision == before
