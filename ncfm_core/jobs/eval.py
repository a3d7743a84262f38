"""``ncfm eval``: train fresh networks on a synthetic set, with baselines and fair metrics."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ncfm_core import parallel
from ncfm_core import store as store_lib
from ncfm_core.config import DistillConfig, check_seed
from ncfm_core.data import ImageDataset
from ncfm_core.data.registry import check_evaluable
from ncfm_core.devices import (
    JobDevice,
)
from ncfm_core.errors import ConfigError, CorruptArtifactError, NcfmError, ResultNotSavedError, one_line
from ncfm_core.evaluate import (
    EvalConfig,
    EvalResult,
    baseline_cache_key,
    build_eval_network,
    evaluate_full_baseline,
    evaluate_models,
    evaluate_random_baseline,
    evaluate_synset,
    teacher_from_pool,
)
from ncfm_core.jobs.common import (
    check_fingerprint,
    config_from_record,
    load_job_dataset,
    open_complete_synset,
    software_versions,
)
from ncfm_core.jobs.events import JobCallback, emitter, log
from ncfm_core.metrics import fair_metrics
from ncfm_core.pool import PoolSpec
from ncfm_core.store import ArtifactVersion, EvalRecord, EvalRequest, Store, utc_now
from ncfm_core.store.baselines import (
    CACHE_ONLY_FIELDS,
    baseline_path,
    read_baseline,
    write_baseline,
)
from ncfm_core.train import can_stack

BASELINE_KINDS = ("random", "full")
SOFT_LABEL_LOSS = "T^2 * KL(softmax(teacher / T) || softmax(student / T)) on each augmented batch"


def check_baselines(baselines: Sequence[str]) -> list[str]:
    """Lower-cased, de-duplicated baseline names; an unknown one is a ConfigError (exit 2)."""
    names = list(dict.fromkeys(name.strip().lower() for name in baselines))
    unknown = [name for name in names if name not in BASELINE_KINDS]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r} in baselines (--baseline); choose random and/or full")
    return names


def _check_models(eval_config: EvalConfig, models: Sequence[str], dataset: ImageDataset) -> list[str]:
    """Lower-cased, de-duplicated model names; each is built once so that an unknown name or a
    batched repeat mode it cannot honour fails before anything trains."""
    names = list(dict.fromkeys(name.strip().lower() for name in models))
    if not names:
        raise ConfigError("models (--model) is empty; name at least one network to evaluate, e.g. convnet")
    for name in names:
        with torch.random.fork_rng(devices=[]):  # a throwaway init must not move the global RNG
            net = build_eval_network(dataclasses.replace(eval_config, model=name), dataset)
        if eval_config.repeat_mode == "batched" and not can_stack(net):
            raise ConfigError(
                f"{name} has batch norm or dropout and cannot train its repeats batched; "
                "use repeat_mode (--repeat-mode) auto or sequential"
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
    path = baseline_path(store.root, key)
    if path.exists():
        try:
            cached = read_baseline(path, key, protocol)
        except (NcfmError, ValueError, OSError) as err:
            log(emit, f"baseline full: ignoring the cache file {path} ({one_line(err)}); recomputing it", "warning")
        else:
            log(emit, f"baseline full: reusing the cached result for {model_config.model} ({path.name})")
            return {**cached, "cached": True, "cache_key": key}

    log(emit, f"baseline full: training {model_config.repeats} x {model_config.model} on all "
              f"{dataset.num_train} training images for {model_config.epochs} epochs (cached afterwards)")
    result = evaluate_full_baseline(dataset, model_config, device, teacher=teacher,
                                    on_repeat=_repeat_reporter(emit, "full", model_config),
                                    on_epoch=_epoch_reporter(emit, "full", model_config),
                                    evaluator=parallel.job_evaluator())
    record = {**_result_record(result, protocol_extra), "created": utc_now()}
    try:
        write_baseline(path, record, key=key, dataset_fingerprint=dataset.fingerprint, versions=software_versions())
    except OSError as err:  # a read-only store still gets its result, just not cached
        log(emit, f"baseline full: could not cache the result at {path} ({one_line(err)})", "warning")
    record = {k: v for k, v in record.items() if k not in CACHE_ONLY_FIELDS}
    return {**record, "cached": False, "cache_key": key}


def _eval_event(emit: JobCallback, what: str, model: str, repeat: int, repeats: int, accuracy: float) -> None:
    emit({"stage": "eval", "what": what, "model": model, "repeat": repeat, "repeats": repeats,
          "accuracy": float(accuracy)})


def _repeat_reporter(emit: JobCallback, what: str, config: EvalConfig) -> Callable[[int, float], None]:
    """The ``on_repeat`` callback of one evaluation: an ``eval`` event per trained network."""
    return lambda repeat, accuracy: _eval_event(emit, what, config.model, repeat, config.repeats, accuracy)


def _epoch_event(emit: JobCallback, what: str, model: str, config: EvalConfig, repeats: range, epoch: int,
                 loss: float, seconds: float) -> None:
    emit({"stage": "eval_epoch", "what": what, "model": model, "first": repeats.start, "stop": repeats.stop,
          "repeats": config.repeats, "epoch": epoch, "epochs": config.epochs, "loss": float(loss),
          "seconds": float(seconds)})


def _epoch_reporter(emit: JobCallback, what: str, config: EvalConfig) -> Callable[[range, int, float, float], None]:
    """The ``on_epoch`` callback of one evaluation: an ``eval_epoch`` event per trained epoch."""
    return lambda repeats, epoch, loss, seconds: _epoch_event(emit, what, config.model, config, repeats, epoch,
                                                              loss, seconds)


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
    member = eval_config.teacher_member  # within the pool: checked by eval_job before any work
    key = spec.key()
    cache_dir = store.pool_dir(key)
    if not (cache_dir / store_lib.POOL_FILE).exists():
        log(emit, f"soft labels: training the artifact's pool ({spec.size} network(s), {spec.epochs} epoch(s) "
                   f"each) for its teacher ({key})")

    def on_progress(pool_member: int, epoch: int, loss: float) -> None:
        emit({"stage": "pool", "member": pool_member, "members": spec.size, "epoch": epoch,
              "epochs": spec.epochs, "loss": float(loss)})

    started = time.perf_counter()
    pool, from_cache = parallel.job_pool(spec, dataset, device, cache_dir=cache_dir, on_progress=on_progress)
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
    log(emit, f"soft labels: teacher is pool member {member} ({spec.network}, test accuracy "
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
        log(emit, f"baseline random: training {model_config.repeats} x {model_config.model} on {ipc} random "
                   f"real image(s) per class (subset seed {baseline_seed})")
        result = evaluate_random_baseline(dataset, ipc, model_config, device, baseline_seed, teacher=teacher,
                                          on_repeat=_repeat_reporter(emit, "random", model_config),
                                          on_epoch=_epoch_reporter(emit, "random", model_config),
                                          evaluator=parallel.job_evaluator())
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


@parallel.ranked_job
def eval_images_job(
    images: Tensor,
    labels: Tensor,
    dataset: ImageDataset,
    eval_config: EvalConfig,
    *,
    factor: int = 1,
    device: str | JobDevice = "auto",
    callback: JobCallback | None = None,
) -> EvalResult:
    """Train ``eval_config.repeats`` fresh networks on a synthetic set held in memory and test
    them on ``dataset``'s test split, recording nothing: ``ncfm_core.evaluate`` of a set that is
    not a stored result. ``images`` (N, C, H, W) in [0, 1] hold ``factor x factor`` tiles each
    (1: already decoded), ``labels`` (N,). A job like :func:`eval_job`: ``device`` is resolved
    at its boundary (under torchrun, each rank's ``cuda:LOCAL_RANK``) and the repeats are spread
    over the ranks, each of which returns rank 0's result."""
    on_repeat = None if callback is None else _repeat_reporter(emitter(callback), "synthetic", eval_config)
    return evaluate_synset(images, labels, factor, dataset, eval_config, device.device, on_repeat,
                           evaluator=parallel.job_evaluator())


@parallel.ranked_job
def eval_job(
    store: Store,
    ref: str,
    eval_config: EvalConfig,
    device: str | JobDevice = "auto",
    callback: JobCallback | None = None,
    *,
    data_dir: str | None = None,
    models: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
    baseline_seed: int = 0,
    dataset: ImageDataset | None = None,
    clears_pending_eval: bool = False,
) -> dict[str, Any]:
    """Train ``eval_config.repeats`` fresh networks on the synthetic set of ``ref`` and test them
    on the real test set, for each network in ``models`` (default ``[eval_config.model]``), with
    the ``baselines`` asked for ("random": a seeded random real subset of the synthetic set's
    stored IPC; "full": the whole training set, cached under ``<store>/baselines/``).

    With ``eval_config.soft_labels`` the teacher is member ``teacher_member`` of the artifact's
    own pool, used for the synthetic set and both baselines alike. Returns (and appends to
    the record's ``evals`` as an :class:`~ncfm_core.store.EvalRecord`, less ``artifact``/``path``)::

        {artifact, path, model, protocol, accuracy {mean, std, runs}, seeds, training, train_set,
         baselines {random: {...}, full: {..., cached}}, metrics {ior, hlr, lrs}, teacher,
         models {name: {...}} (only with several models), seconds (whole job), created, device,
         world_size}

    Under torchrun (:func:`ncfm_core.parallel.ranked_job`) rank 0 runs this and the repeats
    of every evaluation are spread over the ranks; the other ranks return rank 0's record.

    The top-level results are those of the first model. Accuracies and metrics are fractions.
    ``dataset``: the data already in memory (``ncfm_core.evaluate``), checked against the
    record's fingerprint like loaded data; default: load the artifact's dataset.
    ``clears_pending_eval``: this is the evaluation the record's ``pending_eval`` asked for
    (:func:`requested_eval`); it is cleared in the same write that records the result.
    """
    emit = emitter(callback)
    started = time.perf_counter()
    baselines = check_baselines(baselines)
    check_seed("baseline_seed (--baseline-seed)", baseline_seed)
    version, run_record, synset = open_complete_synset(store, ref)
    config = config_from_record(version, run_record)
    if eval_config.soft_labels and eval_config.teacher_member >= config.pool_size:
        raise ConfigError(f"teacher_member (--teacher-member) {eval_config.teacher_member} is not in the pool of "
                          f"{version.ref}, of {config.pool_size}; use 0..{config.pool_size - 1}")
    if dataset is None:  # given: data in memory (``ncfm_core.evaluate``), checked like loaded data
        dataset = load_job_dataset(config, data_dir)
    check_fingerprint(version, run_record, dataset)
    check_evaluable(dataset)
    store.check_writable(version)  # before hours of training, not after them
    if synset.num_classes != dataset.num_classes or tuple(synset.images.shape[1:]) != (
        dataset.channels, dataset.image_size, dataset.image_size
    ):
        raise CorruptArtifactError(f"{synset.path}: does not match dataset '{config.dataset}'; restore or delete this file")
    model_names = _check_models(eval_config, models or [eval_config.model], dataset)
    eval_config = dataclasses.replace(eval_config, model=model_names[0])
    torch_device = device.device

    teacher, teacher_info, protocol_extra = None, None, {}
    if eval_config.soft_labels:
        teacher, teacher_info = _teacher(store, config, dataset, eval_config, torch_device, emit)
        # A soft-label result depends on the teacher's weights: name them in the protocol.
        protocol_extra = {"teacher_pool": teacher_info["pool"]}

    log(emit, f"evaluating {version.ref}: {eval_config.repeats} x {', '.join(model_names)} for "
               f"{eval_config.epochs} epochs on {torch_device}")
    synthetic = evaluate_models(
        synset.images, synset.labels, dataset, eval_config, torch_device, model_names, factor=synset.factor,
        teacher=teacher, evaluator=parallel.job_evaluator(),
        on_repeat=lambda model, repeat, accuracy: _eval_event(emit, "synthetic", model, repeat,
                                                              eval_config.repeats, accuracy),
        on_epoch=lambda model, repeats, epoch, loss, seconds: _epoch_event(
            emit, "synthetic", model, eval_config, repeats, epoch, loss, seconds),
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
        created=utc_now(),
        device=str(torch_device),
        world_size=parallel.current().world_size,
    )
    result = {"artifact": version.ref, "path": str(version.path), **record}
    try:
        store.append_eval(version, EvalRecord.from_json(record, "the evaluation's record"),
                          clears_pending_eval=clears_pending_eval)
    except OSError as err:  # the evaluation is done: hand its result back rather than lose it
        raise ResultNotSavedError(
            f"could not record the evaluation in {version.manifest_path} ({err.strerror or one_line(err)}); "
            f"the result above was not saved: free space or make the store writable, then run it again",
            result=result,
        ) from None
    return result


# ----------------------------------------------------------------------------- an evaluation asked for


def eval_request(eval_config: EvalConfig, *, models: Sequence[str] = (), baselines: Sequence[str] = (),
                 baseline_seed: int = 0, min_acc: float | None = None) -> EvalRequest:
    """What a distilling command records of the evaluation it will run when the distillation is
    complete (``ncfm distill --eval``), so that ``ncfm resume`` runs the same one if it is
    interrupted before that evaluation is recorded. Baselines are checked now, not after the run."""
    return EvalRequest(protocol=eval_config.to_dict(), models=tuple(models), baselines=tuple(check_baselines(baselines)),
                       baseline_seed=baseline_seed, min_acc=min_acc)


@parallel.ranked_job
def pending_eval_job(store: Store, ref: str, device: str | JobDevice = "auto") -> EvalRequest | None:
    """The evaluation the complete version ``ref`` still owes (its record's ``pending_eval``), or
    None. A job of its own so that, under torchrun, rank 0 reads the record and every rank gets
    the same answer (``device`` is the boundary's; nothing runs on it)."""
    version = store.resolve(ref)
    record = version.record()
    return record.pending_eval if record.status == "complete" else None


def requested_eval(store: Store, version: ArtifactVersion, request: EvalRequest, device: str | JobDevice = "auto",
                   callback: JobCallback | None = None) -> dict[str, Any]:
    """Run the evaluation ``request`` (see :func:`eval_request`) on ``version`` and record it,
    clearing it from the record's ``pending_eval``; returns what :func:`eval_job` returns."""
    try:
        eval_config = EvalConfig.from_dict(dict(request.protocol))
    except (TypeError, ConfigError) as err:
        raise ConfigError(f"{version.ref} recorded an evaluation this ncfm cannot run ({one_line(err)}); "
                          f"run `ncfm eval {version.ref}` with the options you want") from None
    return eval_job(store, version.ref, eval_config, device, callback, models=list(request.models) or None,
                    baselines=request.baselines, baseline_seed=request.baseline_seed, clears_pending_eval=True)
