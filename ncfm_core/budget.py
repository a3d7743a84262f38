"""Device detection, memory budgets and run planning.

``resolve_device("auto")`` picks CUDA, then MPS, then CPU and says why, so the choice can be
logged and stored in the manifest.

The planner answers "how must this run be cut to fit in B bytes?" without touching data or a
GPU: :func:`estimate_peak_bytes` is an explicit model of everything one distillation iteration
holds at its fullest moment, and :func:`plan_run` walks from the fastest plan towards smaller
ones (smaller real chunks, then fewer classes per synthetic pass, then recomputation) until the
estimate fits. Sizes follow one convention, stated once: ``K``, ``M``, ``G``, ``T`` (and ``KiB``,
``MiB``, ``GiB``, ``TiB``, ``Ki``, ``Mi``, ...) are powers of 1024, as GPU memory is sold and
reported (nvidia-smi's MiB, torch's allocator); ``KB``, ``MB``, ``GB``, ``TB`` are SI powers of
1000. ``--gpu-mem 2.5G`` therefore means 2.5 * 2^30 bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ncfm_core.config import PRECISIONS, DistillConfig
from ncfm_core.errors import BudgetInfeasibleError, ConfigError
from ncfm_core.models import create_network, default_depth, supported_options

__all__ = [
    "DEVICE_CHOICES",
    "PRECISIONS",
    "DatasetShape",
    "MemoryEstimate",
    "PeakMemory",
    "Plan",
    "cap_device_memory",
    "dataset_shape",
    "detect_memory",
    "device_total_bytes",
    "estimate_iteration_flops",
    "estimate_memory",
    "estimate_peak_bytes",
    "format_bytes",
    "measure_peak",
    "parse_memory",
    "plan_path",
    "plan_run",
    "reset_peak",
    "resolve_device",
    "resolve_precision",
]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")

MAX_REAL_CHUNK = 4096  # real images per no-grad forward in the fastest plan (bigger gains nothing)
MIN_REAL_CHUNK = 64  # the planner never cuts real chunks below this
ESTIMATE_OVERHEAD = 0.10  # allocator rounding and fragmentation, on top of the tensor bytes
ESTIMATE_FIXED_BYTES = 32 * 2**20  # conv workspaces, small buffers the model does not itemise
FREE_MARGIN_FRACTION = 0.10  # without a budget: keep this share of the free memory unused...
FREE_MARGIN_MIN_BYTES = 256 * 2**20  # ...and at least this much
F32 = 4  # bytes


def resolve_device(requested: str = "auto") -> tuple[torch.device, str]:
    """Return (device, reason). Explicit requests for a missing accelerator are errors."""
    name = requested.lower()
    base = name.split(":", 1)[0]
    if base not in DEVICE_CHOICES:
        raise ConfigError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if base == "auto":
        if cuda_ok:
            return torch.device("cuda"), f"auto: CUDA available ({torch.cuda.get_device_name(0)})"
        if mps_ok:
            return torch.device("mps"), "auto: Apple MPS available"
        return torch.device("cpu"), "auto: no CUDA or MPS device found"
    if base == "cuda" and not cuda_ok:
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu or auto")
    if base == "mps" and not mps_ok:
        raise ConfigError("--device mps was requested but MPS is not available; use --device cpu or auto")
    return torch.device(name), "requested"


# ----------------------------------------------------------------------------- sizes

_UNIT_BYTES = {
    "b": 1,
    **{f"{p}{s}": 1024**i for i, p in enumerate("kmgt", start=1) for s in ("", "i", "ib")},
    **{f"{p}b": 1000**i for i, p in enumerate("kmgt", start=1)},
}
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([+-]?[0-9]+))?\s*([a-z]*)$")


def parse_memory(spec: str, total_bytes: int | None = None) -> int:
    """A memory size given by a person -> bytes.

    ``"2.5G"``, ``"800M"``, ``"1.5GiB"`` (powers of 1024), ``"512MB"`` (powers of 1000),
    ``"1048576"`` (bytes: a whole number above 1), or ``"0.3"`` (a unitless number in (0, 1]:
    that fraction of ``total_bytes``, the device's memory; ``"1"`` is the whole device). Case and
    spaces around the unit do not matter. ``ConfigError`` for anything else, for sizes <= 0, for a
    fraction above 1 written without a unit, and for a fraction when ``total_bytes`` is unknown.
    """
    text = str(spec).strip().lower()
    match = _SIZE.match(text)
    if match is None or (match.group(3) and match.group(3) not in _UNIT_BYTES):
        raise ConfigError(
            f"cannot read memory size {spec!r}; write e.g. 2.5G, 800M, 1.5GiB, 512MB or a fraction such as 0.3"
        )
    number = float(match.group(1)) * 10.0 ** int(match.group(2) or 0)
    unit = match.group(3)
    if not number > 0 or not math.isfinite(number):
        raise ConfigError(f"memory size {spec!r} must be positive")
    if unit:
        size = int(number * _UNIT_BYTES[unit])
    elif number <= 1.0:
        if total_bytes is None:
            raise ConfigError(
                f"memory size {spec!r} is a fraction of the device, but the device's total memory is "
                f"unknown here; give a size such as 2.5G instead"
            )
        size = int(number * total_bytes)
    elif number != int(number):
        raise ConfigError(
            f"memory size {spec!r}: a fraction must lie in (0, 1]; for a size add a unit, e.g. {spec}G"
        )
    else:
        size = int(number)
    if size < 1:
        raise ConfigError(f"memory size {spec!r} is less than one byte")
    return size


def format_bytes(size: float) -> str:
    """Bytes -> a short human string in powers of 1024 (``"2.50 GiB"``, ``"812 MiB"``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            value = size / scale
            return f"{value:.2f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(size)} B"


def _ceil_mib_spec(size: int) -> str:
    """The smallest whole number of MiB >= ``size``, as a ``--gpu-mem`` value (``"413M"``)."""
    return f"{math.ceil(size / 2**20)}M"


# ----------------------------------------------------------------------------- devices


def detect_memory(device: torch.device | str) -> tuple[int, int | None]:
    """(free bytes, total bytes or None) of ``device`` right now.

    CUDA: ``torch.cuda.mem_get_info`` (free as the driver sees it). CPU: ``MemAvailable`` from
    /proc/meminfo, else ``os.sysconf`` available pages. MPS: the recommended working-set size
    minus what torch holds. ``ConfigError`` for a CUDA device that torch cannot see.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("no CUDA device to measure free memory on; give a budget with --gpu-mem")
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    if device.type == "mps":
        total = int(torch.mps.recommended_max_memory())
        return max(0, total - int(torch.mps.current_allocated_memory())), total
    meminfo = _read_meminfo()
    if "MemAvailable" in meminfo:
        return meminfo["MemAvailable"], meminfo.get("MemTotal")
    page = os.sysconf("SC_PAGE_SIZE")
    return int(os.sysconf("SC_AVPHYS_PAGES") * page), int(os.sysconf("SC_PHYS_PAGES") * page)


def _read_meminfo() -> dict[str, int]:
    try:
        with open("/proc/meminfo") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def device_total_bytes(device: torch.device | str) -> int | None:
    """Total memory of ``device`` (None when it cannot be known here, e.g. CUDA without one)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return detect_memory(device)[1]
    except (OSError, ValueError, AttributeError):
        return None


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> the fastest precision the device runs well: bf16 autocast on CUDA with bf16
    support (Ampere and later), fp16 autocast on older CUDA GPUs (with loss scaling), fp32
    elsewhere (CPU, MPS). Planning for CUDA on a machine without one assumes bf16.
    Explicit ``fp32``/``bf16``/``fp16`` are returned as they are."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    if not torch.cuda.is_available():
        return "bf16"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def cap_device_memory(device: torch.device | str, budget_bytes: int) -> float | None:
    """Make the CUDA caching allocator refuse to hold more than ``budget_bytes`` on ``device``
    (``torch.cuda.set_per_process_memory_fraction``); returns the fraction set. A no-op that
    returns None elsewhere. The CUDA context itself (a few hundred MiB) lives outside the
    allocator and outside the cap. ``ConfigError`` if the budget exceeds the device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    total = int(torch.cuda.get_device_properties(device).total_memory)
    if budget_bytes > total:
        raise ConfigError(
            f"memory budget {format_bytes(budget_bytes)} exceeds the device's {format_bytes(total)}; "
            f"give a smaller --gpu-mem"
        )
    fraction = budget_bytes / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


@dataclass(frozen=True)
class PeakMemory:
    """What a run held at its fullest, and where the figure comes from.

    CUDA: ``allocated_bytes`` (tensors) and ``reserved_bytes`` (what the caching allocator held,
    the figure a ``--gpu-mem`` cap applies to) since the last :func:`reset_peak`. CPU: the peak
    resident set size of the whole process (interpreter and libraries included) since it
    started, which cannot be reset.
    """

    device: str
    source: str
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    rss_bytes: int | None = None

    @property
    def peak_bytes(self) -> int | None:
        """The figure to compare with a budget: reserved on CUDA, peak RSS on CPU."""
        if self.reserved_bytes is not None:
            return self.reserved_bytes
        return self.rss_bytes if self.rss_bytes is not None else self.allocated_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}


def reset_peak(device: torch.device | str) -> None:
    """Start a new peak measurement (CUDA only; the CPU's peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def measure_peak(device: torch.device | str) -> PeakMemory:
    """The peak memory of this process on ``device`` (see :class:`PeakMemory`)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return PeakMemory(
            device=str(device),
            source="torch.cuda.max_memory_allocated / max_memory_reserved",
            allocated_bytes=int(torch.cuda.max_memory_allocated(device)),
            reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
        )
    if device.type == "mps":
        return PeakMemory(
            device=str(device), source="torch.mps.driver_allocated_memory (current, not a peak)",
            allocated_bytes=int(torch.mps.driver_allocated_memory()),
        )
    import resource

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = max_rss if sys.platform == "darwin" else max_rss * 1024  # Linux reports KiB
    return PeakMemory(device=str(device), source="peak RSS of the whole process (resource.getrusage)", rss_bytes=rss)


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class DatasetShape:
    """What the planner needs to know about a dataset, without loading it."""

    num_classes: int
    channels: int
    image_size: int
    num_train: int

    @classmethod
    def of(cls, dataset: Any) -> DatasetShape:
        """The shape of a loaded ``ImageDataset``."""
        return cls(dataset.num_classes, dataset.channels, dataset.image_size, dataset.num_train)

    @property
    def pixels(self) -> int:
        """Values per image, C*H*W."""
        return self.channels * self.image_size * self.image_size


# Train-split shapes of the registered datasets, so plans can be made where the data is not.
# ImageNet subsets vary a little per class; 1,300 per class is ImageNet's maximum.
_KNOWN_SHAPES = {
    "cifar10": DatasetShape(10, 3, 32, 50_000),
    "cifar100": DatasetShape(100, 3, 32, 50_000),
    "tinyimagenet": DatasetShape(200, 3, 64, 100_000),
    "digits": DatasetShape(10, 1, 16, 1_257),
    "fake": DatasetShape(10, 3, 32, 640),
    **{
        name: DatasetShape(10, 3, 128, 13_000)
        for name in ("imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow")
    },
}


def dataset_shape(name: str, image_size: int | None = None) -> DatasetShape | None:
    """The train-split shape of a registered dataset by name (``fake`` with its default
    options: CIFAR-10-shaped), resized to ``image_size`` if given; None for ``folder:`` and
    other datasets whose shape is only known once loaded."""
    shape = _KNOWN_SHAPES.get(name.lower())
    if shape is not None and image_size is not None:
        shape = dataclasses.replace(shape, image_size=image_size)
    return shape


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """How one distillation is cut to fit its memory budget.

    ``real_chunk``: real images per no-grad forward; ``class_chunk``: classes per synthetic
    forward/backward; ``precision``: fp32, or bf16/fp16 autocast for the network forwards;
    ``activation_checkpointing``: recompute instead of store (the synthetic side block by block,
    and with psi the real features in the backward). ``budget_bytes`` is the budget the plan was
    made for (None: no budget), ``budget_source`` where it came from, ``estimated_peak_bytes`` the
    model's peak (see :func:`estimate_memory`), ``device`` the device planned for.
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

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["estimate_terms"] = dict(self.estimate_terms)
        return data

    def apply(self, config: DistillConfig) -> DistillConfig:
        """``config`` with this plan's chunks, precision and checkpointing filled in."""
        return config.replace(
            real_chunk=self.real_chunk,
            class_chunk=self.class_chunk,
            precision=self.precision,
            activation_checkpointing=self.activation_checkpointing,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one iteration and the terms it is made of (name -> bytes).

    ``phase`` names the moment of the peak: ``real`` (real chunks streamed), ``synthetic`` (one
    class group's forward/backward) or ``real-backward`` (psi's gradient through the real CF).
    """

    peak_bytes: int
    phase: str
    terms: tuple[tuple[str, int], ...]


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


def _convnet_sizes(config: DistillConfig, shape: DatasetShape, precision: str) -> _NetworkSizes:
    """Sizes of ConvNet-D (Conv3x3 -> norm -> ReLU -> AvgPool2d(2)) x depth, from its geometry.

    What autograd saves per block, for an input of c_in x s x s and width w:
    - the conv's input (c_in s^2): fp32, or under autocast the bf16/fp16 copy the cast makes;
    - the norm's input (w s^2, the conv output): fp32 (CUDA autocast runs group_norm in fp32, so
      it saves an fp32 copy of the low-precision conv output), and its mean and rstd (w each);
      absent with ``norm="none"``;
    - the ReLU's output (w s^2, fp32), which the average pool also reads for its backward;
    the pool's output is the next conv's input.
    """
    depth = config.depth or default_depth(shape.image_size)
    width = config.width
    conv_in_bytes = F32 if precision == "fp32" else 2
    has_norm = config.norm != "none"
    side, channels = shape.image_size, shape.channels
    saved = largest = grad_transient = nograd = flops = 0
    checkpointed = shape.pixels * F32  # the normalised image, input of block 1
    for _ in range(depth):
        conv_in = channels * side * side
        conv_out = width * side * side
        block_saved = conv_in * conv_in_bytes + conv_out * F32 * (2 if has_norm else 1)
        block_saved += 2 * width * F32 if has_norm else 0  # the norm's per-channel mean and rstd
        saved += block_saved
        largest = max(largest, block_saved)
        # backward of a block: grad of the ReLU output, of the norm input, of the conv input
        grad_transient = max(grad_transient, (2 * conv_out + conv_in) * F32)
        # no-grad forward: the block input stays referenced while two of conv out / norm out /
        # relu out exist; under autocast also the low-precision conv output (2 bytes)
        nograd = max(nograd, conv_in * F32 + conv_out * (2 * F32 + (0 if precision == "fp32" else 2)))
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


def _network_sizes(config: DistillConfig, shape: DatasetShape, precision: str) -> _NetworkSizes:
    if config.network == "convnet":
        return _convnet_sizes(config, shape, precision)
    return _traced_sizes(config, shape, precision)


def estimate_memory(config: DistillConfig, shape: DatasetShape, plan: Plan) -> MemoryEstimate:
    """Model of the peak device memory of one iteration under ``plan`` (all terms in bytes).

    Held for the whole iteration ("persistent"):
    - the real train set as uint8 (N x C x H x W) plus labels and the per-class index table;
    - the pool (initial and trained weights of every member), the extractor and the teacher,
      plus the autocast weight copies;
    - the stored synthetic images with their gradient, AdamW's two moments and one temporary;
    - the frequencies (F, d) with psi's sampling graph, gradient buffers, and psi with Adam;
    - per-class CF accumulators (C, F) in fp64, their fp32 copies and gradients.
    Then the largest of three phases:
    - real: a chunk of ``real_chunk`` real images (uint8 gather, float copy, augmentation
      temporaries), the no-grad network's live tensors (or, after them, the (chunk, F)
      projections with cos and sin), and with psi and no checkpointing the stored real
      features (n_real, d) that psi's gradient needs later;
    - synthetic: one group of ``class_chunk`` classes, decoded (ipc * factor^2 per class) and
      augmented, with everything autograd saves in the extractor and (with calibration) the
      teacher (:func:`_convnet_sizes`), features and their normalised copy, the (n, F) projections
      and cos/sin, and the backward's gradient buffers; stored real features still alive;
    - real-backward (psi only): a chunk's projections, cos, sin and weights (4 x (chunk, F)),
      plus either the stored features or a recomputed chunk's no-grad forward.
    Finally ``ESTIMATE_OVERHEAD`` (10%) and ``ESTIMATE_FIXED_BYTES`` (32 MiB) on top.
    """
    c, pixels = shape.num_classes, shape.pixels
    net = _network_sizes(config, shape, plan.precision)
    d, f = net.feature_dim, config.num_freqs
    ncfm = config.matching == "ncfm"
    learned = ncfm and config.sampler
    per_class_decoded = config.ipc * config.factor**2
    n_real = c * config.real_per_class
    stored_images = c * config.ipc
    real_chunk = min(plan.real_chunk, n_real)
    group = min(plan.class_chunk, c) * per_class_decoded
    checkpointing = plan.activation_checkpointing
    cf_width = f if ncfm else d

    param_bytes = net.param_count * F32
    calib = config.calib_weight > 0
    persistent = {
        "real dataset (uint8) and index tables": shape.num_train * (pixels + 8 + 9),
        "pool weights (init + trained)": config.pool_size * 2 * param_bytes,
        "extractor + teacher (+ autocast copies)": 2 * param_bytes + (0 if plan.precision == "fp32" else param_bytes),
        "synthetic images + grad + AdamW": 5 * stored_images * pixels * F32,
        "per-class CF/mean accumulators": 2 * c * cf_width * (8 + F32 + F32),
    }
    if ncfm:
        components = config.num_components or max(1, f // 16)
        sampler = (7 if learned else 3) * f * d * F32
        if learned:
            sampler += 4 * components * (d + 1) * F32 + 4 * f * components * F32
        persistent["frequencies and psi"] = sampler
    stored_features = n_real * d * F32 if learned and not checkpointing else 0

    sampling = c * max(1, shape.num_train // c) * (8 + 8) + n_real * 8
    real_input = real_chunk * pixels * (1 + F32 + 2 * F32)
    real_network = real_chunk * net.nograd_transient_bytes
    real_cf = real_chunk * 3 * cf_width * F32
    real_phase = {
        "real sampling keys": sampling,
        "real chunk input + augmentation": real_input,
        "real chunk forward (no grad) or its CF": max(real_network, real_cf),
        "real chunk features": real_chunk * d * F32 * 2,
        "stored real features (psi)": stored_features,
    }

    nets = 2 if calib else 1
    if checkpointing and config.network == "convnet":
        network_saved = group * nets * net.checkpointed_saved_bytes + group * net.largest_block_saved_bytes
    else:
        network_saved = group * nets * net.saved_bytes
    syn_phase = {
        "synthetic decode + augmentation": group * pixels * F32 * 6,
        "synthetic activations saved for backward": network_saved,
        "synthetic features (raw, normalised, grad)": group * d * F32 * 3,
        "synthetic CF (projections, cos, sin, grad)": group * 4 * f * F32 if ncfm else 0,
        "backward gradient buffers": group * (net.backward_transient_bytes + 2 * pixels * F32),
        "teacher logits": group * c * F32 * 3 if calib else 0,
        "stored real features (psi)": stored_features,
    }

    phases = {"real": real_phase, "synthetic": syn_phase}
    if learned:
        recompute = real_input + real_network + real_chunk * d * F32 * 2 if checkpointing else 0
        phases["real-backward"] = {
            "real CF gradient (projections, cos, sin, weights)": real_chunk * 4 * f * F32,
            "recomputed real chunk": recompute,
            "stored real features (psi)": stored_features,
        }
    phase_name, phase_terms = max(phases.items(), key=lambda item: sum(item[1].values()))
    tensors = sum(persistent.values()) + sum(phase_terms.values())
    overhead = int(tensors * ESTIMATE_OVERHEAD) + ESTIMATE_FIXED_BYTES
    terms = {**persistent, **{f"{phase_name}: {k}": v for k, v in phase_terms.items() if v}}
    terms["allocator overhead and workspaces"] = overhead
    return MemoryEstimate(int(tensors + overhead), phase_name, tuple((k, int(v)) for k, v in terms.items()))


def estimate_peak_bytes(config: DistillConfig, shape: DatasetShape, plan: Plan) -> int:
    """Estimated peak device bytes of one iteration under ``plan`` (see :func:`estimate_memory`)."""
    return estimate_memory(config, shape, plan).peak_bytes


def estimate_iteration_flops(config: DistillConfig, shape: DatasetShape, plan: Plan) -> dict[str, int]:
    """Floating-point operations of one iteration (a multiply-add counts 2), by part.

    Counted: convolutions and linear layers (forward; a backward that needs only input
    gradients costs one forward again, since the extractor's weights are frozen), the CF
    projections ``(n, d) @ (d, F)`` and their gradients, psi's real-side gradient, and the
    recomputations that checkpointing adds. Not counted: norms, ReLU, pooling, cos/sin and the
    augmentation (elementwise work, memory-bound rather than compute-bound).
    """
    c = shape.num_classes
    net = _network_sizes(config, shape, plan.precision)
    d, f = net.feature_dim, config.num_freqs
    n_real = c * config.real_per_class
    n_syn = c * config.ipc * config.factor**2
    ncfm = config.matching == "ncfm"
    learned = ncfm and config.sampler
    recompute = plan.activation_checkpointing
    flops = {
        "real forward (no grad)": n_real * net.forward_flops,
        "synthetic forward": n_syn * net.forward_flops,
        "synthetic backward (input grads)": n_syn * net.forward_flops,
    }
    if recompute and config.network == "convnet":
        flops["synthetic recompute (checkpointing)"] = n_syn * net.forward_flops
    if config.calib_weight > 0:
        teacher = net.forward_flops + net.classifier_flops
        flops["teacher forward + backward"] = n_syn * teacher * (3 if recompute and config.network == "convnet" else 2)
    if ncfm:
        flops["real CF projections"] = 2 * n_real * d * f
        flops["synthetic CF projections + grad"] = 2 * n_syn * d * f * (3 if learned else 2)
        if learned:
            flops["psi gradient through the real CF"] = 2 * 2 * n_real * d * f
            if recompute:
                flops["real recompute (checkpointing)"] = n_real * net.forward_flops
    flops["total"] = sum(flops.values())
    return flops


def _make_plan(config, shape, device, precision, real, classes, checkpointing, budget, source) -> Plan:
    draft = Plan(real, classes, precision, checkpointing, budget, 0, str(device), source)
    estimate = estimate_memory(config, shape, draft)
    return dataclasses.replace(draft, estimated_peak_bytes=estimate.peak_bytes, estimate_terms=estimate.terms)


def plan_path(
    config: DistillConfig,
    shape: DatasetShape,
    device: torch.device | str,
    budget_bytes: int | None = None,
    budget_source: str = "",
) -> list[Plan]:
    """Every plan the planner may choose, fastest first, each with a strictly smaller estimate.

    Starts from everything at once (``min(n_real, MAX_REAL_CHUNK)`` real images per chunk, all
    classes in one synthetic pass, no recomputation, the device's best precision); at each step
    takes the first of these moves that lowers the estimate: halve the real chunk (not below
    ``MIN_REAL_CHUNK``), halve the class group (down to 1), turn on checkpointing; when no single
    move helps (a tie between two phases), both chunk moves at once. Options fixed in ``config``
    (``real_chunk``, ``class_chunk``, ``activation_checkpointing=True``, an explicit precision)
    are never changed. The path is the same for every budget, so a smaller budget can only
    select a later plan: never larger chunks, never a larger estimate.
    """
    precision = resolve_precision(config.precision, device)
    c = shape.num_classes
    n_real = c * config.real_per_class
    real = min(config.real_chunk, n_real) if config.real_chunk else min(n_real, MAX_REAL_CHUNK)
    classes = min(config.class_chunk, c) if config.class_chunk else c
    checkpointing = bool(config.activation_checkpointing)

    def make(r: int, g: int, ckpt: bool) -> Plan:
        return _make_plan(config, shape, device, precision, r, g, ckpt, budget_bytes, budget_source)

    def smaller_real(plan: Plan) -> int | None:
        if config.real_chunk or plan.real_chunk <= MIN_REAL_CHUNK:
            return None
        return max(MIN_REAL_CHUNK, -(-plan.real_chunk // 2))

    def smaller_group(plan: Plan) -> int | None:
        if config.class_chunk or plan.class_chunk <= 1:
            return None
        return -(-plan.class_chunk // 2)

    path = [make(real, classes, checkpointing)]
    while True:
        current = path[-1]
        r, g = smaller_real(current), smaller_group(current)
        moves = []
        if r is not None:
            moves.append((r, current.class_chunk, current.activation_checkpointing))
        if g is not None:
            moves.append((current.real_chunk, g, current.activation_checkpointing))
        if not current.activation_checkpointing:
            moves.append((current.real_chunk, current.class_chunk, True))
        if r is not None and g is not None:
            moves.append((r, g, current.activation_checkpointing))
        better = None
        for move in moves:
            candidate = make(*move)
            if candidate.estimated_peak_bytes < current.estimated_peak_bytes:
                better = candidate
                break
        if better is None:
            return path
        path.append(better)


def plan_run(
    config: DistillConfig,
    shape: DatasetShape,
    device: torch.device | str,
    budget_bytes: int | None,
    free_bytes: int | None = None,
) -> Plan:
    """The fastest plan whose estimated peak fits the budget (see :func:`plan_path`).

    ``budget_bytes=None``: the budget is the free memory (``free_bytes`` if given, else detected
    by :func:`detect_memory`) minus a safety margin of ``max(10%, 256 MiB)``. Raises
    :class:`BudgetInfeasibleError` (exit code 4) naming the smallest budget that would work
    when even the last plan does not fit.
    """
    device = torch.device(device)
    if budget_bytes is not None:
        if budget_bytes < 1:
            raise ConfigError(f"memory budget must be positive, got {budget_bytes}")
        budget, source = int(budget_bytes), "--gpu-mem"
    else:
        if free_bytes is None:
            free_bytes = detect_memory(device)[0]
        margin = max(FREE_MARGIN_MIN_BYTES, int(free_bytes * FREE_MARGIN_FRACTION))
        budget = max(0, int(free_bytes) - margin)
        source = f"free memory {format_bytes(free_bytes)} minus a {format_bytes(margin)} margin"
    path = plan_path(config, shape, device, budget, source)
    for plan in path:
        if plan.estimated_peak_bytes <= budget:
            return plan
    smallest = path[-1]
    what = "--gpu-mem" if budget_bytes is not None else "free memory"
    raise BudgetInfeasibleError(
        f"{config.dataset} at IPC {config.ipc} needs at least {_ceil_mib_spec(smallest.estimated_peak_bytes)} "
        f"({format_bytes(smallest.estimated_peak_bytes)}, the smallest plan: real chunk {smallest.real_chunk}, "
        f"{smallest.class_chunk} class(es) per pass, checkpointing "
        f"{'on' if smallest.activation_checkpointing else 'off'}) but the {what} budget is "
        f"{format_bytes(budget)}; raise --gpu-mem to at least {_ceil_mib_spec(smallest.estimated_peak_bytes)}, "
        f"or lower --ipc, --real-per-class or --freqs"
    )
