"""Compare the distillation loop and the memory plan of two checkouts, tensor by tensor.

For each configuration in ``CONFIGS`` (tiny ``fake`` data, CPU, one thread), each checkout runs
``--steps`` iterations of ``Distiller`` in a subprocess of its own with that checkout first on
PYTHONPATH, and writes its final state (``Distiller.state_dict()``, the checkpoint format: images,
both optimisers, psi, generator, scheduler, loss curve) and every step's losses. Then:

- ``straight``: every tensor of the two final states is ``torch.equal`` and every other value
  ``==``; every step's (loss, match, calib) is equal;
- ``resumed``: the candidate loads the reference's checkpoint from the middle of the run and
  continues; its final state equals the reference's uninterrupted one (old checkpoints resume);
- ``plans``: for each configuration in ``PLAN_CONFIGS`` on CIFAR-100's and the tiny shape, the
  planner's whole path (``plan_path``: every plan's estimated peak, phase terms, seconds), the
  FLOPs and the passes of its first and last plan are equal (a pass counted 0 times is dropped:
  a loss without psi no longer names psi's chunks).

    git worktree add REF_DIR aa11a6b                       # the checkout to compare against
    uv run python tools/compare_runs.py REF_DIR            # candidate: this checkout
    uv run python tools/compare_runs.py REF_DIR --steps 6 --json

Exit 0 when everything is equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

BASE = dict(factor=2, width=8, pool_size=2, pool_epochs=1, pool_batch=16, real_per_class=10, num_freqs=32, seed=5)
DATA = dict(num_classes=3, channels=1, image_size=8, train_per_class=12, test_per_class=4)
SPLIT = dict(class_chunk=1, real_chunk=4)  # one class per synthetic pass; real chunks of 4 split each class of 10
CHECKPOINTED = dict(class_chunk=2, real_chunk=7, activation_checkpointing=True)  # 7 rows: inside one class
CONFIGS: dict[str, dict[str, Any]] = {
    "psi": {},
    "psi, class_chunk 1, real_chunk 4": SPLIT,
    "psi, checkpointing, class_chunk 2, real_chunk 7": CHECKPOINTED,
    "psi, calib off": dict(calib_weight=0.0),
    "psi, bf16": dict(precision="bf16"),
    "psi, fp16 (loss scaler)": dict(precision="fp16"),
    "psi, classes 1-2 of 3": dict(classes=(1, 3)),
    "gaussian": dict(sampler=False),
    "gaussian, class_chunk 1, real_chunk 4": dict(sampler=False, **SPLIT),
    "gaussian, checkpointing, class_chunk 2, real_chunk 7": dict(sampler=False, **CHECKPOINTED),
    "gaussian, calib off": dict(sampler=False, calib_weight=0.0),
    "mmd": dict(matching="mmd"),
    "mmd, class_chunk 1, real_chunk 4": dict(matching="mmd", **SPLIT),
    "mmd, checkpointing, class_chunk 2, real_chunk 7": dict(matching="mmd", **CHECKPOINTED),
    "mmd, calib off": dict(matching="mmd", calib_weight=0.0),
}
PLAN_CONFIGS: dict[str, dict[str, Any]] = {
    "psi": {}, "gaussian": dict(sampler=False), "mmd": dict(matching="mmd"),
    "psi, calib off": dict(calib_weight=0.0), "mmd, calib off": dict(matching="mmd", calib_weight=0.0),
    "psi, alexnet": dict(network="alexnet"),
}


# ---- the worker: runs inside one checkout --------------------------------------------------------


def _worker(out: Path, steps: int, resume_from: Path | None) -> None:
    import torch

    import ncfm_core
    from ncfm_core import store
    from ncfm_core.config import make_config
    from ncfm_core.data import DatasetShape, load_dataset
    from ncfm_core.distill import Distiller
    from ncfm_core.memory_model import estimate_iteration_flops, iteration_passes
    from ncfm_core.planner import plan_path
    from ncfm_core.pool import PoolSpec, train_pool

    try:  # since issue 21 the plan decides "auto" precisions once; older checkouts decide in the loop
        from ncfm_core.jobs.plan import decide_precisions
    except ImportError:
        def decide_precisions(config: Any, device: str) -> Any:
            return config

    torch.set_num_threads(1)
    (out / "module").write_text(str(Path(ncfm_core.__file__).resolve()))
    dataset = load_dataset("fake", **DATA)
    pools: dict[Any, Any] = {}
    for index, (name, overrides) in enumerate(CONFIGS.items()):
        overrides = dict(overrides)
        classes = overrides.pop("classes", None)
        config = decide_precisions(make_config("fake", 2, iterations=steps, **BASE, **overrides), "cpu")
        spec = PoolSpec.from_config(config, dataset)
        if spec not in pools:
            pools[spec] = train_pool(spec, dataset, "cpu")

        def distiller() -> Distiller:
            return Distiller(config, dataset, pools[spec], "cpu", classes=None if classes is None else range(*classes))

        if resume_from is None:
            run, losses = distiller(), []
            for _ in range(steps):
                metrics = run.step()
                losses.append([metrics["loss"], metrics["match_loss"], metrics["calib_loss"]])
                if run.iteration == steps // 2:
                    store.save_state(out / f"{index}.middle.safetensors", run.state_dict())
            store.save_state(out / f"{index}.final.safetensors", run.state_dict())
            (out / f"{index}.losses.json").write_text(json.dumps(losses))
        else:
            run = distiller()
            run.load_state_dict(store.load_state(resume_from / f"{index}.middle.safetensors"))
            run.run(steps)
            store.save_state(out / f"{index}.resumed.safetensors", run.state_dict())

    if resume_from is not None:
        return
    plans = {}
    for name, overrides in PLAN_CONFIGS.items():
        for shape_name, shape in (("cifar100", DatasetShape(100, 3, 32, 50_000)), ("tiny", DatasetShape(3, 1, 8, 36))):
            config = make_config("fake", 10, **{**BASE, "real_per_class": 1024, "num_freqs": 1024}, **overrides)
            config = decide_precisions(config, "cuda:0")
            path = plan_path(config, shape, "cuda:0")
            ends = (path[0], path[-1])
            plans[f"{name} on {shape_name}"] = {
                "path": [plan.to_dict() for plan in path],
                "flops": [estimate_iteration_flops(config, shape, plan) for plan in ends],
                "passes": [{k: v for k, v in iteration_passes(config, shape, plan).items() if v} for plan in ends],
            }
    (out / "plans.json").write_text(json.dumps(plans, sort_keys=True))


# ---- the comparison ---------------------------------------------------------------------------------


def _run_worker(checkout: Path, out: Path, steps: int, resume_from: Path | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--steps", str(steps)]
    if resume_from is not None:
        command += ["--resume-from", str(resume_from)]
    subprocess.run(command, env=env, check=True)
    module = Path((out / "module").read_text())
    if checkout.resolve() not in module.parents:
        raise SystemExit(f"the worker imported {module}, not the checkout {checkout}")


def _differences(a: Any, b: Any, path: str = "") -> tuple[int, list[str]]:
    """(tensors compared, paths that differ) of two nested states."""
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return 1, [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return 0, [f"{path} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        total, differ = 0, []
        for key in a:
            count, found = _differences(a[key], b[key], f"{path}.{key}")
            total, differ = total + count, differ + found
        return total, differ
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        total, differ = 0, []
        for i, (x, y) in enumerate(zip(a, b)):
            count, found = _differences(x, y, f"{path}[{i}]")
            total, differ = total + count, differ + found
        return total, differ
    return 0, [] if a == b else [path]


def compare(reference: Path, candidate: Path, steps: int, keep: Path | None = None) -> dict[str, Any]:
    """Run both checkouts and compare; ``keep``: write the workers' files there (else a
    temporary folder): ``reference/I.middle.safetensors`` is configuration I's checkpoint after
    ``steps // 2`` iterations, as the reference wrote it."""
    sys.path.insert(0, str(candidate))
    from ncfm_core.store import load_state

    with tempfile.TemporaryDirectory(prefix="compare-runs-") as tmp:
        folder = Path(tmp) if keep is None else keep
        ref_out, cand_out = folder / "reference", folder / "candidate"
        ref_out.mkdir(parents=True)
        cand_out.mkdir()
        _run_worker(reference, ref_out, steps)
        _run_worker(candidate, cand_out, steps)
        _run_worker(candidate, cand_out, steps, resume_from=ref_out)
        rows = []
        for index, name in enumerate(CONFIGS):
            reference_final = load_state(ref_out / f"{index}.final.safetensors")
            tensors, differ = _differences(reference_final, load_state(cand_out / f"{index}.final.safetensors"))
            _, resumed_differ = _differences(reference_final, load_state(cand_out / f"{index}.resumed.safetensors"))
            losses_equal = (json.loads((ref_out / f"{index}.losses.json").read_text())
                            == json.loads((cand_out / f"{index}.losses.json").read_text()))
            rows.append({"config": name, "tensors": tensors, "differ": differ, "losses_equal": losses_equal,
                         "resumed_differ": resumed_differ})
        ref_plans = json.loads((ref_out / "plans.json").read_text())
        cand_plans = json.loads((cand_out / "plans.json").read_text())
        plans = {name: ref_plans[name] == cand_plans.get(name) for name in ref_plans}
    return {"steps": steps, "runs": rows, "plans": plans}


def _table(result: dict[str, Any]) -> str:
    lines = [f"{result['steps']} steps each; equal = torch.equal on every tensor of the final state",
             "", "| configuration | tensors | straight run | losses per step | resumed from reference checkpoint |",
             "|---|---|---|---|---|"]
    for row in result["runs"]:
        straight = "equal" if not row["differ"] else "DIFFER: " + ", ".join(row["differ"][:4])
        resumed = "equal" if not row["resumed_differ"] else "DIFFER: " + ", ".join(row["resumed_differ"][:4])
        lines.append(f"| {row['config']} | {row['tensors']} | {straight} | "
                     f"{'equal' if row['losses_equal'] else 'DIFFER'} | {resumed} |")
    lines += ["", "| plan (path, FLOPs, passes) | equal |", "|---|---|"]
    lines += [f"| {name} | {'equal' if same else 'DIFFER'} |" for name, same in result["plans"].items()]
    return "\n".join(lines)


def _all_equal(result: dict[str, Any]) -> bool:
    runs = all(not r["differ"] and not r["resumed_differ"] and r["losses_equal"] for r in result["runs"])
    return runs and all(result["plans"].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", nargs="?", type=Path, help="the checkout to compare against")
    parser.add_argument("candidate", nargs="?", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--keep", type=Path, help="keep the workers' states and losses in this new folder")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--resume-from", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker, args.steps, args.resume_from)
        return 0
    if args.reference is None:
        parser.error("give the reference checkout")
    result = compare(args.reference.resolve(), args.candidate.resolve(), args.steps, args.keep)
    print(json.dumps(result, indent=1) if args.json else _table(result))
    return 0 if _all_equal(result) else 1


if __name__ == "__main__":
    sys.exit(main())
