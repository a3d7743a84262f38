"""A run's out-of-memory policy (the loop's side, rolling an iteration back and running it again,
is ``ncfm_core.retry``): the next smaller plan of the planner's path, one log line, the change
recorded (``plan_changes``; ``config`` and ``plan`` become the smaller plan's, so a resume replays
it); the one-line error when none is left, naming the budget that would have been needed; and the
plan's estimate beside the measured peak (``memory_fit``) that every GPU run records."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from ncfm_core import parallel
from ncfm_core.config import DistillConfig
from ncfm_core.devices import MemoryBudget, ceil_mib_spec, format_bytes, parse_memory
from ncfm_core.distill import Distiller
from ncfm_core.errors import BudgetInfeasibleError
from ncfm_core.jobs.events import JobCallback, log
from ncfm_core.jobs.plan import PLAN_KNOBS
from ncfm_core.memory_model import Plan
from ncfm_core.retry import OutOfMemory, OutOfMemoryHook
from ncfm_core.store import (
    ArtifactVersion,
    MemoryFit,
    PeakMemoryRecord,
    PlanChange,
    PlanKnobs,
    PlanRecord,
    Store,
)


def memory_fit(plan: Plan | None, peak: PeakMemoryRecord | None) -> MemoryFit | None:
    """The plan's estimate beside the measured peak (the record's ``memory_fit``): what the next
    refit of ``ncfm_core.memory_model`` reads from every GPU run (its estimate terms are in the
    record's ``plan``)."""
    if plan is None or peak is None:
        return None
    return MemoryFit(estimated_reserved_bytes=plan.estimated_peak_bytes,
                     estimated_allocated_bytes=plan.estimated_allocated_bytes,
                     measured_reserved_bytes=peak.reserved_bytes, measured_allocated_bytes=peak.allocated_bytes,
                     measured_source=peak.source, knobs=knobs(plan), capped=plan.capped,
                     cudnn_benchmark=plan.backend.cudnn_benchmark, allocator_conf=plan.backend.allocator_conf)


def knobs_text(plan: Plan | DistillConfig) -> str:
    real, classes, checkpointing = (plan.real_chunk, plan.class_chunk, plan.activation_checkpointing)
    return f"real chunk {real}, {classes} class(es) per pass, checkpointing {'on' if checkpointing else 'off'}"


def knobs(plan: Plan | DistillConfig) -> PlanKnobs:
    return PlanKnobs(**{knob: getattr(plan, knob) for knob in PLAN_KNOBS})


def step_down_hook(store: Store, version: ArtifactVersion, smaller: Sequence[Plan], emit: JobCallback,
                   on_change: Callable[[Plan], None]) -> OutOfMemoryHook | None:
    """The out-of-memory policy (the loop's mechanics: ``ncfm_core.retry``): switch the rolled-back
    distiller to the next of ``smaller``, log one line, record the change (:func:`_record_plan_change`),
    tell ``on_change`` the plan now in force and run the iteration again; False once none is left. None under torchrun: a rank that ran out
    cannot change its plan alone while the others wait for it in a collective, so the run stops
    (this rank with exit code 4, the others stopped by torchrun), its last checkpoint kept."""
    if parallel.current().world_size > 1:
        return None
    remaining = list(smaller)

    def step_down(distiller: Distiller, event: OutOfMemory) -> bool:
        if not remaining:
            return False
        before = distiller.config
        plan = dataclasses.replace(remaining.pop(0), chosen_because=(
            f"stepped down from {knobs_text(before)} after running out of memory at iteration "
            f"{event.iteration} ({event.phase})"))
        distiller.use_plan(*plan.knobs)
        on_change(plan)
        log(emit, f"out of memory at iteration {event.iteration} ({event.phase}) with {knobs_text(before)}; running "
                  f"it again with {knobs_text(plan)} (estimated peak {format_bytes(plan.estimated_peak_bytes)})",
            level="warning")
        change = PlanChange(iteration=event.iteration, phase=event.phase, error=event.message,
                            reserved_bytes=event.reserved_bytes, before=knobs(before), after=knobs(plan))
        _record_plan_change(store, version, distiller.config, plan, change)
        return True

    return step_down


def _record_plan_change(store: Store, version: ArtifactVersion, config: DistillConfig, plan: Plan,
                        change: PlanChange) -> None:
    """The record's one write for a change of plan: the config a resume replays, the plan in
    force, and ``plan_changes`` with this one appended."""
    store.update_record(version, lambda record: record.replace(
        config=config.to_dict(), plan=PlanRecord.from_json(plan.to_dict()),
        plan_changes=(*record.plan_changes, change)))


_REQUESTED = re.compile(r"Tried to allocate ([0-9.]+) ?([KMG]iB|B)\b")


def _needed_bytes(budget_bytes: int, event: OutOfMemory | None) -> int:
    """At least what the failed run needed: what the allocator held when it ran out (or the whole
    budget) plus the request torch names in its message."""
    held = budget_bytes if event is None or event.reserved_bytes is None else event.reserved_bytes
    asked = _REQUESTED.search(event.message) if event is not None else None
    return max(budget_bytes + 1, held + (parse_memory("".join(asked.groups())) if asked else 0))


def out_of_memory_error(ref: str, checkpoint_iteration: int | None, in_force: Plan | None, budget: MemoryBudget,
                        event: OutOfMemory | None) -> BudgetInfeasibleError:
    """The one-line error for an out-of-memory error that ended the run of version ``ref``
    (``in_force``: its plan then; ``event``: where, when the loop knew it)."""
    if checkpoint_iteration is not None:
        kept = f"checkpoint at iteration {checkpoint_iteration} kept"
    else:
        kept = "no checkpoint yet"
    where = "" if event is None else f" at iteration {event.iteration} ({event.phase})"
    if parallel.current().world_size > 1:
        return BudgetInfeasibleError(
            f"CUDA ran out of memory{where} under torchrun ({kept}); one process cannot step down to a smaller "
            f"plan while the others wait for it, so the run stopped: continue with `ncfm resume {ref}` "
            f"and a larger --gpu-mem, or fewer classes per process (more processes)"
        )
    plan = "" if in_force is None else f" with {knobs_text(in_force)}"
    if event is not None and not event.recoverable:
        plan += ", in a phase no smaller plan changes"
    elif plan:
        plan += ", the smallest plan"
    if budget.bytes is not None:
        needed = ceil_mib_spec(_needed_bytes(budget.bytes, event))
        return BudgetInfeasibleError(
            f"CUDA ran out of memory{where} under --gpu-mem {budget.spec}{plan} ({kept}); it needs at least "
            f"{needed}: continue with `ncfm resume {ref} --gpu-mem {needed}`"
        )
    return BudgetInfeasibleError(
        f"CUDA ran out of memory{where} with the plan made for the free memory{plan} ({kept}); other processes may "
        f"hold the GPU: distill again with --gpu-mem set below what is free"
    )
