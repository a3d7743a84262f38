"""``ncfm inspect``: provenance, configuration, status, metrics, eval history and file sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ncfm_cli.options import CommandJsonOption, RefArgument
from ncfm_cli.output import (
    command_errors,
    format_accuracy,
    format_seconds,
    global_options,
    print_json,
    print_pairs,
    print_table,
)
from ncfm_core.devices import format_bytes
from ncfm_core.jobs import inspect_job

INSPECT_EPILOG = (
    "--json prints the manifest itself plus artifact, path and file_sizes (bytes); the normalisation "
    "the networks apply to [0, 1] pixels is dataset.normalization. "
    "Exit codes: 0 ok; 1 corrupt manifest; 2 invalid reference; 3 not found; 7 the file system refused "
    "(e.g. permission denied)."
)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _mean_cell(result: Any) -> str:
    """``mean +- std`` of a result's accuracy block, "-" when there is none."""
    accuracy = _dict(_dict(result).get("accuracy"))
    if accuracy.get("mean") is None:
        return "-"
    return f"{format_accuracy(accuracy.get('mean'))} +- {format_accuracy(accuracy.get('std'))}"


def evals_table(evals: list[Any]) -> Table:
    """The eval history, one row per recorded evaluation: the synthetic set's accuracy, the
    baselines it was compared with and its IOR (in points)."""
    table = Table(title="evaluations", title_justify="left")
    for column in ("created", "model", "epochs", "repeats", "synthetic", "random", "full", "IOR", "device"):
        table.add_column(column, justify="right" if column in ("synthetic", "random", "full", "IOR") else "left")
    for record in evals:
        record = _dict(record)
        protocol, accuracy = _dict(record.get("protocol")), _dict(record.get("accuracy"))
        baselines = _dict(record.get("baselines"))
        ior = _dict(record.get("metrics")).get("ior")
        table.add_row(
            str(record.get("created")), str(protocol.get("model")), str(protocol.get("epochs")),
            str(len(accuracy.get("runs") or [])), _mean_cell(record), _mean_cell(baselines.get("random")),
            _mean_cell(baselines.get("full")), "-" if ior is None else f"{100 * ior:+.2f} pts",
            str(record.get("device")),
        )
    return table


def _normalization(dataset: dict[str, Any]) -> str:
    """What the networks apply to [0, 1] pixels; older manifests did not record it."""
    norm = _dict(dataset.get("normalization"))
    if not isinstance(norm.get("mean"), list) or not isinstance(norm.get("std"), list):
        return "not recorded (made by an older ncfm)"
    values = lambda key: ", ".join(f"{float(v):.4f}" for v in norm[key])  # noqa: E731
    return f"(x - mean) / std, mean [{values('mean')}], std [{values('std')}]"


def _print_human(info: dict[str, Any]) -> None:
    dataset, timings, pool = _dict(info.get("dataset")), _dict(info.get("timings")), _dict(info.get("pool"))
    versions = _dict(info.get("versions"))
    print_pairs([
        ("artifact", info["artifact"]),
        ("path", info["path"]),
        ("status", str(info.get("status")) + (f" ({info.get('error') or info.get('hint')})"
                                              if info.get("error") or info.get("hint") else "")),
        ("created", info.get("created")),
        ("parent", info.get("parent")),
        ("dataset", f"{dataset.get('name')}: {dataset.get('num_classes')} classes, "
                    f"{dataset.get('channels')}x{dataset.get('image_size')}x{dataset.get('image_size')}, "
                    f"fingerprint {str(dataset.get('fingerprint'))[:16]}" if dataset else None),
        ("iterations", f"{info.get('iterations_done')} of {info.get('iterations_target')}"),
        ("device", f"{info.get('device')} ({info.get('device_reason')})"),
        ("software", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or None),
        ("pool", f"{pool.get('key')} ({'cached' if pool.get('cached') else 'trained'}, "
                 f"{pool.get('size')} nets)" if pool else None),
        ("time", f"{format_seconds(timings.get('seconds'))} total, pool {format_seconds(timings.get('pool_seconds'))}, "
                 f"median {timings.get('seconds_per_iteration_median') or 0:.3f} s/it" if timings else None),
        ("peak memory", f"{format_bytes(info.get('peak_memory_bytes'))} ({info.get('peak_memory_source')})"
         if info.get("peak_memory_bytes") is not None else None),
        ("final loss", info.get("final_loss")),
        ("normalization", _normalization(dataset)),
        ("plot", info.get("plot")),
    ])
    config = _dict(info.get("config"))
    if config:
        typer.echo("\nconfig")
        print_pairs([(f"  {key}", value) for key, value in config.items()])
    evals = info.get("evals") if isinstance(info.get("evals"), list) else []
    if evals:
        typer.echo("")
        print_table(evals_table(evals))
    typer.echo("\nfiles")
    print_pairs([(f"  {path}", format_bytes(size)) for path, size in info["file_sizes"].items()])


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
        print_json(info)
    else:
        _print_human(info)
