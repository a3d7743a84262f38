"""Jobs: distill/resume/eval/export/inspect/list over a real store, on tiny digits settings."""

from __future__ import annotations

import json
import signal

import pytest
import safetensors.torch
import torch

from ncfm_core.config import make_config
from ncfm_core.distill import Distiller
from ncfm_core.errors import ConfigError, CorruptArtifactError, NcfmError, NotFoundError
from ncfm_core.evaluate import EvalConfig
from ncfm_core.jobs import (
    JobInterrupted,
    default_artifact_name,
    distill_job,
    eval_job,
    export_job,
    inspect_job,
    list_job,
    resume_job,
)
from ncfm_core.jobs.run import shown_status
from ncfm_core.kernels import KernelLevers
from ncfm_core.store import RunRecord, Store, load_state, load_synset, load_tensors, write_json

# Small enough for a busy CPU: an untrained 1-network pool of width-8 ConvNets, 16 frequencies.
TINY = dict(pool_size=1, pool_epochs=0, num_freqs=16, real_per_class=4, width=8)


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_config(iterations: int = 6, seed: int = 0, **overrides):
    return make_config("digits", 1, iterations=iterations, seed=seed, **{**TINY, **overrides})


def synset_images(version) -> torch.Tensor:
    return load_synset(version.synset_path).images


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def stages(self):
        return [event["stage"] for event in self.events]


def interrupt_at(monkeypatch, iteration: int) -> None:
    """Make Distiller.step deliver a real SIGINT once it has finished ``iteration``."""
    original = Distiller.step

    def step(self):
        metrics = original(self)
        if self.iteration == iteration:
            signal.raise_signal(signal.SIGINT)
        return metrics

    monkeypatch.setattr(Distiller, "step", step)


# ----------------------------------------------------------------------------- distill


def test_distill_writes_a_complete_version(tmp_path):
    store = Store(tmp_path)
    config = tiny_config(iterations=12, pool_epochs=1)
    recorder = Recorder()
    version = distill_job(store, config, checkpoint_every=5, callback=recorder)

    assert version.ref == "digits-ipc1@v1"
    record = version.record()
    assert record.status == "complete"
    assert record.iterations_done == record.iterations_target == 12
    # the record holds the config with the memory plan applied, so resume replays the plan
    plan = record.plan
    planned = dict(real_chunk=plan.real_chunk, class_chunk=plan.class_chunk, precision=plan.precision,
                   activation_checkpointing=plan.activation_checkpointing, cf_precision=plan.cf_precision,
                   kernels=KernelLevers.from_dict(dict(plan.kernels)).spec())
    assert record.config == config.replace(**planned).to_dict()
    assert KernelLevers.from_dict(dict(plan.kernels)) == KernelLevers()  # the CPU's levers: today's path
    assert record.seed == 0 and record.parent is None
    assert record.dataset.name == "digits"
    assert record.dataset.num_classes == 10 and record.dataset.image_size == 16
    assert len(record.dataset.fingerprint) == 64
    assert set(record.versions) == {"ncfm", "torch", "python"}
    assert record.device == "cpu" and record.device_reason
    assert record.pool.cached is False and record.pool.size == 1
    assert record.timings.seconds > 0 and record.timings.sessions == 1
    assert record.timings.seconds_per_iteration_median > 0
    (session,) = record.timings.per_session
    assert (session.from_iteration, session.to_iteration, session.ended) == (0, 12, "complete")
    assert session.seconds_per_iteration_median == record.timings.seconds_per_iteration_median
    assert isinstance(record.peak_memory_bytes, int) and record.peak_memory_bytes > 0
    assert record.peak_memory_source == "process_peak_rss"
    assert [point[0] for point in record.loss_curve] == [10]
    assert record.sampler.learned is True
    assert record.created and record.finished and record.pending_eval is None

    # Files: synset with the documented tensors and metadata, psi weights, final checkpoint.
    tensors, meta = load_tensors(version.synset_path)
    assert set(tensors) == {"images", "labels"}
    assert tensors["images"].dtype == torch.float32 and tuple(tensors["images"].shape) == (10, 1, 16, 16)
    assert torch.equal(tensors["labels"], torch.arange(10))
    assert meta["format"] == "ncfm-synset/1"
    assert (meta["factor"], meta["ipc"], meta["num_classes"], meta["image_size"], meta["channels"]) == (
        "2", "1", "10", "16", "1"
    )
    assert json.loads(meta["class_names"]) == [str(d) for d in range(10)]
    sampler, sampler_meta = load_tensors(version.sampler_path)
    assert sampler and sampler_meta["kind"] == "mixture"
    assert load_state(version.checkpoint_path)["iteration"] == 12

    stages = recorder.stages()
    assert stages[0] == "created" and stages.index("pool") < stages.index("distill")
    distill_events = [e for e in recorder.events if e["stage"] == "distill"]
    assert [e["iteration"] for e in distill_events] == list(range(1, 13))
    assert all(e["total"] == 12 for e in distill_events)
    assert [e["iteration"] for e in recorder.events if e["stage"] == "checkpoint"] == [5, 10]


def test_second_distill_reuses_pool_and_is_deterministic(tmp_path):
    store = Store(tmp_path)
    first = distill_job(store, tiny_config(pool_epochs=1))
    recorder = Recorder()
    second = distill_job(store, tiny_config(pool_epochs=1), callback=recorder)
    assert second.ref == "digits-ipc1@v2"
    assert first.record().pool.cached is False
    assert second.record().pool.cached is True
    assert second.record().pool.key == first.record().pool.key
    assert "pool" not in recorder.stages()  # nothing trained the second time
    assert torch.equal(synset_images(first), synset_images(second))
    # A fresh store retrains the pool; training is seeded, so the result is the same again.
    fresh = distill_job(Store(tmp_path / "other"), tiny_config(pool_epochs=1))
    assert torch.equal(synset_images(first), synset_images(fresh))


def test_no_sampler_writes_an_empty_but_valid_sampler_file(tmp_path):
    version = distill_job(Store(tmp_path), tiny_config(iterations=2, sampler=False))
    tensors, meta = load_tensors(version.sampler_path)
    assert tensors == {} and meta["kind"] == "gaussian"
    assert version.record().sampler.learned is False


def test_bad_input_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ConfigError, match="--ipc"):
        distill_job(store, make_config("digits", 500, **TINY))
    with pytest.raises(ConfigError, match="factor"):
        distill_job(store, tiny_config(factor=3))
    with pytest.raises(ConfigError, match="network"):
        distill_job(store, tiny_config(network="nonet"))
    with pytest.raises(ConfigError, match="invalid artifact name"):
        distill_job(store, tiny_config(), name="../escape")
    with pytest.raises(ConfigError, match="checkpoint-every"):
        distill_job(store, tiny_config(), checkpoint_every=0)
    assert store.scan() == ([], [])


def test_default_artifact_names():
    assert default_artifact_name("cifar10", 10) == "cifar10-ipc10"
    assert default_artifact_name("folder:/data/my images/", 5) == "folder-my_images-ipc5"
    assert default_artifact_name("folder:C:\\x\\..\\y", 1) == "folder-y-ipc1"
    assert default_artifact_name("folder:/", 2) == "folder-data-ipc2"


# ----------------------------------------------------------------------------- interrupt, resume


def test_ctrl_c_checkpoints_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    store = Store(tmp_path)
    reference = distill_job(Store(tmp_path / "reference"), tiny_config(iterations=9))

    with monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        with pytest.raises(JobInterrupted) as info:
            distill_job(store, tiny_config(iterations=9), checkpoint_every=3)
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.version.ref == "digits-ipc1@v1" and info.value.checkpoint_iteration == 4
    record = info.value.version.record()
    assert record.status == "interrupted" and record.error == "interrupted (Ctrl-C)"
    assert record.iterations_done == 4 and record.checkpoint_iteration == 4
    assert shown_status(store, info.value.version, record) == ("interrupted", (
        f"stopped with a checkpoint at iteration 4; continue it with `ncfm --store {tmp_path} resume digits-ipc1@v1`"))
    assert load_state(info.value.version.checkpoint_path)["iteration"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    resumed = resume_job(store, "digits-ipc1")  # a bare name resumes the newest version
    assert resumed == info.value.version
    record = resumed.record()
    assert record.status == "complete" and record.iterations_done == 9
    assert record.timings.sessions == 2 and record.error is None
    # Each session's median is kept and says which iterations it covers.
    assert [(s.from_iteration, s.to_iteration, s.ended) for s in record.timings.per_session] == [
        (0, 4, "interrupted"), (4, 9, "complete")]
    assert all(s.seconds_per_iteration_median > 0 for s in record.timings.per_session)
    assert torch.equal(synset_images(resumed), synset_images(reference))
    for key, tensor in load_tensors(reference.sampler_path)[0].items():
        assert torch.equal(load_tensors(resumed.sampler_path)[0][key], tensor), key


def test_a_run_interrupted_under_the_old_layout_shows_interrupted_and_resumes(tmp_path, monkeypatch):
    """A version the previous main left after Ctrl-C (schema 1: status "failed", interrupted true, as
    tests/fixtures/manifests/schema1-aa11a6b-interrupted.json) is listed as interrupted with its
    resume command, and resuming it finishes it and rewrites its manifest in the current layout."""
    store = Store(tmp_path)
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        with pytest.raises(JobInterrupted) as info:
            distill_job(store, tiny_config(iterations=5), checkpoint_every=2)
    version = info.value.version
    old = json.loads(version.manifest_path.read_text())
    for key in ("schema_version", "pending_eval"):
        del old[key]
    old.update(status="failed", interrupted=True, timings={k: v for k, v in old["timings"].items() if k != "per_session"})
    write_json(version.manifest_path, old)

    (row,) = list_job(store)["artifacts"]
    assert row["status"] == "interrupted" and f"resume {version.ref}" in row["hint"]
    assert inspect_job(store, version.ref).status == "interrupted"
    resume_job(store, version.ref)
    rewritten = json.loads(version.manifest_path.read_text())
    assert (rewritten["status"], rewritten["schema_version"], rewritten["interrupted"]) == ("complete", 2, False)
    assert rewritten["timings"]["sessions"] == 2 and len(rewritten["timings"]["per_session"]) == 1


def test_crash_inside_an_iteration_keeps_the_last_exact_checkpoint(tmp_path, monkeypatch):
    store = Store(tmp_path)
    reference = distill_job(Store(tmp_path / "reference"), tiny_config(iterations=8))
    original = Distiller.step

    def failing_step(self):
        if self.iteration == 5:
            self.generator.manual_seed(1234)  # half-done work: this state must not be saved
            raise RuntimeError("simulated out of memory")
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(Distiller, "step", failing_step)
        with pytest.raises(RuntimeError, match="simulated"):
            distill_job(store, tiny_config(iterations=8), checkpoint_every=2)
    record = store.resolve("digits-ipc1@v1").record()
    assert record.status == "failed" and record.to_json()["interrupted"] is False
    assert record.error == "RuntimeError: simulated out of memory"
    assert record.checkpoint_iteration == 4  # the periodic one, not the broken iteration 5

    resumed = resume_job(store, "digits-ipc1@v1")
    assert resumed.record().status == "complete"
    assert torch.equal(synset_images(resumed), synset_images(reference))


def test_resume_without_checkpoint_starts_over(tmp_path):
    store = Store(tmp_path)
    reference = distill_job(Store(tmp_path / "reference"), tiny_config(iterations=5))
    version = distill_job(store, tiny_config(iterations=5))
    version.checkpoint_path.unlink()
    store.update_record(version, status="failed", iterations_done=3)
    recorder = Recorder()
    resume_job(store, version.ref, callback=recorder)
    assert any("no checkpoint" in e.get("message", "") for e in recorder.events)
    assert version.record().status == "complete"
    assert torch.equal(synset_images(version), synset_images(reference))


def test_resume_decides_the_precisions_of_a_run_recorded_undecided(tmp_path):
    """A manifest from before cf_precision existed has no such field (the config then reads its
    default, "auto"): resume decides it through the plan's one function, so the loop never gets
    "auto", and records the decided values; the run is the run it always was."""
    store = Store(tmp_path)
    reference = distill_job(Store(tmp_path / "reference"), tiny_config(iterations=5))
    version = distill_job(store, tiny_config(iterations=5))
    recorded = version.record().config
    assert (recorded["precision"], recorded["cf_precision"]) == ("fp32", "fp32")  # decided by the plan
    older = {key: value for key, value in recorded.items() if key != "cf_precision"} | {"precision": "auto"}
    version.checkpoint_path.unlink()
    store.update_record(version, config=older, status="failed", iterations_done=3)
    resume_job(store, version.ref)
    record = version.record()
    assert record.status == "complete"
    assert (record.config["precision"], record.config["cf_precision"]) == ("fp32", "fp32")
    assert torch.equal(synset_images(version), synset_images(reference))


def test_resume_complete_extends_into_a_child_version(tmp_path):
    store = Store(tmp_path)
    longer = distill_job(Store(tmp_path / "reference"), tiny_config(iterations=7))
    parent = distill_job(store, tiny_config(iterations=4))

    recorder = Recorder()
    same = resume_job(store, "digits-ipc1", callback=recorder)
    assert same == parent and recorder.events[-1]["level"] == "warning"
    assert "already complete" in recorder.events[-1]["message"]
    with pytest.raises(ConfigError, match="at least"):
        resume_job(store, "digits-ipc1", iterations=3)

    child = resume_job(store, "digits-ipc1", iterations=7)
    assert child.ref == "digits-ipc1@v2"
    record = child.record()
    assert record.parent == "digits-ipc1@v1" and record.status == "complete"
    assert record.iterations_done == 7 and record.config["iterations"] == 7
    assert [(s.from_iteration, s.to_iteration) for s in record.timings.per_session] == [(4, 7)]
    assert parent.record().iterations_done == 4  # the parent is untouched
    assert torch.equal(synset_images(child), synset_images(longer))


def test_resume_refuses_changed_data_and_live_runs(tmp_path):
    store = Store(tmp_path)
    version = distill_job(store, tiny_config(iterations=2))
    store.update_record(version, status="failed")

    # A live run holds the version's run lock.
    import filelock

    lock = filelock.FileLock(str(version.run_lock_path))
    with lock:
        with pytest.raises(NcfmError, match="another process"):
            resume_job(store, version.ref)
    assert version.record().status == "failed"  # not touched by the refused resume

    store.update_record(version, lambda r: r.replace(dataset=r.dataset.replace(fingerprint="0" * 64)))
    with pytest.raises(NcfmError, match="not the data"):
        resume_job(store, version.ref)
    with pytest.raises(NotFoundError):
        resume_job(store, "missing-name")


def test_resume_with_corrupt_checkpoint_names_the_file(tmp_path):
    store = Store(tmp_path)
    version = distill_job(store, tiny_config(iterations=2))
    store.update_record(version, status="failed")
    version.checkpoint_path.write_bytes(version.checkpoint_path.read_bytes()[:100])
    with pytest.raises(CorruptArtifactError) as info:
        resume_job(store, version.ref)
    assert str(version.checkpoint_path) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- synset loading


@pytest.fixture(scope="module")
def synset_file(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        version = distill_job(Store(tmp_path_factory.mktemp("synset_store")), tiny_config(iterations=1))
    finally:
        torch.set_num_threads(before)
    return version.synset_path


def _rewrite(path, tensors=None, meta_changes=None):
    original, meta = load_tensors(path)
    meta.update(meta_changes or {})
    path.write_bytes(safetensors.torch.save(tensors if tensors is not None else original, metadata=meta))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
        (lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), "header length"),
        (lambda p: p.write_bytes(p.read_bytes()[:8] + b"{not json" + p.read_bytes()[17:]), "not valid JSON"),
        (lambda p: _rewrite(p, {"pixels": torch.zeros(10, 1, 16, 16), "labels": torch.arange(10)}), "tensor names"),
        (lambda p: _rewrite(p, {"images": torch.zeros(10, 1, 16, 16, dtype=torch.float64),
                                "labels": torch.arange(10)}), "dtype"),
        (lambda p: _rewrite(p, {"images": torch.zeros(10, 16, 16), "labels": torch.arange(10)}), "shape"),
        (lambda p: _rewrite(p, {"images": torch.zeros(9, 1, 16, 16), "labels": torch.arange(9)}), "shape"),
        (lambda p: _rewrite(p, {"images": torch.full((10, 1, 16, 16), float("nan")),
                                "labels": torch.arange(10)}), "NaN"),
        (lambda p: _rewrite(p, {"images": torch.zeros(10, 1, 16, 16), "labels": torch.arange(10) + 5}), "labels"),
        (lambda p: _rewrite(p, meta_changes={"format": "other/1"}), "not an ncfm synthetic set"),
        (lambda p: _rewrite(p, meta_changes={"class_names": "[1, 2"}), "metadata"),
    ],
)
def test_corrupt_synset_is_a_one_line_error_naming_the_file(tmp_path, synset_file, damage, fragment):
    path = tmp_path / "synset.safetensors"
    path.write_bytes(synset_file.read_bytes())
    load_synset(path)  # the intact copy loads
    damage(path)
    with pytest.raises(CorruptArtifactError) as info:
        load_synset(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and fragment in message, message


def test_missing_synset_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        load_synset(tmp_path / "synset.safetensors")


# ----------------------------------------------------------------------------- eval, export, inspect, list


def test_eval_export_inspect_list(tmp_path):
    store = Store(tmp_path)
    version = distill_job(store, tiny_config(iterations=2))
    recorder = Recorder()
    record = eval_job(store, "digits-ipc1", EvalConfig(epochs=1, repeats=2, width=8), "cpu", recorder)
    assert record["artifact"] == version.ref and record["path"] == str(version.path)
    runs = record["accuracy"]["runs"]
    assert len(runs) == 2 and all(0.0 <= r <= 1.0 for r in runs)
    assert record["accuracy"]["mean"] == pytest.approx(sum(runs) / 2, abs=1e-12)
    assert record["accuracy"]["std"] == pytest.approx(abs(runs[0] - runs[1]) / 2, abs=1e-12)
    assert record["protocol"]["epochs"] == 1 and record["device"] == "cpu"
    assert [e["repeat"] for e in recorder.events if e["stage"] == "eval"] == [0, 1]
    stored = version.record().evals
    assert len(stored) == 1 and stored[0].to_json() == {k: v for k, v in record.items() if k not in ("artifact", "path")}

    files = export_job(store, version.ref, "npz", tmp_path / "out", decoded=True)
    assert files["files"] == [str(tmp_path / "out" / "synset.npz")]
    import numpy as np

    with np.load(tmp_path / "out" / "synset.npz", allow_pickle=False) as archive:
        assert archive["images"].shape == (40, 1, 16, 16)  # 10 stored images x factor^2

    info = inspect_job(store, version.ref)
    assert info.artifact == version.ref and info.status == "complete" and info.hint is None
    assert info.record == version.record()
    assert set(info.file_sizes) == {
        "manifest.json", "synset.safetensors", "sampler.safetensors", "checkpoint/state.safetensors"
    }
    assert info.file_sizes["synset.safetensors"] == version.synset_path.stat().st_size
    assert info.to_json() == {**json.loads(version.manifest_path.read_text()), "artifact": version.ref,
                              "path": str(version.path), "file_sizes": info.file_sizes}

    # A broken manifest in another version is a warning, not a failure.
    broken = store.create_version("broken", RunRecord())
    broken.manifest_path.write_text("{oops")
    listing = list_job(store)
    rows = {row["artifact"]: row for row in listing["artifacts"]}
    assert rows[version.ref]["accuracy"] == record["accuracy"]["mean"]
    assert rows[version.ref]["ipc"] == 1 and rows[version.ref]["dataset"] == "digits"
    assert "broken@v1" not in rows
    assert any("broken@v1" in warning for warning in listing["warnings"])


def test_eval_refuses_unfinished_versions(tmp_path):
    store = Store(tmp_path)
    version = distill_job(store, tiny_config(iterations=1))
    store.update_record(version, status="failed")
    with pytest.raises(NotFoundError, match="ncfm resume"):
        eval_job(store, version.ref, EvalConfig(epochs=1, repeats=1))
    write_json(version.manifest_path, {**json.loads(version.manifest_path.read_text()), "status": "complete"})
    version.synset_path.write_bytes(b"garbage")
    with pytest.raises(CorruptArtifactError, match="synset.safetensors"):
        eval_job(store, version.ref, EvalConfig(epochs=1, repeats=1))
