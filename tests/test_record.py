"""A run's record (``ncfm_core.store.record``): every manifest earlier ncfm wrote still reads (the
files in tests/fixtures/manifests were written by those versions: 5feb1f8, the first with
evaluations, and aa11a6b, the main before the record was typed), nothing in a file is lost when
it is rewritten, every field round-trips, and anything malformed is one line naming the field and
the file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ncfm_core.errors import CorruptArtifactError
from ncfm_core.store import (
    SCHEMA_VERSION,
    STATUSES,
    Accuracy,
    BackendRecord,
    BaselineRecord,
    DatasetRecord,
    EvalRecord,
    EvalRequest,
    MemoryFit,
    Normalization,
    PeakMemoryRecord,
    PlanAsked,
    PlanChange,
    PlanKnobs,
    PlanRecord,
    PoolRecord,
    ProcessRecord,
    RunRecord,
    SamplerRecord,
    SessionTiming,
    Store,
    SynsetRecord,
    Timings,
    read_record,
    write_record,
)
from ncfm_core.store.record import MAX_RECORD_BYTES, PEAK_MEMORY_SOURCES, describe_peak_source, migrate

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"
OLD_MANIFESTS = sorted(FIXTURES.glob("*.json"))


def test_the_fixtures_are_there():
    assert {path.name for path in OLD_MANIFESTS} == {
        "schema1-5feb1f8-complete-with-eval.json",
        "schema1-aa11a6b-interrupted.json",
        "schema1-aa11a6b-resumed-two-models-baselines.json",
    }


# ----------------------------------------------------------------------------- older files


def test_the_first_release_with_evaluations_reads():
    record = read_record(FIXTURES / "schema1-5feb1f8-complete-with-eval.json")
    assert (record.name, record.version, record.status) == ("digits-ipc1", 1, "complete")
    assert record.plan is None and record.sha256 == {} and record.world_size is None  # not recorded then
    assert record.dataset.normalization is None and record.dataset.num_classes == 10
    assert record.timings == Timings(seconds=record.timings.seconds, pool_seconds=record.timings.pool_seconds,
                                     sessions=1, seconds_per_iteration_median=record.timings.seconds_per_iteration_median)
    (evaluation,) = record.evals
    assert evaluation.accuracy.runs == (evaluation.accuracy.mean,) and evaluation.protocol["epochs"] == 1
    assert record.last_accuracy == evaluation.accuracy.mean


def test_an_interrupted_run_of_the_previous_main_reads_as_interrupted():
    path = FIXTURES / "schema1-aa11a6b-interrupted.json"
    raw = json.loads(path.read_text())
    assert (raw["status"], raw["interrupted"], "schema_version" in raw) == ("failed", True, False)  # as written
    record = read_record(path)
    assert record.status == "interrupted" and record.interrupted
    assert (record.error, record.checkpoint_iteration, record.iterations_done) == ("interrupted (Ctrl-C)", 5, 5)
    assert record.plan.real_chunk > 0 and record.gpu_mem is None and record.flops_per_iteration > 0
    assert record.dataset.normalization.mean and record.synset is None


def test_the_previous_mains_evaluation_with_baselines_and_two_models_reads():
    record = read_record(FIXTURES / "schema1-aa11a6b-resumed-two-models-baselines.json")
    assert record.status == "complete" and record.timings.sessions == 2 and record.timings.per_session == ()
    (evaluation,) = record.evals
    assert set(evaluation.baselines) == {"random", "full"}
    assert isinstance(evaluation.baselines["full"], BaselineRecord)
    assert evaluation.baselines["full"].extra["cached"] is False  # how it was made is kept as it was
    assert set(evaluation.extra["models"]) == {"convnet", "convnet_bn"}
    assert set(evaluation.metrics) == {"ior", "hlr", "lrs"} and evaluation.world_size == 1
    assert record.peak_memory.source and record.peak_memory_source == "process_peak_rss"


def _default_like(value) -> bool:
    return value is None or value in ([], {}, "", 0)


def _assert_kept(written, read, where="manifest"):
    """Everything ``read`` holds is in ``written`` with the same value; what ``written`` adds is
    only empty defaults."""
    assert isinstance(written, dict), where
    for key, value in read.items():
        assert key in written, f"{where}.{key} was dropped"
        if isinstance(value, dict):
            _assert_kept(written[key], value, f"{where}.{key}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert len(written[key]) == len(value), f"{where}.{key}"
            for i, (new, old) in enumerate(zip(written[key], value)):
                _assert_kept(new, old, f"{where}.{key}[{i}]")
        else:
            assert written[key] == value, f"{where}.{key}: {written[key]!r} != {value!r}"
    for key in set(written) - set(read):
        assert _default_like(written[key]) or key in ("schema_version", "interrupted"), f"{where}.{key} added"


@pytest.mark.parametrize("path", OLD_MANIFESTS, ids=lambda p: p.stem)
def test_rewriting_an_older_file_loses_nothing(path, tmp_path):
    record = read_record(path)
    target = tmp_path / "manifest.json"
    write_record(target, record)
    written = json.loads(target.read_text())
    assert written["schema_version"] == SCHEMA_VERSION
    assert written["interrupted"] is (written["status"] == "interrupted")
    _assert_kept(written, migrate(json.loads(path.read_text())))
    assert read_record(target) == record


def test_migration_only_renames_what_the_old_layout_meant():
    old = {"name": "a", "version": 1, "status": "failed", "interrupted": True}
    assert migrate(old)["status"] == "interrupted" and "interrupted" not in migrate(old)
    assert migrate({**old, "interrupted": False})["status"] == "failed"  # a real failure stays one
    # Since schema 2 "interrupted" is derived from the status, whatever a file says.
    assert RunRecord.from_json({**old, "schema_version": 2}).status == "failed"
    assert RunRecord.from_json({**old, "status": "interrupted", "interrupted": False, "schema_version": 2}).interrupted


# ----------------------------------------------------------------------------- every field


FULL = RunRecord(
    name="full", version=3, status="interrupted", created="2026-01-01T00:00:00+00:00",
    finished="2026-01-01T01:00:00+00:00", failed="2026-01-01T00:30:00+00:00", error="interrupted (SIGTERM)",
    parent="full@v2", config={"dataset": "digits", "ipc": 1},
    dataset=DatasetRecord(name="digits", fingerprint="f" * 64, num_classes=2, image_size=8, channels=1,
                          class_names=("a", "b"), num_train=10, num_test=4,
                          normalization=Normalization(mean=(0.5,), std=(0.25,))),
    seed=7, versions={"ncfm": "9.9"}, device="cuda:1", device_reason="requested", gpu_mem="2.5G",
    plan=PlanRecord(real_chunk=8, class_chunk=2, precision="bf16", activation_checkpointing=True, budget_bytes=2**31,
                    estimated_peak_bytes=2**30, device="cuda:1", budget_source="--gpu-mem 2.5G",
                    estimate_terms={"images": 123}, estimated_seconds=0.5, chosen_because="fastest",
                    cf_precision="tf32", estimated_allocated_bytes=2**29, headroom_bytes=2**29, capped=True,
                    backend=BackendRecord(allocator_conf="expandable_segments:True", allocator_chosen_by="ncfm",
                                          allocator_applied="environment", cudnn_benchmark=True,
                                          cudnn_benchmark_chosen_by="NCFM_CUDNN_BENCHMARK=1", cudnn_benchmark_limit=4),
                    kernels={"pool": "broadcast", "norm": "batchnorm", "compile": "on"}),
    flops_per_iteration=1e9, iterations_done=40, iterations_target=50, checkpoint_every=10, checkpoint_iteration=40,
    world_size=2, process=ProcessRecord(pid=42, host="node"),
    pool=PoolRecord(key="k", cached=True, size=2, epochs=3, seconds=1.5, test_accuracy=(0.5, 0.75)),
    timings=Timings(seconds=9.0, pool_seconds=1.5, sessions=2, seconds_per_iteration_median=0.2, per_session=(
        SessionTiming(from_iteration=0, to_iteration=30, seconds=6.0, pool_seconds=1.5,
                      seconds_per_iteration_median=0.1, ended="interrupted", compile_seconds=4.5),
        SessionTiming(from_iteration=30, to_iteration=40, seconds=3.0, pool_seconds=0.0,
                      seconds_per_iteration_median=0.2, ended="interrupted", compile_seconds=3.5))),
    peak_memory_bytes=2**29, peak_memory_source="cuda_max_memory_reserved",
    peak_memory=PeakMemoryRecord(device="cuda:1", source="torch.cuda", allocated_bytes=1, reserved_bytes=2,
                                 rss_bytes=3, peak_bytes=2),
    loss_curve=((10, 2.5), (20, None)), final_loss=2.5,
    synset=SynsetRecord(file="s", stored_images=2, shape=(2, 1, 8, 8), factor=2, decoded_images=8),
    sampler=SamplerRecord(file="p", learned=True), sha256={"s": "0" * 64},
    evals=(EvalRecord(accuracy=Accuracy(mean=0.5, std=0.1, runs=(0.4, 0.6)), model="convnet",
                      protocol={"epochs": 1}, baselines={"random": BaselineRecord(accuracy=Accuracy(mean=0.3, std=0.0, runs=(0.3,)))},
                      metrics={"ior": 0.2}, seeds=(0, 1), training="batched", train_set={"size": 8},
                      teacher={"member": 0}, timings={"synthetic": 1.0}, seconds=2.0, created="now", device="cpu",
                      world_size=1, extra={"models": {}}),),
    pending_eval=EvalRequest(protocol={"epochs": 1}, models=("convnet",), baselines=("random",), baseline_seed=3,
                             min_acc=0.5),
    plan_asked=PlanAsked(real_chunk=64, class_chunk=4, activation_checkpointing=True, allow_checkpointing=False),
    plan_changes=(PlanChange(iteration=7, phase="synthetic", error="CUDA out of memory", reserved_bytes=2**30,
                             before=PlanKnobs(real_chunk=16, class_chunk=4, activation_checkpointing=False),
                             after=PlanKnobs(real_chunk=8, class_chunk=2, activation_checkpointing=True)),),
    memory_fit=MemoryFit(estimated_reserved_bytes=2**30, estimated_allocated_bytes=2**29, measured_reserved_bytes=3,
                         measured_allocated_bytes=2, measured_source="torch.cuda",
                         knobs=PlanKnobs(real_chunk=8, class_chunk=2, activation_checkpointing=True), capped=True,
                         cudnn_benchmark=True, allocator_conf="expandable_segments:True"),
    extra={"from_a_newer_ncfm": [1, 2]},
)


def _parts(record) -> list:
    """Every :class:`Part` inside ``record`` (itself included)."""
    found = [record]
    for spec in dataclasses.fields(record):
        value = getattr(record, spec.name)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value]
        found += [part for item in values if dataclasses.is_dataclass(item) for part in _parts(item)]
    return found


def test_every_field_is_set_in_the_full_sample_and_round_trips(tmp_path):
    """Adding a field to any part of the record: give it a value in FULL above, and this test
    checks that it is written and read back (docs/architecture.md, "How to add a record field")."""
    for part in _parts(FULL):
        defaults = {spec.name: spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
                    for spec in dataclasses.fields(part)
                    if spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING}
        unset = [name for name, default in defaults.items() if getattr(part, name) == default and name not in ("extra", "kind")]
        assert unset == [], f"{type(part).__name__}: give {unset} a value in FULL"
    path = tmp_path / "manifest.json"
    write_record(path, FULL)
    assert read_record(path) == FULL
    assert json.loads(path.read_text())["from_a_newer_ncfm"] == [1, 2]


def test_fields_a_newer_ncfm_wrote_survive_an_update(tmp_path):
    store = Store(tmp_path)
    version = store.create_version("x", RunRecord())
    raw = json.loads(version.manifest_path.read_text())
    raw["from_the_future"] = {"a": 1}
    raw["plan"] = {**FULL.plan.to_json(), "new_plan_knob": 3}
    version.manifest_path.write_text(json.dumps(raw))
    store.update_record(version, status="failed", error="x")
    again = json.loads(version.manifest_path.read_text())
    assert again["from_the_future"] == {"a": 1} and again["plan"]["new_plan_knob"] == 3
    assert version.record().plan.extra == {"new_plan_knob": 3}


# ----------------------------------------------------------------------------- refused


def _write(tmp_path, obj) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(obj))
    return path


GOOD = FULL.to_json()


@pytest.mark.parametrize(("change", "words"), [
    (lambda m: {**m, "status": "done"}, "field 'status' is \"done\", expected one of " + ", ".join(STATUSES)),
    (lambda m: {**m, "iterations_done": "4"}, "field 'iterations_done' is \"4\", expected int"),
    (lambda m: {**m, "iterations_done": True}, "field 'iterations_done' is true, expected int"),
    (lambda m: {**m, "checkpoint_iteration": -1}, "field 'checkpoint_iteration' is -1, expected a count >= 0"),
    (lambda m: {k: v for k, v in m.items() if k != "name"}, "field 'name' is missing"),
    (lambda m: {**m, "evals": {"a": 1}}, "field 'evals' is {\"a\": 1}, expected list"),
    (lambda m: {**m, "evals": [{"accuracy": {"runs": "x"}}]}, "field 'evals[0].accuracy.runs' is \"x\", expected list"),
    (lambda m: {**m, "evals": [{}]}, "field 'evals[0].accuracy' is missing"),
    (lambda m: {**m, "timings": {**m["timings"], "per_session": [{"from_iteration": 0}]}},
     "field 'timings.per_session[0].to_iteration' is missing"),
    (lambda m: {**m, "dataset": {**m["dataset"], "fingerprint": 5}}, "field 'dataset.fingerprint' is 5, expected str"),
    (lambda m: {**m, "loss_curve": [[10]]}, "field 'loss_curve[0]' is [10], expected a list of 2"),
    (lambda m: {**m, "sha256": {"synset.safetensors": 1}}, "field 'sha256.synset.safetensors' is 1, expected str"),
    (lambda m: {**m, "pending_eval": "yes"}, "field 'pending_eval' is \"yes\", expected object"),
    (lambda m: {**m, "schema_version": "2"}, "field 'schema_version' is \"2\", expected an int >= 1"),
    (lambda m: {**m, "schema_version": SCHEMA_VERSION + 1},
     f"written by a newer ncfm (record schema {SCHEMA_VERSION + 1}; this one reads up to {SCHEMA_VERSION})"),
    (lambda m: [m], "expected a JSON object, found list"),
])
def test_a_malformed_manifest_is_one_line_naming_the_field_and_the_file(tmp_path, change, words):
    path = _write(tmp_path, change(dict(GOOD)))
    with pytest.raises(CorruptArtifactError) as err:
        read_record(path)
    message = str(err.value)
    assert message == f"{path}: {words}; restore or delete this file" or (
        message.startswith(f"{path}: {words}") and "\n" not in message), message


def test_seeds_may_be_negative_counts_may_not(tmp_path):
    record = FULL.replace(seed=-1, evals=(FULL.evals[0].replace(seeds=(-2, -1)),),
                          pending_eval=FULL.pending_eval.replace(baseline_seed=-5))
    write_record(tmp_path / "manifest.json", record)  # an eval run with --seed -2 is recorded
    assert read_record(tmp_path / "manifest.json") == record
    with pytest.raises(ValueError, match="'iterations_done' is -1, expected a count >= 0"):
        write_record(tmp_path / "manifest.json", record.replace(iterations_done=-1))


def test_a_huge_manifest_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = _write(tmp_path, GOOD)
    with open(path, "r+b") as handle:
        handle.truncate(MAX_RECORD_BYTES + 1)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read"))
    with pytest.raises(CorruptArtifactError, match="MiB at most"):
        read_record(path)


def test_what_would_not_read_back_is_never_written(tmp_path):
    path = _write(tmp_path, GOOD)
    for bad in (FULL.replace(status="done"), FULL.replace(iterations_done="4"),
                FULL.replace(timings=FULL.timings.replace(seconds="slow"))):
        with pytest.raises(ValueError, match="would not read back"):
            write_record(path, bad)
    assert json.loads(path.read_text()) == GOOD


# ----------------------------------------------------------------------------- peak memory


@pytest.mark.parametrize(("peak", "code"), [
    (dict(allocated_bytes=1, reserved_bytes=2), "cuda_max_memory_reserved"),
    (dict(rss_bytes=3), "process_peak_rss"),
    (dict(allocated_bytes=4), "mps_driver_allocated"),
    (None, "unavailable"),
])
def test_every_peak_memory_source_a_run_records_has_its_description(monkeypatch, peak, code):
    from ncfm_core.devices import PeakMemory
    from ncfm_core.jobs import run

    def measure(device):
        if peak is None:
            raise RuntimeError("no measurement here")
        return PeakMemory(device="x", source="test", **peak)

    monkeypatch.setattr(run, "measure_peak", measure)
    recorded, _, source = run._peak_memory("cpu")
    assert source == code and code in PEAK_MEMORY_SOURCES
    assert recorded is None if peak is None else recorded == PeakMemoryRecord.from_json(
        PeakMemory(device="x", source="test", **peak).to_dict())


def test_peak_memory_sources_in_words():
    assert describe_peak_source("process_peak_rss") == "process peak RSS"
    assert describe_peak_source("cuda_max_memory_allocated") == "CUDA peak allocated"  # older versions
    assert describe_peak_source("from_the_future") == "from_the_future"
