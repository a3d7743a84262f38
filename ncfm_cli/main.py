"""The ``ncfm`` application: global options, command registration, error mapping."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from ncfm_cli.distill import DISTILL_EPILOG, distill_command
from ncfm_cli.eval import EVAL_EPILOG, eval_command
from ncfm_cli.export import EXPORT_EPILOG, export_command
from ncfm_cli.inspect import INSPECT_EPILOG, inspect_command
from ncfm_cli.ls import LS_EPILOG, ls_command
from ncfm_cli.options import JsonOption, LockTimeoutOption, QuietOption, StoreOption, VerboseOption
from ncfm_cli.output import CLICK_ERROR, EXIT_CODES_HELP, GlobalOptions, report_error, wants_json
from ncfm_cli.resume import RESUME_EPILOG, resume_command
from ncfm_cli.verify import VERIFY_EPILOG, verify_command
from ncfm_core import __version__
from ncfm_core.errors import NcfmError
from ncfm_core.jobs.events import sigterm_as_interrupt
from ncfm_core.runtime import configure_allocator


def _flags_without_metavar(params: list[Any]) -> list[Any]:
    """A boolean flag takes no value: show no ``<bool>`` placeholder after it in --help."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """With ``--json``, a usage error found while the command line is parsed (before any
        command body, e.g. ``--ipc 0`` or an unknown option) also prints its JSON error object
        on stdout. Both the console entry point and ``typer.testing.CliRunner`` come here."""
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode or not wants_json(argv):
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except CLICK_ERROR as err:
            sys.exit(report_error(err, json_output=True))
        except typer.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="ncfm",
    help="Distill image datasets with Neural Characteristic Function Matching (NCFM).",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("distill", cls=_Command, epilog=DISTILL_EPILOG)(distill_command)
app.command("resume", cls=_Command, epilog=RESUME_EPILOG)(resume_command)
app.command("eval", cls=_Command, epilog=EVAL_EPILOG)(eval_command)
app.command("export", cls=_Command, epilog=EXPORT_EPILOG)(export_command)
app.command("inspect", cls=_Command, epilog=INSPECT_EPILOG)(inspect_command)
app.command("ls", cls=_Command, epilog=LS_EPILOG)(ls_command)
app.command("verify", cls=_Command, epilog=VERIFY_EPILOG)(verify_command)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ncfm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    store: StoreOption = None,
    lock_timeout: LockTimeoutOption = None,
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
    configure_allocator()  # before any command touches CUDA (ncfm_core.runtime)
    ctx.obj = GlobalOptions(store=store, json=json_output, quiet=quiet, verbose=verbose, lock_timeout=lock_timeout)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# Environment variables through which a user sets glibc's allocator up; any of them: leave it alone.
_MALLOC_ENVIRONMENT = ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                       "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Make glibc's malloc keep the memory torch frees for the process's next allocation instead of
    handing it back to the OS; returns whether it did.

    torch's CPU tensors come from malloc. By default glibc serves every block above 32 MiB with an
    mmap of its own, unmapped again when freed, and trims the heap's top, so every training step
    maps its activations afresh and the kernel zero-fills them page by page: the README's first
    command took 22 million page faults and ~40 s of system time that way, 0.25 million and ~2 s
    without (docs/benchmarks/first_contact.md). With mmap off and no trimming, freed blocks are
    reused: the peak memory stays that of the largest step, but it is not returned before the
    command ends, which is when a command's memory is returned anyway. Nothing computed changes.
    Only the command line does this (a library must not change its host's allocator), only with
    glibc, and not when the user set the allocator up through its environment variables."""
    if not sys.platform.startswith("linux") or any(name in environ for name in _MALLOC_ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's; musl and others have none
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the largest int as the trim threshold: never trim
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def run() -> None:
    """Console entry point. Commands map their own errors to exit codes; this catches what
    escapes them (e.g. an error while the command line itself is set up)."""
    keep_freed_memory()
    # SIGTERM (a scheduler, `docker stop`) stops like Ctrl-C: recorded, checkpointed, exit 143.
    # Under torchrun SIGTERM stays the group's way to stop its ranks (ncfm_core.parallel).
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and "LOCAL_RANK" not in os.environ:
        signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        app(standalone_mode=True)
    except (NcfmError, OSError, KeyboardInterrupt) as err:
        if os.environ.get("NCFM_DEBUG") == "1":
            raise
        sys.exit(report_error(err, wants_json(sys.argv[1:])))
