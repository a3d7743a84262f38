"""The ``ncfm`` application: global options, command registration, error mapping."""

from __future__ import annotations

import os
import sys

import typer

from ncfm_core import __version__
from ncfm_core.errors import NcfmError

app = typer.Typer(
    name="ncfm",
    help="Distill image datasets with Neural Characteristic Function Matching (NCFM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ncfm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Distill image datasets with Neural Characteristic Function Matching (NCFM)."""


def run() -> None:
    """Console entry point: run the app, turning core errors into one-line messages."""
    try:
        app(standalone_mode=True)
    except NcfmError as err:  # pragma: no cover - typer handles most exits itself
        if os.environ.get("NCFM_DEBUG") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
