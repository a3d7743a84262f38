"""The remaining failure modes (issue 15): nothing silently wrong, nothing lost.

Non-finite runs and flipped bytes, meaningless accuracies, requests validated before long work,
``--json`` errors, atomic exports, SIGTERM and dead runs, references, manifests validated on load,
and the small option checks."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from cli_runner import EVAL_TINY, TINY, error_line, invoke, one_json, one_thread

from ncfm_core.distill import Distiller
from ncfm_core.store import Store, load_state, save_state

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One complete artifact (4 iterations, checkpoints every 2), shared read-only."""
    with one_thread():
        store = tmp_path_factory.mktemp("failures_store")
        distilled = one_json(invoke("--store", store, "--json", "distill", "digits", "--ipc", "1",
                                    "--iterations", "4", "--checkpoint-every", "2", *TINY))
    return {"store": store, "distill": distilled}



def _data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts."""
    raw = path.read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")


def _overwrite_data(path: Path, byte: int, count: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    start = _data_offset(path)
    raw[start:start + count] = bytes([byte]) * count
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- 1. non-finite, hashes


def test_flipped_checkpoint_bytes_are_refused_by_resume(store_copy):
    version = Store(store_copy).resolve("digits-ipc1@v1")
    _overwrite_data(version.checkpoint_path, 0xFF)
    result = invoke("--store", store_copy, "resume", "digits-ipc1", "--iterations", "6", expect=1)
    line = error_line(result)
    assert str(version.checkpoint_path) in line and "sha256" in line
    assert [v.version for v in Store(store_copy).versions("digits-ipc1")] == [1]  # nothing half-made


def test_changed_synset_bytes_are_refused_by_eval_and_export(store_copy, tmp_path):
    version = Store(store_copy).resolve("digits-ipc1@v1")
    assert set(version.record().sha256) == {"synset.safetensors", "sampler.safetensors", "checkpoint/state.safetensors"}
    raw = bytearray(version.synset_path.read_bytes())
    raw[-4:] = struct.pack("<f", 0.5 if struct.unpack("<f", raw[-4:])[0] != 0.5 else 0.25)
    version.synset_path.write_bytes(bytes(raw))  # a valid pixel, changed: only a hash can tell
    line = error_line(invoke("--store", store_copy, "eval", "digits-ipc1", *EVAL_TINY, expect=1))
    assert str(version.synset_path) in line and "sha256" in line
    line = error_line(invoke("--store", store_copy, "export", "digits-ipc1", "--format", "npz",
                             "--out", tmp_path / "out", expect=1))
    assert str(version.synset_path) in line


def test_recorded_hashes_are_the_files_sha256(made):
    import hashlib

    version = Store(made["store"]).resolve("digits-ipc1@v1")
    for relpath, digest in version.record().sha256.items():
        assert hashlib.sha256((version.path / relpath).read_bytes()).hexdigest() == digest, relpath


def test_non_finite_checkpoint_is_refused_by_resume(store_copy):
    version = Store(store_copy).resolve("digits-ipc1@v1")
    state = load_state(version.checkpoint_path)
    state["images"][0] = float("nan")
    save_state(version.checkpoint_path, state)  # a valid file holding a diverged state
    line = error_line(invoke("--store", store_copy, "resume", "digits-ipc1", "--iterations", "6", expect=1))
    assert str(version.checkpoint_path) in line and "NaN" in line


def test_a_diverging_run_fails_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch):
    step = Distiller.step

    def diverging(self):
        metrics = step(self)
        if self.iteration == 3:
            with torch.no_grad():
                self.images.fill_(float("nan"))
            metrics = {**metrics, "loss": float("nan")}
        return metrics

    monkeypatch.setattr(Distiller, "step", diverging)
    result = invoke("--store", tmp_path, "distill", "digits", "--ipc", "1", "--iterations", "6",
                    "--checkpoint-every", "2", *TINY, expect=1)
    line = error_line(result)
    assert "diverged at iteration 3" in line and "iteration 2" in line
    version = Store(tmp_path).resolve("digits-ipc1@v1")
    record = version.record()
    assert record.status == "failed" and "iteration 3" in record.error
    assert record.checkpoint_iteration == 2
    state = load_state(version.checkpoint_path)
    assert state["iteration"] == 2 and bool(torch.isfinite(state["images"]).all())
    assert not version.synset_path.exists()


def test_non_finite_images_never_complete(tmp_path, monkeypatch):
    """Images that go non-finite while the loss still reads finite are caught before any write."""
    step = Distiller.step

    def diverging(self):
        metrics = step(self)
        if self.iteration == 3:
            with torch.no_grad():
                self.images.fill_(float("inf"))
        return metrics

    monkeypatch.setattr(Distiller, "step", diverging)
    line = error_line(invoke("--store", tmp_path, "distill", "digits", "--ipc", "1", "--iterations", "3",
                             "--checkpoint-every", "2", *TINY, expect=1))
    assert "diverged at iteration 3" in line
    record = Store(tmp_path).resolve("digits-ipc1@v1").record()
    assert record.status == "failed" and record.checkpoint_iteration == 2


# ----------------------------------------------------------------------------- 2. meaningful accuracy


def _folder(root: Path, classes: dict[str, int]) -> Path:
    from fixtures_data import solid_image

    for index, (name, count) in enumerate(classes.items()):
        for i in range(count):
            solid_image(root / name / f"{i}.png", ((40 * index + 10 * i) % 256, 80, 120))
    return root


def test_a_folder_with_an_empty_test_split_is_refused(tmp_path):
    root = _folder(tmp_path / "one_each", {"cat": 1, "dog": 1})
    line = error_line(invoke("--store", tmp_path / "s", "distill", f"folder:{root}", "--ipc", "1", "--iterations", "1",
                             *TINY, expect=2))
    assert "no test images" in line and "at least 2 images" in line and "test/" in line
    assert not (tmp_path / "s" / "artifacts").exists()


def test_a_one_class_folder_is_refused(tmp_path):
    root = _folder(tmp_path / "only_cats", {"cat": 4})
    line = error_line(invoke("--store", tmp_path / "s", "distill", f"folder:{root}", "--ipc", "1", "--iterations", "1",
                             *TINY, expect=2))
    assert "at least 2 classes" in line


# ----------------------------------------------------------------------------- 3. validate before work


@pytest.mark.parametrize("value", ["1.5", "nan", "-0.1"])
def test_min_acc_out_of_range_exits_2_before_any_work(made, value, monkeypatch):
    import ncfm_cli.eval as eval_cli

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(eval_cli, "eval_job", no_work)
    line = error_line(invoke("--store", made["store"], "eval", "digits-ipc1", *EVAL_TINY, "--min-acc", value,
                             expect=2))
    assert "--min-acc" in line and "[0, 1]" in line


# ----------------------------------------------------------------------------- 7. references


def test_a_bare_name_is_always_the_store(made, tmp_path, monkeypatch):
    """A folder of the same name in the current directory does not shadow the store's artifact."""
    impostor = tmp_path / "digits-ipc1"
    shutil.copytree(Store(made["store"]).resolve("digits-ipc1@v1").path, impostor)
    manifest = json.loads((impostor / "manifest.json").read_text())
    (impostor / "manifest.json").write_text(json.dumps({**manifest, "name": "impostor"}))
    monkeypatch.chdir(tmp_path)
    store = Store(made["store"])
    assert store.resolve("digits-ipc1").path == store.artifacts_dir / "digits-ipc1" / "v1"
    assert store.resolve("./digits-ipc1").path == impostor.absolute()
    shown = one_json(invoke("--store", made["store"], "inspect", "digits-ipc1", "--json"))
    assert shown["path"] == str(store.artifacts_dir / "digits-ipc1" / "v1")

    from ncfm_core.jobs.resume import _resolve_any_status

    assert _resolve_any_status(store, "digits-ipc1").path == store.artifacts_dir / "digits-ipc1" / "v1"


# ----------------------------------------------------------------------------- 9. small ones


def test_a_very_long_reference_is_a_usage_error(made):
    line = error_line(invoke("--store", made["store"], "inspect", "x" * 300, expect=2))
    assert "invalid artifact name" in line
    line = error_line(invoke("--store", made["store"], "inspect", "./" + "x" * 300, expect=2))
    assert "not a usable path" in line


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--lr", "1e38", "--lr"), ("--lr", "inf", "--lr"), ("--image-size", "30000", "at most 1024"),
])
def test_out_of_range_numbers_are_refused_before_work(tmp_path, option, value, words):
    line = error_line(invoke("--store", tmp_path, "distill", "digits", "--ipc", "1", "--iterations", "1",
                             *TINY, option, value, expect=2))
    assert words in line
    assert not (tmp_path / "artifacts").exists()


def test_eval_lr_must_be_finite(made):
    line = error_line(invoke("--store", made["store"], "eval", "digits-ipc1", *EVAL_TINY, "--lr", "nan", expect=2))
    assert "--lr" in line


# ----------------------------------------------------------------------------- 4. --json errors


def _json_error(result, exit_code: int, words: str) -> dict:
    error = one_json(result)["error"]
    assert set(error) == {"type", "message", "exit_code"} and error["exit_code"] == exit_code
    assert words in error["message"], error
    assert result.stderr.strip().splitlines()[-1].startswith(("error: ", "interrupted")), result.stderr
    return error


@pytest.mark.parametrize(("args", "exit_code", "words"), [
    (["--json", "distill", "digits", "--ipc", "0"], 2, "--ipc"),
    (["--json", "distill", "digits", "--ipc", "1", "--no-such-option"], 2, "--no-such-option"),
    (["ls", "--bogus", "--json"], 2, "--bogus"),
    (["--json", "eval", "nosuch"], 3, "no artifact named 'nosuch'"),
    (["--json", "distill", "cifar11", "--ipc", "1"], 2, "unknown dataset"),
    (["--json", "eval", "digits-ipc1", "--min-acc", "1.5"], 2, "--min-acc"),
])
def test_json_errors_print_one_error_object(made, args, exit_code, words):
    result = invoke("--store", made["store"], *args, expect=exit_code)
    _json_error(result, exit_code, words)


def test_json_error_of_a_corrupt_file_names_it(store_copy):
    version = Store(store_copy).resolve("digits-ipc1@v1")
    version.manifest_path.write_text("{broken")
    error = _json_error(invoke("--store", store_copy, "--json", "inspect", "digits-ipc1@v1", expect=1), 1,
                        "manifest.json")
    assert error["type"] == "CorruptArtifactError"


def test_json_ctrl_c_names_the_resume_command(tmp_path, monkeypatch):
    import ncfm_core.jobs.run as run_module

    monkeypatch.setenv("NCFM_PAUSE_AFTER_CHECKPOINT", "2")
    monkeypatch.setattr(run_module, "_pause", lambda stop_requested: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = invoke("--store", tmp_path, "--json", "distill", "digits", "--ipc", "1", "--iterations", "4",
                    "--checkpoint-every", "2", *TINY, expect=130)
    error = _json_error(result, 130, "resume digits-ipc1@v1")
    assert "checkpoint saved at iteration 2" in error["message"]


# ----------------------------------------------------------------------------- 6. SIGTERM, dead runs


def test_sigterm_checkpoints_and_exits_143_and_a_killed_run_shows_interrupted(tmp_path):
    import signal

    from test_resume_kill import DISTILL, finish, ncfm, wait_for_checkpoint

    store = tmp_path / "store"
    # SIGTERM: the iteration finishes, a checkpoint is kept, exit 143 naming the resume command.
    proc = ncfm(store, "--json", *DISTILL, "--name", "term", pause_at=5)
    manifest_path = store / "artifacts" / "term" / "v1" / "manifest.json"
    try:
        wait_for_checkpoint(proc, manifest_path, 5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = finish(proc, expect=143)
    finally:
        proc.kill()
    error = json.loads(stdout)["error"]
    assert error["exit_code"] == 143 and f"ncfm --store {store} resume term@v1" in error["message"]
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "interrupted" and manifest["interrupted"] is True
    assert manifest["error"] == "interrupted (SIGTERM)" and manifest["checkpoint_iteration"] == 5
    row = next(r for r in one_json(invoke("--store", store, "ls", "--json"))["artifacts"] if r["artifact"] == "term@v1")
    assert row["status"] == "interrupted" and "checkpoint at iteration 5" in row["hint"]

    # SIGKILL: nothing can be recorded, but the free run lock tells ls and inspect it is dead.
    proc = ncfm(store, *DISTILL, "--name", "killed", pause_at=5)
    manifest_path = store / "artifacts" / "killed" / "v1" / "manifest.json"
    try:
        wait_for_checkpoint(proc, manifest_path, 5)
        listing = one_json(invoke("--store", store, "ls", "--json"))
        assert {row["artifact"]: row["status"] for row in listing["artifacts"]}["killed@v1"] == "running"  # alive
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finally:
        proc.kill()
    assert json.loads(manifest_path.read_text())["status"] == "running"
    listing = one_json(invoke("--store", store, "ls", "--json"))
    row = next(r for r in listing["artifacts"] if r["artifact"] == "killed@v1")
    assert row["status"] == "interrupted" and f"ncfm --store {store} resume killed@v1" in row["hint"]
    shown = one_json(invoke("--store", store, "inspect", "killed@v1", "--json"))
    assert shown["status"] == "interrupted" and f"ncfm --store {store} resume killed@v1" in shown["hint"]
    assert shown["recorded_status"] == "running"
    human = invoke("--store", store, "inspect", "killed@v1").stdout
    assert "interrupted" in human and f"ncfm --store {store} resume killed@v1" in " ".join(human.split())


# ----------------------------------------------------------------------------- 5. atomic exports


@pytest.mark.parametrize("fmt", ["png", "imagefolder", "grid", "npz", "pt"])
def test_an_export_killed_midway_leaves_nothing_under_the_target(tmp_path, monkeypatch, fmt):
    """A kill while files are written (here: the third file write raises) leaves no partial
    folder and no half-written file where the export was going; an existing export stays whole."""
    from PIL import Image

    import ncfm_core.export as export_module

    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    names = ["a", "b", "c"]
    previous = tmp_path / "previous"
    export_module.export_synset(images, labels, names, previous, fmt, factor=1)
    before = {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()}

    calls = {"n": 0}
    png_save = Image.Image.save

    def dying_png(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(fp).write_bytes(b"")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        return png_save(self, fp, *args, **kwargs)

    def dying_atomic(path, data):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", dying_png)
    monkeypatch.setattr(export_module, "atomic_write_bytes", dying_atomic)
    for target in (tmp_path / "fresh", previous):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            export_module.export_synset(images, labels, names, target, fmt, factor=1, replace=True)
    assert not (tmp_path / "fresh").exists()
    after = {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]  # no staging folder left behind


def test_eval_refuses_an_unwritable_store_before_training(store_copy, monkeypatch):
    import ncfm_core.jobs.eval as eval_jobs
    import ncfm_core.store.versions as versions_module

    def read_only(path, data):
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    def no_training(*args, **kwargs):
        raise AssertionError("networks were trained")

    monkeypatch.setattr(versions_module, "atomic_write_bytes", read_only)
    monkeypatch.setattr(eval_jobs, "evaluate_models", no_training)
    line = error_line(invoke("--store", store_copy, "eval", "digits-ipc1", *EVAL_TINY, expect=7))
    assert "Read-only file system" in line and "writable" in line


@pytest.mark.parametrize("json_output", [True, False])
def test_a_result_that_cannot_be_recorded_is_printed_and_exits_7(store_copy, monkeypatch, json_output):
    def disk_full(self, version, record, **options):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Store, "append_eval", disk_full)
    args = ["--store", store_copy, "eval", "digits-ipc1", *EVAL_TINY, *(["--json"] if json_output else [])]
    result = invoke(*args, expect=7)
    line = error_line(result)
    assert "No space left on device" in line and "not saved" in line
    if json_output:
        printed = one_json(result)
        assert math.isfinite(printed["accuracy"]["mean"]) and printed["artifact"] == "digits-ipc1@v1"
        assert printed["error"]["exit_code"] == 7 and "No space left" in printed["error"]["message"]
    else:
        assert "mean +- std" in result.stdout
    assert Store(store_copy).resolve("digits-ipc1").record().evals == ()


# ----------------------------------------------------------------------------- 8. manifests validated


def _rewrite_manifest(store: Path, change) -> Path:
    path = Store(store).resolve("digits-ipc1@v1").manifest_path
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))
    return path


@pytest.mark.parametrize(("command", "change", "words"), [
    (["eval", "digits-ipc1@v1", *EVAL_TINY], lambda m: {**m, "config": {**m["config"], "ipc": "1"}}, "'ipc'"),
    (["resume", "digits-ipc1@v1", "--iterations", "6"], lambda m: {**m, "config": {**m["config"], "ipc": "1"}},
     "'ipc'"),
    (["inspect", "digits-ipc1@v1"], lambda m: {**m, "iterations_done": "4"}, "'iterations_done'"),
    (["inspect", "digits-ipc1@v1"], lambda m: {**m, "evals": {"a": 1}}, "'evals'"),
    (["inspect", "digits-ipc1@v1"], lambda m: {**m, "status": "done"}, "'status'"),
    (["inspect", "digits-ipc1"], lambda m: {}, "'name'"),
    (["eval", "digits-ipc1", *EVAL_TINY], lambda m: {}, "is missing"),
])
def test_malformed_manifests_are_corrupt_naming_field_and_file(store_copy, command, change, words):
    path = _rewrite_manifest(store_copy, change)
    line = error_line(invoke("--store", store_copy, *command, expect=1))
    assert str(path) in line and words in line


def test_a_huge_manifest_is_refused_without_being_read(store_copy, monkeypatch):
    path = _rewrite_manifest(store_copy, lambda m: m)
    with open(path, "r+b") as handle:  # 200 MB, sparse: cheap to make
        handle.truncate(200 * 2**20)
    import ncfm_core.store.files as files_module

    read = []
    original = os.read
    monkeypatch.setattr(files_module.os, "read", lambda fd, size: read.append(size) or original(fd, size))
    line = error_line(invoke("--store", store_copy, "inspect", "digits-ipc1@v1", expect=1))
    assert str(path) in line and "MiB" in line
    assert read == []  # refused by the open file's size, before a byte was read
    listing = one_json(invoke("--store", store_copy, "ls", "--json"))
    assert any(str(path) in warning for warning in listing["warnings"])
