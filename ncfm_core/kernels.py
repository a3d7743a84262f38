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

The other levers change how the loop runs a network, not its modules (``ncfm_core.distill`` and
``ncfm_core.forward`` apply them):

``casts``: where the low-precision copies of the weights come from under bf16/fp16 autocast
    - ``"autocast"``: autocast casts every convolution's and linear layer's fp32 weights on every
      call (its weight cache only serves leaf parameters that require a gradient, and the loop's
      networks are frozen), i.e. once per class chunk and real chunk;
    - ``"once"``: those weights are held in the compute dtype (:func:`cast_weights_once`); the
      pool's blend writes them there once per iteration (``Pool.blend_into``, rounding the fp32
      blend once, as autocast's cast did) and autocast's casts of them become no-ops. The real
      images go from uint8 to scaled float32 in one kernel. Bit for bit today's numbers.
``layout``: the memory format of inputs, weights and activations
    - ``"nchw"``: contiguous (today's default);
    - ``"nhwc"``: channels_last, kept through the block: convolutions, the batch-norm path's
      instance norm (:func:`instance_norm_channels_last`), ReLU and every pool kernel keep NHWC
      (GroupNorm keeps it on the CPU; CUDA's group norm has long copied to NCHW).
``compile``: ``"off"`` or ``"on"``: the ConvNet's blocks through ``torch.compile`` with the plan's
    fixed shapes, compiled before the first iteration and eager again if compiling fails
    (``ncfm_core.forward``).
``graphs``: ``"off"`` or ``"on"``: the fixed-shape work of a chunk (real side: gather, augment,
    forward; synthetic side: decode, augment, forward and backward) captured once per shape as a
    CUDA graph and replayed (``ncfm_core.graphs``).

:class:`KernelLevers` says which implementation each lever uses; it is frozen and JSON-friendly
(:meth:`KernelLevers.to_dict` / :meth:`KernelLevers.from_dict`), so a plan or a manifest can
record it; a lever a record does not name is today's path. :func:`apply_levers` switches a built
network's modules in place. The ``kernels`` option of a run (``DistillConfig.kernels``) is decided
once per device by the plan (:func:`decide_levers`, with the defaults :func:`default_levers`).
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
    "CUDA_DEFAULTS",
    "NORM_KERNELS",
    "POOL_KERNELS",
    "BroadcastGradAvgPool2x2",
    "InstanceNormViaBatchNorm",
    "KernelLevers",
    "ReshapeAvgPool2x2",
    "apply_levers",
    "avg_pool_2x2_broadcast_grad",
    "avg_pool_2x2_reshape",
    "cast_weights_once",
    "decide_levers",
    "decided_levers",
    "default_levers",
    "instance_norm_channels_last",
    "levers_for_plan",
    "levers_of",
    "parse_kernels",
    "parse_levers",
]

POOL_KERNELS = ("native", "broadcast", "reshape")
NORM_KERNELS = ("groupnorm", "batchnorm")
CAST_CHOICES = ("autocast", "once")
LAYOUT_CHOICES = ("nchw", "nhwc")
COMPILE_CHOICES = ("off", "on")
GRAPH_CHOICES = ("off", "on")
_CHOICES = {"pool": POOL_KERNELS, "norm": NORM_KERNELS, "casts": CAST_CHOICES, "layout": LAYOUT_CHOICES,
            "compile": COMPILE_CHOICES, "graphs": GRAPH_CHOICES}
AUTO = "auto"  # in a ``kernels`` option: the device's defaults (:func:`default_levers`)


@dataclass(frozen=True)
class KernelLevers:
    """Which implementation each kernel lever uses; the defaults are today's path."""

    pool: str = "native"  # the 2x2 average pool: native | broadcast | reshape
    norm: str = "groupnorm"  # instance norm: groupnorm | batchnorm
    casts: str = "autocast"  # low-precision weights: autocast (cast per call) | once (per iteration, by the blend)
    layout: str = "nchw"  # memory format of inputs, weights and activations: nchw | nhwc (channels_last)
    compile: str = "off"  # the ConvNet's blocks through torch.compile: off | on
    graphs: str = "off"  # a chunk's fixed-shape work as CUDA graphs, captured once per shape: off | on

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

    def spec(self) -> str:
        """Every lever named, ``"pool=native,norm=groupnorm,casts=autocast,..."``: the decided
        form a run's config holds, so a later ncfm with other defaults reads the same levers."""
        return ",".join(f"{name}={value}" for name, value in self.to_dict().items())


def parse_kernels(text: str) -> tuple[bool, dict[str, str]]:
    """A ``kernels`` option -> (whether it asks for the device's defaults, the levers it names).

    ``"auto"`` (the device's defaults), ``"default"`` or ``""`` (today's path), or
    ``LEVER=CHOICE`` items separated by commas, in any order, optionally with ``auto`` among them
    (``"auto,compile=off"``: the defaults with compilation off; without ``auto`` an unnamed lever
    is today's path). Errors name the valid levers and choices."""
    text = text.strip()
    if text in ("", "default"):
        return False, {}
    auto, chosen = False, {}
    for item in text.split(","):
        if item.strip() == AUTO:
            auto = True
            continue
        lever, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not value:
            raise ConfigError(f"kernel lever {item.strip()!r} is not LEVER=CHOICE (e.g. pool=broadcast,norm=batchnorm)")
        if lever not in _CHOICES:
            raise ConfigError(f"unknown kernel lever {lever!r}; the levers are: {', '.join(_CHOICES)}")
        if lever in chosen:
            raise ConfigError(f"kernel lever {lever!r} is given twice")
        chosen[lever] = value
    KernelLevers(**chosen)  # each choice checked here, with the lever's valid choices in the error
    return auto, chosen


def parse_levers(text: str) -> KernelLevers:
    """``"pool=reshape,norm=batchnorm"`` (any subset, any order; ``""`` or ``"default"``: today's
    path) -> :class:`KernelLevers`. ``auto`` is for the plan to decide (:func:`decide_levers`)."""
    auto, chosen = parse_kernels(text)
    if auto:
        raise ConfigError(f"kernels {text.strip()!r} asks for the device's defaults: decide it with decide_levers")
    return KernelLevers(**chosen)


# The defaults by device type, each decided from what the CPU tests show and what could go wrong
# on a GPU where no lever has run yet (docs/benchmarks/distill_speed.md has the expected effects):
# - pool=broadcast: forward and gradient bit for bit avg_pool2d's; nothing can fail.
# - norm=batchnorm: within 2e-6 (output) and 3.4e-6 (input gradient) of GroupNorm in fp32; under
#   CUDA autocast it runs in bf16 where group norm casts to fp32 (half the bytes, a lower peak,
#   which the memory model counts); a plain kernel, nothing to fail.
# - casts=once: bit for bit today's numbers in fp32 and under bf16 autocast (the blend rounds
#   the fp32 weights once, as autocast's cast did); nothing can fail.
# - compile=on: a compiled run equals the eager one within rounding (tests/test_forward.py);
#   never tried on a GPU, so a compiler that fails, at compile time or when the compiled code
#   first runs, leaves the run going eagerly with one line saying so; its compile time is
#   reported apart and counted in the time to the first result. With activation checkpointing
#   the blocks stay eager (the plan says so).
# - layout=nhwc: OFF. Exact within rounding, but the instance norm that keeps NHWC is written as
#   plain tensor ops, which only pay off once compiled (eagerly they move several times the
#   bytes of the NCHW batch-norm path); turn it on after the GPU check shows its row faster.
# - graphs=on: OFF. Exact through the contract stand-in (tests/test_graphs.py), but the graphs'
#   memory pools are not yet in the memory plan (a budgeted plan could run out of memory) and a
#   capture has never run on a GPU (a failed capture falls back to eager, with one line).
# On the CPU no lever measured faster (docs/benchmarks/distill_speed.md): today's path.
CUDA_DEFAULTS = KernelLevers(pool="broadcast", norm="batchnorm", casts="once", compile="on")


def default_levers(device_type: str) -> KernelLevers:
    """The levers ``kernels="auto"`` gives on a device type (see :data:`CUDA_DEFAULTS`)."""
    return CUDA_DEFAULTS if device_type == "cuda" else KernelLevers()


def decided_levers(kernels: str, where: str) -> KernelLevers:
    """The levers of a decided ``kernels`` option, for ``where`` (the layer that runs them, named
    in the error). An option still asking for ``auto`` is a ``ConfigError``: the plan decides it
    (``ncfm_core.jobs.plan.decide_precisions``), no layer below."""
    auto, chosen = parse_kernels(kernels)
    if auto:
        raise ConfigError(f"{where} was given kernels {kernels!r}; decide it first with "
                          "ncfm_core.jobs.plan.decide_precisions(config, device), as every job does in its plan")
    return KernelLevers(**chosen)


def levers_for_plan(levers: KernelLevers, activation_checkpointing: bool) -> KernelLevers:
    """The levers a plan runs with: under activation checkpointing the blocks are recomputed in
    the backward under autograd's hooks, which neither the compiled blocks nor the captured
    graphs are built for, so both are off there (the plan records it)."""
    if activation_checkpointing:
        return dataclasses.replace(levers, compile="off", graphs="off")
    return levers


def decide_levers(kernels: str, device_type: str, *, channels_last: bool | None = None,
                  compile_blocks: bool = False) -> KernelLevers:
    """A run's ``kernels`` option decided for ``device_type``: ``auto`` gives
    :func:`default_levers`, the named levers override, and the older shorthands set theirs
    (``channels_last`` True/False: layout nhwc/nchw; ``compile_blocks`` True: compile on); a
    shorthand that contradicts a lever the option names is a ``ConfigError``. Called once, by the
    plan."""
    auto, chosen = parse_kernels(kernels)
    if not auto and chosen.keys() == _CHOICES.keys():  # decided already (a resume): the shorthands are in it
        return KernelLevers(**chosen)
    base = default_levers(device_type) if auto else KernelLevers()
    shorthands = {}
    if channels_last is not None:
        shorthands["layout"] = ("nhwc" if channels_last else "nchw", f"channels_last={channels_last}")
    if compile_blocks:
        shorthands["compile"] = ("on", "--compile")
    for lever, (choice, said) in shorthands.items():
        if chosen.setdefault(lever, choice) != choice:
            raise ConfigError(f"{said} and kernels '{lever}={chosen[lever]}' disagree; give one of them")
    return dataclasses.replace(base, **chosen)


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
    dropped first). (..., H, W) -> (..., H // 2, W // 2); a channels_last input gives a
    channels_last output (its NHWC view is pooled, so no NCHW copy is made)."""
    rows, cols = x.shape[-2] // 2, x.shape[-1] // 2
    if _is_channels_last(x):
        nhwc = x.permute(0, 2, 3, 1)[:, : 2 * rows, : 2 * cols]  # (N, H, W, C), C innermost
        pooled = nhwc.reshape(x.shape[0], rows, 2, cols, 2, x.shape[1]).mean(dim=(2, 4))  # (N, H/2, W/2, C)
        return pooled.permute(0, 3, 1, 2)
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
        if _is_channels_last(x):  # torch.instance_norm would copy it to NCHW (the layout lever)
            return instance_norm_channels_last(x, self.weight, self.bias, self.eps)
        # Not F.instance_norm: it refuses a 1x1 map, where GroupNorm(C, C) returns the bias.
        return torch.instance_norm(x, self.weight, self.bias, None, None, True, 0.0, self.eps,
                                   torch.backends.cudnn.enabled)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


def instance_norm_channels_last(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Instance norm that keeps a channels_last ``x`` (N, C, H, W) channels_last: per image and
    channel, ``(x - mean) / sqrt(biased var + eps) * weight + bias``, the statistics in at least
    float32 whatever ``x``'s dtype (as the batch-norm kernels keep them), the output in ``x``'s dtype.
    Written as one ``var_mean`` reduction over (H, W) and plain elementwise ops, none of which
    changes the memory format; a compiler fuses them (eagerly they cost more bytes than the
    batch-norm kernels, which copy NHWC to NCHW)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 up to fp32; fp32 and fp64 as they are
    values = x.to(dtype)  # no copy in fp32 and fp64
    var, mean = torch.var_mean(values, dim=(2, 3), keepdim=True, correction=0)  # (N, C, 1, 1)
    scale = torch.rsqrt(var + eps) * weight.to(dtype).view(1, -1, 1, 1)
    # centred first: x * scale + (bias - mean * scale) cancels catastrophically where a channel's
    # mean is large against its spread (scale ~ 1 / spread)
    return torch.addcmul(bias.to(dtype).view(1, -1, 1, 1), values - mean, scale).to(x.dtype)


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


def cast_weights_once(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Hold the weights autocast casts on every call (convolutions' and linear layers' weights
    and biases: autocast's lower-precision ops) in ``dtype``, in place; returns ``net``. The
    Parameter objects stay (their data is converted, memory format kept), so the state dict's
    keys, the pool's blend and ``load_state_dict`` still reach them and round into ``dtype`` as
    they write; under autocast the per-call casts of these weights become no-ops. Other
    parameters (the norms' affine weights, which autocast leaves in fp32) are untouched. For
    networks that only ever run under autocast to ``dtype`` (the casts lever)."""
    for module in net.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    return net


def levers_of(net: nn.Module) -> KernelLevers:
    """The module-level levers ``net`` runs with (``pool`` and ``norm``, read from its modules;
    today's path for a layer it does not have; the other levers are how the loop runs a
    network, recorded in its plan). A network that mixes implementations of one layer is an
    error."""
    found = {"pool": {_pool_kernel(m) for m in net.modules() if _is_pool_2x2(m)},
             "norm": {_norm_kernel(m) for m in net.modules() if _is_instance_norm(m)}}
    for lever, kernels in found.items():
        if len(kernels) > 1:
            raise ConfigError(f"the network mixes {lever} kernels: {', '.join(sorted(kernels))}")
    return KernelLevers(**{lever: kernels.pop() for lever, kernels in found.items() if kernels})
