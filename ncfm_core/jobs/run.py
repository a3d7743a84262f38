"""One distillation run into a version, shared by ``distill`` and ``resume``: the run lock,
the pool, the loop with its checkpoints, the results, and what a failure leaves behind.

Any failure is recorded in the version's record (status "failed", the one-line error) and
re-raised; Ctrl-C or SIGTERM is recorded as status "interrupted" after a checkpoint and becomes
:class:`~ncfm_core.jobs.events.JobInterrupted`.

Out of memory: the loop rolls the iteration back (``ncfm_core.retry``); the policy is
``ncfm_core.jobs.oom``: the next smaller plan of the planner's path, one log line, the change
recorded (``plan_changes``; ``config`` and ``plan`` become the smaller plan's, so a resume replays
it), and the same iteration again. With no smaller plan, or in the optimizer step, or under
torchrun (one rank cannot change its plan while the others wait for it in a collective), the run
stops with exit code 4, its last checkpoint kept."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import filelock
import torch

from ncfm_core import augment, parallel
from ncfm_core import store as store_lib
from ncfm_core.config import DistillConfig
from ncfm_core.data import ImageDataset, check_ipc
from ncfm_core.data.registry import check_evaluable
from ncfm_core.devices import (
    JobDevice,
    MemoryBudget,
    measure_peak,
    reset_peak,
)
from ncfm_core.distill import Distiller, LoopHooks
from ncfm_core.errors import (
    BudgetInfeasibleError,
    ConfigError,
    DivergedError,
    NcfmError,
    one_line,
)
from ncfm_core.jobs.common import (
    dataset_record,
    software_versions,
)
from ncfm_core.jobs.events import (
    JobCallback,
    JobInterrupted,
    interrupt_between_iterations,
    log,
    signal_of,
)
from ncfm_core.jobs.oom import memory_fit, out_of_memory_error, step_down_hook
from ncfm_core.memory_model import Plan
from ncfm_core.pool import PoolSpec
from ncfm_core.retry import OUT_OF_MEMORY
from ncfm_core.store import (
    ArtifactVersion,
    EvalRequest,
    PeakMemoryRecord,
    PlanAsked,
    PlanRecord,
    PoolRecord,
    ProcessRecord,
    RunRecord,
    SamplerRecord,
    SessionTiming,
    Store,
    SynsetRecord,
    Timings,
    utc_now,
)
from ncfm_core.store.synset import save_sampler, save_synset
from ncfm_core.synset import check_factor

DEFAULT_CHECKPOINT_EVERY = 100
"""Iterations between checkpoints: frequent enough that a killed run loses little, rare
enough that writing the optimiser states (3x the images) costs little next to the loop."""


def _peak_memory(device: torch.device) -> tuple[PeakMemoryRecord | None, int | None, str]:
    """(``measure_peak(device)`` as recorded, or None; the figure to report; what it measures, a key
    of ``store.record.PEAK_MEMORY_SOURCES``).

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
    return PeakMemoryRecord.from_json(peak.to_dict()), peak.peak_bytes, source


def validate_job(config: DistillConfig, dataset: ImageDataset) -> PoolSpec:
    """Cheap checks that would otherwise fail only after the pool is trained; returns the
    run's pool spec, built once here for the whole job."""
    check_evaluable(dataset)
    spec = PoolSpec.from_config(config, dataset)
    check_ipc(dataset, config.ipc)
    check_factor(dataset.image_size, config.factor)
    augment.parse_strategy(config.dsa_strategy, allow_flip=dataset.allow_flip)
    spec.build()  # unknown network, depth or norm
    return spec


@contextlib.contextmanager
def run_lock(version: ArtifactVersion) -> Iterator[None]:
    lock = filelock.FileLock(str(version.run_lock_path))
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


def run_is_alive(version: ArtifactVersion) -> bool | None:
    """Whether a process is distilling into ``version`` right now, told by its run lock: True
    (held), False (free: a version still marked "running" was left by a process that died, e.g.
    SIGKILL or a power loss), None (cannot tell, e.g. a read-only store)."""
    lock = filelock.FileLock(str(version.run_lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    except OSError:
        return None
    lock.release()
    return False


def resume_command(store: Store, version: ArtifactVersion) -> str:
    """The command line that continues ``version`` (with ``--store`` unless ``store`` is the default one)."""
    flag = "" if store.root == store_lib.store_root() else f"--store {shlex.quote(str(store.root))} "
    return f"ncfm {flag}resume {version.ref}"


def shown_status(store: Store, version: ArtifactVersion, record: RunRecord) -> tuple[str, str | None]:
    """(status to show, hint or None), what ``ls``, ``inspect`` and their JSON say. An interrupted
    run, and a "running" version no live process holds (its process died without a word), are
    shown as "interrupted", with a hint: where it stopped and the command that continues it."""
    command = resume_command(store, version)
    if record.status == "interrupted":
        if record.checkpoint_iteration is None:
            return "interrupted", f"stopped before its first checkpoint; `{command}` starts it again"
        return "interrupted", (f"stopped with a checkpoint at iteration {record.checkpoint_iteration}; continue it "
                               f"with `{command}`")
    if record.status != "running" or run_is_alive(version) is not False:
        return record.status, None
    return "interrupted", (f"marked running, but no process is distilling it (the one that did died); continue it "
                           f"with `{command}`")


@dataclass
class _Session:
    """One process's stretch of work on a version (a distill, or one resume)."""

    first_iteration: int = 0  # where it started
    started: float = field(default_factory=time.perf_counter)
    pool_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    checkpoint_iteration: int | None = None  # iteration of the newest checkpoint on disk
    plan: Plan | None = None  # the plan in force (a smaller one after an out-of-memory step-down)
    device: torch.device | None = None
    looping: bool = False  # the loop has started: the peak since then is the loop's
    compile_seconds: float = 0.0  # the distiller compiling its networks (kernels compile=on)


def _save_checkpoint(store: Store, version: ArtifactVersion, distiller: Distiller, session: _Session) -> None:
    state = distiller.state_dict()
    check_finite(version, distiller, session, state)  # a diverged state never replaces the last good one
    digest = store_lib.save_state(version.checkpoint_path, state)
    session.checkpoint_iteration = distiller.iteration
    store.update_record(
        version,
        lambda record: record.with_hashes({store_lib.CHECKPOINT_RELPATH: digest}),
        iterations_done=distiller.iteration,
        checkpoint_iteration=distiller.iteration,
        loss_curve=_loss_curve(distiller),
    )


def _loss_curve(distiller: Distiller) -> tuple[tuple[int, float], ...]:
    return tuple((int(iteration), float(loss)) for iteration, loss in distiller.loss_curve)


def _diverged(version: ArtifactVersion, session: _Session, iteration: int, what: str) -> DivergedError:
    if session.checkpoint_iteration is not None:
        kept = f"the last good checkpoint (iteration {session.checkpoint_iteration}) is kept"
    else:
        kept = "there is no good checkpoint yet"
    return DivergedError(
        f"{version.ref} diverged at iteration {iteration}: {what}; {kept}; distill again with a lower --lr "
        f"(or another --seed)",
        iteration=iteration,
    )


def check_loss(version: ArtifactVersion, session: _Session, event: dict[str, Any]) -> None:
    """A loss read back from the device must be finite (None: not read yet, on accelerators)."""
    loss = event.get("loss")
    if loss is not None and not math.isfinite(float(loss)):
        raise _diverged(version, session, int(event["iteration"]), f"the loss is {float(loss)}")


def check_finite(version: ArtifactVersion, distiller: Distiller, session: _Session,
                 state: dict[str, Any] | None = None) -> None:
    """Before a checkpoint or the result is written: the images and the loss curve are finite,
    and so are the losses of ``state`` not read back yet (accelerators read them lazily)."""
    pending = (state or {}).get("pending_losses")
    if isinstance(pending, torch.Tensor) and not bool(torch.isfinite(pending).all()):
        raise _diverged(version, session, distiller.iteration, "a loss not read back yet is not finite")
    if not bool(torch.isfinite(distiller.images.detach()).all()):
        raise _diverged(version, session, distiller.iteration, "the synthetic images hold NaN or infinity")
    bad = [point for point in distiller.loss_curve if not math.isfinite(float(point[1]))]
    if bad:
        raise _diverged(version, session, int(bad[0][0]), f"the loss is {float(bad[0][1])}")


def _obtain_pool(store: Store, version: ArtifactVersion, spec: PoolSpec, dataset: ImageDataset,
                 device: torch.device, emit: JobCallback, session: _Session):
    key = spec.key()
    cache_dir = store.pool_dir(key)
    cached = (cache_dir / store_lib.POOL_FILE).exists()
    if cached:
        log(emit, f"pool: reusing {spec.size} cached feature extractor(s) ({key})")
    else:
        log(emit, f"pool: training {spec.size} feature extractor(s) for {spec.epochs} epoch(s) each ({key})")

    def on_progress(member: int, epoch: int, loss: float) -> None:
        emit({"stage": "pool", "member": member, "members": spec.size, "epoch": epoch,
              "epochs": spec.epochs, "loss": float(loss)})

    started = time.perf_counter()
    pool, from_cache = parallel.distributed_load_or_train_pool(spec, dataset, device, cache_dir=cache_dir,
                                                                  on_progress=on_progress)
    session.pool_seconds = time.perf_counter() - started
    store.update_record(version, pool=PoolRecord(
        key=key, cached=bool(from_cache), size=spec.size, epochs=spec.epochs, seconds=session.pool_seconds,
        test_accuracy=tuple(map(float, pool.test_accuracy))))
    return pool


def distill_into(
    store: Store,
    version: ArtifactVersion,
    config: DistillConfig,
    dataset: ImageDataset,
    spec: PoolSpec,
    device: torch.device,
    *,
    checkpoint_every: int,
    state: dict | None,
    emit: JobCallback,
    budget: MemoryBudget,
    plan: Plan | None = None,
    smaller: Sequence[Plan] = (),
) -> ArtifactVersion:
    """Build the pool and the distiller (from ``state`` if given), run the loop
    (:meth:`Distiller.run`) to ``config.iterations`` with checkpoints, then write the results.
    The caller holds the version's run lock and has applied ``plan``'s settings
    (``jobs.plan.apply_run_settings``: the allocator capped at ``budget``, if one was given).
    An iteration that runs out of memory steps down to the next of ``smaller`` (the plans after
    ``plan`` on the planner's path, ``jobs.oom.step_down_hook``); when none is left, the out-of-memory
    error becomes a one-line :class:`BudgetInfeasibleError` (exit 4) naming the budget that
    would have been needed; the last checkpoint stays."""
    target = config.iterations
    pause_at = pause_iteration()
    # A resumed run already has a checkpoint on disk: an interrupt before the first new one
    # must not claim otherwise.
    first = 0 if state is None else int(state["iteration"])
    session = _Session(first_iteration=first, checkpoint_iteration=None if state is None else first, plan=plan,
                       device=device)
    distiller: Distiller | None = None  # set once it holds a whole, consistent state
    reached = first  # the iteration the loop got to, for the session's timing
    try:
        store.update_record(
            version, status="running", error=None, iterations_target=target,
            process=ProcessRecord(pid=os.getpid(), host=socket.gethostname()),
            world_size=parallel.current().world_size,
        )
        # Under torchrun the other ranks join here (ncfm_core.parallel); no-ops in one process.
        parallel.send_order(config, dataset, device, checkpoint_every=checkpoint_every, state=state,
                            backend=None if plan is None else plan.backend)
        pool = _obtain_pool(store, version, spec, dataset, device, emit, session)
        starting = parallel.make_distiller(config, dataset, pool, device, checkpoint_every=checkpoint_every)
        if state is not None:
            starting.load_state_dict(state)
            session.checkpoint_iteration = starting.iteration
            log(emit, f"continuing {version.ref} from iteration {starting.iteration}")
        if starting.iteration > target:
            raise ConfigError(
                f"{version.ref} is already at iteration {starting.iteration}; --iterations must be at least that"
            )
        distiller = starting
        session.compile_seconds = distiller.compile_seconds or 0.0
        for note in distiller.notes:  # e.g. a real draw capped at the class size: said once per run
            log(emit, note)
        log(emit, f"distilling {version.ref}: iterations {distiller.iteration} -> {target} on {device}")
        # The loop's peak, comparable with the plan's estimate (pool training is not in it).
        reset_peak(device)
        session.looping = True

        def progress(event: dict[str, Any]) -> None:
            nonlocal reached
            reached = int(event["iteration"])
            session.step_seconds.append(event["seconds"])
            check_loss(version, session, event)
            emit(event)

        def checkpoint(at: Distiller) -> None:
            _save_checkpoint(store, version, at, session)
            emit({"stage": "checkpoint", "iteration": at.iteration, "path": str(version.checkpoint_path)})
            if at.iteration == pause_at:
                _pause(lambda: interrupt["requested"])

        with interrupt_between_iterations() as interrupt:
            hooks = LoopHooks(progress=progress, checkpoint=checkpoint, stop_requested=lambda: interrupt["requested"],
                              out_of_memory=step_down_hook(store, version, smaller, emit,
                                                           lambda plan: setattr(session, "plan", plan)))
            if not distiller.run(target, checkpoint_every=checkpoint_every, hooks=hooks):
                raise KeyboardInterrupt(interrupt["signal"] or "SIGINT")
            distiller.read_metrics()  # accelerators read losses lazily: the curve needs the last ones
            _finish(store, version, distiller, dataset, device, session)
    except BaseException as err:
        keep = not (distiller is None or distiller.mid_step or isinstance(err, DivergedError))
        if isinstance(err, OUT_OF_MEMORY):
            if keep:  # rolled back to where the iteration started: saved first, so the message names it
                _checkpoint_quietly(store, version, distiller, session)
            err = out_of_memory_error(version.ref, session.checkpoint_iteration, session.plan, budget,
                                      getattr(err, "out_of_memory", None))
        _record_failure(store, version, distiller if keep else None, session, err, reached)
        if isinstance(err, KeyboardInterrupt) and not isinstance(err, JobInterrupted):
            raise JobInterrupted(version, session.checkpoint_iteration, signal_of(err)) from None
        if isinstance(err, BudgetInfeasibleError):
            raise err from None
        raise
    return version


PAUSE_ENV = "NCFM_PAUSE_AFTER_CHECKPOINT"
PAUSE_LIMIT_S = 600.0


def pause_iteration() -> int | None:
    """``$NCFM_PAUSE_AFTER_CHECKPOINT`` as an iteration (None when unset): the run then waits
    after writing its checkpoint at that iteration until it is stopped (Ctrl-C, a kill), at most
    ten minutes. For tests and demonstrations of stopping and resuming: a process stopped there
    stops at a known iteration, however fast or slow the machine is."""
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{PAUSE_ENV}={value!r} is not an iteration number; unset it") from None


def _pause(stop_requested: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not stop_requested() and time.monotonic() < deadline:
        time.sleep(0.02)


def _checkpoint_quietly(store: Store, version: ArtifactVersion, distiller: Distiller, session: _Session) -> None:
    """Checkpoint a consistent state not on disk yet, on a failure path: never hiding its error."""
    if distiller.iteration != session.checkpoint_iteration:
        with contextlib.suppress(Exception):
            _save_checkpoint(store, version, distiller, session)


def _record_failure(store: Store, version: ArtifactVersion, distiller: Distiller | None,
                    session: _Session, err: BaseException, reached: int) -> None:
    """Keep what can be kept; never let bookkeeping hide the original error. A signal leaves the
    version "interrupted" (it continues as if never stopped), anything else "failed"."""
    if distiller is not None:
        _checkpoint_quietly(store, version, distiller, session)
    if isinstance(err, KeyboardInterrupt):
        status = "interrupted"
        message = "interrupted (SIGTERM)" if signal_of(err) == "SIGTERM" else "interrupted (Ctrl-C)"
    else:
        status, message = "failed", f"{type(err).__name__}: {one_line(err)}"
    with contextlib.suppress(Exception):
        peak = _peak_memory(session.device)[0] if session.looping and session.device is not None else None
        store.update_record(version, lambda record: record.replace(
            status=status, error=message, failed=utc_now(),
            timings=_accumulated_timings(record, session, reached, status),
            memory_fit=memory_fit(session.plan, peak)))


def _accumulated_timings(record: RunRecord, session: _Session, reached: int, ended: str) -> Timings:
    """The record's timings plus this session's (see :class:`~ncfm_core.store.Timings`)."""
    return (record.timings or Timings()).after(SessionTiming(
        from_iteration=session.first_iteration,
        to_iteration=reached,
        seconds=time.perf_counter() - session.started,
        pool_seconds=session.pool_seconds,
        seconds_per_iteration_median=statistics.median(session.step_seconds) if session.step_seconds else None,
        ended=ended,
        compile_seconds=session.compile_seconds,
    ))


def _finish(store: Store, version: ArtifactVersion, distiller: Distiller, dataset: ImageDataset,
            device: torch.device, session: _Session) -> None:
    """Write synset, sampler and the final checkpoint, then mark the manifest complete (last, so a
    crash in between leaves a version that is not complete and can be resumed)."""
    config = distiller.config
    check_finite(version, distiller, session)
    images, labels = distiller.synthetic_set()
    digests = {store_lib.SYNSET_FILE: save_synset(
        version.synset_path, images, labels, factor=config.factor, ipc=config.ipc,
        class_names=dataset.class_names, mean=dataset.mean, std=dataset.std)}
    sampler = distiller.sampler_tensors()
    digests[store_lib.SAMPLER_FILE] = save_sampler(version.sampler_path, sampler, config.num_freqs)
    if distiller.iteration != session.checkpoint_iteration:
        digests[store_lib.CHECKPOINT_RELPATH] = store_lib.save_state(version.checkpoint_path, distiller.state_dict())
        session.checkpoint_iteration = distiller.iteration

    peak, peak_bytes, peak_source = _peak_memory(device)
    curve = _loss_curve(distiller)

    def complete(record: RunRecord) -> RunRecord:
        # peak_memory is this session's measurement; peak_memory_bytes the largest over sessions.
        largest = peak_bytes if record.peak_memory_bytes is None or peak_bytes is None \
            else max(peak_bytes, record.peak_memory_bytes)
        return record.with_hashes(digests).replace(
            status="complete",
            error=None,
            iterations_done=distiller.iteration,
            checkpoint_iteration=distiller.iteration,
            finished=utc_now(),
            timings=_accumulated_timings(record, session, distiller.iteration, "complete"),
            peak_memory=peak,
            peak_memory_bytes=largest,
            peak_memory_source=peak_source,
            memory_fit=memory_fit(session.plan, peak),
            loss_curve=curve,
            final_loss=curve[-1][1] if curve else None,
            synset=SynsetRecord(file=store_lib.SYNSET_FILE, stored_images=int(images.shape[0]),
                                shape=tuple(images.shape), factor=config.factor,
                                decoded_images=int(images.shape[0]) * config.factor**2),
            sampler=SamplerRecord(file=store_lib.SAMPLER_FILE, learned=bool(sampler)),
        )

    store.update_record(version, complete)


def initial_record(config: DistillConfig, dataset: ImageDataset, device: JobDevice, checkpoint_every: int,
                   parent: str | None, *, plan: PlanRecord | None, flops_per_iteration: float | None,
                   gpu_mem: str | None, pending_eval: EvalRequest | None = None,
                   plan_asked: PlanAsked | None = None) -> RunRecord:
    """The record a new version starts with (``Store.create_version`` adds name, version, created)."""
    return RunRecord(
        status="running",
        config=config.to_dict(),
        dataset=dataset_record(config, dataset),
        seed=config.seed,
        versions=software_versions(),
        device=str(device.device),
        device_reason=device.reason,
        iterations_target=config.iterations,
        checkpoint_every=checkpoint_every,
        parent=parent,
        plan=plan,
        flops_per_iteration=flops_per_iteration,
        gpu_mem=gpu_mem,
        pending_eval=pending_eval,
        plan_asked=plan_asked,
    )


def check_checkpoint_every(checkpoint_every: int) -> int:
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be a positive integer, got {checkpoint_every!r}")
    return checkpoint_every
