"""The job protocol between rank 0 and the other ranks.

Rank 0 runs the job (``ncfm_core.jobs``). Whenever it needs the other ranks it broadcasts an
order, (kind, payload); they carry it out together with rank 0 (the order's own collectives)
with the function registered for that kind (:func:`follower`) and come back for the next
message. Last comes the outcome, ("ok", result) or ("error", class name, message). An order's
dataset travels once: the followers keep the last one they were sent, so their file systems
need not hold it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from ncfm_core import errors
from ncfm_core.data import ImageDataset
from ncfm_core.devices import JobDevice, resolve_device
from ncfm_core.errors import NcfmError
from ncfm_core.parallel.context import (
    DistContext,
    _env_int,
    broadcast_object,
    current,
    env_local_rank,
    init_from_env,
)

_leader: dict[str, Any] = {"busy": False, "dataset": None}
"""Rank 0's view: ``busy`` while the followers are inside an order (its collectives not all
done; they cannot take a message then), ``dataset`` the fingerprint they hold."""
_follower: dict[str, Any] = {"dataset": None}
JobFunction = TypeVar("JobFunction", bound=Callable[..., Any])
Follower = Callable[[DistContext, dict[str, Any], torch.device], None]
FollowerFunction = TypeVar("FollowerFunction", bound=Follower)
_FOLLOWERS: dict[str, Follower] = {}


def follower(kind: str) -> Callable[[FollowerFunction], FollowerFunction]:
    """Register the decorated function as a non-zero rank's part of the orders of ``kind``:
    ``function(ctx, order, device)``, called by :func:`ranked_job` with the order's payload and
    the rank's resolved device."""

    def register(function: FollowerFunction) -> FollowerFunction:
        if _FOLLOWERS.setdefault(kind, function) is not function:
            raise ValueError(f"orders of kind {kind!r} already have a follower")
        return function

    return register


def _send_order(kind: str, payload: dict[str, Any], dataset: ImageDataset) -> None:
    """Rank 0: tell the other ranks to join ``kind`` (no-op in one process)."""
    ctx = current()
    if not (ctx.distributed and ctx.is_main):
        return
    fresh = _leader["dataset"] != dataset.fingerprint
    broadcast_object(ctx, (kind, {**payload, "fingerprint": dataset.fingerprint,
                                  "dataset": dataset if fresh else None}))
    _leader.update(busy=True, dataset=dataset.fingerprint)


def _order_done() -> None:
    """Rank 0, after the last collective of an order: the followers wait for a message again."""
    _leader["busy"] = False


def _order_dataset(order: dict[str, Any]) -> ImageDataset:
    if order["dataset"] is not None:
        _follower["dataset"] = order["dataset"]
    dataset = _follower["dataset"]
    if dataset is None or dataset.fingerprint != order["fingerprint"]:
        raise RuntimeError("rank 0 named a dataset this rank was never sent (a job protocol error)")
    return dataset


def _order_device(ctx: DistContext, order: dict[str, Any], device: torch.device) -> torch.device:
    """The device a follower computes an order on: its own resolved ``device`` when rank 0
    computes on the same type (random-number states belong to a device type), else this rank's
    device of rank 0's type (a resumed run may stay on the CPU where it started)."""
    if order["device_type"] == device.type:
        return device
    return resolve_device(order["device_type"], local_rank=ctx.local_rank)[0]


class RankTerminated(NcfmError):
    """torchrun stopped this rank (SIGTERM), usually because another rank failed."""


@contextlib.contextmanager
def _terminate_as_error() -> Iterator[None]:
    """While active, SIGTERM (torchrun stopping the group after a rank failed) raises
    :class:`RankTerminated`, so rank 0's job records the version as failed before exiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        if sys.exc_info()[0] is not None:
            return  # already failing (e.g. a peer's crash reached us first): let the bookkeeping finish
        raise RankTerminated("stopped by torchrun (another rank failed or the job was cancelled); "
                             "continue with `ncfm resume`")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error_class(name: str) -> type[NcfmError]:
    found = getattr(errors, name, None)
    return found if isinstance(found, type) and issubclass(found, NcfmError) else NcfmError


def _follow(ctx: DistContext, kind: str, order: dict[str, Any], device: torch.device) -> None:
    """Carry out rank 0's order of ``kind`` with its registered :func:`follower`."""
    try:
        follow = _FOLLOWERS[kind]
    except KeyError:
        raise RuntimeError(f"rank 0 sent an order of kind {kind!r} no follower is registered for "
                           "(a job protocol error)") from None
    follow(ctx, order, device)


DevicePreference = Callable[[dict[str, Any]], "str | None"]


def ranked_job(job: JobFunction | None = None, *, prefer_device: DevicePreference | None = None) -> Any:
    """The boundary of a job (distill, resume, eval, the API's evaluation of a set in memory):
    resolve its ``device`` argument once into a :class:`~ncfm_core.devices.JobDevice`
    (``cuda:N``, under torchrun ``cuda:LOCAL_RANK``) and call ``job`` with it, so nothing below
    the job re-resolves a device string. This is the only place a job's device is resolved:
    callers (the CLI, ``ncfm_core.api``) pass what the user asked for, as a string.

    ``prefer_device(arguments)``, if given, names the device a run started on (resume: the
    manifest's) from the job's bound arguments; ``auto`` takes it when this machine has one of
    its type. It is asked on rank 0 only: the other ranks follow rank 0's device type through its
    orders.

    Under torchrun rank 0 runs ``job``, sending orders for the work it spreads; the other ranks
    carry out the orders (with the registered :func:`follower` of each order's kind), then
    return rank 0's result or raise its error. ``job`` takes a ``device`` argument. One
    process: ``job`` itself, with the resolved device.
    """
    if job is None:
        return functools.partial(ranked_job, prefer_device=prefer_device)
    signature = inspect.signature(job)

    @functools.wraps(job)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        requested = bound.arguments.get("device", "auto")
        if isinstance(requested, JobDevice):  # resolved before the boundary: without LOCAL_RANK
            raise TypeError(f"{job.__name__} takes the device as asked ('auto', 'cuda', 'cuda:1', ...), not a "
                            f"JobDevice: the job boundary resolves it, with LOCAL_RANK under torchrun")
        local_rank = env_local_rank()
        leads = local_rank is None or _env_int("RANK", 0) == 0
        prefer = prefer_device(bound.arguments) if prefer_device is not None and leads else None
        device = JobDevice.resolve(requested, local_rank=local_rank, prefer=prefer)
        bound.arguments["device"] = device
        if local_rank is None:
            return job(*bound.args, **bound.kwargs)
        ctx = init_from_env(device.device)
        if ctx.is_main:
            _leader["busy"] = False
            try:
                with _terminate_as_error():
                    result = job(*bound.args, **bound.kwargs)
            except BaseException as err:
                # Followers inside an order cannot take a message; they stop when torchrun tears
                # the group down after this process exits non-zero.
                if not _leader["busy"]:
                    broadcast_object(ctx, ("error", type(err).__name__, str(err)))
                raise
            broadcast_object(ctx, ("ok", result))
            return result
        while True:
            message = broadcast_object(ctx)
            if message[0] == "ok":
                return message[1]  # rank 0's result (a version's path is on rank 0's machine)
            if message[0] == "error":
                error = _error_class(message[1])(message[2])
                error.relayed = True  # rank 0 reports it; the CLI does not print it again
                raise error
            _follow(ctx, message[0], message[1], device.device)

    return wrapper
