"""``ncfm resume``: continue an unfinished version in place, or extend a complete one into a
new version."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ncfm_core import parallel
from ncfm_core import store as store_lib
from ncfm_core.data import DatasetShape
from ncfm_core.devices import (
    JobDevice,
    MemoryBudget,
    format_bytes,
)
from ncfm_core.errors import (
    BudgetInfeasibleError,
    ConfigError,
    CorruptArtifactError,
    NcfmError,
    NotFoundError,
)
from ncfm_core.jobs.common import (
    check_fingerprint,
    config_from_record,
    load_job_dataset,
)
from ncfm_core.jobs.events import JobCallback, emitter, log
from ncfm_core.jobs.plan import apply_run_settings, decide_precisions, step_down_path
from ncfm_core.jobs.run import (
    DEFAULT_CHECKPOINT_EVERY,
    check_checkpoint_every,
    distill_into,
    initial_record,
    run_lock,
    validate_job,
)
from ncfm_core.memory_model import Plan
from ncfm_core.runtime import configure_allocator
from ncfm_core.store import ArtifactVersion, PlanRecord, RunRecord, Store


def _resolve_any_status(store: Store, ref: str) -> ArtifactVersion:
    """Like ``Store.resolve``, except that a bare name means its newest version whatever its
    status: that is the one a user who pressed Ctrl-C wants to continue."""
    if "@" not in ref and not store_lib.looks_like_path(ref):
        versions = store.versions(store_lib.validate_name(ref))
        if versions:
            return versions[-1]
    return store.resolve(ref)


def _started_on(arguments: dict[str, Any]) -> str | None:
    """The device the version ``resume_job`` is asked for was run on (its record's), which
    ``--device auto`` prefers; None when it cannot be read (the job then reports why)."""
    try:
        return _resolve_any_status(arguments["store"], arguments["ref"]).record().device or "cpu"
    except NcfmError:
        return None


def _resume_budget(version: ArtifactVersion, record: RunRecord, device: torch.device,
                   gpu_mem: str | None) -> MemoryBudget:
    """The budget a resumed run is capped at, resolved once: ``gpu_mem`` if given, else the
    ``--gpu-mem`` figure the run recorded (None: no budget).

    A resumed run keeps its recorded plan (its config), so its images stay exactly those of an
    uninterrupted run; only the allocator cap may change. A new figure below the plan's
    estimate is refused (exit 4). The cap is applied with the plan (:func:`_recorded_plan`)."""
    if gpu_mem is None and record.gpu_mem is not None:
        budget = MemoryBudget.resolve(record.gpu_mem, device, source="the --gpu-mem this run recorded")
    else:
        budget = MemoryBudget.resolve(gpu_mem, device)
    if budget.bytes is None:
        return budget
    needed = None if record.plan is None else record.plan.estimated_peak_bytes
    if needed is not None and needed > budget.bytes:
        raise BudgetInfeasibleError(
            f"{version.ref} was planned to need {format_bytes(needed)} and a resumed run keeps its plan; "
            f"give --gpu-mem at least {math.ceil(needed / 2**20)}M, or distill again with --gpu-mem {budget.spec}"
        )
    return budget


def _recorded_plan(manifest: dict) -> Plan | None:
    """The plan a run recorded (the one in force after any out-of-memory step-down), with this
    process's allocator setting (the recorded one belonged to the process that made it); None for
    a run recorded before plans."""
    recorded = manifest.get("plan")
    if not isinstance(recorded, dict):
        return None
    plan = Plan.from_dict(recorded)
    allocator = configure_allocator()
    return dataclasses.replace(plan, backend=dataclasses.replace(
        plan.backend, allocator_conf=allocator.conf, allocator_chosen_by=allocator.chosen_by,
        allocator_applied=allocator.applied))


def _recorded_plan(record: RunRecord) -> Plan | None:
    """The plan a run recorded (the one in force after any out-of-memory step-down), with this
    process's allocator setting (the recorded one belonged to the process that made it); None for
    a run recorded before plans."""
    if record.plan is None:
        return None
    plan = Plan.from_dict(record.plan.to_json())
    allocator = configure_allocator()
    return dataclasses.replace(plan, backend=dataclasses.replace(
        plan.backend, allocator_conf=allocator.conf, allocator_chosen_by=allocator.chosen_by,
        allocator_applied=allocator.applied))


def _load_distiller_state(version: ArtifactVersion) -> dict:
    state = store_lib.load_state(version.checkpoint_path)
    if not isinstance(state, dict) or "iteration" not in state or "images" not in state:
        raise CorruptArtifactError(f"{version.checkpoint_path}: not a distiller state; restore or delete this file")
    bad = _non_finite(state)
    if bad is not None:
        raise CorruptArtifactError(
            f"{version.checkpoint_path}: tensor {bad!r} holds NaN or infinity, so it cannot be continued; "
            f"restore or delete this file (without it, `ncfm resume` starts the version again)"
        )
    return state


def _non_finite(obj: object, path: str = "") -> str | None:
    """The dotted path of the first floating-point tensor in a nested state that holds NaN or
    infinity (None: all finite)."""
    if isinstance(obj, torch.Tensor):
        return path or "<root>" if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


@parallel.ranked_job(prefer_device=_started_on)
def resume_job(
    store: Store,
    ref: str,
    *,
    iterations: int | None = None,
    device: str | JobDevice = "auto",
    data_dir: str | None = None,
    callback: JobCallback | None = None,
    gpu_mem: str | None = None,
) -> ArtifactVersion:
    """Continue a distillation.

    An unfinished version (running but dead, failed, interrupted) continues in place from its
    checkpoint (from scratch if it has none) to its target, or to ``iterations`` if given. A
    complete version with ``iterations`` above its count is extended into a NEW version whose
    ``parent`` is the old one. A complete version with nothing to do is returned unchanged (a
    warning event says so, unless it still owes the evaluation its distill asked for, which the
    caller runs: :func:`~ncfm_core.jobs.eval.pending_eval_job`). A new version made by extending
    does not owe its parent's evaluation. ``data_dir`` overrides where the dataset is read; its fingerprint
    must match the record's. The recorded memory plan is replayed as it is; ``gpu_mem``
    (default: the recorded ``--gpu-mem``) only caps the allocator (see :func:`_resume_budget`).
    Returns the version that holds the result.
    """
    emit = emitter(callback)
    if iterations is not None and (isinstance(iterations, bool) or iterations < 0):
        raise ConfigError(f"--iterations must be >= 0, got {iterations!r}")
    version = _resolve_any_status(store, ref)
    record = version.record()
    config = config_from_record(version, record)
    done = record.iterations_done
    complete = record.status == "complete"

    if iterations is not None and iterations < done:
        raise ConfigError(f"{version.ref} already has {done} iterations; --iterations must be at least that")
    if complete and (iterations is None or iterations == done):
        if record.pending_eval is not None:  # its distill was stopped during its evaluation
            log(emit, f"{version.ref} is already complete at {done} iterations; its evaluation is still to run")
        else:
            log(emit, f"{version.ref} is already complete at {done} iterations; "
                       f"pass --iterations N (N > {done}) to continue it into a new version", level="warning")
        return version

    dataset = load_job_dataset(config, data_dir)
    check_fingerprint(version, record, dataset)
    torch_device = device.device
    # A recorded plan holds decided precisions; a run recorded before cf_precision existed holds
    # "auto" there, decided here by the same rule for the device it continues on.
    config = decide_precisions(config, torch_device)
    checkpoint_every = check_checkpoint_every(record.checkpoint_every or DEFAULT_CHECKPOINT_EVERY)
    recorded_device = record.device or "cpu"
    if version.checkpoint_path.exists() and torch.device(recorded_device).type != torch_device.type:
        raise ConfigError(
            f"{version.ref} was checkpointed on {recorded_device}; resume it with --device {recorded_device} "
            f"(random-number states do not carry across device types)"
        )
    budget = _resume_budget(version, record, torch_device, gpu_mem)
    gpu_mem_record = record.gpu_mem if budget.spec is None else budget.spec
    plan = _recorded_plan(record)
    apply_run_settings(plan, torch_device, budget)  # the cap, and the recorded cuDNN setting
    plan_record = record.plan if plan is None else PlanRecord.from_json(plan.to_dict())
    smaller = () if plan is None else step_down_path(config, DatasetShape.of(dataset), torch_device, plan,
                                                     None if record.plan_asked is None else record.plan_asked.to_json())

    if complete:
        if not version.checkpoint_path.exists():
            raise NotFoundError(f"{version.checkpoint_path}: file not found; cannot extend {version.ref} without it")
        state = _load_distiller_state(version)
        target = int(iterations)
        config = config.replace(iterations=target)
        spec = validate_job(config, dataset)
        child = store.create_version(version.name, initial_record(
            config, dataset, device, checkpoint_every, parent=version.ref, plan=plan_record,
            flops_per_iteration=record.flops_per_iteration, gpu_mem=gpu_mem_record, plan_asked=record.plan_asked,
        ).replace(iterations_done=done, checkpoint_iteration=done, plan_changes=record.plan_changes))
        # The child starts with a copy of the parent's checkpoint, so it can itself be resumed
        # even if it dies before writing a checkpoint of its own.
        store_lib.atomic_write_bytes(child.checkpoint_path, version.checkpoint_path.read_bytes())
        emit({"stage": "created", "artifact": child.ref, "path": str(child.path)})
        log(emit, f"extending {version.ref} from {done} to {target} iterations as {child.ref}")
        with run_lock(child):
            return distill_into(store, child, config, dataset, spec, torch_device,
                                checkpoint_every=checkpoint_every, state=state, emit=emit, budget=budget,
                                plan=plan, smaller=smaller)

    target = int(iterations) if iterations is not None else (record.iterations_target or config.iterations)
    if target != config.iterations:
        config = config.replace(iterations=target)
    spec = validate_job(config, dataset)
    with run_lock(version):
        # Read the checkpoint only once we own the version: before, a live run could still replace it.
        state = _load_distiller_state(version) if version.checkpoint_path.exists() else None
        store.update_record(version, config=config.to_dict(), device=str(torch_device), device_reason=device.reason,
                            gpu_mem=gpu_mem_record, plan=plan_record)
        if state is None:
            log(emit, f"{version.ref} has no checkpoint; starting it again from iteration 0", level="warning")
            store.update_record(version, iterations_done=0, checkpoint_iteration=None)
        return distill_into(store, version, config, dataset, spec, torch_device,
                            checkpoint_every=checkpoint_every, state=state, emit=emit, budget=budget,
                            plan=plan, smaller=smaller)
