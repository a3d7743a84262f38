"""First contact: the README's main command, from a fresh store, against a reference checkout.

Runs the first ``uv run ncfm distill ...`` command of this tree's README.md and, with
``--reference DIR``, the first one of DIR's README.md (an older checkout, e.g. ``git worktree add
../ncfm-ref aa11a6b``), each from a fresh store, ``--rounds`` times, alternating which tree goes
first in each round. Both run with this environment's Python (``python -m ncfm_cli``, the tree
first on ``PYTHONPATH``), so they differ only in their code and their README's command.

For each run it records the wall time, the stages read from the artifact's manifest (pool
training, the distillation loop, the evaluation of the synthetic set and of its random real
baseline; "start-up and the rest" is what remains: Python, torch, the dataset, writing results),
the accuracy and its margin over random real images when the command evaluates one, the longest
silence on stderr (the progress lines a user sees without a terminal), and how much of the
machine other processes used meanwhile (``/proc/stat``; "idle" below 5 %). It writes the medians
and the ratio of the medians to ``docs/benchmarks/first_contact.md``.

    uv run python benchmarks/first_contact.py --reference ../ncfm-ref             # 3 rounds
    uv run python benchmarks/first_contact.py --reference ../ncfm-ref --quick     # 1 round
"""

from __future__ import annotations

import json
import os
import pstats
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402

SCRIPT = "benchmarks/first_contact.py"
STAGES = ("start-up and the rest", "pool", "loop", "eval synthetic", "eval random")
# The page's hand-written part (the levers measured one by one) starts at this line; rewriting the
# page keeps it.
KEPT_MARKER = "<!-- written by hand below this line; benchmarks/first_contact.py keeps it -->"
IDLE_SHARE = 0.05  # other processes' share of the machine below which a run counts as idle


def readme_command(tree: Path) -> list[str]:
    """The arguments of the first ``uv run ncfm distill ...`` line of ``tree``'s README.md."""
    for line in (tree / "README.md").read_text().splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith("uv run ncfm distill") else []
        if words:
            return words[3:]  # after "uv run ncfm"
    raise SystemExit(f"{tree / 'README.md'} has no line starting with 'uv run ncfm distill'")


def git_label(tree: Path) -> str:
    """``<short commit>`` of the tree (``+ changes`` when its work tree differs), or ``?``."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    return commit + (" + changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _busy_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy since boot (``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(value) for value in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


@dataclass
class Run:
    """One run of a tree's command."""

    wall: float
    stages: dict[str, float]
    longest_silence: float
    progress_lines: int
    others_share: float | None  # other processes' share of the machine's CPUs during the run
    accuracy: float | None = None
    random: float | None = None
    protocol: str | None = None
    iterations: int | None = None
    evaluation: str = "-"
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def margin(self) -> float | None:
        return None if self.accuracy is None or self.random is None else self.accuracy - self.random


def _read_lines(stream: Any, times: list[float]) -> None:
    for _ in stream:
        times.append(time.perf_counter())


def run_once(tree: Path, args: list[str]) -> Run:
    """Run ``ncfm ARGS`` of ``tree`` from a fresh store; stages from the artifact's manifest."""
    with tempfile.TemporaryDirectory(prefix="ncfm-first-contact-") as store:
        command = [sys.executable, "-m", "ncfm_cli", "--store", store, *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
        busy, children = _busy_seconds(), _children_cpu()
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        line_times: list[float] = []
        reader = threading.Thread(target=_read_lines, args=(process.stderr, line_times))
        reader.start()
        stdout = process.stdout.read() if process.stdout else ""
        process.wait()
        reader.join()
        wall = time.perf_counter() - started
        if process.returncode != 0:
            raise SystemExit(f"`ncfm {' '.join(args)}` in {tree.name} failed with exit code {process.returncode}")
        share = None
        busy_after = _busy_seconds()
        if busy is not None and busy_after is not None:
            others = (busy_after - busy) - (_children_cpu() - children)
            share = max(0.0, others) / (wall * (os.cpu_count() or 1))
        marks = [started, *line_times, started + wall]
        path = next(line.split(None, 1)[1] for line in stdout.splitlines() if line.startswith("path "))
        manifest = json.loads((Path(path.strip()) / "manifest.json").read_text())
    return _with_manifest(Run(wall, {}, max(b - a for a, b in zip(marks, marks[1:])), len(line_times), share),
                          manifest)


def _with_manifest(run: Run, manifest: dict[str, Any]) -> Run:
    timings = manifest.get("timings") or {}
    distill = float(timings.get("seconds", 0.0))
    pool = float(timings.get("pool_seconds", 0.0))
    evaluation = (manifest.get("evals") or [{}])[-1]
    eval_timings = evaluation.get("timings") or {}
    run.stages = {"pool": pool, "loop": distill - pool,
                  "eval synthetic": float(eval_timings.get("synthetic", 0.0)),
                  "eval random": float(eval_timings.get("random", 0.0))}
    run.stages["start-up and the rest"] = run.wall - distill - float(eval_timings.get("total", 0.0))
    run.iterations = manifest.get("iterations_done")
    if evaluation:
        protocol = evaluation.get("protocol") or {}
        run.protocol = str(protocol.get("protocol"))
        run.accuracy = float(evaluation["accuracy"]["mean"])
        random = (evaluation.get("baselines") or {}).get("random")
        run.random = None if random is None else float(random["accuracy"]["mean"])
        run.evaluation = (f"protocol {run.protocol}: {protocol.get('repeats')} x {protocol.get('model')} width "
                          f"{protocol.get('width')}, {protocol.get('epochs')} epochs")
    run.record = {"wall": run.wall, "stages": run.stages, "accuracy": run.accuracy, "random": run.random,
                  "longest_silence": run.longest_silence, "others_share": run.others_share}
    return run


# Where cProfile's cumulative time is read for each stage: (file name, function name).
PROFILED_STAGES = (("pool training", "pool.py", "train_pool"), ("distillation loop", "distill.py", "run"),
                   ("evaluations", "evaluate.py", "evaluate_images"))


def profile_lines(tree: Path, args: list[str], top: int = 12) -> list[str]:
    """Run ``ncfm ARGS`` of ``tree`` once more under cProfile; Markdown lines: the seconds of each
    stage (cumulative time of its function) and the ``top`` functions by own time (torch's
    operators show as built-in methods)."""
    with tempfile.TemporaryDirectory(prefix="ncfm-first-contact-") as work:
        output = Path(work) / "run.prof"
        command = [sys.executable, "-m", "cProfile", "-o", str(output), "-m", "ncfm_cli", "--store",
                   str(Path(work) / "store"), *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the profiled run failed with exit code {done.returncode}:\n{done.stderr[-2000:]}")
        stats = pstats.Stats(str(output)).stats  # type: ignore[attr-defined]
    total = max(entry[3] for entry in stats.values())
    lines = [f"Under cProfile (`python -m cProfile -m ncfm_cli {' '.join(args)}`, this tree, once; the profiler "
             f"slows Python-level code, so read shares, not seconds): {total:.1f} s in all.", "",
             "| stage (function) | cumulative s | share |", "|---|---|---|"]
    for label, file_name, function in PROFILED_STAGES:
        found = [entry[3] for (path, _, name), entry in stats.items()
                 if name == function and Path(path).name == file_name and "ncfm_core" in path]
        if found:
            seconds = max(found)
            lines.append(f"| {label} (`{file_name}` `{function}`) | {seconds:.1f} | {100 * seconds / total:.0f} % |")
    lines += ["", f"The {top} functions with the most own time:", "", "| function | own s | share |", "|---|---|---|"]
    for (path, line, name), entry in sorted(stats.items(), key=lambda item: -item[1][2])[:top]:
        where = name if path == "~" else f"{Path(path).name}:{line} {name}"
        lines.append(f"| `{where}` | {entry[2]:.1f} | {100 * entry[2] / total:.0f} % |")
    return lines


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f} points"


def _load_words(runs: list[Run]) -> str:
    shares = [run.others_share for run in runs if run.others_share is not None]
    if not shares:
        return "unknown (no /proc/stat)"
    low, high = min(shares), max(shares)
    if high < IDLE_SHARE:
        return f"idle (other processes used {100 * high:.0f} % of the CPUs at most)"
    spread = f"{100 * low:.0f} %" if round(100 * low) == round(100 * high) else f"{100 * low:.0f}-{100 * high:.0f} %"
    return f"loaded: other processes used {spread} of the CPUs during the runs"


def summary_rows(label: str, command: str, runs: list[Run]) -> list[str]:
    """One Markdown row per tree: the median wall time, every round's, the median stages and results."""
    stages = {name: _median([run.stages.get(name) for run in runs]) for name in STAGES}
    margin = _median([run.margin for run in runs])
    accuracy, random = _median([run.accuracy for run in runs]), _median([run.random for run in runs])
    return [
        f"| {label} | `{command}` | **{kit.fmt_seconds(statistics.median(r.wall for r in runs))}** | "
        + ", ".join(f"{run.wall:.1f}" for run in runs) + " | "
        + " | ".join(kit.fmt_seconds(stages[name]) for name in STAGES)
        + f" | {_pct(accuracy)} | {_pct(random)} | {_points(margin)} | "
        f"{kit.fmt_seconds(statistics.median(r.longest_silence for r in runs))} |"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = kit.parser(__doc__, kit.out_option(kit.BENCHMARK_PAGES / "first_contact.md"))
    parser.add_argument("--reference", type=Path, default=None,
                        help="a checkout of an earlier version (e.g. a git worktree of aa11a6b) to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree (default 3; medians)")
    parser.add_argument("--quick", action="store_true", help="one round (the lead's quick check)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the extra run of this tree under cProfile (where the time goes)")
    parser.add_argument("--extra", default="",
                        help="arguments appended to both commands, e.g. '--iterations 2' (tests; the page says so)")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    trees = {"this tree": kit.ROOT}
    if args.reference is not None:
        reference = args.reference.expanduser().resolve()
        if not (reference / "ncfm_cli").is_dir():
            parser.error(f"--reference {args.reference} is not an ncfm checkout (no ncfm_cli/ in it)")
        trees["reference"] = reference
    extra = shlex.split(args.extra)
    commands = {label: readme_command(tree) + extra for label, tree in trees.items()}
    labels = {label: f"{label} ({git_label(tree)})" for label, tree in trees.items()}

    def measure(label: str) -> tuple[float, Run]:
        run = run_once(trees[label], commands[label])
        kit.log(f"{label}: {run.wall:.1f} s, stages " + ", ".join(f"{k} {v:.1f} s" for k, v in run.stages.items())
                + f", accuracy {_pct(run.accuracy)}, random {_pct(run.random)}, longest silence "
                f"{run.longest_silence:.1f} s")
        return run.wall, run

    kit.log(f"{rounds} round(s) of: " + "; ".join(f"{label}: ncfm {' '.join(c)}" for label, c in commands.items()))
    runs: dict[str, list[Run]] = {label: [] for label in trees}
    modes = list(trees)
    for round_index in range(rounds):
        for label in modes if round_index % 2 == 0 else modes[::-1]:
            runs[label].append(measure(label)[1])

    shown_argv = list(sys.argv[1:] if argv is None else argv)
    if args.reference is not None:  # never a machine path on the page
        shown_argv = ["REF_DIR" if a == str(args.reference) else a for a in shown_argv]
    median = {label: statistics.median(run.wall for run in items) for label, items in runs.items()}
    everything = [run for items in runs.values() for run in items]
    lines = [
        "# First contact: the README's main command",
        "",
        f"Written by `{SCRIPT}`: the first `uv run ncfm distill` command of each tree's README, from a fresh",
        "store each time, the trees alternating; wall time of the whole command (Python start-up included),",
        "stages from the artifact's manifest (start-up and the rest: Python, torch, loading the dataset,",
        "writing the results), the longest stretch without a line on stderr (no terminal: the plain",
        "progress lines).",
        "",
        f"- command: `{kit.command_line(SCRIPT, shown_argv)}`",
        *kit.machine_lines("cpu"),
        f"- load: {_load_words(everything)}",
        f"- rounds: {rounds} per tree; medians",
    ]
    if extra:
        lines.append(f"- `--extra {args.extra}` was appended to every command: a test of this script, "
                     "not a measurement")
    lines += [
        "",
        "| tree | command | median wall (s) | rounds (s) | " + " | ".join(f"{name} (s)" for name in STAGES)
        + " | accuracy | random real | margin | longest silence (s) |",
        "|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|---|",
    ]
    for label, items in runs.items():
        lines += summary_rows(labels[label], "ncfm " + " ".join(commands[label]), items)
    lines += ["", "Evaluation: " + "; ".join(f"{label}: {items[-1].evaluation}" for label, items in runs.items())]
    if "reference" in runs:
        lines += ["", f"**Speed-up over the reference (ratio of the median wall times, reference / this tree): "
                      f"{kit.ratio(median['reference'], median['this tree'])}**"]
    if args.profile:
        kit.log("this tree once more, under cProfile")
        lines += ["", "## Where the time goes", "", *profile_lines(trees["this tree"], commands["this tree"])]
    old = args.out.read_text() if args.out.exists() else ""
    if KEPT_MARKER in old:
        lines += ["", KEPT_MARKER + old.split(KEPT_MARKER, 1)[1].rstrip()]
    kit.write_page(args.out, lines, echo=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
