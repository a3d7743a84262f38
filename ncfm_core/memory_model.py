"""The memory and FLOP model: what one distillation iteration holds and computes, under a plan.

:func:`estimate_memory` is an explicit account of everything one iteration holds at its fullest
moment: the tensors kept for the whole iteration, then the largest of its phases (real chunks
streamed, one class group's synthetic forward/backward, the matching loss's own, such as psi's
gradient through the real CF), each term named and sized in bytes from the network's geometry,
without touching data or a GPU. The matching loss's terms come from the loss itself
(``MatchingLoss.costs``, ``ncfm_core.matching``), so the estimate sits beside the code it estimates.
:func:`estimate_iteration_flops` counts the same iteration's floating-point operations. Both take
a :class:`Plan` (how the iteration is cut: real chunk, class group, precision, checkpointing);
:mod:`ncfm_core.planner` searches the plans for the fastest that fits a budget.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from ncfm_core.cf import chunk_bounds
from ncfm_core.config import DistillConfig
from ncfm_core.data import DatasetShape
from ncfm_core.kernels import KernelLevers, parse_kernels
from ncfm_core.matching import IterationShape, matching_class
from ncfm_core.models import create_network, default_depth, supported_options
from ncfm_core.runtime import BackendSettings

__all__ = [
    "CUBLAS_WORKSPACE_BYTES",
    "CUDNN_WORKSPACE_BYTES",
    "FRAGMENTATION_CAPPED",
    "FRAGMENTATION_UNCAPPED",
    "SMALL_ALLOCATIONS_BYTES",
    "MemoryEstimate",
    "Plan",
    "TimeModel",
    "estimate_iteration_flops",
    "estimate_iteration_seconds",
    "estimate_memory",
    "estimate_peak_bytes",
    "iteration_passes",
    "real_per_class_drawn",
    "time_model_for",
]

F32 = 4  # bytes
MiB = 2**20

# What the caching allocator holds beyond the tensors, fitted to what an H200 measured on
# 2026-12-04 (torch 2.11, the allocator's default fixed-size segments; the rows, the fit and its
# tolerance are in tests/test_memory_model.py, which pins the estimate to them). Allocated = the
# tensors + the workspaces below; reserved, what --gpu-mem caps and what a plan must fit in, =
# allocated + the headroom: fragmentation and, on CUDA, cuDNN's workspaces.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB  # cuBLAS's and cuBLASLt's workspaces, 32 MiB each on Hopper
# (PyTorch sizes them by architecture, less before Hopper); allocated through the caching
# allocator once per handle and stream and kept: the 256 MiB test's allocated peak was its
# tensors plus 64 MiB
SMALL_ALLOCATIONS_BYTES = 4 * MiB  # scalars and small buffers the model does not itemise, each
# rounded up to 512 B (the 256 MiB test: 1.6 MB allocated for 0.7 MB of tensors)
# Fragmentation: blocks the allocator holds free between the peak phase's transient allocations
# of changing sizes, as a share of those transients. Under a cap (--gpu-mem) the allocator hands
# its cached blocks back before it refuses a request, so less stays reserved than without one,
# where nothing asks it to (and cuDNN's autotuning, on in every uncapped row, may cache a
# workspace as large as the free memory).
FRAGMENTATION_CAPPED = 0.25  # the command line at --gpu-mem 2.5G: 2.48 GiB reserved, 2.09 allocated
FRAGMENTATION_UNCAPPED = 0.58  # the authors' work with psi, default plan: 9.16 GiB reserved, 5.85 allocated
CUDNN_WORKSPACE_BYTES = 64 * MiB  # on CUDA, left free for the workspace of cuDNN's chosen convolution
# algorithm: not modelled (it depends on the algorithm); PyTorch falls back to an algorithm with
# a smaller workspace when it cannot allocate one (ncfm_core.runtime), so this is what lets the
# preferred one run, not what keeps the run alive


@dataclass(frozen=True)
class Plan:
    """How one distillation is cut to fit its memory budget.

    ``real_chunk``: real images per no-grad forward; ``class_chunk``: classes per synthetic
    forward/backward; ``precision``: fp32, or bf16/fp16 autocast for the network forwards;
    ``activation_checkpointing``: recompute instead of store (the synthetic side block by block,
    and with psi the real features in the backward). ``budget_bytes`` is the budget the plan was
    made for (None: no budget), ``budget_source`` where it came from, ``estimated_peak_bytes`` the
    model's peak of what the allocator reserves (what ``--gpu-mem`` caps, and what must fit it),
    ``estimated_allocated_bytes`` its peak of allocated tensors and workspaces, ``headroom_bytes``
    the difference (fragmentation and cuDNN's workspace, see :func:`estimate_memory`), ``capped``
    whether the allocator is capped at the budget (``--gpu-mem``; planning for the free memory
    caps nothing), ``device`` the device planned for, ``backend`` the process-wide
    settings the run uses (``ncfm_core.runtime``: the allocator's configuration and who chose it,
    cuDNN autotuning).
    """

    real_chunk: int
    class_chunk: int
    precision: str
    activation_checkpointing: bool
    budget_bytes: int | None
    estimated_peak_bytes: int
    device: str
    budget_source: str = ""
    estimate_terms: tuple[tuple[str, int], ...] = ()
    estimated_seconds: float | None = None  # the time model's seconds per iteration (None: no model)
    chosen_because: str = ""  # why the planner took this plan, one line
    cf_precision: str = "fp32"  # CF projections: tf32 on CUDA by default (ncfm_core.cf.project)
    estimated_allocated_bytes: int = 0
    headroom_bytes: int = 0
    capped: bool = False
    backend: BackendSettings = BackendSettings()
    # the kernel levers the run uses (ncfm_core.kernels): the config's, decided with its precisions,
    # as the planner sets them for this plan (no compile or graphs with checkpointing);
    # None: a plan written by hand, which leaves the config's as they are
    kernels: KernelLevers | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["estimate_terms"] = dict(self.estimate_terms)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """A plan as :meth:`to_dict` wrote it (a manifest's); fields it lacks take their defaults."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["estimate_terms"] = tuple(dict(fields.get("estimate_terms") or {}).items())
        fields["backend"] = BackendSettings.from_dict(fields.get("backend"))
        if fields.get("kernels") is not None:  # recorded as lever -> choice; None: a plan made before the levers
            fields["kernels"] = KernelLevers.from_dict(fields["kernels"])
        return cls(**fields)

    @property
    def knobs(self) -> tuple[int, int, bool]:
        """(real chunk, class chunk, checkpointing): what a smaller plan changes."""
        return self.real_chunk, self.class_chunk, self.activation_checkpointing

    def apply(self, config: DistillConfig) -> DistillConfig:
        """``config`` with this plan's chunks, precisions, checkpointing and kernel levers filled in."""
        return config.replace(
            real_chunk=self.real_chunk,
            class_chunk=self.class_chunk,
            precision=self.precision,
            activation_checkpointing=self.activation_checkpointing,
            cf_precision=self.cf_precision,
            kernels=config.kernels if self.kernels is None else self.kernels.spec(),
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one iteration and the terms it is made of (name -> bytes).

    ``phase`` names the moment of the peak: ``real`` (real chunks streamed), ``synthetic`` (one
    class group's forward/backward), ``optimizer step`` or one of the matching loss's own
    (``ncfm`` with psi: ``real-backward``, psi's gradient through the real CF).
    """

    peak_bytes: int  # reserved: allocated plus the headroom
    phase: str
    terms: tuple[tuple[str, int], ...]
    allocated_bytes: int = 0  # tensors and workspaces


@dataclass(frozen=True)
class _NetworkSizes:
    """Per-image sizes of one extractor (elements unless named bytes)."""

    feature_dim: int
    param_count: int
    saved_bytes: int  # what autograd keeps for the backward of one image
    checkpointed_saved_bytes: int  # the same with per-block checkpointing: block inputs only
    largest_block_saved_bytes: int  # one block's saved tensors (recomputed in the backward)
    backward_transient_bytes: int  # gradient buffers alive at once in the backward
    nograd_transient_bytes: int  # tensors alive at once in a no-grad forward
    forward_flops: int  # conv and linear multiply-adds x 2, features only
    classifier_flops: int


def real_per_class_drawn(config: DistillConfig, shape: DatasetShape) -> int:
    """Real images per class one iteration draws, as planned: ``config.real_per_class`` capped
    at ``num_train // num_classes``. The distiller caps at its smallest class (never a
    duplicate, see ``Distiller.real_per_class``); the mean class size bounds the smallest from
    above, so the plan is exact for balanced sets and never under-estimates otherwise."""
    return max(1, min(config.real_per_class, shape.num_train // max(1, shape.num_classes)))


def _levers_planned(config: DistillConfig) -> KernelLevers:
    """The kernel levers the model sizes: the config's, as its plan decided them; a config not
    decided yet (``kernels`` asking for "auto") is sized as today's path, which holds the most."""
    auto, chosen = parse_kernels(config.kernels)
    return KernelLevers() if auto else KernelLevers(**chosen)


def _convnet_sizes(config: DistillConfig, shape: DatasetShape, precision: str) -> _NetworkSizes:
    """Sizes of ConvNet-D (Conv3x3 -> norm -> ReLU -> AvgPool2d(2)) x depth, from its geometry.

    What autograd saves per block, for an input of c_in x s x s and width w:
    - the conv's input (c_in s^2): fp32, or under autocast the bf16/fp16 copy the cast makes;
    - the norm's input (w s^2, the conv output): fp32 (CUDA autocast runs group_norm in fp32, so
      it saves an fp32 copy of the low-precision conv output), and its mean and rstd (w each);
      absent with ``norm="none"``;
    - the ReLU's output (w s^2, fp32), which the average pool also reads for its backward;
    the pool's output is the next conv's input.

    With the batch-norm path of instance norm (``kernels`` norm=batchnorm, ``ncfm_core.kernels``)
    under autocast nothing is cast to fp32: instance/batch norm is on no autocast list (the same
    policy on CUDA and the CPU), so it saves the low-precision conv output and writes a
    low-precision output, which the ReLU saves; its statistics stay fp32 and it also saves the
    affine weight repeated per image: 3 w floats per image. With layout=nhwc its channels_last
    form (``instance_norm_channels_last``) saves an fp32 view of its input and the centred input
    (8 bytes per element, in fp32 and under autocast alike) and 2 w floats. These bytes
    are what ``torch.autograd.graph.saved_tensors_hooks`` sees on the CPU, where the batch-norm
    path follows the same autocast policy as on CUDA (tests/test_memory_model.py checks them
    exactly). The no-grad forward keeps the block input and two of conv output / norm output /
    ReLU output alive, in the dtype each has.
    """
    depth = config.depth or default_depth(shape.image_size)
    width = config.width
    low = precision != "fp32"
    conv_in_bytes = 2 if low else F32
    levers = _levers_planned(config)
    has_norm = config.norm != "none"
    batchnorm = has_norm and config.norm == "instance" and levers.norm == "batchnorm"
    # bytes per element of the norm's saved input and of the ReLU's output (saved for its backward
    # and for the pool's), and per-channel floats the norm saves per image
    nhwc_norm = batchnorm and levers.layout == "nhwc"
    if nhwc_norm:  # instance_norm_channels_last saves its fp32 view of the input and the centred copy
        norm_in_bytes = 2 * F32
    else:
        norm_in_bytes = 2 if batchnorm and low else F32
    act_bytes = 2 if batchnorm and low else F32
    stats = (3 if batchnorm and not nhwc_norm else 2) * width * F32 if has_norm else 0
    side, channels = shape.image_size, shape.channels
    saved = largest = grad_transient = nograd = flops = 0
    checkpointed = shape.pixels * F32  # the normalised image, input of block 1
    for _ in range(depth):
        conv_in = channels * side * side
        conv_out = width * side * side
        block_saved = conv_in * conv_in_bytes + conv_out * (act_bytes + (norm_in_bytes if has_norm else 0)) + stats
        saved += block_saved
        largest = max(largest, block_saved)
        # backward of a block: grad of the ReLU output, of the norm input, of the conv input
        grad_transient = max(grad_transient, 2 * conv_out * act_bytes + conv_in * F32)
        # no-grad forward: the block input stays referenced while two of conv out / norm out /
        # relu out exist; under autocast today also the low-precision conv output (2 bytes); the
        # channels_last batch-norm path holds its input, fp32 view, centred copy and fp32 output
        # (and, under autocast, its low-precision output) at once
        if nhwc_norm:
            live = 3 * F32 + (2 + 2 if low else 0)
        elif batchnorm and low:
            live = 2 * 2
        else:
            live = 2 * F32 + (2 if low else 0)
        nograd = max(nograd, conv_in * F32 + conv_out * live)
        flops += 2 * channels * width * 9 * side * side  # 3x3 kernel, padding 1: s x s outputs
        side //= 2
        channels = width
        checkpointed += channels * side * side * F32  # block output = next block's input
    feature_dim = width * side * side
    param_count = _param_count(config, shape)
    return _NetworkSizes(
        feature_dim=feature_dim,
        param_count=param_count,
        saved_bytes=saved,
        checkpointed_saved_bytes=checkpointed,
        largest_block_saved_bytes=largest,
        backward_transient_bytes=grad_transient,
        nograd_transient_bytes=nograd,
        forward_flops=flops,
        classifier_flops=2 * feature_dim * shape.num_classes,
    )


def _meta_network(config: DistillConfig, shape: DatasetShape) -> torch.nn.Module:
    """The extractor built on the meta device: shapes and parameter counts, no memory."""
    # The knobs the network has, as the pool builds it (ncfm_core.pool.PoolSpec.build).
    options = supported_options(config.network, depth=config.depth or default_depth(shape.image_size),
                                width=config.width, norm=config.norm)
    with torch.device("meta"):
        return create_network(
            config.network, in_channels=shape.channels, num_classes=shape.num_classes,
            image_size=shape.image_size, **options,
        )


def _param_count(config: DistillConfig, shape: DatasetShape) -> int:
    return sum(p.numel() for p in _meta_network(config, shape).parameters())


def _traced_sizes(config: DistillConfig, shape: DatasetShape, precision: str) -> _NetworkSizes:
    """Sizes of any other registered network, traced on the meta device: every leaf module's
    output counts as saved (fp32, whatever the precision: conservative), the largest
    input + output pair as the no-grad transient; no per-block checkpointing (the whole saved
    set stays). FLOPs from ``torch.utils.flop_counter`` on the same meta forward."""
    from torch.utils.flop_counter import FlopCounterMode

    net = _meta_network(config, shape)
    outputs: list[int] = []
    pairs: list[int] = []

    def record(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor) and not list(module.children()):
            outputs.append(output.numel())
            first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
            pairs.append(output.numel() + (first.numel() if first is not None else 0))

    handles = [m.register_forward_hook(record) for m in net.modules()]
    counter = FlopCounterMode(display=False)
    with counter:
        features = net.features(torch.empty(1, shape.channels, shape.image_size, shape.image_size, device="meta"))
    for handle in handles:
        handle.remove()
    saved = (sum(outputs) + shape.pixels) * F32
    largest_pair = max(pairs, default=shape.pixels) * F32
    return _NetworkSizes(
        feature_dim=int(features.shape[1]),
        param_count=sum(p.numel() for p in net.parameters()),
        saved_bytes=saved,
        checkpointed_saved_bytes=saved,
        largest_block_saved_bytes=0,
        backward_transient_bytes=2 * largest_pair,
        nograd_transient_bytes=2 * largest_pair,
        forward_flops=int(counter.get_total_flops()),
        classifier_flops=2 * int(features.shape[1]) * shape.num_classes,
    )


@functools.lru_cache(maxsize=256)
def _network_sizes(config: DistillConfig, shape: DatasetShape, precision: str) -> _NetworkSizes:
    """Cached: the memory, FLOP and time estimates of every plan the planner tries ask for it."""
    if config.network == "convnet":
        return _convnet_sizes(config, shape, precision)
    return _traced_sizes(config, shape, precision)


def _real_input_bytes(real_chunk: int, shape: DatasetShape) -> int:
    """A real chunk's uint8 gather, float copy and augmentation temporaries."""
    return real_chunk * shape.pixels * (1 + F32 + 2 * F32)


def _with_own(terms: dict[str, Any], own: dict[str, Any], loss: str) -> dict[str, Any]:
    """``terms`` followed by a matching loss's own; a name the loss reuses is its mistake, refused
    (an overwritten term would leave the estimate silently wrong)."""
    reused = terms.keys() & own.keys()
    if reused:
        raise ValueError(f"matching loss {loss!r} reuses the memory model's names {sorted(reused)}")
    return {**terms, **own}


def _iteration_shape(config: DistillConfig, shape: DatasetShape, plan: Plan, net: _NetworkSizes) -> IterationShape:
    """What a matching loss sizes its terms from (``ncfm_core.matching.IterationShape``)."""
    c, per_class_decoded = shape.num_classes, config.ipc * config.factor**2
    b = real_per_class_drawn(config, shape)
    bounds = chunk_bounds(c, b, max(1, plan.real_chunk))
    real_chunk = max(end - start for start, end in bounds)  # chunks are whole classes or inside one
    recompute = _real_input_bytes(real_chunk, shape) + real_chunk * net.nograd_transient_bytes
    return IterationShape(
        num_classes=c,
        feature_dim=net.feature_dim,
        real_rows=c * b,
        real_chunk_rows=real_chunk,
        real_chunks=len(bounds),
        synthetic_rows=c * per_class_decoded,
        group_rows=min(plan.class_chunk, c) * per_class_decoded,
        checkpointing=plan.activation_checkpointing,
        real_chunk_recompute_bytes=recompute + real_chunk * net.feature_dim * F32 * 2,
        real_forward_flops=net.forward_flops,
    )


def _transient(phase: str, terms: dict[str, int], kept: int) -> int:
    """Bytes a phase allocates and frees again: its terms but what the loss keeps between phases
    (counted in every phase of the iteration but the optimizer step, when it is gone)."""
    return max(0, sum(terms.values()) - (0 if phase == "optimizer step" else kept))


def estimate_memory(config: DistillConfig, shape: DatasetShape, plan: Plan) -> MemoryEstimate:
    """Model of the peak device memory of one iteration under ``plan`` (all terms in bytes):
    what the caching allocator reserves at the iteration's fullest moment, the figure
    ``--gpu-mem`` caps (``peak_bytes``), and the tensors and workspaces allocated then
    (``allocated_bytes``).

    Tensors held for the whole iteration ("persistent"):
    - the real train set as uint8 (N x C x H x W) plus labels and the per-class index table;
    - the pool (initial and trained weights of every member), the extractor and the teacher,
      plus the autocast weight copies;
    - the stored synthetic images, their gradient and AdamW's two moments;
    - the matching loss's own: its accumulators, its sampler and that sampler's optimiser.
    Then the largest of the phases:
    - real: a chunk of real images (the largest of the iteration's chunks, which are whole
      classes or pieces of one: uint8 gather, float copy, augmentation temporaries), the no-grad
      network's live tensors or, after them, the loss's statistics of the chunk (whichever is
      larger), the chunk's features, and what the loss keeps of them;
    - synthetic: one group of ``class_chunk`` classes, decoded (ipc * factor^2 per class) and
      augmented, with everything autograd saves in the extractor and (with calibration) the
      teacher (:func:`_convnet_sizes`), features and their normalised copy, the backward's
      gradient buffers, and the loss's per-group terms;
    - optimizer step: AdamW's temporaries (two of the images' size), the same for every plan;
    - the loss's own phases (``ncfm`` with psi: "real-backward", psi's gradient through the real CF).
    The loss's terms come from its ``costs`` (``ncfm_core.matching``), beside its code.

    Allocated = those tensors + ``SMALL_ALLOCATIONS_BYTES`` + on CUDA ``CUBLAS_WORKSPACE_BYTES``.
    Reserved = allocated + the headroom: the fragmentation between the peak phase's transient
    allocations (``FRAGMENTATION_CAPPED`` of them when ``plan.capped``, ``FRAGMENTATION_UNCAPPED``
    otherwise; what the loss keeps between phases is not transient) + on CUDA
    ``CUDNN_WORKSPACE_BYTES``. The constants are fitted to H200 measurements
    (tests/test_memory_model.py pins them).
    """
    c, pixels = shape.num_classes, shape.pixels
    net = _network_sizes(config, shape, plan.precision)
    it = _iteration_shape(config, shape, plan, net)
    costs = matching_class(config.matching).costs(config, it)
    d, real_chunk, group = net.feature_dim, it.real_chunk_rows, it.group_rows
    images = c * config.ipc * pixels * F32  # the stored synthetic images

    param_bytes = net.param_count * F32
    calib = config.calib_weight > 0
    persistent = {
        "real dataset (uint8) and index tables": shape.num_train * (pixels + 8 + 9),
        "pool weights (init + trained)": config.pool_size * 2 * param_bytes,
        "extractor + teacher (+ autocast copies)": 2 * param_bytes + (0 if plan.precision == "fp32" else param_bytes),
        "synthetic images + grad + AdamW moments": 4 * images,
    }

    sampling = c * max(1, shape.num_train // c) * (8 + 8) + it.real_rows * 8
    real_phase = {
        "real sampling keys": sampling,
        "real chunk input + augmentation": _real_input_bytes(real_chunk, shape),
        "real chunk forward (no grad) or its CF": max(real_chunk * net.nograd_transient_bytes, costs.real_chunk_bytes),
        "real chunk features": real_chunk * d * F32 * 2,
    }

    nets = 2 if calib else 1
    if plan.activation_checkpointing and config.network == "convnet":
        network_saved = group * nets * net.checkpointed_saved_bytes + group * net.largest_block_saved_bytes
    else:
        network_saved = group * nets * net.saved_bytes
    syn_phase = {
        "synthetic decode + augmentation": group * pixels * F32 * 6,
        "synthetic activations saved for backward": network_saved,
        "synthetic features (raw, normalised, grad)": group * d * F32 * 3,
        "backward gradient buffers": group * (net.backward_transient_bytes + 2 * pixels * F32),
        "teacher logits": group * c * F32 * 3 if calib else 0,
    }

    persistent = _with_own(persistent, costs.persistent, config.matching)
    real_phase = _with_own(real_phase, costs.real, config.matching)
    phases = _with_own({"real": real_phase, "synthetic": _with_own(syn_phase, costs.synthetic, config.matching),
                        "optimizer step": {"AdamW temporaries": 2 * images}},
                       costs.phases, config.matching)
    phase_name, phase_terms = max(phases.items(), key=lambda item: sum(item[1].values()))
    tensors = sum(persistent.values()) + sum(phase_terms.values())
    cuda = torch.device(plan.device).type == "cuda"
    workspaces = {
        "cuBLAS and cuBLASLt workspaces": CUBLAS_WORKSPACE_BYTES if cuda else 0,
        "small allocations the model does not itemise": SMALL_ALLOCATIONS_BYTES,
    }
    fraction = FRAGMENTATION_CAPPED if plan.capped else FRAGMENTATION_UNCAPPED
    headroom = {
        "headroom: fragmentation between transient allocations":
            int(fraction * _transient(phase_name, phase_terms, costs.kept_between_phases)),
        "headroom: cuDNN workspace": CUDNN_WORKSPACE_BYTES if cuda else 0,
    }
    allocated = tensors + sum(workspaces.values())
    terms = {**persistent, **{f"{phase_name}: {k}": v for k, v in phase_terms.items() if v},
             **{k: v for k, v in {**workspaces, **headroom}.items() if v}}
    return MemoryEstimate(int(allocated + sum(headroom.values())), phase_name,
                          tuple((k, int(v)) for k, v in terms.items()), allocated_bytes=int(allocated))


def estimate_peak_bytes(config: DistillConfig, shape: DatasetShape, plan: Plan) -> int:
    """Estimated peak device bytes of one iteration under ``plan`` (see :func:`estimate_memory`)."""
    return estimate_memory(config, shape, plan).peak_bytes


def estimate_iteration_flops(config: DistillConfig, shape: DatasetShape, plan: Plan) -> dict[str, int]:
    """Floating-point operations of one iteration (a multiply-add counts 2), by part.

    Counted: convolutions and linear layers (forward; a backward that needs only input
    gradients costs one forward again, since the extractor's weights are frozen), the
    recomputations that checkpointing adds, and the matching loss's own (its ``costs``; for
    ``ncfm`` the CF projections ``(n, d) @ (d, F)``, their gradients and psi's real-side
    gradient). Not counted: norms, ReLU, pooling, cos/sin and the augmentation (elementwise
    work, memory-bound rather than compute-bound).
    """
    net = _network_sizes(config, shape, plan.precision)
    it = _iteration_shape(config, shape, plan, net)
    n_real, n_syn = it.real_rows, it.synthetic_rows
    recompute = plan.activation_checkpointing and config.network == "convnet"
    flops = {
        "real forward (no grad)": n_real * net.forward_flops,
        "synthetic forward": n_syn * net.forward_flops,
        "synthetic backward (input grads)": n_syn * net.forward_flops,
    }
    if recompute:
        flops["synthetic recompute (checkpointing)"] = n_syn * net.forward_flops
    if config.calib_weight > 0:
        teacher = net.forward_flops + net.classifier_flops
        flops["teacher forward + backward"] = n_syn * teacher * (3 if recompute else 2)
    costs = matching_class(config.matching).costs(config, it)
    flops = _with_own(flops, _with_own(costs.flops, costs.network_flops, config.matching), config.matching)
    flops["total"] = sum(flops.values())
    return flops


# ---- the time model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeModel:
    """Seconds per iteration = network FLOPs / ``flops_per_second`` + the matching loss's own
    FLOPs / ``matching_flops_per_second`` + ``launch units x seconds_per_unit``.

    Network FLOPs are the convolutions and linear layers of every forward and backward
    (:func:`estimate_iteration_flops` but the loss's ``MatchingCosts.flops``); their rate is an
    EFFECTIVE one, fitted on measured iterations: it carries the memory-bound work that follows
    each convolution (norms, pooling, casts), so it is a few percent of the device's peak and will
    move when those kernels change. A launch unit is the fixed cost of one pass (kernel launches
    and the under-filled device at its edges): a real chunk's no-grad forward with its
    augmentation and CF counts 1, a class group's synthetic forward + backward (extractor and
    teacher) ``SYNTHETIC_PASS_UNITS``; the matching loss adds its own passes (``ncfm``: one chunk
    of psi's real-side gradient ``ncfm_core.matching.ncfm.PSI_CHUNK_UNITS``, plus 1 when
    checkpointing recomputes its forward). See :func:`iteration_passes`.
    """

    flops_per_second: float
    seconds_per_unit: float
    source: str
    matching_flops_per_second: float = 200e12


SYNTHETIC_PASS_UNITS = 3.0  # forward + backward of the extractor and of the teacher: ~3x a no-grad forward's kernels

# Fitted (least squares on the relative error) to the four ncfm rows of issue 23's "Where we
# stand", measured in one sitting on an H200 (torch 2.11; benchmarks/distill_speed.py, cuDNN
# autotuning on; CIFAR-100 shape, IPC 50, factor 2, ConvNet-3 width 128, 500 real images per class,
# bf16; network work 13.21 TFLOP per iteration in each):
#   F 4096, psi on,  real chunk 4096, 4 classes/pass:  0.709 s (94.5 launch units)
#   F 4096, psi off, real chunk 4096, 7 classes/pass:  0.683 s (58 units)
#   F 4096, psi on,  real chunk  512, 1 class/pass:    1.074 s (450 units)
#   F 1024, psi on,  real chunk 4096, 7 classes/pass:  0.682 s (64.5 units)
# (the table's fifth row is the authors' program, not this one). The rows with 3.5 and 0.9
# TFLOP of CF maths took the same time, so they cannot resolve the CF matmuls' rate: those run on
# TF32 tensor cores and are timed at an assumed 200 TFLOP/s (about 40% of the H200's dense TF32
# peak: 4 to 18 ms per iteration here). The fit: 21.6 TFLOP/s of network work (~3% of the
# chip's bf16 peak: the norms, pooling and casts dominate, issue 23's profile) and 0.98 ms per
# launch unit (~90,000 launches at 450 units, ~200 per unit). tests/test_memory_model.py pins
# the model to the four rows.
CUDA_TIME_MODEL = TimeModel(
    flops_per_second=21.6e12,
    seconds_per_unit=0.984e-3,
    source="fitted on four plans measured on an H200 (issue 23; see ncfm_core.memory_model)",
)


def time_model_for(device: torch.device | str) -> TimeModel | None:
    """The time model of a device kind: CUDA's (calibrated on an H200, used for every CUDA GPU:
    only the ratio between plans matters to the planner); None elsewhere (no calibration)."""
    return CUDA_TIME_MODEL if torch.device(device).type == "cuda" else None


def iteration_passes(config: DistillConfig, shape: DatasetShape, plan: Plan) -> dict[str, float]:
    """Passes of one iteration under ``plan``: ``real chunks``, ``synthetic groups``, the matching
    loss's own (``ncfm``: ``psi chunks``) as counts, and ``launch units`` (their weighted sum,
    see :class:`TimeModel`)."""
    net = _network_sizes(config, shape, plan.precision)
    it = _iteration_shape(config, shape, plan, net)
    groups = -(-shape.num_classes // max(1, min(plan.class_chunk, shape.num_classes)))
    extra = matching_class(config.matching).costs(config, it).passes
    units = it.real_chunks + SYNTHETIC_PASS_UNITS * groups
    for count, units_each in extra.values():
        units += units_each * count
    counts = _with_own({"real chunks": it.real_chunks, "synthetic groups": groups},
                       {name: count for name, (count, _) in extra.items()}, config.matching)
    return {**counts, "launch units": units}


def estimate_iteration_seconds(
    config: DistillConfig, shape: DatasetShape, plan: Plan, model: TimeModel | None = None
) -> float | None:
    """Seconds per iteration under ``plan`` by ``model`` (default: the plan's device's; None when
    the device has no time model)."""
    model = model or time_model_for(plan.device)
    if model is None:
        return None
    flops = estimate_iteration_flops(config, shape, plan)
    matching = sum(flops[name] for name in _matching_costs(config, shape, plan).flops)
    units = iteration_passes(config, shape, plan)["launch units"]
    return ((flops["total"] - matching) / model.flops_per_second + matching / model.matching_flops_per_second
            + units * model.seconds_per_unit)


def _matching_costs(config: DistillConfig, shape: DatasetShape, plan: Plan):
    net = _network_sizes(config, shape, plan.precision)
    return matching_class(config.matching).costs(config, _iteration_shape(config, shape, plan, net))
