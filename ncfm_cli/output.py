"""Everything the CLI writes: results on stdout, progress and logs on stderr, errors and exit codes.

- Results: a human rendering, or with ``--json`` exactly one JSON object (one line) on stdout.
- Progress: rich bars on stderr when stderr is a terminal; without one (a log file, CI, nohup)
  plain lines with iteration, loss and ETA at most every 10% or minute (5% with ``--verbose``);
  none with ``--json`` or ``--quiet``.
- Errors: one line ``error: ...`` on stderr and a documented exit code (``EXIT_CODES_HELP``);
  the traceback only with ``NCFM_DEBUG=1``.

Consoles are created per call (never at import) so that ``NO_COLOR``, redirected streams and
``typer.testing.CliRunner`` are all seen as they are at that moment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ncfm_core import parallel
from ncfm_core.devices import format_bytes
from ncfm_core.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED, NcfmError, as_user_error, one_line
from ncfm_core.jobs import JobInterrupted
from ncfm_core.jobs.events import signal_of
from ncfm_core.kernels import KernelLevers
from ncfm_core.store import Store, Timings, describe_peak_source

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 failure (one-line reason on stderr, e.g. a damaged store file; set "
    "NCFM_DEBUG=1 for the traceback); 2 usage error or invalid option; 3 artifact, version, dataset or "
    "file not found; 4 memory budget too small or out of memory; 5 accuracy below --min-acc; 6 a store "
    "lock held by another process past --lock-timeout; 7 the file system refused (permission denied, "
    "read-only, disk full, name too long); 130 interrupted by Ctrl-C "
    "(a checkpoint is saved first; continue with `ncfm resume REF`); 143 stopped by SIGTERM "
    "(likewise). With --json every error also prints {\"error\": {type, message, exit_code}} on stdout."
)


@dataclass(frozen=True)
class GlobalOptions:
    """The app-level options, handed to every command through ``ctx.obj``."""

    store: Path | None = None
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    lock_timeout: float | None = None  # None: $NCFM_LOCK_TIMEOUT, else the store's default

    def open_store(self) -> Store:
        return Store(self.store, lock_timeout=self.lock_timeout)

    def store_flag(self) -> str:
        """The ``--store DIR`` part to repeat in suggested commands ('' for the default store)."""
        return "" if self.store is None else f"--store {_shell_quote(str(self.store))} "


def global_options(ctx: typer.Context, json_flag: bool = False) -> GlobalOptions:
    """The options given before the command; ``json_flag`` is the command's own ``--json``."""
    obj = ctx.find_root().obj
    opts = obj if isinstance(obj, GlobalOptions) else GlobalOptions()
    return dataclasses.replace(opts, json=True) if json_flag else opts


def _shell_quote(text: str) -> str:
    safe = all(c.isalnum() or c in "@%+=:,./-_" for c in text)
    return text if safe and text else "'" + text.replace("'", "'\"'\"'") + "'"


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False)


# ----------------------------------------------------------------------------- results


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def print_json(obj: dict[str, Any]) -> None:
    """One JSON object on one line of stdout (strict JSON: non-finite floats become null)."""
    sys.stdout.write(json.dumps(_json_safe(obj), sort_keys=True, allow_nan=False) + "\n")
    sys.stdout.flush()


def print_pairs(pairs: list[tuple[str, Any]]) -> None:
    """Aligned ``key  value`` lines on stdout; plain text so long paths are never wrapped."""
    width = max((len(key) for key, _ in pairs), default=0)
    for key, value in pairs:
        typer.echo(f"{key:<{width}}  {'-' if value is None else value}")


def print_table(table: Table) -> None:
    # Piped output has no width; rich would assume 80 columns and truncate cells. Tables only
    # take the width their content needs, so a generous limit costs nothing.
    console = stdout_console() if sys.stdout.isatty() else Console(file=sys.stdout, highlight=False, width=240)
    console.print(table)


def format_loss(loss: float | None) -> str:
    """A loss for a progress line; None (not read back from the accelerator yet) as ``-``."""
    return "-" if loss is None else f"{loss:.4f}"


def format_flops(count: int | float | None) -> str:
    if count is None:
        return "-"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{int(count)} FLOP"


def print_plan(result: dict[str, Any]) -> None:
    """The human rendering of ``ncfm distill --dry-run`` (``ncfm_core.jobs.plan_job``): the plan
    as a short table, then the terms of its peak-memory estimate, largest first."""
    plan = result["plan"]
    shape = result.get("shape") or {}
    budget = "none" if plan.get("budget_bytes") is None else format_bytes(plan["budget_bytes"])
    source = plan.get("budget_source")
    pairs: list[tuple[str, Any]] = [
        ("dataset", f"{result.get('dataset')} ({shape.get('num_classes')} classes, {shape.get('channels')}x"
                    f"{shape.get('image_size')}x{shape.get('image_size')}, {shape.get('num_train')} train images)"),
        ("ipc", result.get("ipc")),
        ("device", f"{result.get('device')} ({result.get('device_reason')})"),
        ("real chunk", plan.get("real_chunk")),
        ("class chunk", plan.get("class_chunk")),
        ("precision", plan.get("precision")),
        ("checkpointing", "on" if plan.get("activation_checkpointing") else "off"),
        ("kernel levers", format_levers(plan.get("kernels"))),
        ("budget", budget if not source else f"{budget} ({source})"),
        ("estimated peak", format_bytes(plan.get("estimated_peak_bytes"))),
        ("FLOPs / iteration", format_flops(result.get("flops_per_iteration"))),
    ]
    if plan.get("estimated_seconds") is not None:  # the planner's time model (CUDA only)
        pairs.append(("estimated time", f"{plan['estimated_seconds']:.3f} s / iteration (time model)"))
    if plan.get("chosen_because"):
        pairs.append(("chosen because", plan["chosen_because"]))
    print_pairs(pairs)
    terms = plan.get("estimate_terms") or {}
    if terms:
        typer.echo("")
        typer.echo("estimate terms:")
        width = max(len(name) for name in terms)
        for name, size in sorted(terms.items(), key=lambda item: -item[1]):
            typer.echo(f"  {name:<{width}}  {format_bytes(size):>10}")
    typer.echo("")
    typer.echo("dry run: nothing was written to the store")


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {secs:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def format_accuracy(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def format_peak_memory(peak_bytes: int | None, source: str | None) -> str:
    """A run's measured peak and what it measures (the record's ``peak_memory_bytes`` and
    ``peak_memory_source``), as ``distill``, ``resume`` and ``inspect`` all show it."""
    if peak_bytes is None:
        return "-"
    return f"{format_bytes(peak_bytes)} ({describe_peak_source(source)})"


def format_levers(kernels: Any) -> str:
    """The kernel levers a plan records (``Plan.kernels``, lever -> choice), as the levers that
    differ from today's path; a plan recorded before the levers ran today's path."""
    defaults = KernelLevers().to_dict()
    changed = [f"{lever}={choice}" for lever, choice in (kernels or {}).items() if defaults.get(lever) != choice]
    return ", ".join(changed) or "none (today's kernels)"


def format_speed(timings: Timings) -> str:
    """The median seconds per iteration of each session that ran iterations (a distill, then each
    resume), each labelled with the iterations it covers; older records kept only the last
    session's median, and say so."""
    sessions = [s for s in timings.per_session if s.seconds_per_iteration_median is not None]
    if sessions:
        return "median " + ", ".join(f"{s.seconds_per_iteration_median:.3f} s/it (iterations {s.from_iteration}-"
                                     f"{s.to_iteration}{_compiled(s.compile_seconds)})" for s in sessions)
    if timings.seconds_per_iteration_median is None:
        return "no iteration timed"
    which = f" (the last of {timings.sessions} sessions)" if timings.sessions > 1 else ""
    return f"median {timings.seconds_per_iteration_median:.3f} s/it{which}"


def _compiled(seconds: float) -> str:
    """A session's compile time, said beside its speed (the compile lever; none: no words)."""
    return f", after {format_seconds(seconds)} compiling" if seconds else ""


# ----------------------------------------------------------------------------- logs


def log(opts: GlobalOptions, message: str, level: str = "info") -> None:
    """A log line on stderr: info unless --quiet, debug only with --verbose, warnings unless --quiet."""
    if opts.quiet or (level == "debug" and not opts.verbose):
        return
    prefix = "warning: " if level == "warning" else ""
    stderr_console().print(f"{prefix}{message}", markup=False)


class _Pacer:
    """When a plain progress line is due for one piece of work measured in ``total`` units
    (iterations, network-epochs): at every ``1 / parts`` of it, after ``every_seconds`` without
    a line, and at the end; and its ETA at the mean pace since the first report."""

    def __init__(self, clock: Callable[[], float], parts: int, every_seconds: float) -> None:
        self.clock, self.parts, self.every_seconds = clock, parts, every_seconds
        self.start: tuple[float, int] | None = None  # (time, units done) of the first report
        self.last: tuple[float, int] | None = None  # (time, units done) of the last line

    def report(self, done: int, units: int = 1) -> float:
        """Note a report of ``done`` units (``units`` of them new); returns the seconds since the
        last line (since the first report, before any line)."""
        now = self.clock()
        if self.start is None:
            self.start, self.last = (now, done), (now, done - units)
        assert self.last is not None
        return now - self.last[0]

    def line(self, done: int) -> None:
        """A line is printed now, at ``done`` units."""
        self.last = (self.clock(), done)

    def due(self, done: int, total: int, units: int = 1) -> bool:
        """Whether a line is due now that ``done`` of ``total`` units are done (``units`` of them
        by this report); if so, it counts as printed."""
        quiet_for = self.report(done, units)
        assert self.last is not None
        step = max(1, total // self.parts)
        due = done >= total or done // step > self.last[1] // step or quiet_for >= self.every_seconds
        if due:
            self.line(done)
        return due

    def eta(self, done: int, total: int, seconds_per_unit: float | None) -> str:
        """``, ETA <time left>`` at the mean pace since the first report (``seconds_per_unit`` until
        there is one; '' when neither is known)."""
        assert self.start is not None
        start_time, start_done = self.start
        pace = (self.clock() - start_time) / (done - start_done) if done > start_done else seconds_per_unit
        return "" if pace is None else f", ETA {format_seconds(max(total - done, 0) * pace)}"


class ProgressRenderer:
    """Turns job events (see ``ncfm_core.jobs``) into rich progress bars or log lines on stderr.

    Use as a context manager; pass the instance as the job's ``callback``.
    """

    def __init__(self, opts: GlobalOptions) -> None:
        self.opts = opts
        self.live = not (opts.json or opts.quiet) and sys.stderr.isatty()
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}
        self.last_artifact: str | None = None
        # Without a terminal (a log file, CI, nohup): plain lines, at most every 10% or
        # PLAIN_EVERY_SECONDS (every 5% with --verbose), and the last iteration.
        self.plain = not (opts.json or opts.quiet or self.live)
        self.clock = time.monotonic
        self._pacers: dict[str, _Pacer] = {}  # one per piece of work: "distill", "pool", "eval:<what>:<model>"
        self._finished: dict[str, list[float]] = {}  # accuracies of the networks an evaluation has finished

    PLAIN_EVERY_SECONDS = 60.0

    def _pacer(self, key: str) -> _Pacer:
        if key not in self._pacers:
            # the renderer's clock is read through a lambda so that tests may replace it at any time
            self._pacers[key] = _Pacer(lambda: self.clock(), 20 if self.opts.verbose else 10, self.PLAIN_EVERY_SECONDS)
        return self._pacers[key]

    def __enter__(self) -> ProgressRenderer:
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description:<8}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _log(self, message: str, level: str = "info") -> None:
        if self.progress is not None:
            if level != "debug" or self.opts.verbose:
                prefix = "warning: " if level == "warning" else ""
                self.progress.console.print(f"{prefix}{message}", markup=False, highlight=False)
            return
        log(self.opts, message, level)

    def _bar(self, key: str, description: str, total: int, completed: int, detail: str) -> None:
        assert self.progress is not None
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total, detail="")
        self.progress.update(self.tasks[key], total=total, completed=completed, detail=detail)

    def __call__(self, event: dict[str, Any]) -> None:
        stage = event.get("stage")
        if stage == "log":
            self._log(str(event.get("message", "")), str(event.get("level", "info")))
        elif stage == "created":
            self.last_artifact = str(event.get("artifact"))
        elif stage == "pool":
            self._pool(event)
        elif stage == "distill":
            iteration, total = int(event["iteration"]), int(event["total"])
            if self.progress is not None:
                self._bar("distill", "distill", total, iteration, f"loss {format_loss(event.get('loss'))}")
            elif self.plain and self._pacer("distill").due(iteration, total):
                eta = self._pacer("distill").eta(iteration, total, float(event["seconds"]))
                self._log(
                    f"distill: iteration {iteration}/{total} ({100 * iteration // max(total, 1)}%) loss "
                    f"{format_loss(event.get('loss'))}, {event['seconds']:.3f} s/it{eta}"
                )
        elif stage == "checkpoint":
            self._log(f"checkpoint at iteration {event['iteration']}", "debug")
        elif stage == "eval_epoch":
            self._eval_epoch(event)
        elif stage == "eval":
            self._eval_network(event)

    def _pool(self, event: dict[str, Any]) -> None:
        """One trained epoch of a pool member: a bar, or a line every tenth of the pool's epochs or
        minute, and one for every trained network."""
        members, epochs = int(event["members"]), max(int(event["epochs"]), 1)
        member, epoch = int(event["member"]), int(event["epoch"])
        done, total = member * epochs + epoch + 1, members * epochs
        if self.progress is not None:
            self._bar("pool", "pool", total, done, f"net {member + 1}/{members} loss {event['loss']:.3f}")
            return
        if not self.plain:
            return
        pacer = self._pacer("pool")
        trained = epoch + 1 == epochs
        if not (pacer.due(done, total) or trained):
            return
        pacer.line(done)
        eta = pacer.eta(done, total, None) if done < total else ""
        if trained:
            self._log(f"pool: network {member + 1}/{members} trained (loss {event['loss']:.4f}){eta}")
        else:
            self._log(f"pool: network {member + 1}/{members} epoch {epoch + 1}/{epochs} loss {event['loss']:.4f}{eta}")

    @staticmethod
    def _eval_subject(event: dict[str, Any]) -> tuple[str, str]:
        """(key, subject) of an evaluation event: one per (trained-on set, model), e.g. "eval convnet"."""
        what = str(event.get("what", "synthetic"))
        model = event.get("model")
        label = {"synthetic": "eval"}.get(what, what)
        return f"eval:{what}:{model}", label if model is None else f"{label} {model}"

    def _eval_epoch(self, event: dict[str, Any]) -> None:
        """One trained epoch of one network (or of every repeat, when they train together)."""
        key, subject = self._eval_subject(event)
        first, stop = int(event["first"]), int(event["stop"])
        repeats, epochs = int(event["repeats"]), max(int(event["epochs"]), 1)
        epoch = int(event["epoch"])
        trained = stop - first
        done, total = first * epochs + (epoch + 1) * trained, repeats * epochs  # network-epochs
        networks = f"network {first + 1}/{repeats}" if trained == 1 else f"networks {first + 1}-{stop}/{repeats}"
        if self.progress is not None:
            self._bar(key, subject, total, done, f"{networks} epoch {epoch + 1}/{epochs}")
            return
        pacer = self._pacer(key)
        if not (self.plain and pacer.due(done, total, trained)):
            return
        finished = self._finished.get(key) or []
        so_far = f", mean of {len(finished)} trained {format_accuracy(statistics.fmean(finished))}" if finished else ""
        eta = pacer.eta(done, total, float(event.get("seconds", 0.0)) / trained)
        share = f"{100 * done // total}% of {repeats} network{'s' if repeats > 1 else ''}"  # the whole evaluation
        self._log(f"{subject}: {networks} epoch {epoch + 1}/{epochs} ({share}) loss {event['loss']:.4f}{so_far}{eta}")

    def _eval_network(self, event: dict[str, Any]) -> None:
        """One trained network's test accuracy."""
        key, subject = self._eval_subject(event)
        repeat, repeats = int(event["repeat"]), int(event["repeats"])
        self._finished.setdefault(key, []).append(float(event["accuracy"]))
        if self.progress is not None:
            if key in self.tasks:  # the epochs' bar: only say the network's accuracy
                self.progress.update(self.tasks[key], detail=f"network {repeat + 1}/{repeats} "
                                                             f"{format_accuracy(event['accuracy'])}")
            else:
                self._bar(key, subject, repeats, repeat + 1, f"last {format_accuracy(event['accuracy'])}")
        elif self.plain:
            # without a terminal the only sign of life during an evaluation (minutes per network on a CPU)
            self._log(f"{subject}: network {repeat + 1}/{repeats} accuracy {format_accuracy(event['accuracy'])}")


@contextlib.contextmanager
def job_progress(opts: GlobalOptions) -> Iterator[ProgressRenderer]:
    """Run a command's jobs with a :class:`ProgressRenderer` (the ``callback`` it yields).
    When they succeeded, under torchrun, the ranks leave the group together
    (:func:`ncfm_core.parallel.finish`; a failure skips it). Every command that runs a job
    enters this once, so results are printed after it (only where :func:`is_main`)."""
    with ProgressRenderer(opts) as progress:
        yield progress
    parallel.finish()


def is_main() -> bool:
    """Whether this process prints results: always in one process, only rank 0 under torchrun
    (every rank still exits with the same code)."""
    return parallel.current().is_main


# ----------------------------------------------------------------------------- errors


def exit_code_for(err: BaseException) -> int:
    """The documented exit code of an exception that reached the command line."""
    err = as_user_error(err)
    if isinstance(err, KeyboardInterrupt):
        return EXIT_TERMINATED if signal_of(err) == "SIGTERM" else EXIT_INTERRUPTED
    if isinstance(err, NcfmError):
        return int(err.exit_code)
    if isinstance(err, CLICK_ERROR):  # a usage error found while the command line was parsed
        return int(getattr(err, "exit_code", 2))
    return EXIT_FAILURE


def error_line(err: BaseException) -> str:
    """The one line a failed command prints on stderr (the only place errors become text): an
    ``OSError`` or running out of memory as :func:`ncfm_core.errors.as_user_error` words it."""
    err = as_user_error(err)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (SIGTERM)" if signal_of(err) == "SIGTERM" else "interrupted"
    if isinstance(err, NcfmError):
        return f"error: {one_line(err, limit=None)}"
    if isinstance(err, CLICK_ERROR):
        return f"error: {one_line(err.format_message(), limit=None)}; see --help"
    return f"error: unexpected {type(err).__name__}: {one_line(err, limit=None)} (set NCFM_DEBUG=1 for the traceback)"


CLICK_ERROR: type = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
"""Click's base of usage errors (typer re-exports only its subclass ``BadParameter``)."""


def wants_json(argv: list[str]) -> bool:
    """Whether a raw command line asks for ``--json`` (before any ``--``): usage errors are found
    before the options are parsed, so this is all there is to go by then."""
    for token in argv:
        if token == "--":
            return False
        if token == "--json":
            return True
    return False


def error_object(err: BaseException, message: str | None = None) -> dict[str, Any]:
    """What ``--json`` prints on stdout for a failed command: ``{"error": {type, message, exit_code}}``
    (``message`` is the stderr line without ``error: ``)."""
    text = message if message is not None else error_line(err).removeprefix("error: ")
    return {"error": {"type": type(as_user_error(err)).__name__, "message": text, "exit_code": exit_code_for(err)}}


def report_error(err: BaseException, json_output: bool, message: str | None = None) -> int:
    """Print a failed command's one line on stderr (``message``, else :func:`error_line`) and,
    with ``--json``, its :func:`error_object` on stdout (only where :func:`is_main`); returns the
    exit code."""
    line = message if message is not None else error_line(err)
    print(line, file=sys.stderr)
    if json_output and is_main():
        print_json(error_object(err, line.removeprefix("error: ")))
    return exit_code_for(err)


@contextlib.contextmanager
def command_errors(opts: GlobalOptions) -> Iterator[None]:
    """Run a command body: map exceptions to a one-line message on stderr (with ``--json`` also
    :func:`error_object` on stdout) and ``typer.Exit``.

    ``NCFM_DEBUG=1`` re-raises instead, so the traceback is shown. ``typer.Exit`` passes.
    """
    try:
        yield
    except typer.Exit:
        raise
    except JobInterrupted as err:
        if err.checkpoint_iteration is not None:
            where = f"checkpoint saved at iteration {err.checkpoint_iteration}"
        else:
            where = "no checkpoint yet, so resuming starts it again"
        how = " by SIGTERM" if err.signal_name == "SIGTERM" else ""
        raise typer.Exit(report_error(err, opts.json, f"interrupted{how}: {err.version.ref} ({where}); continue with: "
                                                      f"ncfm {opts.store_flag()}resume {err.version.ref}")) from None
    except KeyboardInterrupt as err:
        raise typer.Exit(report_error(err, opts.json)) from None
    except Exception as err:
        if os.environ.get("NCFM_DEBUG") == "1":
            raise
        if getattr(err, "relayed", False):  # rank 0's error, passed on under torchrun: rank 0 printed it
            raise typer.Exit(exit_code_for(err)) from None
        raise typer.Exit(report_error(err, opts.json)) from None
