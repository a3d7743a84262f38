"""Job events: the progress callback's vocabulary, Ctrl-C between iterations.

Every job reports progress through an optional ``callback`` that receives one dict per
event, always with a ``"stage"`` key:

- ``{"stage": "log", "level": "info" | "debug" | "warning", "message": str}``
- ``{"stage": "created", "artifact": "name@vN", "path": str}``
- ``{"stage": "pool", "member": m, "members": P, "epoch": e, "epochs": E, "loss": float}``
  (``member`` and ``epoch`` count from 0; one event per trained epoch)
- ``{"stage": "distill", "iteration", "total", "loss", "match_loss", "calib_loss", "lr", "seconds"}``
- ``{"stage": "checkpoint", "iteration": i, "path": str}``
- ``{"stage": "eval_epoch", "what", "model", "first": r0, "stop": r1, "repeats": R, "epoch": e,
  "epochs": E, "loss": float, "seconds": float}`` (one event per trained epoch of repeats
  ``r0 .. r1 - 1``: one at a time, or all of them when they train together)
- ``{"stage": "eval", "what": "synthetic" | "random" | "full", "model": str, "repeat": r,
  "repeats": R, "accuracy": float}`` (``repeat`` from 0; one event per trained network)

A distillation interrupted with Ctrl-C or SIGTERM (a scheduler, ``docker stop``, ``kill``)
finishes its current iteration, saves a checkpoint, records the version "interrupted" and raises
:class:`JobInterrupted` (a ``KeyboardInterrupt``) naming the version to resume and the signal.
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
    """Ctrl-C (``signal_name`` "SIGINT") or SIGTERM stopped a distillation. ``version`` is the
    artifact to resume; ``checkpoint_iteration`` the iteration its checkpoint holds (None: no
    checkpoint, resume starts over)."""

    def __init__(self, version: ArtifactVersion, checkpoint_iteration: int | None,
                 signal_name: str = "SIGINT") -> None:
        super().__init__(f"interrupted: {version.ref}")
        self.version = version
        self.checkpoint_iteration = checkpoint_iteration
        self.signal_name = signal_name


def signal_of(err: BaseException) -> str:
    """Which signal a ``KeyboardInterrupt`` stands for: "SIGTERM" when SIGTERM raised it (see
    :func:`sigterm_as_interrupt`), else "SIGINT" (Ctrl-C)."""
    if isinstance(err, JobInterrupted):
        return err.signal_name
    return "SIGTERM" if isinstance(err, KeyboardInterrupt) and err.args[:1] == ("SIGTERM",) else "SIGINT"


def sigterm_as_interrupt(signum: int, frame: object) -> None:
    """A SIGTERM handler that stops the process the way Ctrl-C does (a ``KeyboardInterrupt``
    marked "SIGTERM"), so what it was doing is recorded and the exit code says so (143). The
    command line installs it; :func:`interrupt_between_iterations` takes SIGTERM over from it."""
    raise KeyboardInterrupt("SIGTERM")


def emitter(callback: JobCallback | None) -> JobCallback:
    return callback if callback is not None else (lambda event: None)


def log(emit: JobCallback, message: str, level: str = "info") -> None:
    emit({"stage": "log", "level": level, "message": message})


@contextlib.contextmanager
def interrupt_between_iterations() -> Iterator[dict[str, Any]]:
    """While active, the first Ctrl-C or SIGTERM only sets ``flag["requested"]`` (and
    ``flag["signal"]``, "SIGINT" or "SIGTERM"); the loop stops after the current iteration, so
    the state it checkpoints is exact. A second one stops at once. SIGTERM is taken over only
    from the default handler or :func:`sigterm_as_interrupt`: under torchrun it stays the
    group's (``parallel.protocol``: rank 0 records the failure)."""
    flag: dict[str, Any] = {"requested": False, "signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return

    def request_stop(signum: int, frame: object) -> None:
        name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
        if flag["requested"]:
            raise KeyboardInterrupt(name)
        flag["requested"] = True
        flag["signal"] = name

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if signum is None:
            continue
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN or (signum != signal.SIGINT and handler not in (signal.SIG_DFL,
                                                                                      sigterm_as_interrupt)):
            continue
        previous[signum] = handler
        signal.signal(signum, request_stop)
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
