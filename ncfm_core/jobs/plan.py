"""A run's plan: its precisions, decided once (:func:`decide_precisions`), its memory plan and
backend settings (:func:`make_plan`), applied to the process once, at the job boundary
(:func:`apply_run_settings`); the smaller plans an out-of-memory error steps down to
(:func:`step_down_path`); ``ncfm distill --dry-run`` shows the plan without data or a GPU
(:func:`plan_job`). The command line, the Python API and the benchmarks all plan here."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ncfm_core import parallel
from ncfm_core.cf import resolve_cf_precision
from ncfm_core.config import DistillConfig
from ncfm_core.data import DatasetShape, dataset_shape
from ncfm_core.devices import MemoryBudget, cap_device_memory, format_bytes, planning_device, resolve_precision
from ncfm_core.errors import BudgetInfeasibleError
from ncfm_core.jobs.common import (
    load_job_dataset,
)
from ncfm_core.kernels import decide_levers
from ncfm_core.memory_model import Plan, estimate_iteration_flops
from ncfm_core.planner import plan_path, plan_run
from ncfm_core.runtime import BackendSettings, apply_backend, decide_backend

PLAN_KNOBS = ("real_chunk", "class_chunk", "activation_checkpointing")  # what a smaller plan changes


def decide_precisions(config: DistillConfig, device: torch.device | str,
                      world_size: int | None = None) -> DistillConfig:
    """``config`` with its network ``precision``, its ``cf_precision`` and its kernel levers
    (``kernels``, which set how the networks compute in that precision) decided for ``device``
    and ``world_size`` processes (default: this job's, ``parallel.current()``): the one place
    where ``"auto"`` becomes a value (the rules: :func:`~ncfm_core.devices.resolve_precision`,
    :func:`~ncfm_core.cf.resolve_cf_precision`, :func:`~ncfm_core.kernels.decide_levers`).
    :func:`make_plan` calls it, so the plan, the manifest's config and every layer below hold
    the decided values; the planner, ``Distiller`` and ``ShardedDistiller`` refuse ``"auto"``.
    Code that builds a ``Distiller`` itself (tests, benchmarks) decides through here too."""
    world = parallel.current().world_size if world_size is None else world_size
    levers = decide_levers(config.kernels, torch.device(device).type, channels_last=config.channels_last,
                           compile_blocks=config.compile)
    return config.replace(precision=resolve_precision(config.precision, device, world),
                          cf_precision=resolve_cf_precision(config.cf_precision, device), kernels=levers.spec())


def make_plan(
    config: DistillConfig,
    shape: DatasetShape,
    device: torch.device,
    budget: MemoryBudget,
    *,
    allow_checkpointing: bool = True,
) -> tuple[Plan, dict[str, Any]]:
    """The memory plan of a run on ``device`` and what the manifest records about it.

    ``budget`` is the job's resolved budget (no bytes: plan for the free memory minus a
    margin). ``allow_checkpointing=False`` (``--no-checkpointing``) refuses plans that
    recompute activations. The precisions are decided here, once (:func:`decide_precisions`,
    with this job's world size: several processes never get fp16), and ``plan.apply`` carries
    them into the config; so are the backend settings (``plan.backend``:
    :func:`~ncfm_core.runtime.decide_backend`), which :func:`apply_run_settings` applies.
    Returns ``(plan, {"plan": plan.to_dict(), "flops_per_iteration": int, "gpu_mem": the budget
    as the user wrote it, "plan_asked": the knobs as asked before planning, and whether
    checkpointing was allowed})``; :func:`step_down_path` reads ``plan_asked`` back.
    :class:`BudgetInfeasibleError` (exit 4) naming the minimum when nothing fits.
    """
    config = decide_precisions(config, device)
    plan = plan_run(config, shape, device, budget.bytes, fastest=budget.spec == "all",  # --gpu-mem all: the fastest
                    backend=decide_backend(device))
    if plan.activation_checkpointing and not config.activation_checkpointing and not allow_checkpointing:
        raise BudgetInfeasibleError(
            f"{config.dataset} at IPC {config.ipc} fits in {format_bytes(plan.budget_bytes or 0)} only with "
            f"activation checkpointing; drop --no-checkpointing, raise --gpu-mem, or lower --ipc or --real-per-class"
        )
    flops = estimate_iteration_flops(config, shape, plan)["total"]
    asked = {**{knob: getattr(config, knob) for knob in PLAN_KNOBS}, "allow_checkpointing": allow_checkpointing}
    return plan, {"plan": plan.to_dict(), "flops_per_iteration": int(flops), "gpu_mem": budget.spec,
                  "plan_asked": asked}


def apply_run_settings(plan: Plan | None, device: torch.device, budget: MemoryBudget) -> None:
    """What a plan sets for the whole process, once, at the job boundary (distill, resume, the
    benchmarks): the allocator's cap at ``budget`` (CUDA, when one was given) and the plan's
    backend settings (cuDNN autotuning; None, a run recorded before plans: the defaults)."""
    if budget.bytes is not None:
        cap_device_memory(device, budget.bytes)
    apply_backend(BackendSettings() if plan is None else plan.backend, device)


def step_down_path(config: DistillConfig, shape: DatasetShape, device: torch.device, plan: Plan,
                   asked: dict[str, Any] | None) -> list[Plan]:
    """The plans a run on ``plan`` steps down to when an iteration runs out of memory, in order:
    those after it on the planner's path (:func:`~ncfm_core.planner.plan_path`, the same for every
    budget), for the knobs the user ``asked`` (a manifest's ``plan_asked``; None, for a run
    recorded before it: ``config``'s chunks stay fixed and only checkpointing may turn on), with
    ``plan``'s budget and backend."""
    asked = dict(asked or {knob: getattr(config, knob) for knob in PLAN_KNOBS[:2]})
    allow_checkpointing = asked.pop("allow_checkpointing", True)
    unplanned = decide_precisions(config.replace(**{k: v for k, v in asked.items() if k in PLAN_KNOBS}), device)
    path = plan_path(unplanned, shape, device, plan.budget_bytes, plan.budget_source, capped=plan.capped,
                     backend=plan.backend)
    if not allow_checkpointing and not unplanned.activation_checkpointing:
        path = [p for p in path if not p.activation_checkpointing]
    knobs = [p.knobs for p in path]
    if plan.knobs in knobs:
        return path[knobs.index(plan.knobs) + 1:]
    return [p for p in path if p.knobs != plan.knobs and p.real_chunk <= plan.real_chunk
            and p.class_chunk <= plan.class_chunk and p.activation_checkpointing >= plan.activation_checkpointing]


def plan_message(plan: Plan) -> str:
    budget = "no budget" if plan.budget_bytes is None else f"budget {format_bytes(plan.budget_bytes)}"
    return (
        f"plan: real chunk {plan.real_chunk}, {plan.class_chunk} class(es) per pass, {plan.precision}, "
        f"checkpointing {'on' if plan.activation_checkpointing else 'off'}; estimated peak "
        f"{format_bytes(plan.estimated_peak_bytes)} of the {budget} ({plan.budget_source or 'given'})"
        + (f"; {plan.chosen_because}" if plan.chosen_because else "")
    )


def plan_job(
    config: DistillConfig,
    *,
    device: str = "auto",
    gpu_mem: str | None = None,
    allow_checkpointing: bool = True,
) -> dict[str, Any]:
    """What ``ncfm distill --dry-run`` shows: the plan a run of ``config`` would get, without
    writing anything and, for registered datasets, without loading data (``folder:`` datasets
    are loaded for their shape). On a machine without a GPU a ``gpu_mem`` budget is planned
    for CUDA; without one the plan uses the free memory of the device (RAM on CPU).

    Returns ``{dry_run: True, dataset, ipc, device, device_reason, shape {num_classes, channels,
    image_size, num_train}, shape_source ("registry" | "loaded"), plan (Plan.to_dict()),
    flops_per_iteration, flops (by part), gpu_mem, config (with the plan applied)}``.
    """
    shape = dataset_shape(config.dataset, config.image_size)
    shape_source = "registry"
    if shape is None:
        shape, shape_source = DatasetShape.of(load_job_dataset(config)), "loaded"
    torch_device, reason = planning_device(device, gpu_mem)
    budget = MemoryBudget.resolve(gpu_mem, torch_device)
    plan, record = make_plan(config, shape, torch_device, budget, allow_checkpointing=allow_checkpointing)
    return {
        "dry_run": True,
        "dataset": config.dataset,
        "ipc": config.ipc,
        "device": str(torch_device),
        "device_reason": reason,
        "shape": dataclasses.asdict(shape),
        "shape_source": shape_source,
        **record,
        "flops": estimate_iteration_flops(config, shape, plan),
        "config": plan.apply(config).to_dict(),
    }
