"""The artifact store: roots, names, versions, references, corrupt files, nested states."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import platformdirs
import pytest
import safetensors.torch
import torch

from ncfm_core.errors import ConfigError, CorruptArtifactError, NotFoundError
from ncfm_core.store import (
    Accuracy,
    ArtifactVersion,
    EvalRecord,
    EvalRequest,
    RunRecord,
    Store,
    atomic_write_bytes,
    flatten_state,
    load_state,
    load_tensors,
    read_json,
    save_state,
    save_tensors,
    store_root,
    unflatten_state,
    validate_name,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message


# ----------------------------------------------------------------------------- root, names


def test_store_root_order_resolved_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setattr(platformdirs, "user_data_dir", lambda app: str(tmp_path / "pd" / app))
    monkeypatch.delenv("NCFM_HOME", raising=False)
    assert store_root() == tmp_path / "pd" / "ncfm"
    monkeypatch.setenv("NCFM_HOME", str(tmp_path / "home"))
    assert store_root() == tmp_path / "home"  # the env change is seen without re-import
    assert store_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert store_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert Store().root == tmp_path / "home"
    assert Store(tmp_path / "explicit").artifacts_dir == tmp_path / "explicit" / "artifacts"
    monkeypatch.setenv("NCFM_HOME", "")  # empty means unset
    assert store_root() == tmp_path / "pd" / "ncfm"


@pytest.mark.parametrize("name", ["a", "cifar10-ipc10", "run_2.v3", "A" * 128, "0x"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", "a\\b", ".hidden", "-opt", "a..b", "..", "a b", "a@v1", "A" * 129, "é", None]
)
def test_invalid_names(name):
    with pytest.raises(ConfigError, match="invalid artifact name"):
        validate_name(name)


def test_pool_dir_validates_key(tmp_path):
    store = Store(tmp_path)
    assert store.pool_dir("abc123") == tmp_path / "pools" / "abc123"
    with pytest.raises(ConfigError, match="pool key"):
        store.pool_dir("../escape")


# ----------------------------------------------------------------------------- atomic files


def test_json_round_trip_and_format(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json(path, {"b": 1, "a": [1.5, None], "nan": float("nan")})
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert read_json(path) == {"a": [1.5, None], "b": 1, "nan": None}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_read_json_errors(tmp_path):
    with pytest.raises(NotFoundError):
        read_json(tmp_path / "missing.json")
    for bad in (b'{"a": ', b"\xff\xfe", b"[1, 2]"):
        path = tmp_path / "bad.json"
        path.write_bytes(bad)
        with pytest.raises(CorruptArtifactError) as err:
            read_json(path)
        assert_one_line_naming(err, path)


def test_interrupted_replace_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    atomic_write_bytes(path, b"old")

    def failing_replace(src, dst):
        raise OSError("disk pulled out")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk pulled out"):
        atomic_write_bytes(path, b"new")
    with pytest.raises(OSError):
        save_tensors(path, {"x": torch.ones(3)})
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_failed_serialisation_keeps_old_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"x": torch.arange(4.0)})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_tensors(path, {"x": torch.zeros(2), "y": "not a tensor"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        save_state(path, {"fine": torch.zeros(2), "bad": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


# ----------------------------------------------------------------------------- tensors


def test_save_load_tensors_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {
        "images": base.t(),  # non-contiguous
        "view": base[1],  # a view sharing storage with "images"
        "labels": torch.tensor([0, 1, 1], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "half": torch.randn(2, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int32),
    }
    save_tensors(path, tensors, {"factor": "2"})
    loaded, metadata = load_tensors(
        path,
        expected={
            "images": ((4, 3), torch.float32),
            "view": ((None,), None),
            "labels": (None, torch.int64),
            "mask": ((2,), torch.bool),
            "half": ((2, 2), torch.bfloat16),
            "empty": ((0, 3), torch.float32),
            "scalar": ((), torch.int32),
        },
    )
    assert metadata == {"factor": "2"}
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def _valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "synset.safetensors"
    save_tensors(path, {"images": torch.rand(4, 3, 8, 8), "labels": torch.arange(4)}, {"factor": "1"})
    return path


EXPECTED = {"images": ((None, 3, 8, 8), torch.float32), "labels": ((4,), torch.int64)}


def _flip(data: bytes, index: int, mask: int = 0xFF) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: data[: len(data) - 10], id="truncated-data"),
        pytest.param(lambda data: data[:20], id="truncated-header"),
        pytest.param(lambda data: data[:5], id="shorter-than-prefix"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: _flip(data, 8), id="flipped-header-brace"),
        pytest.param(lambda data: _flip(data, 3, 0x01), id="flipped-length-prefix"),
        pytest.param(lambda data: _flip(data, _header_end(data) - 3, 0x40), id="flipped-header-tail"),
        pytest.param(
            lambda data: data.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1), id="bad-offsets"
        ),
        pytest.param(lambda data: bytes(range(256)) * 8, id="random-garbage"),
        pytest.param(lambda data: json.dumps({"images": [1, 2, 3]}).encode(), id="json-file"),
    ],
)
def test_corrupt_safetensors_is_one_line_error(tmp_path, corrupt):
    path = _valid_file(tmp_path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CorruptArtifactError) as err:
        load_tensors(path, EXPECTED)
    assert_one_line_naming(err, path)


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({"images": torch.rand(4, 3, 8, 8), "label": torch.arange(4)}, "names"),
        ({"images": torch.rand(4, 3, 8, 8)}, "names"),
        ({"images": torch.rand(4, 3, 8, 8), "labels": torch.arange(4), "x": torch.ones(1)}, "names"),
        ({"images": torch.rand(4, 3, 8, 9), "labels": torch.arange(4)}, "shape"),
        ({"images": torch.rand(4, 3, 8), "labels": torch.arange(4)}, "shape"),
        ({"images": torch.rand(4, 3, 8, 8).double(), "labels": torch.arange(4)}, "dtype"),
        ({"images": torch.rand(4, 3, 8, 8), "labels": torch.arange(4).int()}, "dtype"),
    ],
)
def test_unexpected_contents_are_corrupt(tmp_path, tensors, fragment):
    path = tmp_path / "synset.safetensors"
    save_tensors(path, tensors)
    with pytest.raises(CorruptArtifactError, match=fragment) as err:
        load_tensors(path, EXPECTED)
    assert_one_line_naming(err, path)


def test_missing_tensor_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        load_tensors(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------- nested states


def _train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int, steps: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(5, 3, generator=generator)
        optimizer.zero_grad()
        model(inputs).pow(2).sum().backward()
        optimizer.step()


def test_state_round_trip_with_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    _train_steps(model, optimizer, seed=1, steps=3)
    generator = torch.Generator().manual_seed(123)
    torch.randn(3, generator=generator)  # move it away from the seed state
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "global_rng": torch.get_rng_state(),
        "iteration": 17,
        "history": [0.5, float("inf"), float("nan"), -0.0],
        "shape": (2, (3, None)),
        "keys": {0: "int", "0": "str", True: "bool", (1, 2): "tuple", None: "none", 2.5: "float"},
        "__dunder": {"__tensor__": "not a tag"},
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "dotted": {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}},
    }
    path = tmp_path / "checkpoint" / "state.safetensors"
    save_state(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.safetensors"]
    restored = load_state(path)

    assert restored["iteration"] == 17 and type(restored["iteration"]) is int
    history = restored["history"]
    assert history[0] == 0.5 and history[1] == float("inf") and history[2] != history[2]
    assert str(history[3]) == "-0.0"
    assert restored["shape"] == (2, (3, None)) and isinstance(restored["shape"][1], tuple)
    assert restored["keys"] == state["keys"]
    assert [type(key) for key in restored["keys"]] == [type(key) for key in state["keys"]]
    assert restored["__dunder"] == {"__tensor__": "not a tag"}
    assert restored["dtype"] is torch.bfloat16 and restored["device"] == torch.device("cpu")
    assert torch.equal(restored["dotted"]["a.b"], torch.ones(1))
    assert torch.equal(restored["dotted"]["a"]["b"], torch.zeros(1))
    assert list(restored["optimizer"]["state"]) == [0, 1, 2, 3]  # int parameter ids survive

    # The restored generator continues exactly where the saved one would.
    resumed = torch.Generator()
    resumed.set_state(restored["generator"])
    assert torch.equal(torch.randn(4, generator=resumed), torch.randn(4, generator=generator))
    assert torch.equal(restored["global_rng"], state["global_rng"])

    # A fresh model + optimizer loaded from the checkpoint takes the same next steps.
    fresh_model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1.0)
    fresh_model.load_state_dict(restored["model"])
    fresh_optimizer.load_state_dict(restored["optimizer"])
    _train_steps(model, optimizer, seed=2, steps=2)
    _train_steps(fresh_model, fresh_optimizer, seed=2, steps=2)
    for original, copy in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(copy, original, rtol=0, atol=0)


def test_flatten_state_names_and_tree():
    tensors, tree = flatten_state({"a": {"b": [torch.ones(2)]}, "n": 1})
    assert list(tensors) == ["a.b.0"]
    assert json.loads(json.dumps(tree)) == tree
    assert tree["root"] == {"a": {"b": [{"__tensor__": "a.b.0"}]}, "n": 1}
    assert unflatten_state(tensors, tree)["n"] == 1


def test_flatten_state_rejects_unknown_types():
    with pytest.raises(TypeError, match="opt.x"):
        flatten_state({"opt": {"x": {1, 2}}})


@pytest.mark.parametrize(
    "tree",
    [
        {"format": 1, "root": {"__tensor__": "missing"}},
        {"format": 1, "root": {"__bogus__": 1}},
        {"format": 99, "root": None},
        {"format": 1, "root": {"__dict__": [[[1], 2]]}},
    ],
)
def test_unflatten_rejects_malformed_trees(tree):
    with pytest.raises(ValueError):
        unflatten_state({}, tree)


def test_load_state_corrupt_tree_and_plain_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_tensors(plain, {"x": torch.ones(1)})
    with pytest.raises(CorruptArtifactError, match="not an ncfm state") as err:
        load_state(plain)
    assert_one_line_naming(err, plain)
    broken = tmp_path / "broken.safetensors"
    save_tensors(broken, {"x": torch.ones(1)}, {"ncfm_state_tree": '{"format": 1, "root": {"__tensor__": "y"}}'})
    with pytest.raises(CorruptArtifactError, match="broken state tree") as err:
        load_state(broken)
    assert_one_line_naming(err, broken)
    garbage = tmp_path / "garbage.safetensors"
    save_tensors(garbage, {"x": torch.ones(1)}, {"ncfm_state_tree": "{not json"})
    with pytest.raises(CorruptArtifactError):
        load_state(garbage)


# ----------------------------------------------------------------------------- versions


def test_create_version_numbers_and_record(tmp_path):
    store = Store(tmp_path)
    first = store.create_version("digits-ipc10", RunRecord(seed=0, name="ignored"))
    second = store.create_version("digits-ipc10", RunRecord(seed=1, status="complete"))
    assert (first.version, second.version) == (1, 2)
    assert first.path == tmp_path / "artifacts" / "digits-ipc10" / "v1"
    assert second.ref == "digits-ipc10@v2"
    assert first.checkpoint_path == first.path / "checkpoint" / "state.safetensors"
    assert first.synset_path.name == "synset.safetensors" and first.sampler_path.name == "sampler.safetensors"
    record = first.record()
    assert record.name == "digits-ipc10" and record.version == 1
    assert record.status == "running" and record.seed == 0
    assert record.created.endswith("+00:00")
    assert second.record().status == "complete"
    assert [v.version for v in store.versions("digits-ipc10")] == [1, 2]
    with pytest.raises(ConfigError):
        store.create_version("../evil", RunRecord())
    with pytest.raises(ValueError, match="status"):  # what would not read back is never written
        store.create_version("x", RunRecord(status="done"))
    assert [v.version for v in store.versions("x")] == []  # and leaves no version behind


def test_update_record_and_append_eval(tmp_path):
    store = Store(tmp_path)
    version = store.create_version("a", RunRecord(pending_eval=EvalRequest(protocol={"epochs": 1})))
    updated = store.update_record(version, status="complete", iterations_done=10)
    assert updated.status == "complete" and updated.iterations_done == 10
    doubled = store.update_record(version, lambda r: r.replace(iterations_done=2 * r.iterations_done), seed=3)
    assert (doubled.iterations_done, doubled.seed) == (20, 3)
    store.append_eval(version, EvalRecord(accuracy=Accuracy(mean=0.5)))
    assert version.record().pending_eval is not None  # only the evaluation that answers it clears it
    final = store.append_eval(version, EvalRecord(accuracy=Accuracy(mean=0.6)), clears_pending_eval=True)
    assert [e.accuracy.mean for e in final.evals] == [0.5, 0.6] and final.pending_eval is None
    assert version.record() == final
    with pytest.raises(ValueError, match="status"):
        store.update_record(version, status="bogus")
    assert version.record() == final


_WRITER = """
import sys, time, pathlib
from ncfm_core.store import RunRecord, Store
root, go, tag = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
pathlib.Path(str(go) + "." + tag).touch()
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
store = Store(root)
for i in range(10):
    store.create_version("race", RunRecord(seed=i, device=tag))
"""


def test_concurrent_processes_get_distinct_versions(tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "store"), str(go), tag], env=env)
        for tag in ("p0", "p1")
    ]
    try:
        # Start both loops together so their allocations actually interleave.
        for _ in range(60_000):
            if all(Path(f"{go}.{tag}").exists() for tag in ("p0", "p1")):
                break
            threading.Event().wait(0.002)
        go.touch()
        codes = [writer.wait(timeout=180) for writer in writers]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
    assert codes == [0, 0]
    found, warnings = Store(tmp_path / "store").scan()
    assert warnings == []
    assert sorted(version.version for version, _ in found) == list(range(1, 21))
    assert sorted((r.device, r.seed) for _, r in found) == sorted((t, i) for t in ("p0", "p1") for i in range(10))
    assert all(r.version == v.version for v, r in found)


def test_allocation_is_correct_without_the_lock(tmp_path, monkeypatch):
    # Correctness rests on os.mkdir, not on the file lock: disable the lock and race threads.
    monkeypatch.setattr(Store, "_name_lock", lambda self, name: contextlib.nullcontext())
    real_mkdir = os.mkdir

    def slow_mkdir(path, *args, **kwargs):
        time.sleep(0.001)  # widen the window between listing versions and taking one
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", slow_mkdir)
    store = Store(tmp_path)
    barrier = threading.Barrier(4)
    results: list[int] = []

    def writer() -> None:
        barrier.wait()
        for _ in range(8):
            results.append(store.create_version("race", RunRecord()).version)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(1, 33))


# ----------------------------------------------------------------------------- resolve, scan


def _complete(store: Store, name: str, status: str = "complete") -> ArtifactVersion:
    return store.create_version(name, RunRecord(status=status))


def test_resolve_references(tmp_path, monkeypatch):
    store = Store(tmp_path)
    v1 = _complete(store, "cifar10-ipc10")
    v2 = _complete(store, "cifar10-ipc10")
    v3 = _complete(store, "cifar10-ipc10", status="running")
    assert store.resolve("cifar10-ipc10") == v2  # latest COMPLETE, not latest
    assert store.resolve("cifar10-ipc10@v3") == v3
    assert store.resolve("cifar10-ipc10@1") == v1
    assert store.resolve(str(v1.path)) == v1
    monkeypatch.chdir(v2.path.parent)
    resolved = store.resolve("./v2")
    assert (resolved.name, resolved.version) == ("cifar10-ipc10", 2)
    store.update_record(v3, status="complete")
    assert store.resolve("cifar10-ipc10") == v3


def test_resolve_copied_version_directory_uses_manifest(tmp_path):
    store = Store(tmp_path / "s")
    version = _complete(store, "digits")
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    (copy / "manifest.json").write_bytes(version.manifest_path.read_bytes())
    resolved = store.resolve(str(copy))
    assert (resolved.name, resolved.version, resolved.path) == ("digits", 1, copy)


def test_resolve_not_found_messages(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(NotFoundError, match="empty"):
        store.resolve("anything")
    _complete(store, "cifar10-ipc10", status="running")
    _complete(store, "cifar10-ipc10", status="failed")
    with pytest.raises(NotFoundError, match="did you mean cifar10-ipc10") as err:
        store.resolve("cifar10-ipc1")
    assert "\n" not in str(err.value)
    with pytest.raises(NotFoundError, match=r"no complete version \(v1 \(running\), v2 \(failed\)\)") as err:
        store.resolve("cifar10-ipc10")
    # The real version to continue, never a placeholder to fill in.
    assert "`ncfm resume cifar10-ipc10@v2`" in str(err.value) and "vN" not in str(err.value)
    with pytest.raises(NotFoundError, match="has v1, v2"):
        store.resolve("cifar10-ipc10@v7")
    with pytest.raises(NotFoundError, match="did you mean"):
        store.resolve("cifar10-ipc1@v1")
    with pytest.raises(NotFoundError, match="not a version directory"):
        store.resolve(str(tmp_path / "no" / "such"))
    with pytest.raises(ConfigError):
        store.resolve("cifar10-ipc10@latest")
    with pytest.raises(NotFoundError, match="not a version directory"):
        store.resolve("..")  # a path (the parent folder), never a name


def test_corrupt_manifest_and_scan(tmp_path):
    store = Store(tmp_path)
    good = _complete(store, "good")
    bad = _complete(store, "bad")
    _complete(store, "bad")
    bad.manifest_path.write_text('{"status": "compl')
    (tmp_path / "artifacts" / "bad" / "v3").mkdir()  # a version whose manifest never got written
    with pytest.raises(CorruptArtifactError) as err:
        bad.record()
    assert_one_line_naming(err, bad.manifest_path)
    with pytest.raises(CorruptArtifactError):
        store.update_record(bad, status="failed")

    found, warnings = store.scan()
    assert [(v.name, v.version) for v, _ in found] == [("bad", 2), ("good", 1)]
    assert found[1][0] == good and found[1][1].status == "complete"
    assert len(warnings) == 2
    assert "bad@v1" in warnings[0] and str(bad.manifest_path) in warnings[0]
    assert "bad@v3" in warnings[1] and "not found" in warnings[1]
    # latest complete skips the unreadable newer version instead of failing
    assert store.resolve("bad").version == 2


def test_delete_version(tmp_path):
    store = Store(tmp_path)
    first = _complete(store, "x")
    second = _complete(store, "x")
    store.delete_version(second)
    assert store.versions("x") == [first]
    assert not any(p.name.startswith(".deleting") for p in (tmp_path / "artifacts" / "x").iterdir())
    assert store.create_version("x", RunRecord()).version == 2
    with pytest.raises(NotFoundError):
        store.delete_version(second.__class__("x", 9, tmp_path / "artifacts" / "x" / "v9"))


def test_safetensors_written_by_us_are_plain_safetensors(tmp_path):
    # Other tools read our files with the stock loader: no custom framing.
    path = tmp_path / "sampler.safetensors"
    save_tensors(path, {"w": torch.ones(2, 2)})
    assert torch.equal(safetensors.torch.load_file(str(path))["w"], torch.ones(2, 2))


def test_without_platformdirs_the_store_needs_ncfm_home_and_says_so(monkeypatch, tmp_path):
    """Some GPU images ship without platformdirs: ncfm must still run with NCFM_HOME set."""
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # `import platformdirs` now fails
    monkeypatch.setenv("NCFM_HOME", str(tmp_path / "home"))
    assert store_root() == tmp_path / "home"
    monkeypatch.delenv("NCFM_HOME")
    with pytest.raises(ConfigError, match="platformdirs is not installed.*set NCFM_HOME"):
        store_root()
