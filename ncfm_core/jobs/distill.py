"""``ncfm distill``: a new version of an artifact, distilled from a dataset."""

from __future__ import annotations

import re

from ncfm_core import parallel
from ncfm_core import store as store_lib
from ncfm_core.config import DistillConfig, validate
from ncfm_core.data import DatasetShape, ImageDataset
from ncfm_core.devices import (
    JobDevice,
    MemoryBudget,
)
from ncfm_core.jobs.common import (
    load_job_dataset,
)
from ncfm_core.jobs.events import JobCallback, emitter, log
from ncfm_core.jobs.plan import apply_run_settings, make_plan, plan_message, step_down_path
from ncfm_core.jobs.run import (
    DEFAULT_CHECKPOINT_EVERY,
    check_checkpoint_every,
    distill_into,
    initial_record,
    run_lock,
    validate_job,
)
from ncfm_core.store import ArtifactVersion, EvalRequest, PlanAsked, PlanRecord, Store


def default_artifact_name(dataset: str, ipc: int) -> str:
    """``<dataset>-ipc<IPC>``; a ``folder:PATH`` dataset becomes ``folder-<last path part>-ipc<IPC>``
    with every character outside the artifact-name charset replaced by ``_``."""
    family, sep, argument = dataset.partition(":")
    last_part = re.split(r"[\\/]", argument.rstrip("/\\"))[-1]  # either separator, any platform
    base = f"{family}-{last_part or 'data'}" if sep else dataset
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).replace("..", "_")
    base = re.sub(r"^[^A-Za-z0-9]+", "", base)[:100] or "dataset"
    return store_lib.validate_name(f"{base}-ipc{ipc}")


@parallel.ranked_job
def distill_job(
    store: Store,
    config: DistillConfig,
    *,
    name: str | None = None,
    device: str | JobDevice = "auto",
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    callback: JobCallback | None = None,
    gpu_mem: str | None = None,
    allow_checkpointing: bool = True,
    dataset: ImageDataset | None = None,
    eval_request: EvalRequest | None = None,
) -> ArtifactVersion:
    """Distill ``config.dataset`` into a new version of ``name`` (default ``<dataset>-ipc<IPC>``).

    Everything that can be checked before any work is checked first (name, dataset, IPC, factor,
    network, device, the memory plan), so bad input leaves nothing behind. ``device`` is resolved
    once, at this job's boundary (:func:`~ncfm_core.parallel.ranked_job`), and recorded in the
    version's record with the reason for it. The run is planned
    for ``gpu_mem`` (see :func:`make_plan`; the CUDA allocator is capped at it and the plan's
    backend settings applied, :func:`apply_run_settings`) and the plan is applied to the config
    before the record is written, so a resume replays it. An iteration that runs out of memory
    steps down to the next smaller plan (:func:`step_down_path`, ``ncfm_core.jobs.run``). Returns
    the complete version.
    Raises :class:`JobInterrupted` on Ctrl-C (after checkpointing), ``NcfmError`` subclasses for
    bad input, and re-raises anything else after marking the version failed.
    ``dataset``: the data already in memory (``ncfm_core.distill`` from tensors), instead of
    loading ``config.dataset``. ``eval_request``: the evaluation the caller runs once the version is
    complete (``jobs.eval.eval_request``), recorded as ``pending_eval`` so that ``ncfm resume`` runs
    it if this run is interrupted first.
    """
    emit = emitter(callback)
    config = validate(config)  # a DistillConfig built by hand is checked like one from make_config
    checkpoint_every = check_checkpoint_every(checkpoint_every)
    name = store_lib.validate_name(name) if name is not None else default_artifact_name(config.dataset, config.ipc)
    dataset = dataset if dataset is not None else load_job_dataset(config)
    spec = validate_job(config, dataset)
    torch_device = device.device
    budget = MemoryBudget.resolve(gpu_mem, torch_device)
    shape = DatasetShape.of(dataset)
    plan, planned = make_plan(config, shape, torch_device, budget, allow_checkpointing=allow_checkpointing)
    apply_run_settings(plan, torch_device, budget)
    smaller = step_down_path(config, shape, torch_device, plan, planned["plan_asked"])
    config = plan.apply(config)
    version = store.create_version(name, initial_record(
        config, dataset, device, checkpoint_every, parent=None, plan=PlanRecord.from_json(planned["plan"]),
        flops_per_iteration=planned["flops_per_iteration"], gpu_mem=planned["gpu_mem"], pending_eval=eval_request,
        plan_asked=PlanAsked.from_json(planned["plan_asked"])))
    emit({"stage": "created", "artifact": version.ref, "path": str(version.path)})
    log(emit, f"created {version.ref} at {version.path}")
    log(emit, plan_message(plan))
    with run_lock(version):
        return distill_into(store, version, config, dataset, spec, torch_device,
                            checkpoint_every=checkpoint_every, state=None, emit=emit, budget=budget,
                            plan=plan, smaller=smaller)
