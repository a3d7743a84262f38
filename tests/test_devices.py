"""Device resolution and the precision decision, on this machine and on a simulated CUDA
machine (``tests/simulated_cuda.py``).

The simulation keeps the contract of the CUDA API where it matters to us: like
``torch.cuda.set_per_process_memory_fraction``, the capping call refuses a device without an
index. ncfm once handed it ``torch.device("cuda")`` and the headline command
(``ncfm distill cifar100 --ipc 50 --gpu-mem 2.5G``) failed on every CUDA machine while every
CPU test passed; these tests drive the real job path on the simulated machine so that a
device without an index fails the suite anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import simulated_cuda as simulation
import torch
from cli_runner import invoke, one_json

from ncfm_core import jobs, parallel, runtime
from ncfm_core.config import make_config
from ncfm_core.devices import (
    JobDevice,
    cap_device_memory,
    planning_device,
    resolve_device,
)
from ncfm_core.errors import ConfigError
from ncfm_core.jobs import distill as distill_module
from ncfm_core.store import Store

pytestmark = pytest.mark.cuda  # the GPU check runs these too, next to the real CUDA tests

GiB = simulation.GiB


@pytest.fixture
def simulated_cuda(monkeypatch) -> simulation.SimulatedCuda:
    """A machine with two 80 GiB CUDA devices (bf16-capable unless ``simulated_cuda.bf16`` is
    set False), as far as ncfm's resolution, planning and capping can tell; no kernel ever runs
    on it."""
    return simulation.install(monkeypatch.setattr, count=2)


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# -- resolve_device ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "local_rank", "expected"),
    [
        ("auto", None, "cuda:0"),
        ("cuda", None, "cuda:0"),
        ("CUDA:1", None, "cuda:1"),
        ("cuda", 1, "cuda:1"),  # torchrun: LOCAL_RANK picks the GPU
        ("auto", 1, "cuda:1"),
        ("cpu", None, "cpu"),
        (torch.device("cuda"), None, "cuda:0"),
    ],
)
def test_cuda_devices_always_carry_an_index(simulated_cuda, requested, local_rank, expected):
    device, reason = resolve_device(requested, local_rank=local_rank)
    assert str(device) == expected and reason
    if device.type == "cuda":
        assert device.index is not None


def test_cuda_means_the_current_device(simulated_cuda):
    simulated_cuda.current = 1
    assert resolve_device("cuda")[0] == torch.device("cuda", 1)


def test_auto_says_why_and_torchrun_overrides_an_explicit_index(simulated_cuda):
    assert resolve_device("auto")[1] == "auto: CUDA available (Simulated GPU)"
    device, reason = resolve_device("cuda:0", local_rank=1)
    assert device == torch.device("cuda", 1) and "LOCAL_RANK 1" in reason


@pytest.mark.parametrize("requested", ["cuda:2", "cuda:7"])
def test_a_cuda_index_beyond_the_machine_is_a_config_error(simulated_cuda, requested):
    with pytest.raises(ConfigError, match=r"torch sees 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device(requested)


@pytest.mark.parametrize("requested", ["gpu", "cuda:x", "auto:0", "cuda:-1", ""])
def test_unknown_devices_name_the_choices(requested):
    with pytest.raises(ConfigError, match="choose one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device(requested)


def test_without_an_accelerator_auto_is_the_cpu_and_cuda_is_refused(no_accelerator):
    assert resolve_device("auto") == (torch.device("cpu"), "auto: no CUDA or MPS device found")
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        resolve_device("cuda:0")


def test_auto_prefers_where_a_run_started_when_this_machine_has_it(simulated_cuda):
    assert resolve_device("auto", prefer="cpu") == (torch.device("cpu"), "auto: cpu, where this run started")
    assert resolve_device("auto", prefer="cuda:1")[0] == torch.device("cuda", 0)  # the type, not the index
    assert resolve_device("cpu", prefer="cuda:0")[0] == torch.device("cpu")  # an explicit choice wins


def test_a_preferred_device_this_machine_lacks_falls_back_to_auto(no_accelerator):
    assert resolve_device("auto", prefer="cuda:0") == (torch.device("cpu"), "auto: no CUDA or MPS device found")


def test_planning_without_a_gpu_plans_for_an_indexed_cuda_device(no_accelerator):
    assert planning_device("auto", "2.5G")[0] == torch.device("cuda", 0)
    assert planning_device("cuda:1", None)[0] == torch.device("cuda", 1)
    assert planning_device("auto", None)[0] == torch.device("cpu")


def test_job_device_is_resolved_once_at_the_job_boundary(simulated_cuda):
    device = JobDevice.resolve("cuda")
    assert device.device == torch.device("cuda", 0) and str(device) == "cuda:0"

    @parallel.ranked_job
    def job(store, device="auto"):
        return device

    assert job(None, "cuda:1").device == torch.device("cuda", 1)
    # A device resolved before the boundary would miss LOCAL_RANK under torchrun: refused.
    with pytest.raises(TypeError, match="takes the device as asked"):
        job(None, device)


# -- the simulated CUDA API itself -------------------------------------------------------------


def test_the_simulated_cap_refuses_a_device_without_an_index_as_torch_does(simulated_cuda):
    with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
        cap_device_memory(torch.device("cuda"), 2 * GiB)
    assert cap_device_memory(torch.device("cuda", 1), 2 * GiB) == pytest.approx(2 / 80)
    assert simulated_cuda.caps == [(2 / 80, 1)]


# -- the real job path on the simulated machine ------------------------------------------------


class _StopBeforeTheLoop(Exception):
    """Raised where the distillation loop would start: everything before it really ran."""


@pytest.fixture
def stop_before_the_loop(monkeypatch):
    reached = {}

    def stop(store, version, config, dataset, spec, device, **kwargs):
        reached.update(device=device, version=version, config=config)
        raise _StopBeforeTheLoop

    # distill_job calls the run through its own module's name for it
    monkeypatch.setattr(distill_module, "distill_into", stop)
    return reached


@pytest.mark.parametrize("requested", ["auto", "cuda", "cuda:1"])
def test_distill_job_under_a_gpu_budget_caps_an_indexed_device_and_records_it(
    tmp_path, simulated_cuda, stop_before_the_loop, requested
):
    store = Store(tmp_path / "store")
    config = make_config("fake", 1, iterations=2, pool_size=1, pool_epochs=0)
    with pytest.raises(_StopBeforeTheLoop):
        jobs.distill_job(store, config, device=requested, gpu_mem="2.5G")
    expected = 1 if requested == "cuda:1" else 0
    assert simulated_cuda.caps == [(pytest.approx(2.5 / 80), expected)]
    assert stop_before_the_loop["device"] == torch.device("cuda", expected)
    record = stop_before_the_loop["version"].record()
    assert record.device == f"cuda:{expected}" and record.device_reason
    assert record.plan.device == f"cuda:{expected}"


def test_distill_job_without_a_budget_does_not_cap(tmp_path, simulated_cuda, stop_before_the_loop):
    store = Store(tmp_path / "store")
    with pytest.raises(_StopBeforeTheLoop):
        jobs.distill_job(store, make_config("fake", 1, iterations=2, pool_size=1, pool_epochs=0))
    assert simulated_cuda.caps == [] and stop_before_the_loop["device"] == torch.device("cuda", 0)


def test_under_torchrun_each_rank_joins_the_group_on_its_own_gpu(simulated_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    joined = []

    def init_from_env(device):
        joined.append(device)
        raise _StopBeforeTheLoop

    monkeypatch.setattr(parallel.protocol, "init_from_env", init_from_env)  # what ranked_job calls

    @parallel.ranked_job
    def job(store, ref, device="auto"):
        raise AssertionError("a follower never runs the job itself")

    with pytest.raises(_StopBeforeTheLoop):
        job(None, "ref", "cuda")  # positional, as ncfm eval passes it
    assert joined == [torch.device("cuda", 1)]


def test_a_job_gets_its_device_resolved_however_it_is_passed(simulated_cuda):
    seen = []

    @parallel.ranked_job
    def job(store, ref, config, device="auto", callback=None, *, data_dir=None):
        seen.append(device)

    job(None, "ref", "config", "cuda:1")
    job(None, "ref", "config", device="cpu")
    job(None, "ref", "config", data_dir="d")
    assert [(d.device, type(d)) for d in seen] == [
        (torch.device("cuda", 1), JobDevice), (torch.device("cpu"), JobDevice), (torch.device("cuda", 0), JobDevice)
    ]


def test_cli_dry_run_under_a_gpu_budget_plans_for_cuda_0(tmp_path, simulated_cuda):
    out = one_json(invoke("--store", tmp_path / "store", "distill", "cifar100", "--ipc", "50",
                          "--gpu-mem", "2.5G", "--dry-run", "--json"))
    assert out["device"] == "cuda:0" and out["device_reason"] == "auto: CUDA available (Simulated GPU)"
    assert out["plan"]["budget_bytes"] == int(2.5 * GiB)
    assert out["plan"]["estimated_peak_bytes"] <= out["plan"]["budget_bytes"]


# -- precision: decided once, in the plan ----------------------------------------------------


@pytest.mark.parametrize(("bf16", "world_size", "expected"), [
    (True, 1, "bf16"), (True, 4, "bf16"),
    (False, 1, "fp16"),  # one process: fp16 with its loss scaler
    (False, 2, "fp32"),  # several: per-rank loss scalers would disagree, so never fp16
])
def test_auto_precision_never_picks_fp16_for_several_processes(simulated_cuda, bf16, world_size, expected):
    from ncfm_core.devices import resolve_precision

    simulated_cuda.bf16 = bf16
    assert resolve_precision("auto", "cuda:0", world_size) == expected
    assert resolve_precision("fp16", "cuda:0", world_size) == "fp16"  # what the user asked stays theirs


def test_a_torchrun_job_on_a_gpu_without_bf16_plans_fp32_not_an_fp16_it_then_refuses(simulated_cuda,
                                                                                    monkeypatch):
    from ncfm_core.data import dataset_shape
    from ncfm_core.devices import MemoryBudget
    from ncfm_core.jobs import make_plan

    simulated_cuda.bf16 = False
    config = make_config("cifar10", 10)
    device = torch.device("cuda", 0)
    budget = MemoryBudget.resolve("20G", device)
    one, _ = make_plan(config, dataset_shape("cifar10"), device, budget)
    assert one.precision == "fp16"
    monkeypatch.setattr(parallel.context, "_context", parallel.DistContext(rank=0, world_size=2))
    several, record = make_plan(config, dataset_shape("cifar10"), device, budget)
    assert several.precision == "fp32" and record["plan"]["precision"] == "fp32"
    assert several.apply(config).precision == "fp32"  # what the ranks' ShardedDistiller then accepts


@pytest.mark.parametrize(("bf16", "world_size", "expected"), [
    (True, 1, "bf16"), (True, 2, "bf16"), (False, 1, "fp16"), (False, 2, "fp32"),
])
def test_the_distill_job_decides_both_precisions_in_its_plan_and_hands_the_values_down(
    tmp_path, simulated_cuda, stop_before_the_loop, monkeypatch, bf16, world_size, expected
):
    """The real job path on a simulated GPU (bf16-capable or not) in a world of 1 or 2: the plan
    decides "auto" once, for the machine and the world size; the loop, the manifest's config and
    its plan all get the decided values, never "auto"."""
    simulated_cuda.bf16 = bf16
    if world_size > 1:  # rank 0's view under torchrun, which the plan asks for the world size
        monkeypatch.setattr(parallel.context, "_context", parallel.DistContext(rank=0, world_size=world_size))
    config = make_config("fake", 1, iterations=2, pool_size=1, pool_epochs=0)
    assert (config.precision, config.cf_precision) == ("auto", "auto")
    with pytest.raises(_StopBeforeTheLoop):
        jobs.distill_job(Store(tmp_path / "store"), config, gpu_mem="2.5G")
    handed_down = stop_before_the_loop["config"]
    assert (handed_down.precision, handed_down.cf_precision) == (expected, "tf32")
    record = stop_before_the_loop["version"].record()
    assert (record.config["precision"], record.config["cf_precision"]) == (expected, "tf32")
    assert (record.plan.precision, record.plan.cf_precision) == (expected, "tf32")
    dry_run = jobs.plan_job(config, gpu_mem="2.5G")  # --dry-run shows the same decision
    assert (dry_run["config"]["precision"], dry_run["plan"]["precision"]) == (expected, expected)


def test_explicit_precisions_are_kept_and_cpu_projections_are_fp32(simulated_cuda):
    from ncfm_core.jobs.plan import decide_precisions

    simulated_cuda.bf16 = False
    asked = make_config("fake", 1, precision="bf16", cf_precision="fp32")
    decided = decide_precisions(asked, "cuda:0", world_size=2)
    assert (decided.precision, decided.cf_precision) == ("bf16", "fp32")  # the user's choice stays theirs
    on_cpu = decide_precisions(make_config("fake", 1, cf_precision="tf32"), "cpu", world_size=2)
    assert (on_cpu.precision, on_cpu.cf_precision) == ("fp32", "fp32")  # no autocast, no TF32 off CUDA


# -- the allocator's configuration and the backend settings (ncfm_core.runtime) -----------------


@pytest.fixture
def fresh_allocator(monkeypatch):
    """A process ncfm has not configured yet, with torch's contract simulated: the allocator
    reads its variable once, the first time its configuration is read (CUDA's initialisation
    does), and a runtime setter changes it later. ``state.calls``: what the setter was given."""
    for name in (*runtime.ALLOC_CONF_VARIABLES, runtime.CHOSEN_MARK, runtime.CUDNN_BENCHMARK_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_configured", None)
    state = SimpleNamespace(initialised=False, parsed=None, calls=[], setter=True)

    def read_once():
        if state.parsed is None:
            state.parsed = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or ""
        return state.parsed

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: state.initialised)
    monkeypatch.setattr(runtime, "_settings_in_force", read_once)
    monkeypatch.setattr(runtime, "_runtime_setter", lambda: state.calls.append if state.setter else None)
    return state


def test_the_allocator_gets_expandable_segments_before_cuda_starts(fresh_allocator):
    record = runtime.configure_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == runtime.NCFM_ALLOC_CONF == "expandable_segments:True"
    assert fresh_allocator.parsed == runtime.NCFM_ALLOC_CONF and fresh_allocator.calls == []  # read from the variable
    assert (record.conf, record.chosen_by) == (runtime.NCFM_ALLOC_CONF, "ncfm")
    assert record.applied == "in the environment, before CUDA was initialised"
    assert runtime.configure_allocator() is record  # once per process: every entry point may call it


@pytest.mark.parametrize("variable", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_the_users_allocator_configuration_is_left_alone(fresh_allocator, monkeypatch, variable):
    monkeypatch.setenv(variable, "max_split_size_mb:128")
    record = runtime.configure_allocator()
    assert os.environ[variable] == "max_split_size_mb:128" and fresh_allocator.calls == []
    assert (record.conf, record.chosen_by) == ("max_split_size_mb:128", f"the user ({variable})")
    assert runtime.CHOSEN_MARK not in os.environ


@pytest.mark.parametrize("how", ["cuda initialised", "configuration read"])
def test_too_late_for_the_variable_the_runtime_setter_applies_it_and_the_record_says_so(fresh_allocator, how):
    if how == "cuda initialised":
        fresh_allocator.initialised = True
    else:
        fresh_allocator.parsed = ""  # something read torch's allocator configuration before us
    record = runtime.configure_allocator()
    assert fresh_allocator.calls == [runtime.NCFM_ALLOC_CONF]
    assert record.chosen_by == "ncfm" and record.applied.startswith("by torch's runtime setter")
    assert ("already initialised" in record.applied) == (how == "cuda initialised")


def test_too_late_without_a_runtime_setter_the_record_says_it_was_not_applied(fresh_allocator, monkeypatch):
    fresh_allocator.initialised, fresh_allocator.setter = True, False
    assert runtime.configure_allocator().applied.startswith("not applied")

    def refuse(conf):
        raise RuntimeError("expandable_segments not supported on this platform")

    monkeypatch.setattr(runtime, "_configured", None)
    monkeypatch.setattr(runtime, "_runtime_setter", lambda: refuse)  # the run goes on without it
    assert "refused it (expandable_segments not supported" in runtime.configure_allocator().applied


def test_a_child_process_knows_the_setting_was_ncfms(fresh_allocator, monkeypatch):
    """torchrun's ranks and the benchmarks' workers inherit the variable with ncfm's mark."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", runtime.NCFM_ALLOC_CONF)
    monkeypatch.setenv(runtime.CHOSEN_MARK, "1")
    record = runtime.configure_allocator()
    assert record.chosen_by == "ncfm" and "inherited" in record.applied


def test_the_real_torch_reads_the_setting_when_set_before_it_reads_its_configuration(tmp_path):
    """Not simulated: this torch, in a fresh process that imported it first, as the command line does."""
    script = ("import torch, ncfm_core.runtime as r; record = r.configure_allocator(); "
              "get = getattr(torch._C, '_accelerator_getAllocatorSettings', None); "
              "print(record.chosen_by, record.applied.split(',')[0], get() if get else 'expandable_segments:True')")
    env = {k: v for k, v in os.environ.items() if k not in (*runtime.ALLOC_CONF_VARIABLES, runtime.CHOSEN_MARK)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ncfm", "in", "the", "environment", "expandable_segments:True"]


def test_the_plan_records_the_backend_settings_and_who_chose_them(fresh_allocator, simulated_cuda, monkeypatch):
    from ncfm_core.data import dataset_shape
    from ncfm_core.devices import MemoryBudget
    from ncfm_core.jobs import make_plan

    runtime.configure_allocator()
    device = torch.device("cuda", 0)
    budget = MemoryBudget.resolve("2.5G", device)
    plan, record = make_plan(make_config("cifar100", 50), dataset_shape("cifar100"), device, budget)
    backend = record["plan"]["backend"]
    assert (backend["allocator_conf"], backend["allocator_chosen_by"]) == (runtime.NCFM_ALLOC_CONF, "ncfm")
    assert backend["cudnn_benchmark"] is runtime.CUDNN_BENCHMARK_DEFAULT is False
    assert backend["cudnn_benchmark_chosen_by"].startswith("ncfm's default (off")
    assert backend["cudnn_benchmark_limit"] == 10
    monkeypatch.setenv(runtime.CUDNN_BENCHMARK_ENV, "1")  # what the GPU check flips
    flipped, record = make_plan(make_config("cifar100", 50), dataset_shape("cifar100"), device, budget)
    assert flipped.backend.cudnn_benchmark and record["plan"]["backend"]["cudnn_benchmark_chosen_by"] == (
        "NCFM_CUDNN_BENCHMARK=1")
    cpu, _ = make_plan(make_config("cifar100", 50), dataset_shape("cifar100"), torch.device("cpu"), budget)
    assert not cpu.backend.cudnn_benchmark  # no cuDNN to tune on a CPU, whatever was asked


def test_the_job_boundary_applies_the_plans_cudnn_setting(tmp_path, simulated_cuda, stop_before_the_loop,
                                                          monkeypatch):
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit)
    try:
        torch.backends.cudnn.benchmark = True  # as benchmarks/distill_speed.py used to leave it
        with pytest.raises(_StopBeforeTheLoop):
            jobs.distill_job(Store(tmp_path / "store"), make_config("fake", 1, iterations=2, pool_size=1,
                                                                    pool_epochs=0), gpu_mem="2.5G")
        assert torch.backends.cudnn.benchmark is False  # the plan's, applied by apply_run_settings
        manifest = stop_before_the_loop["version"].record().to_json()
        assert manifest["plan"]["backend"]["cudnn_benchmark"] is False
        monkeypatch.setenv(runtime.CUDNN_BENCHMARK_ENV, "on")
        with pytest.raises(_StopBeforeTheLoop):
            jobs.distill_job(Store(tmp_path / "other"), make_config("fake", 1, iterations=2, pool_size=1,
                                                                    pool_epochs=0), gpu_mem="2.5G")
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit = before


@pytest.mark.parametrize("gpu_mem", ["2.5G", None])
def test_on_cuda_the_cli_and_the_speed_benchmark_plan_alike(tmp_path, simulated_cuda, monkeypatch, gpu_mem):
    """The dry run and benchmarks/distill_speed.py's planning, for the same configuration and
    budget on a (simulated) GPU: the same plan and backend settings."""
    from ncfm_core.data import dataset_shape
    from ncfm_core.devices import MemoryBudget

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import distill_speed

    args = ["--store", tmp_path / "store", "--json", "distill", "cifar100", "--ipc", "50", "--dry-run",
            "--device", "cuda", "--freqs", "4096", "--real-per-class", "500"]
    dry = one_json(invoke(*args, *([] if gpu_mem is None else ["--gpu-mem", gpu_mem])))
    device = torch.device("cuda", 0)
    config = make_config("cifar100", 50, num_freqs=4096, real_per_class=500)
    planned, plan = distill_speed.planned(config, dataset_shape("cifar100"), device,
                                          MemoryBudget.resolve(gpu_mem, device))
    assert dry["plan"] == json.loads(json.dumps(plan.to_dict()))
    assert dry["config"] == planned.to_dict()
