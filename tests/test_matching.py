"""Matching losses as registered strategies (``ncfm_core.matching``): the registry, ``--matching``
on the command line, every registered loss through one step and its plan, and a loss defined in
this module, registered for one test and run end to end through the jobs (plan, distill, an
interrupted run resumed) without a library edit. To add a loss, copy ``MomentMatching`` into
``ncfm_core/matching/`` (docs/architecture.md, "How to add a matching loss")."""

from __future__ import annotations

import pytest
import torch
from cli_runner import error_line, invoke, one_json
from test_jobs import TINY, interrupt_at

from ncfm_core import cf, store
from ncfm_core.config import make_config
from ncfm_core.jobs.plan import decide_precisions
from ncfm_core.data import DatasetShape, load_dataset
from ncfm_core.distill import Distiller
from ncfm_core.errors import ConfigError
from ncfm_core.jobs import JobInterrupted, distill_job, plan_job, resume_job
from ncfm_core.matching import (
    IterationShape,
    MatchingCosts,
    MatchingLoss,
    RealSide,
    matching_class,
    matching_descriptions,
    matching_names,
    register_matching,
    registry,
)
from ncfm_core.matching.base import F32
from ncfm_core.memory_model import Plan, estimate_iteration_flops, estimate_memory, iteration_passes
from ncfm_core.pool import PoolSpec, train_pool
from ncfm_core.store import Store, load_synset, load_tensors

pytestmark = pytest.mark.usefixtures("single_thread")


class MomentMatching(MatchingLoss):
    """Per-class feature means and variances. The real side's are averaged over iterations
    (exponentially), which is state of the loss's own: a resumed run must restore it."""

    description = "per-class feature means and variances, the real ones averaged over iterations"
    decay = 0.5

    def __init__(self, config, *, feature_dim, device, cf_precision):
        super().__init__(config, feature_dim=feature_dim, device=device, cf_precision=cf_precision)
        self.average: torch.Tensor | None = None  # (C, 2d): per class, averaged [E f, E f^2]
        self._real: tuple[torch.Tensor, torch.Tensor] | None = None  # this iteration's (mean, variance)

    @torch.no_grad()
    def real_statistics(self, real: RealSide) -> None:
        sums = torch.zeros(real.num_classes, 2 * self.feature_dim, dtype=torch.float64, device=self.device)
        for start, features in real.chunks():
            first, chunk_sums = cf.class_row_sums(torch.cat([features, features.square()], dim=1), start, real.per_class)
            sums[first : first + chunk_sums.shape[0]] += chunk_sums.double()
        moments = (sums / real.per_class).float()
        self.average = moments if self.average is None else self.decay * self.average + (1 - self.decay) * moments
        mean, square = self.average.chunk(2, dim=1)
        self._real = mean, square - mean.square()

    def group_loss(self, features: torch.Tensor, classes: slice, rows_per_class: int) -> torch.Tensor:
        mean = cf.class_means(features, rows_per_class)
        variance = cf.class_means(features.square(), rows_per_class) - mean.square()
        real_mean, real_variance = self._real
        return (real_mean[classes] - mean).square().sum(-1) + (real_variance[classes] - variance).square().sum(-1)

    def state_dict(self) -> dict:
        return {} if self.average is None else {"moment_average": self.average.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if "moment_average" in state:
            self.average = state["moment_average"].to(self.device)

    @classmethod
    def costs(cls, config, shape: IterationShape) -> MatchingCosts:
        c, d = shape.num_classes, shape.feature_dim
        return MatchingCosts(
            persistent={"moment averages and accumulators": c * 2 * d * (8 + F32 + F32)},
            real_chunk_bytes=shape.real_chunk_rows * 2 * d * F32,  # the features beside their squares
            synthetic={"squared synthetic features (and grad)": shape.group_rows * d * F32 * 2},
            flops={"moments": 2 * (shape.real_rows + shape.synthetic_rows) * d},
        )


@pytest.fixture
def moments(monkeypatch):
    """MomentMatching registered as "moments" for one test, in a copy of the registry that the
    test's end throws away: no other test sees it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return register_matching("moments")(MomentMatching)


# -- the registry ------------------------------------------------------------------------------


def test_the_registry_holds_the_builtin_losses_and_refuses_bad_registrations(monkeypatch):
    assert {"ncfm", "mmd"} <= set(matching_names()) and "moments" not in matching_names()  # the toy never leaks
    for name, description in matching_descriptions():
        assert matching_class(name).name == name and description and "\n" not in description
    with pytest.raises(ConfigError, match=r"did you mean 'ncfm'\? choose one of: mmd, ncfm"):
        matching_class("nfcm")
    with pytest.raises(ConfigError, match=r"matching \(--matching\): unknown matching loss 'l2'"):
        make_config("digits", 1, matching="l2")

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ValueError, match="registered twice"):
        register_matching("ncfm")(MomentMatching)
    with pytest.raises(ValueError, match="'list'"):
        register_matching("list")(MomentMatching)

    class Silent(MomentMatching):
        description = ""

    with pytest.raises(ValueError, match="one-line description"):
        register_matching("silent")(Silent)

    class Unplanned(MatchingLoss):  # no costs: the plan would be silently wrong
        description = "forgets its memory terms"

        def real_statistics(self, real):
            pass

        def group_loss(self, features, classes, rows_per_class):
            return features.sum()

    with pytest.raises(TypeError, match="does not define costs"):
        register_matching("unplanned")(Unplanned)
    assert set(matching_names()) == {"ncfm", "mmd"}


@pytest.mark.parametrize("keep", [True, False])
def test_the_real_side_serves_a_second_pass_kept_or_recomputed(keep):
    """A first pass that announces a second one keeps its chunks (released as the second pass
    reads them) unless the plan recomputes (activation checkpointing); either way the second pass
    sees the same rows in the same order. A pass that announces none keeps nothing."""
    rows = torch.arange(30.0).reshape(10, 3)
    computed = []

    def features_of(start, end):
        computed.append((start, end))
        return rows[start:end].clone()

    bounds = [(0, 4), (4, 8), (8, 10)]
    real = RealSide(bounds, per_class=5, num_classes=2, features_of=features_of, keep=keep)
    first = [(start, f) for start, f in real.chunks(again=True)]
    second = list(real.again())
    assert [s for s, _ in first] == [s for s, _ in second] == [0, 4, 8]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, second))
    assert computed == bounds * (1 if keep else 2) and len(real._kept) == 0
    once = RealSide(bounds, per_class=5, num_classes=2, features_of=features_of, keep=True)
    list(once.chunks())
    assert len(once._kept) == 0


@pytest.fixture(scope="module")
def tiny():
    dataset = load_dataset("fake", num_classes=3, channels=1, image_size=8, train_per_class=12, test_per_class=4)
    base = make_config("fake", 2, factor=2, width=8, pool_size=1, pool_epochs=0, real_per_class=10, num_freqs=16,
                       iterations=2, seed=5)
    base = decide_precisions(base, "cpu")  # what every job's plan does before the loop
    return dataset, base, train_pool(PoolSpec.from_config(base, dataset), dataset, "cpu")


@pytest.mark.parametrize("name", matching_names())
def test_every_registered_loss_steps_checkpoints_and_plans(tiny, name, tmp_path):
    """timm-style: every registered loss gets a step with chunked real and synthetic sides, a
    checkpoint round trip, and its own terms in the plan, for free."""
    dataset, base, pool = tiny
    config = base.replace(matching=name, class_chunk=2, real_chunk=4)
    d = Distiller(config, dataset, pool, "cpu")
    before = d.images.detach().clone()
    metrics = d.step()
    assert metrics["match_loss"] > 0 and not torch.equal(d.images, before)
    store.save_state(tmp_path / "state.safetensors", d.state_dict())
    again = Distiller(config, dataset, pool, "cpu")
    again.load_state_dict(store.load_state(tmp_path / "state.safetensors"))
    d.step()
    again.step()
    assert torch.equal(d.images, again.images)

    shape = DatasetShape(3, 1, 8, 36)
    plan = Plan(4, 2, "fp32", False, None, 0, "cpu")
    costs = matching_class(name).costs(config, _shape_of(config, shape, plan))
    terms = dict(estimate_memory(config, shape, plan).terms)
    assert costs.persistent.items() <= terms.items()
    assert costs.flops.items() <= estimate_iteration_flops(config, shape, plan).items()


def _shape_of(config, shape: DatasetShape, plan: Plan) -> IterationShape:
    from ncfm_core import memory_model

    return memory_model._iteration_shape(config, shape, plan, memory_model._network_sizes(config, shape, plan.precision))


# -- a loss added inside this test, end to end ---------------------------------------------------


def test_a_loss_defined_in_a_test_plans_distills_and_resumes_through_the_jobs(moments, tmp_path, monkeypatch):
    config = make_config("digits", 1, iterations=6, seed=0, matching="moments", **TINY)

    planned = plan_job(config, gpu_mem="1G")  # a GPU budget: planned for CUDA (even here), with the time model
    assert planned["device"].startswith("cuda")
    terms = planned["plan"]["estimate_terms"]
    assert terms["moment averages and accumulators"] == 10 * 2 * 128 * 16  # 10 classes, d = 8 x 4 x 4
    assert planned["flops"]["moments"] > 0 and planned["plan"]["estimated_seconds"] > 0
    assert "real CF projections" not in planned["flops"] and "frequencies and psi" not in terms
    shape, plan = DatasetShape(10, 1, 16, 1257), Plan(40, 10, "fp32", False, None, 0, "cpu")
    synthetic = estimate_memory(config.replace(real_per_class=1), shape, plan)  # the synthetic group peaks
    assert synthetic.phase == "synthetic" and "synthetic: squared synthetic features (and grad)" in dict(synthetic.terms)
    assert set(iteration_passes(config, shape, plan)) == {"real chunks", "synthetic groups", "launch units"}

    reference = distill_job(Store(tmp_path / "reference"), config)
    initial = distill_job(Store(tmp_path / "initial"), config.replace(iterations=0))
    assert not torch.equal(load_synset(reference.synset_path).images, load_synset(initial.synset_path).images)

    run_store = Store(tmp_path / "store")
    with monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        with pytest.raises(JobInterrupted) as info:
            distill_job(run_store, config, checkpoint_every=2)
    checkpoint = store.load_state(info.value.version.checkpoint_path)
    assert checkpoint["iteration"] == 4 and checkpoint["moment_average"].shape == (10, 2 * 128)
    resumed = resume_job(run_store, info.value.version.ref)
    record = resumed.record()
    assert record.status == "complete" and record.config["matching"] == "moments"
    # the average restored from the checkpoint: the resumed run ends where the uninterrupted one did
    assert torch.equal(load_synset(resumed.synset_path).images, load_synset(reference.synset_path).images)
    assert load_tensors(resumed.sampler_path)[0] == {}


def test_the_loop_and_the_plan_refuse_a_loss_that_reuses_their_names(moments, tiny):
    dataset, base, pool = tiny

    @register_matching("greedy")
    class Greedy(MomentMatching):
        def state_dict(self):
            return {"images": torch.zeros(1)}

        @classmethod
        def costs(cls, config, shape):
            return MatchingCosts(persistent={"pool weights (init + trained)": 1}, real_chunk_bytes=0)

    d = Distiller(base.replace(matching="greedy"), dataset, pool, "cpu")
    with pytest.raises(ValueError, match=r"reuses the loop's keys \['images'\]"):
        d.state_dict()
    with pytest.raises(ValueError, match="reuses the memory model's names"):
        estimate_memory(base.replace(matching="greedy"), DatasetShape(3, 1, 8, 36), Plan(4, 2, "fp32", False, None, 0, "cpu"))


# -- the command line ----------------------------------------------------------------------------


def test_matching_list_prints_the_registry_without_a_dataset(moments):
    listed = invoke("distill", "--matching", "list").stdout
    for name, description in matching_descriptions():
        assert any(line.split(None, 1) == [name, description] for line in listed.splitlines()), listed
    assert "moments" in listed  # read at run time: a loss registered by a plugin or a test shows up
    assert invoke("distill", "digits", "--ipc", "1", "--matching", "list").stdout == listed
    document = one_json(invoke("--json", "distill", "--matching", "list"))
    assert document["default"] == "ncfm"
    assert [entry["name"] for entry in document["matching"]] == ["mmd", "moments", "ncfm"]


def test_an_unknown_matching_name_exits_2_with_the_valid_names(moments):
    result = invoke("distill", "digits", "--ipc", "1", "--matching", "moment", "--dry-run", expect=2)
    assert "did you mean 'moments'? choose one of: mmd, moments, ncfm" in error_line(result)


def test_the_help_of_matching_comes_from_the_registry():
    from ncfm_cli.distill import _matching_help

    text = _matching_help()
    for name, description in matching_descriptions():
        assert f"{name}: {description}" in text
    assert "`--matching list`" in text
