"""Jobs: what the ``ncfm`` commands do, as plain functions over a :class:`~ncfm_core.store.Store`.

Each job validates its input, does the work, records it in the artifact's manifest and returns
a value the command line renders. Progress is reported through an optional ``callback`` that
receives one dict per event, always with a ``"stage"`` key:

- ``{"stage": "log", "level": "info" | "debug" | "warning", "message": str}``
- ``{"stage": "created", "artifact": "name@vN", "path": str}``
- ``{"stage": "pool", "member": m, "members": P, "epoch": e, "epochs": E, "loss": float}``
  (``member`` and ``epoch`` count from 0; one event per trained epoch)
- ``{"stage": "distill", "iteration", "total", "loss", "match_loss", "calib_loss", "lr", "seconds"}``
- ``{"stage": "checkpoint", "iteration": i, "path": str}``
- ``{"stage": "eval", "what": "synthetic" | "random" | "full", "model": str, "repeat": r,
  "repeats": R, "accuracy": float}`` (``repeat`` from 0; one event per trained network)

A distillation interrupted with Ctrl-C finishes its current iteration, saves a checkpoint and
raises :class:`JobInterrupted` (a ``KeyboardInterrupt``) naming the version to resume. Any
other failure is recorded in the manifest (status "failed", the one-line error) and re-raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import torch
from torch import Tensor, nn

from ncfm_core import __version__, augment, distributed
from ncfm_core import store as store_lib
from ncfm_core.budget import (
    DatasetShape,
    Plan,
    cap_device_memory,
    dataset_shape,
    device_total_bytes,
    estimate_iteration_flops,
    format_bytes,
    measure_peak,
    parse_memory,
    plan_run,
    reset_peak,
    resolve_device,
)
from ncfm_core.config import DistillConfig
from ncfm_core.data import ImageDataset, check_ipc, load_dataset
from ncfm_core.distill import Distiller
from ncfm_core.errors import BudgetInfeasibleError, ConfigError, CorruptArtifactError, NcfmError, NotFoundError
from ncfm_core.evaluate import (
    EvalConfig,
    EvalResult,
    baseline_cache_key,
    build_eval_network,
    evaluate_full_baseline,
    evaluate_models,
    evaluate_random_baseline,
    teacher_from_pool,
)
from ncfm_core.export import export_synset
from ncfm_core.metrics import fair_metrics
from ncfm_core.pool import PoolSpec
from ncfm_core.store import ArtifactVersion, Store
from ncfm_core.synset import check_factor
from ncfm_core.train import can_stack

JobCallback = Callable[[dict[str, Any]], None]

SYNSET_FORMAT = "ncfm-synset/1"
SAMPLER_FORMAT = "ncfm-sampler/1"
DEFAULT_CHECKPOINT_EVERY = 100
"""Iterations between checkpoints: frequent enough that a killed run loses little, rare
enough that writing the optimiser states (3x the images) costs little next to the loop."""
RUN_LOCK_FILE = ".run.lock"
"""Held (flock) by the process distilling into a version; the kernel drops it if that
process dies, so a lock we cannot take means the run is alive somewhere else."""


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a distillation. ``version`` is the artifact to resume; ``checkpoint_iteration``
    the iteration its checkpoint holds (None: no checkpoint, resume starts over)."""

    def __init__(self, version: ArtifactVersion, checkpoint_iteration: int | None) -> None:
        super().__init__(f"interrupted: {version.ref}")
        self.version = version
        self.checkpoint_iteration = checkpoint_iteration


# ----------------------------------------------------------------------------- small helpers


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _emitter(callback: JobCallback | None) -> JobCallback:
    return callback if callback is not None else (lambda event: None)


def _log(emit: JobCallback, message: str, level: str = "info") -> None:
    emit({"stage": "log", "level": level, "message": message})


def default_artifact_name(dataset: str, ipc: int) -> str:
    """``<dataset>-ipc<IPC>``; a ``folder:PATH`` dataset becomes ``folder-<last path part>-ipc<IPC>``
    with every character outside the artifact-name charset replaced by ``_``."""
    family, sep, argument = dataset.partition(":")
    last_part = re.split(r"[\\/]", argument.rstrip("/\\"))[-1]  # either separator, any platform
    base = f"{family}-{last_part or 'data'}" if sep else dataset
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).replace("..", "_")
    base = re.sub(r"^[^A-Za-z0-9]+", "", base)[:100] or "dataset"
    return store_lib.validate_name(f"{base}-ipc{ipc}")


def _software_versions() -> dict[str, str]:
    return {"ncfm": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _load_dataset(config: DistillConfig, data_dir: str | None = None) -> ImageDataset:
    return load_dataset(config.dataset, data_dir or config.data_dir, image_size=config.image_size)


def _dataset_record(config: DistillConfig, dataset: ImageDataset) -> dict[str, Any]:
    return {
        "name": config.dataset,
        "fingerprint": dataset.fingerprint,
        "num_classes": dataset.num_classes,
        "image_size": dataset.image_size,
        "channels": dataset.channels,
        "class_names": list(dataset.class_names),
        "num_train": dataset.num_train,
        "num_test": int(dataset.test_images.shape[0]),
    }


def _check_fingerprint(version: ArtifactVersion, manifest: dict, dataset: ImageDataset) -> None:
    recorded = (manifest.get("dataset") or {}).get("fingerprint")
    if recorded != dataset.fingerprint:
        raise NcfmError(
            f"dataset '{dataset.name}' is not the data {version.ref} was made from (fingerprint "
            f"{str(dataset.fingerprint)[:12]}... != {str(recorded)[:12]}...); point --data-dir at the original data"
        )


def _peak_memory(device: torch.device) -> tuple[dict[str, Any] | None, int | None, str]:
    """(``measure_peak(device).to_dict()`` or None, the figure to report, what it measures).

    On CUDA the figure is the caching allocator's peak reserved bytes since :func:`reset_peak`
    (what a ``--gpu-mem`` cap applies to); elsewhere the process's peak resident set size,
    which also counts everything else the process did."""
    try:
        peak = measure_peak(device)
    except (ImportError, RuntimeError, AttributeError):  # no resource module (Windows), old MPS
        return None, None, "unavailable"
    if peak.reserved_bytes is not None:
        source = "cuda_max_memory_reserved"
    elif peak.rss_bytes is not None:
        source = "process_peak_rss"
    else:
        source = "mps_driver_allocated"
    return peak.to_dict(), peak.peak_bytes, source


def _validate_job(config: DistillConfig, dataset: ImageDataset, spec: PoolSpec) -> None:
    """Cheap checks that would otherwise fail only after the pool is trained."""
    check_ipc(dataset, config.ipc)
    check_factor(dataset.image_size, config.factor)
    augment.parse_strategy(config.dsa_strategy, allow_flip=dataset.allow_flip)
    spec.build()  # unknown network, depth or norm


@contextlib.contextmanager
def _run_lock(version: ArtifactVersion) -> Iterator[None]:
    lock = filelock.FileLock(str(version.path / RUN_LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise NcfmError(
            f"{version.ref} is being distilled by another process right now; wait for it to finish or stop it first"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _interrupt_between_iterations() -> Iterator[dict[str, bool]]:
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


# ----------------------------------------------------------------------------- the distill loop


@dataclass
class _Session:
    """One process's stretch of work on a version (a distill, or one resume)."""

    started: float = field(default_factory=time.perf_counter)
    pool_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    checkpoint_iteration: int | None = None  # iteration of the newest checkpoint on disk


def _save_checkpoint(store: Store, version: ArtifactVersion, distiller: Distiller, session: _Session) -> None:
    store_lib.save_state(version.checkpoint_path, distiller.state_dict())
    session.checkpoint_iteration = distiller.iteration
    store.update_manifest(
        version,
        iterations_done=distiller.iteration,
        checkpoint_iteration=distiller.iteration,
        loss_curve=distiller.loss_curve,
    )


def _obtain_pool(store: Store, version: ArtifactVersion, spec: PoolSpec, dataset: ImageDataset,
                 device: torch.device, emit: JobCallback, session: _Session):
    key = spec.key()
    cache_dir = store.pool_dir(key)
    cached = (cache_dir / "pool.safetensors").exists()
    if cached:
        _log(emit, f"pool: reusing {spec.size} cached feature extractor(s) ({key})")
    else:
        _log(emit, f"pool: training {spec.size} feature extractor(s) for {spec.epochs} epoch(s) each ({key})")

    def on_progress(member: int, epoch: int, loss: float) -> None:
        emit({"stage": "pool", "member": member, "members": spec.size, "epoch": epoch,
              "epochs": spec.epochs, "loss": float(loss)})

    started = time.perf_counter()
    pool, from_cache = distributed.distributed_load_or_train_pool(spec, dataset, device, cache_dir=cache_dir,
                                                                  on_progress=on_progress)
    session.pool_seconds = time.perf_counter() - started
    store.update_manifest(
        version,
        pool={"key": key, "cached": bool(from_cache), "size": spec.size, "epochs": spec.epochs,
              "seconds": session.pool_seconds, "test_accuracy": list(pool.test_accuracy)},
    )
    return pool


def _distill_into(
    store: Store,
    version: ArtifactVersion,
    config: DistillConfig,
    dataset: ImageDataset,
    spec: PoolSpec,
    device: torch.device,
    *,
    target: int,
    checkpoint_every: int,
    state: dict | None,
    emit: JobCallback,
    gpu_mem: str | None = None,
) -> ArtifactVersion:
    """Build the pool and the distiller (from ``state`` if given), iterate to ``target`` with
    checkpoints, then write the results. The caller holds the version's run lock (and has
    capped the allocator at ``gpu_mem``, the ``--gpu-mem`` figure, if one was given).
    A CUDA out-of-memory error becomes a one-line :class:`BudgetInfeasibleError` (exit 4)
    naming the budget; the last checkpoint stays."""
    # A resumed run already has a checkpoint on disk: an interrupt before the first new one
    # must not claim otherwise.
    session = _Session(checkpoint_iteration=None if state is None else int(state["iteration"]))
    distiller: Distiller | None = None
    consistent = False  # True while the distiller sits between two iterations
    try:
        store.update_manifest(
            version, status="running", error=None, interrupted=False, iterations_target=target,
            process={"pid": os.getpid(), "host": socket.gethostname()},
            world_size=distributed.current().world_size,
        )
        # Under torchrun the other ranks join here (ncfm_core.distributed); no-ops in one process.
        distributed.send_order(config, dataset, device, target=target, checkpoint_every=checkpoint_every,
                               state=state)
        pool = _obtain_pool(store, version, spec, dataset, device, emit, session)
        distiller = distributed.make_distiller(config, dataset, pool, device, target=target,
                                               checkpoint_every=checkpoint_every)
        if state is not None:
            distiller.load_state_dict(state)
            session.checkpoint_iteration = distiller.iteration
            _log(emit, f"continuing {version.ref} from iteration {distiller.iteration}")
        if distiller.iteration > target:
            raise ConfigError(
                f"{version.ref} is already at iteration {distiller.iteration}; --iterations must be at least that"
            )
        consistent = True
        _log(emit, f"distilling {version.ref}: iterations {distiller.iteration} -> {target} on {device}")
        # The loop's peak, comparable with the plan's estimate (pool training is not in it).
        reset_peak(device)
        with _interrupt_between_iterations() as interrupt:
            while distiller.iteration < target:
                if interrupt["requested"]:
                    raise KeyboardInterrupt
                consistent = False
                metrics = distiller.step()
                consistent = True
                session.step_seconds.append(metrics["seconds"])
                emit({"stage": "distill", "total": target, **metrics})
                if distiller.iteration % checkpoint_every == 0 and distiller.iteration < target:
                    _save_checkpoint(store, version, distiller, session)
                    emit({"stage": "checkpoint", "iteration": distiller.iteration,
                          "path": str(version.checkpoint_path)})
            if interrupt["requested"]:
                raise KeyboardInterrupt
            distiller.read_metrics()  # accelerators read losses lazily: the curve needs the last ones
            _finish(store, version, distiller, dataset, device, session)
    except BaseException as err:
        if isinstance(err, _OUT_OF_MEMORY):
            err = _out_of_memory_error(version, session, gpu_mem)
        _record_failure(store, version, distiller if consistent else None, session, err)
        if isinstance(err, KeyboardInterrupt) and not isinstance(err, JobInterrupted):
            raise JobInterrupted(version, session.checkpoint_iteration) from None
        if isinstance(err, BudgetInfeasibleError):
            raise err from None
        raise
    return version


_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _out_of_memory_error(version: ArtifactVersion, session: _Session, gpu_mem: str | None) -> BudgetInfeasibleError:
    """The one-line error for a CUDA out-of-memory error inside a run."""
    if session.checkpoint_iteration is not None:
        kept = f"checkpoint at iteration {session.checkpoint_iteration} kept"
    else:
        kept = "no checkpoint yet"
    if gpu_mem is not None:
        return BudgetInfeasibleError(
            f"CUDA ran out of memory under --gpu-mem {gpu_mem} ({kept}); continue with "
            f"`ncfm resume {version.ref} --gpu-mem` and a larger figure, or distill again with a larger --gpu-mem"
        )
    return BudgetInfeasibleError(
        f"CUDA ran out of memory with the plan made for the free memory ({kept}); other processes may hold "
        f"the GPU: distill again with --gpu-mem set below what is free"
    )


def _record_failure(store: Store, version: ArtifactVersion, distiller: Distiller | None,
                    session: _Session, err: BaseException) -> None:
    """Keep what can be kept; never let bookkeeping hide the original error."""
    interrupted = isinstance(err, KeyboardInterrupt)
    if distiller is not None and distiller.iteration != session.checkpoint_iteration:
        with contextlib.suppress(Exception):
            _save_checkpoint(store, version, distiller, session)
    message = "interrupted (Ctrl-C)" if interrupted else f"{type(err).__name__}: {_one_line(err)}"
    with contextlib.suppress(Exception):
        timings = _accumulated_timings(version.manifest(), session)
        store.update_manifest(version, status="failed", error=message, interrupted=interrupted,
                              failed=_utc_now(), timings=timings)


def _accumulated_timings(manifest: dict, session: _Session) -> dict[str, Any]:
    """Timings of ``manifest`` plus this session: totals add up over every session (the distill
    and each resume) that worked on the version; the median is over the last session only."""
    old = manifest.get("timings") if isinstance(manifest.get("timings"), dict) else {}
    median = statistics.median(session.step_seconds) if session.step_seconds else None
    return {
        "seconds": float(old.get("seconds", 0.0)) + (time.perf_counter() - session.started),
        "pool_seconds": float(old.get("pool_seconds", 0.0)) + session.pool_seconds,
        "sessions": int(old.get("sessions", 0)) + 1,
        "seconds_per_iteration_median": median if median is not None else old.get("seconds_per_iteration_median"),
    }


def _finish(store: Store, version: ArtifactVersion, distiller: Distiller, dataset: ImageDataset,
            device: torch.device, session: _Session) -> None:
    """Write synset, sampler and the final checkpoint, then mark the manifest complete (last, so a
    crash in between leaves a version that is not complete and can be resumed)."""
    config = distiller.config
    images, labels = distiller.synthetic_set()
    store_lib.save_tensors(
        version.synset_path,
        {"images": images.to(torch.float32).contiguous(), "labels": labels.to(torch.int64).contiguous()},
        {
            "format": SYNSET_FORMAT,
            "factor": str(config.factor),
            "ipc": str(config.ipc),
            "num_classes": str(dataset.num_classes),
            "image_size": str(dataset.image_size),
            "channels": str(dataset.channels),
            "class_names": json.dumps(list(dataset.class_names)),
        },
    )
    sampler = distiller.sampler_tensors()
    # Without a learned psi the file is still written (no tensors), so every complete version
    # has the same files; its metadata says which sampler the run used.
    store_lib.save_tensors(
        version.sampler_path,
        sampler,
        {"format": SAMPLER_FORMAT, "kind": "mixture" if sampler else "gaussian",
         "num_freqs": str(config.num_freqs)},
    )
    if distiller.iteration != session.checkpoint_iteration:
        store_lib.save_state(version.checkpoint_path, distiller.state_dict())
        session.checkpoint_iteration = distiller.iteration

    previous = version.manifest()
    peak, peak_bytes, peak_source = _peak_memory(device)
    old_peak = previous.get("peak_memory_bytes")
    if isinstance(old_peak, int) and peak_bytes is not None:
        peak_bytes = max(peak_bytes, old_peak)
    final_loss = distiller.loss_curve[-1][1] if distiller.loss_curve else None
    store.update_manifest(
        version,
        status="complete",
        error=None,
        interrupted=False,
        iterations_done=distiller.iteration,
        checkpoint_iteration=distiller.iteration,
        finished=_utc_now(),
        timings=_accumulated_timings(previous, session),
        peak_memory=peak,  # this session's measurement; peak_memory_bytes is the max over sessions
        peak_memory_bytes=peak_bytes,
        peak_memory_source=peak_source,
        loss_curve=distiller.loss_curve,
        final_loss=final_loss,
        synset={"file": store_lib.SYNSET_FILE, "stored_images": int(images.shape[0]),
                "shape": list(images.shape), "factor": config.factor,
                "decoded_images": int(images.shape[0]) * config.factor**2},
        sampler={"file": store_lib.SAMPLER_FILE, "learned": bool(sampler)},
    )


# ----------------------------------------------------------------------------- distill, resume


# ----------------------------------------------------------------------------- memory plans


def make_plan(
    config: DistillConfig,
    shape: DatasetShape,
    device: torch.device,
    gpu_mem: str | None = None,
    *,
    allow_checkpointing: bool = True,
) -> tuple[Plan, dict[str, Any]]:
    """The memory plan of a run and what the manifest records about it.

    ``gpu_mem`` is the ``--gpu-mem`` text (``"2.5G"``, ``"800M"``, ``"0.3"`` of the device);
    None plans for the free memory minus a margin. ``allow_checkpointing=False``
    (``--no-checkpointing``) refuses plans that recompute activations. Returns
    ``(plan, {"plan": plan.to_dict(), "flops_per_iteration": int, "gpu_mem": gpu_mem})``.
    ``ConfigError`` for an unreadable size (or a fraction of a device whose size is unknown
    here), :class:`BudgetInfeasibleError` (exit 4) naming the minimum when nothing fits.
    """
    budget_bytes = None if gpu_mem is None else parse_memory(gpu_mem, device_total_bytes(device))
    plan = plan_run(config, shape, device, budget_bytes)
    if plan.activation_checkpointing and not config.activation_checkpointing and not allow_checkpointing:
        raise BudgetInfeasibleError(
            f"{config.dataset} at IPC {config.ipc} fits in {format_bytes(plan.budget_bytes or 0)} only with "
            f"activation checkpointing; drop --no-checkpointing, raise --gpu-mem, or lower --ipc or --real-per-class"
        )
    flops = estimate_iteration_flops(config, shape, plan)["total"]
    return plan, {"plan": plan.to_dict(), "flops_per_iteration": int(flops), "gpu_mem": gpu_mem}


def _plan_message(plan: Plan) -> str:
    budget = "no budget" if plan.budget_bytes is None else f"budget {format_bytes(plan.budget_bytes)}"
    return (
        f"plan: real chunk {plan.real_chunk}, {plan.class_chunk} class(es) per pass, {plan.precision}, "
        f"checkpointing {'on' if plan.activation_checkpointing else 'off'}; estimated peak "
        f"{format_bytes(plan.estimated_peak_bytes)} of the {budget} ({plan.budget_source or 'given'})"
    )


def _planning_device(requested: str, gpu_mem: str | None) -> tuple[torch.device, str]:
    """The device a dry run plans for: as ``resolve_device``, except that a GPU budget (or an
    explicit ``cuda``) on a machine without CUDA plans for CUDA, so plans can be checked anywhere."""
    base = requested.lower().split(":", 1)[0]
    try:
        device, reason = resolve_device(requested)
    except ConfigError:
        if base != "cuda":
            raise
        return torch.device(requested.lower()), "planning only: no CUDA device here; the plan is for one"
    if device.type == "cpu" and base == "auto" and gpu_mem is not None:
        return torch.device("cuda"), "planning only: --gpu-mem is a GPU budget and there is no GPU here"
    return device, reason


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
        shape, shape_source = DatasetShape.of(_load_dataset(config)), "loaded"
    torch_device, reason = _planning_device(device, gpu_mem)
    plan, record = make_plan(config, shape, torch_device, gpu_mem, allow_checkpointing=allow_checkpointing)
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


def _initial_manifest(config: DistillConfig, dataset: ImageDataset, device: torch.device, reason: str,
                      checkpoint_every: int, parent: str | None,
                      plan_record: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": "ncfm-synset",
        "config": config.to_dict(),
        "dataset": _dataset_record(config, dataset),
        "seed": config.seed,
        "versions": _software_versions(),
        "device": str(device),
        "device_reason": reason,
        "status": "running",
        "iterations_done": 0,
        "iterations_target": config.iterations,
        "checkpoint_every": checkpoint_every,
        "checkpoint_iteration": None,
        "parent": parent,
        "evals": [],
        **(plan_record or {}),  # plan, flops_per_iteration, gpu_mem
    }


def _check_checkpoint_every(checkpoint_every: int) -> int:
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be a positive integer, got {checkpoint_every!r}")
    return checkpoint_every


@distributed.ranked_job
def distill_job(
    store: Store,
    config: DistillConfig,
    *,
    name: str | None = None,
    device: str = "auto",
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    callback: JobCallback | None = None,
    gpu_mem: str | None = None,
    allow_checkpointing: bool = True,
) -> ArtifactVersion:
    """Distill ``config.dataset`` into a new version of ``name`` (default ``<dataset>-ipc<IPC>``).

    Everything that can be checked before any work is checked first (name, dataset, IPC, factor,
    network, device, the memory plan), so bad input leaves nothing behind. The run is planned
    for ``gpu_mem`` (see :func:`make_plan`; the CUDA allocator is capped at it) and the plan is
    applied to the config before the manifest is written, so a resume replays it. Returns the
    complete version.
    Raises :class:`JobInterrupted` on Ctrl-C (after checkpointing), ``NcfmError`` subclasses for
    bad input, and re-raises anything else after marking the version failed.
    """
    emit = _emitter(callback)
    checkpoint_every = _check_checkpoint_every(checkpoint_every)
    name = store_lib.validate_name(name) if name is not None else default_artifact_name(config.dataset, config.ipc)
    dataset = _load_dataset(config)
    spec = PoolSpec.from_config(config, dataset)
    _validate_job(config, dataset, spec)
    torch_device, reason = resolve_device(device)
    plan, plan_record = make_plan(config, DatasetShape.of(dataset), torch_device, gpu_mem,
                                  allow_checkpointing=allow_checkpointing)
    if plan.budget_bytes is not None and gpu_mem is not None:
        cap_device_memory(torch_device, plan.budget_bytes)
    config = plan.apply(config)
    version = store.create_version(
        name, _initial_manifest(config, dataset, torch_device, reason, checkpoint_every, parent=None,
                                plan_record=plan_record)
    )
    emit({"stage": "created", "artifact": version.ref, "path": str(version.path)})
    _log(emit, f"created {version.ref} at {version.path}")
    _log(emit, _plan_message(plan))
    with _run_lock(version):
        return _distill_into(store, version, config, dataset, spec, torch_device, target=config.iterations,
                             checkpoint_every=checkpoint_every, state=None, emit=emit, gpu_mem=gpu_mem)


def _resolve_any_status(store: Store, ref: str) -> ArtifactVersion:
    """Like ``Store.resolve``, except that a bare name means its newest version whatever its
    status: that is the one a user who pressed Ctrl-C wants to continue."""
    if "@" not in ref and "/" not in ref and not (Path(ref).expanduser() / store_lib.MANIFEST_FILE).is_file():
        versions = store.versions(store_lib.validate_name(ref))
        if versions:
            return versions[-1]
    return store.resolve(ref)


def _resume_device(requested: str, manifest: dict) -> tuple[torch.device, str]:
    recorded = str(manifest.get("device") or "cpu")
    if requested == "auto":
        # A checkpoint's generator state belongs to its device type: prefer the recorded device.
        try:
            return resolve_device(recorded)[0], f"auto: {recorded}, where this run started"
        except ConfigError:
            return resolve_device("auto")
    return resolve_device(requested)


def _config_from_manifest(version: ArtifactVersion, manifest: dict) -> DistillConfig:
    raw = manifest.get("config")
    if not isinstance(raw, dict):
        raise CorruptArtifactError(f"{version.manifest_path}: has no config; this version cannot be resumed")
    try:
        return DistillConfig.from_dict(raw)
    except TypeError as err:
        raise CorruptArtifactError(f"{version.manifest_path}: invalid config ({_one_line(err)})") from None


def _resume_budget(version: ArtifactVersion, manifest: dict, device: torch.device,
                   gpu_mem: str | None) -> tuple[str | None, dict[str, Any]]:
    """(the ``--gpu-mem`` figure a resumed run is capped at, manifest fields to record).

    A resumed run keeps its recorded plan (its config), so its images stay exactly those of an
    uninterrupted run; only the allocator cap may change. Without ``gpu_mem`` the recorded
    figure applies again. A new figure below the plan's estimate is refused (exit 4)."""
    recorded = manifest.get("gpu_mem")
    if gpu_mem is None:
        gpu_mem = recorded if isinstance(recorded, str) else None
    if gpu_mem is None:
        return None, {}
    budget_bytes = parse_memory(gpu_mem, device_total_bytes(device))
    plan = manifest.get("plan") if isinstance(manifest.get("plan"), dict) else {}
    needed = plan.get("estimated_peak_bytes")
    if isinstance(needed, int) and needed > budget_bytes:
        raise BudgetInfeasibleError(
            f"{version.ref} was planned to need {format_bytes(needed)} and a resumed run keeps its plan; "
            f"give --gpu-mem at least {math.ceil(needed / 2**20)}M, or distill again with --gpu-mem {gpu_mem}"
        )
    cap_device_memory(device, budget_bytes)
    return gpu_mem, {"gpu_mem": gpu_mem}


@distributed.ranked_job
def resume_job(
    store: Store,
    ref: str,
    *,
    iterations: int | None = None,
    device: str = "auto",
    data_dir: str | None = None,
    callback: JobCallback | None = None,
    gpu_mem: str | None = None,
) -> ArtifactVersion:
    """Continue a distillation.

    An unfinished version (running but dead, failed, interrupted) continues in place from its
    checkpoint (from scratch if it has none) to its target, or to ``iterations`` if given. A
    complete version with ``iterations`` above its count is extended into a NEW version whose
    ``parent`` is the old one. A complete version with nothing to do is returned unchanged (a
    warning event says so). ``data_dir`` overrides where the dataset is read; its fingerprint
    must match the manifest's. The recorded memory plan is replayed as it is; ``gpu_mem``
    (default: the recorded ``--gpu-mem``) only caps the allocator (see :func:`_resume_budget`).
    Returns the version that holds the result.
    """
    emit = _emitter(callback)
    if iterations is not None and (isinstance(iterations, bool) or iterations < 0):
        raise ConfigError(f"--iterations must be >= 0, got {iterations!r}")
    version = _resolve_any_status(store, ref)
    manifest = version.manifest()
    config = _config_from_manifest(version, manifest)
    done = int(manifest.get("iterations_done") or 0)
    complete = manifest.get("status") == "complete"

    if iterations is not None and iterations < done:
        raise ConfigError(f"{version.ref} already has {done} iterations; --iterations must be at least that")
    if complete and (iterations is None or iterations == done):
        _log(emit, f"{version.ref} is already complete at {done} iterations; "
                   f"pass --iterations N (N > {done}) to continue it into a new version", level="warning")
        return version

    dataset = _load_dataset(config, data_dir)
    _check_fingerprint(version, manifest, dataset)
    torch_device, reason = _resume_device(device, manifest)
    checkpoint_every = _check_checkpoint_every(int(manifest.get("checkpoint_every") or DEFAULT_CHECKPOINT_EVERY))
    recorded_device = str(manifest.get("device") or "cpu")
    if version.checkpoint_path.exists() and torch.device(recorded_device).type != torch_device.type:
        raise ConfigError(
            f"{version.ref} was checkpointed on {recorded_device}; resume it with --device {recorded_device} "
            f"(random-number states do not carry across device types)"
        )
    gpu_mem, budget_record = _resume_budget(version, manifest, torch_device, gpu_mem)
    plan_record = {key: manifest[key] for key in ("plan", "flops_per_iteration", "gpu_mem") if key in manifest}
    plan_record.update(budget_record)

    if complete:
        if not version.checkpoint_path.exists():
            raise NotFoundError(f"{version.checkpoint_path}: file not found; cannot extend {version.ref} without it")
        state = _load_distiller_state(version)
        target = int(iterations)
        config = config.replace(iterations=target)
        spec = PoolSpec.from_config(config, dataset)
        _validate_job(config, dataset, spec)
        new_manifest = _initial_manifest(config, dataset, torch_device, reason, checkpoint_every, parent=version.ref,
                                         plan_record=plan_record)
        new_manifest.update(iterations_done=done, checkpoint_iteration=done)
        child = store.create_version(version.name, new_manifest)
        # The child starts with a copy of the parent's checkpoint, so it can itself be resumed
        # even if it dies before writing a checkpoint of its own.
        store_lib.atomic_write_bytes(child.checkpoint_path, version.checkpoint_path.read_bytes())
        emit({"stage": "created", "artifact": child.ref, "path": str(child.path)})
        _log(emit, f"extending {version.ref} from {done} to {target} iterations as {child.ref}")
        with _run_lock(child):
            return _distill_into(store, child, config, dataset, spec, torch_device, target=target,
                                 checkpoint_every=checkpoint_every, state=state, emit=emit, gpu_mem=gpu_mem)

    target = int(iterations) if iterations is not None else int(manifest.get("iterations_target") or config.iterations)
    if target != config.iterations:
        config = config.replace(iterations=target)
    spec = PoolSpec.from_config(config, dataset)
    _validate_job(config, dataset, spec)
    with _run_lock(version):
        # Read the checkpoint only once we own the version: before, a live run could still replace it.
        state = _load_distiller_state(version) if version.checkpoint_path.exists() else None
        store.update_manifest(version, config=config.to_dict(), device=str(torch_device), device_reason=reason,
                              **budget_record)
        if state is None:
            _log(emit, f"{version.ref} has no checkpoint; starting it again from iteration 0", level="warning")
            store.update_manifest(version, iterations_done=0, checkpoint_iteration=None)
        return _distill_into(store, version, config, dataset, spec, torch_device, target=target,
                             checkpoint_every=checkpoint_every, state=state, emit=emit, gpu_mem=gpu_mem)


def _load_distiller_state(version: ArtifactVersion) -> dict:
    state = store_lib.load_state(version.checkpoint_path)
    if not isinstance(state, dict) or "iteration" not in state or "images" not in state:
        raise CorruptArtifactError(f"{version.checkpoint_path}: not a distiller state; restore or delete this file")
    return state


# ----------------------------------------------------------------------------- synthetic sets


@dataclass(frozen=True)
class SyntheticSet:
    """A loaded ``synset.safetensors``: stored images (M, C, H, W) float32 in [0, 1], labels (M,)."""

    images: Tensor
    labels: Tensor
    factor: int
    ipc: int
    class_names: tuple[str, ...]
    path: Path

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_synset(path: Path) -> SyntheticSet:
    """Load and validate a synthetic set. ``NotFoundError`` if the file is missing; anything
    else wrong (not safetensors, truncated, wrong tensors, shapes, dtypes, metadata, values)
    is a one-line ``CorruptArtifactError`` naming the file."""
    path = Path(path)
    tensors, meta = store_lib.load_tensors(
        path, {"images": ((None, None, None, None), torch.float32), "labels": ((None,), torch.int64)}
    )

    def corrupt(reason: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{path}: {reason}; restore or delete this file")

    if meta.get("format") != SYNSET_FORMAT:
        raise corrupt(f"not an ncfm synthetic set (format {meta.get('format')!r}, expected {SYNSET_FORMAT!r})")
    try:
        numbers = {key: int(meta[key]) for key in ("factor", "ipc", "num_classes", "image_size", "channels")}
        class_names = json.loads(meta["class_names"])
    except (KeyError, ValueError) as err:
        raise corrupt(f"missing or malformed metadata ({_one_line(err)})") from None
    if not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
        raise corrupt("metadata class_names is not a list of strings")
    if len(class_names) != numbers["num_classes"] or min(numbers.values()) < 1:
        raise corrupt("inconsistent metadata (class count, factor or IPC)")
    images, labels = tensors["images"], tensors["labels"]
    expected_shape = (numbers["num_classes"] * numbers["ipc"], numbers["channels"],
                      numbers["image_size"], numbers["image_size"])
    if tuple(images.shape) != expected_shape:
        raise corrupt(f"tensor 'images' has shape {tuple(images.shape)}, expected {expected_shape}")
    if tuple(labels.shape) != (expected_shape[0],):
        raise corrupt(f"tensor 'labels' has shape {tuple(labels.shape)}, expected ({expected_shape[0]},)")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= numbers["num_classes"]):
        raise corrupt(f"labels outside [0, {numbers['num_classes']})")
    if not bool(torch.isfinite(images).all()):
        raise corrupt("images contain NaN or infinity")
    if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise corrupt("pixel values outside [0, 1]")
    return SyntheticSet(images, labels, numbers["factor"], numbers["ipc"], tuple(class_names), path)


def _complete_synset(version: ArtifactVersion, manifest: dict) -> SyntheticSet:
    if manifest.get("status") != "complete":
        raise NotFoundError(
            f"{version.ref} is {manifest.get('status', 'unknown')}, so it has no synthetic set yet; "
            f"finish it with `ncfm resume {version.ref}`"
        )
    return load_synset(version.synset_path)


# ----------------------------------------------------------------------------- eval

BASELINE_KINDS = ("random", "full")
BASELINE_FORMAT = "ncfm-baseline/1"
BASELINES_DIR = "baselines"
"""Full-data baselines are cached as ``<store root>/baselines/<baseline_cache_key>.json``."""
# Kept in the cache file for provenance and validation; the reported baseline leaves them out
# (its protocol is the synthetic set's, shown once).
_CACHE_ONLY_FIELDS = ("format", "key", "dataset_fingerprint", "versions", "protocol")
SOFT_LABEL_LOSS = "T^2 * KL(softmax(teacher / T) || softmax(student / T)) on each augmented batch"


def _check_baselines(baselines: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(name.strip().lower() for name in baselines))
    unknown = [name for name in names if name not in BASELINE_KINDS]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r}; choose random and/or full, e.g. --baseline random")
    return names


def _check_models(eval_config: EvalConfig, models: Sequence[str], dataset: ImageDataset) -> list[str]:
    """Lower-cased, de-duplicated model names; each is built once so that an unknown name or a
    batched repeat mode it cannot honour fails before anything trains."""
    names = list(dict.fromkeys(name.strip().lower() for name in models))
    if not names:
        raise ConfigError("name at least one model to evaluate, e.g. --model convnet")
    for name in names:
        with torch.random.fork_rng(devices=[]):  # a throwaway init must not move the global RNG
            net = build_eval_network(dataclasses.replace(eval_config, model=name), dataset)
        if eval_config.repeat_mode == "batched" and not can_stack(net):
            raise ConfigError(
                f"{name} has batch norm or dropout and cannot train its repeats batched; "
                "use --repeat-mode auto or sequential"
            )
    return names


def _result_record(result: EvalResult, protocol_extra: dict[str, Any]) -> dict[str, Any]:
    """An :class:`EvalResult` as it is reported: ``accuracy {mean, std, runs}`` plus how it was made."""
    flat = result.to_dict()
    record: dict[str, Any] = {
        "accuracy": {"mean": float(result.mean), "std": float(result.std), "runs": [float(r) for r in result.runs]},
        "seconds": float(result.seconds),
        "seeds": list(result.seeds),
        "training": result.training,
        "train_set": dict(result.train_set),
        "protocol": {**result.protocol, **protocol_extra},
    }
    if "best_over_epochs_test_acc" in flat:
        record["best_over_epochs_test_acc"] = flat["best_over_epochs_test_acc"]
    return record


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _validated_baseline(cached: dict, key: str, protocol: dict[str, Any]) -> dict[str, Any]:
    """``cached`` if it is the full baseline ``key`` for ``protocol``, else ``ValueError(reason)``."""
    if cached.get("format") != BASELINE_FORMAT:
        raise ValueError(f"format {cached.get('format')!r}, expected {BASELINE_FORMAT!r}")
    if cached.get("key") != key:
        raise ValueError(f"it holds baseline {cached.get('key')!r}")
    # Execution-only fields (how the repeats were scheduled) do not change the result.
    comparable = {k: v for k, v in json.loads(json.dumps(protocol)).items() if k != "repeat_mode"}
    stored = cached.get("protocol")
    if not isinstance(stored, dict) or {k: v for k, v in stored.items() if k != "repeat_mode"} != comparable:
        raise ValueError("its protocol differs from the requested one")
    accuracy_block = cached.get("accuracy")
    runs = accuracy_block.get("runs") if isinstance(accuracy_block, dict) else None
    if not isinstance(runs, list) or len(runs) != protocol["repeats"] or not all(_is_fraction(r) for r in runs):
        raise ValueError(f"accuracy.runs is not a list of {protocol['repeats']} fractions in [0, 1]")
    mean, std = accuracy_block.get("mean"), accuracy_block.get("std")
    expected_std = statistics.pstdev(runs) if len(runs) > 1 else 0.0
    if not (_is_fraction(mean) and _is_fraction(std) and abs(mean - statistics.fmean(runs)) <= 1e-9
            and abs(std - expected_std) <= 1e-9):
        raise ValueError("accuracy.mean / accuracy.std do not match accuracy.runs")
    return cached


def _full_baseline(
    store: Store,
    dataset: ImageDataset,
    model_config: EvalConfig,
    protocol_extra: dict[str, Any],
    device: torch.device,
    teacher: nn.Module | None,
    emit: JobCallback,
) -> dict[str, Any]:
    """The full-data baseline of ``model_config``: from the store's cache if a valid entry exists,
    else trained and cached (atomic write). A corrupt cache entry is a warning and is recomputed."""
    protocol = {**model_config.to_dict(), **protocol_extra}
    key = baseline_cache_key(dataset.fingerprint, protocol, model_config.model)
    path = store.root / BASELINES_DIR / f"{key}.json"
    if path.exists():
        try:
            cached = _validated_baseline(store_lib.read_json(path), key, protocol)
        except (NcfmError, ValueError, OSError) as err:
            _log(emit, f"baseline full: ignoring the cache file {path} ({_one_line(err)}); recomputing it", "warning")
        else:
            _log(emit, f"baseline full: reusing the cached result for {model_config.model} ({path.name})")
            record = {k: v for k, v in cached.items() if k not in _CACHE_ONLY_FIELDS}
            return {**record, "cached": True, "cache_key": key}

    _log(emit, f"baseline full: training {model_config.repeats} x {model_config.model} on all "
               f"{dataset.num_train} training images for {model_config.epochs} epochs (cached afterwards)")
    result = evaluate_full_baseline(dataset, model_config, device, teacher=teacher,
                                    on_repeat=_repeat_reporter(emit, "full", model_config),
                                    evaluator=distributed.job_evaluator())
    record = {**_result_record(result, protocol_extra), "created": _utc_now()}
    try:
        store_lib.write_json(path, {**record, "format": BASELINE_FORMAT, "key": key,
                                    "dataset_fingerprint": dataset.fingerprint, "versions": _software_versions()})
    except OSError as err:  # a read-only store still gets its result, just not cached
        _log(emit, f"baseline full: could not cache the result at {path} ({_one_line(err)})", "warning")
    record = {k: v for k, v in record.items() if k not in _CACHE_ONLY_FIELDS}
    return {**record, "cached": False, "cache_key": key}


def _eval_event(emit: JobCallback, what: str, model: str, repeat: int, repeats: int, accuracy: float) -> None:
    emit({"stage": "eval", "what": what, "model": model, "repeat": repeat, "repeats": repeats,
          "accuracy": float(accuracy)})


def _repeat_reporter(emit: JobCallback, what: str, config: EvalConfig) -> Callable[[int, float], None]:
    """The ``on_repeat`` callback of one evaluation: an ``eval`` event per trained network."""
    return lambda repeat, accuracy: _eval_event(emit, what, config.model, repeat, config.repeats, accuracy)


def _teacher(
    store: Store,
    config: DistillConfig,
    dataset: ImageDataset,
    eval_config: EvalConfig,
    device: torch.device,
    emit: JobCallback,
) -> tuple[nn.Module, dict[str, Any]]:
    """Pool member ``eval_config.teacher_member`` of the artifact's own extractor pool (cached
    in the store, trained again if the cache is gone) and a record of it."""
    spec = PoolSpec.from_config(config, dataset)
    member = eval_config.teacher_member
    if member >= spec.size:
        raise ConfigError(f"--teacher-member {member} is not in this artifact's pool of {spec.size}; "
                          f"use 0..{spec.size - 1}")
    key = spec.key()
    cache_dir = store.pool_dir(key)
    if not (cache_dir / "pool.safetensors").exists():
        _log(emit, f"soft labels: training the artifact's pool ({spec.size} network(s), {spec.epochs} epoch(s) "
                   f"each) for its teacher ({key})")

    def on_progress(pool_member: int, epoch: int, loss: float) -> None:
        emit({"stage": "pool", "member": pool_member, "members": spec.size, "epoch": epoch,
              "epochs": spec.epochs, "loss": float(loss)})

    started = time.perf_counter()
    pool, from_cache = distributed.job_pool(spec, dataset, device, cache_dir=cache_dir, on_progress=on_progress)
    teacher = teacher_from_pool(pool, member, device)
    info = {
        "pool": key,
        "member": member,
        "network": spec.network,
        "pool_cached": bool(from_cache),
        "test_accuracy": float(pool.test_accuracy[member]),
        "temperature": eval_config.temperature,
        "loss": SOFT_LABEL_LOSS,
        "seconds": time.perf_counter() - started,
    }
    _log(emit, f"soft labels: teacher is pool member {member} ({spec.network}, test accuracy "
               f"{100 * info['test_accuracy']:.2f}%), temperature {eval_config.temperature}")
    return teacher, info


def _model_entry(
    store: Store,
    dataset: ImageDataset,
    synthetic: EvalResult,
    model_config: EvalConfig,
    baselines: Sequence[str],
    ipc: int,
    factor: int,
    baseline_seed: int,
    protocol_extra: dict[str, Any],
    device: torch.device,
    teacher: nn.Module | None,
    emit: JobCallback,
) -> dict[str, Any]:
    """One model's synthetic result, its requested baselines and the fair metrics they allow."""
    entry = {"model": model_config.model, **_result_record(synthetic, protocol_extra)}
    found: dict[str, dict[str, Any]] = {}
    timings = {"synthetic": float(synthetic.seconds)}
    if "random" in baselines:
        started = time.perf_counter()
        per_class = ipc * factor * factor
        _log(emit, f"baseline random: training {model_config.repeats} x {model_config.model} on {ipc} random "
                   f"real image(s) per class (subset seed {baseline_seed})")
        result = evaluate_random_baseline(dataset, ipc, model_config, device, baseline_seed, teacher=teacher,
                                          on_repeat=_repeat_reporter(emit, "random", model_config),
                                          evaluator=distributed.job_evaluator())
        record = _result_record(result, protocol_extra)
        del record["protocol"]  # the synthetic set's protocol, repeated
        # Multi-formation stores factor^2 tiles per image; the fair comparison is the same storage.
        subset = f"{ipc} real image{'s' if ipc != 1 else ''} per class (same storage as the synthetic set"
        subset += f", which decodes into {per_class} per class)" if factor > 1 else ")"
        found["random"] = {**record, "subset": subset, "subset_seed": baseline_seed}
        timings["random"] = time.perf_counter() - started
    if "full" in baselines:
        started = time.perf_counter()
        found["full"] = _full_baseline(store, dataset, model_config, protocol_extra, device, teacher, emit)
        timings["full"] = time.perf_counter() - started  # about 0 when it came from the cache
    entry["baselines"] = found
    entry["timings"] = timings
    entry["metrics"] = fair_metrics(
        synthetic.mean,
        found["random"]["accuracy"]["mean"] if "random" in found else None,
        found["full"]["accuracy"]["mean"] if "full" in found else None,
    )
    return entry


@distributed.ranked_job
def eval_job(
    store: Store,
    ref: str,
    eval_config: EvalConfig,
    device: str = "auto",
    callback: JobCallback | None = None,
    *,
    data_dir: str | None = None,
    models: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
    baseline_seed: int = 0,
) -> dict[str, Any]:
    """Train ``eval_config.repeats`` fresh networks on the synthetic set of ``ref`` and test them
    on the real test set, for each network in ``models`` (default ``[eval_config.model]``), with
    the ``baselines`` asked for ("random": a seeded random real subset of the synthetic set's
    stored IPC; "full": the whole training set, cached under ``<store>/baselines/``).

    With ``eval_config.soft_labels`` the teacher is member ``teacher_member`` of the artifact's
    own pool, used for the synthetic set and both baselines alike. Returns (and appends to
    the manifest's ``evals``, less ``artifact``/``path``)::

        {artifact, path, model, protocol, accuracy {mean, std, runs}, seeds, training, train_set,
         baselines {random: {...}, full: {..., cached}}, metrics {ior, hlr, lrs}, teacher,
         models {name: {...}} (only with several models), seconds (whole job), created, device,
         world_size}

    Under torchrun (:func:`ncfm_core.distributed.ranked_job`) rank 0 runs this and the repeats
    of every evaluation are spread over the ranks; the other ranks return rank 0's record.

    The top-level results are those of the first model. Accuracies and metrics are fractions.
    """
    emit = _emitter(callback)
    started = time.perf_counter()
    baselines = _check_baselines(baselines)
    version = store.resolve(ref)
    manifest = version.manifest()
    synset = _complete_synset(version, manifest)
    config = _config_from_manifest(version, manifest)
    dataset = _load_dataset(config, data_dir)
    _check_fingerprint(version, manifest, dataset)
    if synset.num_classes != dataset.num_classes or tuple(synset.images.shape[1:]) != (
        dataset.channels, dataset.image_size, dataset.image_size
    ):
        raise CorruptArtifactError(f"{synset.path}: does not match dataset '{config.dataset}'; restore or delete this file")
    model_names = _check_models(eval_config, models or [eval_config.model], dataset)
    eval_config = dataclasses.replace(eval_config, model=model_names[0])
    torch_device, _ = resolve_device(device)

    teacher, teacher_info, protocol_extra = None, None, {}
    if eval_config.soft_labels:
        teacher, teacher_info = _teacher(store, config, dataset, eval_config, torch_device, emit)
        # A soft-label result depends on the teacher's weights: name them in the protocol.
        protocol_extra = {"teacher_pool": teacher_info["pool"]}

    _log(emit, f"evaluating {version.ref}: {eval_config.repeats} x {', '.join(model_names)} for "
               f"{eval_config.epochs} epochs on {torch_device}")
    synthetic = evaluate_models(
        synset.images, synset.labels, dataset, eval_config, torch_device, model_names, factor=synset.factor,
        teacher=teacher, evaluator=distributed.job_evaluator(),
        on_repeat=lambda model, repeat, accuracy: _eval_event(emit, "synthetic", model, repeat,
                                                              eval_config.repeats, accuracy),
    )
    entries = {
        name: _model_entry(store, dataset, result, dataclasses.replace(eval_config, model=name), baselines,
                           synset.ipc, synset.factor, baseline_seed, protocol_extra, torch_device, teacher, emit)
        for name, result in synthetic.items()
    }
    first = entries[model_names[0]]
    record: dict[str, Any] = dict(first)
    if len(entries) > 1:
        record["models"] = entries
    total = time.perf_counter() - started
    record.update(
        teacher=teacher_info,
        seconds=total,  # the whole job; each model's own training time is in its timings
        timings={**first["timings"], "teacher": None if teacher_info is None else teacher_info["seconds"],
                 "total": total},
        created=_utc_now(),
        device=str(torch_device),
        world_size=distributed.current().world_size,
    )
    store.append_eval(version, record)
    return {"artifact": version.ref, "path": str(version.path), **record}


# ----------------------------------------------------------------------------- export


def export_job(
    store: Store,
    ref: str,
    fmt: str,
    out_dir: Path | str,
    *,
    decoded: bool = False,
) -> dict[str, Any]:
    """Write the synthetic set of ``ref`` under ``out_dir`` in format ``fmt`` (see
    ``ncfm_core.export``). Returns ``{artifact, path, format, decoded, out, files}``."""
    version = store.resolve(ref)
    synset = _complete_synset(version, version.manifest())
    files = export_synset(synset.images, synset.labels, synset.class_names, Path(out_dir), fmt,
                          factor=synset.factor, decoded=decoded)
    return {
        "artifact": version.ref,
        "path": str(version.path),
        "format": fmt,
        "decoded": decoded,
        "out": str(Path(out_dir).absolute()),
        "files": [str(f) for f in files],
    }


# ----------------------------------------------------------------------------- inspect, list


def _file_sizes(directory: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and not path.name.endswith(".tmp"):
            sizes[relative.as_posix()] = path.stat().st_size
    return sizes


def inspect_job(store: Store, ref: str) -> dict[str, Any]:
    """The manifest of ``ref`` plus ``artifact`` (name@vN), ``path`` and ``file_sizes``
    (path relative to the version directory -> bytes)."""
    version = store.resolve(ref)
    result = dict(version.manifest())
    result.update(artifact=version.ref, path=str(version.path), file_sizes=_file_sizes(version.path))
    return result


def _last_accuracy(manifest: dict) -> float | None:
    evals = manifest.get("evals")
    if not isinstance(evals, list) or not evals or not isinstance(evals[-1], dict):
        return None
    mean = (evals[-1].get("accuracy") or {}).get("mean")
    return float(mean) if isinstance(mean, (int, float)) and math.isfinite(mean) else None


def list_job(store: Store) -> dict[str, Any]:
    """Every version in the store: ``{"artifacts": [row, ...], "warnings": [str, ...]}``; a row is
    ``{artifact, name, version, status, dataset, ipc, iterations_done, iterations_target,
    accuracy (last eval's mean or None), evals, created, path}``. Unreadable versions become
    warnings instead of errors."""
    found, warnings = store.scan()
    rows = []
    for version, manifest in found:
        config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        if not config:
            warnings.append(f"{version.ref}: {version.manifest_path} has no config; not an ncfm distillation?")
        evals = manifest.get("evals")
        rows.append({
            "artifact": version.ref,
            "name": version.name,
            "version": version.version,
            "status": str(manifest.get("status", "unknown")),
            "dataset": config.get("dataset"),
            "ipc": config.get("ipc"),
            "iterations_done": manifest.get("iterations_done"),
            "iterations_target": manifest.get("iterations_target"),
            "accuracy": _last_accuracy(manifest),
            "evals": len(evals) if isinstance(evals, list) else 0,
            "created": manifest.get("created"),
            "path": str(version.path),
        })
    return {"store": str(store.root), "artifacts": rows, "warnings": warnings}


def artifact_summary(version: ArtifactVersion) -> dict[str, Any]:
    """What ``ncfm distill`` / ``ncfm resume`` report: ``{artifact, path, status, iterations,
    iterations_target, seconds, peak_memory_bytes, peak_memory_source, peak_memory, plan,
    flops_per_iteration, dataset, ipc, parent, pool_cached}`` (``peak_memory``, ``plan`` and
    ``flops_per_iteration`` are None for versions made before memory plans)."""
    manifest = version.manifest()
    timings = manifest.get("timings") if isinstance(manifest.get("timings"), dict) else {}
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    pool = manifest.get("pool") if isinstance(manifest.get("pool"), dict) else {}
    return {
        "artifact": version.ref,
        "path": str(version.path),
        "status": manifest.get("status"),
        "iterations": manifest.get("iterations_done"),
        "iterations_target": manifest.get("iterations_target"),
        "seconds": timings.get("seconds"),
        "peak_memory_bytes": manifest.get("peak_memory_bytes"),
        "peak_memory_source": manifest.get("peak_memory_source"),
        "peak_memory": manifest.get("peak_memory"),
        "plan": manifest.get("plan"),
        "flops_per_iteration": manifest.get("flops_per_iteration"),
        "dataset": config.get("dataset"),
        "ipc": config.get("ipc"),
        "parent": manifest.get("parent"),
        "pool_cached": pool.get("cached"),
    }


__all__ = [
    "BASELINE_FORMAT",
    "BASELINE_KINDS",
    "BASELINES_DIR",
    "DEFAULT_CHECKPOINT_EVERY",
    "JobInterrupted",
    "SyntheticSet",
    "artifact_summary",
    "default_artifact_name",
    "distill_job",
    "eval_job",
    "export_job",
    "inspect_job",
    "list_job",
    "load_synset",
    "make_plan",
    "plan_job",
    "resume_job",
]
