"""``ncfm verify``: check every file of an artifact version against the sha256 its manifest recorded."""

from __future__ import annotations

import typer
from rich.table import Table

from ncfm_cli.options import CommandJsonOption, RefArgument
from ncfm_cli.output import command_errors, error_object, global_options, print_json, print_pairs, print_table, report_error
from ncfm_core.errors import CorruptArtifactError
from ncfm_core.jobs.artifacts import verify_job

VERIFY_EPILOG = (
    "Reads every file whose sha256 the manifest records (synset.safetensors, sampler.safetensors, "
    "checkpoint/state.safetensors), including those no other command reads, and compares. --json prints "
    "{artifact, path, status, ok, files {path: {status, sha256, expected, reason}}, problems}. "
    "Exit codes: 0 every file matches; 1 a file is changed, missing or unreadable (listed, then one "
    "error line); 2 invalid reference; 3 not found; 7 the file system refused."
)


def verify_command(ctx: typer.Context, ref: RefArgument, json_flag: CommandJsonOption = False) -> None:
    """Check the files of REF against the sha256 recorded when they were written.

    Example:

        ncfm verify digits-ipc10@v1
    """
    opts = global_options(ctx, json_flag)
    with command_errors(opts):
        result = verify_job(opts.open_store(), ref)
    failure = None if result["ok"] else CorruptArtifactError(
        f"{len(result['problems'])} file(s) of {result['artifact']} do not match its manifest: "
        f"{'; '.join(result['problems'])}; restore them (or delete the version)")
    if opts.json:
        print_json({**result, **({} if failure is None else error_object(failure))})
    else:
        print_pairs([("artifact", result["artifact"]), ("path", result["path"]), ("status", result["status"])])
        table = Table(title="files", title_justify="left")
        for column in ("file", "check", "sha256"):
            table.add_column(column)
        for name, entry in result["files"].items():
            table.add_row(name, entry["status"] + (f": {entry['reason']}" if entry["reason"] else ""),
                          (entry["sha256"] or "-")[:16])
        print_table(table)
    if failure is not None:
        raise typer.Exit(report_error(failure, json_output=False))
