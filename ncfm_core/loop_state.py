"""The loop's exact, resumable state: what :meth:`ncfm_core.distill.Distiller.state_dict` saves
and :meth:`~ncfm_core.distill.Distiller.load_state_dict` restores (images, both optimisers, the
scheduler, every generator, the loss curve and the losses not read back yet, and the matching
loss's own entries), and how a whole-set state is cut to one process's class block. The store
writes it (``ncfm_core.store.save_state``); a run continued from it ends with exactly the images
of an uninterrupted run (on CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ncfm_core.errors import CorruptArtifactError

if TYPE_CHECKING:
    from ncfm_core.distill import Distiller

__all__ = ["STATE_FORMAT", "load_loop_state", "loop_state", "owned_rows_of_state"]

STATE_FORMAT = 1


def owned_rows_of_state(state: dict[str, Any], rows: slice, total_rows: int) -> dict[str, Any]:
    """A whole-set state (images (total_rows, ...) and image-optimiser moments of that shape)
    cut to ``rows``, the stored rows of one process's class block. A state of any other shape
    is returned as is (the shape check then rejects it)."""
    if state["images"].shape[0] != total_rows:
        return state

    def cut(value: Any) -> Any:
        return value[rows] if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == total_rows else value

    optimizer = state["image_optimizer"]
    moments = {key: {name: cut(v) for name, v in entry.items()} for key, entry in optimizer["state"].items()}
    return {**state, "images": state["images"][rows], "image_optimizer": {**optimizer, "state": moments}}



def loop_state(distiller: Distiller) -> dict[str, Any]:
    """Everything needed to continue exactly: images, optimisers, RNG, iteration, and the
    matching loss's own entries (``ncfm`` with psi: ``sampler``, ``sampler_optimizer``)."""
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "iteration": distiller.iteration,
        "images": distiller.images.detach().cpu().clone(),
        "image_optimizer": distiller.image_optimizer.state_dict(),
        "scheduler": distiller.scheduler.state_dict(),
        "generator": distiller.generator.get_state(),
        "loss_curve": [list(p) for p in distiller.loss_curve],
        "loss_window": list(distiller.loss_window),
    }
    if distiller.pending_losses:
        state["pending_losses"] = torch.stack(distiller.pending_losses).cpu()
    if distiller.host_generator is not distiller.generator:
        state["host_generator"] = distiller.host_generator.get_state()
    if distiller.grad_scaler is not None:
        state["grad_scaler"] = distiller.grad_scaler.state_dict()
    own = distiller.matching.state_dict()
    if own.keys() & state.keys():
        reused = sorted(own.keys() & state.keys())
        raise ValueError(f"matching loss {distiller.matching.name!r} state reuses the loop's keys {reused}")
    return {**state, **own}


def load_loop_state(distiller: Distiller, state: dict[str, Any]) -> None:
    """Restore ``state`` into ``distiller`` (a whole-set state is cut to its class block first);
    ``CorruptArtifactError`` for a state of another format or shape."""
    if state.get("format") != STATE_FORMAT:
        raise CorruptArtifactError(f"checkpoint format {state.get('format')!r} is not {STATE_FORMAT}")
    if len(distiller.classes) != distiller.num_classes:
        ipc = distiller.config.ipc
        rows = slice(distiller.classes.start * ipc, distiller.classes.stop * ipc)
        state = owned_rows_of_state(state, rows, distiller.num_classes * ipc)
    if tuple(state["images"].shape) != tuple(distiller.images.shape):
        raise CorruptArtifactError(
            f"checkpoint images have shape {tuple(state['images'].shape)}, expected {tuple(distiller.images.shape)}"
        )
    with torch.no_grad():
        distiller.images.copy_(state["images"].to(distiller.device))
    distiller.image_optimizer.load_state_dict(state["image_optimizer"])
    distiller.scheduler.load_state_dict(state["scheduler"])
    distiller.generator.set_state(state["generator"].cpu())
    if distiller.host_generator is not distiller.generator and "host_generator" in state:
        distiller.host_generator.set_state(state["host_generator"].cpu())
    if distiller.grad_scaler is not None and "grad_scaler" in state:
        distiller.grad_scaler.load_state_dict(state["grad_scaler"])
    distiller.matching.load_state_dict(state)
    distiller.iteration = int(state["iteration"])
    distiller.loss_curve = [list(p) for p in state.get("loss_curve", [])]
    distiller.loss_window = list(state.get("loss_window", []))
    pending = state.get("pending_losses")
    distiller.pending_losses = [] if pending is None else list(pending.to(distiller.device, torch.float32).unbind(0))
