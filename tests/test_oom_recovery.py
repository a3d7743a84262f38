"""Out of memory is survived (issue 22): an iteration that runs out is rolled back, the run steps
down to the next smaller plan and the same iteration runs again from the same state.

Out-of-memory errors are injected on the CPU by patching one function of the loop to raise
``torch.OutOfMemoryError`` on its n-th call in a chosen iteration and phase: mid-way through the
real side, mid-way through the class groups (after a group's backward has written its
gradients), mid-way through psi's gradient through the real side (kept or, under
checkpointing, recomputed real features), and in the draw after the generators have moved. The
recovered run must equal, bit for bit, a run that used the smaller plan from that iteration on:
images, both optimisers, psi, the generators, the loss curve.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ncfm_core import cf, parallel
from ncfm_core import store as store_lib
from ncfm_core.config import make_config
from ncfm_core.data import DatasetShape, load_dataset
from ncfm_core.distill import Distiller, LoopHooks
from ncfm_core.errors import BudgetInfeasibleError
from ncfm_core.jobs import distill_job, resume_job
from ncfm_core.jobs import oom
from ncfm_core.jobs.plan import decide_precisions, make_plan, step_down_path
from ncfm_core.matching.ncfm import CharacteristicFunctionMatching
from ncfm_core.devices import MemoryBudget
from ncfm_core.pool import PoolSpec, load_or_train_pool, train_pool
from ncfm_core.retry import OUT_OF_MEMORY, OutOfMemory
from ncfm_core.store import Store

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 4
BIG = (20, 2, False)  # two real chunks of two classes, two class groups of two
SMALL = (10, 1, False)
SMALLEST = (5, 1, True)
BIG_CHECKPOINTED = (20, 2, True)


@pytest.fixture(scope="module")
def tiny():
    dataset = load_dataset("fake", num_classes=4, channels=1, image_size=8, train_per_class=12, test_per_class=4)
    base = make_config("fake", 2, factor=2, width=8, pool_size=2, pool_epochs=1, pool_batch=16, real_per_class=10,
                       num_freqs=32, iterations=STEPS, seed=5)
    pool = train_pool(PoolSpec.from_config(base, dataset), dataset, "cpu")
    return dataset, base, pool


def _planned(config, knobs):
    real, classes, checkpointing = knobs
    return decide_precisions(config, "cpu").replace(real_chunk=real, class_chunk=classes,
                                                    activation_checkpointing=checkpointing)


def _same_state(a: Any, b: Any, path: str = "state") -> None:
    """Every tensor of two nested states torch.equal (dtype and shape too), every other value ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


class Fault:
    """Makes the patched function raise torch.OutOfMemoryError on its ``nth`` call while the
    distiller computes iteration ``at`` in ``phase``, ``times`` times (each retry counts its calls
    afresh); the original runs first when ``after`` (the random numbers it draws are then spent)."""

    def __init__(self, at: int, phase: str, nth: int = 2, times: int = 1, after: bool = False):
        self.at, self.phase, self.nth, self.times, self.after = at, phase, nth, times, after
        self.distiller: Distiller | None = None
        self.calls, self.attempt, self.raised = 0, None, 0

    def wrap(self, original):
        def patched(*args, **kwargs):
            d = self.distiller
            if d is None or d.iteration + 1 != self.at or d.phase != self.phase or self.raised >= self.times:
                return original(*args, **kwargs)
            if self.attempt != self.raised:  # a new attempt of the iteration: count afresh
                self.attempt, self.calls = self.raised, 0
            self.calls += 1
            result = original(*args, **kwargs) if self.after else None
            if self.calls == self.nth:
                self.raised += 1
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 MiB (injected, {self.phase})")
            return result if self.after else original(*args, **kwargs)

        return patched


def _inject(monkeypatch, where: str, fault: Fault) -> None:
    """Patch the function ``where`` names with ``fault``."""
    owner, name = {
        "real chunk": (Distiller, "_real_chunk_features"),
        "class group": (Distiller, "_group_loss"),
        "psi chunk": (cf, "cf_chunk_freq_grad"),
        "frequencies": (CharacteristicFunctionMatching, "begin"),
        "optimizer step": (Distiller, "_optimizer_step"),
    }[where]
    monkeypatch.setattr(owner, name, fault.wrap(getattr(owner, name)))


def _faulty(monkeypatch, tiny, where: str, fault: Fault, knobs=BIG) -> Distiller:
    """A distiller on ``knobs`` whose function ``where`` raises as ``fault`` says."""
    dataset, base, pool = tiny
    _inject(monkeypatch, where, fault)
    fault.distiller = Distiller(_planned(base, knobs), dataset, pool, "cpu")
    return fault.distiller


def _step_down_hook(plans: list[tuple[int, int, bool]], events: list[OutOfMemory]):
    remaining = list(plans)

    def hook(distiller: Distiller, event: OutOfMemory) -> bool:
        events.append(event)
        if not remaining:
            return False
        distiller.use_plan(*remaining.pop(0))
        return True

    return hook


def _reference(config, dataset, pool, start_knobs, at, knobs_from_at) -> Distiller:
    """A run on ``start_knobs`` for ``at - 1`` iterations, then on ``knobs_from_at`` to the end."""
    d = Distiller(_planned(config, start_knobs), dataset, pool, "cpu")
    d.run(at - 1)
    d.use_plan(*knobs_from_at)
    d.run(STEPS)
    return d


CASES = [
    # (id, config overrides, starting plan, patched function, phase, call, iteration, plans stepped to)
    ("real side, mid-way", {}, BIG, "real chunk", "real side", 2, 3, [SMALL]),
    ("class groups, after a group's backward", {}, BIG, "class group", "synthetic groups", 2, 3, [SMALL]),
    ("class groups, first iteration", {}, BIG, "class group", "synthetic groups", 2, 1, [SMALL]),
    ("psi's gradient through kept real features", {}, BIG, "psi chunk", "sampler backward", 2, 2, [SMALL]),
    ("psi's gradient through recomputed real chunks", {}, BIG_CHECKPOINTED, "real chunk", "sampler backward", 2, 3,
     [SMALLEST]),
    ("the draw, after the frequencies were drawn", {}, BIG, "frequencies", "draw", 1, 2, [SMALL]),
    ("twice in one iteration", {}, BIG, "class group", "synthetic groups", 2, 2, [SMALL, SMALLEST]),
    ("gaussian frequencies, real side", {"sampler": False}, BIG, "real chunk", "real side", 2, 2, [SMALL]),
    ("mean matching, class groups", {"matching": "mmd"}, BIG, "class group", "synthetic groups", 2, 3, [SMALLEST]),
    ("fp16 with its loss scaler, class groups", {"precision": "fp16"}, BIG, "class group", "synthetic groups", 2, 1,
     [SMALL]),
]


@pytest.mark.parametrize("overrides, start, where, phase, nth, at, plans", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_recovered_run_equals_one_on_the_smaller_plan_from_that_iteration(
        tiny, monkeypatch, overrides, start, where, phase, nth, at, plans):
    dataset, base, pool = tiny
    config = base.replace(**overrides)
    reference = _reference(config, dataset, pool, start, at, plans[-1])

    fault = Fault(at, phase, nth=nth, times=len(plans), after=where == "frequencies")
    _inject(monkeypatch, where, fault)
    recovered = Distiller(_planned(config, start), dataset, pool, "cpu")
    fault.distiller = recovered
    events: list[OutOfMemory] = []
    assert recovered.run(STEPS, hooks=LoopHooks(out_of_memory=_step_down_hook(plans, events)))

    assert fault.raised == len(plans) and len(events) == len(plans)
    assert all(e.iteration == at and e.phase == phase and e.recoverable and "injected" in e.message for e in events)
    _same_state(recovered.state_dict(), reference.state_dict())
    assert recovered.loss_curve == reference.loss_curve and recovered.iteration == STEPS
    assert (recovered.real_chunk, recovered.class_chunk, recovered.checkpointing) == plans[-1]
    assert (recovered.config.real_chunk, recovered.config.class_chunk,
            recovered.config.activation_checkpointing) == plans[-1]
    assert not recovered.mid_step


def test_a_retried_iteration_draws_the_same_numbers(tiny, monkeypatch):
    """Without the rollback of the generators the retry would draw new images and frequencies:
    the run then differs from the reference (this is what the rollback is for)."""
    dataset, base, pool = tiny
    skipped = _faulty(monkeypatch, tiny, "class group", Fault(2, "synthetic groups", nth=1))
    monkeypatch.setattr("ncfm_core.retry._generators", lambda distiller: [])  # noted and restored: none
    skipped.run(STEPS, hooks=LoopHooks(out_of_memory=_step_down_hook([SMALL], [])))
    reference = _reference(base, dataset, pool, BIG, 2, SMALL)
    assert not torch.equal(skipped.images, reference.images)


def test_no_smaller_plan_raises_with_the_state_back_where_the_iteration_started(tiny, monkeypatch):
    dataset, base, pool = tiny
    d = _faulty(monkeypatch, tiny, "real chunk", Fault(3, "real side", nth=1, times=99))
    events: list[OutOfMemory] = []
    with pytest.raises(OUT_OF_MEMORY) as caught:
        d.run(STEPS, hooks=LoopHooks(out_of_memory=_step_down_hook([SMALL], events)))
    assert caught.value.out_of_memory == events[-1] and len(events) == 2  # stepped down once, then gave up
    assert d.iteration == 2 and not d.mid_step and d.phase == "between iterations"
    straight = Distiller(_planned(base, BIG), dataset, pool, "cpu")
    straight.run(2)
    _same_state(d.state_dict(), straight.state_dict())  # a consistent state: the job checkpoints it


def test_out_of_memory_in_the_optimizer_step_is_not_retried(tiny, monkeypatch):
    """AdamW updates its moments in place before it allocates: that state cannot be rolled
    back, and no smaller plan changes the memory of that phase; the loop stops mid-step."""
    d = _faulty(monkeypatch, tiny, "optimizer step", Fault(2, "optimizer step", nth=1))
    events: list[OutOfMemory] = []
    with pytest.raises(OUT_OF_MEMORY) as caught:
        d.run(STEPS, hooks=LoopHooks(out_of_memory=_step_down_hook([SMALL], events)))
    assert events == [] and caught.value.out_of_memory.phase == "optimizer step"
    assert not caught.value.out_of_memory.recoverable and d.mid_step


def test_without_a_hook_an_out_of_memory_error_ends_the_loop_as_before(tiny, monkeypatch):
    d = _faulty(monkeypatch, tiny, "class group", Fault(2, "synthetic groups", nth=1))
    with pytest.raises(OUT_OF_MEMORY):
        d.run(STEPS)
    assert d.mid_step and d.iteration == 1


# -- the job: the policy, the record, the resume ------------------------------------------------


def _watch_the_jobs_distiller(monkeypatch, fault: Fault) -> None:
    """``fault`` watches the distiller the job builds."""
    build = Distiller.__init__

    def remember(self, *args, **kwargs):
        build(self, *args, **kwargs)
        fault.distiller = self

    monkeypatch.setattr(Distiller, "__init__", remember)


def _job(tmp_path, dataset, base, **kwargs):
    events: list[dict] = []
    store = Store(tmp_path / "store")
    version = distill_job(store, base, device="cpu", dataset=dataset, callback=events.append, **kwargs)
    return store, version, events


def _job_plans(dataset, base):
    shape = DatasetShape.of(dataset)
    plan, record = make_plan(base, shape, "cpu", MemoryBudget())
    return plan, step_down_path(base, shape, "cpu", plan, record["plan_asked"])


def _job_reference(store, dataset, base, at, knobs, until=STEPS):
    """The loop on the job's plan for ``at - 1`` iterations, then on ``knobs``, with the job's pool."""
    plan, _ = _job_plans(dataset, base)
    config = plan.apply(decide_precisions(base, "cpu"))
    spec = PoolSpec.from_config(config, dataset)
    pool, cached = load_or_train_pool(spec, dataset, "cpu", cache_dir=store.pool_dir(spec.key()))
    assert cached
    d = Distiller(config, dataset, pool, "cpu")
    d.run(at - 1)
    d.use_plan(*knobs)
    d.run(until)
    return d


def test_the_job_steps_down_logs_records_and_a_resume_replays_the_smaller_plan(tiny, tmp_path, monkeypatch):
    dataset, base, _ = tiny
    first, smaller = _job_plans(dataset, base)
    assert smaller and smaller[0].estimated_peak_bytes < first.estimated_peak_bytes
    fault = Fault(2, "synthetic groups", nth=1)
    _watch_the_jobs_distiller(monkeypatch, fault)
    _inject(monkeypatch, "class group", fault)
    store, version, events = _job(tmp_path, dataset, base)

    manifest = version.record().to_json()
    assert manifest["status"] == "complete" and fault.raised == 1
    (change,) = manifest["plan_changes"]
    knobs = dict(zip(("real_chunk", "class_chunk", "activation_checkpointing"), smaller[0].knobs))
    assert (change["iteration"], change["phase"], change["after"]) == (2, "synthetic groups", knobs)
    assert change["before"] == dict(zip(knobs, first.knobs)) and "injected" in change["error"]
    assert {k: manifest["config"][k] for k in knobs} == knobs  # what a resume replays
    assert {k: manifest["plan"][k] for k in knobs} == knobs and "stepped down" in manifest["plan"]["chosen_because"]
    warnings = [e["message"] for e in events if e.get("stage") == "log" and e.get("level") == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith("out of memory at iteration 2 (synthetic groups)")
    fit = manifest["memory_fit"]
    assert fit["estimated_reserved_bytes"] == smaller[0].estimated_peak_bytes and fit["knobs"] == knobs
    assert fit["estimated_allocated_bytes"] == smaller[0].estimated_allocated_bytes > 0

    reference = _job_reference(store, dataset, base, 2, smaller[0].knobs)
    assert torch.equal(store_lib.load_synset(version.synset_path).images, reference.images.detach())

    fault.times = 0  # the resumed run runs out of nothing
    monkeypatch.setattr("ncfm_core.jobs.resume.load_job_dataset", lambda config, data_dir=None: dataset)  # in memory
    child = resume_job(store, version.ref, iterations=STEPS + 2, device="cpu")
    assert child.record().to_json()["plan_changes"] == manifest["plan_changes"]
    continued = _job_reference(store, dataset, base, 2, smaller[0].knobs, until=STEPS + 2)
    assert torch.equal(store_lib.load_synset(child.synset_path).images, continued.images.detach())


def test_when_the_smallest_plan_does_not_fit_the_job_stops_with_exit_4(tiny, tmp_path, monkeypatch):
    dataset, base, _ = tiny
    _, smaller = _job_plans(dataset, base)
    fault = Fault(3, "synthetic groups", nth=1, times=99)
    _watch_the_jobs_distiller(monkeypatch, fault)
    _inject(monkeypatch, "class group", fault)
    with pytest.raises(BudgetInfeasibleError) as caught:
        _job(tmp_path, dataset, base, checkpoint_every=100)
    message = str(caught.value)
    assert caught.value.exit_code == 4 and "\n" not in message
    assert "at iteration 3 (synthetic groups)" in message and "checkpoint at iteration 2 kept" in message
    assert "free memory" in message  # planned for the free memory: no --gpu-mem to name
    version = Store(tmp_path / "store").versions("fake-ipc2")[-1]
    manifest = version.record().to_json()
    assert manifest["status"] == "failed" and len(manifest["plan_changes"]) == len(smaller)
    assert manifest["checkpoint_iteration"] == 2 and version.checkpoint_path.exists()


def test_a_budget_names_the_smallest_budget_that_would_have_worked(tmp_path):
    event = OutOfMemory(5, "real side", "CUDA out of memory. Tried to allocate 500.00 MiB. GPU 0 ...", True,
                        reserved_bytes=2 * 2**30)
    error = oom.out_of_memory_error("x@v1", 4, None, MemoryBudget(int(2.5 * 2**30), "2.5G"), event)
    assert "--gpu-mem 2.5G" in str(error) and "it needs at least 2561M" in str(error)  # more than the budget itself
    event = OutOfMemory(5, "real side", "CUDA out of memory. Tried to allocate 800.00 MiB.", True,
                        reserved_bytes=2 * 2**30)
    error = oom.out_of_memory_error("x@v1", 4, None, MemoryBudget(int(2.5 * 2**30), "2.5G"), event)
    assert "it needs at least 2848M" in str(error) and "ncfm resume x@v1 --gpu-mem 2848M" in str(error)
    assert "checkpoint at iteration 4 kept" in str(error) and error.exit_code == 4


def test_out_of_memory_in_the_optimizer_step_stops_the_job_without_saving_half_a_step(tiny, tmp_path, monkeypatch):
    dataset, base, _ = tiny
    fault = Fault(2, "optimizer step", nth=1)
    _watch_the_jobs_distiller(monkeypatch, fault)
    _inject(monkeypatch, "optimizer step", fault)
    with pytest.raises(BudgetInfeasibleError, match="optimizer step") as caught:
        _job(tmp_path, dataset, base, checkpoint_every=100)
    assert "no checkpoint yet" in str(caught.value)
    version = Store(tmp_path / "store").versions("fake-ipc2")[-1]
    assert version.record().plan_changes == () and not version.checkpoint_path.exists()


def test_under_torchrun_a_rank_does_not_step_down_alone(monkeypatch):
    """Several processes: the others wait for this one in a collective, so there is no policy
    (the error ends the run) and the message says why."""
    monkeypatch.setattr(parallel, "current", lambda: type("Ctx", (), {"world_size": 2})())
    assert oom.step_down_hook(None, None, [object()], lambda e: None, lambda plan: None) is None
    event = OutOfMemory(3, "synthetic groups", "CUDA out of memory.", True)
    message = str(oom.out_of_memory_error("x@v1", None, None, MemoryBudget(), event))
    assert "torchrun" in message and "at iteration 3 (synthetic groups)" in message


def test_step_down_keeps_what_the_user_fixed_and_no_checkpointing(tiny):
    dataset, base, _ = tiny
    shape = DatasetShape.of(dataset)
    fixed = base.replace(real_chunk=10)
    plan, record = make_plan(fixed, shape, "cpu", MemoryBudget())
    path = step_down_path(fixed, shape, "cpu", plan, record["plan_asked"])
    assert path and all(p.real_chunk == 10 for p in path) and path[-1].activation_checkpointing
    plan, record = make_plan(base, shape, "cpu", MemoryBudget(), allow_checkpointing=False)
    path = step_down_path(base, shape, "cpu", plan, record["plan_asked"])
    assert path and not any(p.activation_checkpointing for p in path)
    estimates = [plan.estimated_peak_bytes, *(p.estimated_peak_bytes for p in path)]
    assert estimates == sorted(estimates, reverse=True) and len(set(estimates)) == len(estimates)
