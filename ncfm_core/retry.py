"""An iteration that runs out of memory is rolled back and run again: the loop's side of it.

:func:`run_iteration` is how :meth:`ncfm_core.distill.Distiller.run` calls ``step()``. It notes
where the iteration starts (the run's generators, device and host); if ``step()`` raises
``torch.OutOfMemoryError`` it drops everything the failed attempt held (its tensors live in the
error's traceback frames and in the gradients), puts the generators back, and asks the job's
hook (``LoopHooks.out_of_memory``) what to do. The hook (the policy: ``ncfm_core.jobs.run``) picks
the next smaller plan, switches the distiller to it (``Distiller.use_plan``) and says True; the
same iteration then runs again from the same state, drawing the same random numbers, so nothing
of it is applied twice or lost. False (no smaller plan), and the error goes on, raised with the
distiller back between iterations, in a state worth saving. Either way the raised error carries
the :class:`OutOfMemory` event as ``error.out_of_memory``.

Why that is the whole state: until the optimizer step an iteration changes nothing that
outlives it but the generators. The extractor's blended weights, the augmentation, the real
features, the loss's frequencies and statistics and every gradient are made again from the
generators by the next attempt (the image and sampler gradients are set to None first, as
``step()`` itself does). The optimizer step is different: AdamW updates its moments in place
and then allocates (``foreach`` sqrt and division), so running out of memory there leaves them
half updated, and nothing can be rolled back without a copy of every optimiser state per
iteration. It is also an out-of-memory error no smaller plan fixes: by then the plan's chunks
and groups are all released, and what is held (images, moments, psi, the data set and the
pool) is the same for every plan (``memory_model``'s "optimizer step" phase). So an error in
that phase is not retried: the run stops, its last checkpoint kept (the loop's ``mid_step`` stays
set, so the half-updated state is never saved).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ncfm_core.errors import one_line

if TYPE_CHECKING:
    from ncfm_core.distill import Distiller

__all__ = ["OUT_OF_MEMORY", "RETRIED_PHASES", "OutOfMemory", "OutOfMemoryHook", "run_iteration"]

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
RETRIED_PHASES = ("draw", "real side", "synthetic groups", "sampler backward")  # see the module docstring


@dataclass(frozen=True)
class OutOfMemory:
    """An iteration that ran out of memory: ``iteration`` (the one being computed, 1-based),
    ``phase`` (``Distiller.phase`` then), torch's message on one line, whether it was rolled back
    (``recoverable``: a phase before the optimizer step) and the bytes the caching allocator held
    when it happened (CUDA; None elsewhere)."""

    iteration: int
    phase: str
    message: str
    recoverable: bool
    reserved_bytes: int | None = None


OutOfMemoryHook = Callable[["Distiller", OutOfMemory], bool]


def _reserved(device: torch.device) -> int | None:
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.memory_reserved(device))
    return None


def _release(distiller: Distiller) -> None:
    """Drop what a failed attempt left: gradients (step() makes them again), unreachable cycles,
    and on CUDA the allocator's cache, so the next attempt starts unfragmented."""
    for optimizer in distiller.optimizers():
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if distiller.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generators(distiller: Distiller) -> list[torch.Generator]:
    """The run's generators: the device's, and the host's when it is another one (on accelerators)."""
    device, host = distiller.generator, distiller.host_generator
    return [device] if host is device else [device, host]


def run_iteration(distiller: Distiller, on_out_of_memory: OutOfMemoryHook | None) -> dict[str, Any]:
    """``distiller.step()``; if it runs out of memory in a phase before the optimizer step and
    ``on_out_of_memory(distiller, event)`` says True, the same iteration again from the same
    state (as often as the hook says True). Without a hook: ``step()`` itself."""
    if on_out_of_memory is None:
        return distiller.step()
    start = [generator.get_state() for generator in _generators(distiller)]  # host-side: no device sync
    while True:
        try:
            return distiller.step()
        except OUT_OF_MEMORY as err:
            event = OutOfMemory(distiller.iteration + 1, distiller.phase, one_line(err),
                                distiller.phase in RETRIED_PHASES, _reserved(distiller.device))
            error = err.with_traceback(None)  # its frames hold the failed attempt's tensors
            error.out_of_memory = event  # for the job's one-line error (where, when)
        if not event.recoverable:
            raise error
        for generator, state in zip(_generators(distiller), start):
            generator.set_state(state)
        distiller.phase = "between iterations"
        _release(distiller)
        distiller.mid_step = False  # back where the iteration started: a state worth saving
        if not on_out_of_memory(distiller, event):
            raise error
        distiller.mid_step = True
