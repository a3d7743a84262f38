"""`ncfm eval` on one process vs K processes under torchrun (repeats spread over the ranks).

Makes a small digits artifact in a temporary store, then times the two commands as a user
runs them (wall time of the whole command, start-up included), alternating which goes first
in each round. Reports the per-round times, their medians, the ratio one / K and both
commands' accuracies, and writes the table to ``docs/benchmarks/eval_ranks.md``.

    uv run python benchmarks/eval_ranks.py [--ranks 2] [--repeats 4] [--epochs 20] [--rounds 3]
"""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402

SCRIPT = "benchmarks/eval_ranks.py"
MODES = ("one process", "torchrun")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fractions(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def main(argv: list[str] | None = None) -> int:
    parser = kit.parser(
        __doc__,
        kit.timing_options(epochs=20, repeats=4, rounds_of="command", ipc_of="the artifact"),
        kit.device_option(),
        kit.out_option(kit.BENCHMARK_PAGES / "eval_ranks.md"),
    )
    parser.add_argument("--ranks", type=int, default=2, help="processes under torchrun (default 2)")
    args = parser.parse_args(argv)
    if args.ranks < 2 or args.repeats < 1 or args.epochs < 0 or args.rounds < 1:
        parser.error("--ranks must be >= 2, --repeats and --rounds >= 1, --epochs >= 0")

    with tempfile.TemporaryDirectory(prefix="ncfm-eval-ranks-") as store:
        ncfm = [sys.executable, "-m", "ncfm_cli", "--store", store, "--json"]
        kit.log("making a small digits artifact (2 iterations: this measures evaluation, not quality)")
        kit.run_json([*ncfm, "distill", "digits", "--name", "bench", "--ipc", str(args.ipc), "--iterations", "2",
                      "--pool-size", "1", "--pool-epochs", "1", "--device", args.device])
        evaluation = [*ncfm, "eval", "bench", "--repeats", str(args.repeats), "--epochs", str(args.epochs),
                      "--device", args.device]

        def measure(mode: str) -> tuple[float, list[float]]:
            command = evaluation
            if mode == "torchrun":
                command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
                           f"--master_port={free_port()}", *evaluation[1:]]
            elapsed, record = kit.run_json(command)
            return elapsed, record["accuracy"]["runs"]

        seconds, runs = kit.alternating_rounds(MODES, args.rounds, measure)

    median = kit.medians(seconds)
    gap = max(abs(a - b) for a, b in zip(runs["one process"], runs["torchrun"]))
    lines = [
        "# `ncfm eval` on several processes",
        "",
        f"Written by `{SCRIPT}`. The same evaluation run as one process and as",
        f"{args.ranks} processes under `torchrun`, each rank training a contiguous block of the repeats",
        "([multi-GPU](../multi-gpu.md)). Times are of the whole command, start-up included.",
        "",
        f"- command: `{kit.command_line(SCRIPT, argv)}`",
        *kit.machine_lines(args.device),
        f"- workload: a digits synthetic set of IPC {args.ipc}, protocol `ncfm` (ConvNet-2 width 128), "
        f"{args.epochs} epochs, {args.repeats} repeats; torchrun leaves OMP_NUM_THREADS at its default "
        f"(1 per process), the single process uses torch's default thread count",
        f"- {args.rounds} timed rounds per command, alternating which goes first",
        "",
        *kit.rounds_table("command", seconds, {"torchrun": f"torchrun, {args.ranks} processes"}),
        "",
        f"**Speed-up of {args.ranks} processes over one (ratio of medians): "
        f"{kit.ratio(median['one process'], median['torchrun'])}** (above 1: torchrun is faster)",
        "",
        "On a CPU, one process already spreads each convolution over every core (intra-op threads), so",
        "several processes can only win where those threads sit idle, and each pays its own start-up.",
        "torchrun is meant for one GPU per process; run this with `--device cuda` on a multi-GPU machine",
        "to measure that case.",
        "",
        f"Test accuracy per repeat: one process {_fractions(runs['one process'])}, torchrun "
        f"{_fractions(runs['torchrun'])}; largest difference {gap:.4f}. Each repeat has the same seed on",
        "both, so with the same number of CPU threads per process the two are equal exactly",
        "(tests/test_parallel.py checks it with one thread each); with a different thread count",
        "float reductions are summed in another order and an accuracy can move by a test image or two.",
        "",
    ]
    kit.write_page(args.out, lines, echo=True)
    return 0


if __name__ == "__main__":
    kit.passive_omp_wait()
    raise SystemExit(main())
