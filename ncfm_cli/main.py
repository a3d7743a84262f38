"""The ``ncfm`` application: global options, command registration, error mapping."""

from __future__ import annotations

import os
import sys

import typer

from ncfm_cli.distill import DISTILL_EPILOG, distill_command
from ncfm_cli.eval import EVAL_EPILOG, eval_command
from ncfm_cli.export import EXPORT_EPILOG, export_command
from ncfm_cli.inspect import INSPECT_EPILOG, inspect_command
from ncfm_cli.ls import LS_EPILOG, ls_command
from ncfm_cli.options import JsonOption, QuietOption, StoreOption, VerboseOption
from ncfm_cli.output import EXIT_CODES_HELP, GlobalOptions, error_line, exit_code_for
from ncfm_cli.resume import RESUME_EPILOG, resume_command
from ncfm_core import __version__
from ncfm_core.errors import NcfmError

app = typer.Typer(
    name="ncfm",
    help="Distill image datasets with Neural Characteristic Function Matching (NCFM).",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("distill", epilog=DISTILL_EPILOG)(distill_command)
app.command("resume", epilog=RESUME_EPILOG)(resume_command)
app.command("eval", epilog=EVAL_EPILOG)(eval_command)
app.command("export", epilog=EXPORT_EPILOG)(export_command)
app.command("inspect", epilog=INSPECT_EPILOG)(inspect_command)
app.command("ls", epilog=LS_EPILOG)(ls_command)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ncfm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    store: StoreOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Distill image datasets with Neural Characteristic Function Matching (NCFM).

    Every result is a versioned artifact in a local store. Results go to stdout, progress to stderr.

    Start with:

        ncfm distill digits --ipc 10 --eval
    """
    ctx.obj = GlobalOptions(store=store, json=json_output, quiet=quiet, verbose=verbose)


def run() -> None:
    """Console entry point. Commands map their own errors to exit codes; this catches what
    escapes them (e.g. an error while the command line itself is set up)."""
    try:
        app(standalone_mode=True)
    except (NcfmError, KeyboardInterrupt) as err:
        if os.environ.get("NCFM_DEBUG") == "1":
            raise
        print(error_line(err), file=sys.stderr)
        sys.exit(exit_code_for(err))
