"""``ncfm eval``: train fresh networks on a synthetic set, with baselines, and report their accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from rich.table import Table

from ncfm_cli.options import (
    CommandJsonOption,
    DataDirOption,
    DeviceOption,
    EvalBaselineOption,
    EvalBaselineSeedOption,
    EvalBatchSizeOption,
    EvalBestOverEpochsOption,
    EvalCutmixOption,
    EvalEpochsOption,
    EvalLrOption,
    EvalModelsOption,
    EvalMomentumOption,
    EvalOptimizerOption,
    EvalProtocolOption,
    EvalRepeatModeOption,
    EvalRepeatsOption,
    EvalRrcOption,
    EvalSeedOption,
    EvalSoftLabelsOption,
    EvalTeacherMemberOption,
    EvalTemperatureOption,
    EvalWeightDecayOption,
    EvalWidthOption,
    MinAccOption,
    RefArgument,
)
from ncfm_cli.output import (
    GlobalOptions,
    command_errors,
    error_object,
    format_accuracy,
    format_seconds,
    global_options,
    is_main,
    job_progress,
    print_json,
    print_pairs,
    print_table,
    report_error,
)
from ncfm_core.errors import EXIT_BELOW_MIN_ACC, ConfigError, NcfmError, ResultNotSavedError
from ncfm_core.jobs import eval_job
from ncfm_core.protocols import EvalConfig, default_protocol, protocol_config

EVAL_EPILOG = (
    "--json prints one object: {artifact, path, model, protocol {every knob, as run}, "
    "accuracy {mean, std, runs}, seeds, training, train_set, baselines {random {accuracy, subset, "
    "subset_seed, ...}, full {accuracy, cached, cache_key, ...}}, metrics {ior, hlr, lrs}, teacher "
    "(null with hard labels), models {name: the same per model} (only with several --model), "
    "timings, seconds (whole job), created, device, world_size (processes under torchrun), min_acc, "
    "passed}. The top-level results are "
    "the first model's. Accuracies, IOR = acc(synthetic) - acc(random), HLR = acc(full) - "
    "acc(synthetic) and LRS are fractions (percentages and points in the table). The random "
    "subset has the synthetic set's stored IPC (same storage). "
    "Exit codes: 0 ok; 1 failure (e.g. a corrupt synset.safetensors); 2 invalid option; "
    "3 artifact not found; 4 out of memory; 5 mean accuracy below --min-acc (the result is printed and "
    "recorded first); 6 the artifact's lock held by another process past --lock-timeout; 7 the file "
    "system refused (permission, read-only, disk full; a finished result is printed first)."
)


METRICS_LEGEND = (
    "IOR = synthetic - random and HLR = full - synthetic, in accuracy points; LRS in [0, 1]. "
    "Higher IOR and LRS, lower HLR are better."
)


def build_eval_config(
    *,
    dataset: str | None = None,
    protocol: str | None = None,
    repeats: int | None = None,
    epochs: int | None = None,
    model: str | None = None,
    lr: float | None = None,
    seed: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    optimizer: str | None = None,
    weight_decay: float | None = None,
    momentum: float | None = None,
    cutmix_prob: float | None = None,
    rrc: bool | None = None,
    repeat_mode: str | None = None,
    best_over_epochs: bool = False,
    soft_labels: bool = False,
    temperature: float | None = None,
    teacher_member: int | None = None,
) -> EvalConfig:
    """The named evaluation protocol (default: ``dataset``'s, :func:`~ncfm_core.protocols.default_protocol`;
    ``ncfm`` without one) with the options given on top (``None``: the protocol's value); the
    library checks every one (``protocol_config``)."""
    return protocol_config(
        protocol or (default_protocol(dataset) if dataset else "ncfm"),
        repeats=repeats,
        epochs=epochs,
        model=model,
        lr=lr,
        seed=seed,
        width=width,
        batch_size=batch_size,
        optimizer=optimizer,
        weight_decay=weight_decay,
        momentum=momentum,
        cutmix_prob=cutmix_prob,
        random_resized_crop=rrc,
        repeat_mode=repeat_mode,
        best_over_epochs=best_over_epochs,
        soft_labels=soft_labels,
        temperature=temperature,
        teacher_member=teacher_member,
    )


def split_names(values: list[str] | None) -> list[str]:
    """Repeated options, each possibly comma-separated (``--model convnet,alexnet``), in order."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def check_min_acc(min_acc: float | None) -> None:
    """Before any work: --min-acc is a fraction in [0, 1] (NaN and 1.5 could never be met or
    compared; they must not cost a whole evaluation first)."""
    if min_acc is not None and not (0.0 <= min_acc <= 1.0):  # also false for NaN
        raise ConfigError(f"--min-acc must be a fraction in [0, 1] (e.g. 0.85 for 85%), got {min_acc}")


def passed(record: dict[str, Any], min_acc: float | None) -> bool:
    return min_acc is None or record["accuracy"]["mean"] >= min_acc


def artifact_dataset(opts: GlobalOptions, ref: str) -> str:
    """The dataset an artifact was distilled from (its record's config), whose default protocol
    an evaluation without --protocol gets; '' when ``ref`` cannot be read: the job then reports
    why, once (under torchrun, rank 0 alone), and nothing is evaluated with the fallback."""
    try:
        return str(opts.open_store().resolve(ref).record().config.get("dataset") or "")
    except NcfmError:
        return ""


def _network(protocol: dict[str, Any]) -> str:
    """``convnet width 64``: the evaluation network (its width where it has one)."""
    model = str(protocol.get("model"))
    return f"{model} width {protocol.get('width')}" if model.startswith("convnet") else model


def eval_pairs(record: dict[str, Any]) -> list[tuple[str, Any]]:
    """Human lines of one evaluation record (the synthetic set of its first model; its random
    real baseline and the margin over it, when one ran)."""
    accuracy, protocol = record["accuracy"], record.get("protocol", {})
    runs = ", ".join(format_accuracy(run) for run in accuracy["runs"])
    timings = record.get("timings") or {}
    pairs = [
        ("evaluated", f"protocol {protocol.get('protocol')}: {len(accuracy['runs'])} x {_network(protocol)}, "
                      f"{protocol.get('epochs')} epochs on {record.get('device')}"),
        ("accuracy", f"{format_accuracy(accuracy['mean'])} +- {format_accuracy(accuracy['std'])} ({runs})"),
    ]
    random = (record.get("baselines") or {}).get("random")
    if random is not None:
        ior = (record.get("metrics") or {}).get("ior")
        subset = random.get("train_set") or {}
        pairs += [
            ("random real", f"{format_accuracy(random['accuracy']['mean'])} +- "
                            f"{format_accuracy(random['accuracy']['std'])} ({subset.get('ipc')} real image(s) per "
                            f"class, the synthetic set's storage; subset seed {random.get('subset_seed')})"),
            ("margin (IOR)", "-" if ior is None else f"{100 * ior:+.2f} points over random real images"),
        ]
    eval_seconds = timings.get("total", record.get("seconds")) if random is not None else timings.get(
        "synthetic", record.get("seconds"))
    pairs.append(("eval time", format_seconds(eval_seconds)))
    return pairs


def fail_below_min_acc(record: dict[str, Any], min_acc: float | None) -> None:
    """After the result is printed: exit 5 with a one-line reason if it is below ``min_acc``."""
    if not passed(record, min_acc):
        if not is_main():  # under torchrun rank 0 says it; every rank exits 5
            raise typer.Exit(EXIT_BELOW_MIN_ACC)
        typer.echo(
            f"error: mean accuracy {format_accuracy(record['accuracy']['mean'])} is below "
            f"--min-acc {format_accuracy(min_acc)}",
            err=True,
        )
        raise typer.Exit(EXIT_BELOW_MIN_ACC)


# ----------------------------------------------------------------------------- human output


def _protocol_line(protocol: dict[str, Any]) -> str:
    crop = "random resized crop" if protocol.get("random_resized_crop") else "no crop"
    return (
        f"{protocol.get('protocol')}: {_network(protocol)}, {protocol.get('optimizer')} lr {protocol.get('lr')}, batch "
        f"{protocol.get('batch_size')}, {protocol.get('epochs')} epochs ({protocol.get('schedule')}), "
        f"CutMix p={protocol.get('cutmix_prob')}, {crop}, {protocol.get('repeats')} repeats from seed "
        f"{protocol.get('seed')}; final-epoch accuracy"
    )


def _labels_line(record: dict[str, Any]) -> str:
    teacher = record.get("teacher")
    if not teacher:
        return "hard"
    return (f"soft: teacher = pool member {teacher['member']} ({teacher['network']}, test accuracy "
            f"{format_accuracy(teacher['test_accuracy'])}), T = {teacher['temperature']}, {teacher['loss']}")


def _trained_on(kind: str, result: dict[str, Any]) -> str:
    train_set = result.get("train_set") or {}
    if kind == "synthetic":
        factor = int(train_set.get("factor", 1))
        decoded = f", x{factor * factor} decoded" if factor > 1 else ""
        return f"synthetic ({train_set.get('stored')} stored{decoded})"
    if kind == "random":
        return f"random real ({train_set.get('ipc')}/class, seed {result.get('subset_seed')})"
    return "full training set"


def _time_cell(kind: str, result: dict[str, Any]) -> str:
    if kind == "synthetic":  # a top-level record's "seconds" is the whole job's
        return format_seconds((result.get("timings") or {}).get("synthetic", result.get("seconds")))
    if kind == "full" and result.get("cached"):
        return f"cached ({format_seconds(result.get('seconds'))} when computed)"
    return format_seconds(result.get("seconds"))


def results_table(record: dict[str, Any]) -> Table:
    """One row per (model, trained-on set): mean +- std over repeats, the runs, the time."""
    entries = record.get("models") or {record.get("model"): record}
    several = len(entries) > 1
    table = Table(title="test accuracy (final epoch)", title_justify="left")
    if several:
        table.add_column("model")
    for header in ("trained on", "images", "mean +- std", "runs", "time"):
        table.add_column(header, justify="right" if header in ("images", "mean +- std") else "left")
    for name, entry in entries.items():
        rows = [("synthetic", entry), *((kind, entry["baselines"][kind]) for kind in ("random", "full")
                                        if kind in (entry.get("baselines") or {}))]
        for kind, result in rows:
            accuracy = result["accuracy"]
            cells = [
                _trained_on(kind, result),
                str((result.get("train_set") or {}).get("size", "-")),
                f"{format_accuracy(accuracy['mean'])} +- {format_accuracy(accuracy['std'])}",
                ", ".join(format_accuracy(run) for run in accuracy["runs"]),
                _time_cell(kind, result),
            ]
            table.add_row(*([str(name)] if several else []), *cells)
            best = result.get("best_over_epochs_test_acc")
            if best:
                table.add_row(*([""] if several else []), "  best epoch: TEST-SET MODEL SELECTION", "",
                              format_accuracy(best["mean"]), ", ".join(format_accuracy(r) for r in best["runs"]),
                              "not the reported figure")
    return table


def metrics_table(record: dict[str, Any]) -> Table | None:
    """IOR and HLR in points, LRS in [0, 1], per model; None when no baseline ran."""
    entries = record.get("models") or {record.get("model"): record}
    if not any(entry.get("metrics") for entry in entries.values()):
        return None
    table = Table(title="fair metrics", title_justify="left")
    for header in ("model", "IOR", "HLR", "LRS"):
        table.add_column(header, justify="left" if header == "model" else "right")
    for name, entry in entries.items():
        metrics = entry.get("metrics") or {}
        points = {key: "-" if key not in metrics else f"{100 * metrics[key]:+.2f} pts" for key in ("ior", "hlr")}
        table.add_row(str(name), points["ior"], points["hlr"], "-" if "lrs" not in metrics else f"{metrics['lrs']:.3f}")
    return table


def kept_if_unsaved(job: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], ResultNotSavedError | None]:
    """Run an evaluation job; when it could not record its result (disk full), keep the result
    to print it anyway, with the error (:func:`fail_if_unsaved` exits 1 after printing)."""
    try:
        return job(), None
    except ResultNotSavedError as err:
        if err.result is None:
            raise
        return err.result, err


def fail_if_unsaved(unsaved: ResultNotSavedError | None) -> None:
    """After the result is printed: exit 1 with the reason it was not recorded (with --json the
    printed object already carries it under "error")."""
    if unsaved is not None:
        raise typer.Exit(report_error(unsaved, json_output=False))


def _print_result(opts: GlobalOptions, record: dict[str, Any], min_acc: float | None,
                  unsaved: ResultNotSavedError | None = None) -> None:
    if not is_main():  # under torchrun only rank 0 prints
        return
    if opts.json:
        print_json({**record, "min_acc": min_acc, "passed": passed(record, min_acc),
                    **({} if unsaved is None else error_object(unsaved))})
        return
    print_pairs([
        ("artifact", record["artifact"]),
        ("protocol", _protocol_line(record.get("protocol") or {})),
        ("labels", _labels_line(record)),
        ("device", record.get("device")),
        ("total time", format_seconds(record.get("seconds"))),
    ])
    print_table(results_table(record))
    metrics = metrics_table(record)
    if metrics is not None:
        print_table(metrics)
        typer.echo(METRICS_LEGEND)


def eval_command(
    ctx: typer.Context,
    ref: RefArgument,
    protocol: EvalProtocolOption = None,
    repeats: EvalRepeatsOption = None,
    epochs: EvalEpochsOption = None,
    model: EvalModelsOption = None,
    lr: EvalLrOption = None,
    batch_size: EvalBatchSizeOption = None,
    optimizer: EvalOptimizerOption = None,
    weight_decay: EvalWeightDecayOption = None,
    momentum: EvalMomentumOption = None,
    cutmix_prob: EvalCutmixOption = None,
    rrc: EvalRrcOption = None,
    width: EvalWidthOption = None,
    seed: EvalSeedOption = None,
    repeat_mode: EvalRepeatModeOption = None,
    best_over_epochs: EvalBestOverEpochsOption = False,
    soft_labels: EvalSoftLabelsOption = False,
    temperature: EvalTemperatureOption = None,
    teacher_member: EvalTeacherMemberOption = None,
    baseline: EvalBaselineOption = None,
    baseline_seed: EvalBaselineSeedOption = 0,
    min_acc: MinAccOption = None,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    json_flag: CommandJsonOption = False,
) -> None:
    """Train fresh networks on a synthetic set and report their accuracy on the real test set.

    Each network learns from scratch on the decoded synthetic images under a named protocol
    (every knob overridable, the effective protocol recorded). Baselines train the same way on
    real images: IOR, HLR and LRS follow. The whole record goes into the manifest's eval history.
    Under torchrun the repeats are spread over the processes (docs/multi-gpu.md).

    Example:

        ncfm eval digits-ipc10 --baseline random --baseline full --repeats 5 --json
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        check_min_acc(min_acc)
        models = split_names(model)
        eval_config = build_eval_config(
            dataset=None if protocol else artifact_dataset(opts, ref), protocol=protocol, repeats=repeats,
            epochs=epochs, model=models[0] if models else None, lr=lr,
            seed=seed, width=width, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
            momentum=momentum, cutmix_prob=cutmix_prob, rrc=rrc, repeat_mode=repeat_mode,
            best_over_epochs=best_over_epochs, soft_labels=soft_labels, temperature=temperature,
            teacher_member=teacher_member,
        )
        with job_progress(opts) as progress:
            record, unsaved = kept_if_unsaved(lambda: eval_job(
                opts.open_store(), ref, eval_config, device, progress,
                data_dir=None if data_dir is None else str(data_dir),
                models=models or None,
                baselines=split_names(baseline),
                baseline_seed=baseline_seed,
            ))
    _print_result(opts, record, min_acc, unsaved)
    fail_if_unsaved(unsaved)
    fail_below_min_acc(record, min_acc)
