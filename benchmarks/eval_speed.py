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

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from ncfm_core.data import load_dataset
from ncfm_core.evaluate import EvalConfig, evaluate_images, protocol_config, random_real_subset

ROOT = Path(__file__).resolve().parent.parent
MODES = ("batched", "sequential")


def timed_run(images, labels, dataset, config: EvalConfig, device: str) -> tuple[float, list[float]]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = evaluate_images(images, labels, dataset, config, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, result.runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per network (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each mode (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="networks per evaluation (default 5)")
    parser.add_argument("--ipc", type=int, default=10, help="images per class of the training set (default 10)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "eval_speed.md")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.rounds < 1 or args.repeats < 2:
        parser.error("--epochs and --rounds must be >= 1 and --repeats >= 2")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dataset = load_dataset("digits")
    images, labels = random_real_subset(dataset, args.ipc, seed=0)
    configs = {
        mode: protocol_config("ncfm", epochs=args.epochs, repeats=args.repeats, repeat_mode=mode) for mode in MODES
    }
    warmup = {mode: protocol_config("ncfm", epochs=1, repeats=args.repeats, repeat_mode=mode) for mode in MODES}
    for mode in MODES:
        timed_run(images, labels, dataset, warmup[mode], args.device)

    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    accuracies: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        order = MODES if round_index % 2 == 0 else MODES[::-1]  # cancel drift in machine load
        for mode in order:
            elapsed, runs = timed_run(images, labels, dataset, configs[mode], args.device)
            seconds[mode].append(elapsed)
            accuracies[mode] = runs
            print(f"round {round_index + 1}/{args.rounds} {mode:10s} {elapsed:8.2f} s", file=sys.stderr)

    median = {mode: statistics.median(seconds[mode]) for mode in MODES}
    ratio = median["sequential"] / median["batched"]
    accuracy_gap = max(abs(a - b) for a, b in zip(accuracies["batched"], accuracies["sequential"]))
    command = "uv run python benchmarks/eval_speed.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(args.device)
    else:
        device_name = platform.processor() or "cpu"
    lines = [
        "# Evaluation speed: batched vs sequential repeats",
        "",
        "Written by `benchmarks/eval_speed.py`. Both modes train the same networks with the same",
        "seeds (same data order and augmentation draws per repeat); they differ only in running the",
        "repeats as one vmapped forward over stacked parameters or one network after another.",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {platform.system()} {platform.machine()}, os.cpu_count() = {os.cpu_count()}, "
        f"torch threads = {torch.get_num_threads()}, torch {torch.__version__}, device {args.device} ({device_name})",
        f"- workload: digits (16x16, 10 classes), IPC {args.ipc} random real subset ({images.shape[0]} images), "
        f"protocol `ncfm` (ConvNet-2 width 128, AdamW, batch 128, DSA + CutMix + random resized crop), "
        f"{args.epochs} epochs, {args.repeats} repeats, test on {dataset.test_images.shape[0]} images",
        f"- {args.rounds} timed rounds per mode, alternating which mode goes first; one warm-up run of each "
        "mode beforehand is not counted",
        "",
        "| mode | " + " | ".join(f"round {i + 1} (s)" for i in range(args.rounds)) + " | median (s) |",
        "|---|" + "---|" * args.rounds + "---|",
    ]
    for mode in MODES:
        lines.append(f"| {mode} | " + " | ".join(f"{s:.2f}" for s in seconds[mode]) + f" | {median[mode]:.2f} |")
    lines += [
        "",
        f"**Speed-up of batched over sequential (ratio of medians, sequential / batched): {ratio:.2f}x** "
        "(above 1: batched is faster)",
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
