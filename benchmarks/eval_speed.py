"""Evaluation speed: R repeats trained together (stacked parameters + vmap) vs one by one.

On digits, a synthetic set of IPC 10 (a seeded random real subset: this measures training
speed, not quality), the ``ncfm`` protocol with a short schedule, 5 repeats. Both modes run
side by side in one process, alternating which goes first in each round, after one
discarded warm-up of each (the first vmap call pays a one-off setup). Reports per-round
wall times, their medians and the ratio sequential / batched, and writes the table to
``docs/benchmarks/eval_speed.md``.

    uv run python benchmarks/eval_speed.py [--epochs 5] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402

from ncfm_core.data import load_dataset  # noqa: E402
from ncfm_core.evaluate import EvalConfig, evaluate_images, protocol_config, random_real_subset  # noqa: E402

SCRIPT = "benchmarks/eval_speed.py"
MODES = ("batched", "sequential")


def timed_run(images, labels, dataset, config: EvalConfig, device: str) -> tuple[float, list[float]]:
    took = kit.timed(lambda: evaluate_images(images, labels, dataset, config, device), device)
    return took.wall, took.value.runs


def main(argv: list[str] | None = None) -> int:
    parser = kit.parser(
        __doc__,
        kit.timing_options(epochs=5, repeats=5, rounds_of="mode", ipc_of="the training set"),
        kit.device_option(),
        kit.threads_option(),
        kit.out_option(kit.BENCHMARK_PAGES / "eval_speed.md"),
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.rounds < 1 or args.repeats < 2:
        parser.error("--epochs and --rounds must be >= 1 and --repeats >= 2")
    kit.set_threads(args.threads)

    dataset = load_dataset("digits")
    images, labels = random_real_subset(dataset, args.ipc, seed=0)
    configs = {
        mode: protocol_config("ncfm", epochs=args.epochs, repeats=args.repeats, repeat_mode=mode) for mode in MODES
    }
    warmup = {mode: protocol_config("ncfm", epochs=1, repeats=args.repeats, repeat_mode=mode) for mode in MODES}
    for mode in MODES:
        timed_run(images, labels, dataset, warmup[mode], args.device)

    seconds, accuracies = kit.alternating_rounds(
        MODES, args.rounds, lambda mode: timed_run(images, labels, dataset, configs[mode], args.device)
    )
    median = kit.medians(seconds)
    accuracy_gap = max(abs(a - b) for a, b in zip(accuracies["batched"], accuracies["sequential"]))
    machine = kit.describe_machine(args.device)
    lines = [
        "# Evaluation speed: batched vs sequential repeats",
        "",
        f"Written by `{SCRIPT}`. Both modes train the same networks with the same",
        "seeds (same data order and augmentation draws per repeat); they differ only in running the",
        "repeats as one vmapped forward over stacked parameters or one network after another.",
        "",
        f"- command: `{kit.command_line(SCRIPT, argv)}`",
        f"- machine: {machine.system} {machine.arch}, os.cpu_count() = {machine.cpus}, "
        f"torch threads = {machine.threads}, torch {machine.torch}, device {args.device} "
        f"({machine.gpu_name or machine.processor or 'cpu'})",
        f"- workload: digits (16x16, 10 classes), IPC {args.ipc} random real subset ({images.shape[0]} images), "
        f"protocol `ncfm` (ConvNet-2 width 128, AdamW, batch 128, DSA + CutMix + random resized crop), "
        f"{args.epochs} epochs, {args.repeats} repeats, test on {dataset.test_images.shape[0]} images",
        f"- {args.rounds} timed rounds per mode, alternating which mode goes first; one warm-up run of each "
        "mode beforehand is not counted",
        "",
        *kit.rounds_table("mode", seconds),
        "",
        "**Speed-up of batched over sequential (ratio of medians, sequential / batched): "
        f"{kit.ratio(median['sequential'], median['batched'])}** (above 1: batched is faster)",
        "",
        "`EvalConfig.repeat_mode=\"auto\"` stacks the repeats on CUDA only, and on CPU trains them one",
        "after another, because on CPU the stacked path (grouped convolutions, vmapped group norm)",
        "has measured slower. On CUDA, R small networks are expected to be bound by kernel launches,",
        "which stacking removes; run this benchmark with `--device cuda` to measure it. Force either",
        "path with `repeat_mode=\"batched\"` or `\"sequential\"`.",
        "",
        f"Largest difference in final test accuracy between the two modes over the {args.repeats} repeats: "
        f"{accuracy_gap:.4f} (float rounding only).",
        "",
    ]
    kit.write_page(args.out, lines, echo=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
