"""Frequency samplers, gradient reversal, and the minmax: psi must really ascend the NCFD."""

from __future__ import annotations

import math

import pytest
import torch

from ncfm_core.cf import cf_embed_per_class, ncfd, normalize_features
from ncfm_core.errors import ConfigError
from ncfm_core.sampler import (
    GaussianSampler,
    MixtureSampler,
    minmax_step,
    reverse_gradient,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _asymmetric_sampler(dim: int, num_freqs: int, num_components: int) -> MixtureSampler:
    """A float64 sampler whose components differ, so the logits get a gradient at once
    (equal components give the logits an exactly-zero gradient)."""
    sampler = MixtureSampler(dim, num_freqs, num_components=num_components).double()
    with torch.no_grad():
        generator = _gen(99)
        sampler.log_scales.copy_(0.3 * torch.randn(num_components, dim, generator=generator))
        sampler.logits.copy_(torch.randn(num_components, generator=generator))
    return sampler


# ---- Gaussian --------------------------------------------------------------------------------


def test_gaussian_sampler_is_seeded_fresh_per_call_and_has_the_right_scale():
    sampler = GaussianSampler(dim=50, num_freqs=2000, scale=2.5)
    assert list(sampler.parameters()) == []
    first = sampler.sample(_gen(0))
    assert first.shape == (2000, 50) and first.dtype == torch.float32
    assert torch.equal(first, sampler.sample(_gen(0))), "same seed must give the same draw"
    generator = _gen(1)
    one, two = sampler.sample(generator), sampler.sample(generator)
    assert not torch.equal(one, two), "consecutive calls must redraw"
    # 100k draws: the std estimate has relative standard error 1/sqrt(2 * 1e5) ~ 0.22%
    std, mean = first.double().std().item(), first.double().mean().item()
    assert abs(std - 2.5) <= 0.02 * 2.5, f"empirical std {std} vs scale 2.5"
    assert abs(mean) <= 5 * 2.5 / math.sqrt(first.numel()), f"empirical mean {mean} vs 0"
    assert sampler.sample(_gen(0), dtype=torch.float64).dtype == torch.float64


def test_samplers_reject_bad_configuration():
    with pytest.raises(ConfigError):
        GaussianSampler(dim=4, num_freqs=0)
    with pytest.raises(ConfigError):
        MixtureSampler(dim=4, num_freqs=8, init_scale=100.0)  # above max_scale


# ---- Mixture ---------------------------------------------------------------------------------


def test_mixture_sampler_draws_distinct_frequencies_of_the_chosen_component():
    num_freqs, dim = 64, 6
    sampler = _asymmetric_sampler(dim, num_freqs, num_components=4)
    assert MixtureSampler(dim, num_freqs).num_components == num_freqs // 16
    assert MixtureSampler(dim, 8).num_components == 1
    freqs, components, noise = sampler.draw(_gen(0))
    assert freqs.shape == (num_freqs, dim)
    # Every frequency is its own draw (the authors repeat F/16 vectors 16 times each).
    distances = torch.cdist(freqs, freqs) + torch.eye(num_freqs, dtype=freqs.dtype)
    assert distances.min() > 1e-6, f"two frequencies coincide: min distance {distances.min()}"
    assert torch.unique(freqs, dim=0).shape[0] == num_freqs
    # Hard forward: each row is exactly its component's scale times its own noise.
    assert torch.equal(freqs, sampler.scales()[components] * noise)
    assert len(set(components.tolist())) > 1, "with 64 draws several components should appear"
    sample = sampler.sample(_gen(0), dtype=torch.float64)
    assert torch.equal(sample, freqs), "sample() must be draw()'s frequencies"
    assert not torch.equal(sampler.sample(_gen(1), dtype=torch.float64), sample)


def test_mixture_sampler_gradients_reach_log_scales_and_logits():
    sampler = _asymmetric_sampler(dim=5, num_freqs=32, num_components=3)
    freqs = sampler.sample(_gen(0), dtype=torch.float64)
    torch.cos(freqs @ torch.ones(5, dtype=torch.float64)).sum().backward()
    for name, grad in (("log_scales", sampler.log_scales.grad), ("logits", sampler.logits.grad)):
        assert grad is not None and torch.isfinite(grad).all(), f"{name}: {grad}"
        assert grad.abs().max() > 1e-6, f"{name} got no gradient: {grad}"


def test_mixture_sampler_log_scale_gradient_passes_gradcheck():
    # With the seed fixed, the component choice is fixed and t is smooth in the log-scales.
    sampler = _asymmetric_sampler(dim=3, num_freqs=6, num_components=2)

    def frequencies(log_scales: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(
            sampler, {"log_scales": log_scales}, (_gen(0),), {"dtype": torch.float64}
        )

    log_scales = sampler.log_scales.detach().clone().requires_grad_(True)
    assert torch.equal(frequencies(log_scales), sampler.sample(_gen(0), dtype=torch.float64))
    assert torch.autograd.gradcheck(frequencies, (log_scales,), eps=1e-6, atol=1e-7)


def test_mixture_sampler_clamps_scales_and_can_come_back():
    sampler = MixtureSampler(dim=4, num_freqs=8, num_components=2).double()
    with torch.no_grad():
        sampler.log_scales[0].fill_(10.0)  # e^10 >> max_scale = 20
        sampler.log_scales[1].fill_(-10.0)  # e^-10 << min_scale = 0.05
    expected = torch.tensor([[20.0] * 4, [0.05] * 4], dtype=torch.float64)
    assert torch.allclose(sampler.scales(), expected, rtol=1e-12), sampler.scales()
    # A loss that wants every scale smaller: the too-large component may move back, the
    # too-small one must not be pushed further down.
    sampler.scales().sum().backward()
    grad = sampler.log_scales.grad
    assert torch.all(grad[0] > 0) and torch.all(grad[1] == 0), grad
    sampler.zero_grad()
    (-sampler.scales().sum()).backward()  # wants every scale larger
    grad = sampler.log_scales.grad
    assert torch.all(grad[0] == 0) and torch.all(grad[1] < 0), grad


# ---- gradient reversal -----------------------------------------------------------------------


def test_reverse_gradient_is_identity_forward_and_negates_backward():
    values = torch.randn(3, 4, generator=_gen(0), dtype=torch.float64, requires_grad=True)
    assert torch.equal(reverse_gradient(values), values)
    upstream = torch.randn(3, 4, generator=_gen(1), dtype=torch.float64)
    (reverse_gradient(values) * upstream).sum().backward()
    assert torch.equal(values.grad, -upstream), (values.grad, upstream)
    # Analytic Jacobian -I against the finite-difference Jacobian +I: gradcheck must object.
    point = torch.randn(5, generator=_gen(2), dtype=torch.float64)
    analytic = torch.autograd.functional.jacobian(reverse_gradient, point)
    assert torch.equal(analytic, -torch.eye(5, dtype=torch.float64)), analytic
    point.requires_grad_(True)
    assert not torch.autograd.gradcheck(reverse_gradient, (point,), raise_exception=False)
    assert torch.autograd.gradcheck(lambda x: reverse_gradient(reverse_gradient(x)), (point,))


# ---- the minmax ------------------------------------------------------------------------------

NUM_CLASSES, DIM, NUM_FREQS = 2, 8, 64


def _feature_sets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real and synthetic features: two different Gaussian clouds per class, normalised."""
    generator = _gen(7)
    shift = torch.tensor([1.0] * 4 + [0.0] * 4, dtype=torch.float64)
    real = normalize_features(
        torch.randn(128, DIM, generator=generator, dtype=torch.float64) + shift
    )
    synthetic = normalize_features(
        0.5 * torch.randn(16, DIM, generator=generator, dtype=torch.float64) + shift.flip(0)
    )
    return real, torch.arange(128) % NUM_CLASSES, synthetic, torch.arange(16) % NUM_CLASSES


def _loss(sampler, generator, real, real_labels, synthetic, synthetic_labels, reverse: bool):
    freqs = sampler.sample(generator, dtype=torch.float64)
    if reverse:
        freqs = reverse_gradient(freqs)
    real_cf = cf_embed_per_class(real, real_labels, freqs, NUM_CLASSES)
    synthetic_cf = cf_embed_per_class(synthetic, synthetic_labels, freqs, NUM_CLASSES)
    return ncfd(*real_cf, *synthetic_cf).sum()


def test_minmax_steps_on_frozen_features_raise_the_discrepancy():
    real, real_labels, synthetic, synthetic_labels = _feature_sets()
    synthetic = synthetic.clone().requires_grad_(True)
    frozen_images = synthetic.detach().clone()
    sampler = MixtureSampler(DIM, NUM_FREQS, num_components=4).double()
    initial_params = [p.detach().clone() for p in sampler.parameters()]

    def evaluate() -> float:
        with torch.no_grad():
            loss = _loss(sampler, _gen(1234), real, real_labels, synthetic, synthetic_labels, False)
            return loss.item()

    before = evaluate()
    image_optimizer = torch.optim.SGD([synthetic], lr=0.0)  # features frozen
    sampler_optimizer = torch.optim.Adam(sampler.parameters(), lr=0.05)
    train_generator = _gen(0)
    for _ in range(30):
        loss = _loss(sampler, train_generator, real, real_labels, synthetic, synthetic_labels, True)
        minmax_step(loss, image_optimizer, sampler_optimizer)
    after = evaluate()
    assert torch.equal(synthetic.detach(), frozen_images)
    for initial, param in zip(initial_params, sampler.parameters()):
        assert (param.detach() - initial).abs().max() > 1e-2, "psi did not move"
    assert after > 1.1 * before, f"psi should ascend the NCFD: {before:.4f} -> {after:.4f}"


def test_authors_backward_pattern_cancels_the_sampler_gradient():
    real, real_labels, synthetic, synthetic_labels = _feature_sets()
    sampler = _asymmetric_sampler(DIM, NUM_FREQS, num_components=4)
    loss = _loss(sampler, _gen(0), real, real_labels, synthetic, synthetic_labels, False)
    loss.backward(retain_graph=True)
    assert sampler.log_scales.grad.abs().max() > 1e-6, "a single backward does reach psi"
    (-loss).backward()
    for name, param in sampler.named_parameters():
        assert torch.count_nonzero(param.grad) == 0, f"{name} kept a gradient: {param.grad}"


def test_one_backward_gives_images_plus_and_psi_minus_gradient():
    real, real_labels, synthetic, synthetic_labels = _feature_sets()
    synthetic = synthetic.clone().requires_grad_(True)
    sampler = _asymmetric_sampler(DIM, NUM_FREQS, num_components=4)
    params = [synthetic, sampler.log_scales, sampler.logits]
    plain_loss = _loss(sampler, _gen(5), real, real_labels, synthetic, synthetic_labels, False)
    plain = torch.autograd.grad(plain_loss, params)
    assert all(g.abs().max() > 1e-6 for g in plain), "every plain gradient should be non-zero"

    for param in params:  # stale gradients that minmax_step must discard
        param.grad = torch.full_like(param, 123.0)
    before = [p.detach().clone() for p in params]
    learning_rate = 0.1
    image_optimizer = torch.optim.SGD([synthetic], lr=learning_rate)
    sampler_optimizer = torch.optim.SGD(sampler.parameters(), lr=learning_rate)
    loss = _loss(sampler, _gen(5), real, real_labels, synthetic, synthetic_labels, True)
    assert loss.item() == plain_loss.item()
    minmax_step(loss, image_optimizer, sampler_optimizer)
    names, signs = ("images", "log_scales", "logits"), (1.0, -1.0, -1.0)  # +dL/dx, -dL/dpsi
    for name, param, grad, sign in zip(names, params, plain, signs):
        torch.testing.assert_close(param.grad, sign * grad, rtol=1e-12, atol=1e-14, msg=name)
    # SGD descends on .grad: images move down the loss, psi moves up it.
    for name, param, start, grad, sign in zip(names, params, before, plain, signs):
        expected = start - sign * learning_rate * grad
        torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14, msg=name)
