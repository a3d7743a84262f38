"""The paper's main table on your own CIFAR-10/100 and Tiny ImageNet, end to end.

For each dataset and IPC: a random real subset, DM-style mean matching, NCFM without psi and
NCFM with psi, each distilled with the dataset's preset (the paper's settings: ConvNet-3/4,
factor 2, 20,000 iterations, 1,024 real images per class, F = 1,024, a pool of 20 ConvNets x 60
epochs; see ncfm_core/config.py) and evaluated under the ``ncfm`` protocol, with IOR, HLR and
LRS. It writes the same table format as benchmarks/digits_table.py.

Every distillation is an artifact in the store (``--store``, else $NCFM_HOME, else the user
data directory) named ``<dataset>-ipc<IPC>-<method>``, so ``ncfm ls`` shows them, pools and the
full-data baseline are cached, and running the same command again skips finished work and
resumes interrupted distillations from their checkpoints.

    uv run python benchmarks/paper_table.py --data-dir ~/data --datasets cifar10 --ipcs 1 10 --device cuda
    uv run python benchmarks/paper_table.py --datasets fake --ipcs 1 --iterations 2 --quick-pool   # plumbing

Writes ``<out>/results/paper.md`` and ``paper.json`` (``--out`` defaults to ``docs/``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402

kit.passive_omp_wait()  # before torch loads

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from ncfm_core import jobs  # noqa: E402
from ncfm_core.devices import resolve_device  # noqa: E402
from ncfm_core.config import DistillConfig, make_config  # noqa: E402
from ncfm_core.evaluate import EvalConfig, protocol_config  # noqa: E402
from ncfm_core.store import ArtifactVersion, RunRecord, Store  # noqa: E402

SCRIPT = "benchmarks/paper_table.py"
PAPER_DATASETS = ("cifar10", "cifar100", "tinyimagenet")
# Fields the memory planner fills in: a finished artifact with other values here is the same run.
PLAN_FIELDS = ("real_chunk", "class_chunk", "precision", "cf_precision", "activation_checkpointing", "channels_last",
               "compile", "kernels")

# Test accuracy (%) printed in the paper: NCFM (Table 1), NCFM without psi (Table 5), random
# real subsets and whole-data training (Table 1, CIFAR-10 rows). Quoted for comparison only.
PAPER: dict[str, dict[tuple[str, int], float]] = {
    "cifar10": {("ncfm", 1): 49.5, ("ncfm", 10): 71.8, ("ncfm", 50): 77.4, ("ncfm_no_psi", 10): 65.6,
                ("ncfm_no_psi", 50): 74.2, ("random", 1): 14.4, ("random", 10): 26.0, ("random", 50): 43.4},
    "cifar100": {("ncfm", 1): 34.4, ("ncfm", 10): 48.7, ("ncfm", 50): 54.7, ("ncfm_no_psi", 10): 45.9,
                 ("ncfm_no_psi", 50): 53.7},
    "tinyimagenet": {("ncfm", 1): 18.2, ("ncfm", 10): 26.8, ("ncfm", 50): 29.6, ("ncfm_no_psi", 1): 9.4,
                     ("ncfm_no_psi", 10): 14.2, ("ncfm_no_psi", 50): 22.0},
}
PAPER_FULL = {"cifar10": 84.8, "cifar100": 56.2, "tinyimagenet": 37.6}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = kit.parser(
        __doc__,
        kit.repeats_option(5, "evaluation networks per cell"),
        kit.device_option("auto", "auto, cpu, cuda, cuda:N, mps"),
        kit.seed_option("distillation and evaluation"),
        kit.out_option(kit.DOCS, "docs directory (default docs/)"),
    )
    parser.add_argument("--datasets", nargs="+", default=list(PAPER_DATASETS),
                        help="registered dataset names (default: cifar10 cifar100 tinyimagenet; fake for tests)")
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50], help="IPCs (default 1 10 50)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the datasets live (default $NCFM_DATA_DIR, else the user cache directory)")
    parser.add_argument("--methods", nargs="+", default=[m.key for m in kit.METHODS],
                        choices=[m.key for m in kit.METHODS], help="rows of the table (default all four)")
    parser.add_argument("--iterations", type=int, default=None, help="distillation iterations (default: preset)")
    parser.add_argument("--eval-epochs", type=int, default=None,
                        help="epochs per evaluation network (default: the ncfm protocol's 300; the paper trains "
                        "up to 2000)")
    parser.add_argument("--no-full", action="store_true", help="skip the whole-training-set baseline (and HLR)")
    parser.add_argument("--gpu-mem", default=None, help="memory budget of each distillation, e.g. 2.5G")
    parser.add_argument("--store", type=Path, default=None, help="artifact store (default: the ncfm default)")
    parser.add_argument("--quick-pool", action="store_true",
                        help="a pool of 1 untrained extractor, 16 real images per class, 64 frequencies: for "
                        "plumbing tests only")
    return parser.parse_args(argv)


def same_run(record: RunRecord, config: DistillConfig) -> bool:
    """Whether ``record`` is a distillation of ``config`` (memory-plan fields aside)."""
    recorded = record.config
    wanted = config.to_dict()
    return all(recorded.get(k) == v for k, v in wanted.items() if k not in PLAN_FIELDS)


def obtain_artifact(store: Store, name: str, config: DistillConfig, device: str, gpu_mem: str | None
                    ) -> tuple[ArtifactVersion, bool]:
    """The complete artifact ``name`` distilled with ``config``: reused if it exists, resumed if
    its newest version is an unfinished run of ``config``, else distilled. Returns (version,
    whether this call ran any iterations)."""
    for version in reversed(store.versions(name)):
        try:
            record = version.record()
        except Exception:  # noqa: BLE001 - an unreadable version is simply not reused
            continue
        if not same_run(record, config):
            continue
        if record.status == "complete":
            kit.log(f"{version.ref}: complete, reused")
            return version, False
        kit.log(f"{version.ref}: unfinished ({record.iterations_done} iterations), resuming")
        return jobs.resume_job(store, version.ref, device=device, gpu_mem=gpu_mem,
                               callback=progress_logger(name)), True
    kit.log(f"{name}: distilling {config.iterations} iterations")
    return jobs.distill_job(store, config, name=name, device=device, gpu_mem=gpu_mem,
                            callback=progress_logger(name)), True


def progress_logger(name: str):
    """A job callback that logs every log event and about 20 progress lines per stage."""

    def callback(event: dict[str, Any]) -> None:
        stage = event.get("stage")
        if stage == "log":
            kit.log(f"{name}: {event.get('message')}")
        elif stage == "distill":
            iteration, total = int(event["iteration"]), int(event["total"])
            if iteration == total or iteration % max(1, total // 20) == 0:
                kit.log(f"{name}: iteration {iteration}/{total} loss {event.get('loss')}")

    return callback


def cached_eval(store: Store, version: ArtifactVersion, eval_config: EvalConfig, device: str,
                baselines: tuple[str, ...]) -> dict[str, Any]:
    """An evaluation record of ``version`` under ``eval_config`` with ``baselines``: the newest
    matching one in its manifest, else a fresh ``eval_job``."""
    wanted = eval_config.to_dict()
    for evaluation in reversed(version.record().evals):
        record = evaluation.to_json()
        protocol = record.get("protocol") or {}
        same = all(protocol.get(k) == v for k, v in wanted.items() if k != "repeat_mode")
        if same and all(kind in (record.get("baselines") or {}) for kind in baselines):
            kit.log(f"{version.ref}: evaluation reused")
            return record
    kit.log(f"{version.ref}: evaluating ({eval_config.repeats} x {eval_config.epochs} epochs"
            f"{', baselines ' + ', '.join(baselines) if baselines else ''})")
    return jobs.eval_job(store, version.ref, eval_config, device, progress_logger(version.name), baselines=baselines)


def run_dataset(args: argparse.Namespace, store: Store, dataset: str, eval_config: EvalConfig) -> dict[str, Any]:
    """Every requested (IPC, method) of one dataset: rows, the random and full references."""
    rows: list[kit.RowResult] = []
    random_by_ipc: dict[int, float] = {}
    full: dict[str, Any] | None = None
    distilled = [m for m in kit.METHODS if m.overrides is not None and m.key in args.methods]
    quick = dict(pool_size=1, pool_epochs=0, real_per_class=16, num_freqs=64) if args.quick_pool else {}
    for ipc in args.ipcs:
        base = make_config(dataset, ipc, data_dir=None if args.data_dir is None else str(args.data_dir.absolute()),
                           iterations=args.iterations, seed=args.seed, **quick)
        # The random and full baselines come with the first evaluation of each IPC (the random
        # subset has this IPC; the full baseline is cached in the store after its first run).
        wanted = tuple(k for k, on in (("random", "random" in args.methods), ("full", not args.no_full)) if on)
        if not distilled:
            raise SystemExit("paper_table: --methods needs at least one distilled method (mmd, ncfm_no_psi, ncfm)")
        for index, method in enumerate(distilled):
            config = base.replace(**method.overrides)
            started = time.perf_counter()
            version, ran = obtain_artifact(store, f"{jobs.default_artifact_name(dataset, ipc)}-{method.key}", config,
                                           args.device, args.gpu_mem)
            timings = version.record().timings
            seconds = None if timings is None else timings.seconds
            record = cached_eval(store, version, eval_config, args.device, wanted if index == 0 else ())
            rows.append(kit.RowResult(method.key, ipc, list(record["accuracy"]["runs"]), seconds,
                                      float(record.get("seconds") or 0.0),
                                      version.record().final_loss,
                                      {"artifact": version.ref, "ran_now": ran,
                                       "wall_seconds": time.perf_counter() - started}))
            if index == 0:
                found = record.get("baselines") or {}
                if "random" in found:
                    random_row = kit.RowResult("random", ipc, list(found["random"]["accuracy"]["runs"]))
                    random_by_ipc[ipc] = random_row.mean
                    rows.insert(len(rows) - 1, random_row)
                if "full" in found:
                    full = found["full"]
    return {"rows": rows, "random": random_by_ipc, "full": full}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    store = Store(args.store)
    device = str(resolve_device(args.device)[0])
    eval_config = protocol_config("ncfm", repeats=args.repeats, epochs=args.eval_epochs, seed=args.seed)
    results = {name: run_dataset(args, store, name, eval_config) for name in args.datasets}
    total = time.perf_counter() - started

    command = kit.command_line(SCRIPT, argv)
    lines = [
        "# Paper settings: measured results",
        "",
        f"Written by `{SCRIPT}`.",
        "",
        f"- command: `{command}`",
        *kit.machine_lines(device),
        f"- wall time of this invocation: {total / 60:.1f} min (finished artifacts and evaluations are reused)",
        f"- store: `{store.root}`",
        f"- evaluation: protocol `ncfm`, {eval_config.epochs} epochs, {eval_config.repeats} repeats, final-epoch "
        f"accuracy; the random subset has each row's IPC; the whole-training-set baseline uses the same protocol",
    ]
    if args.quick_pool:
        lines += ["", "**`--quick-pool`: an untrained one-network pool; these numbers mean nothing.**"]
    for name, result in results.items():
        full = result["full"]
        full_mean = None if full is None else float(full["accuracy"]["mean"])
        sample = next((r for r in result["rows"] if "artifact" in r.extra), None)
        settings = ""
        if sample is not None:
            config = store.resolve(sample.extra["artifact"]).record().config
            settings = (f"Distillation (`{name}` preset): factor {config['factor']}, {config['iterations']} "
                        f"iterations, {config['real_per_class']} real images per class per iteration, "
                        f"F = {config['num_freqs']}, pool of {config['pool_size']} x {config['pool_epochs']} epochs.")
        lines += [
            "",
            f"## {name}",
            "",
            settings,
            "",
            f"Whole training set: {'-' if full_mean is None else kit.pct(full_mean) + ' %'}"
            + (f" (paper: {PAPER_FULL[name]} %)" if name in PAPER_FULL else ""),
            "",
            kit.main_table(result["rows"], args.ipcs, result["random"], full_mean, reference=PAPER.get(name, {})),
        ]
    kit.write_page(args.out / "results" / "paper.md", lines)
    record = {
        "command": command,
        "device": device,
        "torch": kit.describe_machine(device).torch,
        "seconds": total,
        "eval": eval_config.to_dict(),
        "datasets": {
            name: {
                "rows": [r.to_dict() for r in result["rows"]],
                "random": result["random"],
                "full": result["full"],
            }
            for name, result in results.items()
        },
    }
    kit.write_json(args.out / "results" / "paper.json", record)
    kit.log(f"done in {total / 60:.1f} min: {args.out / 'results' / 'paper.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
