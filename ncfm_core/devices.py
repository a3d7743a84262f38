"""Devices, memory sizes and memory probes: the values a job resolves once, at its boundary.

:func:`resolve_device` turns what a user asked for (``auto``, ``cpu``, ``cuda``, ``cuda:N``,
``mps``) into a concrete ``torch.device`` and the reason for the choice. An accelerator always
carries an index (``cuda:0``, never ``cuda``): CUDA calls such as
``torch.cuda.set_per_process_memory_fraction`` refuse a device without one. Under ``torchrun``
each process computes on ``cuda:LOCAL_RANK``. A job resolves its device once
(:class:`JobDevice`) and passes the value down; nothing below re-resolves a string.

Sizes follow one convention, stated once: ``K``, ``M``, ``G``, ``T`` (and ``KiB``, ``MiB``,
``GiB``, ``TiB``, ``Ki``, ``Mi``, ...) are powers of 1024, as GPU memory is sold and reported
(nvidia-smi's MiB, torch's allocator); ``KB``, ``MB``, ``GB``, ``TB`` are SI powers of 1000.
``--gpu-mem 2.5G`` therefore means 2.5 * 2^30 bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ncfm_core.config import PRECISIONS
from ncfm_core.errors import ConfigError

if TYPE_CHECKING:
    from ncfm_core.config import DistillConfig

__all__ = [
    "DEVICE_CHOICES",
    "JobDevice",
    "MemoryBudget",
    "PeakMemory",
    "cap_device_memory",
    "ceil_mib_spec",
    "decided_precisions",
    "detect_memory",
    "device_total_bytes",
    "format_bytes",
    "measure_peak",
    "parse_memory",
    "planning_device",
    "reset_peak",
    "resolve_device",
    "resolve_precision",
]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _split_request(requested: str | torch.device) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ("cuda", 1); ``ConfigError`` naming the choices for anything else."""
    text = str(requested).strip().lower()
    base, _, index_text = text.partition(":")
    if base not in DEVICE_CHOICES or (index_text and not index_text.isdigit()) or (index_text and base == "auto"):
        raise ConfigError(f"unknown device {str(requested)!r}; choose one of auto, cpu, cuda, cuda:N, mps")
    return base, int(index_text) if index_text else None


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _cuda_device(requested: str | torch.device, index: int | None, local_rank: int | None) -> tuple[torch.device, str]:
    """The CUDA device to compute on, with its index, and a note when torchrun chose the index."""
    count = torch.cuda.device_count()
    note = ""
    if local_rank is not None:
        if index is not None and index != local_rank:
            note = f" (torchrun: LOCAL_RANK {local_rank} uses cuda:{local_rank}, not the requested cuda:{index})"
        index = local_rank
    elif index is None:
        index = torch.cuda.current_device()
    if not 0 <= index < count:
        raise ConfigError(
            f"--device {requested}: torch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
            f"choose one of them, or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", index), note


def resolve_device(
    requested: str | torch.device = "auto",
    *,
    local_rank: int | None = None,
    prefer: str | None = None,
) -> tuple[torch.device, str]:
    """Return ``(device, reason)``: a concrete device, and why it was chosen (for the manifest).

    ``auto`` picks CUDA, then MPS, then the CPU. ``cuda`` means the current CUDA device
    (``cuda:0`` unless the process changed it), ``cuda:N`` that device. ``local_rank`` is this
    process's LOCAL_RANK under torchrun: CUDA then always means ``cuda:LOCAL_RANK``. ``prefer``
    (with ``auto`` only) is a device where a run started; it is taken when this machine has
    one of its type (a checkpoint's random-number state belongs to its device type).
    Explicit requests for an accelerator this machine lacks are ``ConfigError``\\ s.
    """
    base, index = _split_request(requested)
    cuda_ok = torch.cuda.is_available()
    mps_ok = _mps_available()
    if base == "auto":
        if prefer is not None:
            preferred, _ = _split_request(prefer)
            if preferred == "cpu" or (preferred == "cuda" and cuda_ok) or (preferred == "mps" and mps_ok):
                device, _ = resolve_device(preferred, local_rank=local_rank)
                return device, f"auto: {prefer}, where this run started"
        if cuda_ok:
            device, note = _cuda_device(requested, None, local_rank)
            return device, f"auto: CUDA available ({torch.cuda.get_device_name(device)}){note}"
        if mps_ok:
            return torch.device("mps", 0), "auto: Apple MPS available"
        return torch.device("cpu"), "auto: no CUDA or MPS device found"
    if base == "cuda":
        if not cuda_ok:
            raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu or auto")
        device, note = _cuda_device(requested, index, local_rank)
        return device, f"requested{note}"
    if base == "mps":
        if not mps_ok:
            raise ConfigError("--device mps was requested but MPS is not available; use --device cpu or auto")
        return torch.device("mps", 0), "requested"
    return torch.device("cpu"), "requested"


def planning_device(requested: str | torch.device, gpu_mem: str | None) -> tuple[torch.device, str]:
    """The device a dry run plans for: as :func:`resolve_device`, except that a GPU budget (or an
    explicit ``cuda``) on a machine without CUDA plans for one (``cuda:N``), so plans can be
    checked anywhere."""
    base, index = _split_request(requested)
    if base == "cuda" and not torch.cuda.is_available():
        return torch.device("cuda", index or 0), "planning only: no CUDA device here; the plan is for one"
    device, reason = resolve_device(requested)
    if device.type == "cpu" and base == "auto" and gpu_mem is not None:
        return torch.device("cuda", 0), "planning only: --gpu-mem is a GPU budget and there is no GPU here"
    return device, reason


@dataclass(frozen=True)
class JobDevice:
    """A job's device, resolved once at the job boundary: ``device`` (with its index for an
    accelerator) and ``reason`` (how it was chosen; the manifest records both)."""

    device: torch.device
    reason: str

    @classmethod
    def resolve(
        cls,
        requested: str | torch.device = "auto",
        *,
        local_rank: int | None = None,
        prefer: str | None = None,
    ) -> JobDevice:
        """:func:`resolve_device` as a value. Called by the job boundary
        (``ncfm_core.parallel.ranked_job``), which alone knows this process's LOCAL_RANK."""
        return cls(*resolve_device(requested, local_rank=local_rank, prefer=prefer))

    def __str__(self) -> str:
        return str(self.device)


@dataclass(frozen=True)
class MemoryBudget:
    """A job's memory budget, resolved once at its boundary and passed down.

    ``bytes``: the budget (None: none was given, the planner uses the free memory);
    ``spec``: what the user wrote (``"2.5G"``), recorded in the manifest and named in messages;
    ``source``: where it came from (``--gpu-mem``, or the figure a resumed run recorded).
    """

    bytes: int | None = None
    spec: str | None = None
    source: str = "none"

    @classmethod
    def resolve(cls, spec: str | None, device: torch.device, source: str = "--gpu-mem") -> MemoryBudget:
        """Parse ``spec`` once (a fraction such as ``"0.3"`` is of ``device``'s memory);
        ``ConfigError`` for an unreadable size. None gives the empty budget (the planner takes
        the smallest plan nearly as fast as the fastest); ``"all"`` too, but asking for the
        fastest plan that fits the free memory (``spec`` "all", see ``ncfm_core.planner``)."""
        if spec is None:
            return cls()
        if str(spec).strip().lower() == "all":
            return cls(None, "all", source)
        return cls(parse_memory(spec, device_total_bytes(device)), str(spec), source)


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
    exponent = match.group(2) or "0"
    try:  # 1e400 (or an exponent of 5000 digits) overflows: a size no device has
        number = float(match.group(1)) * 10.0 ** int(exponent if len(exponent) < 6 else exponent[0] + "999")
    except OverflowError:
        number = math.inf
    unit = match.group(3)
    if not number > 0:
        raise ConfigError(f"memory size {spec!r} must be positive")
    if not math.isfinite(number * _UNIT_BYTES.get(unit, 1)):
        raise ConfigError(f"memory size {spec!r} is too large; write e.g. 2.5G, or all for the whole free memory")
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


def format_bytes(size: float | None) -> str:
    """Bytes -> a short human string in powers of 1024 (``"2.50 GiB"``, ``"812 MiB"``); None
    (not measured) as ``"-"``. Every byte count ncfm prints goes through here."""
    if size is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            value = size / scale
            return f"{value:.2f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(size)} B"


def ceil_mib_spec(size: int) -> str:
    """The smallest whole number of MiB >= ``size``, as a ``--gpu-mem`` value (``"413M"``)."""
    return f"{math.ceil(size / 2**20)}M"


# ----------------------------------------------------------------------------- probes


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


def resolve_precision(precision: str, device: torch.device | str, world_size: int = 1) -> str:
    """``"auto"`` -> the fastest precision the device runs well: bf16 autocast on CUDA with bf16
    support (Ampere and later), fp16 autocast on older CUDA GPUs (with loss scaling), fp32
    elsewhere (CPU, MPS). Planning for CUDA on a machine without one assumes bf16. With
    ``world_size`` > 1 (several processes under torchrun) auto never picks fp16, whose per-rank
    loss scalers would skip different steps: bf16 where supported, else fp32.
    Explicit ``fp32``/``bf16``/``fp16`` are returned as they are.

    The rule; a run applies it once, in its plan (``ncfm_core.jobs.plan.decide_precisions``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    if not torch.cuda.is_available():
        return "bf16"
    if torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp16" if world_size <= 1 else "fp32"


def decided_precisions(config: DistillConfig, where: str) -> tuple[str, str]:
    """``(precision, cf_precision)`` of ``config`` as the plan decided them, for ``where`` (the
    layer that computes with them, named in the error). A value still ``"auto"`` is a
    ``ConfigError``: ``"auto"`` is decided in ``ncfm_core.jobs.plan.decide_precisions`` alone,
    and no layer below the plan decides it again (it would not know the world size)."""
    undecided = [name for name in ("precision", "cf_precision") if getattr(config, name) == "auto"]
    if undecided:
        raise ConfigError(
            f"{where} was given {' and '.join(undecided)} 'auto'; decide it first with "
            f"ncfm_core.jobs.plan.decide_precisions(config, device), as every job does in its plan"
        )
    return config.precision, config.cf_precision


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
