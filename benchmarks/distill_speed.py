"""Distillation speed and memory: seconds per iteration, peak memory, FLOPs and the fraction of
the device's measured matmul throughput, on CIFAR-10/100-shaped ``fake`` data.

Paper settings (ConvNet-3, width 128, factor 2, F = 1024, calibration on, DSA color_crop_cutout)
with a pool of ONE untrained extractor (pool training is not what is measured). Each measured
configuration runs in its own process, so peak memory is its own: warm-up iterations, then the
median of the timed ones (CUDA: synchronised around each iteration). The fake train split has
50,000 images like CIFAR (5,000 or 500 per class).

    uv run python benchmarks/distill_speed.py                   # CPU default, a few minutes
    uv run python benchmarks/distill_speed.py --device cuda     # paper settings on a GPU
    uv run python benchmarks/distill_speed.py --device cuda --gpu-mem 2.5G
    uv run python benchmarks/distill_speed.py --device cuda --classes 100 --ipc 50 --real-per-class 500 \
        --freqs 4096 --ablations kernels --only-ablations            # issue 23's kernel levers

Every run is planned as the command line plans it (``ncfm_core.jobs.plan.make_plan``, the
plan's backend settings included, applied by ``apply_run_settings``): cuDNN autotuning is the
plan's (off by default; ``--cudnn-benchmark on`` sets ``NCFM_CUDNN_BENCHMARK=1`` for the
workers, and the plan records it), and the allocator is configured before CUDA starts, as the
command line does (``ncfm_core.runtime.configure_allocator``).

On CPU the defaults are cut down (CIFAR-10 shape, IPC 1 and 10, 32 real images per class, 1
warm-up + 2 timed iterations) so the run ends in minutes; the table says so, and a second table
gives every paper-settings configuration's FLOPs and planned memory, with CPU times projected
from the measured FLOP rate (labelled as projections). Results go to
``docs/benchmarks/distill_speed.md`` (one section per device type; other sections are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402

from ncfm_core import devices, forward, kernels, memory_model, planner, runtime  # noqa: E402
from ncfm_core.config import DistillConfig, make_config  # noqa: E402
from ncfm_core.data import DatasetShape, load_dataset  # noqa: E402
from ncfm_core.distill import Distiller  # noqa: E402
from ncfm_core.forward import CompileFallbackWarning  # noqa: E402
from ncfm_core.jobs.plan import apply_run_settings, decide_precisions, make_plan  # noqa: E402
from ncfm_core.memory_model import Plan  # noqa: E402
from ncfm_core.pool import Pool, PoolSpec  # noqa: E402

SCRIPT = "benchmarks/distill_speed.py"
DEFAULT_OUT = kit.BENCHMARK_PAGES / "distill_speed.md"
TRAIN_IMAGES = 50_000  # CIFAR-10 and CIFAR-100 both have 50,000 train images
ABLATIONS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "baseline (again)": {},  # the same configuration twice: the spread between them is the noise
    "channels_last": {"channels_last": True},
    "bf16": {"precision": "bf16"},
    "fp32": {"precision": "fp32"},
    "compile": {"compile": True},
    "class_chunk=1": {"class_chunk": 1},
    "checkpointing": {"activation_checkpointing": True},
    # issue 14's levers (keys starting with "_" are not config fields; see ablation_distiller):
    # what the pre-cap code cost when asked twice a class's size: twice the real work (only while
    # twice real_per_class fits in a class: 32 -> 64 of 5,000 on CPU; at 1024 on 500 both are capped)
    "2x real/class (pre-cap cost)": {"_real_per_class_factor": 2},
    "cf_precision=tf32": {"cf_precision": "tf32"},  # a CUDA lever: on CPU the same fp32 run
    "real side no_grad (pre-#14)": {"_real_side_mode": "no_grad"},
    "CUDA default plan (frugal)": {"_cuda_frugal_plan": True},  # the chunks the CUDA chooser picks
    # issue 23's kernel levers (ncfm_core.kernels): the run's kernels option, and cuDNN autotuning
    # per variant ("_cudnn_benchmark"; without it a variant runs with the worker's setting)
    **{name: {"kernels": levers, "_cudnn_benchmark": autotune}
       for name, (levers, autotune) in kit.KERNEL_VARIANTS.items()},
}
# (the frugal CUDA plan is left out: for the small CPU configuration it is the fastest plan itself)
LEVER_ABLATIONS = ("baseline,2x real/class (pre-cap cost),cf_precision=tf32,real side no_grad (pre-#14),"
                   "baseline (again)")
KERNEL_ABLATIONS = ",".join(kit.KERNEL_VARIANTS)  # today's path, each lever alone, all, the defaults, today's again


def planned(config: DistillConfig, shape: DatasetShape, device: torch.device,
            budget: devices.MemoryBudget) -> tuple[DistillConfig, Plan]:
    """``config`` planned as a job plans it (``make_plan``: precisions, chunks, backend settings)
    for ``budget``, and the plan."""
    plan, _ = make_plan(config, shape, device, budget)
    return plan.apply(config), plan


def ablation_distiller(spec: dict[str, Any], name: str, dataset, shape: DatasetShape, device: torch.device,
                       budget: devices.MemoryBudget) -> tuple[Distiller, Plan]:
    """The distiller and plan of one ablation variant: config overrides (the kernel levers are
    one: ``kernels``), plus the levers that are not config fields (a larger real draw, the real
    side's autograd mode, the plan the CUDA time model would choose for this configuration with
    140 GiB free). cuDNN autotuning is set per step (:func:`use_cudnn_autotuning`)."""
    variant = dict(ABLATIONS[name])
    factor = variant.pop("_real_per_class_factor", 1)
    mode = variant.pop("_real_side_mode", None)
    frugal = variant.pop("_cuda_frugal_plan", False)
    variant.pop("_cudnn_benchmark", None)
    config = paper_config(spec["classes"], spec["ipc"], spec["real_per_class"] * factor, spec["freqs"], True,
                          **variant)
    config, plan = planned(config, shape, device, budget)
    if frugal:
        cuda_plan = planner.plan_run(decide_precisions(config, "cuda:0"), shape, "cuda:0", None, free_bytes=140 * 2**30)
        plan = dataclasses.replace(plan, real_chunk=cuda_plan.real_chunk, class_chunk=cuda_plan.class_chunk)
        config = plan.apply(config)
    distiller = Distiller(config, dataset, untrained_pool(config, dataset), device)
    if mode == "no_grad":
        distiller._real_side_mode = torch.no_grad
    return distiller, plan


def use_cudnn_autotuning(device: torch.device, plan: Plan, on: bool) -> None:
    """cuDNN autotuning for the steps that follow, through the one function that applies a plan's
    backend settings (``runtime.apply_backend``): the plan's own setting, or ``on`` for the
    ablation's autotuning variant (the variants share one process, so each step sets its own)."""
    runtime.apply_backend(dataclasses.replace(plan.backend, cudnn_benchmark=on), device)


# ----------------------------------------------------------------------------- one configuration


def paper_config(classes: int, ipc: int, real_per_class: int, freqs: int, psi: bool, **overrides: Any) -> DistillConfig:
    return make_config(
        "fake", ipc, factor=2, real_per_class=real_per_class, num_freqs=freqs, sampler=psi, width=128,
        depth=3, calib_weight=1.0, pool_size=1, pool_epochs=0, dsa_strategy="color_crop_cutout", seed=0,
        **overrides,
    )


def untrained_pool(config: DistillConfig, dataset) -> Pool:
    spec = PoolSpec.from_config(config, dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the one member's initial weights; the global RNG is restored after
        state = {k: v.clone() for k, v in spec.build().state_dict().items()}
    return Pool(spec, [state], [state], [])


def current_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def worker_setup(spec: dict[str, Any]) -> tuple[torch.device, Any, DatasetShape, devices.MemoryBudget]:
    """What every worker does first: the allocator's configuration (before CUDA starts), threads,
    the CIFAR-shaped fake data; returns (device, dataset, its shape, the ``--gpu-mem`` budget)."""
    runtime.configure_allocator()
    kit.set_threads(spec["threads"])
    device = torch.device(spec["device"])
    forward.COMPILE_BACKEND = spec.get("compile_backend", forward.COMPILE_BACKEND)
    classes = spec["classes"]
    dataset = load_dataset("fake", num_classes=classes, train_per_class=TRAIN_IMAGES // classes, test_per_class=1)
    return device, dataset, DatasetShape.of(dataset), devices.MemoryBudget.resolve(spec["gpu_mem"], device)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration (called in a fresh process)."""
    device, dataset, shape, budget = worker_setup(spec)
    overrides = dict(spec["overrides"])
    config = paper_config(spec["classes"], spec["ipc"], spec["real_per_class"], spec["freqs"], spec["psi"],
                          **overrides)
    config, plan = planned(config, shape, device, budget)
    apply_run_settings(plan, device, budget)  # the cap and the backend settings, as a job applies them
    pool = untrained_pool(config, dataset)

    distiller = Distiller(config, dataset, pool, device)
    matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(distiller.precision, torch.float32)
    rate_before = device_matmul_rate(device, matmul_dtype)
    rss_before = current_rss()
    devices.reset_peak(device)
    seconds, cpu_seconds, first_loss = [], [], None
    for i in range(spec["warmup"] + spec["iters"]):
        took = kit.timed(distiller.step, device)
        seconds.append(took.wall)
        cpu_seconds.append(took.cpu)
        if i == 0:
            first_loss = distiller.read_metrics()["loss"]
    unsynced = None
    if device.type == "cuda":  # the same loop without per-iteration syncs: what a real run sees

        def steps() -> None:
            for _ in range(spec["iters"]):
                distiller.step()

        unsynced = kit.timed(steps, device).wall / spec["iters"]
    peak = devices.measure_peak(device)
    # The better of two measurements around the loop: on a shared machine the load drifts.
    peak_rate = max(rate_before, device_matmul_rate(device, matmul_dtype))

    sample_seconds = [kit.timed(distiller.sample_real, device).wall for _ in range(5)]
    labels = dataset.train_labels.to(device).double()

    def argsort_sampler() -> None:  # what the sampler replaced: a float64 argsort over the whole train set
        keys = torch.rand(labels.shape, generator=distiller.generator, device=device, dtype=torch.float64)
        torch.argsort(labels + keys)

    argsort_seconds = [kit.timed(argsort_sampler, device).wall for _ in range(5)]

    timed = seconds[spec["warmup"]:]
    flops = memory_model.estimate_iteration_flops(config, shape, plan)
    return {
        "spec": spec,
        "plan": plan.to_dict(),
        "precision": distiller.precision,
        "channels_last": distiller.channels_last,
        "seconds": timed,
        "median_seconds": statistics.median(timed),
        "median_cpu_seconds": statistics.median(cpu_seconds[spec["warmup"]:]),
        "unsynced_seconds": unsynced,
        "warmup_seconds": seconds[: spec["warmup"]],
        "first_loss": first_loss,
        "flops": flops,
        "matmul_rate": peak_rate,
        "matmul_dtype": str(matmul_dtype).removeprefix("torch."),
        "peak": peak.to_dict(),
        "rss_before_bytes": rss_before,
        "sampler_seconds": statistics.median(sample_seconds),
        "argsort_sampler_seconds": statistics.median(argsort_seconds),
    }


def run_ablation_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time several variants of one configuration in ONE process, interleaved round by round
    (each round in a rotated order), so drifting machine load hits every variant alike."""
    device, dataset, shape, budget = worker_setup(spec)
    variants: dict[str, dict[str, Any]] = {}
    for name in spec["variants"]:
        with warnings.catch_warnings(record=True) as caught:  # a lever that fell back to eager says so
            warnings.simplefilter("always", CompileFallbackWarning)
            distiller, plan = ablation_distiller(spec, name, dataset, shape, device, budget)
            if not variants:  # the backend settings, without the cap: the variants share this process, so
                # its memory holds every variant's images and optimisers; each variant still runs the
                # plan made for the budget, and the speed steps check a capped run's peak
                apply_run_settings(plan, device, devices.MemoryBudget())
            autotune = ABLATIONS[name].get("_cudnn_benchmark")
            autotune = plan.backend.cudnn_benchmark if autotune is None else autotune  # None: the plan's
            use_cudnn_autotuning(device, plan, autotune)
            warmup, first_loss = [], None
            for i in range(max(1, spec["warmup"])):
                warmup.append(kit.timed(distiller.step, device).wall)
                if i == 0:
                    first_loss = distiller.read_metrics()["loss"]
        fallbacks = [str(w.message) for w in caught if issubclass(w.category, CompileFallbackWarning)]
        variants[name] = dict(distiller=distiller, plan_object=plan, plan=plan.to_dict(), warmup_seconds=warmup,
                              first_loss=first_loss,
                              seconds=[], cpu_seconds=[], cudnn_benchmark=autotune, fallbacks=fallbacks,
                              compile_seconds=distiller.compile_seconds)
    names = list(variants)
    for round_index in range(spec["iters"]):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            entry = variants[name]
            use_cudnn_autotuning(device, entry["plan_object"], entry["cudnn_benchmark"])
            took, step_peak = step_with_peak(entry["distiller"], device)
            entry["seconds"].append(took.wall)
            entry["cpu_seconds"].append(took.cpu)
            if step_peak is not None:
                entry["step_peak_bytes"] = max(entry.get("step_peak_bytes", 0), step_peak)
    results = {}
    for name, entry in variants.items():
        distiller = entry.pop("distiller")
        entry.pop("plan_object")
        results[name] = {
            **entry,
            "spec": spec,
            "precision": distiller.precision,
            "channels_last": distiller.channels_last,
            "kernels": distiller.levers.to_dict(),
            "median_seconds": statistics.median(entry["seconds"]),
            "median_cpu_seconds": statistics.median(entry["cpu_seconds"]),
        }
    return {"variants": results}


def step_with_peak(distiller: Distiller, device: torch.device) -> tuple[kit.Timed, int | None]:
    """One timed step, and on CUDA the most memory it allocated above what was allocated before
    it (its own working set: the variants of an ablation share one process, so the process's
    peak holds every variant's images and optimiser state). None elsewhere."""
    if device.type != "cuda":
        return kit.timed(distiller.step, device), None
    kit.sync(device)
    resting = torch.cuda.memory_allocated(device)
    devices.reset_peak(device)
    took = kit.timed(distiller.step, device)
    return took, devices.measure_peak(device).allocated_bytes - resting


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh process; returns its measurements."""
    seconds, result = kit.run_json([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                   label=f"worker for {spec}")
    result["wall_seconds"] = seconds
    return result


# ----------------------------------------------------------------------------- device peak


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Measured FLOP/s of a square matmul of ``size``: the device's practical peak."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    a @ b

    def products() -> None:
        for _ in range(repeats):
            a @ b

    return 2 * size**3 * repeats / kit.timed(products, device).wall


def device_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """The practical peak FLOP/s this run compares against: a large square matmul in ``dtype``."""
    if device.type == "cuda":
        return matmul_rate(device, dtype, 8192 if dtype != torch.float32 else 4096, 20)
    return matmul_rate(device, dtype, 1024, 8)


# ----------------------------------------------------------------------------- report


def fmt_flops(value: float) -> str:
    return f"{value / 1e12:.2f} T" if value >= 1e11 else f"{value / 1e9:.1f} G"


def peak_text(result: dict[str, Any]) -> str:
    peak = result["peak"]
    if peak.get("reserved_bytes") is not None:
        return f"{devices.format_bytes(peak['allocated_bytes'])} / {devices.format_bytes(peak['reserved_bytes'])}"
    growth = ""
    if peak.get("rss_bytes") and result.get("rss_before_bytes"):
        growth = f" (+{devices.format_bytes(peak['rss_bytes'] - result['rss_before_bytes'])})"
    return f"{devices.format_bytes(peak.get('peak_bytes') or 0)}{growth}"


SHAPE_NAMES = {10: "CIFAR-10", 100: "CIFAR-100"}


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def results_table(results: list[dict[str, Any]]) -> list[str]:
    cuda = bool(results) and results[0]["peak"].get("reserved_bytes") is not None
    peak_header = "peak alloc / reserved" if cuda else "peak RSS (growth in loop)"
    lines = [
        "| shape | IPC | real/class | psi | plan (real chunk, classes/pass, precision, ckpt) | s/iter (median) "
        f"| FLOPs/iter | achieved | matmul peak | of peak | {peak_header} | estimate alloc / reserved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        spec, plan = r["spec"], r["plan"]
        total = r["flops"]["total"]
        achieved = total / r["median_seconds"]
        seconds = kit.fmt_seconds(r["median_seconds"])
        if r.get("unsynced_seconds") is not None:
            seconds += f" ({kit.fmt_seconds(r['unsynced_seconds'])} unsynced)"
        else:
            seconds += f" ({kit.fmt_seconds(r['median_cpu_seconds'])} CPU)"
        shape_name = SHAPE_NAMES.get(spec["classes"], f"{spec['classes']} classes")
        plan_text = (
            f"{plan['real_chunk']}, {plan['class_chunk']}, {r['precision']}, {on_off(plan['activation_checkpointing'])}"
        )
        lines.append(
            f"| {shape_name} | {spec['ipc']} | {spec['real_per_class']} | {on_off(spec['psi'])} | {plan_text} "
            f"| {seconds} | {fmt_flops(total)} | {achieved / 1e9:.1f} GFLOP/s "
            f"| {r['matmul_rate'] / 1e9:.1f} GFLOP/s {r['matmul_dtype']} | {100 * achieved / r['matmul_rate']:.1f}% "
            f"| {peak_text(r)} | {devices.format_bytes(plan.get('estimated_allocated_bytes'))} / "
            f"{devices.format_bytes(plan['estimated_peak_bytes'])} |"
        )
    return lines


def ablation_table(results: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """One row per variant; speed ratios are against the first row (time first / time row)."""
    first = results[0][1] if results else None
    lines = [
        "| variant | precision | channels_last | kernels | cuDNN autotuning | plan (real chunk, classes/pass, ckpt) "
        "| s/iter (median) | CPU s/iter | speed vs first row (wall, CPU) | step peak above rest | first-step loss "
        "| warm-up s | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results:
        plan = r["plan"]
        ratio = (f"{kit.ratio(first['median_seconds'], r['median_seconds'])}, "
                 f"{kit.ratio(first['median_cpu_seconds'], r['median_cpu_seconds'])}")
        loss = "-" if r["first_loss"] is None else f"{r['first_loss']:.6f}"
        step_peak = r.get("step_peak_bytes")
        levers = kernels.KernelLevers.from_dict(r.get("kernels", {})).describe()
        if r.get("fallbacks"):
            levers += " (fell back: " + "; ".join(r["fallbacks"]) + ")"
        compiled = r.get("compile_seconds")
        lines.append(
            f"| {name} | {r['precision']} | {'on' if r['channels_last'] else 'off'} | {levers} "
            f"| {on_off(r['cudnn_benchmark']) if 'cudnn_benchmark' in r else '-'} "
            f"| {plan['real_chunk']}, {plan['class_chunk']}, {'on' if plan['activation_checkpointing'] else 'off'} "
            f"| {kit.fmt_seconds(r['median_seconds'])} | {kit.fmt_seconds(r['median_cpu_seconds'])} | {ratio} "
            f"| {'-' if step_peak is None else devices.format_bytes(step_peak)} | {loss} "
            f"| {', '.join(kit.fmt_seconds(s) for s in r['warmup_seconds'])} "
            f"| {'-' if compiled is None else kit.fmt_seconds(compiled)} |"
        )
    return lines


def projection_table(
    device: torch.device, freqs: int, achieved_rate: float, free_bytes: int | None
) -> list[str]:
    lines = [
        "| shape | IPC | psi | FLOPs/iter | fastest plan that fits (real chunk, classes/pass, ckpt): estimate "
        "| plan under 2.5 GiB: estimate | projected s/iter |",
        "|---|---|---|---|---|---|---|",
    ]
    for classes, name in ((10, "CIFAR-10"), (100, "CIFAR-100")):
        shape = DatasetShape(classes, 3, 32, TRAIN_IMAGES)
        for ipc in (1, 10, 50):
            for psi in (True, False):
                config = decide_precisions(paper_config(classes, ipc, 1024, freqs, psi), device)
                cells = []
                for limit in (None, devices.parse_memory("2.5G")):
                    try:
                        plan = planner.plan_run(config, shape, device, limit, free_bytes=free_bytes)
                        cells.append(
                            f"{plan.real_chunk}, {plan.class_chunk}, {on_off(plan.activation_checkpointing)}: "
                            f"{devices.format_bytes(plan.estimated_peak_bytes)}"
                        )
                    except Exception as err:  # noqa: BLE001 - an infeasible plan is a result to show
                        cells.append(f"infeasible ({type(err).__name__})")
                fastest = planner.plan_path(config, shape, device)[0]
                flops = memory_model.estimate_iteration_flops(config, shape, fastest)["total"]
                lines.append(
                    f"| {name} | {ipc} | {'on' if psi else 'off'} | {fmt_flops(flops)} | {cells[0]} | {cells[1]} "
                    f"| {kit.fmt_seconds(flops / achieved_rate)} |"
                )
    return lines


def write_section(path: Path, device_type: str, body: list[str]) -> None:
    """Replace this device type's section of ``path`` (keeping the others)."""
    start, end = f"<!-- section: {device_type} -->", f"<!-- end section: {device_type} -->"
    header = [
        "# Distillation speed and memory",
        "",
        "Written by `benchmarks/distill_speed.py`; one section per device type, each replaced when the",
        "benchmark runs on that device type. Method and caveats are in the script's docstring.",
        "",
    ]
    text = path.read_text() if path.exists() else "\n".join(header)
    block = "\n".join([start, *body, end])
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    kit.write_page(path, text)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = kit.parser(
        __doc__,
        kit.device_option(kinds="cpu, cuda or auto"),
        kit.threads_option(default=torch.get_num_threads(), help="torch CPU threads"),
        kit.out_option(DEFAULT_OUT),
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, nargs="+", help="10 and/or 100 (default: 10 on CPU, 10 100 on GPU)")
    parser.add_argument("--ipc", type=int, nargs="+", help="IPCs (default: 1 10 on CPU, 1 10 50 on GPU)")
    parser.add_argument("--real-per-class", type=int,
                        help="real images per class per iteration (default: 32 on CPU, 1024 on GPU)")
    parser.add_argument("--freqs", type=int, default=1024, help="frequencies F (default 1024)")
    parser.add_argument("--psi", choices=("both", "on", "off"), default="both")
    parser.add_argument("--iters", type=int, help="timed iterations (default: 2 on CPU, 10 on GPU)")
    parser.add_argument("--warmup", type=int, help="discarded iterations first (default: 1 on CPU, 3 on GPU)")
    parser.add_argument("--gpu-mem", help="plan for and cap the allocator at this budget (e.g. 2.5G)")
    parser.add_argument("--ablations",
                        help="comma-separated variants run on the first IPC and shape, psi on (choices: "
                        f"{', '.join(ABLATIONS)}; '' for none; 'levers' for issue 14's: {LEVER_ABLATIONS}; "
                        f"'kernels' for issue 23's kernel levers (today's path, each lever alone, all of them, "
                        f"the device's defaults, today's again): {KERNEL_ABLATIONS}; "
                        "default: baseline,channels_last,bf16,"
                        "class_chunk=1,checkpointing,baseline (again) on CPU; on GPU fp32 and compile instead of bf16)")
    parser.add_argument("--only-ablations", action="store_true",
                        help="measure only the ablation variants, not the shape x IPC x psi rows")
    parser.add_argument("--cudnn-benchmark", choices=("on", "off"),
                        help=f"cuDNN autotuning on CUDA (default: the plan's, off; sets {runtime.CUDNN_BENCHMARK_ENV})")
    parser.add_argument("--compile-backend", default=forward.COMPILE_BACKEND,
                        help=f"torch.compile backend of the compile lever (default {forward.COMPILE_BACKEND}; the CPU "
                        "smoke test uses aot_eager, which traces and runs the same graphs without generating code)")
    parser.add_argument("--json-out", type=Path,
                        help="also write the raw figures here: {results: [...], ablations: {name: ...}, "
                        "ablation_order: [name, ...]}")
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_ablation_worker(spec) if "variants" in spec else run_worker(spec)))
        return 0

    runtime.configure_allocator()  # before this process touches CUDA; the workers inherit it
    if args.cudnn_benchmark is not None:  # read by each worker's plan (ncfm_core.runtime.decide_backend)
        os.environ[runtime.CUDNN_BENCHMARK_ENV] = "1" if args.cudnn_benchmark == "on" else "0"
    device, _ = devices.resolve_device(args.device)
    gpu = device.type == "cuda"
    classes = args.classes or ([10, 100] if gpu else [10])
    ipcs = args.ipc or ([1, 10, 50] if gpu else [1, 10])
    real_per_class = args.real_per_class or (1024 if gpu else 32)
    iters = args.iters or (10 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    psis = {"both": [True, False], "on": [True], "off": [False]}[args.psi]
    if args.ablations is None:
        args.ablations = ("baseline,channels_last,fp32,compile,class_chunk=1,checkpointing" if gpu
                          else "baseline,channels_last,bf16,class_chunk=1,checkpointing,baseline (again)")
    args.ablations = {"levers": LEVER_ABLATIONS, "kernels": KERNEL_ABLATIONS}.get(args.ablations, args.ablations)
    ablations = [a for a in args.ablations.split(",") if a]
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        parser.error(f"unknown ablation(s) {unknown}; choose from {', '.join(ABLATIONS)}")
    if args.only_ablations and not ablations:
        parser.error("--only-ablations measures the ablation variants: name some with --ablations")
    kit.set_threads(args.threads)

    common = dict(device=str(device), real_per_class=real_per_class, freqs=args.freqs, iters=iters, warmup=warmup,
                  gpu_mem=args.gpu_mem, threads=args.threads, compile_backend=args.compile_backend)
    started = time.perf_counter()
    results = []
    for c in [] if args.only_ablations else classes:
        for ipc in ipcs:
            for psi in psis:
                spec = dict(common, classes=c, ipc=ipc, psi=psi, overrides={})
                kit.log(f"measuring {c} classes, IPC {ipc}, psi {on_off(psi)} ...")
                results.append(spawn(spec))
                kit.log(f"  {results[-1]['median_seconds']:.3f} s/iter")
    ablation_results = []
    if ablations:
        spec = dict(common, classes=classes[0], ipc=ipcs[0], psi=True, variants=ablations)
        kit.log(f"ablations {', '.join(ablations)} ...")
        ablation_results = list(spawn(spec)["variants"].items())
        for name, r in ablation_results:
            kit.log(f"  {name}: {r['median_seconds']:.3f} s/iter")

    rates = {"fp32": device_matmul_rate(device, torch.float32), "bf16": device_matmul_rate(device, torch.bfloat16)}
    achieved = [r["flops"]["total"] / r["median_seconds"] for r in results]
    achieved_rate = statistics.median(achieved) if achieved else rates["fp32"]
    free = devices.detect_memory(device)[0]
    elapsed = time.perf_counter() - started

    body = [
        f"## {device.type.upper()}",
        "",
        f"Command: `{kit.command_line(SCRIPT, argv)}` ({elapsed / 60:.1f} min, {time.strftime('%Y-%m-%d')}).",
        f"Machine: {kit.describe_machine(device).summary()}.",
        "Square-matmul throughput measured at the end of the run: "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items())
        + ("" if gpu else " (this 2-core machine is shared with other jobs, so every figure here carries "
           "load noise: compare the two identical 'baseline' rows of the second table)") + ".",
        "",
        f"Settings: `fake` data with {TRAIN_IMAGES:,} train images, ConvNet-3 (width 128, instance norm), factor 2, "
        f"F = {args.freqs}, calibration on, a pool of 1 untrained extractor; {warmup} warm-up + {iters} timed "
        f"iteration(s), median; each row in its own process. Real images per class: **{real_per_class}**"
        + ("" if real_per_class == 1024 else " (the paper uses 1024; cut down so the CPU run ends in minutes)")
        + ". The plan is the planner's: "
        + (f"the fastest that fits `--gpu-mem {args.gpu_mem}`" if args.gpu_mem else
           "the smallest plan within 10% of the fastest by the time model (CUDA), the fastest that fits the free "
           "memory minus a margin (CPU)") + ".",
        "",
        "FLOPs count convolutions, linear layers and the CF matmuls (analytical, "
        "`memory_model.estimate_iteration_flops`); 'achieved' = FLOPs / median time; 'matmul peak' = a square "
        "matmul's rate in the run's precision, measured in the same process just before and after the timed "
        "iterations (the better of the two); 'of peak' = achieved / that. "
        + ("Peak on CUDA: `max_memory_allocated` / `max_memory_reserved` during the loop." if gpu else
           "Peak on CPU: peak RSS of the whole worker process (interpreter, torch and the data included), in "
           "brackets its growth during the iterations; 'estimate' is the planner's model of tensor memory."),
    ]
    body.append("")
    if results:
        body += [*results_table(results), ""]
        sampler = statistics.median(r["sampler_seconds"] for r in results)
        argsort = statistics.median(r["argsort_sampler_seconds"] for r in results)
        body += [
            f"Real-batch sampling: per-class `topk` of random keys {sampler * 1e3:.2f} ms vs the former float64 "
            f"argsort over all {TRAIN_IMAGES:,} images {argsort * 1e3:.2f} ms (medians).",
            "",
        ]
    if ablation_results:
        first = ablation_results[0][1]["spec"]
        body += [
            f"### What helps ({first['classes']} classes, IPC {first['ipc']}, psi on, "
            f"{first['real_per_class']} real/class)",
            "",
            "Each variant changes one thing from the device's defaults (or, where its name says so, several); "
            "all run in one process, timed in "
            "interleaved rounds so that drifting machine load hits them alike. 'CPU s' is the process's CPU "
            "time, less sensitive than wall time to other work on a shared machine. 'kernels': the run's kernel "
            "levers that differ from today's path (`ncfm_core.kernels`; 'fell back' quotes a lever that could "
            "not run and left the run eager); 'cuDNN autotuning': `cudnn.benchmark` during the variant's steps "
            "(CUDA); 'compile s': the seconds compiling the blocks before the first step, not in s/iter. On "
            "the CPU, graphs=on runs the CUDA-graph contract checker (it recomputes and checks every call: a "
            "test harness, not a speed). 'Step peak above rest' (CUDA): the most memory a "
            "step allocated above what was allocated before it, i.e. its own working set (the variants "
            "share a process, so the process's peak also holds every variant's images and optimiser state). "
            "The first-step loss "
            "shows what a change does to the numbers: the same seed draws the same data, so fp32 variants "
            "agree to rounding and low precision shows its error.",
            "",
            *ablation_table(ablation_results),
            "",
        ]
    body += [
        f"### Paper settings (1024 real/class, F = {args.freqs}), all configurations",
        "",
        "Planned, not measured: FLOPs per iteration and the planner's memory estimate for its fastest plan "
        f"that fits this machine's free memory ({devices.format_bytes(free)}) and under a 2.5 GiB budget. "
        f"'Projected' = FLOPs / the median achieved rate of the measured rows ({achieved_rate / 1e9:.1f} GFLOP/s): "
        "an extrapolation, not a measurement.",
        "",
        *projection_table(device, args.freqs, achieved_rate, free),
    ]
    write_section(args.out, device.type, body)
    if args.json_out is not None:
        kit.write_json(args.json_out, {"device": str(device), "results": results,
                                       "ablations": dict(ablation_results),  # keys sorted in the file:
                                       "ablation_order": [name for name, _ in ablation_results]})
    print("\n".join(body))
    kit.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
