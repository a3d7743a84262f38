"""The planner: how a distillation must be cut to fit in B bytes.

:func:`plan_run` answers "how must this run be cut to fit in B bytes?" without touching data or a
GPU: :func:`plan_path` walks from the fastest plan towards smaller ones (smaller real chunks,
then fewer classes per synthetic pass, then recomputation) until the estimate of
:func:`ncfm_core.memory_model.estimate_memory` fits. With a budget (``--gpu-mem 2.5G``) the run
gets the fastest plan that fits it. Without one, the budget is the free memory minus a safety
margin, and on CUDA (which has a time model, :func:`ncfm_core.memory_model.estimate_iteration_seconds`)
the run gets the SMALLEST plan whose estimated time is within ``FRUGAL_TOLERANCE`` (10%) of the
fastest that fits: taking 68 GiB of a shared GPU for 1.6x over 2 GiB is antisocial, and past a
few GiB extra memory buys almost nothing. ``--gpu-mem all`` (``fastest=True``) asks for the
fastest plan that fits the free memory. Every plan says why it was chosen (``chosen_because``).
"""

from __future__ import annotations

import dataclasses

import torch

from ncfm_core.config import DistillConfig
from ncfm_core.data import DatasetShape
from ncfm_core.devices import (
    ceil_mib_spec,
    decided_precisions,
    detect_memory,
    format_bytes,
)
from ncfm_core.errors import BudgetInfeasibleError, ConfigError
from ncfm_core.runtime import BackendSettings
from ncfm_core.kernels import decided_levers, levers_for_plan
from ncfm_core.memory_model import (
    Plan,
    estimate_iteration_seconds,
    estimate_memory,
    real_per_class_drawn,
    time_model_for,
)

__all__ = [
    "FREE_MARGIN_FRACTION",
    "FREE_MARGIN_MIN_BYTES",
    "FRUGAL_TOLERANCE",
    "MAX_REAL_CHUNK",
    "MIN_REAL_CHUNK",
    "plan_path",
    "plan_run",
]

MAX_REAL_CHUNK = 4096  # real images per no-grad forward in the fastest plan (bigger gains nothing)
MIN_REAL_CHUNK = 64  # the planner never cuts real chunks below this
FREE_MARGIN_FRACTION = 0.10  # without a budget: keep this share of the free memory unused...
FREE_MARGIN_MIN_BYTES = 256 * 2**20  # ...and at least this much
FRUGAL_TOLERANCE = 0.10  # without a budget: the smallest plan at most this much slower than the fastest


def _make_plan(config, shape, device, precisions, real, classes, checkpointing, budget, source, capped,
               backend) -> Plan:
    precision, cf_precision = precisions
    kernels = levers_for_plan(decided_levers(config.kernels, "the planner"), checkpointing)  # decided with the precisions
    draft = Plan(real, classes, precision, checkpointing, budget, 0, str(device), source, cf_precision=cf_precision,
                 capped=capped, backend=backend, kernels=kernels)
    estimate = estimate_memory(config, shape, draft)
    seconds = estimate_iteration_seconds(config, shape, draft)
    return dataclasses.replace(
        draft, estimated_peak_bytes=estimate.peak_bytes, estimate_terms=estimate.terms,
        estimated_allocated_bytes=estimate.allocated_bytes,
        headroom_bytes=estimate.peak_bytes - estimate.allocated_bytes,
        estimated_seconds=None if seconds is None else round(seconds, 4),
    )


def plan_path(
    config: DistillConfig,
    shape: DatasetShape,
    device: torch.device | str,
    budget_bytes: int | None = None,
    budget_source: str = "",
    *,
    capped: bool | None = None,
    backend: BackendSettings | None = None,
) -> list[Plan]:
    """Every plan the planner may choose, fastest first, each with a strictly smaller estimate.

    Starts from everything at once (``min(n_real, MAX_REAL_CHUNK)`` real images per chunk, all
    classes in one synthetic pass, no recomputation, ``config``'s precisions, which the plan has
    decided: ``ncfm_core.jobs.plan.decide_precisions``; ``"auto"`` is refused); at each step
    takes the first of these moves that lowers the estimate: halve the real chunk (not below
    ``MIN_REAL_CHUNK``), halve the class group (down to 1), turn on checkpointing; when no single
    move helps (a tie between two phases), both chunk moves at once. Options fixed in ``config``
    (``real_chunk``, ``class_chunk``, ``activation_checkpointing=True``, the precisions)
    are never changed. The path is the same for every budget, so a smaller budget can only
    select a later plan: never larger chunks, never a larger estimate. ``capped``: the allocator
    will be capped at ``budget_bytes`` (default: whenever a budget is given; planning for the
    free memory caps nothing), which the estimate's fragmentation term depends on; ``backend``:
    the run's :class:`~ncfm_core.runtime.BackendSettings`, carried by every plan (default: the
    defaults, as for planning outside a job).
    """
    precisions = decided_precisions(config, "the planner")
    capped = budget_bytes is not None if capped is None else capped
    backend = backend or BackendSettings()
    c = shape.num_classes
    n_real = c * real_per_class_drawn(config, shape)
    real = min(config.real_chunk, n_real) if config.real_chunk else min(n_real, MAX_REAL_CHUNK)
    classes = min(config.class_chunk, c) if config.class_chunk else c
    checkpointing = bool(config.activation_checkpointing)

    def make(r: int, g: int, ckpt: bool) -> Plan:
        return _make_plan(config, shape, device, precisions, r, g, ckpt, budget_bytes, budget_source, capped, backend)

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
    *,
    fastest: bool = False,
    tolerance: float = FRUGAL_TOLERANCE,
    backend: BackendSettings | None = None,
) -> Plan:
    """The plan a run gets (see :func:`plan_path`), with ``chosen_because`` saying why.

    ``budget_bytes`` given: the fastest plan whose estimated peak fits it. ``budget_bytes=None``:
    the budget is the free memory (``free_bytes`` if given, else detected by
    :func:`detect_memory`) minus a safety margin of ``max(10%, 256 MiB)``, and among the plans
    that fit, the one with the smallest estimated peak whose estimated time is at most
    ``1 + tolerance`` times the fastest's (on devices with a time model, CUDA; elsewhere, and
    with ``fastest=True`` (``--gpu-mem all``), the fastest that fits). A given budget caps the
    allocator (``Plan.capped``); the free memory does not. ``backend``: the run's backend
    settings, carried by the plan. Raises :class:`BudgetInfeasibleError` (exit code 4) naming
    the smallest budget that would work when even the last plan does not fit.
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
    path = plan_path(config, shape, device, budget, source, capped=budget_bytes is not None, backend=backend)
    fitting = [plan for plan in path if plan.estimated_peak_bytes <= budget]
    if fitting:
        return _choose(fitting, frugal=budget_bytes is None and not fastest, tolerance=tolerance,
                       budget_name="the budget" if budget_bytes is not None
                       else "the free memory (--gpu-mem all)" if fastest else "the free memory")
    smallest = path[-1]
    what = "--gpu-mem" if budget_bytes is not None else "free memory"
    raise BudgetInfeasibleError(
        f"{config.dataset} at IPC {config.ipc} needs at least {ceil_mib_spec(smallest.estimated_peak_bytes)} "
        f"({format_bytes(smallest.estimated_peak_bytes)}, the smallest plan: real chunk {smallest.real_chunk}, "
        f"{smallest.class_chunk} class(es) per pass, checkpointing "
        f"{'on' if smallest.activation_checkpointing else 'off'}) but the {what} budget is "
        f"{format_bytes(budget)}; raise --gpu-mem to at least {ceil_mib_spec(smallest.estimated_peak_bytes)}, "
        f"or lower --ipc, --real-per-class or --freqs"
    )


def _choose(fitting: list[Plan], *, frugal: bool, tolerance: float, budget_name: str) -> Plan:
    """The plan to run among ``fitting`` (path order: estimated peak strictly decreasing), with
    ``chosen_because`` filled in."""
    first = fitting[0]
    if not frugal:
        why = f"the fastest plan that fits {budget_name}"
        return dataclasses.replace(first, chosen_because=why)
    # Recomputation is taken only when nothing else fits (and --no-checkpointing refuses it):
    # the frugal rule trims chunk sizes, never switches checkpointing on by itself.
    same = [p for p in fitting if p.activation_checkpointing == first.activation_checkpointing]
    timed = [p for p in same if p.estimated_seconds is not None]
    if len(timed) != len(same) or time_model_for(first.device) is None:
        kind = torch.device(first.device).type
        why = f"the fastest plan that fits {budget_name} ({kind} has no time model to weigh smaller plans)"
        return dataclasses.replace(first, chosen_because=why)
    quickest = min(timed, key=lambda p: p.estimated_seconds)
    limit = quickest.estimated_seconds * (1.0 + tolerance)
    chosen = [p for p in timed if p.estimated_seconds <= limit][-1]  # the smallest such: last in path order
    if chosen is quickest:
        why = (f"the fastest plan that fits ({quickest.estimated_seconds:.3f} s/iter estimated); every smaller "
               f"plan is more than {tolerance:.0%} slower by the time model")
    else:
        why = (f"the smallest plan within {tolerance:.0%} of the fastest by the time model "
               f"({chosen.estimated_seconds:.3f} vs {quickest.estimated_seconds:.3f} s/iter estimated; the fastest "
               f"needs {format_bytes(quickest.estimated_peak_bytes)}); --gpu-mem all takes the fastest")
    return dataclasses.replace(chosen, chosen_because=why)
