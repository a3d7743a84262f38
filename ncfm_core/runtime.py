"""The process-wide CUDA settings a run depends on: the caching allocator's configuration and the
backend settings a plan carries (cuDNN autotuning), each decided once and recorded in the plan.

:func:`configure_allocator` runs at every entry point (the ``ncfm`` command's start-up, each
function of the Python API, the benchmarks) before anything touches CUDA: unless the user set
``PYTORCH_ALLOC_CONF`` or ``PYTORCH_CUDA_ALLOC_CONF`` themselves, it asks for expandable segments
(:data:`NCFM_ALLOC_CONF`). Why: ``--gpu-mem`` caps what the caching allocator reserves
(``set_per_process_memory_fraction``), and with fixed-size segments memory freed between
allocations of changing sizes stays reserved in split segments that cannot be handed back: on
an H200 a plan fitting its 2.5 GiB by estimate ran out of memory asking 500 MiB while 586 MiB sat
"reserved but unallocated". With expandable segments the allocator maps 20 MiB pages into one
growing segment per stream and, before it gives up, unmaps the free pages and maps them where
the request fits (PyTorch's note "Expandable Segments" in ``c10/cuda/CUDACachingAllocator.cpp``);
the fraction is still enforced (``alloc_block`` refuses ``total + size > allowed_memory_maximum``
before it maps a page). PyTorch reads the variable once, the first time it reads its allocator
configuration (CUDA's initialisation does); a process where that already happened gets the same
setting through the runtime setter, which the allocator documents as safe at any time (segments
made before stay as they were), and the record says so.

:class:`BackendSettings` are part of every plan (``Plan.backend``): the allocator configuration
and who chose it, and cuDNN autotuning (``torch.backends.cudnn.benchmark``) with its algorithm
limit. :func:`apply_backend` applies them, once, at the job boundary (``ncfm_core.jobs.plan
.apply_run_settings``), for the command line, the Python API and the benchmarks alike.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ncfm_core.errors import one_line

__all__ = [
    "ALLOC_CONF_VARIABLES",
    "CUDNN_BENCHMARK_DEFAULT",
    "CUDNN_BENCHMARK_ENV",
    "NCFM_ALLOC_CONF",
    "AllocatorSetting",
    "BackendSettings",
    "apply_backend",
    "configure_allocator",
    "decide_backend",
]

NCFM_ALLOC_CONF = "expandable_segments:True"
ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.9 reads the first; both work
CHOSEN_MARK = "NCFM_ALLOC_CONF_CHOSEN"  # set beside our value, so a child process knows it was ours, not the user's

# cuDNN autotuning (cudnn.benchmark) is off by default on CUDA. Nothing measured says it helps
# this network: the profile of the authors' work (issue 23) ran WITH autotuning and cuDNN still
# chose the non-tensor-core implicit-GEMM kernel in NCHW, and convolutions were under a tenth of
# the device time. What it costs is measured: the one run that autotuned under --gpu-mem 2.5G
# ran out of memory where the command line, without it, fit. Its workspaces go through the
# caching allocator, so they count against the cap: PyTorch's cuDNN v8 path
# (aten/src/ATen/native/cudnn/Conv_v8.cpp) offers plans whose workspace fits the largest block
# it can get (generate_and_filter_plans: it tries the largest workspace, halves it on
# OutOfMemoryError and drops the plans needing more), times at most
# torch.backends.cudnn.benchmark_limit of them (default 10), and a plan that runs out of memory
# later falls back to the next (try_plans catches OutOfMemoryError). So autotuning cannot take
# more than the budget, but it fills the budget's free part with a cached workspace during the
# search; expandable segments let the allocator unmap that cache when a later request needs it.
# NCFM_CUDNN_BENCHMARK=1 (or 0) overrides the default; the plan records which (the GPU check
# measures both).
CUDNN_BENCHMARK_DEFAULT = False
CUDNN_BENCHMARK_ENV = "NCFM_CUDNN_BENCHMARK"
CUDNN_BENCHMARK_LIMIT = 10  # torch's default; recorded so a change of it shows in the plan

_configured: AllocatorSetting | None = None


@dataclass(frozen=True)
class AllocatorSetting:
    """The CUDA caching allocator's configuration in force: ``conf`` (None: torch's defaults),
    ``chosen_by`` (ncfm, or the user's variable) and ``applied`` (how and when)."""

    conf: str | None
    chosen_by: str
    applied: str


def _user_conf() -> tuple[str, str] | None:
    """(variable, value) of an allocator configuration the user set, if any."""
    if os.environ.get(CHOSEN_MARK) == "1":
        return None  # set by ncfm in this process or a parent: not the user's
    for name in ALLOC_CONF_VARIABLES:
        value = os.environ.get(name)
        if value:
            return name, value
    return None


def _runtime_setter() -> Any:
    """torch's setter of the allocator configuration at runtime, or None on a torch without one."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = getattr(getattr(torch.cuda, "memory", None), "_set_allocator_settings", None)
    return setter


def _settings_in_force() -> str | None:
    """What torch says its allocator configuration is (reading it parses the variable, once);
    None on a torch that cannot say."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return None if getter is None else str(getter())


def configure_allocator() -> AllocatorSetting:
    """Ask for :data:`NCFM_ALLOC_CONF` unless the user configured the allocator; call it before
    anything touches CUDA. Idempotent: later calls return the first call's record.

    Sets ``PYTORCH_CUDA_ALLOC_CONF`` (only when neither it nor ``PYTORCH_ALLOC_CONF`` is set) and
    a mark that it was ncfm's choice, inherited by child processes (torchrun's ranks, the
    benchmarks' workers). When CUDA was already initialised (or torch already read its
    configuration), the variable alone comes too late: the runtime setter applies it, and the
    record says so."""
    global _configured
    if _configured is not None:
        return _configured
    user = _user_conf()
    if user is not None:
        name, value = user
        _configured = AllocatorSetting(value, f"the user ({name})", "by the user's environment")
        return _configured
    inherited = os.environ.get(CHOSEN_MARK) == "1"
    initialised = torch.cuda.is_initialized()
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = NCFM_ALLOC_CONF
    os.environ[CHOSEN_MARK] = "1"
    read = None if initialised else _settings_in_force()
    applied = ("in the environment, inherited from the parent process" if inherited
               else "in the environment, before CUDA was initialised")
    if initialised or (read is not None and NCFM_ALLOC_CONF not in read):
        setter = _runtime_setter()
        why = "CUDA was already initialised" if initialised else "torch had already read its configuration"
        if setter is None:
            applied = f"not applied: {why} and this torch has no runtime setter"
        else:
            try:
                with warnings.catch_warnings():  # torch 2.15 marks one spelling of the setter deprecated
                    warnings.simplefilter("ignore", FutureWarning)
                    setter(NCFM_ALLOC_CONF)
                applied = f"by torch's runtime setter: {why} (segments made before stay as they were)"
            except RuntimeError as err:  # a platform without expandable segments: the run goes on without
                applied = f"not applied: {why} and torch's runtime setter refused it ({one_line(err, 120)})"
    _configured = AllocatorSetting(NCFM_ALLOC_CONF, "ncfm", applied)
    return _configured


@dataclass(frozen=True)
class BackendSettings:
    """The backend settings a plan carries (``Plan.backend``), recorded in the manifest.

    ``allocator_conf``/``allocator_chosen_by``/``allocator_applied``: :class:`AllocatorSetting`;
    ``cudnn_benchmark``: cuDNN autotuning on CUDA (``chosen_by``: the default or the variable);
    ``cudnn_benchmark_limit``: algorithms timed per convolution shape when autotuning."""

    allocator_conf: str | None = None
    allocator_chosen_by: str = "not configured (planned outside a job)"
    allocator_applied: str = ""
    cudnn_benchmark: bool = CUDNN_BENCHMARK_DEFAULT
    cudnn_benchmark_chosen_by: str = "default"
    cudnn_benchmark_limit: int = CUDNN_BENCHMARK_LIMIT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BackendSettings:
        """A recorded plan's settings (an older manifest without them: the defaults)."""
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _cudnn_benchmark_choice() -> tuple[bool, str]:
    value = os.environ.get(CUDNN_BENCHMARK_ENV, "").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True, f"{CUDNN_BENCHMARK_ENV}={value}"
    if value in ("0", "false", "off", "no"):
        return False, f"{CUDNN_BENCHMARK_ENV}={value}"
    state = "on" if CUDNN_BENCHMARK_DEFAULT else "off"
    return CUDNN_BENCHMARK_DEFAULT, f"ncfm's default ({state}; {CUDNN_BENCHMARK_ENV}=1 or 0 overrides it)"


def decide_backend(device: torch.device | str) -> BackendSettings:
    """The backend settings of a run on ``device``, decided once by its plan
    (``ncfm_core.jobs.plan.make_plan``): the allocator as :func:`configure_allocator` set it, and
    cuDNN autotuning (CUDA only; off elsewhere, where there is no cuDNN to tune)."""
    allocator = configure_allocator()
    if torch.device(device).type == "cuda":
        benchmark, chosen_by = _cudnn_benchmark_choice()
    else:
        benchmark, chosen_by = False, "off: not a CUDA device"
    return BackendSettings(allocator.conf, allocator.chosen_by, allocator.applied, benchmark, chosen_by,
                           CUDNN_BENCHMARK_LIMIT)


def apply_backend(settings: BackendSettings, device: torch.device | str) -> None:
    """Set the process's cuDNN flags to ``settings`` for a run on ``device`` (CUDA only: elsewhere
    there is nothing to set). The allocator is configured earlier, at the entry point."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = bool(settings.cudnn_benchmark)
    if torch.cuda.is_available():  # the limit's setter needs a CUDA build with a device
        torch.backends.cudnn.benchmark_limit = int(settings.cudnn_benchmark_limit)
