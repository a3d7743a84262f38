"""Kernel levers: other implementations of the networks' memory-bound layers, same maths.

On CUDA the ConvNet's time goes to memory-bound kernels, not to its convolutions (issue 23's
profile of one CIFAR-100 IPC 50 iteration on an H200: ``native_group_norm`` 21% and its backward
9%, ``avg_pool2d_backward`` 18%, ``avg_pool2d`` 7%). Each lever here swaps one such layer for an
implementation that computes the same function through other kernels:

``pool``: the 2x2 average pool (``nn.AvgPool2d(2)``, floor mode: an odd last row or column is
dropped)
    - ``"native"``: ``F.avg_pool2d`` forward and ``avg_pool2d_backward`` (today's path);
    - ``"broadcast"``: ``F.avg_pool2d`` forward; the backward is the output gradient divided
      by 4 and spread over each 2x2 window by one broadcasting elementwise kernel. Forward and
      gradient are bit for bit those of ``"native"`` in every dtype;
    - ``"reshape"``: ``x.reshape(..., H/2, 2, W/2, 2).mean((-3, -1))``, whose autograd backward
      is the same broadcast. It sums each window in another order: in fp32 about 30% of the
      outputs differ from ``"native"`` by rounding (at most 2 eps x the window's mean absolute
      value); the gradient, given the same upstream gradient, is bit for bit the same; in bf16
      both sum in fp32 and round once, and agree bit for bit.
``norm``: instance norm, written as ``GroupNorm(C, C)`` (one group per channel, affine)
    - ``"groupnorm"``: ``F.group_norm`` (today's path: the row-moments kernels);
    - ``"batchnorm"``: ``torch.instance_norm``, i.e. batch norm over ``(1, N*C, H, W)`` with
      the same biased variance, eps and affine parameters. In fp32 it agrees with
      ``"groupnorm"`` to rounding (tests/test_kernels.py states the tolerances). Under CUDA
      autocast ``group_norm`` is on the fp32 list (its bf16 input is cast up and its output is
      fp32, so ReLU and pooling run in fp32 and the next convolution casts back down), while
      instance/batch norm is on no list: it reads the bf16 convolution output, keeps its
      statistics in fp32 and writes bf16. CPU autocast lists neither: both run in bf16 there.

Every lever keeps the module's parameters (the same ``Parameter`` objects, under the same
names), so a state dict saved with one implementation loads into another, the pool's blend
(which writes by state-dict key) is untouched, and ``torch.func`` stacking (``ncfm_core.train``)
works: none of the implementations holds running statistics.

:class:`KernelLevers` says which implementation each lever uses; it is frozen and JSON-friendly
(:meth:`KernelLevers.to_dict` / :meth:`KernelLevers.from_dict`), so a plan or a manifest can
record it. :func:`apply_levers` switches a built network in place. More levers (dtype casts,
channels_last, cuDNN autotuning, compilation, CUDA graphs) are added as further fields with
today's behaviour as their default, so records written before they exist still load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncfm_core.errors import ConfigError

__all__ = [
    "NORM_KERNELS",
    "POOL_KERNELS",
    "BroadcastGradAvgPool2x2",
    "InstanceNormViaBatchNorm",
    "KernelLevers",
    "ReshapeAvgPool2x2",
    "apply_levers",
    "avg_pool_2x2_broadcast_grad",
    "avg_pool_2x2_reshape",
    "levers_of",
    "parse_levers",
]

POOL_KERNELS = ("native", "broadcast", "reshape")
NORM_KERNELS = ("groupnorm", "batchnorm")
_CHOICES = {"pool": POOL_KERNELS, "norm": NORM_KERNELS}


@dataclass(frozen=True)
class KernelLevers:
    """Which implementation each kernel lever uses; the defaults are today's path."""

    pool: str = "native"  # the 2x2 average pool: native | broadcast | reshape
    norm: str = "groupnorm"  # instance norm: groupnorm | batchnorm

    def __post_init__(self) -> None:
        for lever, choices in _CHOICES.items():
            value = getattr(self, lever)
            if value not in choices:
                raise ConfigError(f"unknown {lever} kernel {value!r}; choose one of: {', '.join(choices)}")

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelLevers:
        """The levers a record holds; a lever it does not name keeps today's path (a record
        written before that lever existed)."""
        if not isinstance(data, dict):
            raise ConfigError(f"kernel levers must be a mapping of lever to choice, got {data!r}")
        unknown = sorted(set(data) - set(_CHOICES))
        if unknown:
            raise ConfigError(f"unknown kernel lever(s) {', '.join(unknown)}: written by a newer ncfm?")
        for lever, value in data.items():
            if not isinstance(value, str):
                raise ConfigError(f"kernel lever {lever!r} is {value!r}, expected one of: {', '.join(_CHOICES[lever])}")
        return cls(**data)

    def describe(self) -> str:
        """``"pool=broadcast,norm=batchnorm"``: the levers that differ from today's path
        (``"default"`` when none does); :func:`parse_levers` reads it back."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return ",".join(changed) or "default"


def parse_levers(text: str) -> KernelLevers:
    """``"pool=reshape,norm=batchnorm"`` (any subset, any order; ``""`` or ``"default"``: today's
    path) -> :class:`KernelLevers`. Errors name the valid levers and choices."""
    text = text.strip()
    if text in ("", "default"):
        return KernelLevers()
    chosen: dict[str, str] = {}
    for item in text.split(","):
        lever, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not value:
            raise ConfigError(f"kernel lever {item.strip()!r} is not LEVER=CHOICE (e.g. pool=broadcast,norm=batchnorm)")
        if lever not in _CHOICES:
            raise ConfigError(f"unknown kernel lever {lever!r}; the levers are: {', '.join(_CHOICES)}")
        if lever in chosen:
            raise ConfigError(f"kernel lever {lever!r} is given twice")
        chosen[lever] = value
    return KernelLevers(**chosen)


# ----------------------------------------------------------------------------- the 2x2 pool


def _is_channels_last(tensor: Tensor) -> bool:
    """Whether a 4-D tensor is laid out NHWC (and not also NCHW, as a one-channel one is)."""
    if tensor.dim() != 4 or tensor.is_contiguous():
        return False
    try:
        return tensor.is_contiguous(memory_format=torch.channels_last)
    except RuntimeError:  # inside torch.func.vmap a per-sample view has no layout to ask about
        return False


def _spread_2x2(grad: Tensor, height: int, width: int) -> Tensor:
    """The gradient of a 2x2 mean: ``grad`` (..., H/2, W/2) divided by 4 and copied to each
    window's four pixels, zero on a dropped odd last row or column -> (..., height, width).
    One broadcasting kernel (a channels_last gradient keeps its layout)."""
    rows, cols = grad.shape[-2], grad.shape[-1]
    if _is_channels_last(grad):
        nhwc = grad.permute(0, 2, 3, 1)  # (N, H/2, W/2, C), contiguous
        spread = nhwc[:, :, None, :, None, :].expand(-1, -1, 2, -1, 2, -1).div(4)  # (N, H/2, 2, W/2, 2, C)
        full = spread.reshape(grad.shape[0], 2 * rows, 2 * cols, grad.shape[1]).permute(0, 3, 1, 2)
    else:
        spread = grad[..., :, None, :, None].expand(*grad.shape[:-2], rows, 2, cols, 2).div(4)
        full = spread.reshape(*grad.shape[:-2], 2 * rows, 2 * cols)
    if (height, width) != (2 * rows, 2 * cols):
        full = F.pad(full, (0, width - 2 * cols, 0, height - 2 * rows))
    return full


class _AvgPool2x2BroadcastGrad(torch.autograd.Function):
    generate_vmap_rule = True  # torch.func.vmap runs forward and backward per sample

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.input_size = tuple(inputs[0].shape[-2:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _spread_2x2(grad, *ctx.input_size)


def avg_pool_2x2_broadcast_grad(x: Tensor) -> Tensor:
    """``F.avg_pool2d(x, 2)`` (floor mode) whose backward is :func:`_spread_2x2`, not
    ``avg_pool2d_backward``. (..., H, W) -> (..., H // 2, W // 2)."""
    return _AvgPool2x2BroadcastGrad.apply(x)


def avg_pool_2x2_reshape(x: Tensor) -> Tensor:
    """The 2x2 mean as a reshape and a mean (floor mode: an odd last row or column is
    dropped first). (..., H, W) -> (..., H // 2, W // 2)."""
    rows, cols = x.shape[-2] // 2, x.shape[-1] // 2
    if (2 * rows, 2 * cols) != tuple(x.shape[-2:]):
        x = x[..., : 2 * rows, : 2 * cols]
    return x.reshape(*x.shape[:-2], rows, 2, cols, 2).mean(dim=(-3, -1))


class BroadcastGradAvgPool2x2(nn.Module):
    """``nn.AvgPool2d(2)`` with a broadcast backward (the ``"broadcast"`` pool kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool_2x2_broadcast_grad(x)


class ReshapeAvgPool2x2(nn.Module):
    """``nn.AvgPool2d(2)`` as a reshape and a mean (the ``"reshape"`` pool kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool_2x2_reshape(x)


_POOL_MODULES: dict[str, type[nn.Module]] = {
    "broadcast": BroadcastGradAvgPool2x2,
    "reshape": ReshapeAvgPool2x2,
}


def _is_pool_2x2(module: nn.Module) -> bool:
    """An ``nn.AvgPool2d`` that is a plain 2x2 mean (stride 2, no padding, floor mode), or one
    of this module's implementations of it."""
    if isinstance(module, tuple(_POOL_MODULES.values())):
        return True
    if type(module) is not nn.AvgPool2d:
        return False
    pair = lambda value: value if isinstance(value, tuple) else (value, value)  # noqa: E731
    stride = module.stride if module.stride is not None else module.kernel_size
    return (pair(module.kernel_size) == (2, 2) and pair(stride) == (2, 2) and pair(module.padding) == (0, 0)
            and not module.ceil_mode and module.divisor_override is None)


def _pool_module(kernel: str) -> nn.Module:
    if kernel == "native":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    return _POOL_MODULES[kernel]()


# ----------------------------------------------------------------------------- instance norm


class InstanceNormViaBatchNorm(nn.Module):
    """Instance norm with affine parameters, computed as batch norm over ``(1, N*C, H, W)``
    (``torch.instance_norm``): the same function as ``nn.GroupNorm(C, C, eps)``, with the same
    parameter names (``weight``, ``bias``) and no running statistics (train and eval agree).
    ``(N, C, H, W) -> (N, C, H, W)``."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        # Not F.instance_norm: it refuses a 1x1 map, where GroupNorm(C, C) returns the bias.
        return torch.instance_norm(x, self.weight, self.bias, None, None, True, 0.0, self.eps,
                                   torch.backends.cudnn.enabled)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


def _is_instance_norm(module: nn.Module) -> bool:
    """``GroupNorm(C, C)`` with affine parameters, or :class:`InstanceNormViaBatchNorm`."""
    if isinstance(module, InstanceNormViaBatchNorm):
        return True
    return type(module) is nn.GroupNorm and module.num_groups == module.num_channels and module.affine


def _norm_module(kernel: str, old: nn.Module) -> nn.Module:
    """An instance norm of ``kernel``'s implementation that holds ``old``'s parameters."""
    if kernel == "groupnorm":
        new: nn.Module = nn.GroupNorm(old.num_channels, old.num_channels, eps=old.eps, affine=True)
    else:
        new = InstanceNormViaBatchNorm(old.num_channels, eps=old.eps)
    new.weight, new.bias = old.weight, old.bias  # the same Parameter objects, device and dtype
    return new


# ----------------------------------------------------------------------------- switching


def _pool_kernel(module: nn.Module) -> str:
    """The pool kernel a 2x2 average pool (:func:`_is_pool_2x2`) runs."""
    return next((kernel for kernel, cls in _POOL_MODULES.items() if isinstance(module, cls)), "native")


def _norm_kernel(module: nn.Module) -> str:
    """The norm kernel an instance norm (:func:`_is_instance_norm`) runs."""
    return "batchnorm" if isinstance(module, InstanceNormViaBatchNorm) else "groupnorm"


def apply_levers(net: nn.Module, levers: KernelLevers) -> nn.Module:
    """Switch ``net``'s 2x2 average pools and instance norms, in place, to the implementations
    ``levers`` names; returns ``net``. Any registered network can be switched (the pool lever
    touches only plain 2x2 average pools, the norm lever only ``GroupNorm(C, C)``); switching
    back to the defaults restores today's modules. Parameters are kept, not copied: the state
    dict's keys and tensors, optimisers and the pool's blend stay valid."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if _is_pool_2x2(child) and _pool_kernel(child) != levers.pool:
                replacement = _pool_module(levers.pool)
            elif _is_instance_norm(child) and _norm_kernel(child) != levers.norm:
                replacement = _norm_module(levers.norm, child)
            else:
                continue
            setattr(parent, name, replacement.train(child.training))
    return net


def levers_of(net: nn.Module) -> KernelLevers:
    """The levers ``net`` runs with, read from its modules (today's path for a layer it does
    not have). A network that mixes implementations of one layer is an error."""
    found = {"pool": {_pool_kernel(m) for m in net.modules() if _is_pool_2x2(m)},
             "norm": {_norm_kernel(m) for m in net.modules() if _is_instance_norm(m)}}
    for lever, kernels in found.items():
        if len(kernels) > 1:
            raise ConfigError(f"the network mixes {lever} kernels: {', '.join(sorted(kernels))}")
    return KernelLevers(**{lever: kernels.pop() for lever, kernels in found.items() if kernels})
