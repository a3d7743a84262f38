"""The pictures of the docs, made with the ``ncfm`` command exactly as a user would.

For each IPC (default 1 and 10), in a fresh store:

1. ``ncfm distill digits --ipc N --iterations 0 --name digits-ipcN-init``: the real
   initialisation (same seed, so the same images the full run starts from);
2. ``ncfm distill digits --ipc N`` (the digits preset; with ``--eval --eval-baseline random`` for
   the README's IPC 1);
3. ``ncfm export ... --format grid`` of both, copied to ``docs/images/digits_ipcN_init.png`` and
   ``docs/images/digits_ipcN.png``;
4. the ``loss_curve`` of every full run's manifest (``ncfm inspect --json``), drawn into
   ``docs/images/loss_curve.png``.

The commands, their stdout and their wall times go to ``docs/results/digits_cli_run.md``.

    uv run python tools/docs_pictures.py              # about 5 min on 2 idle CPU cores
    uv run python tools/docs_pictures.py --quick      # a few iterations, for testing
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

# the benchmarks' shared kit and plot (not a package: a directory on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import kit  # noqa: E402
import report_kit as plots  # noqa: E402

SCRIPT = "tools/docs_pictures.py"


def run_ncfm(store: Path, args: list[str], transcript: list[str], env_threads: int | None, cwd: Path) -> str:
    """Run ``ncfm --store STORE ARGS`` in a subprocess in ``cwd``; returns stdout, records it in
    the transcript (with the store shown as the default store and ``cwd`` left out); raises with
    stderr on failure."""
    command = [sys.executable, "-m", "ncfm_cli", "--store", str(store), *args]
    shown = "ncfm " + " ".join(shlex.quote(a) for a in args)
    kit.log(shown)
    seconds, done = kit.run_command(command, cwd=cwd, env=kit.child_env(env_threads), label=shown)
    stdout = done.stdout.replace(str(store), "~/.local/share/ncfm").replace(f"{cwd}{os.sep}", "")
    transcript += [f"### `{shown}`", "", f"{seconds:.0f} s wall time, exit code 0. stdout:", "", "```",
                   stdout.rstrip(), "```", ""]
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = kit.parser(
        __doc__,
        kit.out_option(kit.DOCS, "docs directory (default docs/)"),
        kit.threads_option(help="OMP_NUM_THREADS of the ncfm processes"),
    )
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--eval-ipc", type=int, default=1, help="the IPC distilled with --eval (the README's)")
    parser.add_argument("--quick", action="store_true", help="a few iterations and epochs, for testing")
    parser.add_argument("--store", type=Path, default=None, help="store to use (default: a temporary one)")
    args = parser.parse_args(argv)

    # The initialisation run must share the pool settings (and seed) of the full run: then it
    # starts from the same images and reuses the cached pool.
    quick_pool = ["--pool-size", "1", "--pool-epochs", "1", "--real-per-class", "8"] if args.quick else []
    quick_iterations = ["--iterations", "3"] if args.quick else []
    quick_eval = ["--eval-epochs", "2", "--eval-repeats", "2"] if args.quick else []
    images_dir, results_dir = args.out / "images", args.out / "results"
    images_dir.mkdir(parents=True, exist_ok=True)
    transcript = [
        "# The digits run behind the docs' pictures",
        "",
        f"Written by `{kit.command_line(SCRIPT, argv)}`, which runs the `ncfm`",
        "commands below in a fresh store (its path is shown as `~/.local/share/ncfm`).",
        "",
        *kit.machine_lines("cpu (auto)"),
        f"- load average (1 min, all processes) at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        "",
    ]
    curves = []
    with tempfile.TemporaryDirectory(prefix="ncfm_docs_") as temp:
        work = Path(temp)
        store = args.store or work / "store"

        def ncfm(command: list[str], record: bool = True) -> str:
            return run_ncfm(store, command, transcript if record else [], args.threads, work)

        for ipc in args.ipcs:
            init_name, name = f"digits-ipc{ipc}-init", f"digits-ipc{ipc}"
            ncfm(["distill", "digits", "--ipc", str(ipc), "--iterations", "0", "--name", init_name, *quick_pool])
            with_eval = ["--eval", "--eval-baseline", "random", *quick_eval] if ipc == args.eval_ipc else []
            ncfm(["distill", "digits", "--ipc", str(ipc), *quick_iterations, *quick_pool, *with_eval])
            for artifact, picture in ((init_name, f"digits_ipc{ipc}_init.png"), (name, f"digits_ipc{ipc}.png")):
                ncfm(["export", artifact, "--format", "grid", "--out", f"syn-{artifact}"])
                shutil.copyfile(work / f"syn-{artifact}" / "grid.png", images_dir / picture)
            curve = json.loads(ncfm(["--json", "inspect", name], record=False)).get("loss_curve") or []
            if curve:
                curves.append(plots.Series(f"IPC {ipc}", [p[0] for p in curve], [p[1] for p in curve]))
        ncfm(["ls"])
    if curves:
        plots.line_plot(curves, images_dir / "loss_curve.png", title="ncfm distill digits: loss (manifest loss_curve)",
                        x_label="iteration", y_label="loss (mean of 10 iterations)")
    transcript.append(f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f}.")
    kit.write_page(results_dir / "digits_cli_run.md", transcript)
    kit.log(f"wrote {images_dir} and {results_dir / 'digits_cli_run.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
