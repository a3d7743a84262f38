"""``ncfm ls``: every artifact version in the store."""

from __future__ import annotations

import typer
from rich.table import Table

from ncfm_cli.options import CommandJsonOption
from ncfm_cli.output import command_errors, format_accuracy, global_options, log, print_json, print_table
from ncfm_core.jobs import list_job

LS_EPILOG = (
    "An interrupted run (Ctrl-C, SIGTERM, or a process that died) is listed as interrupted, with "
    "the command that continues it below the table (\"hint\" with --json). Versions whose manifest "
    "cannot be read are listed as warnings on stderr (and under \"warnings\" with --json) instead of "
    "failing, whatever the reason (damaged, not a regular file, permission denied). Exit codes: 0 ok "
    "(also with warnings); 1 failure; 2 invalid option; 7 the file system refused (e.g. the store's own "
    "folder cannot be read)."
)


def ls_command(ctx: typer.Context, json_flag: CommandJsonOption = False) -> None:
    """List every artifact version in the store with its status, dataset, IPC and last accuracy.

    Example:

        ncfm ls --json
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        listing = list_job(opts.open_store())
    for warning in listing["warnings"]:
        log(opts, warning, "warning")
    if opts.json:
        print_json(listing)
        return
    if not listing["artifacts"]:
        typer.echo(f"no artifacts in {listing['store']}; create one with: ncfm distill digits --ipc 10")
        return
    table = Table()
    for column in ("artifact", "status", "dataset", "ipc", "iterations", "accuracy", "created"):
        table.add_column(column, no_wrap=column in ("artifact", "status"))
    for row in listing["artifacts"]:
        done, target = row["iterations_done"], row["iterations_target"]
        table.add_row(
            row["artifact"], row["status"], str(row["dataset"]), str(row["ipc"]),
            str(done) if done == target else f"{done}/{target}",
            format_accuracy(row["accuracy"]), str(row["created"] or "-"),
        )
    print_table(table)
    for row in listing["artifacts"]:
        if row["hint"]:
            typer.echo(f"{row['artifact']}: {row['hint']}")
