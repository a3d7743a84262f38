"""Memory budgets through the command line: ``--gpu-mem``, ``--dry-run``, exit code 4, and the
plan, measured peak and FLOP count a run records in its manifest (and ``resume`` replays)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_runner import TINY, error_line, invoke, one_json
from typer.testing import CliRunner

from ncfm_cli.main import app
from ncfm_core import api
from ncfm_cli.output import GlobalOptions, ProgressRenderer
from ncfm_core.config import DistillConfig, make_config
from ncfm_core.data import DatasetShape, dataset_shape
from ncfm_core.devices import MemoryBudget, parse_memory
from ncfm_core.distill import Distiller
from ncfm_core.errors import BudgetInfeasibleError
from ncfm_core.jobs import common as job_common
from ncfm_core.jobs.plan import decide_precisions
from ncfm_core.memory_model import Plan, estimate_iteration_flops
from ncfm_core.planner import plan_path, plan_run
from ncfm_core.runtime import decide_backend
from ncfm_core.store import Store

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def store_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file()) if store.exists() else []


def mib_spec(size: int) -> str:
    """How the planner writes a minimum: whole MiB, rounded up."""
    return f"{math.ceil(size / 2**20)}M"


# -- dry runs ---------------------------------------------------------------------------------


def test_dry_run_fake_ipc50_1g_is_what_the_planner_says(tmp_path, no_gpu):
    config = decide_precisions(make_config("fake", 50), "cuda:0")
    shape = dataset_shape("fake")
    assert shape == DatasetShape(10, 3, 32, 640)  # fake without options is CIFAR-10-shaped
    args = ["--store", tmp_path / "store", "distill", "fake", "--ipc", "50", "--dry-run", "--gpu-mem", "1G", "--json"]
    try:
        expected = plan_run(config, shape, "cuda:0", parse_memory("1G"), backend=decide_backend("cuda:0"))
    except BudgetInfeasibleError as err:
        result = invoke(*args, expect=4)
        assert error_line(result) == f"error: {err}"
        assert "needs at least" in str(err)
        return
    out = one_json(invoke(*args))
    assert out["dry_run"] is True and out["device"] == "cuda:0"  # a GPU budget with no GPU here: plan for CUDA
    assert out["plan"] == json.loads(json.dumps(expected.to_dict()))
    assert out["plan"]["estimated_peak_bytes"] <= 2**30 == out["plan"]["budget_bytes"]
    assert out["flops_per_iteration"] == estimate_iteration_flops(config, shape, expected)["total"]
    assert out["config"] == expected.apply(config).to_dict()

    human = invoke(*args[:-1]).stdout
    for label in ("real chunk", "class chunk", "precision", "checkpointing", "budget", "estimated peak",
                  "estimate terms"):
        assert label in human, human
    assert str(expected.real_chunk) in human and "1.00 GiB" in human


def test_dry_run_writes_nothing_and_loads_no_data(tmp_path, monkeypatch, no_gpu):
    def no_loading(*args, **kwargs):
        raise AssertionError("a dry run of a registered dataset must not load it")

    monkeypatch.setattr(job_common, "load_dataset", no_loading)
    store = tmp_path / "store"
    invoke("--store", store, "distill", "fake", "--ipc", "10", "--dry-run", "--gpu-mem", "4G")
    invoke("--store", store, "distill", "fake", "--ipc", "10", "--dry-run", "--gpu-mem", "1M", expect=4)
    # On CPU without a budget: the detected RAM, minus the margin.
    monkeypatch.setattr("ncfm_core.planner.detect_memory", lambda device: (8 * 2**30, 16 * 2**30))
    out = one_json(invoke("--store", store, "--json", "distill", "fake", "--ipc", "10", "--dry-run"))
    assert out["device"] == "cpu" and out["plan"]["precision"] == "fp32"
    assert out["plan"]["budget_bytes"] == 8 * 2**30 - int(0.1 * 8 * 2**30)
    assert "free memory" in out["plan"]["budget_source"]
    assert store_files(store) == []


def test_dry_run_default_cuda_plan_is_frugal_and_gpu_mem_all_is_the_fastest(tmp_path, monkeypatch, no_gpu):
    """Issue 14 changed the default CUDA plan on purpose: without --gpu-mem the smallest plan
    whose estimated time is within 10% of the fastest (it says why), --gpu-mem all the fastest
    that fits the free memory (the old default)."""
    monkeypatch.setattr("ncfm_core.planner.detect_memory", lambda device: (140 * 2**30, 141 * 2**30))
    config, shape = decide_precisions(make_config("cifar100", 50), "cuda:0"), dataset_shape("cifar100")
    base = ["--store", tmp_path / "store", "--json", "distill", "cifar100", "--ipc", "50", "--dry-run"]
    frugal = one_json(invoke(*base, "--device", "cuda"))["plan"]
    fastest = one_json(invoke(*base, "--gpu-mem", "all"))["plan"]
    expected = plan_run(config, shape, "cuda:0", None, free_bytes=140 * 2**30, backend=decide_backend("cuda:0"))
    assert frugal == json.loads(json.dumps(expected.to_dict()))
    assert "smallest plan within 10%" in frugal["chosen_because"]
    assert fastest["estimated_peak_bytes"] == plan_path(config, shape, "cuda:0")[0].estimated_peak_bytes
    assert frugal["estimated_peak_bytes"] < fastest["estimated_peak_bytes"] / 10
    assert frugal["estimated_seconds"] <= 1.1 * fastest["estimated_seconds"]
    assert "--gpu-mem all" in fastest["chosen_because"]
    human = invoke(*[a for a in base if a != "--json"], "--device", "cuda").stdout
    assert "chosen because" in human and "estimated time" in human


def test_tiny_budget_exits_4_with_the_minimum_and_writes_nothing(tmp_path, no_gpu):
    store = tmp_path / "store"
    config = decide_precisions(make_config("fake", 50), "cuda")
    minimum = plan_path(config, dataset_shape("fake"), "cuda", parse_memory("10M"))[-1].estimated_peak_bytes
    result = invoke("--store", store, "distill", "fake", "--ipc", "50", "--dry-run", "--gpu-mem", "10M", expect=4)
    line = error_line(result)
    assert f"needs at least {mib_spec(minimum)}" in line and f"--gpu-mem to at least {mib_spec(minimum)}" in line

    # A real run (planned for this CPU) refuses before it creates anything.
    cpu_config = decide_precisions(make_config("fake", 2, pool_size=1, pool_epochs=0, num_freqs=16, real_per_class=4,
                                               width=8), "cpu")
    cpu_minimum = plan_path(cpu_config, dataset_shape("fake"), "cpu", parse_memory("1M"))[-1].estimated_peak_bytes
    result = invoke("--store", store, "distill", "fake", "--ipc", "2", *TINY, "--gpu-mem", "1M", expect=4)
    assert f"needs at least {mib_spec(cpu_minimum)}" in error_line(result)
    assert store_files(store) == []


def test_smaller_budget_never_gives_larger_chunks_through_the_cli(tmp_path, no_gpu):
    previous = None
    seen = 0
    for spec in ("64G", "4G", "2G", "1G", "900M", "800M", "700M", "650M", "600M"):
        result = CliRunner().invoke(app, ["--store", str(tmp_path), "--json", "distill", "fake", "--ipc", "50",
                                          "--dry-run", "--gpu-mem", spec])
        if result.exit_code == 4:
            assert "needs at least" in result.stderr
            break
        assert result.exit_code == 0, result.output
        plan = one_json(result)["plan"]
        assert plan["estimated_peak_bytes"] <= plan["budget_bytes"]
        if previous is not None:
            assert plan["real_chunk"] <= previous["real_chunk"]
            assert plan["class_chunk"] <= previous["class_chunk"]
            assert plan["activation_checkpointing"] >= previous["activation_checkpointing"]
            assert plan["estimated_peak_bytes"] <= previous["estimated_peak_bytes"]
        previous = plan
        seen += 1
    assert seen >= 3  # the walk went through several budgets before (if ever) becoming infeasible


def test_fraction_without_a_known_device_size_is_a_clear_usage_error(tmp_path, no_gpu):
    result = invoke("--store", tmp_path, "distill", "fake", "--ipc", "10", "--dry-run", "--gpu-mem", "0.3", expect=2)
    line = error_line(result)
    assert "fraction" in line and "2.5G" in line


def test_no_checkpointing_refuses_a_plan_that_needs_it(tmp_path, no_gpu):
    config = decide_precisions(make_config("fake", 50), "cuda")
    needing = next(p for p in plan_path(config, dataset_shape("fake"), "cuda", capped=True)  # as --gpu-mem plans
                   if p.activation_checkpointing)
    budget = str(needing.estimated_peak_bytes)  # a whole number is bytes
    out = one_json(invoke("--store", tmp_path, "--json", "distill", "fake", "--ipc", "50", "--dry-run",
                          "--gpu-mem", budget))
    assert out["plan"]["activation_checkpointing"] is True
    result = invoke("--store", tmp_path, "distill", "fake", "--ipc", "50", "--dry-run", "--gpu-mem", budget,
                    "--no-checkpointing", expect=4)
    assert "--no-checkpointing" in error_line(result)


def test_explicit_options_are_kept_by_the_plan(tmp_path, no_gpu):
    out = one_json(invoke("--store", tmp_path, "--json", "distill", "fake", "--ipc", "10", "--dry-run",
                          "--gpu-mem", "8G", "--class-chunk", "3", "--real-chunk", "100", "--precision", "fp32",
                          "--checkpointing", "--channels-last", "--compile"))
    plan, config = out["plan"], out["config"]
    assert (plan["class_chunk"], plan["real_chunk"], plan["precision"], plan["activation_checkpointing"]) == (
        3, 100, "fp32", True)
    assert config["channels_last"] is True and config["compile"] is True


# -- real runs ----------------------------------------------------------------------------------


def test_tiny_cpu_distill_records_the_plan_and_resume_replays_it(tmp_path):
    store = tmp_path / "store"
    out = one_json(invoke("--store", store, "--json", "distill", "fake", "--ipc", "2", "--iterations", "2", *TINY,
                          "--device", "cpu", "--gpu-mem", "2G"))
    manifest = json.loads((Path(out["path"]) / "manifest.json").read_text())
    plan, config = manifest["plan"], manifest["config"]
    assert plan["budget_bytes"] == 2 * 2**30 and plan["device"] == "cpu" and manifest["gpu_mem"] == "2G"
    # The plan is in the config the manifest holds, which is what resume rebuilds the run from.
    for field in ("real_chunk", "class_chunk", "precision"):
        assert config[field] == plan[field]
    assert config["activation_checkpointing"] == plan["activation_checkpointing"]
    peak = manifest["peak_memory"]
    assert peak["device"] == "cpu" and peak["peak_bytes"] > 0 and peak["rss_bytes"] == peak["peak_bytes"]
    assert manifest["peak_memory_bytes"] == peak["peak_bytes"] == out["peak_memory_bytes"]
    plan_obj = Plan(**{k: v for k, v in plan.items() if k != "estimate_terms"})
    shape = DatasetShape(**{k: manifest["dataset"][k] for k in ("num_classes", "channels", "image_size",
                                                                "num_train")})
    expected_flops = estimate_iteration_flops(DistillConfig.from_dict(config), shape, plan_obj)["total"]
    assert manifest["flops_per_iteration"] == expected_flops > 0
    assert out["plan"] == plan and out["flops_per_iteration"] == expected_flops

    resumed = one_json(invoke("--store", store, "--json", "resume", out["artifact"], "--iterations", "3"))
    child = json.loads((Path(resumed["path"]) / "manifest.json").read_text())
    assert resumed["artifact"] == "fake-ipc2@v2" and child["parent"] == out["artifact"]
    assert child["config"] == {**config, "iterations": 3}
    assert child["plan"] == plan and child["gpu_mem"] == "2G" and child["iterations_done"] == 3

    # A new cap below what the recorded plan needs is refused before anything runs.
    result = invoke("--store", store, "resume", resumed["artifact"], "--iterations", "4", "--gpu-mem", "1M",
                    expect=4)
    assert f"at least {mib_spec(plan['estimated_peak_bytes'])}" in error_line(result)
    assert [v.ref for v in Store(store).versions("fake-ipc2")] == ["fake-ipc2@v1", "fake-ipc2@v2"]


def test_out_of_memory_during_a_capped_run_is_exit_4_naming_the_budget(tmp_path, monkeypatch):
    real_step = Distiller.step

    def step_then_oom(self):
        if self.iteration >= 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(Distiller, "step", step_then_oom)
    store = tmp_path / "store"
    result = invoke("--store", store, "distill", "fake", "--ipc", "2", "--iterations", "3", *TINY,
                    "--device", "cpu", "--gpu-mem", "2G", "--checkpoint-every", "1", expect=4)
    line = error_line(result)
    assert "--gpu-mem 2G" in line and "checkpoint at iteration 1 kept" in line
    version = Store(store).versions("fake-ipc2")[-1]
    record = version.record()
    assert record.status == "failed" and record.checkpoint_iteration == 1
    assert record.error.startswith("BudgetInfeasibleError: CUDA ran out of memory")
    assert version.checkpoint_path.exists()


def test_progress_renderer_copes_with_losses_not_read_yet(capsys):
    with ProgressRenderer(GlobalOptions(verbose=True)) as render:
        render({"stage": "distill", "iteration": 10, "total": 10, "loss": None, "seconds": 0.01})
        render({"stage": "distill", "iteration": 10, "total": 10, "loss": 0.5, "seconds": 0.01})
    lines = capsys.readouterr().err.splitlines()
    assert "loss -," in lines[0] and "loss 0.5000," in lines[1]


# -- one path per request: the command line, the Python API and the benchmarks plan alike ----------

ROOT = Path(__file__).resolve().parent.parent
API_TINY = dict(pool_size=1, pool_epochs=0, num_freqs=16, real_per_class=4, width=8)


def _speed_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import distill_speed

    return distill_speed


@pytest.mark.parametrize("cli, options, gpu_mem", [
    ([], {}, "2G"),
    (["--no-sampler", "--class-chunk", "1"], {"sampler": False, "class_chunk": 1}, "600M"),
    (["--matching", "mmd"], {"matching": "mmd"}, None),
], ids=["psi, 2G", "gaussian, a class per pass, 600M", "mmd, free memory"])
def test_the_cli_the_api_and_the_benchmarks_get_the_same_plan_and_backend(tmp_path, monkeypatch, cli, options,
                                                                          gpu_mem):
    """The same configuration and budget give the same plan, backend settings included, whether
    it comes from ``ncfm distill --dry-run``, from ``ncfm_core.api.distill`` (the plan its run
    recorded) or from ``benchmarks/distill_speed.py`` (its workers plan through the jobs)."""
    monkeypatch.setattr("ncfm_core.planner.detect_memory", lambda device: (8 * 2**30, 16 * 2**30))
    budget_args = [] if gpu_mem is None else ["--gpu-mem", gpu_mem]
    dry = one_json(invoke("--store", tmp_path / "dry", "--json", "distill", "fake", "--ipc", "2", "--dry-run",
                          "--device", "cpu", *TINY, *cli, *budget_args))
    result = api.distill("fake", 2, store=tmp_path / "api", device="cpu", gpu_mem=gpu_mem, iterations=0,
                         **API_TINY, **options)
    config = make_config("fake", 2, **API_TINY, **options)
    planned_config, plan = _speed_benchmark(monkeypatch).planned(
        config, dataset_shape("fake"), torch.device("cpu"), MemoryBudget.resolve(gpu_mem, torch.device("cpu")))
    benchmark = json.loads(json.dumps(plan.to_dict()))
    assert dry["plan"] == result.record.to_json()["plan"] == benchmark
    assert {**dry["config"], "iterations": 0} == result.record.config == {**planned_config.to_dict(),
                                                                                "iterations": 0}
    assert dry["plan"]["backend"]["allocator_conf"] == "expandable_segments:True"
    assert dry["plan"]["backend"]["cudnn_benchmark"] is False  # the CPU: nothing to tune


def test_the_speed_benchmark_applies_the_plan_as_the_jobs_do(monkeypatch):
    """Its workers set nothing of their own: no cudnn.benchmark flag outside the plan."""
    source = (ROOT / "benchmarks" / "distill_speed.py").read_text()
    assert "backends.cudnn.benchmark =" not in source and "cap_device_memory" not in source
    assert "apply_run_settings(plan, device, budget)" in source and "make_plan(" in source
