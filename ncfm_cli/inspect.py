"""``ncfm inspect``: provenance, configuration, status, metrics, eval history and file sizes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ncfm_cli.options import CommandJsonOption, RefArgument
from ncfm_cli.output import (
    command_errors,
    format_accuracy,
    format_levers,
    format_peak_memory,
    format_seconds,
    format_speed,
    global_options,
    print_json,
    print_pairs,
    print_table,
)
from ncfm_core.devices import format_bytes
from ncfm_core.jobs import Inspection, inspect_job
from ncfm_core.store import Accuracy, DatasetRecord, EvalRecord, EvalRequest

INSPECT_EPILOG = (
    "--json prints the manifest itself (older layouts migrated to the current schema_version) plus "
    "artifact, path and file_sizes (bytes), and hint (the command that continues an interrupted run); "
    "the normalisation the networks apply to [0, 1] pixels is dataset.normalization. "
    "Exit codes: 0 ok; 1 corrupt manifest; 2 invalid reference; 3 not found; 7 the file system refused "
    "(e.g. permission denied)."
)


def _mean_cell(accuracy: Accuracy | None) -> str:
    """``mean +- std`` of a result's accuracy, "-" when there is none."""
    if accuracy is None or accuracy.mean is None:
        return "-"
    return f"{format_accuracy(accuracy.mean)} +- {format_accuracy(accuracy.std)}"


def evals_table(evals: Sequence[EvalRecord]) -> Table:
    """The eval history, one row per recorded evaluation: the synthetic set's accuracy, the
    baselines it was compared with and its IOR (in points)."""
    table = Table(title="evaluations", title_justify="left")
    for column in ("created", "model", "epochs", "repeats", "synthetic", "random", "full", "IOR", "device"):
        table.add_column(column, justify="right" if column in ("synthetic", "random", "full", "IOR") else "left")
    for record in evals:
        baseline = {kind: result.accuracy for kind, result in record.baselines.items()}
        ior = record.metrics.get("ior")
        table.add_row(
            str(record.created), str(record.protocol.get("model")), str(record.protocol.get("epochs")),
            str(len(record.accuracy.runs)), _mean_cell(record.accuracy), _mean_cell(baseline.get("random")),
            _mean_cell(baseline.get("full")), "-" if ior is None else f"{100 * ior:+.2f} pts", str(record.device),
        )
    return table


def _normalization(dataset: DatasetRecord | None) -> str:
    """What the networks apply to [0, 1] pixels; older versions did not record it."""
    norm = None if dataset is None else dataset.normalization
    if norm is None:
        return "not recorded (made by an older ncfm)"
    values = lambda numbers: ", ".join(f"{float(v):.4f}" for v in numbers)  # noqa: E731
    return f"(x - mean) / std, mean [{values(norm.mean)}], std [{values(norm.std)}]"


def _pending_eval(request: EvalRequest | None, ref: str) -> str | None:
    if request is None:
        return None
    protocol = request.protocol
    models = ", ".join(request.models) or protocol.get("model")
    return (f"{protocol.get('protocol')}: {protocol.get('repeats')} x {models}, {protocol.get('epochs')} epochs"
            f"{', baselines ' + ', '.join(request.baselines) if request.baselines else ''}; "
            f"`ncfm resume {ref}` runs it")


def _print_human(info: Inspection) -> None:
    record = info.record
    dataset, timings, pool = record.dataset, record.timings, record.pool
    # A stopped run's error says how it stopped ("interrupted (SIGTERM)", "DivergedError: ...").
    status = record.error if record.error and info.status == "interrupted" else \
        info.status + (f" ({record.error})" if record.error else "")
    print_pairs([
        ("artifact", info.artifact),
        ("path", info.path),
        ("status", status),
        *([("next", info.hint)] if info.hint else []),
        ("created", record.created),
        ("parent", record.parent),
        ("dataset", f"{dataset.name}: {dataset.num_classes} classes, {dataset.channels}x{dataset.image_size}x"
                    f"{dataset.image_size}, fingerprint {dataset.fingerprint[:16]}" if dataset else None),
        ("iterations", f"{record.iterations_done} of {record.iterations_target}"),
        ("device", f"{record.device} ({record.device_reason})"),
        ("software", ", ".join(f"{k} {v}" for k, v in sorted(record.versions.items())) or None),
        ("pool", f"{pool.key} ({'cached' if pool.cached else 'trained'}, {pool.size} nets)" if pool else None),
        ("time", f"{format_seconds(timings.seconds)} total, pool {format_seconds(timings.pool_seconds)}, "
                 f"{format_speed(timings)}" if timings else None),
        ("peak memory", format_peak_memory(record.peak_memory_bytes, record.peak_memory_source)),
        ("kernel levers", format_levers(record.plan.kernels) if record.plan else None),
        ("final loss", record.final_loss),
        ("normalization", _normalization(dataset)),
        ("pending eval", _pending_eval(record.pending_eval, info.artifact)),
        ("plot", info.plot),
    ])
    if record.config:
        typer.echo("\nconfig")
        print_pairs([(f"  {key}", value) for key, value in record.config.items()])
    if record.evals:
        typer.echo("")
        print_table(evals_table(record.evals))
    typer.echo("\nfiles")
    print_pairs([(f"  {path}", format_bytes(size)) for path, size in info.file_sizes.items()])


def inspect_command(
    ctx: typer.Context,
    ref: RefArgument,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", dir_okay=False, show_default=False,
        help="Also draw the loss curve beside the synthetic images into this PNG (needs matplotlib: "
        "pip install 'ncfm[plot]').")] = None,
    json_flag: CommandJsonOption = False,
) -> None:
    """Show how an artifact was made and how it did: provenance, config, metrics, evals, file sizes.

    Example:

        ncfm inspect digits-ipc10@v1 --json
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        info = inspect_job(opts.open_store(), ref, plot=plot)
    if opts.json:
        print_json(info.to_json())
    else:
        _print_human(info)
