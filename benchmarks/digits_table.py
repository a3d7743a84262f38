"""Digits results: random real / DM-style mean matching / NCFM without psi / NCFM with psi.

Reproduces, on scikit-learn's handwritten digits (bundled, offline; 16x16, 10 classes, 1,257
train / 540 test images), the paper's main comparison at IPC 1 and 10 with mean ± std over
repeats, IOR and HLR (ncfm_core.metrics), and at IPC 1 the alpha sweep (amplitude vs phase,
the paper's Figure 5) and the frequency-count sweep (Figure 6). Every distillation shares one
feature-extractor pool (trained once) and uses the core API directly.

    uv run python benchmarks/digits_table.py            # the full run (75 min measured on a shared 2-core CPU)
    uv run python benchmarks/digits_table.py --quick    # seconds: plumbing check, numbers are meaningless

Writes ``<out>/results/digits.md`` (tables, command, machine, settings, date),
``<out>/results/digits.json`` (every repeat's accuracy) and ``<out>/images/alpha_sweep.png``,
``<out>/images/freq_sweep.png``; ``--out`` defaults to ``docs/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402

kit.passive_omp_wait()  # before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import report_kit as plots  # noqa: E402

from ncfm_core.devices import resolve_device  # noqa: E402
from ncfm_core.config import DistillConfig, make_config  # noqa: E402
from ncfm_core.data import load_dataset  # noqa: E402
from ncfm_core.evaluate import (  # noqa: E402
    EvalConfig,
    evaluate_full_baseline,
    evaluate_random_baseline,
    protocol_config,
)
from ncfm_core.metrics import fair_metrics  # noqa: E402
from ncfm_core.models import default_depth  # noqa: E402

SCRIPT = "benchmarks/digits_table.py"
DEFAULTS = dict(
    ipcs=[1, 10], iterations=100, factor=1, real_per_class=64, pool_size=2, pool_epochs=3,
    repeats=5, eval_epochs=300, sweep_repeats=3, full_epochs=100, full_repeats=2,
    alphas=[0.0, 0.25, 0.5, 0.75, 1.0], freqs=[16, 64, 256, 1024, 4096], sweep_ipc=1,
)
QUICK = dict(
    iterations=2, real_per_class=8, pool_size=1, pool_epochs=0, repeats=2, eval_epochs=2,
    sweep_repeats=2, full_epochs=0, full_repeats=1,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = kit.parser(
        __doc__,
        kit.out_option(kit.DOCS, "docs directory to write results/ and images/ into (default: docs/)"),
        kit.seed_option("distillation, evaluation and subset"),
        kit.device_option("auto", "auto, cpu, cuda"),
        kit.threads_option(),
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (a few iterations and epochs, 2 repeats) to check the plumbing")
    parser.add_argument("--ipcs", type=int, nargs="+", help=f"IPCs of the main table (default {DEFAULTS['ipcs']})")
    parser.add_argument("--iterations", type=int, help=f"distillation iterations (default {DEFAULTS['iterations']})")
    parser.add_argument("--factor", type=int, help=f"multi-formation factor (default {DEFAULTS['factor']})")
    parser.add_argument("--real-per-class", type=int, help=f"real images per class per iteration "
                        f"(default {DEFAULTS['real_per_class']})")
    parser.add_argument("--pool-size", type=int, help=f"feature extractors (default {DEFAULTS['pool_size']})")
    parser.add_argument("--pool-epochs", type=int, help=f"epochs per extractor (default {DEFAULTS['pool_epochs']})")
    parser.add_argument("--repeats", type=int, help=f"evaluation networks per main-table cell "
                        f"(default {DEFAULTS['repeats']})")
    parser.add_argument("--eval-epochs", type=int, help=f"epochs per evaluation network (default "
                        f"{DEFAULTS['eval_epochs']})")
    parser.add_argument("--sweep-repeats", type=int, help=f"evaluation networks per sweep point "
                        f"(default {DEFAULTS['sweep_repeats']})")
    parser.add_argument("--full-epochs", type=int, help=f"epochs of the whole-training-set baseline "
                        f"(default {DEFAULTS['full_epochs']})")
    parser.add_argument("--full-repeats", type=int, help=f"networks of the whole-training-set baseline "
                        f"(default {DEFAULTS['full_repeats']})")
    parser.add_argument("--alphas", type=float, nargs="*", help="alpha sweep values (default 0 0.25 0.5 0.75 1; "
                        "none: skip)")
    parser.add_argument("--freqs", type=int, nargs="*", help="frequency-count sweep values (default 16 64 256 "
                        "1024 4096; none: skip)")
    parser.add_argument("--sweep-ipc", type=int, help="IPC of both sweeps (default 1)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="digits.json of an earlier run: cells with identical settings are taken from it "
                        "instead of recomputed (seeded CPU runs give the same numbers again)")
    args = parser.parse_args(argv)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class Runner:
    """Runs distillations and evaluations once each: a (config, protocol) pair seen before
    returns its earlier result (the sweeps' default points are main-table cells). ``previous``
    cells (from ``--reuse``) count as seen; their rows are marked ``reused``."""

    def __init__(self, dataset, device: str, previous: dict[str, dict[str, Any]] | None = None) -> None:
        self.dataset, self.device = dataset, device
        self.pools = kit.PoolCache(dataset, device)
        self.done: dict[str, kit.RowResult] = {}
        for key, cell in (previous or {}).items():
            self.done[key] = kit.RowResult.from_dict(cell)
            self.done[key].extra["reused"] = True

    @staticmethod
    def _key(*parts: dict[str, Any]) -> str:
        return json.dumps(parts, sort_keys=True, default=str)

    def distilled(self, method: str, config: DistillConfig, eval_config: EvalConfig) -> kit.RowResult:
        key = self._key(config.to_dict(), eval_config.to_dict())
        if key not in self.done:
            kit.log(f"distill {method} ipc={config.ipc} alpha={config.alpha} F={config.num_freqs} "
                    f"({config.iterations} iterations), then {eval_config.repeats} evaluation networks")
            row, _, _ = kit.distill_and_evaluate(config, self.dataset, self.pools, eval_config, self.device, method)
            kit.log(f"  -> {kit.pct(row.mean)} ± {kit.pct(row.std)} % "
                    f"(distill {row.distill_seconds:.0f} s, eval {row.eval_seconds:.0f} s)")
            self.done[key] = row
        return self.done[key]

    def random(self, ipc: int, eval_config: EvalConfig, seed: int) -> kit.RowResult:
        key = self._key({"random": ipc, "seed": seed}, eval_config.to_dict())
        if key not in self.done:
            kit.log(f"random real subset ipc={ipc}: {eval_config.repeats} evaluation networks")
            result = evaluate_random_baseline(self.dataset, ipc, eval_config, self.device, seed)
            self.done[key] = kit.eval_row("random", ipc, result)
            kit.log(f"  -> {kit.pct(result.mean)} ± {kit.pct(result.std)} % ({result.seconds:.0f} s)")
        return self.done[key]

    def full(self, eval_config: EvalConfig) -> kit.RowResult:
        key = self._key({"full": self.dataset.fingerprint}, eval_config.to_dict())
        if key not in self.done:
            kit.log(f"whole training set ({self.dataset.num_train} images): {eval_config.repeats} x "
                    f"{eval_config.epochs} epochs")
            result = evaluate_full_baseline(self.dataset, eval_config, self.device)
            self.done[key] = kit.eval_row("full", 0, result)
            kit.log(f"  -> {kit.pct(result.mean)} ± {kit.pct(result.std)} % ({result.seconds:.0f} s)")
        return self.done[key]

    def cells(self) -> dict[str, dict[str, Any]]:
        """Every result by key, JSON-ready: what ``--reuse`` reads back."""
        return {key: row.to_dict() for key, row in self.done.items()}


def load_reusable(path: Path | None, quick: bool) -> dict[str, dict[str, Any]]:
    """The ``cells`` of an earlier run's digits.json (nothing if ``path`` is None). Numbers of a
    ``--quick`` run are only ever reused by another ``--quick`` run."""
    if path is None:
        return {}
    record = json.loads(Path(path).read_text())
    if bool(record.get("quick")) != quick:
        raise SystemExit(f"{path} comes from a {'' if record.get('quick') else 'non-'}--quick run; "
                         f"its numbers cannot be reused by a {'' if quick else 'non-'}--quick run")
    return dict(record.get("cells") or {})


def psi_verdict(rows: list[kit.RowResult], ipcs: list[int]) -> list[str]:
    """Plain sentences: did psi help at each IPC, judged against the spread of the repeats."""
    sentences = []
    for ipc in ipcs:
        by_method = {r.method: r for r in rows if r.ipc == ipc}
        with_psi, without = by_method.get("ncfm"), by_method.get("ncfm_no_psi")
        if with_psi is None or without is None:
            continue
        gain = with_psi.mean - without.mean
        spread = max(with_psi.std, without.std)
        if abs(gain) <= spread:
            verdict = "psi made no difference beyond the spread of the repeats"
        elif gain > 0:
            verdict = "psi helped"
        else:
            verdict = "psi hurt"
        sentences.append(
            f"- IPC {ipc}: {verdict}: NCFM with psi {kit.pct(with_psi.mean)} ± {kit.pct(with_psi.std)} % vs "
            f"without {kit.pct(without.mean)} ± {kit.pct(without.std)} % ({100 * gain:+.1f} points)."
        )
    return sentences


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kit.set_threads(args.threads)
    device = str(resolve_device(args.device)[0])
    started = time.perf_counter()
    dataset = load_dataset("digits")
    runner = Runner(dataset, device, previous=load_reusable(args.reuse, args.quick))

    base = make_config(
        "digits", args.ipcs[0], factor=args.factor, iterations=args.iterations, real_per_class=args.real_per_class,
        pool_size=args.pool_size, pool_epochs=args.pool_epochs, seed=args.seed,
    )
    main_eval = protocol_config("ncfm", epochs=args.eval_epochs, repeats=args.repeats, seed=args.seed)
    sweep_eval = protocol_config("ncfm", epochs=args.eval_epochs, repeats=args.sweep_repeats, seed=args.seed)
    full_eval = protocol_config("ncfm", epochs=args.full_epochs, repeats=args.full_repeats, seed=args.seed)

    full = runner.full(full_eval)

    rows: list[kit.RowResult] = []
    random_by_ipc: dict[int, float] = {}
    for ipc in args.ipcs:
        random_row = runner.random(ipc, main_eval, args.seed)
        random_by_ipc[ipc] = random_row.mean
        rows.append(random_row)
        for method in kit.METHODS[1:]:
            rows.append(runner.distilled(method.key, base.replace(ipc=ipc, **method.overrides), main_eval))

    ncfm = dict(kit.METHODS[-1].overrides or {})
    sweep_random = runner.random(args.sweep_ipc, sweep_eval, args.seed).mean if (args.alphas or args.freqs) else None
    alpha_rows = [
        (alpha, runner.distilled("ncfm", base.replace(ipc=args.sweep_ipc, alpha=alpha, **ncfm), sweep_eval))
        for alpha in args.alphas
    ]
    freq_rows = [
        (count, runner.distilled("ncfm", base.replace(ipc=args.sweep_ipc, num_freqs=count, **ncfm), sweep_eval))
        for count in args.freqs
    ]
    total_seconds = time.perf_counter() - started

    results_dir, images_dir = args.out / "results", args.out / "images"
    sweep_note = f"IPC {args.sweep_ipc}, NCFM with psi, {args.sweep_repeats} evaluation networks per point"
    def sweep_plot(points: list[tuple[float, kit.RowResult]], path: Path, what: str, x_label: str,
                   log_x: bool) -> None:
        xs = [x for x, _ in points]
        plots.line_plot(
            [plots.Series("NCFM with psi", xs, [100 * r.mean for _, r in points], [100 * r.std for _, r in points]),
             plots.Series("random real subset", xs, [100 * sweep_random] * len(points))],
            path, title=f"digits, IPC {args.sweep_ipc}: {what}", x_label=x_label, y_label="test accuracy (%)",
            log_x=log_x, x_ticks=xs,
        )

    if alpha_rows:
        sweep_plot(alpha_rows, images_dir / "alpha_sweep.png", "amplitude weight alpha",
                   "alpha (1 = amplitude only, 0 = phase only)", log_x=False)
    if freq_rows:
        sweep_plot(freq_rows, images_dir / "freq_sweep.png", "number of frequencies F",
                   "frequencies per iteration F (log scale)", log_x=True)

    settings = (
        f"- distillation: ConvNet-{base.depth or default_depth(dataset.image_size)} width {base.width} (instance norm), factor {base.factor}, "
        f"init {base.init}, {base.iterations} iterations, {base.real_per_class} real images per class per "
        f"iteration, F = {base.num_freqs} frequencies, alpha = {base.alpha}, calibration weight "
        f"{base.calib_weight}, image lr {base.image_lr}, DSA `{base.dsa_strategy}`, seed {base.seed}\n"
        f"- one shared pool of {base.pool_size} ConvNets x {base.pool_epochs} epochs, trained once "
        f"({runner.pools.seconds:.0f} s)\n"
        f"- evaluation: protocol `ncfm` (AdamW lr {main_eval.lr}, batch {main_eval.batch_size}, x0.5 steps at "
        f"1/5..4/5, DSA, CutMix p={main_eval.cutmix_prob}, random resized crop), {main_eval.epochs} epochs, "
        f"final-epoch test accuracy on the 540 test images; repeat r seeded {args.seed} + r; std is over "
        f"repeats (population)\n"
        f"- random real subset: {', '.join(str(i) for i in args.ipcs)} real images per class drawn once "
        f"(seed {args.seed}), trained under the same protocol; the stored budget of the synthetic sets is the "
        f"same (factor {base.factor})\n"
        f"- whole training set (for HLR): same protocol but {full_eval.epochs} epochs and {full_eval.repeats} "
        f"repeats (one epoch over {dataset.num_train} images costs as much as ~{dataset.num_train // 10} epochs "
        f"over IPC 1): {kit.pct(full.mean)} ± {kit.pct(full.std)} %\n"
        f"- the three distilled rows differ only in the matching term: mean matching compares per-class "
        f"feature means, NCFM characteristic functions with Gaussian (no psi) or learned (psi) frequencies; "
        f"everything else (pool, calibration, augmentation, iterations) is identical"
    )
    used = {id(row): row for row in [full, *rows, *(r for _, r in alpha_rows), *(r for _, r in freq_rows)]}
    if sweep_random is not None:
        sweep_row = runner.random(args.sweep_ipc, sweep_eval, args.seed)
        used[id(sweep_row)] = sweep_row
    reused = [row for row in used.values() if row.extra.get("reused")]
    reused_seconds = sum((row.distill_seconds or 0.0) + row.eval_seconds for row in reused)
    reuse_line = (
        f"- {len(reused)} of {len(used)} results were taken from `{args.reuse}` (`--reuse`: an earlier run "
        f"of this script with the same settings and seeds; they took {reused_seconds / 60:.0f} min to compute "
        f"there, and recomputing them gives the same numbers on CPU)"
        if reused else ""
    )
    command = kit.command_line(SCRIPT, argv)
    quick_warning = ("\n**`--quick` run: tiny settings for testing the script; these numbers mean nothing.**\n"
                     if args.quick else "")
    lines = [
        "# Digits: measured results",
        "",
        f"Written by `{SCRIPT}`; every figure on this page comes from one run of it on the machine below.",
        quick_warning,
        f"- command: `{command}`",
        *kit.machine_lines(device),
        f"- wall time of this run: {total_seconds / 60:.1f} min",
        *([reuse_line] if reuse_line else []),
        settings,
        "",
        "## NCFM against its baselines",
        "",
        "IOR = acc(method) - acc(random subset), HLR = acc(whole training set) - acc(method), "
        "LRS from both; all three on fractions in [0, 1] (see [evaluation](../evaluation.md)).",
        "",
        kit.main_table(rows, args.ipcs, random_by_ipc, full.mean),
        "",
        "Does psi help on digits?",
        "",
        *psi_verdict(rows, args.ipcs),
    ]
    if alpha_rows:
        lines += [
            "",
            "## Amplitude vs phase: the alpha sweep (paper, Figure 5)",
            "",
            f"{sweep_note}. alpha weighs the amplitude term, 1 - alpha the phase term. "
            f"Random real subset under the same evaluation: {kit.pct(sweep_random)} %.",
            "",
            kit.sweep_table("alpha", alpha_rows, sweep_random),
            "",
            "![alpha sweep](../images/alpha_sweep.png)",
        ]
    if freq_rows:
        lines += [
            "",
            "## Number of frequencies (paper, Figure 6)",
            "",
            f"{sweep_note}; psi has F/16 mixture components. "
            f"Random real subset under the same evaluation: {kit.pct(sweep_random)} %.",
            "",
            kit.sweep_table("F", freq_rows, sweep_random),
            "",
            "![frequency sweep](../images/freq_sweep.png)",
        ]
    kit.write_page(results_dir / "digits.md", lines)

    machine = kit.describe_machine(device)
    record = {
        "command": command,
        "quick": args.quick,
        "device": device,
        "torch": machine.torch,
        "cpu_count": machine.cpus,
        "torch_threads": machine.threads,
        "seconds": total_seconds,
        "config": base.to_dict(),
        "eval": main_eval.to_dict(),
        "sweep_eval": sweep_eval.to_dict(),
        "full": {"runs": full.runs, "mean": full.mean, "std": full.std, "protocol": full_eval.to_dict()},
        "main": [r.to_dict() | fair_metrics(r.mean, random_by_ipc[r.ipc], full.mean) for r in rows],
        "alpha_sweep": [{"alpha": a, **r.to_dict()} for a, r in alpha_rows],
        "freq_sweep": [{"num_freqs": f, **r.to_dict()} for f, r in freq_rows],
        "sweep_random": sweep_random,
        "reuse": None if args.reuse is None else str(args.reuse),
        "cells": runner.cells(),
    }
    kit.write_json(results_dir / "digits.json", record)
    kit.log(f"done in {total_seconds / 60:.1f} min: {results_dir / 'digits.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
