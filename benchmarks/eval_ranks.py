"""`ncfm eval` on one process vs K processes under torchrun (repeats spread over the ranks).

Makes a small digits artifact in a temporary store, then times the two commands as a user
runs them (wall time of the whole command, start-up included), alternating which goes first
in each round. Reports the per-round times, their medians, the ratio one / K and both
commands' accuracies, and writes the table to ``docs/benchmarks/eval_ranks.md``.

    uv run python benchmarks/eval_ranks.py [--ranks 2] [--repeats 4] [--epochs 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report_kit import command_line, log_to_stderr, machine_lines

ROOT = Path(__file__).resolve().parent.parent
MODES = ("one process", "torchrun")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fractions(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def run(command: list[str]) -> tuple[float, dict]:
    """Wall seconds of ``command`` and the JSON document it printed."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr}")
    return elapsed, json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="processes under torchrun (default 2)")
    parser.add_argument("--repeats", type=int, default=4, help="networks per evaluation (default 4)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per network (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each command (default 3)")
    parser.add_argument("--ipc", type=int, default=10, help="images per class of the artifact (default 10)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "eval_ranks.md")
    args = parser.parse_args(argv)
    if args.ranks < 2 or args.repeats < 1 or args.epochs < 0 or args.rounds < 1:
        parser.error("--ranks must be >= 2, --repeats and --rounds >= 1, --epochs >= 0")

    with tempfile.TemporaryDirectory(prefix="ncfm-eval-ranks-") as store:
        ncfm = [sys.executable, "-m", "ncfm_cli", "--store", store, "--json"]
        log_to_stderr("making a small digits artifact (2 iterations: this measures evaluation, not quality)")
        run([*ncfm, "distill", "digits", "--name", "bench", "--ipc", str(args.ipc), "--iterations", "2",
             "--pool-size", "1", "--pool-epochs", "1", "--device", args.device])
        evaluation = ["eval", "bench", "--repeats", str(args.repeats), "--epochs", str(args.epochs),
                      "--device", args.device]
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        runs: dict[str, list[float]] = {}
        for round_index in range(args.rounds):
            order = MODES if round_index % 2 == 0 else MODES[::-1]  # cancel drift in machine load
            for mode in order:
                command = [*ncfm, *evaluation]
                if mode == "torchrun":
                    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
                               f"--master_port={free_port()}", *command[1:]]
                elapsed, record = run(command)
                seconds[mode].append(elapsed)
                runs[mode] = record["accuracy"]["runs"]
                log_to_stderr(f"round {round_index + 1}/{args.rounds} {mode:12s} {elapsed:8.2f} s")

    median = {mode: statistics.median(seconds[mode]) for mode in MODES}
    ratio = median["one process"] / median["torchrun"]
    gap = max(abs(a - b) for a, b in zip(runs["one process"], runs["torchrun"]))
    lines = [
        "# `ncfm eval` on several processes",
        "",
        "Written by `benchmarks/eval_ranks.py`. The same evaluation run as one process and as",
        f"{args.ranks} processes under `torchrun`, each rank training a contiguous block of the repeats",
        "([multi-GPU](../multi-gpu.md)). Times are of the whole command, start-up included.",
        "",
        f"- command: `{command_line('benchmarks/eval_ranks.py', argv if argv is not None else sys.argv[1:])}`",
        *machine_lines(args.device),
        f"- workload: a digits synthetic set of IPC {args.ipc}, protocol `ncfm` (ConvNet-2 width 128), "
        f"{args.epochs} epochs, {args.repeats} repeats; torchrun leaves OMP_NUM_THREADS at its default "
        f"(1 per process), the single process uses torch's default thread count",
        f"- {args.rounds} timed rounds per command, alternating which goes first",
        "",
        "| command | " + " | ".join(f"round {i + 1} (s)" for i in range(args.rounds)) + " | median (s) |",
        "|---|" + "---|" * args.rounds + "---|",
    ]
    for mode in MODES:
        label = "one process" if mode == "one process" else f"torchrun, {args.ranks} processes"
        lines.append(f"| {label} | " + " | ".join(f"{s:.2f}" for s in seconds[mode]) + f" | {median[mode]:.2f} |")
    lines += [
        "",
        f"**Speed-up of {args.ranks} processes over one (ratio of medians): {ratio:.2f}x** (above 1: torchrun "
        "is faster)",
        "",
        "On a CPU, one process already spreads each convolution over every core (intra-op threads), so",
        "several processes can only win where those threads sit idle, and each pays its own start-up.",
        "torchrun is meant for one GPU per process; run this with `--device cuda` on a multi-GPU machine",
        "to measure that case.",
        "",
        f"Test accuracy per repeat: one process {_fractions(runs['one process'])}, torchrun "
        f"{_fractions(runs['torchrun'])}; largest difference {gap:.4f}. Each repeat has the same seed on",
        "both, so with the same number of CPU threads per process the two are equal exactly",
        "(tests/test_distributed.py checks it with one thread each); with a different thread count",
        "float reductions are summed in another order and an accuracy can move by a test image or two.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    raise SystemExit(main())
