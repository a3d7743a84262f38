"""Frequency samplers for the characteristic-function discrepancy, and the minmax plumbing.

Two samplers share ``sample(generator, device=None, dtype=torch.float32) -> (F, d)``:

- :class:`GaussianSampler`: ``t ~ N(0, scale^2 I_d)``, redrawn every call; no parameters.
- :class:`MixtureSampler`: psi, a learned scale mixture of zero-mean normals. It ASCENDS
  the discrepancy while the synthetic images DESCEND it.

Both directions come from ONE backward: the engine builds
``freqs = reverse_gradient(sampler.sample(generator))``, computes the loss, and calls
:func:`minmax_step`, which backpropagates once and lets both optimisers descend on their
``.grad``. Because the gradient is negated on its way into psi, psi's descent is ascent on
the loss. (The authors' code instead calls ``loss.backward(retain_graph=True)`` and then
``(-loss).backward()`` on the same graph, which adds psi's gradient and its negative: psi
never learns.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ncfm_core.errors import ConfigError

__all__ = ["GaussianSampler", "MixtureSampler", "minmax_step", "reverse_gradient"]


class GaussianSampler(nn.Module):
    """Fixed isotropic normal frequencies ``t ~ N(0, scale^2 I_dim)``; no trainable parameters."""

    def __init__(self, dim: int, num_freqs: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim < 1 or num_freqs < 1 or not scale > 0:
            raise ConfigError(
                f"frequency sampler needs dim >= 1, num_freqs >= 1, scale > 0; got {dim}, "
                f"{num_freqs}, {scale}"
            )
        self.dim, self.num_freqs, self.scale = dim, num_freqs, scale

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_freqs={self.num_freqs}, scale={self.scale}"

    def forward(
        self,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Same as :meth:`sample` (so the module can be called or wrapped like any other)."""
        return self.sample(generator, device=device, dtype=dtype)

    def sample(
        self,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """A fresh (F, d) draw, made on ``generator.device`` and moved to ``device``
        (``None``: stay on the generator's device)."""
        noise = torch.randn(
            self.num_freqs, self.dim, generator=generator, device=generator.device, dtype=dtype
        )
        return (noise * self.scale).to(device if device is not None else noise.device)


class _RecoverableClamp(torch.autograd.Function):
    """``x.clamp(low, high)`` whose backward lets a clamped entry be pulled back into range.

    A plain clamp has zero gradient outside [low, high], so an entry that one optimiser step
    pushes past a bound is stuck there for good. Here the incoming gradient passes through
    unless it would push an out-of-range entry further out, reading the gradient as a
    descent direction (the step is ``-lr * grad``): the convention of :func:`minmax_step`.
    """

    @staticmethod
    def forward(ctx, values: Tensor, low: float, high: float) -> Tensor:
        ctx.save_for_backward(values)
        ctx.low, ctx.high = low, high
        return values.clamp(low, high)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (values,) = ctx.saved_tensors
        pushes_out = ((values > ctx.high) & (grad_output < 0)) | (
            (values < ctx.low) & (grad_output > 0)
        )
        return grad_output.masked_fill(pushes_out, 0.0), None, None


class MixtureSampler(nn.Module):
    """psi: a scale mixture of zero-mean normals with K components and diagonal scales.

    ``p(t) = sum_k pi_k N(t | 0, diag(s_k)^2)`` with ``pi = softmax(logits)`` (K,) and
    ``s = exp(log_scales)`` (K, d); K defaults to ``max(1, num_freqs // 16)``. The scales are
    clamped to [min_scale, max_scale] (default [0.05, 20]) in the forward, so ascent on the
    discrepancy cannot run away to frequencies so large that every CF is sampling noise or
    so small that every CF is 1 (the clamp is recoverable: see ``_RecoverableClamp``).

    Each of the F frequencies is its own draw: a component ``k(f)`` and ``eps_f ~ N(0, I_d)``,
    ``t_f = s_{k(f)} * eps_f`` (reparameterised, so gradients reach ``log_scales``). The
    component is chosen with a straight-through Gumbel-softmax: the forward uses the exact
    one-hot argmax of ``logits + Gumbel noise`` (a true sample of the mixture), the backward
    uses the gradient of ``softmax((logits + Gumbel) / temperature)``, so ``logits`` learn too.
    That logit gradient is biased (a discrete choice has no exact pathwise gradient) but has
    far lower variance than a score-function estimator. ``torch.nn.functional.gumbel_softmax``
    is not used because it draws from the global RNG, not from a passed generator.

    All components start equal, so at the very first step the logits' gradient is exactly 0;
    the components separate as soon as their scales receive different gradients.
    """

    def __init__(
        self,
        dim: int,
        num_freqs: int,
        num_components: int | None = None,
        init_scale: float = 1.0,
        min_scale: float = 0.05,
        max_scale: float = 20.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        num_components = num_components if num_components is not None else max(1, num_freqs // 16)
        if dim < 1 or num_freqs < 1 or num_components < 1:
            raise ConfigError(
                f"frequency sampler needs dim, num_freqs and num_components >= 1; got {dim}, "
                f"{num_freqs}, {num_components}"
            )
        if not 0 < min_scale <= init_scale <= max_scale or not temperature > 0:
            raise ConfigError(
                f"sampler scales need 0 < min_scale <= init_scale <= max_scale and temperature "
                f"> 0; got {min_scale}, {init_scale}, {max_scale}, {temperature}"
            )
        self.dim, self.num_freqs, self.num_components = dim, num_freqs, num_components
        self.min_scale, self.max_scale, self.temperature = min_scale, max_scale, temperature
        self.log_scales = nn.Parameter(torch.full((num_components, dim), math.log(init_scale)))
        self.logits = nn.Parameter(torch.zeros(num_components))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_freqs={self.num_freqs}, num_components={self.num_components}, "
            f"scale_range=[{self.min_scale}, {self.max_scale}]"
        )

    def scales(self) -> Tensor:
        """Per-component standard deviations after the clamp, (K, d)."""
        log_low, log_high = math.log(self.min_scale), math.log(self.max_scale)
        return torch.exp(_RecoverableClamp.apply(self.log_scales, log_low, log_high))

    def draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """One sample with its parts, on the parameters' device and dtype:
        (freqs (F, d), components (F,) int64, noise (F, d)) with
        ``freqs[f] == scales()[components[f]] * noise[f]``.

        Random numbers are drawn on ``generator.device`` in this order: noise, then Gumbel
        uniforms; the order is part of what makes a seeded run reproducible.
        """
        param_device, param_dtype = self.log_scales.device, self.log_scales.dtype
        shape = (self.num_freqs, self.dim)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=param_dtype)
        uniform = torch.rand(
            (self.num_freqs, self.num_components),
            generator=generator,
            device=generator.device,
            dtype=param_dtype,
        )
        noise, uniform = noise.to(param_device), uniform.to(param_device)
        # rand can return exactly 0; the clamp keeps log(log(.)) finite.
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(param_dtype).tiny)))
        soft_choice = torch.softmax((self.logits + gumbel) / self.temperature, dim=1)  # (F, K)
        components = soft_choice.argmax(dim=1)  # (F,)
        hard_choice = nn.functional.one_hot(components, self.num_components).to(param_dtype)
        # Value: exactly the one-hot (soft - soft.detach() is exactly 0); gradient: softmax's.
        choice = hard_choice + (soft_choice - soft_choice.detach())
        per_freq_scale = choice @ self.scales()  # (F, d)
        return per_freq_scale * noise, components, noise

    def sample(
        self,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """A fresh (F, d) draw, differentiable w.r.t. ``log_scales`` and ``logits``; computed
        where the parameters live, then moved to ``device`` (``None``: stay there)."""
        freqs, _, _ = self.draw(generator)
        return freqs.to(device=device if device is not None else freqs.device, dtype=dtype)

    def forward(
        self,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Same as :meth:`sample` (so ``torch.func.functional_call`` and DDP can wrap psi)."""
        return self.sample(generator, device=device, dtype=dtype)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor) -> Tensor:
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        return -grad_output


def reverse_gradient(values: Tensor) -> Tensor:
    """Identity in the forward; multiplies the incoming gradient by -1 in the backward."""
    return _ReverseGradient.apply(values)


def minmax_step(
    loss: Tensor,
    image_optimizer: torch.optim.Optimizer | None,
    sampler_optimizer: torch.optim.Optimizer | None,
) -> None:
    """One minmax update from one backward of a scalar ``loss``.

    The loss must have been computed from ``reverse_gradient(sampler.sample(...))``: then
    the images' ``.grad`` is ``+d loss/d image`` and psi's is ``-d loss/d psi``, and both
    optimisers (plain descent on ``.grad``) make the images descend and psi ascend.

    Division of labour: this function zeroes both optimisers' gradients (set to None)
    before the backward, so stale gradients never leak in; it does not clip, scale or
    schedule. Anything else the loss depends on with ``requires_grad`` (e.g. a feature
    extractor) accumulates ``.grad`` here: freeze it. Either optimiser may be ``None``
    (no sampler to train, or frozen images).
    """
    optimizers = [opt for opt in (image_optimizer, sampler_optimizer) if opt is not None]
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
