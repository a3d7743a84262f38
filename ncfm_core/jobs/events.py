"""Job events: the progress callback's vocabulary, Ctrl-C between iterations.

Every job reports progress through an optional ``callback`` that receives one dict per
event, always with a ``"stage"`` key:

- ``{"stage": "log", "level": "info" | "debug" | "warning", "message": str}``
- ``{"stage": "created", "artifact": "name@vN", "path": str}``
- ``{"stage": "pool", "member": m, "members": P, "epoch": e, "epochs": E, "loss": float}``
  (``member`` and ``epoch`` count from 0; one event per trained epoch)
- ``{"stage": "distill", "iteration", "total", "loss", "match_loss", "calib_loss", "lr", "seconds"}``
- ``{"stage": "checkpoint", "iteration": i, "path": str}``
- ``{"stage": "eval", "what": "synthetic" | "random" | "full", "model": str, "repeat": r,
  "repeats": R, "accuracy": float}`` (``repeat`` from 0; one event per trained network)

A distillation interrupted with Ctrl-C finishes its current iteration, saves a checkpoint and
raises :class:`JobInterrupted` (a ``KeyboardInterrupt``) naming the version to resume.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ncfm_core.store import ArtifactVersion

JobCallback = Callable[[dict[str, Any]], None]


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a distillation. ``version`` is the artifact to resume; ``checkpoint_iteration``
    the iteration its checkpoint holds (None: no checkpoint, resume starts over)."""

    def __init__(self, version: ArtifactVersion, checkpoint_iteration: int | None) -> None:
        super().__init__(f"interrupted: {version.ref}")
        self.version = version
        self.checkpoint_iteration = checkpoint_iteration


def emitter(callback: JobCallback | None) -> JobCallback:
    return callback if callback is not None else (lambda event: None)


def log(emit: JobCallback, message: str, level: str = "info") -> None:
    emit({"stage": "log", "level": level, "message": message})


@contextlib.contextmanager
def interrupt_between_iterations() -> Iterator[dict[str, bool]]:
    """While active, the first Ctrl-C only sets ``flag["requested"]``; the loop stops after the
    current iteration, so the state it checkpoints is exact. A second Ctrl-C stops at once."""
    flag = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield flag
        return

    def request_stop(signum: int, frame: object) -> None:
        if flag["requested"]:
            raise KeyboardInterrupt
        flag["requested"] = True

    signal.signal(signal.SIGINT, request_stop)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
