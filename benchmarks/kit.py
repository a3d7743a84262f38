"""What the benchmark and results scripts share, written once.

- paths, the command line a page quotes, stderr logging;
- argument-parser parents for the options several scripts take (``--device``, ``--threads``,
  ``--out``, ``--seed``, the timing options ``--epochs --rounds --repeats --ipc``);
- thread set-up: torch's CPU threads and the OpenMP environment of this and child processes;
- the machine description written next to every result;
- writing a Markdown page;
- running a subprocess, timing it and parsing the JSON it prints;
- timing with device syncs, alternating rounds, medians, ratios and seconds formatting;
- the results tables (method rows, distill + evaluate one row, their Markdown) of
  digits_table.py and paper_table.py.

Plots live in ``report_kit.py``. Not a package: scripts import it as a sibling module (their
directory is on ``sys.path``); ``tools/docs_pictures.py`` puts ``benchmarks/`` there itself.

This module imports torch only inside the functions that need it, so that a script can call
:func:`passive_omp_wait` before torch loads (OpenMP reads its environment once, at load).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ncfm_core import __version__
from ncfm_core.metrics import fair_metrics

if TYPE_CHECKING:
    import torch

    from ncfm_core.config import DistillConfig
    from ncfm_core.data import ImageDataset
    from ncfm_core.evaluate import EvalConfig, EvalResult
    from ncfm_core.pool import Pool

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BENCHMARK_PAGES = DOCS / "benchmarks"

# The kernel levers' ablation (issue 23): name -> (the run's ``kernels`` option, as
# ``ncfm_core.kernels`` reads it; cuDNN autotuning on CUDA). Today's path (the command line's:
# no lever, no autotuning), each lever alone, all of them together, the device's defaults
# ("auto"), today's path again (the spread between the two identical rows is the noise).
# distill_speed.py runs every row; kernel_speed.py the rows a network alone can run
# (NETWORK_LEVERS).
ALL_KERNEL_LEVERS = "pool=broadcast,norm=batchnorm,casts=once,layout=nhwc,compile=on,graphs=on"
KERNEL_VARIANTS: dict[str, tuple[str, bool | None]] = {  # (kernels option, cuDNN autotuning; None: the plan's)
    "today's path": ("default", False),
    "pool=broadcast": ("pool=broadcast", False),
    "pool=reshape": ("pool=reshape", False),
    "norm=batchnorm": ("norm=batchnorm", False),
    "casts=once": ("casts=once", False),
    "layout=nhwc": ("layout=nhwc", False),
    "cudnn autotuning": ("default", True),
    "compile=on": ("compile=on", False),
    "graphs=on": ("graphs=on", False),
    "all levers": (ALL_KERNEL_LEVERS, True),
    "auto (the defaults)": ("auto", None),
    "today's path (again)": ("default", False),
}
NETWORK_LEVERS = ("pool", "norm", "casts", "layout")  # what a network alone runs; compile and graphs are the loop's


# ----------------------------------------------------------------------------- command, log


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """How a page quotes its own invocation: ``uv run python SCRIPT ARGS`` (``argv`` None: this
    process's arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return "uv run python " + " ".join(shlex.quote(a) for a in [script, *args])


def log(message: str) -> None:
    """A timestamped progress line on stderr (stdout is kept for results)."""
    stamp = _dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- options


def parser(doc: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A script's parser: the first line of its docstring as description, then ``parents``."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], parents=list(parents))


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def device_option(default: str = "cpu", kinds: str = "cpu or cuda") -> argparse.ArgumentParser:
    """``--device`` (help: ``KINDS (default DEFAULT)``)."""
    parent = _parent()
    parent.add_argument("--device", default=default, help=f"{kinds} (default {default})")
    return parent


def threads_option(
    default: int | None = None, help: str = "torch CPU threads (default: torch's choice)"  # noqa: A002
) -> argparse.ArgumentParser:
    """``--threads``; hand the value to :func:`set_threads` or :func:`child_env`."""
    parent = _parent()
    parent.add_argument("--threads", type=int, default=default, help=help)
    return parent


def out_option(default: Path, help: str | None = None) -> argparse.ArgumentParser:  # noqa: A002
    """``--out``: the page (or docs directory) a script writes."""
    parent = _parent()
    parent.add_argument("--out", type=Path, default=default, help=help)
    return parent


def seed_option(what: str) -> argparse.ArgumentParser:
    """``--seed`` (default 0; help: ``WHAT seed (default 0)``)."""
    parent = _parent()
    parent.add_argument("--seed", type=int, default=0, help=f"{what} seed (default 0)")
    return parent


def repeats_option(default: int, what: str) -> argparse.ArgumentParser:
    """``--repeats``: evaluation networks (help: ``WHAT (default DEFAULT)``)."""
    parent = _parent()
    parent.add_argument("--repeats", type=int, default=default, help=f"{what} (default {default})")
    return parent


def timing_options(*, epochs: int, repeats: int, rounds_of: str, ipc_of: str, rounds: int = 3,
                   ipc: int = 10) -> argparse.ArgumentParser:
    """``--epochs --rounds --repeats --ipc`` of the scripts that time evaluations in rounds."""
    parent = argparse.ArgumentParser(add_help=False, parents=[repeats_option(repeats, "networks per evaluation")])
    parent.add_argument("--epochs", type=int, default=epochs, help=f"training epochs per network (default {epochs})")
    parent.add_argument("--rounds", type=int, default=rounds,
                        help=f"timed rounds of each {rounds_of} (default {rounds})")
    parent.add_argument("--ipc", type=int, default=ipc, help=f"images per class of {ipc_of} (default {ipc})")
    return parent


# ----------------------------------------------------------------------------- threads


def passive_omp_wait(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Idle OpenMP threads sleep instead of spinning (unless the caller chose otherwise): on a
    shared 2-core machine spinning threads measured 2-3x slower evaluations. In this process
    (``env`` None) it must run before torch loads; returns the environment it changed."""
    env = os.environ if env is None else env
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def child_env(threads: int | None = None) -> dict[str, str]:
    """This process's environment for a child: passive OpenMP waits, ``OMP_NUM_THREADS=threads``
    when given."""
    env = dict(passive_omp_wait(dict(os.environ)))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def set_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads (None: leave torch's choice)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class Machine:
    """Where a result was measured."""

    system: str
    arch: str
    processor: str  # platform.processor(), often empty on Linux
    cpu_model: str  # /proc/cpuinfo's model name where there is one, else processor or arch
    cpus: int | None
    threads: int
    torch: str
    python: str
    gpu_name: str | None
    gpu_memory: int | None

    def summary(self) -> str:
        """One sentence: CPU model, logical CPUs, torch and its threads, the GPU if any."""
        text = f"{self.cpu_model}, {self.cpus} logical CPUs, torch {self.torch}, {self.threads} threads"
        if self.gpu_name is not None:
            from ncfm_core.devices import format_bytes

            text += f"; GPU {self.gpu_name} ({format_bytes(self.gpu_memory)})"
        return text


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: Any = "cpu") -> Machine:
    """The machine, torch and, for a CUDA ``device``, the GPU (any text that is not a CUDA device
    describes the CPU alone)."""
    import torch

    gpu_name = gpu_memory = None
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        gpu_name, gpu_memory = props.name, props.total_memory
    return Machine(platform.system(), platform.machine(), platform.processor(), _cpu_model(), os.cpu_count(),
                   torch.get_num_threads(), torch.__version__, platform.python_version(), gpu_name, gpu_memory)


def machine_lines(device: str) -> list[str]:
    """The Markdown bullets of machine, software and date every results page carries."""
    machine = describe_machine(device)
    return [
        f"- machine: {machine.system} {machine.arch}, os.cpu_count() = {machine.cpus}, "
        f"torch threads = {machine.threads}, device {device}",
        f"- software: ncfm {__version__}, torch {machine.torch}, Python {machine.python}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


# ----------------------------------------------------------------------------- pages


def write_page(path: Path, content: str | Iterable[str], *, echo: bool = False) -> Path:
    """Write ``content`` (text, or lines to join) as a Markdown page ending in one newline,
    creating its directory; ``echo`` also prints it to stdout. Returns ``path``."""
    text = content if isinstance(content, str) else "\n".join(content)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    if echo:
        print(text.rstrip())
    return path


def write_json(path: Path, record: Any) -> Path:
    """Write ``record`` next to a page: indented, keys sorted, anything else as its ``str``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------- subprocesses


def run_command(command: Sequence[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None,
                label: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``command`` to the end, capturing its output; returns (wall seconds, the finished
    process). Exits with ``label`` (default: the command), the exit code and stderr's tail if
    the command fails."""
    started = time.perf_counter()
    done = subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        what = label or " ".join(command)
        raise SystemExit(f"{what} failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")
    return seconds, done


def parse_json_output(stdout: str) -> Any:
    """The JSON document a command printed: all of stdout, else its last line (for commands
    that print other lines before it)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return json.loads(stdout.strip().splitlines()[-1])


def run_json(command: Sequence[str], **kwargs: Any) -> tuple[float, Any]:
    """:func:`run_command`, then the JSON document it printed: (wall seconds, document)."""
    seconds, done = run_command(command, **kwargs)
    return seconds, parse_json_output(done.stdout)


# ----------------------------------------------------------------------------- timing


def sync(device: Any) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class Timed(NamedTuple):
    wall: float
    cpu: float
    value: Any


def timed(fn: Callable[[], Any], device: Any = "cpu") -> Timed:
    """Wall and process-CPU seconds of ``fn()``, with the device synced before and after."""
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    value = fn()
    sync(device)
    return Timed(time.perf_counter() - started, time.process_time() - cpu_started, value)


def alternating_rounds(modes: Sequence[str], rounds: int,
                       measure: Callable[[str], tuple[float, Any]]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``rounds`` rounds of ``measure(mode)`` -> (seconds, result) for every mode, the order
    reversed every other round to cancel drift in machine load. Returns the seconds per mode and
    each mode's last result."""
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    last: dict[str, Any] = {}
    width = max(len(mode) for mode in modes)
    for round_index in range(rounds):
        for mode in modes if round_index % 2 == 0 else modes[::-1]:
            elapsed, last[mode] = measure(mode)
            seconds[mode].append(elapsed)
            log(f"round {round_index + 1}/{rounds} {mode:{width}s} {elapsed:8.2f} s")
    return seconds, last


def medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    return {key: statistics.median(values) for key, values in seconds.items()}


def ratio(numerator: float, denominator: float) -> str:
    """A speed-up as pages print it: ``1.23x``."""
    return f"{numerator / denominator:.2f}x"


def rounds_table(first_header: str, seconds: dict[str, list[float]], labels: dict[str, str] | None = None
                 ) -> list[str]:
    """Markdown rows: one line per mode, its seconds per round and their median."""
    rounds = max(len(values) for values in seconds.values())
    lines = [
        f"| {first_header} | " + " | ".join(f"round {i + 1} (s)" for i in range(rounds)) + " | median (s) |",
        "|---|" + "---|" * rounds + "---|",
    ]
    for mode, values in seconds.items():
        label = (labels or {}).get(mode, mode)
        lines.append(f"| {label} | " + " | ".join(f"{s:.2f}" for s in values) + f" | {statistics.median(values):.2f} |")
    return lines


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


# ----------------------------------------------------------------------------- results tables


@dataclass(frozen=True)
class Method:
    """One row of a results table: ``overrides`` of the distillation config (None: no
    distillation, a random real subset of the same IPC)."""

    key: str
    label: str
    overrides: dict[str, Any] | None


METHODS: tuple[Method, ...] = (
    Method("random", "Random real subset", None),
    Method("mmd", "Mean matching, DM-style (`--matching mmd`)", {"matching": "mmd", "sampler": False}),
    Method("ncfm_no_psi", "NCFM without psi (`--no-sampler`)", {"matching": "ncfm", "sampler": False}),
    Method("ncfm", "NCFM with psi (default)", {"matching": "ncfm", "sampler": True}),
)


@dataclass
class RowResult:
    """What one table cell needs. Accuracies are fractions in [0, 1]."""

    method: str
    ipc: int
    runs: list[float]
    distill_seconds: float | None = None
    eval_seconds: float = 0.0
    final_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.runs) / len(self.runs)

    @property
    def std(self) -> float:
        # population std over repeats, as EvalResult.std
        mean = self.mean
        return math.sqrt(sum((r - mean) ** 2 for r in self.runs) / len(self.runs)) if len(self.runs) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra, "method": self.method, "ipc": self.ipc, "runs": self.runs, "mean": self.mean,
            "std": self.std, "distill_seconds": self.distill_seconds, "eval_seconds": self.eval_seconds,
            "final_loss": self.final_loss,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RowResult:
        """Inverse of :meth:`to_dict` (``mean`` and ``std`` are recomputed from ``runs``)."""
        fields = ("method", "ipc", "runs", "distill_seconds", "eval_seconds", "final_loss")
        extra = {k: v for k, v in data.items() if k not in (*fields, "mean", "std")}
        return cls(data["method"], int(data["ipc"]), [float(r) for r in data["runs"]], data.get("distill_seconds"),
                   float(data.get("eval_seconds") or 0.0), data.get("final_loss"), extra)


class PoolCache:
    """Train each distinct pool once (keyed by ``PoolSpec.key()``) and hand it to every run."""

    def __init__(self, dataset: ImageDataset, device: str, log: Callable[[str], None] = log) -> None:
        self.dataset, self.device, self.log = dataset, device, log
        self.pools: dict[str, Pool] = {}
        self.seconds = 0.0

    def get(self, config: DistillConfig) -> Pool:
        from ncfm_core.pool import PoolSpec, train_pool

        spec = PoolSpec.from_config(config, self.dataset)
        key = spec.key()
        if key not in self.pools:
            started = time.perf_counter()
            self.log(f"training a pool of {spec.size} x {spec.network} for {spec.epochs} epoch(s)")
            self.pools[key] = train_pool(spec, self.dataset, self.device)
            elapsed = time.perf_counter() - started
            self.seconds += elapsed
            accuracies = ", ".join(f"{100 * a:.1f}%" for a in self.pools[key].test_accuracy)
            self.log(f"pool trained in {elapsed:.0f} s (member test accuracy {accuracies})")
        return self.pools[key]


def distill_and_evaluate(
    config: DistillConfig,
    dataset: ImageDataset,
    pools: PoolCache,
    eval_config: EvalConfig,
    device: str,
    method: str,
) -> tuple[RowResult, torch.Tensor, torch.Tensor]:
    """Distill with ``config`` (pool from ``pools``), evaluate the synthetic set with
    ``eval_config``; returns the row and the stored images (M, C, H, W) and labels (M,). The
    run is planned and set up as a job does it (``make_plan``, ``apply_run_settings``: the
    free memory's plan, its backend settings), so a table measures what ``ncfm distill`` runs."""
    import torch

    from ncfm_core.data import DatasetShape
    from ncfm_core.devices import MemoryBudget
    from ncfm_core.distill import Distiller
    from ncfm_core.evaluate import evaluate_synset
    from ncfm_core.jobs.plan import apply_run_settings, make_plan
    from ncfm_core.runtime import configure_allocator

    configure_allocator()  # a no-op after the first call; before CUDA starts in a fresh process
    pool = pools.get(config)
    started = time.perf_counter()
    plan, _ = make_plan(config, DatasetShape.of(dataset), torch.device(device), MemoryBudget())
    apply_run_settings(plan, torch.device(device), MemoryBudget())
    distiller = Distiller(plan.apply(config), dataset, pool, device)
    distiller.run(config.iterations)
    distill_seconds = time.perf_counter() - started
    images, labels = distiller.synthetic_set()
    result = evaluate_synset(images, labels, config.factor, dataset, eval_config, device)
    final_loss = distiller.loss_curve[-1][1] if distiller.loss_curve else None
    row = RowResult(method, config.ipc, list(result.runs), distill_seconds, result.seconds, final_loss)
    return row, images, labels


def eval_row(method: str, ipc: int, result: EvalResult) -> RowResult:
    return RowResult(method, ipc, list(result.runs), None, result.seconds)


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def main_table(rows: Sequence[RowResult], ipcs: Sequence[int], random_by_ipc: dict[int, float],
               full_accuracy: float | None, reference: dict[tuple[str, int], float] | None = None) -> str:
    """The results table: one line per (method, IPC): accuracy mean +- std (percent), IOR,
    HLR and LRS (differences of fractions, see ncfm_core.metrics), distillation time. With
    ``reference`` ({(method key, ipc): percent}), a last column quotes the paper's figure."""
    header = "| method | IPC | test accuracy % (mean ± std) | repeats | IOR | HLR | LRS | distill s |"
    rule = "|---|---|---|---|---|---|---|---|"
    if reference is not None:
        header, rule = header + " paper % |", rule + "---|"
    lines = [header, rule]
    labels = {m.key: m.label for m in METHODS}
    for ipc in ipcs:
        for row in [r for r in rows if r.ipc == ipc]:
            metrics = fair_metrics(row.mean, random_by_ipc.get(ipc), full_accuracy)
            seconds = "-" if row.distill_seconds is None else f"{row.distill_seconds:.0f}"
            lrs = metrics.get("lrs")
            line = (
                f"| {labels.get(row.method, row.method)} | {ipc} | {pct(row.mean)} ± {pct(row.std)} | "
                f"{len(row.runs)} | {signed(metrics.get('ior'))} | {signed(metrics.get('hlr'))} | "
                f"{'-' if lrs is None else f'{lrs:.3f}'} | {seconds} |"
            )
            if reference is not None:
                quoted = reference.get((row.method, ipc))
                line += f" {'-' if quoted is None else f'{quoted:.1f}'} |"
            lines.append(line)
    return "\n".join(lines)


def sweep_table(name: str, rows: Sequence[tuple[Any, RowResult]], random_accuracy: float | None) -> str:
    lines = [f"| {name} | test accuracy % (mean ± std) | repeats | IOR | final loss |", "|---|---|---|---|---|"]
    for value, row in rows:
        ior = None if random_accuracy is None else row.mean - random_accuracy
        loss = "-" if row.final_loss is None else f"{row.final_loss:.4f}"
        lines.append(f"| {value} | {pct(row.mean)} ± {pct(row.std)} | {len(row.runs)} | {signed(ior)} | {loss} |")
    return "\n".join(lines)
