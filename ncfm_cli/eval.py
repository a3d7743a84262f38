"""``ncfm eval``: train fresh networks on a synthetic set and report their test accuracy."""

from __future__ import annotations

from typing import Any

import typer

from ncfm_cli.options import (
    CommandJsonOption,
    DataDirOption,
    DeviceOption,
    EvalEpochsOption,
    EvalLrOption,
    EvalModelOption,
    EvalProtocolOption,
    EvalRepeatsOption,
    EvalSeedOption,
    MinAccOption,
    RefArgument,
)
from ncfm_cli.output import (
    EXIT_BELOW_MIN_ACC,
    GlobalOptions,
    ProgressRenderer,
    command_errors,
    format_accuracy,
    format_seconds,
    global_options,
    print_json,
    print_pairs,
)
from ncfm_core.errors import ConfigError
from ncfm_core.evaluate import EvalConfig, protocol_config
from ncfm_core.jobs import eval_job

EVAL_EPILOG = (
    "Accuracies are fractions in [0, 1] in --json output (percentages in the table). "
    "Exit codes: 0 ok; 1 failure (e.g. a corrupt synset.safetensors); 2 invalid option; "
    "3 artifact not found; 5 mean accuracy below --min-acc (the result is printed and "
    "recorded first)."
)


def build_eval_config(
    *,
    protocol: str | None = None,
    repeats: int | None = None,
    epochs: int | None = None,
    model: str | None = None,
    lr: float | None = None,
    seed: int | None = None,
) -> EvalConfig:
    """The named evaluation protocol (default ``ncfm``) with the options given on top."""
    if lr is not None and lr <= 0:
        raise ConfigError("--lr must be > 0")
    return protocol_config(protocol or "ncfm", repeats=repeats, epochs=epochs, model=model, lr=lr, seed=seed)


def check_min_acc(min_acc: float | None) -> None:
    if min_acc is not None and min_acc < 0:
        raise ConfigError("--min-acc must be >= 0 (a fraction, e.g. 0.85 for 85%)")


def passed(record: dict[str, Any], min_acc: float | None) -> bool:
    return min_acc is None or record["accuracy"]["mean"] >= min_acc


def eval_pairs(record: dict[str, Any]) -> list[tuple[str, Any]]:
    """Human lines of one evaluation record."""
    accuracy, protocol = record["accuracy"], record.get("protocol", {})
    runs = ", ".join(format_accuracy(run) for run in accuracy["runs"])
    return [
        ("evaluated", f"{protocol.get('model')} x {len(accuracy['runs'])}, {protocol.get('epochs')} epochs "
                      f"on {record.get('device')}"),
        ("accuracy", f"{format_accuracy(accuracy['mean'])} +- {format_accuracy(accuracy['std'])} ({runs})"),
        ("eval time", format_seconds(record.get("seconds"))),
    ]


def fail_below_min_acc(record: dict[str, Any], min_acc: float | None) -> None:
    """After the result is printed: exit 5 with a one-line reason if it is below ``min_acc``."""
    if not passed(record, min_acc):
        typer.echo(
            f"error: mean accuracy {format_accuracy(record['accuracy']['mean'])} is below "
            f"--min-acc {format_accuracy(min_acc)}",
            err=True,
        )
        raise typer.Exit(EXIT_BELOW_MIN_ACC)


def _print_result(opts: GlobalOptions, record: dict[str, Any], min_acc: float | None) -> None:
    if opts.json:
        print_json({**record, "min_acc": min_acc, "passed": passed(record, min_acc)})
    else:
        print_pairs([("artifact", record["artifact"]), *eval_pairs(record)])


def eval_command(
    ctx: typer.Context,
    ref: RefArgument,
    protocol: EvalProtocolOption = None,
    repeats: EvalRepeatsOption = None,
    epochs: EvalEpochsOption = None,
    model: EvalModelOption = None,
    lr: EvalLrOption = None,
    seed: EvalSeedOption = None,
    min_acc: MinAccOption = None,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    json_flag: CommandJsonOption = False,
) -> None:
    """Train fresh networks on a synthetic set and report their accuracy on the real test set.

    Each network learns from scratch on the decoded synthetic images. Results go into the manifest.

    Example:

        ncfm eval digits-ipc10 --repeats 3 --min-acc 0.85
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        check_min_acc(min_acc)
        eval_config = build_eval_config(
            protocol=protocol, repeats=repeats, epochs=epochs, model=model, lr=lr, seed=seed
        )
        with ProgressRenderer(opts) as progress:
            record = eval_job(
                opts.open_store(), ref, eval_config, device, progress,
                data_dir=None if data_dir is None else str(data_dir),
            )
    _print_result(opts, record, min_acc)
    fail_below_min_acc(record, min_acc)
